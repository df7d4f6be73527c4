"""FLOP counts for MFU (model FLOPs utilisation): the work a training step must do, counting real tokens only
and the MLM head on the predicted rows only. Used by the trainer's logs and by the benchmarks.

Training (forward + backward = 3 x forward), 2 FLOPs per multiply-add, for L layers of width H, FFN width I,
vocabulary V:
    6 * tokens * L * (4H^2 + 2HI)      encoder matmuls (QKV 3H^2, attention output H^2, FFN in and out 2HI)
    + 12 * L * H * sum(len_i^2)        attention scores and values, each sequence against its own keys
    + 6 * mlm_rows * (H^2 + H*V)       MLM transform and tied decoder on the predicted rows
    + 6 * sequences * (H^2 + 2H)       pooler and NSP head
Embedding lookups, LayerNorm, GELU and softmax (memory-bound, few FLOPs) are not counted.
"""
from __future__ import annotations

# Dense peak FLOP/s per GPU (no sparsity): (16-bit tensor cores, fp32 without TF32), by a substring of the name.
PEAKS = {
    "H200": (989e12, 67e12), "H100": (989e12, 67e12), "A100": (312e12, 19.5e12), "L40S": (362e12, 91.6e12),
    "A10": (125e12, 31.2e12), "L4": (121e12, 30.3e12), "V100": (125e12, 15.7e12), "4090": (165e12, 82.6e12),
}


def training_flops(cfg, tokens: float, sum_len_sq: float, mlm_rows: float, sequences: float) -> float:
    """Training FLOPs of one step over `tokens` real tokens in `sequences` sequences (sum of squared lengths
    `sum_len_sq`) with `mlm_rows` predicted positions; the formula is in this module's docstring."""
    L, H, I, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    return (6.0 * tokens * L * (4 * H * H + 2 * H * I) + 12.0 * L * H * sum_len_sq
            + 6.0 * mlm_rows * (H * H + H * V) + 6.0 * sequences * (H * H + 2 * H))


def peak_flops(device_name: str, precision: str) -> float | None:
    """The card's dense peak for `precision` ("bf16"/"fp16" -> tensor cores, "fp32" -> plain fp32); None if the
    card is not in PEAKS."""
    for key, (half, fp32) in PEAKS.items():
        if key in device_name:
            return fp32 if precision == "fp32" else half
    return None
