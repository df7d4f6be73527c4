"""GPU-ready without a GPU: every Triton kernel configuration compiles for sm_80 and sm_90 and fits the hardware.

For each case of each kernel module's gpu_compile_cases(capability) (the configurations its launchers pick at
BERT shapes), compiled here for the real targets with triton.compile(..., target=GPUTarget("cuda", cap, 32)):
  - it compiles;
  - its shared memory (dynamic + static) fits one block on the target (sm_80: 163 KiB, sm_90: 227 KiB);
  - `ptxas -v` reports no register spills;
  - a kernel with tl.dot (uses_mma) runs its matmuls on tensor cores: HGMMA in the sm_90 SASS, HMMA on sm_80,
    for fp32 too (tf32, Triton's default input_precision), unless the case says input_precision="ieee";
  - a kernel without tl.dot holds no MMA instruction (so the uses_mma flag is honest).
A small matmul and a row reduction defined here prove the checks themselves, including that each can fail.
See docs/gpu_compile.md.

The suite compiles BERT's configurations (head_dim 64: tiny to large), every dtype and variant, for sm_90, and
those with tensor cores for sm_80 too: 82 of the 176 distinct compiles, to keep the CPU suite short. The whole
matrix (head_dim 32 and 128, sm_80's elementwise kernels): BERTFAST_GPU_COMPILE=all, which scripts/gpu_run.sh
sets; `python -m bertfast.kernels.report` always compiles all of it.
"""
from __future__ import annotations

import json
import os
import re
import traceback

import pytest
import triton
import triton.language as tl

from bertfast.kernels import _compile as gc

pytestmark = pytest.mark.gpu_compile

CAPABILITIES = (80, 90)


# ------------------------------------------------------------------ self-test kernels (prove the infrastructure)

