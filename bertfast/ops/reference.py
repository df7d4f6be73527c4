"""Plain PyTorch versions of every bertfast op: the eager reference each kernel is tested against, and the
CPU path of the Triton ops. Half-precision inputs are computed in float32 and cast back once (the kernels'
accumulation contract); float32 and float64 inputs are computed in their own dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F

_HALF = (torch.float16, torch.bfloat16)


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in _HALF else t


def dropout(x, p: float):
    """Inverted dropout with a keep mask from uniform draws: the same distribution as F.dropout, about 2.5x
    faster on CPU (uniform_ is vectorised, bernoulli_ is not). The draws become the scaled mask in place (no bool
    tensor and no cast: ~1.3x faster than building the mask as bool), so the gradient is the same mask times the
    same scale."""
    return x * torch.rand_like(x).ge_(p).mul_(1.0 / (1.0 - p))


def layer_norm(x, weight, bias, eps: float = 1e-12, residual=None, *, x_bias=None, dropout_p: float = 0.0):
    """LayerNorm(dropout(x + x_bias) + residual) over the last dim."""
    h = _acc(x)
    if x_bias is not None:
        h = h + _acc(x_bias)
    if dropout_p > 0.0:
        h = dropout(h, dropout_p)
    if residual is not None:
        h = h + _acc(residual)
    out = F.layer_norm(h, (h.shape[-1],), _acc(weight), _acc(bias), eps)
    return out.to(x.dtype)


def bias_gelu(x, bias):
    """Exact (erf) GELU of x + bias (of x alone when bias is None)."""
    return F.gelu(_acc(x) if bias is None else _acc(x) + _acc(bias)).to(x.dtype)


def attention(q, k, v, key_padding_mask=None, dropout_p: float = 0.0, softmax_scale=None):
    """Bidirectional attention. q, k, v [B, S, H, D]; key_padding_mask bool [B, S], True = real token.

    Output [B, S, H, D], zero at padded query rows. A fully padded sequence gives zeros, not NaN: its keys are
    all unmasked (instead of all masked, which would make the softmax 0/0) and its rows are then zeroed.
    """
    b, s, h, d = q.shape
    qt, kt, vt = (_acc(t).transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
    mask = None
    if key_padding_mask is not None:
        keep = key_padding_mask.to(torch.bool)
        empty = ~keep.any(dim=1, keepdim=True)  # [B, 1]
        mask = (keep | empty)[:, None, None, :]  # [B, 1, 1, S], True = attend
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, dropout_p=dropout_p, scale=softmax_scale)
    out = out.transpose(1, 2)  # [B, S, H, D]
    if key_padding_mask is not None:
        out = out * key_padding_mask.to(out.dtype)[:, :, None, None]
    return out.to(q.dtype)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, dropout_p: float = 0.0, softmax_scale=None):
    """Attention on unpadded tokens q, k, v [T, H, D]; sequence i is tokens cu_seqlens[i]:cu_seqlens[i+1].
    Rows t >= cu_seqlens[-1] are bucket padding: zero output, zero gradient, attended by nobody.

    The reference pads into [batch, max_seqlen] (bertfast.ops.padding, which drops the padding rows) and calls
    `attention`; unpadding gives the padding rows zeros."""
    from bertfast.ops import padding  # (the file above this function is the ops' pure reference; padding is a leaf)

    layout = padding.layout_from_cu_seqlens(cu_seqlens, max_seqlen, q.shape[0])
    mask = torch.arange(max_seqlen, device=q.device)[None, :] < layout.seqlens[:, None]  # [B, S]
    out = attention(layout.pad(q), layout.pad(k), layout.pad(v), mask, dropout_p, softmax_scale)
    return layout.unpad(out)


def mlm_gather(hidden, positions):
    """hidden [B, S, H], positions int64 [B, P] (-1 = unused) -> [B * P, H] with zero rows for unused slots."""
    b, s, h = hidden.shape
    valid = positions >= 0
    rows = positions.clamp(min=0) + torch.arange(b, device=hidden.device)[:, None] * s  # [B, P]
    out = hidden.reshape(b * s, h).index_select(0, rows.reshape(-1))  # [B * P, H]
    return torch.where(valid.reshape(-1, 1), out, out.new_zeros(()))


def softmax_cross_entropy(logits, target, ignore_index: int = -100):
    """Mean cross-entropy over the rows of logits [N, V] whose target is not ignore_index; 0 if there are none."""
    target = target.to(torch.int64)
    total = F.cross_entropy(_acc(logits), target, ignore_index=ignore_index, reduction="sum")
    count = (target != ignore_index).sum().clamp(min=1)
    return total / count
