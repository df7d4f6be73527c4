"""Argument checks of the public ops in bertfast.ops, run before any impl (torch, triton, ext) so every impl
refuses the same inputs with the same message: a ValueError that names the op and the argument and says what was
expected.

Two kinds of check:
  * argument checks (dims, shapes, dtypes, devices, ranges of Python numbers): attribute reads only, no device
    work; always on. They are on every op's hot path, so they build no strings unless they fail.
  * value checks (cu_seqlens' contents, positions and targets in range): they read tensor data, which on a GPU
    means a host-device synchronisation. Always on CPU tensors; on CUDA tensors on by default, and skipped with
    the op's `check_values=False` (the model passes it on CUDA, where its own inputs are valid by construction and
    a sync per layer would stall the pipeline). Skipped on CUDA, an invalid value is undefined behaviour there
    (a device-side assert at best), as in torch's own indexing ops.
"""
from __future__ import annotations

import math

import torch

# dtypes the ops compute in (float32 accumulation for the half types); float64 runs with impl="torch" only
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_FLOATS64 = FLOATS + (torch.float64,)


class OpArgumentError(ValueError):
    """A bad argument to a bertfast op (a ValueError)."""


def _fail(op: str, msg: str):
    raise OpArgumentError(f"{op}: {msg}")


def _tensor(op, name, t):
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _float(op, name, t, allow64=True):
    if t.dtype not in (_FLOATS64 if allow64 else FLOATS):
        _fail(op, f"{name} has dtype {t.dtype}; use float32, float16 or bfloat16"
                  + (" (float64 with impl='torch')" if allow64 else ""))


def _same_device(op, name, t, ref_name, ref):
    if t.device != ref.device:
        _fail(op, f"{name} is on {t.device} but {ref_name} is on {ref.device}; move it to {ref.device}")


def _vector(op, name, t, n, x):
    """A per-feature parameter: 1-D of size n (x's last dim), a float dtype, on x's device (float64 only with a
    float64 x: mixing it with lower precisions fails inside torch)."""
    _tensor(op, name, t)
    if t.dim() != 1 or t.shape[0] != n:
        _fail(op, f"{name} must be 1-D of size {n} (x's last dim), got shape {tuple(t.shape)}")
    _float(op, name, t, allow64=x.dtype == torch.float64)
    _same_device(op, name, t, "x", x)


def _dropout(op, p):
    if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:  # NaN fails too
        _fail(op, f"dropout_p must be a number in [0, 1), got {p!r}")


def _scale(op, softmax_scale):
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))
                                      or not math.isfinite(softmax_scale)):
        _fail(op, f"softmax_scale must be None (1 / sqrt(head_dim)) or a finite number, got {softmax_scale!r}")


def _values_checked(t: torch.Tensor, check_values: bool) -> bool:
    """Whether to read t's values for the checks: when asked, and always for CPU tensors in eager mode (free
    there); not for check_values=False under torch.compile, where a host read would break the graph."""
    return check_values or (t.device.type == "cpu" and not torch.compiler.is_compiling())


# ----------------------------------------------------------------------------------------------------------------
def layer_norm(x, weight, bias, eps, residual, x_bias, dropout_p):
    op = "layer_norm"
    _tensor(op, "x", x)
    if x.dim() < 1:
        _fail(op, "x must have at least one dim (the normalised last dim)")
    _float(op, "x", x)
    n = x.shape[-1]
    _vector(op, "weight", weight, n, x)
    _vector(op, "bias", bias, n, x)
    if x_bias is not None:
        _vector(op, "x_bias", x_bias, n, x)
    if residual is not None:
        _tensor(op, "residual", residual)
        if residual.shape != x.shape:
            _fail(op, f"residual has shape {tuple(residual.shape)} but x has {tuple(x.shape)}; they must match")
        if residual.dtype != x.dtype:
            _fail(op, f"residual has dtype {residual.dtype} but x has {x.dtype}; cast one")
        _same_device(op, "residual", residual, "x", x)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0.0:
        _fail(op, f"eps must be a number >= 0, got {eps!r}")
    _dropout(op, dropout_p)


def bias_gelu(x, bias):
    op = "bias_gelu"
    _tensor(op, "x", x)
    if x.dim() < 1:
        _fail(op, "x must have at least one dim (the bias is added along the last one)")
    _float(op, "x", x)
    if bias is not None:
        _vector(op, "bias", bias, x.shape[-1], x)


