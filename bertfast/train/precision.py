"""The `--precision` choices shared by pretraining, evaluation and fine-tuning: fp32, or torch.autocast to bf16 /
fp16 on the device (callers add a GradScaler for fp16)."""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # name -> autocast dtype (None: off)


def autocast(device_type: str, dtype: torch.dtype | None):
    """torch.autocast to `dtype` on `device_type`, or a no-op context for None (fp32)."""
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
