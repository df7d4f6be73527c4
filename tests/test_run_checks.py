"""The trainer's refusals and guarantees before and around a run (issue 14 items 2, 3, 5, 9, 10; issue 15 item 1;
issue 18 item 5): every bad setting is a ConfigError naming its flag before any data loads, nothing in
--output-dir changes before every check passed, and a resume keeps what its data and model depend on."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil

import pytest
import torch

from bertfast.train import checkpoint as ckpt
from bertfast.train.trainer import ConfigError, TrainConfig, train, validate_config

DOCS = 120


def tiny_cfg(out, **kw) -> TrainConfig:
    base = dict(preset="tiny", max_len=64, builtin_docs=DOCS, batch_size=8, max_steps=4, lr=2e-3, warmup_steps=2,
                log_every=2, checkpoint_every=2, keep_checkpoints=5, output_dir=str(out), progress=False,
                threads=1, seed=0, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def tree_digest(path) -> str:
    """A hash of every file name and content under `path` (to show a folder did not change)."""
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(root, name)
            h.update(os.path.relpath(p, path).encode())
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    """A finished 4-step run with checkpoints at 2 and 4."""
    pytest.importorskip("datasets", reason="the data pipeline needs `datasets`")
    out = tmp_path_factory.mktemp("run")
    logs = []
    train(tiny_cfg(out), log=logs.append)
    return out, logs


@pytest.fixture
def no_data(monkeypatch):
    """Fail the test if the data is loaded (the checks must come first)."""
    import bertfast.data

    def refuse(*a, **k):
        raise AssertionError("load_data was called before the check")
    monkeypatch.setattr(bertfast.data, "load_data", refuse)


def copy_run(done_run, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(done_run[0], work)
    return work


# ---------------------------------------------------------------------------------------------- types, ranges
@pytest.mark.parametrize("field, value, flag, words", [
    ("batch_size", "8", "--batch-size", "must be an integer"),
    ("lr", "1e-3", "--lr", "must be a number"),
    ("resume", 1, "--resume", "True or False"),
    ("data", "builtin", "--data", "a list of strings"),
    ("max_steps", 2.0, "--max-steps", "must be an integer"),
    ("seed", -1, "--seed", "[0, 4294967295]"),
    ("seed", 10 ** 23, "--seed", "[0, 4294967295]"),
])
def test_config_types_and_ranges_are_config_errors(tmp_path, field, value, flag, words):
    with pytest.raises(ConfigError, match=None) as e:
        validate_config(dataclasses.replace(tiny_cfg(tmp_path / "out"), **{field: value}))
    assert e.value.flag == flag and words in str(e.value), str(e.value)


def test_missing_data_path_is_refused_before_work(tmp_path, no_data):
    with pytest.raises(ConfigError) as e:
        validate_config(tiny_cfg(tmp_path / "out", data=[str(tmp_path / "nope.txt")]))
    assert e.value.flag == "--data" and "nope.txt" in str(e.value)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x01" * 100)
    with pytest.raises(ConfigError) as e:
        validate_config(tiny_cfg(tmp_path / "out", data=[str(binary)]))
    assert e.value.flag == "--data" and "bin.txt" in str(e.value)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- output dir
def test_nothing_is_written_when_a_check_after_loading_fails(tmp_path):
    """--grad-accum larger than an epoch is only known once the data is loaded: the refusal leaves no trace in
    --output-dir (the trained tokenizer used to be written there first)."""
    pytest.importorskip("datasets")
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="--grad-accum"):
        train(tiny_cfg(out, max_steps=0, epochs=1, grad_accum=10 ** 6), log=lambda *_: None)
    assert not out.exists() or os.listdir(out) == []


def test_warmup_longer_than_the_run_is_said_with_both_numbers(tmp_path):
    pytest.importorskip("datasets")
    logs = []
    train(tiny_cfg(tmp_path / "out", max_steps=3, warmup_steps=50, checkpoint_every=0), log=logs.append)
    assert any("--warmup-steps 50" in m and "3 steps" in m for m in logs), logs


def test_done_line_says_which_loss(done_run):
    _, logs = done_run
    done = [m for m in logs if m.startswith("done:")]
    assert done and "over steps 3-4 (the last logged window)" in done[0] and "mlm" in done[0], done


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("change, flag", [
    (dict(batch_size=4), "--batch-size"), (dict(seed=1), "--seed"), (dict(data=["builtin:0.5"]), "--data"),
    (dict(builtin_docs=100), "--builtin-docs"), (dict(vocab_size=1000), "--vocab-size"),
    (dict(grad_accum=2), "--grad-accum"),
])
def test_resume_with_another_data_setting_is_refused_before_data_loads(done_run, tmp_path, no_data, change, flag):
    work = copy_run(done_run, tmp_path)
    before = tree_digest(work)
    with pytest.raises(ConfigError) as e:
        train(tiny_cfg(work, resume=True, max_steps=6, **change), log=lambda *_: None)
    assert e.value.flag == "--resume" and flag in str(e.value) and "checkpoint" in str(e.value), str(e.value)
    assert tree_digest(work) == before  # nothing in the run folder changed (its tokenizer included)


def test_resume_keeps_the_checkpoints_settings_for_what_the_command_line_did_not_give(done_run, tmp_path, no_data):
    """The CLI passes the flags it was given (`given`): on --resume every other field takes the checkpoint's value
    (a flag's default is not a request to change the run), a given one is compared as before."""
    work = copy_run(done_run, tmp_path)
    bare = TrainConfig(output_dir=str(work), resume=True, progress=False)  # the CLI's defaults: another run entirely
    with pytest.raises(ConfigError, match="--batch-size 32 \\(checkpoint: 8\\)"):
        validate_config(bare)  # the Python API: every field as the TrainConfig says
    plan = validate_config(bare, given={"output_dir", "resume", "progress"})
    saved = tiny_cfg(work)
    for f in dataclasses.fields(TrainConfig):
        if f.name not in ("output_dir", "resume", "progress", "tokenizer", "init_from"):
            assert getattr(plan.cfg, f.name) == getattr(saved, f.name), f.name
    kept = [n for n in plan.notes if n.startswith("note: kept from checkpoint")]
    assert kept and "--batch-size 8" in kept[0] and "--warmup-steps 2" in kept[0], plan.notes
    assert "--seed" not in kept[0], plan.notes  # the same as the CLI's default: nothing to say
    # given flags: applied or refused as ever
    plan = validate_config(dataclasses.replace(bare, max_steps=6, lr=1e-3), given={"output_dir", "resume",
                                                                                      "max_steps", "lr"})
    assert (plan.cfg.max_steps, plan.cfg.lr, plan.cfg.batch_size) == (6, 1e-3, 8)
    assert any("--lr 0.002 -> 0.001" in n for n in plan.notes), plan.notes
    with pytest.raises(ConfigError, match="--batch-size 32"):
        validate_config(dataclasses.replace(bare, max_steps=6), given={"output_dir", "resume", "batch_size"})
    # a kept value that no longer fits this machine is named, with what to do
    state_path = os.path.join(ckpt.find_latest_checkpoint(str(work)).path, "state.pt")
    state = torch.load(state_path, weights_only=False)
    state["train_config"]["device"] = "cuda:7"
    torch.save(state, state_path)
    manifest_path = os.path.join(os.path.dirname(state_path), "manifest.json")
    manifest = json.load(open(manifest_path))
    manifest["files"]["state.pt"] = {"size": os.path.getsize(state_path),
                                     "sha256": hashlib.sha256(open(state_path, "rb").read()).hexdigest()}
    json.dump(manifest, open(manifest_path, "w"))
    if torch.cuda.device_count() < 8:
        with pytest.raises(ConfigError) as e:
            validate_config(bare, given={"output_dir", "resume"})
        assert e.value.flag == "--device" and "kept from checkpoint" in str(e.value), str(e.value)


def test_resume_of_a_finished_run_says_so_before_data_loads(done_run, tmp_path, no_data):
    work = copy_run(done_run, tmp_path)
    logs = []
    summary = train(tiny_cfg(work, resume=True), log=logs.append)
    assert summary["step"] == 4 and any("nothing left to train" in m for m in logs), logs


def test_resume_applies_a_changed_weight_decay_and_says_so(done_run, tmp_path):
    work = copy_run(done_run, tmp_path)
    logs = []
    train(tiny_cfg(work, resume=True, max_steps=6, weight_decay=0.5, lr=1e-3), log=logs.append)
    assert any("--weight-decay 0.01 -> 0.5" in m and "--lr 0.002 -> 0.001" in m for m in logs), logs
    state = torch.load(work / "checkpoints" / "step_00000006" / "state.pt", weights_only=False)
    decays = [g["weight_decay"] for g in state["optimizer"]["param_groups"]]
    assert decays == [0.5, 0.0], decays
    assert [g["initial_lr"] for g in state["optimizer"]["param_groups"]] == [1e-3, 1e-3]


def test_resume_refuses_another_tokenizer_and_never_trains_one(done_run, tmp_path, no_data):
    """Replace the run's tokenizer by another vocabulary: refused, nothing rewritten. Pass it as --tokenizer:
    refused too."""
    from bertfast.data.tokenizer import train_wordpiece

    work = copy_run(done_run, tmp_path)
    other = tmp_path / "other_tok"
    train_wordpiece([f"word{i} other{i % 7} text" for i in range(400)], 100, str(other))
    shutil.rmtree(work / "tokenizer")
    shutil.copytree(other, work / "tokenizer")
    before = tree_digest(work)
    with pytest.raises(ConfigError) as e:
        validate_config(tiny_cfg(work, resume=True, max_steps=6))
    assert e.value.flag == "--resume" and "another tokenizer" in str(e.value) and "Remove that folder" in str(e.value)
    with pytest.raises(ConfigError) as e:
        validate_config(tiny_cfg(work, resume=True, max_steps=6, tokenizer=str(other)))
    assert e.value.flag == "--tokenizer" and "another tokenizer" in str(e.value)
    assert tree_digest(work) == before


def test_resume_without_the_tokenizer_folder_uses_the_checkpoints_copy(done_run, tmp_path):
    work = copy_run(done_run, tmp_path)
    shutil.rmtree(work / "tokenizer")
    logs = []
    train(tiny_cfg(work, resume=True, max_steps=6), log=logs.append)
    assert any("using the tokenizer stored in checkpoint" in m for m in logs), logs
    assert ckpt.tokenizer_fingerprint(str(work / "tokenizer")) == ckpt.tokenizer_fingerprint(
        str(done_run[0] / "tokenizer"))


# ---------------------------------------------------------------------------------------------- device
def test_cuda_n_becomes_the_current_device(monkeypatch):
    """--device cuda:1 without torchrun: the trainer makes GPU 1 current (Triton launches on the current one)."""
    from bertfast.train import trainer

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: calls.append(torch.device(dev)))
    dev = trainer._select_device(TrainConfig(device="cuda:1"), trainer._Dist())
    assert dev == torch.device("cuda", 1) and calls == [torch.device("cuda", 1)]
    calls.clear()
    assert trainer._select_device(TrainConfig(device="cpu"), trainer._Dist()) == torch.device("cpu") and not calls
