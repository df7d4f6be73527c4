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


# ---- the repository root must not shadow installed distributions
# `python -m pytest`, `python -m bertfast.pretrain` and a notebook started in the clone put the repository root first
# on sys.path. A folder there with an __init__.py is a regular package and wins over any installed distribution of
# the same name: transformers 5.25 imports Hugging Face's `kernels`, and the clone's kernels/ (bertfast.kernels) used
# to answer instead ("cannot import name 'CUDAProperties' from 'kernels'"). A folder without __init__.py is only a
# namespace portion, which an installed package of that name outranks.

def _root_folders():
    """Every folder at the root whose name Python could import (bertfast/ itself is the package)."""
    return sorted(d for d in os.listdir(ROOT) if os.path.isdir(os.path.join(ROOT, d)) and d.isidentifier()
                  and d != "bertfast")


def test_no_root_folder_is_a_package():
    assert "kernels" in _root_folders()  # the layout keeps its top-level kernels/ (installed as bertfast.kernels)
    packages = [d for d in _root_folders() if os.path.exists(os.path.join(ROOT, d, "__init__.py"))]
    assert packages == [], f"{packages} would shadow installed distributions of that name from the repository root"


def test_installed_distributions_win_from_the_root(tmp_path):
    """A stand-in distribution for every root folder's name (`kernels` shaped like Hugging Face's), put on the path
    the way site-packages is (after the current folder): imported from the root, each must be the stand-in."""
    names = _root_folders()
    site_dir = tmp_path / "site-packages"
    for name in names:
        (site_dir / name).mkdir(parents=True)
        (site_dir / name / "__init__.py").write_text("STANDIN = True\nclass CUDAProperties:\n    pass\n")
        dist = site_dir / f"{name}-1.0.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    code = ("import importlib, site, sys\n"
            f"site.addsitedir({str(site_dir)!r})\n"
            "assert sys.path[0] in ('', '.') or sys.path[0] == __import__('os').getcwd(), sys.path[:2]\n"
            "from kernels import CUDAProperties\n"
            f"for name in {names!r}:\n"
            "    m = importlib.import_module(name)\n"
            "    print(name, getattr(m, 'STANDIN', False), m.__file__)\n")
    out = _run(ROOT, "-S", code=code)  # -S: the stand-ins are the only installed packages
    assert out.returncode == 0, out.stderr
    found = {line.split()[0]: line.split()[1] for line in out.stdout.splitlines()}
    assert found == {name: "True" for name in names}, out.stdout


def test_bertfast_kernels_is_the_clones_kernels_folder():
    """bertfast.kernels still loads this clone's top-level kernels/ (from the root and from elsewhere)."""
    code = "import bertfast.kernels.attention as a, os; print(os.path.realpath(a.__file__))"
    want = os.path.realpath(os.path.join(ROOT, "kernels", "attention.py"))
    assert _run(ROOT, code=code).stdout.strip() == want
    if _installed_here():
        assert _run("/", code=code).stdout.strip() == want


def test_transformers_builds_bert_from_the_root():
    """The user-visible failure: with Hugging Face's `kernels` installed (transformers >= 5.25 needs it), transformers
    builds and runs BERT from the repository root."""
    pytest.importorskip("transformers")
    code = ("import os, torch, transformers\n"
            "cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,"
            " intermediate_size=32)\n"
            "out = transformers.BertForPreTraining(cfg)(torch.tensor([[1, 2, 3]]))\n"
            "print(tuple(out.prediction_logits.shape))\n"
            "try:\n    import kernels\nexcept ImportError:\n    print('no kernels distribution')\n"
            "else:\n    print(os.path.realpath(kernels.__file__))\n")
    out = _run(ROOT, code=code)
    assert out.returncode == 0, out.stderr
    shape, where = out.stdout.splitlines()
    assert shape == "(1, 3, 50)"
    # not the clone's own folder (an installed one may still live under the root: CI's venv is <clone>/.ci-venv)
    assert os.path.dirname(where) != os.path.realpath(os.path.join(ROOT, "kernels")), where
