"""Launcher helpers shared by the Triton ops (layer_norm, gelu, attention)."""
from __future__ import annotations

import contextlib
import os

import torch


def interpreter_on() -> bool:
    """Whether Triton's CPU interpreter is switched on (TRITON_INTERPRET, read before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def device_guard(t: torch.Tensor):
    """The context every Triton launch runs in: `torch.cuda.device(t.device)` for a CUDA tensor, nothing otherwise.

    Triton launches on the *current* CUDA device, not on the device of the tensors it is given: without this, a
    kernel on tensors of cuda:1 (a `--device cuda:1` run, a caller's process group without set_device) would run
    on cuda:0 against cuda:1's memory (an illegal address, or with peer access a silent race)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def device_info(t: torch.Tensor) -> tuple[int, int]:
    """(capability as major*10+minor, SM count) of t's device; CPU (the interpreter) gets (90, 4): a small grid
    keeps the interpreter's per-program overhead down."""
    if t.device.type == "cuda":
        props = torch.cuda.get_device_properties(t.device)
        return props.major * 10 + props.minor, props.multi_processor_count
    return 90, 4


def check_runnable(t: torch.Tensor, what: str) -> None:
    """A clear error unless a Triton kernel can run on t's device (CUDA, or CPU under the interpreter)."""
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu":
        if not interpreter_on():
            raise RuntimeError(f"{what}: Triton on CPU tensors needs its interpreter: set TRITON_INTERPRET=1 "
                               "before triton is imported, or move the tensors to a CUDA device")
        return
    raise RuntimeError(f"{what}: tensors on {t.device} are not supported; use CUDA (or CPU with TRITON_INTERPRET=1)")


def check_vector(op: str, name: str, t: torch.Tensor | None, n: int, x: torch.Tensor) -> None:
    """A per-feature vector argument of `op` (a bias, a LayerNorm weight) must be 1-D of size n (x's last dim), of
    a supported dtype and on x's device; None passes (the argument was not given)."""
    if t is None:
        return
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{op}: {name} must be 1-D of size {n} (x's last dim), got shape {tuple(t.shape)}")
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; use float32, float16 or bfloat16")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}; move it to {x.device}")


def as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """[..., N] -> [M, N] with a contiguous last dim (copies only if it has to)."""
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t.reshape(-1, n)
