"""Fused (bias + dropout +) residual + LayerNorm in Triton, forward and backward.

    h = dropout(x + x_bias) + residual          (x_bias, dropout and residual each optional)
    y = (h - mean(h)) * rstd * weight + bias,   rstd = 1 / sqrt(var(h) + eps), over the last dim

Layers: the @triton.jit kernels; the plain launchers `layer_norm_fwd` / `layer_norm_bwd` (check inputs, allocate,
pick the launch configuration with `fwd_config` / `bwd_config`, launch); the autograd-aware torch.library ops
live in bertfast/ops/_triton_norm.py.

Memory plan. The forward reads x (+ residual) and writes y, plus mean and rstd in float32 (one float each per
row). It does not store h: the backward recomputes it from x, x_bias, residual and the dropout seed, which moves
as many bytes as storing h would (write h once + read it once == read x and residual once more) and keeps no
extra activation alive. The dropout keep-mask is never stored either: it is regenerated from (seed, element
index) with Philox (`tl.rand`), identically in both passes; `dropout_keep_mask` exposes the same mask for tests.

The weight / bias / x_bias gradients are column sums over all rows. The backward runs a persistent grid of G
programs, each walking the row tiles pid, pid + G, ...; each accumulates its partial column sums in float32
registers and writes them once to a [G, N] float32 buffer, which is then reduced once with a sum over G (no
atomics, no locks).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from bertfast.kernels import _launch
from bertfast.kernels._launch import (DEFAULT_SMS, FLOAT_DTYPES, TL_PTR, as_rows, check_runnable, check_vector,
                                      device_info, divisibility_attrs)

# Widest row the kernels take: the whole row lives in registers (one block). 8192 was checked to compile without
# spills for sm_80 and sm_90 with the warps `_num_warps` picks (ptxas -v, triton 3.8).
MAX_WIDTH = 8192



# ----------------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _dropout_keep(seed, rows64, col_start, N, drop_threshold, BLOCK_N: tl.constexpr, AGAIN: tl.constexpr = False):
    """Keep-mask [BLOCK_M, BLOCK_N] of the tile of rows `rows64`, columns col_start + [0, BLOCK_N).

    Element (r, c) is kept iff (word & 0x7fffffff) >= drop_threshold, where word is lane c % 4 of the four
    32-bit Philox outputs for counter r * ceil(N / 4) + c // 4 (tl.randint4x). One Philox evaluation serves four
    elements: 4x less arithmetic and register state than tl.rand per element. col_start must be a multiple of 4.
    drop_threshold = round(p * 2**31), so the keep rate is 1 - p to within 2**-31.

    AGAIN=True computes the very same mask with shifts instead of divisions (equal for the non-negative values
    here), so the compiler does not merge it with an earlier evaluation: for the widest rows, holding the mask
    across the backward's reductions costs more registers than drawing it twice."""
    if AGAIN:
        q = (col_start >> 2) + tl.arange(0, BLOCK_N // 4)
        counter = rows64[:, None] * ((N + 3) >> 2) + q[None, :]
    else:
        q = col_start // 4 + tl.arange(0, BLOCK_N // 4)
        counter = rows64[:, None] * ((N + 3) // 4) + q[None, :]  # int64: Philox takes the high word as well
    r0, r1, r2, r3 = tl.randint4x(seed, counter)
    # interleave so that column 4 * q + l takes lane l: join(join(r0, r2), join(r1, r3))[..., i, j] = r_{2i+j}
    words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (counter.shape[0], BLOCK_N))
    return (words & 0x7FFFFFFF).to(tl.int32, bitcast=True) >= drop_threshold


@triton.jit
def _load_h(X, XB, R, rows64, cols, mask, col_mask, keep, stride_x, stride_r, dropout_scale,
            HAS_XBIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """h = dropout(x + x_bias) + residual for the tile, in float32 (0 outside `mask`); `keep` is the tile's
    dropout keep-mask (ignored unless HAS_DROPOUT)."""
    h = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_XBIAS:
        h += tl.load(XB + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_DROPOUT:
        h = tl.where(keep, h * dropout_scale, 0.0)
    if HAS_RESIDUAL:
        h += tl.load(R + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return h


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # *[M, N] input (the dense layer's output)
    XB,  # *[N] bias added to x before dropout (read only if HAS_XBIAS)
    R,  # *[M, N] residual added after dropout (read only if HAS_RESIDUAL)
    W,  # *[N] LayerNorm weight
    B,  # *[N] LayerNorm bias
    Y,  # *[M, N] output, dtype of x
    MEAN,  # *[M] float32 mean of h, saved for the backward
    RSTD,  # *[M] float32 1 / sqrt(var(h) + eps), saved for the backward
    stride_x, stride_r, stride_y,  # row strides in elements (the last dim is contiguous)
    M, N,  # rows, row width
    eps,  # LayerNorm epsilon
    SEED,  # *int64 (0-dim): Philox seed of the dropout mask, read on the device (CUDA-graph safe)
    drop_threshold,  # round(dropout_p * 2**31): see _dropout_keep
    dropout_scale,  # 1 / (1 - dropout_p) (0 when p == 1)
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # next power of two >= N: the whole row is one block
    HAS_XBIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)

    keep = mask
    if HAS_DROPOUT:
        keep = _dropout_keep(tl.load(SEED), rows64, 0, N, drop_threshold, BLOCK_N)
    h = _load_h(X, XB, R, rows64, cols, mask, col_mask, keep, stride_x, stride_r, dropout_scale,
                HAS_XBIAS, HAS_RESIDUAL, HAS_DROPOUT)
    # two-pass statistics on the register-resident row: mean, then the variance of the centred values
    mean = tl.sum(h, axis=1) / N
    d = tl.where(mask, h - mean[:, None], 0.0)
    var = tl.sum(d * d, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)

    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = d * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _layer_norm_bwd_kernel(
    DY,  # *[M, N] gradient of y
    X, XB, R,  # the forward's inputs, to recompute h (XB / R read only if HAS_XBIAS / HAS_RESIDUAL)
    W,  # *[N] LayerNorm weight
    MEAN, RSTD,  # *[M] float32, saved by the forward
    DX,  # *[M, N] out: gradient of x (dtype of x)
    DH,  # *[M, N] out: gradient of h == gradient of the residual (written only if STORE_DH)
    DW_PART, DB_PART, DXB_PART,  # *[G, N] float32 out: per-program column sums (DXB_PART only if HAS_XBIAS)
    stride_dy, stride_x, stride_r, stride_dx, stride_dh,  # row strides in elements
    M, N,
    SEED, drop_threshold, dropout_scale,  # the forward's dropout (SEED: *int64), to regenerate the keep-mask
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_XBIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_DH: tl.constexpr,
    REDRAW_KEEP: tl.constexpr,  # draw the keep-mask again for dx instead of holding it (widest rows: registers)
):
    # VJP of y = xhat * w + b, xhat = (h - mean) * rstd, with g = dy * w and means over the row:
    #   dh = rstd * (g - mean(g) - xhat * mean(g * xhat));  dw = sum_rows dy * xhat;  db = sum_rows dy
    # then through h = dropout(x + x_bias) + residual:
    #   dresidual = dh;  dx = dh * keep * scale;  dx_bias = sum_rows dx
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    seed = tl.load(SEED)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    dxb_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(pid * BLOCK_M, M, num_programs * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        # the keep-mask first, while only the accumulators are live (Philox's state is register-hungry)
        keep = mask
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rows64, 0, N, drop_threshold, BLOCK_N)
        h = _load_h(X, XB, R, rows64, cols, mask, col_mask, keep, stride_x, stride_r, dropout_scale,
                    HAS_XBIAS, HAS_RESIDUAL, HAS_DROPOUT)
        mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        xhat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # w is re-read per tile (an L1/L2 hit) rather than held across the loop: fewer live registers
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        dw_acc += tl.sum(dy * xhat, axis=0)
        db_acc += tl.sum(dy, axis=0)
        g = dy * w[None, :]  # dy is dead from here: one row-sized value fewer in registers
        c_xhat = tl.sum(g * xhat, axis=1) / N
        c_g = tl.sum(g, axis=1) / N
        dh = tl.where(mask, (g - xhat * c_xhat[:, None] - c_g[:, None]) * rstd[:, None], 0.0)
        if HAS_DROPOUT:
            if REDRAW_KEEP:
                keep = _dropout_keep(seed, rows64, 0, N, drop_threshold, BLOCK_N, AGAIN=True)
            dx = tl.where(keep, dh * dropout_scale, 0.0)
            if STORE_DH:
                tl.store(DH + rows64[:, None] * stride_dh + cols[None, :], dh.to(DH.dtype.element_ty), mask=mask)
        else:
            dx = dh
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_XBIAS:
            dxb_acc += tl.sum(dx, axis=0)
    part = pid.to(tl.int64) * N + cols
    tl.store(DW_PART + part, dw_acc, mask=col_mask)
    tl.store(DB_PART + part, db_acc, mask=col_mask)
    if HAS_XBIAS:
        tl.store(DXB_PART + part, dxb_acc, mask=col_mask)


@triton.jit
def _dropout_mask_kernel(KEEP, M, N, SEED, drop_threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Writes the keep-mask (int8 0/1) the LayerNorm kernels use for (seed, p) on an [M, N] input."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    rows64 = rows.to(tl.int64)
    keep = _dropout_keep(tl.load(SEED), rows64, tl.program_id(1) * BLOCK_N, N, drop_threshold, BLOCK_N)
    tl.store(KEEP + rows64[:, None] * N + cols[None, :], keep.to(tl.int8), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# launch configuration (one place; the launchers and the compile checks call these)
# ----------------------------------------------------------------------------------------------------------------
def _block_n(n_cols: int) -> int:
    if n_cols < 1:
        raise ValueError(f"layer_norm: the last dim must be at least 1, got {n_cols}")
    if n_cols > MAX_WIDTH:
        raise ValueError(f"layer_norm: rows of width {n_cols} are wider than the Triton kernel's limit of "
                         f"{MAX_WIDTH} (a whole row is held in registers); use impl='torch' for wider rows")
    return max(4, triton.next_power_of_2(n_cols))  # >= 4: the dropout mask works on groups of 4 columns


def _tile(n_rows: int, block_n: int, target: int) -> tuple[int, int]:
    """(BLOCK_M, num_warps): narrow rows are packed several to a program so each program holds about `target`
    elements; warps give each thread ~8 elements per tensor of the tile (16-byte loads in half precision).
    Heuristic, not yet tuned on a GPU."""
    block_m = max(1, min(target // block_n, triton.next_power_of_2(max(n_rows, 1)), 64))
    num_warps = max(1, min(16, block_m * block_n // 256))
    return block_m, num_warps


def fwd_config(n_rows: int, n_cols: int, dtype: torch.dtype, capability: int = 90) -> dict:
    """Launch settings of `_layer_norm_fwd_kernel` for an [n_rows, n_cols] input:
    {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "grid"}. `capability` is e.g. 80 or 90 (unused today:
    the same settings are used on every card)."""
    block_n = _block_n(n_cols)
    block_m, num_warps = _tile(n_rows, block_n, 4096)
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps, "num_stages": 1,
            "grid": (triton.cdiv(n_rows, block_m),)}


def bwd_config(n_rows: int, n_cols: int, dtype: torch.dtype, capability: int = 90,
               num_sms: int | None = None, dropout: bool = False, resident_per_sm: int | None = None) -> dict:
    """Launch settings of `_layer_norm_bwd_kernel`: {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "grid"}.
    The grid is persistent, one full wave: `num_sms` (default: the usual card of that capability) x
    `resident_per_sm` programs, the kernel's occupancy from its compiled registers and shared memory
    (`_launch.kernel_occupancy`, passed by the launcher on a GPU; None: the warps-only bound), each looping over
    row tiles; the [grid, N] float32 partial sums are reduced afterwards."""
    block_n = _block_n(n_cols)
    block_m, num_warps = _tile(n_rows, block_n, 2048)
    # At N = 8192 the three float32 column accumulators plus the row's working set sit at the 128-register
    # ceiling of 16 warps. Without dropout, 32 warps (8 elements per thread, 64 registers) fit without spills;
    # with dropout the Philox state does not fit in 64, so it stays at 16 warps and draws the keep-mask twice
    # rather than holding it (ptxas -v with Triton's flags, sm_80 and sm_90, triton 3.8). Narrower rows hold the
    # mask (Philox is not free).
    redraw_keep = block_n >= 8192 and dropout
    if block_n >= 8192 and not dropout:
        num_warps = 32
    sms = num_sms or DEFAULT_SMS.get(capability, 108)
    if resident_per_sm is None:
        resident_per_sm = _launch.blocks_per_sm(capability, None, num_warps)
    programs = _launch.persistent_programs(triton.cdiv(n_rows, block_m), sms, resident_per_sm)
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps, "num_stages": 1,
            "grid": (programs,), "REDRAW_KEEP": redraw_keep}


# ----------------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------------
def check_inputs(x, weight, bias, residual=None, x_bias=None, dropout_p: float = 0.0) -> None:
    """Validates the arguments of the fused LayerNorm; the messages say what to change."""
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"layer_norm: x has dtype {x.dtype}; use float32, float16 or bfloat16")
    if x.dim() < 1:
        raise ValueError("layer_norm: x must have at least one dim (the normalised last dim)")
    n = x.shape[-1]
    _block_n(n)
    check_vector("layer_norm", "weight", weight, n, x)
    check_vector("layer_norm", "bias", bias, n, x)
    check_vector("layer_norm", "x_bias", x_bias, n, x)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"layer_norm: residual has shape {tuple(residual.shape)} but x has {tuple(x.shape)}; "
                             "they must match")
        if residual.dtype != x.dtype:
            raise TypeError(f"layer_norm: residual has dtype {residual.dtype} but x has {x.dtype}; cast one")
        if residual.device != x.device:
            raise ValueError(f"layer_norm: residual is on {residual.device} but x is on {x.device}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"layer_norm: dropout_p must be in [0, 1], got {dropout_p}")
    check_runnable(x, "layer_norm")


def _dropout_scale(p: float) -> float:
    # p == 1 drops everything: a zero scale makes h and dx zero whatever the mask says
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def _drop_threshold(p: float) -> int:
    return min(int(round(p * 2.0 ** 31)), 2 ** 31 - 1)


def layer_norm_fwd(x, weight, bias, eps: float = 1e-12, residual=None, x_bias=None, dropout_p: float = 0.0,
                   seed=0, out=None, mean=None, rstd=None):
    """y = LayerNorm(dropout(x + x_bias) + residual) over the last dim; returns (y, mean, rstd).

    x [..., N]; y has x's shape and dtype; mean / rstd are float32 [...]. `out` / `mean` / `rstd` may be given
    (contiguous, right shape and dtype) to write into. The dropout mask is `dropout_keep_mask(seed, ...)`."""
    check_inputs(x, weight, bias, residual, x_bias, dropout_p)
    n = x.shape[-1]
    x2 = as_rows(x, n)
    m = x2.shape[0]
    r2 = as_rows(residual, n) if residual is not None else x2
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device) if mean is None else mean
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device) if rstd is None else rstd
    if y.shape != x.shape or y.dtype != x.dtype or not y.is_contiguous():
        raise ValueError("layer_norm: out must be contiguous with x's shape and dtype")
    if m == 0:
        return y, mean, rstd
    y2 = y.view(m, n)
    cap, _ = device_info(x)
    cfg = fwd_config(m, n, x.dtype, cap)
    has_dropout = dropout_p > 0.0
    with _launch.device_guard(x):
        _layer_norm_fwd_kernel[cfg["grid"]](
            x2, x_bias if x_bias is not None else x2, r2, weight, bias, y2, mean, rstd,
            x2.stride(0), r2.stride(0), y2.stride(0), m, n, eps, _launch.seed_tensor(seed, x.device),
            _drop_threshold(dropout_p),
            _dropout_scale(dropout_p), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], HAS_XBIAS=x_bias is not None,
            HAS_RESIDUAL=residual is not None, HAS_DROPOUT=has_dropout,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y, mean, rstd


def layer_norm_bwd(dy, x, weight, mean, rstd, residual=None, x_bias=None, dropout_p: float = 0.0, seed=0,
                   need_dresidual: bool = True, dx=None, dresidual=None):
    """Gradients of `layer_norm_fwd`: returns (dx, dresidual, dweight, dbias, dx_bias).

    dresidual is the gradient of h; without dropout it equals dx and the same tensor is returned for both.
    With dropout it is a separate tensor when `need_dresidual` (else None). dx_bias is None without x_bias.
    dweight / dbias / dx_bias have the dtype of weight / weight / x_bias."""
    n = x.shape[-1]
    if dy.shape != x.shape:
        raise ValueError(f"layer_norm backward: dy has shape {tuple(dy.shape)} but x has {tuple(x.shape)}")
    check_runnable(x, "layer_norm backward")
    x2 = as_rows(x, n)
    dy2 = as_rows(dy, n)
    m = x2.shape[0]
    r2 = as_rows(residual, n) if residual is not None else x2
    has_dropout = dropout_p > 0.0
    store_dh = has_dropout and need_dresidual and residual is not None
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if dx is None else dx
    dh = None
    if store_dh:
        dh = torch.empty(x.shape, dtype=x.dtype, device=x.device) if dresidual is None else dresidual
    dx2 = dx.view(m, n)
    dh2 = dh.view(m, n) if dh is not None else dx2
    tensors = (dy2, x2, x_bias if x_bias is not None else x2, r2, weight, mean, rstd, dx2, dh2)
    flags = dict(HAS_XBIAS=x_bias is not None, HAS_RESIDUAL=residual is not None, HAS_DROPOUT=has_dropout,
                 STORE_DH=store_dh)
    dropout_args = (_launch.seed_tensor(seed, x.device), _drop_threshold(dropout_p), _dropout_scale(dropout_p))
    dw_part, db_part, dxb_part = _run_bwd(tensors, dropout_args, flags, x_bias is not None)
    dweight = dw_part.sum(0).to(weight.dtype)
    dbias = db_part.sum(0).to(weight.dtype)
    dx_bias = dxb_part.sum(0).to(x_bias.dtype) if x_bias is not None else None
    if residual is None:
        dres = None
    elif not has_dropout:
        dres = dx
    else:
        dres = dh
    return dx, dres, dweight, dbias, dx_bias


def _run_bwd(tensors, dropout_args, flags, has_xbias):
    """Launches `_layer_norm_bwd_kernel` on (dy2, x2, xb, r2, weight, mean, rstd, dx2, dh2) over its persistent grid
    (sized from the compiled kernel's occupancy on a GPU) and returns the [G, N] float32 partial sums (dw, db, dxb;
    dxb is dw's buffer when there is no x_bias)."""
    dy2, x2, _, r2, _, _, _, dx2, dh2 = tensors
    m, n = x2.shape
    cap, sms = device_info(x2)
    cfg = bwd_config(m, n, x2.dtype, cap, sms, dropout=flags["HAS_DROPOUT"])
    strides = (dy2.stride(0), x2.stride(0), r2.stride(0), dx2.stride(0), dh2.stride(0), m, n)
    consts = dict(flags, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], REDRAW_KEEP=cfg["REDRAW_KEEP"],
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    with _launch.device_guard(x2):
        if m > 0 and x2.device.type == "cuda":
            probe = torch.empty((1, n), dtype=torch.float32, device=x2.device)
            resident = _launch.kernel_occupancy(_layer_norm_bwd_kernel, tensors + (probe,) * 3 + strides
                                                + dropout_args, consts, x2.device, cap)
            if resident is not None:
                cfg = bwd_config(m, n, x2.dtype, cap, sms, dropout=flags["HAS_DROPOUT"], resident_per_sm=resident)
        g = cfg["grid"][0] if m > 0 else 0
        parts = [torch.empty((g, n), dtype=torch.float32, device=x2.device) for _ in range(3 if has_xbias else 2)]
        if m > 0:
            _layer_norm_bwd_kernel[cfg["grid"]](*tensors, parts[0], parts[1], parts[-1], *strides, *dropout_args,
                                                **consts)
    return parts[0], parts[1], parts[-1]


def dropout_keep_mask(seed, shape, dropout_p: float, device="cpu") -> torch.Tensor:
    """The bool keep-mask the LayerNorm kernels apply for this seed and p to an input of `shape` ([..., N]):
    element i of row r is kept iff Philox-uniform(seed, r * N + i) >= p. For tests and debugging."""
    shape = tuple(shape)
    n = shape[-1]
    m = math.prod(shape[:-1])
    keep = torch.empty((m, n), dtype=torch.int8, device=device)
    if keep.numel():
        check_runnable(keep, "dropout_keep_mask")
        bm, bn = 16, max(4, min(triton.next_power_of_2(n), 1024))
        with _launch.device_guard(keep):
            _dropout_mask_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
                keep, m, n, _launch.seed_tensor(seed, keep.device), _drop_threshold(dropout_p), BLOCK_M=bm,
                BLOCK_N=bn)
    keep = keep.bool().reshape(shape)
    return keep & (dropout_p < 1.0)  # p == 1 keeps nothing (the kernels zero everything through the scale)


# ----------------------------------------------------------------------------------------------------------------
# GPU-compile contract
# ----------------------------------------------------------------------------------------------------------------
_BERT_WIDTHS = (768, 1024)  # hidden sizes of BERT base / large
_BERT_ROWS = (32 * 128, 32 * 512)  # batch 32 at seqlen 128 and 512
_VARIANTS = {  # name -> (HAS_XBIAS, HAS_RESIDUAL, HAS_DROPOUT): what the model calls
    "bias_dropout_residual": (True, True, True),  # after attention-out / FFN-out dense, training
    "bias_residual": (True, True, False),  # the same in eval
    "plain": (False, False, False),  # embeddings LayerNorm
}


def gpu_compile_cases(capability: int, widths=_BERT_WIDTHS, rows=_BERT_ROWS) -> list[dict]:
    """Every (kernel, constexprs, warps) the launchers pick at BERT shapes, for compiling without a GPU.

    `widths` / `rows` can be widened (e.g. widths up to MAX_WIDTH) for register-spill checks."""
    cases, seen = [], set()
    for dtype in FLOAT_DTYPES:
        ptr, esz = TL_PTR[dtype], torch.empty((), dtype=dtype).element_size()
        for n in widths:
            for m in rows:
                for vname, (xb, res, drop) in _VARIANTS.items():
                    f = fwd_config(m, n, dtype, capability)
                    b = bwd_config(m, n, dtype, capability, dropout=drop)
                    # bytes: fwd reads x (+ residual), writes y, in x's dtype, + 8 B/row of mean/rstd + params;
                    # bwd reads dy, x (+ residual), writes dx (+ dh), reads mean/rstd, writes the partials.
                    n_act = 1 + int(res)
                    fwd_bytes = m * n * esz * (n_act + 1) + 8 * m + 3 * n * 4
                    n_parts = 2 + int(xb)
                    bwd_bytes = (m * n * esz * (2 + n_act + int(drop and res)) + 8 * m
                                 + b["grid"][0] * n * 4 * n_parts)
                    flag = {"HAS_XBIAS": xb, "HAS_RESIDUAL": res, "HAS_DROPOUT": drop}
                    fwd = {
                        "name": f"layer_norm_fwd_{vname}_{str(dtype)[6:]}_M{m}_N{n}_BM{f['BLOCK_M']}_w{f['num_warps']}",
                        "fn": _layer_norm_fwd_kernel,
                        "signature": {"X": ptr, "XB": "*fp32", "R": ptr, "W": "*fp32", "B": "*fp32", "Y": ptr,
                                      "MEAN": "*fp32", "RSTD": "*fp32", "stride_x": "i32", "stride_r": "i32",
                                      "stride_y": "i32", "M": "i32", "N": "i32", "eps": "fp32", "SEED": "*i64",
                                      "drop_threshold": "i32", "dropout_scale": "fp32", "BLOCK_M": "constexpr",
                                      "BLOCK_N": "constexpr", "HAS_XBIAS": "constexpr",
                                      "HAS_RESIDUAL": "constexpr", "HAS_DROPOUT": "constexpr"},
                        "constexprs": {"BLOCK_M": f["BLOCK_M"], "BLOCK_N": f["BLOCK_N"], **flag},
                        "num_warps": f["num_warps"], "num_stages": f["num_stages"], "uses_mma": False,
                        "bytes": fwd_bytes, "flops": 8 * m * n,
                    }
                    bwd = {
                        "name": (f"layer_norm_bwd_{vname}_{str(dtype)[6:]}_M{m}_N{n}_BM{b['BLOCK_M']}"
                                 f"_w{b['num_warps']}"),
                        "fn": _layer_norm_bwd_kernel,
                        "signature": {"DY": ptr, "X": ptr, "XB": "*fp32", "R": ptr, "W": "*fp32", "MEAN": "*fp32",
                                      "RSTD": "*fp32", "DX": ptr, "DH": ptr, "DW_PART": "*fp32",
                                      "DB_PART": "*fp32", "DXB_PART": "*fp32", "stride_dy": "i32",
                                      "stride_x": "i32", "stride_r": "i32", "stride_dx": "i32", "stride_dh": "i32",
                                      "M": "i32", "N": "i32", "SEED": "*i64", "drop_threshold": "i32",
                                      "dropout_scale": "fp32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                                      "HAS_XBIAS": "constexpr", "HAS_RESIDUAL": "constexpr",
                                      "HAS_DROPOUT": "constexpr", "STORE_DH": "constexpr",
                                      "REDRAW_KEEP": "constexpr"},
                        "constexprs": {"BLOCK_M": b["BLOCK_M"], "BLOCK_N": b["BLOCK_N"], **flag,
                                       "STORE_DH": drop and res, "REDRAW_KEEP": b["REDRAW_KEEP"]},
                        "num_warps": b["num_warps"], "num_stages": b["num_stages"], "uses_mma": False,
                        "bytes": bwd_bytes, "flops": 16 * m * n,
                    }
                    for case in (fwd, bwd):
                        case["dtype"] = ptr[1:]  # the activations' dtype (parameters are float32)
                        case["attrs"] = divisibility_attrs(case["fn"], case["signature"], {
                            "N": n, **{k: n for k in case["signature"] if k.startswith("stride_")}})
                        if case["name"] not in seen:
                            seen.add(case["name"])
                            cases.append(case)
    return cases


__all__ = ["MAX_WIDTH", "fwd_config", "bwd_config", "check_inputs", "layer_norm_fwd", "layer_norm_bwd",
           "dropout_keep_mask", "gpu_compile_cases"]
