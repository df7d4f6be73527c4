"""`python -m bertfast.pretrain`: flags, bad input (exit 2 naming the flag, before any work), a SIGKILL in the
middle of a run followed by --resume, whose logged metrics equal an uninterrupted run's bit for bit, and a
SIGINT / SIGTERM that checkpoints the step in flight before the run stops."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bertfast.train import checkpoint as ckpt
from bertfast.pretrain import config_from_args, main
from bertfast.train.trainer import TrainConfig

from _utils import assert_one_line_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--preset", "tiny", "--max-len", "64", "--builtin-docs", "120", "--batch-size", "8", "--threads", "1",
         "--no-progress", "--warmup-steps", "3", "--lr", "2e-3", "--device", "cpu"]


def test_cli_defaults_and_flags():
    assert config_from_args([]) == TrainConfig()
    cfg = config_from_args(["--preset", "tiny", "--data", "builtin", "corpus.txt:0.5", "--tokenizer", "tok",
                            "--epochs", "3", "--max-steps", "7", "--batch-size", "4", "--grad-accum", "2",
                            "--lr", "3e-4", "--weight-decay", "0.1", "--warmup-steps", "5", "--max-len", "96",
                            "--precision", "bf16", "--impl", "torch", "--output-dir", "o", "--checkpoint-every", "9",
                            "--resume", "--seed", "3", "--export-hf", "hf", "--log-every", "2",
                            "--keep-checkpoints", "4", "--vocab-size", "999", "--num-workers", "1",
                            "--clip-grad", "0.5", "--max-bad-steps", "2", "--device", "cpu", "--dropout", "0"])
    assert cfg == TrainConfig(preset="tiny", data=["builtin", "corpus.txt:0.5"], tokenizer="tok", epochs=3,
                              max_steps=7, batch_size=4, grad_accum=2, lr=3e-4, weight_decay=0.1, warmup_steps=5,
                              max_len=96, precision="bf16", impl="torch", output_dir="o", checkpoint_every=9,
                              resume=True, seed=3, export_hf="hf", log_every=2, keep_checkpoints=4, vocab_size=999,
                              num_workers=1, clip_grad=0.5, max_bad_steps=2, device="cpu", dropout=0.0)


def test_lr_and_warmup_defaults_follow_the_preset_unless_given():
    # the tiny preset (the default run) learns faster at 2e-3 over 100 steps; the others keep 1e-3 over 30
    assert (TrainConfig().lr, TrainConfig().warmup_steps) == (2e-3, 100)
    mini = config_from_args(["--preset", "mini"])
    assert (mini.lr, mini.warmup_steps) == (1e-3, 30)
    given = config_from_args(["--lr", "5e-4", "--warmup-steps", "7"])
    assert (given.lr, given.warmup_steps) == (5e-4, 7)
    assert TrainConfig(preset="nonsense").lr == 1e-3  # resolved before the preset is checked: no KeyError here
    with pytest.raises(ValueError, match="--preset"):
        from bertfast.train.config import check_settings

        check_settings(TrainConfig(preset="nonsense", output_dir="/tmp/never-written"))


def _exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own refusals (an invalid choice, a value that is not a number)
        return e.code


def _bad(argv, capsys, tmp_path):
    """Run main(argv); it must exit 2 before writing anything, with one line and no usage dump."""
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    return err


@pytest.mark.parametrize("argv, flag, hint", [
    (["--preset", "huge"], "--preset", "choose one of tiny"),
    (["--batch-size", "0"], "--batch-size", "positive"),
    (["--lr", "-1e-4"], "--lr", "positive learning rate"),
    (["--lr", "-0.001"], "--lr", "positive learning rate"),
    (["--grad-accum", "0"], "--grad-accum", ">= 1"),
    (["--max-len", "4"], "--max-len", "[8, 8192]"),
    (["--resume"], "--resume", "nothing to resume"),
    (["--precision", "fp8"], "--precision", "invalid choice"),
    (["--impl", "cuda"], "--impl", "choose one of"),
    (["--device", "tpu"], "--device", "use auto, cpu, cuda"),
])
def test_cli_bad_input(argv, flag, hint, capsys, tmp_path):
    err = _bad(argv + ["--output-dir", str(tmp_path / "out")], capsys, tmp_path)
    assert f"argument {flag}" in err and hint in err, err


def test_cli_triton_on_cpu_without_the_interpreter(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    err = _bad(["--impl", "triton", "--device", "cpu", "--output-dir", str(tmp_path / "out")], capsys, tmp_path)
    assert "argument --impl" in err and "TRITON_INTERPRET=1" in err and "--impl auto" in err, err


def test_cli_unwritable_output_dir(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    err = _bad(["--output-dir", str(blocker / "run")], capsys, tmp_path)
    assert "argument --output-dir" in err and "not writable" in err, err
    err = _bad(["--output-dir", str(blocker)], capsys, tmp_path)
    assert "argument --output-dir" in err and "not a folder" in err, err


def test_cli_bad_input_exit_code_in_a_subprocess(tmp_path):
    p = subprocess.run([sys.executable, "-m", "bertfast.pretrain", "--batch-size", "0", "--output-dir",
                        str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("python -m bertfast.pretrain: error: argument --batch-size") and "usage:" not in \
        p.stderr, p.stderr
    assert not (tmp_path / "o").exists()


def _cli(out, *extra):
    return [sys.executable, "-m", "bertfast.pretrain", *SMALL, "--output-dir", str(out), *extra]


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu", "tflops_per_s")} for r in recs]


TOTAL = 40  # steps of every run here: the runs that are stopped mid-way must still be running when stopped
# evaluation every 4 steps in every run, whatever its --checkpoint-every (by default it follows the checkpoints)
STEPS = ["--max-steps", str(TOTAL), "--log-every", "2", "--eval-every", "4"]
ENV = dict(os.environ, PYTHONUNBUFFERED="1")  # progress lines reach the files as they are printed


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The uninterrupted reference run (TOTAL steps, checkpoints every 4) the interrupted runs are compared with."""
    pytest.importorskip("datasets", reason="the data pipeline needs `datasets` (see scripts/gpu_wheels.sh)")
    full = tmp_path_factory.mktemp("full")
    ref = subprocess.run(_cli(full, *STEPS, "--checkpoint-every", "4"), cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=ENV)
    assert ref.returncode == 0, ref.stderr[-3000:]
    return full


