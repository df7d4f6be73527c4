"""setup.py's build decisions (no compiling here): when the CUDA kernels are built, and the key under which a
linked _C is reused by the next install (build/_C-cache)."""
import importlib.util
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def setup_py(monkeypatch):
    spec = importlib.util.spec_from_file_location("bertfast_setup_py", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # not __main__: defines the functions, builds nothing
    for var in ("BERTFAST_CUDA", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(var, raising=False)
    return mod


@pytest.mark.parametrize("env, gpu, toolkit, expect", [
    ({}, False, "/cuda", None),  # the default without a GPU: CPU-only
    ({}, True, "/cuda", "/cuda"),  # a GPU is visible
    ({"TORCH_CUDA_ARCH_LIST": "9.0"}, False, "/cuda", "/cuda"),  # asked for GPU code
    ({"BERTFAST_CUDA": "1"}, False, "/cuda", "/cuda"),  # CI
    ({"BERTFAST_CUDA": "0"}, True, "/cuda", None),
    ({}, True, None, None),  # no toolkit: CPU-only
])
def test_when_cuda_is_built(setup_py, monkeypatch, env, gpu, toolkit, expect):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(setup_py, "gpu_visible", lambda: gpu)
    monkeypatch.setattr(setup_py, "find_cuda_home", lambda: toolkit)
    home, why = setup_py.choose_cuda_home()
    assert home == expect, why
    assert why


def test_cuda_asked_without_toolkit_or_bad_value(setup_py, monkeypatch):
    monkeypatch.setattr(setup_py, "find_cuda_home", lambda: None)
    monkeypatch.setenv("BERTFAST_CUDA", "1")
    with pytest.raises(RuntimeError, match="BERTFAST_CUDA=1 but no CUDA toolkit"):
        setup_py.choose_cuda_home()
    monkeypatch.setenv("BERTFAST_CUDA", "maybe")
    with pytest.raises(RuntimeError, match="BERTFAST_CUDA='maybe'"):
        setup_py.choose_cuda_home()


def test_build_key_follows_sources_flags_and_torch(setup_py, monkeypatch, tmp_path):
    shutil.copytree(os.path.join(ROOT, "csrc"), tmp_path / "csrc")
    monkeypatch.setattr(setup_py, "ROOT", str(tmp_path))
    ext = SimpleNamespace(sources=["csrc/ops.cpp", "csrc/module.cpp"], extra_compile_args={"cxx": ["-O3"]},
                          extra_link_args=[], define_macros=[])
    key = setup_py.build_key(ext, torch)
    assert key == setup_py.build_key(ext, torch)  # an unchanged csrc/: the cached _C is reused
    os.utime(tmp_path / "csrc" / "ops.cpp")  # touched, same content: still reused
    assert setup_py.build_key(ext, torch) == key

    header = next(p for p in os.listdir(tmp_path / "csrc") if p.endswith(".h"))
    with open(tmp_path / "csrc" / header, "a") as f:
        f.write("\n// changed\n")  # a header change must rebuild
    changed = setup_py.build_key(ext, torch)
    assert changed != key

    ext.extra_compile_args = {"cxx": ["-O2"]}
    assert setup_py.build_key(ext, torch) != changed
    ext.extra_compile_args = {"cxx": ["-O3"]}
    other_torch = SimpleNamespace(__version__="0.0.0", version=torch.version)
    assert setup_py.build_key(ext, other_torch) != changed


def test_prune_keeps_newest(setup_py, tmp_path):
    for i in range(6):
        d = tmp_path / f"k{i}"
        d.mkdir()
        os.utime(d, (1000 + i, 1000 + i))
    setup_py.prune_cache(str(tmp_path), keep=4)
    assert sorted(os.listdir(tmp_path)) == ["k2", "k3", "k4", "k5"]
