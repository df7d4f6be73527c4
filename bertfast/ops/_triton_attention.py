"""Autograd-aware, torch.compile-traceable fused attention ops (Triton kernels in bertfast.kernels.attention).

Two torch.library custom ops, named as every bertfast op, serve both entry points (padded and varlen):
  bertfast::attention(q, k, v, key_padding_mask?, cu_seqlens?, max_seqlen, dropout_p, softmax_scale, seed?)
      -> (out, lse)
  bertfast::attention_backward(dout, q, k, v, out, lse, key_padding_mask?, cu_seqlens?, max_seqlen, dropout_p,
                               softmax_scale, seed?) -> (dq, dk, dv)
The forward's autograd formula (register_autograd) calls the backward op; only q, k, v, out and the float32
lse are saved (plus mask / cu_seqlens / seed), never anything of size seqlen x seqlen.

Dropout: the seed is `_launch.draw_seed()`, a 0-dim int64 CPU tensor from torch's default generator (so
`torch.manual_seed` makes runs reproducible; a tensor, not an int, so torch.compile traces the draw without a
graph break). The keep mask of a seed is `dropout_keep_mask(...)`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from bertfast.kernels import _launch
from bertfast.kernels import attention as _k
from bertfast.kernels._launch import draw_seed

__all__ = ["attention", "varlen_attention", "draw_seed", "dropout_keep_mask"]


def dropout_keep_mask(seed, dropout_p: float, batch: int, heads: int, max_seqlen: int, device="cpu") -> Tensor:
    """The kernels' keep mask for `seed` (int or draw_seed() tensor): bool [batch, heads, max_seqlen, max_seqlen],
    [b, h, i, j] = query i, key j (positions inside sequence b). For tests at small sizes."""
    return _k.dropout_keep_mask(_launch.seed_value(seed), dropout_p, batch, heads, max_seqlen, device=device)


@torch.library.custom_op("bertfast::attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], cu_seqlens: Optional[Tensor],
               max_seqlen: int, dropout_p: float, softmax_scale: float,
               seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _k.attention_forward(q, k, v, key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens,
                                max_seqlen=max_seqlen, dropout_p=dropout_p, softmax_scale=softmax_scale,
                                seed=_launch.seed_value(seed))


@attention_op.register_fake
def _(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed):
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if cu_seqlens is not None:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)  # [heads, total_tokens]
    else:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)  # [batch, heads, seqlen]
    return out, lse


@torch.library.custom_op("bertfast::attention_backward", mutates_args=())
def attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
               key_padding_mask: Optional[Tensor], cu_seqlens: Optional[Tensor], max_seqlen: int, dropout_p: float,
               softmax_scale: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    dk = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dv = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return _k.attention_backward(dout, q, k, v, out, lse, key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens,
                                 max_seqlen=max_seqlen, dropout_p=dropout_p, softmax_scale=softmax_scale,
                                 seed=_launch.seed_value(seed), dk=dk, dv=dv)


@attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed):
    return tuple(torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, cu_seqlens, seed)
    ctx.max_seqlen, ctx.dropout_p, ctx.softmax_scale = max_seqlen, dropout_p, softmax_scale


def _backward(ctx, dout, dlse):
    # lse is an auxiliary output for the backward: its gradient is ignored (it is never used downstream)
    q, k, v, out, lse, key_padding_mask, cu_seqlens, seed = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens, ctx.max_seqlen, ctx.dropout_p,
                            ctx.softmax_scale, seed)
    return dq, dk, dv, None, None, None, None, None, None


attention_op.register_autograd(_backward, setup_context=_setup_context)


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
    seed = draw_seed() if dropout_p > 0.0 else None
    out, _ = attention_op(q, k, v, key_padding_mask, None, q.shape[1], float(dropout_p), _scale(q, softmax_scale),
                        seed)
    return out


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, dropout_p: float = 0.0, softmax_scale=None):
    """Attention on unpadded tokens q, k, v [total_tokens, heads, head_dim]; sequence i is tokens
    cu_seqlens[i]:cu_seqlens[i+1] (int32), max_seqlen >= the longest sequence."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if cu_seqlens.dtype != torch.int32:
        cu_seqlens = cu_seqlens.to(torch.int32)
    seed = draw_seed() if dropout_p > 0.0 else None
    out, _ = attention_op(q, k, v, None, cu_seqlens, int(max_seqlen), float(dropout_p), _scale(q, softmax_scale),
                        seed)
    return out