@triton.jit
def _selftest_matmul(a_ptr, b_ptr, c_ptr,  # a [M, K], b [K, N], c [M, N], row-major
                     M, N, K,
                     stride_am, stride_bk, stride_cm,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     INPUT_PRECISION: tl.constexpr):
    # Triton tutorial 03's loop shape: pointers advanced by BLOCK_K, so that the loads pipeline (num_stages).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :]
    b_ptrs = b_ptr + rk[:, None].to(tl.int64) * stride_bk + rn[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = tl.load(a_ptrs, mask=rk[None, :] < K - k * BLOCK_K, other=0.0)
        b = tl.load(b_ptrs, mask=rk[:, None] < K - k * BLOCK_K, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(c_ptr + cm[:, None].to(tl.int64) * stride_cm + cn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=(cm[:, None] < M) & (cn[None, :] < N))


@triton.jit
def _selftest_rowsum(x_ptr, y_ptr,  # x [rows, N], y [rows] float32
                     N, stride_x,
                     BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + row, tl.sum(x, axis=0))


def _mm_case(name, dt, bm, bn, bk, warps, stages, precision="tf32", uses_mma=True, m=4096, n=4096, k=1024):
    sig = {"a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "c_ptr": f"*{dt}", "M": "i32", "N": "i32", "K": "i32",
           "stride_am": "i32", "stride_bk": "i32", "stride_cm": "i32", "BLOCK_M": "constexpr",
           "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "INPUT_PRECISION": "constexpr"}
    size = {"fp16": 2, "bf16": 2, "fp32": 4}[dt]
    case = {"name": name, "fn": _selftest_matmul, "signature": sig,
            "constexprs": {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "INPUT_PRECISION": precision},
            "num_warps": warps, "num_stages": stages, "uses_mma": uses_mma,
            "bytes": (m * k + k * n + m * n) * size, "flops": 2 * m * n * k}
    if precision == "ieee":
        case["input_precision"] = "ieee"
    return case


def selftest_cases():
    """(case, capability -> the problem words expected, or None for a clean case)."""
    rowsum = {"name": "selftest_rowsum_fp16", "fn": _selftest_rowsum,
              "signature": {"x_ptr": "*fp16", "y_ptr": "*fp32", "N": "i32", "stride_x": "i32",
                            "BLOCK_N": "constexpr"},
              "constexprs": {"BLOCK_N": 1024}, "num_warps": 4, "num_stages": 1, "uses_mma": False,
              "bytes": 4096 * 768 * 2 + 4096 * 4, "flops": 4096 * 768}
    clean = {80: None, 90: None}
    return [
        (_mm_case("selftest_mm_fp16", "fp16", 64, 64, 32, 4, 3), clean),
        (_mm_case("selftest_mm_bf16", "bf16", 64, 64, 32, 4, 3), clean),
        (_mm_case("selftest_mm_fp32_tf32", "fp32", 64, 64, 32, 4, 3), clean),
        (_mm_case("selftest_mm_fp32_ieee", "fp32", 64, 64, 32, 4, 2, precision="ieee"), clean),
        (rowsum, clean),
        # same compile as selftest_mm_fp16 under another name: deduped, reported under both names
        (dict(_mm_case("selftest_mm_fp16_again", "fp16", 64, 64, 32, 4, 3), bytes=1), clean),
        # must be caught: a 256x128 fp32 accumulator is 256 registers a thread in 4 warps: it spills
        (_mm_case("selftest_mm_spills", "fp16", 256, 128, 32, 4, 2), {80: "spill", 90: "spill"}),
        # must be caught: 64x128 + 128x64 fp16 tiles are 32 KiB a stage; 8 stages need 224-256 KiB
        (_mm_case("selftest_mm_smem_overflow", "fp16", 64, 64, 128, 4, 8), {80: "shared memory", 90: "shared memory"}),
        # must be caught: a tl.dot kernel flagged uses_mma=False
        (_mm_case("selftest_mm_wrong_flag", "fp16", 64, 64, 32, 4, 3, uses_mma=False), {80: "uses_mma", 90: "uses_mma"}),
    ]


# ------------------------------------------------------------------ the kernel modules' cases

def _collect_kernel_cases():
    """{module: cases per capability} and {module: import/enumeration error}, at collection time (an error becomes
    a failing test below, never a skip)."""
    cases, errors = {}, {}
    for mod in gc.case_modules():
        try:
            cases[mod] = {cap: gc.module_cases(mod, cap) for cap in CAPABILITIES}
        except Exception:  # noqa: BLE001 - reported by test_kernel_module_provides_cases
            errors[mod] = traceback.format_exc()
    return cases, errors


FULL_MATRIX = os.environ.get("BERTFAST_GPU_COMPILE") == "all"


def in_suite(case: dict, cap: int) -> bool:
    """Whether the default suite compiles this case (all of them with BERTFAST_GPU_COMPILE=all)."""
    if FULL_MATRIX:
        return True
    if re.search(r"_d(32|128)_", case["name"]):  # head_dim 32 / 128: not a BERT preset's
        return False
    return cap == 90 or bool(case.get("uses_mma"))  # sm_80 differs from sm_90 where tensor cores are used


KERNEL_CASES, KERNEL_ERRORS = _collect_kernel_cases()
KERNEL_PARAMS = [pytest.param(cap, case["name"], id=f"sm{cap}-{case['name']}")
                 for mod, by_cap in KERNEL_CASES.items() for cap in CAPABILITIES for case in by_cap[cap]
                 if in_suite(case, cap)]


@pytest.fixture(scope="module")
def compiled():
    """Every self-test case and the suite's kernel cases (in_suite) compiled for their targets, in one pool of
    worker processes."""
    pairs = [(c, cap) for c, _ in selftest_cases() for cap in CAPABILITIES]
    pairs += [(c, cap) for by_cap in KERNEL_CASES.values() for cap in CAPABILITIES for c in by_cap[cap]
              if in_suite(c, cap)]
    results = gc.compile_pairs(pairs)
    return {(r.capability, r.name): r for r in results}


@pytest.fixture(scope="module")
def selftest_results(compiled):
    return compiled


@pytest.mark.parametrize("module", gc.case_modules())
def test_kernel_module_provides_cases(module):
    """The module imports and enumerates its launch configurations for both targets, fp16, bf16 and fp32."""
    assert module not in KERNEL_ERRORS, f"{module}.gpu_compile_cases failed:\n{KERNEL_ERRORS.get(module)}"
    for cap in CAPABILITIES:
        cases = KERNEL_CASES[module][cap]
        assert cases, f"{module}.gpu_compile_cases({cap}) is empty"
        names = [c["name"] for c in cases]
        assert len(names) == len(set(names)), f"duplicate case names in {module}"
        dtypes = {gc.case_dtype(c) for c in cases}
        assert {"fp16", "bf16", "fp32"} <= dtypes, f"{module} sm_{cap} cases cover only {sorted(map(str, dtypes))}"
        for c in cases:
            assert c["bytes"] > 0 and c["flops"] >= 0, (c["name"], c["bytes"], c["flops"])


@pytest.mark.parametrize("capability, name", KERNEL_PARAMS)
def test_kernel_config_compiles_and_fits(compiled, capability, name):
    r = compiled[(capability, name)]
    problems = r.problems()
    assert not problems, (
        f"{name} on sm_{capability} (num_warps={r.num_warps}, num_stages={r.num_stages}): "
        + "; ".join(problems) + (f"\n{r.ptxas_report}" if r.ok else ""))


def test_selftest_checks_pass_and_fail_as_they_should(selftest_results):
    for case, expected in selftest_cases():
        for cap in CAPABILITIES:
            r = selftest_results[(cap, case["name"])]
            problems = r.problems()
            if expected[cap] is None:
                assert r.ok and not problems, (cap, case["name"], problems, r.ptxas_report)
            else:
                assert any(expected[cap] in p for p in problems), (cap, case["name"], problems)


def test_selftest_instruction_facts(selftest_results):
    """What the SASS must show, so that a check that always passes would fail here."""
    for cap in CAPABILITIES:
        mm16 = selftest_results[(cap, "selftest_mm_fp16")]
        assert mm16.arch == ("sm_90a" if cap == 90 else "sm_80")
        assert mm16.registers and mm16.registers == mm16.cubin_registers
        assert mm16.shared_bytes > 0 and mm16.total_shared_bytes <= mm16.smem_limit
        tf32 = selftest_results[(cap, "selftest_mm_fp32_tf32")]
        assert any("TF32" in k.upper() for k in tf32.mma_instructions), tf32.mma_instructions
        ieee = selftest_results[(cap, "selftest_mm_fp32_ieee")]
        assert not ieee.mma_instructions and ieee.ffma_count > 0
        rowsum = selftest_results[(cap, "selftest_rowsum_fp16")]
        assert not rowsum.mma_instructions and not rowsum.has_hgmma and not rowsum.has_hmma
        again = selftest_results[(cap, "selftest_mm_fp16_again")]
        assert again.cached_as == "selftest_mm_fp16" and again.bytes == 1 and again.registers == mm16.registers
    assert selftest_results[(90, "selftest_mm_fp16")].has_hgmma
    assert selftest_results[(80, "selftest_mm_fp16")].has_hmma
    assert not selftest_results[(80, "selftest_mm_fp16")].has_hgmma
    assert selftest_results[(90, "selftest_mm_bf16")].has_hgmma
    assert selftest_results[(80, "selftest_mm_bf16")].has_hmma
    for cap in CAPABILITIES:
        spills = selftest_results[(cap, "selftest_mm_spills")]
        assert spills.spill_stores > 0 and spills.registers == 255, spills.ptxas_report
        overflow = selftest_results[(cap, "selftest_mm_smem_overflow")]
        assert overflow.total_shared_bytes > gc.SMEM_LIMIT[cap] and overflow.spills == 0


def test_report_formats_results(selftest_results, tmp_path):
    from bertfast.kernels import report
    results = [r for (cap, _), r in sorted(selftest_results.items()) if cap == 90]
    text = report.format_table(results)
    assert "selftest_mm_fp16" in text and "HGMMA" in text
    path = tmp_path / "r.json"
    report.write_json(results, path)
    rows = json.loads(path.read_text())
    row = next(r for r in rows if r["name"] == "selftest_mm_fp16")
    assert row["registers"] == selftest_results[(90, "selftest_mm_fp16")].registers
    # 2*4096*4096*1024 flops at 989 TFLOP/s vs 2*(4096*1024*2 + 4096*4096) bytes at 3.35 TB/s
    assert row["roofline"]["t_math_us"] == pytest.approx(2 * 4096 * 4096 * 1024 / 989e12 * 1e6)
    assert row["roofline"]["t_mem_us"] == pytest.approx((2 * 4096 * 1024 + 4096 * 4096) * 2 / 3.35e12 * 1e6)
