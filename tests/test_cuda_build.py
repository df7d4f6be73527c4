"""Compile csrc/*.cu for sm_80 and sm_90 with `nvcc -Xptxas -v` (no GPU needed) and fail on register spills in
the kernels. The flags mirror the extension build (setup.py + torch.utils.cpp_extension). Device code only
(--fatbin: the host side is what the install compiles), both targets at once (--threads 2): 48 s instead of 90 s
on the 2-core machine, with the same ptxas report."""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.gpu_compile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = (80, 90)


def _nvcc():
    """(nvcc, toolkit root): the toolkit setup.py built _C with (bertfast._build_info); for a CPU-only build
    (BERTFAST_CUDA=0) the toolkit setup.py would find (CUDA_HOME, CUDA_PATH, /usr/local/cuda: a folder holding
    bin/nvcc and include/cuda_runtime.h), so the CUDA sources are still checked wherever they could be built.
    (None, None) without a toolkit or with a CPU-only torch."""
    import torch

    from bertfast import _build_info

    home = _build_info.CUDA_HOME
    if not home and torch.version.cuda:
        for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
            if cand and os.path.isfile(os.path.join(cand, "bin", "nvcc")) and os.path.isfile(
                    os.path.join(cand, "include", "cuda_runtime.h")):
                home = os.path.realpath(cand)
                break
    return (os.path.join(home, "bin", "nvcc"), home) if home else (None, None)


def _build_info_std() -> str:
    from bertfast import _build_info

    return _build_info.CXX_STD


def _nvcc_command(nvcc, cuda_home, src, obj):
    import torch
    from torch.utils import cpp_extension

    try:
        includes = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # older torch: include_paths(cuda=True)
        includes = cpp_extension.include_paths(cuda=True)
    includes = [p for p in includes if os.path.isdir(p)] + [os.path.join(cuda_home, "include")]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [nvcc, "--fatbin", "--threads", "2", src, "-o", obj, _build_info_std(), "-O3", "--use_fast_math",
           "-lineinfo", "-DBERTFAST_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
           f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-Xcompiler", "-fPIC", "-Xptxas", "-v"]
    cmd += list(cpp_extension.COMMON_NVCC_FLAGS)
    for arch in ARCHS:
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    for inc in includes:
        cmd += ["-isystem", inc]
    return cmd


def parse_ptxas(report: str) -> list[dict]:
    """[{arch, kernel (mangled), registers, spill_stores, spill_loads}] from ptxas -v output."""
    rows, current = [], None
    for line in report.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if m:
            current = {"kernel": m.group(1), "arch": m.group(2), "registers": None, "spill_stores": 0,
                       "spill_loads": 0}
            rows.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["spill_stores"], current["spill_loads"] = int(m.group(1)), int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
    return rows


def _demangle(names):
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt:
        return dict(zip(names, names))
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else dict(zip(names, names))


HOT = ("ce_forward_kernel", "scale_kernel", "mlm_gather_kernel", "mlm_gather_backward_kernel")


@pytest.fixture(scope="module")
def ptxas_report(tmp_path_factory):
    nvcc, home = _nvcc()
    if nvcc is None:
        pytest.skip("no CUDA toolkit (or a CPU-only torch): nothing to compile csrc/*.cu with")
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu")))
    if not sources:
        pytest.skip("no csrc/*.cu")
    rows = []
    for src in sources:
        obj = str(tmp_path_factory.mktemp("nvcc") / (os.path.basename(src) + ".fatbin"))
        cmd = _nvcc_command(nvcc, home, src, obj)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"nvcc failed on {src}:\n{' '.join(cmd)}\n{proc.stderr[-6000:]}"
        rows += parse_ptxas(proc.stdout + proc.stderr)
    names = _demangle([r["kernel"] for r in rows])
    for r in rows:
        r["name"] = names[r["kernel"]]
    return rows


def test_every_arch_compiled(ptxas_report):
    archs = {r["arch"] for r in ptxas_report}
    assert archs == {f"sm_{a}" for a in ARCHS}, archs
    for hot in HOT:
        assert any(hot in r["name"] for r in ptxas_report), f"{hot} not found in the ptxas report"


def test_no_register_spills(ptxas_report):
    lines = []
    for r in ptxas_report:
        lines.append(f"{r['arch']} regs={r['registers']} spill_st={r['spill_stores']} spill_ld={r['spill_loads']} "
                     f"{r['name'][:160]}")
    print("\n".join(lines))
    spills = [r for r in ptxas_report if any(h in r["name"] for h in HOT) and r["spill_stores"] > 0]
    assert not spills, "register spills in hot kernels:\n" + "\n".join(
        f"{r['arch']} {r['name']}: {r['spill_stores']} bytes spill stores, {r['registers']} registers" for r in spills)


def test_cpu_and_cuda_kernels_share_one_set_of_argument_checks():
    """csrc/checks.h holds the argument checks; ops.cpp and ops_cuda.cu both include it and call every check for
    the ops they implement, so the two sides cannot drift (the CUDA side had lost its floating-point checks)."""
    checks = open(os.path.join(ROOT, "csrc", "checks.h")).read()
    names = re.findall(r"inline void (check_\w+)\(", checks)
    assert set(names) >= {"check_gather_args", "check_gather_backward_args", "check_ce_args", "check_ce_backward_args"}
    for src in ("ops.cpp", "ops_cuda.cu"):
        text = open(os.path.join(ROOT, "csrc", src)).read()
        assert '#include "checks.h"' in text, src
        for name in names:
            assert re.search(rf"\b{name}\(", text), f"{src} does not call {name}"
        assert "TORCH_CHECK(at::isFloatingType" not in text, f"{src} repeats a check that lives in checks.h"
