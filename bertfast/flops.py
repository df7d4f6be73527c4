"""FLOP counts for MFU (model FLOPs utilisation), counting the work a step must do: real tokens only, and the
MLM decoder on the predicted rows only.

Per real token of a sequence of length n, forward, for L layers of width H and FFN width I:
    matmuls   2 * (3H*H + H*H + 2*H*I)      QKV, attention output, FFN in and out (2 FLOPs per multiply-add)
    attention 4 * n * H                     QK^T and P.V against the n keys of its own sequence
Per predicted (masked) position, forward: 2 * (H*H + H*V) for the MLM transform and the tied decoder.
Training (forward + backward) is 3x the forward. Embedding lookups, LayerNorm, GELU, softmax, the pooler and
the NSP head are left out (they are memory-bound and small), as in the usual MFU definition.
"""
from __future__ import annotations

from collections.abc import Sequence

# Dense tensor-core peak (no sparsity) in FLOP/s, by a substring of the device name: bf16/fp16, tf32.
_PEAKS = (("H200", 989e12, 494e12), ("H100", 989e12, 494e12), ("A100", 312e12, 156e12),
          ("L40S", 362e12, 183e12), ("A10", 125e12, 62e12))


def forward_flops(config, seqlens: Sequence[int], n_predicted: int) -> float:
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    per_token = 2 * (4 * h * h + 2 * h * i)
    tokens = sum(seqlens)
    attention = sum(4 * n * n * h for n in seqlens)
    head = 2 * (h * h + h * config.vocab_size) * n_predicted
    return layers * (per_token * tokens + attention) + head


def training_flops(config, seqlens: Sequence[int], n_predicted: int) -> float:
    """FLOPs of one forward + backward over a batch with these real sequence lengths."""
    return 3.0 * forward_flops(config, seqlens, n_predicted)


def peak_flops(device_name: str, dtype: str = "bf16") -> float | None:
    """The card's dense matmul peak for this dtype (bf16/fp16 or tf32 for fp32); None if unknown."""
    for key, half, tf32 in _PEAKS:
        if key.lower() in device_name.lower():
            return half if dtype in ("bf16", "fp16", "bfloat16", "float16") else tf32
    return None
