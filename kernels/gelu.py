"""Fused bias + exact (erf) GELU in Triton, forward and backward.

    z = x + bias (bias broadcast over the last dim);  y = z * Phi(z),  Phi(z) = (1 + erf(z / sqrt(2))) / 2

Layers: the @triton.jit kernels; the plain launchers `bias_gelu_fwd` / `bias_gelu_bwd` (check, allocate, pick
the launch configuration with `fwd_config` / `bwd_config`, launch); the autograd-aware torch.library ops live in
bertfast/ops/_triton_norm.py.

The forward stores only y; the backward recomputes z from x and bias (x is kept alive for it instead of z: the
same bytes). d_bias is a column sum over all rows: the backward grid is persistent over rows (G row-programs per
column block), each program accumulates its column sums in float32 registers and writes them once to a
[G, N] float32 buffer, reduced once afterwards (no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from bertfast.kernels import _launch
from bertfast.kernels._launch import (DEFAULT_SMS, FLOAT_DTYPES, TL_PTR, as_rows, check_runnable, check_vector,
                                      device_info, divisibility_attrs)


_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2) (a constexpr: jit code reads no plain globals)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)


# ----------------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _bias_gelu_fwd_kernel(
    X,  # *[M, N] input
    BIAS,  # *[N] bias added before the GELU
    Y,  # *[M, N] out, dtype of x
    stride_x, stride_y,  # row strides in elements (the last dim is contiguous)
    M, N,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    mask = (rows < M)[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    z = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    z += tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    y = z * 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2))
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    DY,  # *[M, N] gradient of y
    X,  # *[M, N] the forward's input
    BIAS,  # *[N]
    DX,  # *[M, N] out: gradient of x, dtype of x
    DB_PART,  # *[G, N] float32 out: per-program column sums of dx
    stride_dy, stride_x, stride_dx,  # row strides in elements
    M, N,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # VJP: dz = dy * (Phi(z) + z * phi(z)),  phi(z) = exp(-z^2 / 2) / sqrt(2 pi);  dx = dz;  dbias = sum_rows dz
    pid_m = tl.program_id(0)
    num_row_programs = tl.num_programs(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    b = tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(pid_m * BLOCK_M, M, num_row_programs * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        z = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32) + b[None, :]
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2))
        pdf = tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
        dz = dy * (cdf + z * pdf)  # 0 outside mask: dy is loaded as 0 there
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dz.to(DX.dtype.element_ty), mask=mask)
        db_acc += tl.sum(dz, axis=0)
    tl.store(DB_PART + pid_m.to(tl.int64) * N + cols, db_acc, mask=col_mask)


# ----------------------------------------------------------------------------------------------------------------
# launch configuration (one place; the launchers and the compile checks call these)
# ----------------------------------------------------------------------------------------------------------------
def _tile(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): tiles of up to 512 columns x enough rows for ~4096 elements, 8 warps (16
    elements per thread: two 16-byte loads in half precision). Heuristic, not yet tuned on a GPU."""
    block_n = min(triton.next_power_of_2(max(n_cols, 1)), 512)
    block_m = max(1, min(4096 // block_n, triton.next_power_of_2(max(n_rows, 1))))
    num_warps = max(1, min(8, block_m * block_n // 512))
    return block_m, block_n, num_warps


def fwd_config(n_rows: int, n_cols: int, dtype: torch.dtype, capability: int = 90) -> dict:
    """Launch settings of `_bias_gelu_fwd_kernel` for an [n_rows, n_cols] input:
    {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "grid"} (`capability` e.g. 80 / 90; same on all today)."""
    block_m, block_n, num_warps = _tile(n_rows, n_cols)
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps, "num_stages": 1,
            "grid": (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))}


def bwd_config(n_rows: int, n_cols: int, dtype: torch.dtype, capability: int = 90,
               num_sms: int | None = None, resident_per_sm: int | None = None) -> dict:
    """Launch settings of `_bias_gelu_bwd_kernel`: a persistent grid of (row programs, column blocks), one full
    wave: `num_sms` (default: the usual card of that capability) x `resident_per_sm` blocks in all, the kernel's
    occupancy from its compiled registers and shared memory (`_launch.kernel_occupancy`, which the launcher
    passes on a GPU); unknown (None), the warps-only bound `blocks_per_sm(capability, None, num_warps)`. Each row
    program loops over row tiles and leaves one float32 row of d_bias partial sums."""
    block_m, block_n, num_warps = _tile(n_rows, n_cols)
    col_blocks = triton.cdiv(n_cols, block_n)
    sms = num_sms or DEFAULT_SMS.get(capability, 108)
    if resident_per_sm is None:
        resident_per_sm = _launch.blocks_per_sm(capability, None, num_warps)
    wave = _launch.persistent_programs(triton.cdiv(n_rows, block_m) * col_blocks, sms, resident_per_sm)
    row_programs = max(1, min(triton.cdiv(n_rows, block_m), triton.cdiv(wave, col_blocks)))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps, "num_stages": 1,
            "grid": (row_programs, col_blocks)}


# ----------------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------------
def check_inputs(x, bias) -> None:
    """Validates the arguments of bias_gelu; the messages say what to change."""
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"bias_gelu: x has dtype {x.dtype}; use float32, float16 or bfloat16")
    if x.dim() < 1:
        raise ValueError("bias_gelu: x must have at least one dim (the bias is added along the last one)")
    check_vector("bias_gelu", "bias", bias, x.shape[-1], x)
    check_runnable(x, "bias_gelu")


