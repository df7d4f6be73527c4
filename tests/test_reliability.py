"""Issue 29: one writer per run folder (bertfast.train.lock), pretraining and fine-tuning runs that do not write
over each other, counts that explain themselves for tiny corpora, and a run that ends on non-finite losses failing
instead of finishing "done"."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from bertfast.train.lock import LOCK_NAME, OutputDirBusy, RunLock, folder_kind

from _utils import assert_one_line_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONUNBUFFERED="1")
SMALL = ["--preset", "tiny", "--max-len", "64", "--builtin-docs", "120", "--batch-size", "8", "--threads", "1",
         "--no-progress", "--warmup-steps", "1", "--device", "cpu"]
HOLDER = ("import sys, time\nfrom bertfast.train.lock import RunLock\n"
          "RunLock(sys.argv[1], command='the holder').acquire()\nprint('ready', flush=True)\ntime.sleep(600)\n")


def _tree(path) -> dict:
    """Every file under `path` with its bytes (to show a folder was not touched)."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            p = os.path.join(root, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, path)] = f.read()
    return out


@pytest.fixture
def holder(tmp_path):
    """start(folder) -> a process holding `folder`'s lock (killed at the end of the test)."""
    procs = []

    def start(folder):
        p = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True, env=ENV)
        procs.append(p)
        assert p.stdout.readline().strip() == "ready"
        return p
    yield start
    for p in procs:
        p.kill()
        p.wait()


def _pretrain(out, *extra, timeout=300):
    return subprocess.run([sys.executable, "-m", "bertfast.pretrain", *SMALL, "--output-dir", str(out), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV)


def _finetune(out, *extra, model="no-such-model"):
    return subprocess.run([sys.executable, "-m", "bertfast.finetune", "--model", str(model), "--task", "builtin",
                           "--output-dir", str(out), "--no-progress", "--device", "cpu", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)


# ---------------------------------------------------------------------------------------------- the lock itself
def test_a_held_lock_refuses_a_second_owner_and_names_the_first(tmp_path, holder):
    p = holder(tmp_path / "run")
    with pytest.raises(OutputDirBusy) as e:
        RunLock(str(tmp_path / "run")).acquire()
    msg = str(e.value)
    assert f"pid {p.pid} on host {socket.gethostname()}, since " in msg and "the holder" in msg, msg
    assert msg.startswith("argument --output-dir:"), msg


def test_a_killed_owners_lock_is_taken_over_and_released_clean(tmp_path, holder):
    out = tmp_path / "run"
    p = holder(out)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (out / LOCK_NAME).exists()  # a kill -9 leaves the file (with its dead owner's description) behind
    lock = RunLock(str(out))
    lock.acquire()
    try:
        assert lock.took_over and f"pid {p.pid}" in lock.took_over, lock.took_over
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(OutputDirBusy):  # held now, also against this very process's second attempt
            RunLock(str(out)).acquire()
    finally:
        lock.release()
    assert os.listdir(out) == []  # the folder (the dead owner's) stays, without a lock file


def test_a_lock_that_created_its_folder_removes_it_when_nothing_was_written(tmp_path):
    with RunLock(str(tmp_path / "a" / "b")):
        assert (tmp_path / "a" / "b" / LOCK_NAME).exists()
    assert not (tmp_path / "a" / "b").exists()
    with RunLock(str(tmp_path / "c")):
        (tmp_path / "c" / "metrics.jsonl").write_text("{}\n")
    assert os.listdir(tmp_path / "c") == ["metrics.jsonl"]


@pytest.mark.parametrize("content", [b"", b"\x00\xffgarbage{", b"[1, 2]", b'{"pid": "x"}'])
def test_an_unheld_lock_file_of_any_content_is_taken_over(tmp_path, content):
    (tmp_path / LOCK_NAME).write_bytes(content)
    with RunLock(str(tmp_path)) as lock:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        assert lock.fd is not None
    assert not (tmp_path / LOCK_NAME).exists() and tmp_path.is_dir()  # an existing folder stays


def test_a_held_lock_with_an_empty_file_still_refuses(tmp_path, holder):
    holder(tmp_path)
    (tmp_path / LOCK_NAME).write_bytes(b"")  # the owner's description lost: the kernel's lock still holds
    with pytest.raises(OutputDirBusy, match="an owner that is just starting"):
        RunLock(str(tmp_path)).acquire()


def test_a_folder_where_the_lock_cannot_be_created_is_a_clear_error(tmp_path):
    from bertfast.train.lock import OutputDirLockError

    (tmp_path / LOCK_NAME).mkdir()  # the lock file's name taken by a folder
    with pytest.raises(OutputDirLockError, match="lock file, is a folder: remove it"):
        RunLock(str(tmp_path)).acquire()


# ---------------------------------------------------------------------------------------------- the CLIs
def test_two_pretrain_commands_into_one_folder_the_second_is_refused(tmp_path):
    """A real run holds the folder; a second one started meanwhile exits 2 naming it, and the first is unharmed."""
    pytest.importorskip("datasets")
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "bertfast.pretrain", *SMALL, "--output-dir", str(out),
                              "--max-steps", "400", "--log-every", "1", "--seed", "1"], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.time() + 240
        while not (out / "metrics.jsonl").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()
        second = _pretrain(out, "--max-steps", "2", "--seed", "2")
        assert second.returncode == 2, second.stderr
        assert_one_line_error(second.stderr)
        assert f"pid {first.pid} on host {socket.gethostname()}" in second.stderr, second.stderr
        assert "argument --output-dir" in second.stderr and "being written by another run" in second.stderr
        assert json.loads((out / "train_config.json").read_text())["seed"] == 1  # still the first run's
        resumed = _pretrain(out, "--resume")
        assert resumed.returncode == 2 and f"pid {first.pid}" in resumed.stderr, resumed.stderr  # --resume too
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGINT)  # it checkpoints and stops; the lock goes with it
        first.wait(timeout=120)
    assert not (out / LOCK_NAME).exists()


