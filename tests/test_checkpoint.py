"""Checkpoint storage: pruning never trades a verified checkpoint for a corrupt one (corrupt ones are moved to
checkpoints/corrupt/ and reported), a full disk gives DiskFullError with the partial folder removed and earlier
checkpoints intact, stale temporaries of dead processes are cleaned, and the tokenizer is stored with its
fingerprint (older checkpoints without one still load). Small modules, no training."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from bertfast.train import checkpoint as ckpt


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_model(width: int = 8) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(2 * width, width), torch.nn.LayerNorm(width))


def tiny_state(model) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, model[0].in_features)).sum().backward()
    opt.step()
    return {"step": 1, "optimizer": opt.state_dict(), "rng": ckpt.rng_state()}


def save(out, step, model=None, keep=10, **kw) -> str:
    model = model or tiny_model()
    return ckpt.save_checkpoint(str(out), step, model, {"width": 8}, tiny_state(model), keep=keep, **kw)


def corrupt(path) -> None:
    """Truncate the weights file (as a crash on a non-atomic filesystem or a bad disk would)."""
    p = os.path.join(path, "model.safetensors")
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)


def steps(out) -> list[int]:
    return [s for s, _ in ckpt.list_checkpoints(str(out))]


def aside(out) -> list[str]:
    d = os.path.join(out, ckpt.CHECKPOINT_DIR, ckpt.CORRUPT_DIR)
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def read_latest(out) -> str:
    with open(os.path.join(out, ckpt.CHECKPOINT_DIR, "latest")) as f:
        return f.read().strip()


# ---------------------------------------------------------------------------------------------- pruning (item 1)
def test_new_run_into_all_corrupt_folder_keeps_its_own_checkpoints(tmp_path):
    """Every checkpoint there is corrupt: a new run's saves must survive pruning (the corrupt ones used to be
    'the newest' and were kept while each new one was deleted), and --resume must then find them."""
    for s in (16, 20, 24):
        save(tmp_path, s)
    for _, path in ckpt.list_checkpoints(str(tmp_path)):
        corrupt(path)
    assert ckpt.find_latest_checkpoint(str(tmp_path)).step == -1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for s in (2, 4, 6):
            save(tmp_path, s, keep=2)
    assert steps(tmp_path) == [6, 4]
    found = ckpt.find_latest_checkpoint(str(tmp_path))
    assert (found.step, found.skipped) == (6, [])
    assert read_latest(tmp_path) == "step_00000006"
    assert aside(tmp_path) == ["step_00000016", "step_00000020", "step_00000024"]
    msgs = [str(w.message) for w in caught if "moved it to" in str(w.message)]
    assert len(msgs) == 3 and all("is corrupt" in m for m in msgs), msgs
    logs = []  # the report goes to `log` when one is given
    save(tmp_path, 20)
    corrupt(tmp_path / "checkpoints" / "step_00000020")
    save(tmp_path, 8, keep=2, log=logs.append)
    assert len(logs) == 1 and "step_00000020 is corrupt" in logs[0] and "corrupt/step_00000020.2" in logs[0], logs
    assert steps(tmp_path) == [8, 6]


@pytest.mark.parametrize("keep", [1, 2])
def test_corrupt_newest_is_moved_aside_and_good_ones_are_kept(tmp_path, keep):
    """Newest checkpoint (16) corrupt, a resumed run writes 14 with --keep-checkpoints 1 or 2: 14 survives, 12
    survives when keep allows a second, 16 goes to corrupt/ (it used to be kept and 14 and 12 deleted)."""
    for s in (8, 12, 16):
        save(tmp_path, s)
    corrupt(os.path.join(tmp_path, "checkpoints", "step_00000016"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save(tmp_path, 14, keep=keep)
    assert steps(tmp_path) == [14, 12][:keep]
    assert aside(tmp_path) == ["step_00000016"]
    msgs = [str(w.message) for w in caught if issubclass(w.category, ckpt.CheckpointWarning)]
    assert len(msgs) == 1 and "step_00000016 is corrupt: model.safetensors" in msgs[0], msgs
    for _, path in ckpt.list_checkpoints(str(tmp_path)):
        ckpt.verify_checkpoint(path)
    assert ckpt.find_latest_checkpoint(str(tmp_path)).step == 14
    assert read_latest(tmp_path) == "step_00000014"


def test_prune_result_and_repeated_corrupt_names(tmp_path):
    save(tmp_path, 4)
    save(tmp_path, 8)
    root = tmp_path / "checkpoints"
    corrupt(root / "step_00000008")
    with pytest.warns(ckpt.CheckpointWarning):
        r = ckpt.prune_checkpoints(str(tmp_path), 3)
    assert r.kept == [str(root / "step_00000004")] and r.removed == []
    assert r.moved_aside == [str(root / "corrupt" / "step_00000008")]
    save(tmp_path, 8)  # a second corrupt copy of the same step does not overwrite the first one set aside
    corrupt(root / "step_00000008")
    with pytest.warns(ckpt.CheckpointWarning):
        r = ckpt.prune_checkpoints(str(tmp_path), 1)
    assert r.moved_aside == [str(root / "corrupt" / "step_00000008.2")]
    assert r.kept == [str(root / "step_00000004")]
    assert read_latest(tmp_path) == "step_00000004"  # `latest` no longer names the checkpoint moved aside


def test_resaving_a_corrupt_step_moves_it_aside(tmp_path):
    save(tmp_path, 4)
    corrupt(tmp_path / "checkpoints" / "step_00000004")
    logs = []
    save(tmp_path, 4, log=logs.append)
    ckpt.verify_checkpoint(str(tmp_path / "checkpoints" / "step_00000004"))
    assert aside(tmp_path) == ["step_00000004"]
    assert len(logs) == 1 and "step_00000004 is corrupt" in logs[0], logs


def test_resaving_a_good_step_replaces_it(tmp_path):
    m = tiny_model()
    save(tmp_path, 4)
    path = save(tmp_path, 4, model=m)
    from safetensors.torch import load_file

    assert torch.equal(load_file(os.path.join(path, "model.safetensors"))["0.weight"], m[0].weight)
    assert aside(tmp_path) == [] and sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step_00000004"]


def test_the_checkpoint_just_written_is_never_pruned(tmp_path):
    """Saving an earlier step than verified ones already there (a library caller's choice) keeps the new one."""
    for s in (8, 12):
        save(tmp_path, s)
    path = save(tmp_path, 4, keep=2)
    assert os.path.isdir(path)
    assert steps(tmp_path) == [12, 4]


def test_verification_cache_sees_same_size_changes(tmp_path):
    """Pruning and find_latest_checkpoint hash each checkpoint once per process; a later in-place change of the
    same size must still be caught."""
    save(tmp_path, 4)
    path = save(tmp_path, 8)
    assert ckpt.find_latest_checkpoint(str(tmp_path)).step == 8
    p = os.path.join(path, "state.pt")
    with open(p, "r+b") as f:
        f.seek(os.path.getsize(p) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
    found = ckpt.find_latest_checkpoint(str(tmp_path))
    assert found.step == 4 and "state.pt does not match its sha256" in found.skipped[0]


def test_verify_rejects_manifest_paths_outside_the_checkpoint(tmp_path):
    import json

    path = save(tmp_path, 4)
    mpath = os.path.join(path, "manifest.json")
    with open(mpath) as f:
        manifest = json.load(f)
    manifest["files"]["../escape"] = {"size": 1, "sha256": "0" * 64}
    with open(mpath, "w") as f:
        json.dump(manifest, f)
    with pytest.raises(ckpt.CheckpointError, match="bad entry '../escape'"):
        ckpt.verify_checkpoint(path)


# ---------------------------------------------------------------------------------------------- full disk (item 4)
def _no_temporaries(out) -> bool:
    return not [n for n in os.listdir(os.path.join(out, "checkpoints")) if ".tmp" in n or n.startswith(".old")]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) to fail torch.save for real")
def test_full_disk_during_torch_save(tmp_path, monkeypatch):
    """torch.save on a full disk raises only '[enforce fail at inline_container.cc] unexpected pos': state.pt is
    pointed at /dev/full (every write fails with ENOSPC) and the disk reports no free space once it is 'full'."""
    good = save(tmp_path, 4)
    full = {"now": False}
    real_free, real_write = ckpt._free_bytes, ckpt._write_state

    def write_state(path, state):
        full["now"] = True
        os.symlink("/dev/full", path)
        real_write(path, state)

    monkeypatch.setattr(ckpt, "_write_state", write_state)
    monkeypatch.setattr(ckpt, "_free_bytes", lambda p: 0 if full["now"] else real_free(p))
    m = tiny_model(64)
    with pytest.raises(ckpt.DiskFullError) as ei:
        save(tmp_path, 8, model=m)
    e = ei.value
    root = os.path.join(tmp_path, "checkpoints")
    assert str(e).startswith(f"no space left on device in {root} (the checkpoint needs about ")
    assert isinstance(e, ckpt.CheckpointSaveError) and not isinstance(e, ckpt.CheckpointError)
    assert "unexpected pos" in str(e.__cause__)  # the real torch error, kept as the cause
    assert _no_temporaries(tmp_path) and steps(tmp_path) == [4]
    ckpt.verify_checkpoint(good)


def test_full_disk_oserror_from_the_weights_writer(tmp_path, monkeypatch):
    good = save(tmp_path, 4)

    def write_weights(path, weights, metadata):
        with open(path, "wb") as f:
            f.write(b"\0" * 1000)  # a partial file, then the device is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "_write_weights", write_weights)
    with pytest.raises(ckpt.DiskFullError, match="no space left on device in .*checkpoints"):
        save(tmp_path, 8)
    assert _no_temporaries(tmp_path) and steps(tmp_path) == [4]
    ckpt.verify_checkpoint(good)


def test_full_disk_message_gives_the_checkpoint_size(tmp_path, monkeypatch):
    """'needs about N MB': N is within 15% of what the checkpoint really takes."""
    m = tiny_model(256)  # 512x256 + LayerNorm: ~0.5 MB of weights, ~1 MB of Adam moments
    path = save(tmp_path, 4, model=m)
    actual = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
    monkeypatch.setattr(ckpt, "_free_bytes", lambda p: 1000)  # checked before anything is written
    called = []
    monkeypatch.setattr(ckpt, "_write_weights", lambda *a: called.append(a))
    with pytest.raises(ckpt.DiskFullError) as ei:
        save(tmp_path, 8, model=m)
    assert not called and _no_temporaries(tmp_path)
    assert 0.85 * actual <= ei.value.needed_bytes <= 1.15 * actual, (ei.value.needed_bytes, actual)
    assert f"needs about {round(ei.value.needed_bytes / 2 ** 20)} MB, 0 MB free" in str(ei.value)


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    """An unrelated failure with room to spare is re-raised as it is (not misreported), and still cleaned up."""
    save(tmp_path, 4)

    def write_state(path, state):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("pickling failed")

    monkeypatch.setattr(ckpt, "_write_state", write_state)
    with pytest.raises(RuntimeError, match="pickling failed") as ei:
        save(tmp_path, 8)
    assert not isinstance(ei.value, ckpt.CheckpointSaveError)
    assert _no_temporaries(tmp_path) and steps(tmp_path) == [4]


def test_atomic_write_removes_its_temporary_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "latest"
    target.write_text("old\n")

    def replace(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(OSError):
        ckpt.atomic_write_text(str(target), "new\n")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["latest"] and target.read_text() == "old\n"


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_remove_stale_temporaries_spares_live_writers(tmp_path):
    save(tmp_path, 4)
    root = tmp_path / "checkpoints"
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [root / f".tmp-step_00000008-{dead}", root / f".old-step_00000004-{dead}"]
        for d in stale:
            (d / "sub").mkdir(parents=True)
            (d / "model.safetensors").write_bytes(b"x" * 100)
        (root / f"latest.tmp-{dead}").write_text("step_00000008\n")
        (tmp_path / f"metrics.jsonl.tmp-{dead}").write_text("{}\n")
        (tmp_path / f"tokenizer.tmp-{dead}").mkdir()
        alive = [root / f".tmp-step_00000012-{live.pid}", root / f".tmp-step_00000016-{os.getpid()}"]
        for d in alive:
            d.mkdir()
        (root / f"latest.tmp-{live.pid}").write_text("step_00000012\n")
        mine = [tmp_path / f"notes.tmp-{dead}", tmp_path / f"backup.tmp-{dead}"]  # the user's, not ours
        mine[0].mkdir()
        mine[1].write_text("keep me")
        removed = ckpt.remove_stale_temporaries(str(tmp_path))
        assert sorted(removed) == sorted(str(p) for p in stale + [root / f"latest.tmp-{dead}",
                                                                  tmp_path / f"metrics.jsonl.tmp-{dead}",
                                                                  tmp_path / f"tokenizer.tmp-{dead}"])
        for p in alive + mine + [root / f"latest.tmp-{live.pid}", root / "step_00000004"]:
            assert p.exists(), p
    finally:
        live.kill()
        live.wait()


# ---------------------------------------------------------------------------------------------- tokenizer (item 2)
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "cat", "sat", "on", "mat", "dog", "##s", "##ed", "a", "b", "c", "."]


def make_tokenizer(tmp_path, words=WORDS, name="vocab.txt", **kw):
    """A BertTokenizerFast over a vocab.txt of `words` (keyword options such as do_lower_case passed through)."""
    import inspect

    from transformers import BertTokenizerFast

    path = tmp_path / name
    path.write_text("\n".join(SPECIALS + list(words)) + "\n")
    key = "vocab_file" if "vocab_file" in inspect.signature(BertTokenizerFast.__init__).parameters else "vocab"
    return BertTokenizerFast(**{key: str(path)}, **kw), path


def test_tokenizer_fingerprint_is_the_vocabulary_not_the_files(tmp_path):
    tok, vocab_file = make_tokenizer(tmp_path)
    fp = ckpt.tokenizer_fingerprint(tok)
    assert len(fp) == 64 and int(fp, 16) >= 0
    tok.save_pretrained(tmp_path / "saved")
    assert ckpt.tokenizer_fingerprint(str(tmp_path / "saved")) == fp
    assert ckpt.tokenizer_fingerprint(str(vocab_file)) == fp
    tok("the cat sat on the mat", truncation=True, max_length=4)  # sets the backend's truncation state
    assert ckpt.tokenizer_fingerprint(tok) == fp
    swapped = list(WORDS)
    swapped[1], swapped[2] = swapped[2], swapped[1]  # two ids exchanged
    assert ckpt.tokenizer_fingerprint(make_tokenizer(tmp_path, swapped, "v2.txt")[0]) != fp
    assert ckpt.tokenizer_fingerprint(make_tokenizer(tmp_path, WORDS + ["mouse"], "v3.txt")[0]) != fp
    cased, _ = make_tokenizer(tmp_path, WORDS, "v4.txt", do_lower_case=False)
    assert ckpt.tokenizer_fingerprint(cased) != fp


def test_checkpoint_stores_the_tokenizer_and_its_fingerprint(tmp_path):
    tok, _ = make_tokenizer(tmp_path)
    path = save(tmp_path / "run", 4, tokenizer=tok)
    info = ckpt.checkpoint_tokenizer(path)
    assert info.fingerprint == ckpt.tokenizer_fingerprint(tok)
    assert info.dir == os.path.join(path, "tokenizer") and os.listdir(info.dir)
    from bertfast.data.tokenizer import load_tokenizer

    text = "the dogs sat on a mat."
    assert load_tokenizer(info.dir)(text)["input_ids"] == tok(text)["input_ids"]
    assert ckpt.check_tokenizer(path, tok) is True
    other, _ = make_tokenizer(tmp_path, WORDS + ["mouse"], "v2.txt")
    with pytest.raises(ckpt.CheckpointError, match="another tokenizer"):
        ckpt.check_tokenizer(path, other)
    # the stored files are covered by the manifest: damage to them makes the checkpoint corrupt
    tj = os.path.join(info.dir, sorted(os.listdir(info.dir))[0])
    with open(tj, "ab") as f:
        f.write(b" ")
    with pytest.raises(ckpt.CheckpointError, match="tokenizer/"):
        ckpt.verify_checkpoint(path)


def test_tokenizer_folder_is_copied_as_it_is_and_can_be_restored(tmp_path):
    tok, _ = make_tokenizer(tmp_path)
    src = tmp_path / "tokdir"
    tok.save_pretrained(src)
    (src / "bertfast_tokenizer.json").write_text('{"vocab_size": 17}')
    path = save(tmp_path / "run", 4, tokenizer=str(src))
    assert sorted(os.listdir(ckpt.checkpoint_tokenizer(path).dir)) == sorted(os.listdir(src))
    shutil.rmtree(src)  # the run's tokenizer/ was deleted: the checkpoint brings it back
    dest = ckpt.restore_tokenizer(path, str(tmp_path / "run" / "tokenizer"))
    assert ckpt.tokenizer_fingerprint(dest) == ckpt.checkpoint_tokenizer(path).fingerprint
    assert (tmp_path / "run" / "tokenizer" / "bertfast_tokenizer.json").read_text() == '{"vocab_size": 17}'
    with pytest.raises(ckpt.CheckpointError, match="exists already"):
        ckpt.restore_tokenizer(path, dest)


def test_checkpoints_without_a_tokenizer_still_load(tmp_path):
    """A checkpoint written before tokenizers were recorded: found, verified, loaded; no fingerprint to compare
    (check_tokenizer returns False and the caller decides), nothing to restore."""
    tok, _ = make_tokenizer(tmp_path)
    m = tiny_model()
    path = save(tmp_path / "run", 4, model=m)
    assert ckpt.checkpoint_tokenizer(path) == ckpt.CheckpointTokenizer(None, None)
    assert ckpt.check_tokenizer(path, tok) is False
    assert ckpt.find_latest_checkpoint(str(tmp_path / "run")).step == 4
    m2 = tiny_model()
    state = ckpt.load_checkpoint(path, m2)
    assert state["step"] == 1 and torch.equal(m2[0].weight, m[0].weight)
    with pytest.raises(ckpt.CheckpointError, match="holds no tokenizer"):
        ckpt.restore_tokenizer(path, str(tmp_path / "tok"))


def test_no_warning_without_corrupt_checkpoints(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ckpt.CheckpointWarning)
        for s in (2, 4, 6):
            save(tmp_path, s, keep=2)
    assert steps(tmp_path) == [6, 4] and aside(tmp_path) == []


def test_full_disk_message_points_at_corrupt_checkpoints_set_aside(tmp_path, monkeypatch):
    save(tmp_path, 4)
    save(tmp_path, 8)
    corrupt(tmp_path / "checkpoints" / "step_00000008")
    with pytest.warns(ckpt.CheckpointWarning):
        ckpt.prune_checkpoints(str(tmp_path), 3)
    monkeypatch.setattr(ckpt, "_free_bytes", lambda p: 0)
    with pytest.raises(ckpt.DiskFullError, match=r"Free some space \(.*corrupt holds \d+ MB of corrupt checkpoints"):
        save(tmp_path, 12)


def test_full_disk_on_the_first_checkpoint_does_not_promise_a_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "_free_bytes", lambda p: 0)
    with pytest.raises(ckpt.DiskFullError, match="there is no earlier checkpoint. Free some space and start again"):
        save(tmp_path, 2)
    assert steps(tmp_path) == [] and _no_temporaries(tmp_path)
