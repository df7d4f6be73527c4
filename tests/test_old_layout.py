"""Runs written before bertfast/ was grouped by role (model/, train/, downstream/) still load and resume.

A checkpoint is model.safetensors + config.json + state.pt (+ manifest, tokenizer): only state.pt is a pickle, and
a pickle names the classes it holds by module path, so a module that moved would break every old checkpoint that
pickled one of its objects. The first test keeps state.pt free of bertfast classes; the second writes a run with the
code of the last commit before the move (taken from this clone's git history) and resumes it with today's code.
"""
import os
import pickletools
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD_LAYOUT = "23f2ca8"  # the last commit with bertfast/trainer.py, checkpoint.py, model.py, ... side by side
RUN = ["--max-steps", "3", "--builtin-docs", "40", "--batch-size", "4", "--max-len", "32", "--checkpoint-every", "3",
       "--vocab-size", "200", "--no-progress"]


def _pickled_globals(state_pt: str) -> set[str]:
    """'module name' of every global a torch.save file's pickle refers to."""
    with zipfile.ZipFile(state_pt) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    ops, found = list(pickletools.genops(data)), set()
    for i, (op, arg, _) in enumerate(ops):
        if op.name == "GLOBAL":
            found.add(arg)
        elif op.name == "STACK_GLOBAL":
            found.add(f"{ops[i - 2][1]} {ops[i - 1][1]}")
    return found


def _pretrain(cwd, out, *extra, pythonpath=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-m", "bertfast.pretrain", *RUN, "--output-dir", str(out), *extra],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _latest(out):
    ckpts = sorted(d for d in os.listdir(os.path.join(out, "checkpoints")) if d.startswith("step_"))
    return os.path.join(out, "checkpoints", ckpts[-1])


@pytest.mark.slow
def test_state_pickles_no_bertfast_class(tmp_path):
    res = _pretrain(ROOT, tmp_path / "run")
    assert res.returncode == 0, res.stderr
    names = _pickled_globals(os.path.join(_latest(tmp_path / "run"), "state.pt"))
    assert names and not [n for n in names if n.split()[0].split(".")[0] == "bertfast"], names


def _old_tree(dest) -> bool:
    """The package as of OLD_LAYOUT, with this clone's built extension, in dest/; False without the history."""
    if shutil.which("git") is None:
        return False
    archive = subprocess.run(["git", "-C", ROOT, "archive", "--format=tar", OLD_LAYOUT, "bertfast", "kernels"],
                             capture_output=True)
    if archive.returncode != 0:
        return False
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    built = [f for f in os.listdir(os.path.join(ROOT, "bertfast")) if f.startswith("_C.") or f == "_build_info.py"]
    for f in built:
        shutil.copy(os.path.join(ROOT, "bertfast", f), os.path.join(dest, "bertfast", f))
    return os.path.isfile(os.path.join(dest, "bertfast", "trainer.py"))


@pytest.mark.slow
def test_a_run_of_the_old_layout_resumes_and_loads(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    if not _old_tree(old):
        pytest.skip(f"this clone has no git history with {OLD_LAYOUT} (a shallow clone?)")
    run = tmp_path / "run"
    res = _pretrain(old, run, pythonpath=str(old))
    assert res.returncode == 0, res.stderr
    # the old code wrote it: its checkpoint pickles through the old module paths, if any
    assert os.path.isfile(os.path.join(_latest(run), "state.pt"))

    from bertfast.train.pretrained import load_pretrained

    model, tok = load_pretrained(str(run))
    assert model.config.hidden_size == 128 and tok.vocab_size <= 200
    res = _pretrain(ROOT, run, "--resume", "--max-steps", "5")
    assert res.returncode == 0, res.stderr
    assert os.path.basename(_latest(run)) == "step_00000005"