def test_finetune_into_a_folder_being_written_is_refused_before_any_work(tmp_path, holder):
    p = holder(tmp_path / "ft")
    r = _finetune(tmp_path / "ft")  # --model does not exist: the lock is checked before it is read
    assert r.returncode == 2 and f"pid {p.pid}" in r.stderr and "--output-dir" in r.stderr, r.stderr
    assert_one_line_error(r.stderr)
    q = holder(tmp_path / "hf")
    r = _finetune(tmp_path / "ft2", "--export-hf", str(tmp_path / "hf"))
    assert r.returncode == 2 and f"pid {q.pid}" in r.stderr and "--export-hf" in r.stderr, r.stderr
    assert not (tmp_path / "ft2").exists()  # the refused run's own folder lock went with it


def test_pretrain_export_folder_being_written_is_refused(tmp_path, holder):
    p = holder(tmp_path / "hf")
    r = _pretrain(tmp_path / "run", "--max-steps", "2", "--export-hf", str(tmp_path / "hf"))
    assert r.returncode == 2 and f"pid {p.pid}" in r.stderr and "argument --export-hf" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    pytest.importorskip("datasets")
    out = tmp_path_factory.mktemp("pre") / "run"
    r = _pretrain(out, "--max-steps", "2", "--builtin-docs", "60", "--batch-size", "4")
    assert r.returncode == 0, r.stderr
    return out


