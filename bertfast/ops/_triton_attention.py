"""Autograd-aware, torch.compile-traceable fused attention ops (Triton kernels in bertfast.kernels.attention).

Three torch.library custom ops, named as every bertfast op, serve the entry points (padded and varlen):
  bertfast::attention(q, k, v, key_padding_mask?, cu_seqlens?, max_seqlen, dropout_p, softmax_scale, seed?)
      -> (out, lse)
  bertfast::attention_qkvpacked(qkv, key_padding_mask?, cu_seqlens?, max_seqlen, dropout_p, softmax_scale,
                                seed?) -> (out, lse)        (q, k, v = qkv.unbind(-3))
  bertfast::attention_backward(dout, q, k, v, out, lse, key_padding_mask?, cu_seqlens?, max_seqlen, dropout_p,
                               softmax_scale, seed?) -> dqkv [..., 3, heads, head_dim]
The forwards' autograd formulas (register_autograd) call the backward op; only q, k, v, out and the float32
lse are saved (plus mask / cu_seqlens / seed), never anything of size seqlen x seqlen. The backward writes dq, dk,
dv into one buffer laid out as the fused QKV projection's output: the packed op returns it as qkv's gradient
unchanged; the unpacked one returns its three unbind views (one storage, no copy).

Padding rows (issue 31): in varlen, q, k, v may carry T >= cu_seqlens[-1] rows; rows past cu_seqlens[-1] are
padding: their out rows are 0, lse +inf, dq/dk/dv rows 0, and no real row attends to them.

Dropout: the seed is `_launch.draw_seed(q.device)`, a 0-dim int64 tensor on q's device drawn by that device's
generator and read by the kernels from device memory (CUDA-graph ready: replays draw fresh masks; no host read;
`torch.manual_seed` makes runs reproducible; a tensor, so torch.compile traces the draw without a graph break).
The keep mask of a seed is `dropout_keep_mask(...)`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from bertfast.kernels import attention as _k
from bertfast.kernels._launch import draw_seed

__all__ = ["attention", "varlen_attention", "varlen_attention_qkvpacked", "draw_seed", "dropout_keep_mask"]


def dropout_keep_mask(seed, dropout_p: float, batch: int, heads: int, max_seqlen: int, device="cpu") -> Tensor:
    """The kernels' keep mask for `seed` (int or draw_seed() tensor): bool [batch, heads, max_seqlen, max_seqlen],
    [b, h, i, j] = query i, key j (positions inside sequence b). For tests at small sizes."""
    return _k.dropout_keep_mask(seed, dropout_p, batch, heads, max_seqlen, device=device)


@torch.library.custom_op("bertfast::attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], cu_seqlens: Optional[Tensor],
               max_seqlen: int, dropout_p: float, softmax_scale: float,
               seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _k.attention_forward(q, k, v, key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens,
                                max_seqlen=max_seqlen, dropout_p=dropout_p, softmax_scale=softmax_scale,
                                seed=seed)


@attention_op.register_fake
def _(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed):
    return _fake_forward(q, cu_seqlens)


def _fake_forward(q, cu_seqlens):
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if cu_seqlens is not None:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)  # [heads, total_tokens]
    else:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)  # [batch, heads, seqlen]
    return out, lse


@torch.library.custom_op("bertfast::attention_backward", mutates_args=())
def attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
               key_padding_mask: Optional[Tensor], cu_seqlens: Optional[Tensor], max_seqlen: int, dropout_p: float,
               softmax_scale: float, seed: Optional[Tensor]) -> Tensor:
    """dqkv [..., 3, heads, head_dim]: dq, dk, dv written by the kernels straight into one buffer, the layout of
    the fused QKV projection's output (a custom op's outputs may not alias, hence one tensor, unbound by the
    autograd formula into views)."""
    dqkv = torch.empty(_packed_shape(q), dtype=q.dtype, device=q.device)
    _k.attention_backward(dout, q, k, v, out, lse, key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens,
                          max_seqlen=max_seqlen, dropout_p=dropout_p, softmax_scale=softmax_scale,
                          seed=seed, dqkv=dqkv)
    return dqkv


def _packed_shape(q: Tensor) -> tuple:
    return tuple(q.shape[:-2]) + (3,) + tuple(q.shape[-2:])


@attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed):
    return q.new_empty(_packed_shape(q))


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, cu_seqlens, seed)
    ctx.max_seqlen, ctx.dropout_p, ctx.softmax_scale = max_seqlen, dropout_p, softmax_scale
    _no_zero_grads(ctx, lse)


def _no_zero_grads(ctx, lse):
    """lse is a statistic for the backward, never differentiated: marked so, and with materialize_grads off autograd
    does not build a zero-filled [heads, T] gradient for it in every backward (issue 26)."""
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    # lse is an auxiliary output for the backward: its gradient is ignored (it is never used downstream).
    # dq, dk, dv are views of one buffer (they share its storage: nothing is copied here)
    if dout is None:  # out took no part in the loss (materialize_grads is off)
        return (None,) * 9
    q, k, v, out, lse, key_padding_mask, cu_seqlens, seed = ctx.saved_tensors
    dqkv = attention_backward_op(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens, ctx.max_seqlen,
                                 ctx.dropout_p, ctx.softmax_scale, seed)
    dq, dk, dv = dqkv.unbind(-3)
    return dq, dk, dv, None, None, None, None, None, None


attention_op.register_autograd(_backward, setup_context=_setup_context)


# The packed entry: qkv [..., 3, heads, head_dim] is the fused QKV projection's output itself (bert.py's
# `.view(*lead, 3, H, D)`); its gradient is the backward op's buffer as is. With q, k, v = qkv.unbind(-3) passed
# to attention_op instead, autograd's UnbindBackward stacks dq, dk, dv into a new tensor (a copy of 3 x T x H x D).
@torch.library.custom_op("bertfast::attention_qkvpacked", mutates_args=())
def attention_qkvpacked_op(qkv: Tensor, key_padding_mask: Optional[Tensor], cu_seqlens: Optional[Tensor],
                           max_seqlen: int, dropout_p: float, softmax_scale: float,
                           seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    q, k, v = qkv.unbind(-3)
    return _k.attention_forward(q, k, v, key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens,
                                max_seqlen=max_seqlen, dropout_p=dropout_p, softmax_scale=softmax_scale,
                                seed=seed)


@attention_qkvpacked_op.register_fake
def _(qkv, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed):
    return _fake_forward(qkv.select(-3, 0), cu_seqlens)


def _packed_setup(ctx, inputs, output):
    qkv, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, key_padding_mask, cu_seqlens, seed)
    ctx.max_seqlen, ctx.dropout_p, ctx.softmax_scale = max_seqlen, dropout_p, softmax_scale
    _no_zero_grads(ctx, lse)


def _packed_backward(ctx, dout, dlse):
    if dout is None:  # out took no part in the loss (materialize_grads is off)
        return (None,) * 7
    qkv, out, lse, key_padding_mask, cu_seqlens, seed = ctx.saved_tensors
    q, k, v = qkv.unbind(-3)
    dqkv = attention_backward_op(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens, ctx.max_seqlen,
                                 ctx.dropout_p, ctx.softmax_scale, seed)
    return dqkv, None, None, None, None, None, None


attention_qkvpacked_op.register_autograd(_packed_backward, setup_context=_packed_setup)


def _scale(q: Tensor, softmax_scale) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)


def attention(q, k, v, key_padding_mask=None, dropout_p: float = 0.0, softmax_scale=None):
    """Bidirectional attention, q, k, v [batch, seqlen, heads, head_dim] (any strides, head_dim contiguous
    preferred), key_padding_mask bool [batch, seqlen] True = real token. Output [batch, seqlen, heads, head_dim]
    (contiguous), zeros at padded query rows."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        key_padding_mask = key_padding_mask.to(torch.bool)
    seed = draw_seed(q.device) if dropout_p > 0.0 else None
    out, _ = attention_op(q, k, v, key_padding_mask, None, q.shape[1], float(dropout_p), _scale(q, softmax_scale),
                        seed)
    return out


