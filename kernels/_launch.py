"""What the Triton launchers (layer_norm, gelu, attention) and their torch.library ops share, in one place:

  * where Triton can run (`triton_unavailable_reason`, `check_runnable`, `interpreter_on`) and the device guard
    every launch runs under (`device_guard`);
  * the dtype tables (`FLOAT_DTYPES`, `TL_PTR`, `TL_NAME`) and the usual SM counts (`DEFAULT_SMS`);
  * the specialisation Triton gives arguments at launch (`divisibility_attrs`: 16-byte aligned pointers and ints
    divisible by 16 get tt.divisibility=16), which the GPU-compile cases must reproduce;
  * dropout seeds (`draw_seed`, `seed_value`): one contract for every op;
  * argument helpers (`check_vector`, `as_rows`, `device_info`).
"""
from __future__ import annotations

import contextlib
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what every Triton kernel takes
TL_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}  # Triton signature types
TL_NAME = {dtype: ty[1:] for dtype, ty in TL_PTR.items()}  # "fp32", "fp16", "bf16"
# SM counts of the usual cards by compute capability, used when no device is at hand (compile cases, CPU).
DEFAULT_SMS = {70: 80, 75: 40, 80: 108, 86: 84, 89: 128, 90: 132, 100: 148, 120: 84}


def interpreter_on() -> bool:
    """Whether Triton's CPU interpreter is switched on (TRITON_INTERPRET, read before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_unavailable_reason(device: torch.device | str) -> str | None:
    """None when Triton kernels can run on tensors of `device` (CUDA, or CPU under the interpreter); otherwise
    what stops them and what to do, in words. The one rule behind check_runnable, bertfast.ops' impl choice, the
    trainer's --impl check and the tests' requires_triton marker."""
    device = torch.device(device)
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is available"
    if device.type == "cpu":
        return None if interpreter_on() else (
            "Triton on CPU tensors needs its interpreter: set TRITON_INTERPRET=1 before triton is imported "
            "(before `import torch` is safest), or move the tensors to a CUDA device")
    return f"tensors on {device} are not supported; use CUDA (or CPU with TRITON_INTERPRET=1)"


def draw_seed() -> torch.Tensor:
    """The Philox seed of one dropout draw: a 0-dim int64 CPU tensor from torch's default generator, so that
    torch.manual_seed makes runs repeatable. A tensor, not an int, so a custom op stays a function of its inputs
    (opcheck, torch.compile: no graph break) and the backward gets the same seed back. Tests re-seed torch, draw
    it, re-seed and call the op to know its mask."""
    return torch.randint(2 ** 31, (), dtype=torch.int64, device="cpu")


def seed_value(seed) -> int:
    """The int of a seed given as draw_seed()'s tensor, an int, or None (no dropout: 0)."""
    return 0 if seed is None else int(seed)


def divisibility_attrs(fn, signature: dict, ints: dict | None = None) -> dict:
    """Triton's launch-time specialisation in `ASTSource(attrs=...)` form, {(arg index,): [["tt.divisibility",
    16]]}: every pointer (the torch allocator's are 16-byte aligned) and every int argument named in `ints` whose
    value there is a multiple of 16 (strides, widths, sequence lengths). A GPU-compile case must carry it, or the
    check sees less vectorised loads than the launch runs."""
    ints = ints or {}
    return {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, ty in signature.items()
            if ty.startswith("*") or (name in ints and ints[name] % 16 == 0)}


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
    """A clear RuntimeError unless a Triton kernel can run on t's device (see triton_unavailable_reason)."""
    reason = triton_unavailable_reason(t.device)
    if reason is not None:
        raise RuntimeError(f"{what}: {reason}")


def check_vector(op: str, name: str, t: torch.Tensor | None, n: int, x: torch.Tensor) -> None:
    """A per-feature vector argument of `op` (a bias, a LayerNorm weight) must be 1-D of size n (x's last dim), of
    a supported dtype and on x's device; None passes (the argument was not given)."""
    if t is None:
        return
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{op}: {name} must be 1-D of size {n} (x's last dim), got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; use float32, float16 or bfloat16")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}; move it to {x.device}")


def as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """[..., N] -> [M, N] with a contiguous last dim (copies only if it has to)."""
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t.reshape(-1, n)