def test_finetune_into_a_pretraining_run_is_refused_and_leaves_it_untouched(pretrained_run, tmp_path):
    assert folder_kind(str(pretrained_run)) == "pretraining"
    before = _tree(pretrained_run)
    r = _finetune(pretrained_run, model=pretrained_run)
    assert r.returncode == 2, r.stderr
    assert_one_line_error(r.stderr)
    assert "holds a pretraining run" in r.stderr and "--overwrite-output-dir" in r.stderr, r.stderr
    assert _tree(pretrained_run) == before
    # told otherwise, it writes there (the user's choice)
    r = _finetune(pretrained_run, "--overwrite-output-dir", "--builtin-train", "16", "--builtin-validation", "8",
                  "--epochs", "1", "--batch-size", "8", model=pretrained_run)
    assert r.returncode == 0, r.stderr
    assert (pretrained_run / "results.json").exists() and not (pretrained_run / LOCK_NAME).exists()


def test_an_export_into_another_runs_folder_is_refused_and_leaves_it_untouched(pretrained_run, tmp_path):
    before = _tree(pretrained_run)
    r = _finetune(tmp_path / "ft", "--export-hf", str(pretrained_run))
    assert r.returncode == 2 and "argument --export-hf" in r.stderr and "holds a pretraining run" in r.stderr, r.stderr
    assert_one_line_error(r.stderr)
    assert _tree(pretrained_run) == before and not (tmp_path / "ft").exists()
    r = _pretrain(tmp_path / "run", "--max-steps", "2", "--export-hf", str(pretrained_run))
    assert r.returncode == 2 and "argument --export-hf" in r.stderr and "holds a pretraining run" in r.stderr, r.stderr
    assert _tree(pretrained_run) == before and not (tmp_path / "run").exists()


def test_pretrain_into_a_finetuning_run_is_refused_and_leaves_it_untouched(tmp_path):
    ft = tmp_path / "ft"
    ft.mkdir()
    (ft / "results.json").write_text('{"task": "builtin", "accuracy": 0.9}')
    (ft / "metrics.jsonl").write_text('{"epoch": 1, "step": 3, "train_loss": 0.5}\n')
    before = _tree(ft)
    r = _pretrain(ft, "--max-steps", "2")
    assert r.returncode == 2, r.stderr
    assert_one_line_error(r.stderr)
    assert "holds a fine-tuning run" in r.stderr and "--overwrite-output-dir" in r.stderr, r.stderr
    assert _tree(ft) == before
    (ft / "results.json").unlink()  # a fine-tuning run that never finished is recognised by its metrics
    assert folder_kind(str(ft)) == "fine-tuning"


# ---------------------------------------------------------------------------------------------- torchrun
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, out: str, logdir: str):
    from bertfast.train.trainer import TrainConfig, train

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfg = TrainConfig(preset="tiny", max_len=64, builtin_docs=60, batch_size=4, max_steps=2, output_dir=out,
                      progress=False, threads=1, device="cpu", checkpoint_every=0)
    try:
        train(cfg, log=lambda *_: None)
        result = {"error": None}
    except Exception as e:  # noqa: BLE001 - recorded for the test
        result = {"error": type(e).__name__, "message": str(e)}
    with open(os.path.join(logdir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


@pytest.mark.parametrize("held", [False, True])
def test_the_ranks_of_one_run_are_one_writer(tmp_path, holder, held):
    """2 gloo ranks into one folder: neither refuses the other; when another run holds the folder, rank 0 is refused
    naming it and rank 1 stops with that message instead of hanging."""
    pytest.importorskip("datasets")
    out = tmp_path / "out"
    owner = holder(out) if held else None
    ctx = torch.multiprocessing.spawn(_ddp_worker, args=(_free_port(), str(out), str(tmp_path)), nprocs=2,
                                      join=False)
    try:
        while not ctx.join(timeout=120):
            pass
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    got = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)}
    if not held:
        assert got == {0: {"error": None}, 1: {"error": None}}, got
        assert (out / "checkpoints").is_dir() and not (out / LOCK_NAME).exists()
        return
    assert got[0]["error"] == "OutputDirBusy" and f"pid {owner.pid}" in got[0]["message"], got
    assert got[1]["error"] == "PeerFailed" and f"pid {owner.pid}" in got[1]["message"], got
    assert os.listdir(out) == [LOCK_NAME]


