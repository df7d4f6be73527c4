"""What the Triton launchers (layer_norm, gelu, attention) and their torch.library ops share, in one place:

  * where Triton can run (`triton_unavailable_reason`, `check_runnable`, `interpreter_on`) and the device guard
    every launch runs under (`device_guard`);
  * the dtype tables (`FLOAT_DTYPES`, `TL_PTR`, `TL_NAME`) and the usual SM counts (`DEFAULT_SMS`);
  * the specialisation Triton gives arguments at launch (`divisibility_attrs`: 16-byte aligned pointers and ints
    divisible by 16 get tt.divisibility=16), which the GPU-compile cases must reproduce;
  * dropout seeds (`draw_seed`, `seed_tensor`): device tensors read by the kernels, one contract for every op;
  * argument helpers (`check_vector`, `as_rows`, `device_info`).
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch._subclasses.fake_tensor import is_fake

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


def draw_seed(device: torch.device | str = "cpu") -> torch.Tensor:
    """The Philox seed of one dropout draw: a 0-dim int64 tensor ON `device` (the op's tensors' device), drawn by
    that device's own default generator (`torch.randint(..., device=device)`), and read by the kernels from device
    memory (`SEED` pointer), never as a host int. So:
      * CUDA-graph ready: the seed and the generator's offset live on the device and advance there; a captured step
        (torch.cuda.graph, torch.compile "reduce-overhead") replays the randint with fresh Philox offsets (torch's
        graph-safe CUDA generator), so every replay draws new masks; nothing is read back to the host;
      * torch.manual_seed (which seeds every device's generator) makes runs repeatable;
      * a tensor, not an int, so a custom op stays a function of its inputs (opcheck, torch.compile: no graph
        break) and the backward gets the same seed back.
    Tests re-seed torch, draw it, re-seed and call the op to know its mask."""
    return torch.randint(2 ** 31, (), dtype=torch.int64, device=device)


_NO_SEED: dict = {}


def seed_tensor(seed, device: torch.device) -> torch.Tensor:
    """The int64 0-dim seed tensor on `device` a kernel's SEED pointer reads: draw_seed()'s tensor as is (moved and
    cast only if it is elsewhere), an int as a new tensor (tests, dropout_keep_mask), None / 0 a zero tensor made
    once per device (the kernels without dropout never read it; a device-side fill, so CUDA-graph safe)."""
    device = torch.device(device)
    if isinstance(seed, torch.Tensor):
        if seed.device == device and seed.dtype == torch.int64:
            return seed
        return seed.to(device=device, dtype=torch.int64)
    if not seed:
        key = str(device)
        if key not in _NO_SEED:
            _NO_SEED[key] = torch.zeros((), dtype=torch.int64, device=device)
        return _NO_SEED[key]
    return torch.tensor(int(seed), dtype=torch.int64, device=device)


def seed_value(seed) -> int:
    """The int of a seed given as draw_seed()'s tensor, an int, or None (no dropout: 0). Reads a device tensor back
    to the host: for tests only (the launchers take the tensor itself)."""
    return 0 if seed is None else int(seed)


# Per-SM limits occupancy divides (CUDA C Programming Guide, "Technical Specifications per Compute Capability"):
# shared memory per SM (1 KiB of it reserved per block), warps and blocks per SM; 64K registers everywhere.
SMEM_PER_SM = {70: 96 * 1024, 75: 64 * 1024, 80: 164 * 1024, 86: 100 * 1024, 89: 100 * 1024, 90: 228 * 1024,
               100: 228 * 1024, 120: 100 * 1024}
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = {70: 64, 75: 32, 80: 64, 86: 48, 89: 48, 90: 64, 100: 64, 120: 48}
MAX_BLOCKS_PER_SM = {70: 32, 75: 16, 80: 32, 86: 16, 89: 24, 90: 32, 100: 32, 120: 24}


def blocks_per_sm(capability: int, registers: int | None, num_warps: int, shared: int = 0) -> int:
    """Resident blocks of one kernel per SM (>= 1): the least of what its registers (`registers` per thread,
    allocated per warp in units of 256), its shared memory (`shared` bytes per block + 1 KiB reserved), its warps
    and the per-SM block limit allow. registers None (not known: no GPU loaded the kernel) counts as the
    warps-only bound."""
    max_blocks = MAX_BLOCKS_PER_SM.get(capability, 32)
    by_warps = MAX_WARPS_PER_SM.get(capability, 64) // max(1, num_warps)
    by_regs = max_blocks
    if registers:
        regs_per_warp = -(-registers * 32 // 256) * 256
        by_regs = REGS_PER_SM // (regs_per_warp * max(1, num_warps))
    by_smem = SMEM_PER_SM.get(capability, 100 * 1024) // (shared + 1024) if shared else max_blocks
    return max(1, min(by_regs, by_warps, by_smem, max_blocks))


def persistent_programs(work_tiles: int, num_sms: int, resident_per_sm: int) -> int:
    """Programs of a persistent grid: one full wave (every SM filled to its occupancy, `resident_per_sm` blocks)
    and never more programs than tiles of work; at least 1."""
    return max(1, min(work_tiles, num_sms * max(1, resident_per_sm)))


_OCCUPANCY: dict = {}


def kernel_occupancy(fn, args: tuple, kwargs: dict, device: torch.device, capability: int) -> int | None:
    """Resident blocks per SM of `fn` compiled for these arguments (its registers and shared memory, read from
    Triton's compiled kernel: `warmup` compiles without launching, the handles give n_regs), cached per
    (kernel, device, constexprs, dtypes). None off CUDA (the interpreter has no registers) or when Triton does not
    say; the caller then falls back to `blocks_per_sm` without registers."""
    if device.type != "cuda":
        return None
    key = (getattr(fn, "__name__", repr(fn)), str(device), capability,
           tuple(sorted((k, v) for k, v in kwargs.items())),
           tuple(str(a.dtype) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args))
    if key not in _OCCUPANCY:
        _OCCUPANCY[key] = _measure_occupancy(fn, args, kwargs, capability)
    return _OCCUPANCY[key]


def _measure_occupancy(fn, args, kwargs, capability) -> int | None:
    try:
        kernel = fn.warmup(*args, grid=(1,), **kwargs)
        kernel._init_handles()
        n_regs, shared = int(kernel.n_regs), int(kernel.metadata.shared)
    except Exception:  # an older / newer Triton without these attributes: the warps-only bound
        return None
    if n_regs <= 0:
        return None
    return blocks_per_sm(capability, n_regs, int(kwargs.get("num_warps", 4)), shared)


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
    """A clear RuntimeError unless a Triton kernel can run on t's device (see triton_unavailable_reason). Tracing
    (torch.compile, or fake tensors: a fake-CUDA trace on a machine without a GPU) runs no kernel, so it passes:
    the check is eager-only, which also keeps it out of a compiled graph (is_fake would be a graph break)."""
    if torch.compiler.is_compiling() or is_fake(t):
        return
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