def bias_gelu_fwd(x, bias, out=None):
    """y = gelu(x + bias) (exact erf form), x [..., N], bias [N]; y has x's shape and dtype. `out` (contiguous,
    x's shape and dtype) may be given to write into."""
    check_inputs(x, bias)
    n = x.shape[-1]
    x2 = as_rows(x, n)
    m = x2.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    if y.shape != x.shape or y.dtype != x.dtype or not y.is_contiguous():
        raise ValueError("bias_gelu: out must be contiguous with x's shape and dtype")
    if x.numel() == 0:
        return y
    y2 = y.view(m, n)
    cap, _ = device_info(x)
    cfg = fwd_config(m, n, x.dtype, cap)
    with _launch.device_guard(x):
        _bias_gelu_fwd_kernel[cfg["grid"]](x2, bias, y2, x2.stride(0), y2.stride(0), m, n,
                                           BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                                           num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y


def bias_gelu_bwd(dy, x, bias, dx=None):
    """Gradients of `bias_gelu_fwd`: returns (dx, dbias); dx in x's dtype, dbias in bias's dtype."""
    if dy.shape != x.shape:
        raise ValueError(f"bias_gelu backward: dy has shape {tuple(dy.shape)} but x has {tuple(x.shape)}")
    check_runnable(x, "bias_gelu backward")
    n = x.shape[-1]
    x2 = as_rows(x, n)
    dy2 = as_rows(dy, n)
    m = x2.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if dx is None else dx
    if x.numel() == 0:
        return dx, torch.zeros(n, dtype=bias.dtype, device=x.device)
    dx2 = dx.view(m, n)
    cap, sms = device_info(x)
    cfg = bwd_config(m, n, x.dtype, cap, sms)
    with _launch.device_guard(x):
        resident = _bwd_occupancy(cfg, (dy2, x2, bias, dx2), m, n, cap)
        if resident is not None:
            cfg = bwd_config(m, n, x.dtype, cap, sms, resident)
        db_part = torch.empty((cfg["grid"][0], n), dtype=torch.float32, device=x.device)
        _bias_gelu_bwd_kernel[cfg["grid"]](dy2, x2, bias, dx2, db_part, dy2.stride(0), x2.stride(0),
                                           dx2.stride(0), m, n, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                                           num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dx, db_part.sum(0).to(bias.dtype)


def _bwd_occupancy(cfg, tensors, m, n, cap) -> int | None:
    """The backward kernel's resident blocks per SM at cfg's constexprs (None off CUDA): compiled, not launched,
    once per configuration (a [1, N] stand-in for the d_bias partials: only its dtype and alignment matter)."""
    dy2, x2, bias, dx2 = tensors
    if x2.device.type != "cuda":
        return None
    probe = torch.empty((1, n), dtype=torch.float32, device=x2.device)
    return _launch.kernel_occupancy(
        _bias_gelu_bwd_kernel, (dy2, x2, bias, dx2, probe, dy2.stride(0), x2.stride(0), dx2.stride(0), m, n),
        dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
             num_stages=cfg["num_stages"]), x2.device, cap)


# ----------------------------------------------------------------------------------------------------------------
# GPU-compile contract
# ----------------------------------------------------------------------------------------------------------------
_BERT_WIDTHS = (3072, 4096)  # intermediate sizes of BERT base / large
_BERT_ROWS = (32 * 128, 32 * 512)  # batch 32 at seqlen 128 and 512


def gpu_compile_cases(capability: int, widths=_BERT_WIDTHS, rows=_BERT_ROWS) -> list[dict]:
    """Every (kernel, constexprs, warps) the launchers pick at BERT shapes, for compiling without a GPU."""
    cases = []
    for dtype in FLOAT_DTYPES:
        ptr, esz = TL_PTR[dtype], torch.empty((), dtype=dtype).element_size()
        for n in widths:
            for m in rows:
                f = fwd_config(m, n, dtype, capability)
                b = bwd_config(m, n, dtype, capability)
                ints = {"N": n, "stride_x": n, "stride_y": n, "stride_dy": n, "stride_dx": n}
                tag = f"{str(dtype)[6:]}_M{m}_N{n}"
                fwd = {
                    "name": f"bias_gelu_fwd_{tag}_BM{f['BLOCK_M']}_BN{f['BLOCK_N']}_w{f['num_warps']}",
                    "fn": _bias_gelu_fwd_kernel,
                    "signature": {"X": ptr, "BIAS": "*fp32", "Y": ptr, "stride_x": "i32", "stride_y": "i32",
                                  "M": "i32", "N": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"},
                    "constexprs": {"BLOCK_M": f["BLOCK_M"], "BLOCK_N": f["BLOCK_N"]},
                    "num_warps": f["num_warps"], "num_stages": f["num_stages"], "uses_mma": False,
                    # read x, write y (x's dtype) + the bias
                    "bytes": 2 * m * n * esz + n * 4, "flops": 8 * m * n,
                }
                bwd = {
                    "name": f"bias_gelu_bwd_{tag}_BM{b['BLOCK_M']}_BN{b['BLOCK_N']}_w{b['num_warps']}",
                    "fn": _bias_gelu_bwd_kernel,
                    "signature": {"DY": ptr, "X": ptr, "BIAS": "*fp32", "DX": ptr, "DB_PART": "*fp32",
                                  "stride_dy": "i32", "stride_x": "i32", "stride_dx": "i32", "M": "i32", "N": "i32",
                                  "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"},
                    "constexprs": {"BLOCK_M": b["BLOCK_M"], "BLOCK_N": b["BLOCK_N"]},
                    "num_warps": b["num_warps"], "num_stages": b["num_stages"], "uses_mma": False,
                    # read dy and x, write dx (x's dtype) + the bias + the [G, N] float32 partials
                    "bytes": 3 * m * n * esz + n * 4 + b["grid"][0] * n * 4, "flops": 14 * m * n,
                }
                for case in (fwd, bwd):
                    case["dtype"] = ptr[1:]  # the activations' dtype (parameters are float32)
                    case["attrs"] = divisibility_attrs(case["fn"], case["signature"], ints)
                    cases.append(case)
    return cases


__all__ = ["fwd_config", "bwd_config", "check_inputs", "bias_gelu_fwd", "bias_gelu_bwd", "gpu_compile_cases"]