# ---------------------------------------------------------------------------------------------- counts
def test_a_one_document_corpus_says_what_to_do_with_no_impossible_count(tmp_path):
    pytest.importorskip("datasets")
    corpus = tmp_path / "one.txt"
    corpus.write_text("The only document. It has a few sentences. Here is the third one.\n")
    r = _pretrain(tmp_path / "run", "--data", str(corpus), "--max-steps", "2")
    assert r.returncode == 2, r.stderr
    assert_one_line_error(r.stderr)
    err = r.stderr
    assert "only 1 document," in err and "--eval-fraction 0" in err and "--eval-data" in err, err
    assert "at least 10 documents" in err, err
    import re

    assert not re.search(r"(?<![\w.])-\d", err), err  # no negative count anywhere
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("n, fraction, words", [(9, 0.01, "holding out 8 of its 9 documents would leave only 1"),
                                                (100, 0.99, "at least 200 documents")])
def test_held_out_split_counts(n, fraction, words):
    datasets = pytest.importorskip("datasets")
    from bertfast.data import DataError
    from bertfast.data.loader import split_documents

    with pytest.raises(DataError, match=words):
        split_documents(datasets.Dataset.from_dict({"text": [str(i) for i in range(n)]}), "k", fraction, 0)
    # the number it names is enough
    need = int(words.split()[2]) if words.startswith("at least") else 10
    tr, _, ev, _ = split_documents(datasets.Dataset.from_dict({"text": [str(i) for i in range(need)]}), "k",
                                   fraction, 0)
    assert len(tr) >= 2 and len(ev) >= 8


# ---------------------------------------------------------------------------------------------- non-finite ends
def _tiny_cfg(out, **kw):
    from bertfast.train.trainer import TrainConfig

    base = dict(preset="tiny", max_len=64, builtin_docs=60, batch_size=4, max_steps=4, warmup_steps=1,
                log_every=2, checkpoint_every=0, output_dir=str(out), progress=False, threads=1, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_a_run_whose_last_steps_were_non_finite_fails_and_exports_nothing(tmp_path):
    pytest.importorskip("datasets")
    from bertfast.train.trainer import TrainingError, train

    nan_from = 2  # steps 3 and 4 (hook steps 2, 3): fewer in a row than --max-bad-steps 5, so the guard never fires

    def hook(step, loss):
        return loss * float("nan") if step >= nan_from else loss
    with pytest.raises(TrainingError) as e:
        train(_tiny_cfg(tmp_path / "run", export_hf=str(tmp_path / "hf")), loss_hook=hook, log=lambda *_: None)
    msg = str(e.value)
    assert "ended with non-finite losses" in msg and "steps 3-4" in msg and "step_00000004" in msg, msg
    assert "--export-hf" in msg and "not written" in msg, msg
    assert (tmp_path / "run" / "checkpoints" / "step_00000004").is_dir()  # kept for debugging
    assert not (tmp_path / "hf").exists()


def test_a_transient_non_finite_step_is_only_a_warning(tmp_path):
    pytest.importorskip("datasets")
    from bertfast.train.trainer import train

    logs = []
    out = train(_tiny_cfg(tmp_path / "run"), loss_hook=lambda s, x: x * float("nan") if s == 2 else x,
                log=logs.append)
    assert out["step"] == 4
    assert any("1 step(s) of the last logged window had non-finite losses" in m for m in logs), logs


def test_the_issues_lamb_run_exits_1_without_export(tmp_path):
    pytest.importorskip("datasets")
    r = _pretrain(tmp_path / "run", "--optimizer", "lamb", "--lr", "1e9", "--max-steps", "3", "--builtin-docs", "60",
                  "--batch-size", "4", "--export-hf", str(tmp_path / "hf"))
    assert r.returncode == 1, (r.stdout[-2000:], r.stderr)
    assert "ended with non-finite losses" in r.stderr and "done:" not in r.stdout, r.stderr
    assert not (tmp_path / "hf").exists()