def varlen_attention_qkvpacked(qkv, cu_seqlens, max_seqlen: int, dropout_p: float = 0.0, softmax_scale=None):
    """varlen_attention of q, k, v = qkv.unbind(-3), qkv [total_tokens, 3, heads, head_dim] (the fused QKV
    projection's output viewed as bert.py does). The same result; qkv's gradient is the kernels' one dq/dk/dv
    buffer itself, where going through unbind would stack the three into a new tensor."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"qkv must be [total_tokens, 3, heads, head_dim], got shape {tuple(qkv.shape)}")
    if cu_seqlens.dtype != torch.int32:
        cu_seqlens = cu_seqlens.to(torch.int32)
    seed = draw_seed(qkv.device) if dropout_p > 0.0 else None
    out, _ = attention_qkvpacked_op(qkv, None, cu_seqlens, int(max_seqlen), float(dropout_p),
                                    _scale(qkv, softmax_scale), seed)
    return out


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, dropout_p: float = 0.0, softmax_scale=None):
    """Attention on unpadded tokens q, k, v [total_tokens, heads, head_dim]; sequence i is tokens
    cu_seqlens[i]:cu_seqlens[i+1] (int32), max_seqlen >= the longest sequence. total_tokens may exceed
    cu_seqlens[-1] (bucket padding, issue 31): rows t >= cu_seqlens[-1] are padding, no real row attends to them,
    their output rows and their dq / dk / dv rows are exact zeros."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if cu_seqlens.dtype != torch.int32:
        cu_seqlens = cu_seqlens.to(torch.int32)
    seed = draw_seed(q.device) if dropout_p > 0.0 else None
    out, _ = attention_op(q, k, v, None, cu_seqlens, int(max_seqlen), float(dropout_p), _scale(q, softmax_scale),
                        seed)
    return out