def _start_and_wait(args, out, ready, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, new_group=False):
    """Start the CLI (in a process group of its own if new_group) and poll its output folder until
    ready(checkpoint steps, logged steps) holds; returns the running process (the test fails if it ended first)."""
    proc = subprocess.Popen(args, cwd=ROOT, stdout=stdout, stderr=stderr, env=ENV,
                            start_new_session=new_group)
    saved, logged = [], []
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            names = os.listdir(out / "checkpoints") if (out / "checkpoints").is_dir() else []
            saved = [int(n[5:]) for n in names if n.startswith("step_")]
            try:
                with open(out / "metrics.jsonl") as f:
                    logged = [json.loads(line)["step"] for line in f if line.endswith("\n")]
            except (OSError, ValueError):
                logged = []
            if ready(saved, logged):
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before it could be stopped mid-way ({saved}, {logged})"
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def _assert_same_as_full(out, full):
    assert _metrics(out) == _metrics(full)
    from safetensors.torch import load_file

    last = ckpt.checkpoint_name(TOTAL)
    a = load_file(str(full / "checkpoints" / last / "model.safetensors"))
    b = load_file(str(out / "checkpoints" / last / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def _resume(out, full, *extra):
    p = subprocess.run(_cli(out, *STEPS, "--tokenizer", str(full / "tokenizer"), *extra, "--resume"), cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming from" in p.stdout
    return p


def test_cli_sigkill_then_resume_equals_uninterrupted(full_run, tmp_path):
    """Start the CLI, wait until a checkpoint exists and later steps are logged, kill -9, --resume: metrics.jsonl
    (losses, accuracies, lr, grad norm) equals an uninterrupted run's exactly, and so do the final weights."""
    killed = tmp_path / "killed"
    args = _cli(killed, *STEPS, "--checkpoint-every", "4", "--tokenizer", str(full_run / "tokenizer"))
    proc = _start_and_wait(args, killed, lambda saved, logged: saved and logged and logged[-1] > max(saved))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    done_before = [json.loads(line)["step"] for line in open(killed / "metrics.jsonl") if line.strip()]
    assert done_before[-1] < TOTAL
    _resume(killed, full_run, "--checkpoint-every", "4")
    _assert_same_as_full(killed, full_run)


@pytest.mark.parametrize("sig, workers", [(signal.SIGINT, 0), (signal.SIGTERM, 0), (signal.SIGINT, 2)],
                         ids=["SIGINT", "SIGTERM", "SIGINT-to-the-group-with-loader-workers"])
def test_cli_signal_checkpoints_the_step_then_resume_equals_uninterrupted(full_run, tmp_path, sig, workers):
    """Ctrl-C or a scheduler's SIGTERM mid-run: the step in flight finishes, its checkpoint is written (with
    --checkpoint-every 1000 no other one exists before the end), the exit code is 128 + signal, and --resume from
    that checkpoint gives the uninterrupted run's metrics and final weights exactly. With loader workers the
    signal goes to the whole process group, as a terminal's Ctrl-C does: the workers must not die of it. After the
    plain Ctrl-C the resume is what the message says, `--resume` and the folder alone: every other setting (the
    corpus size, vocabulary, batch size, steps, cadences of this test's run) is kept from the checkpoint."""
    out = tmp_path / "stopped"
    args = _cli(out, *STEPS, "--checkpoint-every", "1000", "--tokenizer", str(full_run / "tokenizer"),
                "--num-workers", str(workers))
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = _start_and_wait(args, out, lambda saved, logged: len(logged) >= 2, stderr=err, new_group=workers > 0)
        if workers:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=60)
        finally:
            proc.kill()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 128 + sig, stderr[-3000:]
    steps = [s for s, _ in ckpt.list_checkpoints(out)]
    assert len(steps) == 1 and 4 <= steps[0] < TOTAL, steps
    ckpt.verify_checkpoint(str(out / "checkpoints" / ckpt.checkpoint_name(steps[0])))
    assert f"interrupted by {signal.Signals(sig).name} at step {steps[0]}" in stderr, stderr[-3000:]
    assert "--resume" in stderr
    logged = [json.loads(line)["step"] for line in open(out / "metrics.jsonl") if line.strip()]
    assert logged[-1] <= steps[0]
    if sig == signal.SIGINT and not workers:
        p = subprocess.run([sys.executable, "-m", "bertfast.pretrain", "--output-dir", str(out), "--resume"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
        assert p.returncode == 0 and "resuming from" in p.stdout, p.stderr[-3000:]
        assert "kept from checkpoint" in p.stdout and f"--max-steps {TOTAL}" in p.stdout
        assert "changed since" not in p.stdout
    else:
        _resume(out, full_run, "--checkpoint-every", "1000")
    _assert_same_as_full(out, full_run)


def test_cli_flags_help_and_docs_agree_with_trainconfig():
    """One source: every TrainConfig field is a flag with help text, --help lists it, and docs/cli.md holds the
    table generated from the fields."""
    import dataclasses

    from bertfast.pretrain import build_parser, flag_table
    from bertfast.train.config import flag_of

    parser = build_parser()
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    fields_by_name = {f.name: f for f in dataclasses.fields(TrainConfig)}
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "flag_table")}
    assert set(actions) == fields
    text = parser.format_help()
    for name, a in actions.items():
        assert a.help and len(a.help) > 10, name
        assert fields_by_name[name].metadata["help"].replace("%", "%%") in a.help, name  # the field's own text
        assert "(default: True)" not in a.help and "(default: False)" not in a.help, (name, a.help)
        assert flag_of(name) in a.option_strings and flag_of(name) in text, name
    assert "--no-progress" in text and "--seed" in text
    with open(os.path.join(ROOT, "docs", "cli.md")) as f:
        docs = f.read()
    assert flag_table() in docs, "docs/cli.md's flag table is stale: paste `python -m bertfast.pretrain --flag-table`"
    table_flags = [line.split("`")[1].split()[0] for line in flag_table().splitlines()[2:]]
    assert table_flags == [flag_of(f.name) for f in dataclasses.fields(TrainConfig)]


@pytest.mark.parametrize("argv, flag, hint", [
    (["--seed", "-1"], "--seed", "[0, 4294967295]"),
    (["--seed", str(10 ** 23)], "--seed", "[0, 4294967295]"),
    (["--seed", "1e23"], "--seed", "invalid int value"),
])
def test_cli_seed_range(argv, flag, hint, capsys, tmp_path):
    err = _bad(argv + ["--output-dir", str(tmp_path / "out")], capsys, tmp_path)
    assert f"argument {flag}" in err and hint in err, err
