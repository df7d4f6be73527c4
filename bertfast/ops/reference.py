"""Plain PyTorch versions of every bertfast op: the eager reference each kernel is tested against, and the
CPU path of the Triton ops. Half-precision inputs are computed in float32 and cast back once (the kernels'
accumulation contract); float32 and float64 inputs are computed in their own dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bertfast.kernels._launch import draw_seed, seed_tensor

_HALF = (torch.float16, torch.bfloat16)


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in _HALF else t


# Dropout masks come from a counter-based hash of (seed, element index), like the Triton kernels' Philox masks:
# no generator state is touched per element, so the mask is a pure function of one small seed tensor. That is what
# lets torch.compile fuse the draw into the kernel that applies it (measured on CPU, a [1664, 256] mask: 0.3 ms
# compiled vs 2.5 ms for rand_like + compare, which inductor cannot fuse), gives a compiled step the same masks as
# the eager one, and keeps a captured CUDA graph's masks fresh (the seed is drawn on the device).
_KEY_SALT = 0x2545F491  # separates the key's hash from the counters' (seed 0 must not give the identity key)
_BLOCK_WEYL = 0x61C88647  # steps the key for each further block of 2**_BLOCK_BITS elements (odd)
_BLOCK_BITS = 31  # counters are int32 (vectorised on CPU, 32-bit multiplies); larger tensors hash block by block


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons' hash prospector; shifts 16/15/16, multipliers 0x7feb352d, 0x846ca68b), a low-bias
    bijection of 32-bit words, applied IN PLACE to the int32 tensor h (a fresh one: in place, one allocation per
    shift instead of three per line; eager CPU, a [1664, 256] mask: 1.6 ms vs 2.3). int32 multiplications wrap;
    `>>` is arithmetic on int32, so each shift is masked to be a logical one."""
    h ^= (h >> 16).bitwise_and_(0xFFFF)
    h *= 0x7FEB352D
    h ^= (h >> 15).bitwise_and_(0x1FFFF)
    h *= -0x7B935975  # 0x846ca68b as a signed int32
    h ^= (h >> 16).bitwise_and_(0xFFFF)
    return h


def _keep(seed, shape, p: float, device) -> torch.Tensor:
    """int32 [shape], 1 where dropout keeps the element: the hash's top 24 bits (arithmetic >> 8) minus the
    threshold that leaves 1 - p of their 2**24 values, its sign turned into 0 / 1 by integer ops. No bool tensor on
    purpose: torch.compile's CPU code stores a bool mask computed from int32 lanes one byte at a time behind a
    data-dependent branch (measured: a third of a fused LayerNorm kernel's time on random masks)."""
    key = _mix32(seed_tensor(seed, device).to(torch.int32) ^ _KEY_SALT)  # (^ gives _mix32 a fresh tensor)
    n = 1
    for d in shape:
        n *= int(d)
    if n <= 1 << _BLOCK_BITS:
        counter = torch.arange(n, dtype=torch.int32, device=device)
    else:  # the first block hashes as above, each further one under its own key
        i = torch.arange(n, dtype=torch.int64, device=device)
        counter = (i & ((1 << _BLOCK_BITS) - 1)).to(torch.int32)
        key = key + (i >> _BLOCK_BITS).to(torch.int32) * _BLOCK_WEYL
    threshold = round(p * 2 ** 24) - 2 ** 23  # in [-2**23, 2**23]: the difference below cannot overflow int32
    top = _mix32(counter ^ key) >> 8  # in [-2**23, 2**23)
    return ((top - threshold) >> 31).add_(1).view(tuple(shape))  # >> 31: -1 below the threshold, else 0


def dropout_keep_mask(seed, shape, p: float, device=None) -> torch.Tensor:
    """The bool keep mask [shape] that dropout with this seed (a 0-dim integer tensor, e.g. draw_seed()'s, or an
    int) and probability p applies: element i is kept iff the top 24 bits of a 32-bit hash of (i, seed) reach the
    threshold that keeps 1 - p of their values (p's resolution 2**-24)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), got {p!r}")
    if device is None:
        device = seed.device if isinstance(seed, torch.Tensor) else "cpu"
    return _keep(seed, shape, p, torch.device(device)).bool()


def dropout(x, p: float, seed=None):
    """Inverted dropout: x * keep / (1 - p), keep = dropout_keep_mask(seed, x.shape, p). seed None draws one from
    torch's generator on x's device (draw_seed: torch.manual_seed repeats it, a checkpointed recomputation that
    restores the RNG state redraws the same). The gradient is the same mask times the same scale."""
    if seed is None:
        seed = draw_seed(x.device)
    return x * _keep(seed, x.shape, p, x.device).to(x.dtype).mul_(1.0 / (1.0 - p))


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
    if dropout_p > 0.0:
        # written out so the probabilities' dropout is this module's hash dropout (SDPA's would draw bernoulli_
        # from the generator: 2.7x the time of the hash on CPU, and not fusable by torch.compile)
        scale = softmax_scale if softmax_scale is not None else qt.shape[-1] ** -0.5
        scores = torch.matmul(qt, kt.transpose(-1, -2)) * scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.matmul(dropout(torch.softmax(scores, dim=-1), dropout_p), vt)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=softmax_scale)
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
