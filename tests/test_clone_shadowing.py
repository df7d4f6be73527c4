"""The repository root's __init__.py: Python started in the folder that holds a clone named bertfast finds the clone
first. `import bertfast` there must load the installed package (README's API snippet), warn when that is another
copy, and say what happened when nothing is installed (it used to fail with "cannot import name 'BertConfig' from
'bertfast' (unknown location)")."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNIPPET = ("from bertfast import BertConfig, BertForPreTraining, ops\n"
           "import bertfast, bertfast.kernels\n"
           "print(bertfast.__file__); print(bertfast.kernels.__name__); print(BertConfig.preset('tiny').hidden_size)")


def _run(cwd, *args, code=SNIPPET):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                           timeout=300)


def _installed_here() -> bool:
    """bertfast is installed from this clone (the editable install the README describes)."""
    out = _run("/", code="import bertfast, os; print(os.path.realpath(bertfast.__file__))")
    return out.returncode == 0 and out.stdout.strip().startswith(os.path.realpath(ROOT) + os.sep)


def test_snippet_from_the_folder_holding_the_clone(tmp_path):
    if not _installed_here():
        pytest.skip("bertfast is not installed from this clone (pip install -e .)")
    os.symlink(ROOT, tmp_path / "bertfast")  # tmp_path now holds a clone named bertfast
    out = _run(tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert os.path.realpath(lines[0]) == os.path.realpath(os.path.join(ROOT, "bertfast", "__init__.py"))
    assert lines[1:] == ["bertfast.kernels", "128"]
    assert "Warning" not in out.stderr  # the installed package is this clone's: nothing to warn about


def test_not_installed_says_what_happened(tmp_path):
    os.symlink(ROOT, tmp_path / "bertfast")
    out = _run(tmp_path, "-S", code="import bertfast")  # -S: no site-packages, so no installed bertfast
    assert out.returncode != 0
    assert "bertfast's source tree" in out.stderr and "pip install -e" in out.stderr
    assert "unknown location" not in out.stderr


def test_another_copy_warns(tmp_path):
    if not _installed_here():
        pytest.skip("bertfast is not installed from this clone (pip install -e .)")
    (tmp_path / "bertfast").mkdir()  # a second clone (only its root file matters here)
    shutil.copy(os.path.join(ROOT, "__init__.py"), tmp_path / "bertfast" / "__init__.py")
    out = _run(tmp_path)
    assert out.returncode == 0, out.stderr
    assert "loaded the installed bertfast" in out.stderr and str(tmp_path / "bertfast") in out.stderr