def _qkv(op, q, k, v, dims, layout):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _tensor(op, name, t)
        if t.dim() != dims:
            _fail(op, f"{name} must be {dims}-D {layout}, got shape {tuple(t.shape)}")
    _float(op, "q", q)
    if k.shape != q.shape or v.shape != q.shape:
        _fail(op, f"k and v must have q's shape {tuple(q.shape)} {layout}, got k {tuple(k.shape)}, "
                  f"v {tuple(v.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            _fail(op, f"{name} has dtype {t.dtype} but q has {q.dtype}; q, k and v share one dtype")
        _same_device(op, name, t, "q", q)
    if q.shape[-1] < 1:
        _fail(op, "head_dim (the last dim of q) must be at least 1")


def attention(q, k, v, key_padding_mask, dropout_p, softmax_scale):
    op = "attention"
    _qkv(op, q, k, v, 4, "[batch, seqlen, heads, head_dim]")
    if key_padding_mask is not None:
        _tensor(op, "key_padding_mask", key_padding_mask)
        if key_padding_mask.shape != q.shape[:2]:
            _fail(op, f"key_padding_mask must be [batch, seqlen] = {tuple(q.shape[:2])} (True = real token), got "
                      f"shape {tuple(key_padding_mask.shape)}")
        if key_padding_mask.dtype.is_floating_point or key_padding_mask.dtype.is_complex:
            _fail(op, f"key_padding_mask must be bool (True = real token) or an integer 0/1 mask, got "
                      f"{key_padding_mask.dtype}")
        _same_device(op, "key_padding_mask", key_padding_mask, "q", q)
    _dropout(op, dropout_p)
    _scale(op, softmax_scale)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, check_values=True):
    op = "varlen_attention"
    _qkv(op, q, k, v, 3, "[total_tokens, heads, head_dim]")
    _tensor(op, "cu_seqlens", cu_seqlens)
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        _fail(op, f"cu_seqlens must be 1-D [batch + 1], got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype != torch.int32:
        _fail(op, f"cu_seqlens must be int32, got {cu_seqlens.dtype} (cu_seqlens.to(torch.int32))")
    _same_device(op, "cu_seqlens", cu_seqlens, "q", q)
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        _fail(op, f"max_seqlen must be an int >= 0 (the longest sequence), got {max_seqlen!r}")
    _dropout(op, dropout_p)
    _scale(op, softmax_scale)
    if _values_checked(cu_seqlens, check_values):
        check_cu_seqlens(cu_seqlens, max_seqlen, q.shape[0])


def varlen_attention_qkvpacked(qkv, cu_seqlens, max_seqlen, dropout_p, softmax_scale, check_values=True):
    _tensor("varlen_attention_qkvpacked", "qkv", qkv)
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        _fail("varlen_attention_qkvpacked", "qkv must be [total_tokens, 3, heads, head_dim], got shape "
              f"{tuple(qkv.shape)}")
    varlen_attention(*qkv.unbind(1), cu_seqlens, max_seqlen, dropout_p, softmax_scale, check_values)


def check_cu_seqlens(cu_seqlens, max_seqlen: int, total: int, op: str = "varlen_attention") -> None:
    """The value checks of cu_seqlens (one host sync on a GPU): starts at 0, non-decreasing, ends at most at
    `total` (q's rows; rows past cu_seqlens[-1] are bucket padding), and no sequence longer than max_seqlen."""
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        _fail(op, f"cu_seqlens must start at 0, got cu_seqlens[0] = {cu[0]}")
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    for i, n in enumerate(lengths):
        if n < 0:
            _fail(op, f"cu_seqlens must be non-decreasing, got cu_seqlens[{i}] = {cu[i]} > "
                      f"cu_seqlens[{i + 1}] = {cu[i + 1]}")
    if cu[-1] > total:
        _fail(op, f"cu_seqlens must end at most at the number of rows, q.shape[0] = {total} (rows past "
                  f"cu_seqlens[-1] are padding), got cu_seqlens[-1] = {cu[-1]}")
    longest = max(lengths, default=0)
    if longest > max_seqlen:
        _fail(op, f"max_seqlen={max_seqlen} is smaller than the longest sequence ({longest} tokens, sequence "
                  f"{lengths.index(longest)}); pass max_seqlen >= {longest}")


def mlm_gather(hidden, positions, check_values=True):
    op = "mlm_gather"
    _tensor(op, "hidden", hidden)
    if hidden.dim() != 3:
        _fail(op, f"hidden must be 3-D [batch, seqlen, hidden], got shape {tuple(hidden.shape)}")
    _float(op, "hidden", hidden)
    _tensor(op, "positions", positions)
    if positions.dim() != 2 or positions.shape[0] != hidden.shape[0]:
        _fail(op, f"positions must be 2-D [batch, P] with batch = {hidden.shape[0]} (hidden's), got shape "
                  f"{tuple(positions.shape)}")
    if positions.dtype != torch.int64:
        _fail(op, f"positions must be int64, got {positions.dtype}")
    _same_device(op, "positions", positions, "hidden", hidden)
    if positions.numel() and _values_checked(positions, check_values):
        lo, hi = positions.aminmax()
        lo, hi = int(lo), int(hi)
        if lo < -1 or hi >= hidden.shape[1]:
            bad = int(lo) if lo < -1 else int(hi)
            where = (positions == bad).nonzero()[0].tolist()
            _fail(op, f"positions[{where[0]}, {where[1]}] = {bad} is out of range: must be -1 (unused) or in "
                      f"[0, seqlen={hidden.shape[1]})")


def softmax_cross_entropy(logits, target, ignore_index, check_values=True):
    op = "softmax_cross_entropy"
    _tensor(op, "logits", logits)
    if logits.dim() != 2:
        _fail(op, f"logits must be 2-D [N, vocab], got shape {tuple(logits.shape)}")
    _float(op, "logits", logits)
    _tensor(op, "target", target)
    if target.dim() != 1 or target.shape[0] != logits.shape[0]:
        _fail(op, f"target must be 1-D [N] with N = {logits.shape[0]} (logits' rows), got shape "
                  f"{tuple(target.shape)}")
    if target.dtype != torch.int64:
        _fail(op, f"target must be int64 class indices, got {target.dtype}")
    _same_device(op, "target", target, "logits", logits)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        _fail(op, f"ignore_index must be an int, got {ignore_index!r}")
    if logits.shape[0] and _values_checked(target, check_values):
        v = logits.shape[1]
        bad = (target != ignore_index) & ((target < 0) | (target >= v))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            _fail(op, f"target[{i}] = {int(target[i])} is out of range: must be in [0, vocab={v}) or "
                      f"ignore_index={ignore_index}")
