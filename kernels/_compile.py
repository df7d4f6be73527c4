"""Compile Triton kernels for real GPU targets (sm_80, sm_90) on a machine without a GPU, and inspect the result.

Every Triton kernel module in bertfast.kernels exposes `gpu_compile_cases(capability) -> list[dict]`, one dict per
launch configuration its launchers can pick at BERT shapes:

    {"name": str, "fn": <@triton.jit kernel>, "signature": {arg: "*fp16" | "i32" | "fp32" | "constexpr" ...},
     "constexprs": {arg: value}, "num_warps": int, "num_stages": int, "uses_mma": bool,
     "bytes": bytes moved per launch, "flops": flops per launch}

optional keys: "arg_values" ({int arg: its value at the case's shape}, so that the compile specialises exactly as
the launch does: 1 becomes a constexpr, multiples of 16 get tt.divisibility=16; without it every int argument is
taken as a multiple of 16 and every pointer as 16-byte aligned, see `specialise`), "attrs" (Triton's
specialisation attributes, {(arg_index,): [["tt.divisibility", 16]]}, replacing the computed ones), "options"
(extra compile options, e.g. {"maxnreg": 128}), "input_precision" ("ieee" when an fp32 tl.dot deliberately
avoids tf32, so that FFMA is expected instead of tensor cores), "dtype" (the tensor dtype, for the roofline).

`compile_case(case, capability)` compiles one case with `triton.compile(ASTSource(...), target=GPUTarget("cuda",
capability, 32))` and inspects it:
  - shared memory: Triton's dynamic allocation (`metadata.shared`) + the cubin's static shared memory, against the
    per-block limit of the target (sm_80: 163 KiB, sm_90: 227 KiB);
  - registers and spills: `ptxas -v` on the PTX (for the `.target` the PTX names, sm_90a on Hopper), cross-checked
    with `cuobjdump -res-usage` on Triton's own cubin (the one that would run);
  - tensor cores: `cuobjdump --dump-sass` on the cubin, counting HGMMA (Hopper warpgroup MMA) and HMMA (mma.sync).

Triton's interpreter (TRITON_INTERPRET=1, switched on by the test suite without a GPU) replaces `@triton.jit`
functions with interpreter objects that cannot be compiled. `compile_cases` therefore compiles in worker processes
started with the interpreter off, which re-import the kernel modules and find each kernel by module and name. It
also dedupes identical configurations (two BERT shapes often pick the same one) and compiles in parallel.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from bertfast.kernels._launch import MAX_BLOCKS_PER_SM, MAX_WARPS_PER_SM, REGS_PER_SM, SMEM_PER_SM
from bertfast.ops._registry import KERNEL_MODULES

# KERNEL_MODULES: the kernel modules (in bertfast.kernels) that provide gpu_compile_cases, from the op registry
# (bertfast/ops/_registry.py). A module whose file does not exist yet is simply absent; one that exists but fails
# to import is an error (raised, never skipped).

# Largest shared memory one block may use (opt-in, cudaFuncAttributeMaxDynamicSharedMemorySize), in bytes:
# CUDA C Programming Guide, "Technical Specifications per Compute Capability".
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
# Shared memory per SM (what occupancy divides): sm_80 164 KiB, sm_90 228 KiB; 1 KiB of it is reserved per block.
# One table for the report and the launchers' persistent grids (`_launch.blocks_per_sm` / `kernel_occupancy`).

REQUIRED_KEYS = ("name", "fn", "signature", "constexprs", "num_warps", "num_stages", "uses_mma", "bytes", "flops")

_MMA_RE = re.compile(r"\b(HGMMA|HMMA|IMMA|QGMMA)(\.[A-Za-z0-9_.]+)?")
_FFMA_RE = re.compile(r"\bFFMA\b")


@dataclasses.dataclass
class CompileResult:
    name: str                       # the case's name
    capability: int                 # 80, 90
    arch: str                       # what ptxas compiled for: sm_80, sm_90a
    ok: bool                        # compiled, and inspected, without an error
    error: str | None = None        # the exception text when not ok
    num_warps: int = 0
    num_stages: int = 0
    uses_mma: bool = False
    input_precision: str | None = None
    registers: int | None = None    # per thread, from ptxas -v
    cubin_registers: int | None = None  # per thread, from cuobjdump -res-usage on Triton's cubin
    spill_stores: int | None = None  # bytes, from ptxas -v
    spill_loads: int | None = None
    stack_bytes: int | None = None  # stack frame (local memory) per thread
    shared_bytes: int | None = None  # Triton's dynamic shared memory (metadata.shared)
    static_shared_bytes: int | None = None  # the cubin's static shared memory (barriers, ...)
    smem_limit: int = 0             # per block, on this target
    has_hgmma: bool = False
    has_hmma: bool = False
    mma_instructions: dict[str, int] = dataclasses.field(default_factory=dict)  # SASS opcode -> count
    ffma_count: int = 0
    n_regs: int | None = None       # Triton's metadata.n_regs (only filled when a GPU loads the kernel)
    blocks_per_sm: int | None = None  # occupancy limit from registers, shared memory and warps
    bytes: int = 0                  # moved per launch at the case's shape
    flops: int = 0                  # per launch
    dtype: str | None = None
    compile_seconds: float = 0.0
    cached_as: str | None = None    # the name of an identical case this result was copied from
    ptxas_report: str = ""

    @property
    def total_shared_bytes(self) -> int:
        return (self.shared_bytes or 0) + (self.static_shared_bytes or 0)

    @property
    def spills(self) -> int:
        return (self.spill_stores or 0) + (self.spill_loads or 0)

    def problems(self) -> list[str]:
        """What is wrong with this configuration, in words (empty when it is fine)."""
        if not self.ok:
            return [f"does not compile: {self.error}"]
        out = []
        if self.total_shared_bytes > self.smem_limit:
            out.append(f"shared memory {self.total_shared_bytes} B (dynamic {self.shared_bytes} + static "
                       f"{self.static_shared_bytes}) exceeds the {self.smem_limit} B per-block limit of sm_{self.capability}")
        if self.spills:
            out.append(f"register spills: {self.spill_stores} B stored, {self.spill_loads} B loaded "
                       f"({self.registers} registers/thread, {self.num_warps} warps)")
        out.extend(self.mma_problems())
        return out

    def mma_problems(self) -> list[str]:
        """Tensor-core policy: every tl.dot must run on tensor cores (HGMMA on sm_90, HMMA on sm_80), fp32 included
        (Triton's default input_precision is tf32); a case that asks for input_precision="ieee" must not."""
        found = ", ".join(f"{k} x{v}" for k, v in sorted(self.mma_instructions.items())) or "no MMA instructions"
        if not self.uses_mma:
            if self.mma_instructions:
                return [f"uses_mma=False but the SASS holds {found}: fix the case's flag"]
            return []
        if self.input_precision == "ieee":
            if self.mma_instructions:
                return [f"input_precision='ieee' but the SASS holds {found}"]
            if not self.ffma_count:
                return ["input_precision='ieee' but the SASS holds no FFMA"]
            return []
        if self.capability >= 90 and not self.has_hgmma:
            return [f"uses_mma=True but no HGMMA (warpgroup MMA) in the sm_90 SASS: {found}"]
        if self.capability < 90 and not self.has_hmma:
            return [f"uses_mma=True but no HMMA in the sm_{self.capability} SASS: {found}"]
        return []

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["total_shared_bytes"] = self.total_shared_bytes
        d["problems"] = self.problems()
        return d


# ----------------------------------------------------------------------------------------------- tools

def tool_path(name: str) -> str:
    """ptxas / cuobjdump: TRITON_<NAME>_PATH, then the copy in the triton wheel, then /usr/local/cuda/bin, PATH."""
    env = os.environ.get(f"TRITON_{name.upper()}_PATH")
    if env and os.path.isfile(env):
        return env
    import triton
    candidates = [os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name),
                  os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name),
                  os.path.join("/usr/local/cuda", "bin", name)]
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(f"{name} not found (looked in {candidates} and PATH); set TRITON_{name.upper()}_PATH")


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def ptxas_report(ptx: str, arch: str, workdir: str) -> str:
    """`ptxas -v` on the PTX, with the flags Triton's own ptxas call uses (-lineinfo; Triton >= 3.8 adds
    --regAllocOptLevel=2, which leaves the register count unchanged in our checks)."""
    src = os.path.join(workdir, "kernel.ptx")
    with open(src, "w") as f:
        f.write(ptx)
    cmd = [tool_path("ptxas"), "-lineinfo", "-v", f"--gpu-name={arch}", src, "-o", os.path.join(workdir, "ptxas.o")]
    p = _run(cmd)
    if p.returncode != 0:
        raise RuntimeError(f"ptxas failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr}{p.stdout}")
    return (p.stdout + p.stderr).strip()


def parse_ptxas(report: str) -> dict[str, int]:
    """Registers, spill bytes and stack frame from `ptxas -v` text (one kernel per PTX, as Triton emits)."""
    out = {"registers": None, "spill_stores": 0, "spill_loads": 0, "stack_bytes": 0}
    m = re.search(r"Used (\d+) registers", report)
    if m:
        out["registers"] = int(m.group(1))
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", report)
    if m:
        out["stack_bytes"], out["spill_stores"], out["spill_loads"] = (int(g) for g in m.groups())
    if out["registers"] is None:
        raise RuntimeError(f"could not read the register count from ptxas -v:\n{report}")
    return out


def cubin_inspect(cubin: bytes, workdir: str) -> dict[str, Any]:
    """SASS MMA/FFMA counts and resources (registers, stack, static shared) of a cubin: `cuobjdump -res-usage -sass`."""
    path = os.path.join(workdir, "kernel.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    p = _run([tool_path("cuobjdump"), "-res-usage", "-sass", path])
    if p.returncode != 0:
        raise RuntimeError(f"cuobjdump -res-usage -sass failed: {p.stderr}")
    mma: dict[str, int] = {}
    for m in _MMA_RE.finditer(p.stdout):
        key = m.group(1) + (m.group(2) or "")
        mma[key] = mma.get(key, 0) + 1
    usage = {}
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", p.stdout)
    if m:
        usage = dict(zip(("REG", "STACK", "SHARED", "LOCAL"), (int(g) for g in m.groups())))
    sass = p
    return {"mma": mma, "ffma": len(_FFMA_RE.findall(sass.stdout)), "usage": usage}


def blocks_per_sm(capability: int, registers: int, num_warps: int, shared: int) -> int:
    """Resident blocks per SM allowed by registers (allocated per warp in units of 256), shared memory and warps;
    0 when one block does not fit. The launchers' `_launch.blocks_per_sm` is the same rule (at least 1): the
    report's column is the occupancy a persistent grid (layer_norm / bias_gelu backward) is sized with on a GPU."""
    regs_per_warp = -(-registers * 32 // 256) * 256
    by_regs = REGS_PER_SM // max(1, regs_per_warp * num_warps)
    by_warps = MAX_WARPS_PER_SM.get(capability, 64) // num_warps
    smem_sm = SMEM_PER_SM.get(capability, SMEM_LIMIT.get(capability, 0))
    by_smem = smem_sm // (shared + 1024) if shared else MAX_BLOCKS_PER_SM.get(capability, 32)
    return min(by_regs, by_warps, by_smem, MAX_BLOCKS_PER_SM.get(capability, 32))


# ----------------------------------------------------------------------------------------------- cases

def validate_case(case: dict) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in case]
    if missing:
        raise ValueError(f"gpu_compile case {case.get('name', case)!r} lacks keys {missing}")
    sig, const = case["signature"], case["constexprs"]
    wrong = [k for k in const if sig.get(k) != "constexpr"]
    if wrong:
        raise ValueError(f"case {case['name']!r}: constexprs {wrong} must be 'constexpr' in the signature")
    unset = [k for k, v in sig.items() if v == "constexpr" and k not in const]
    if unset:
        raise ValueError(f"case {case['name']!r}: signature constexprs {unset} have no value in constexprs")


def case_dtype(case: dict) -> str | None:
    """The case's tensor dtype: its "dtype" key, else the type of its first fp16/bf16/fp32 pointer argument (the
    input; parameters and statistics are often float32 whatever the input is)."""
    if case.get("dtype"):
        d = str(case["dtype"]).replace("torch.", "")
        return {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}.get(d, d)
    for v in case["signature"].values():
        if isinstance(v, str) and v.startswith("*") and v[1:] in ("fp16", "bf16", "fp32"):
            return v[1:]
    return None


def _raw_fn(fn):
    """The Python function behind a JITFunction / InterpretedFunction."""
    return getattr(fn, "fn", fn)


def specialise(case: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as Triton's launcher would specialise a launch at the case's BERT shape.

    The launcher turns an int argument equal to 1 into a constexpr, and marks ints that are multiples of 16 and
    pointers that are 16-byte aligned with tt.divisibility=16 (which enables vectorised and async copies). With
    "arg_values" ({arg: int}) in the case, exactly that is done; an int without a value is assumed a multiple of 16
    (true of every size and stride at BERT-base/large shapes); every pointer is assumed aligned (torch allocations
    are). "attrs" in the case replaces the computed attributes."""
    fn = case["fn"]
    sig, const = dict(case["signature"]), dict(case["constexprs"])
    values = case.get("arg_values") or {}
    for k, v in values.items():
        if sig.get(k, "").lstrip("u").startswith("i") and isinstance(v, int) and not isinstance(v, bool) and v == 1:
            sig[k], const[k] = "constexpr", 1
    if case.get("attrs") is not None:
        return sig, const, case["attrs"]
    arg_names = list(getattr(fn, "arg_names", None) or sig.keys())
    attrs = {}
    for k, t in sig.items():
        if k not in arg_names or not isinstance(t, str):
            continue
        aligned = t.startswith("*") or (t.lstrip("u").startswith("i") and t != "i1" and
                                        (k not in values or int(values[k]) % 16 == 0))
        if aligned:
            attrs[(arg_names.index(k),)] = [["tt.divisibility", 16]]
    return sig, const, attrs


_INSPECT_VERSION = 1


def _inspect_dir() -> str:
    """Where ptxas/cuobjdump findings are kept, beside Triton's own cache (so clearing one clears the other)."""
    try:
        from triton import knobs
        base = knobs.cache.dir
    except (ImportError, AttributeError):
        base = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    return os.path.join(base, "bertfast_gpu_compile")


def _inspect_cached(compiled, ptx: str, arch: str, triton_report: str = "") -> tuple[str, dict]:
    """(ptxas -v text, cubin_inspect()) for a compiled kernel, cached by the hash of its PTX and cubin: a rerun
    with Triton's cache warm then runs neither ptxas nor cuobjdump. ``triton_report``: the log of Triton's own
    `ptxas -v` (the compile of the cubin that runs), used instead of a second ptxas run when it holds the counts."""
    import hashlib
    import json
    h = hashlib.sha256(ptx.encode() + compiled.asm["cubin"] + f"{arch}:{_INSPECT_VERSION}".encode()).hexdigest()
    path = os.path.join(_inspect_dir(), f"{h}.json")
    try:
        with open(path) as f:
            d = json.load(f)
        return d["ptxas"], d["cubin"]
    except (OSError, ValueError, KeyError):
        pass
    with tempfile.TemporaryDirectory(prefix="bertfast_gpu_compile_") as tmp:
        report = triton_report if re.search(r"Used \d+ registers", triton_report) else ptxas_report(ptx, arch, tmp)
        cub = cubin_inspect(compiled.asm["cubin"], tmp)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp_path = f"{path}.{os.getpid()}.tmp"
        with open(tmp_path, "w") as f:
            json.dump({"ptxas": report, "cubin": cub}, f)
        os.replace(tmp_path, path)
    except OSError:
        pass  # a read-only cache only costs time
    return report, cub


def _compile_with_ptxas_log(triton, src, target, options):
    """triton.compile, with the log of its own `ptxas -v` captured ("" when its cache answered, or a Triton
    without the knob): reusing it saves a second ptxas run per kernel."""
    import contextlib
    import io

    nvidia = getattr(getattr(triton, "knobs", None), "nvidia", None)
    if nvidia is None or not hasattr(nvidia, "dump_ptxas_log"):
        return triton.compile(src, target=target, options=options), ""
    out, before = io.StringIO(), nvidia.dump_ptxas_log
    nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(out):
            compiled = triton.compile(src, target=target, options=options)
    finally:
        nvidia.dump_ptxas_log = before
    return compiled, out.getvalue()


def compile_case(case: dict, capability: int) -> CompileResult:
    """Compiles one case for sm_<capability> in this process and inspects it (never raises for a kernel error:
    the result says ok=False and why). The case's fn must be a real JITFunction (interpreter off)."""
    t0 = time.perf_counter()
    res = CompileResult(name=case.get("name", "?"), capability=capability, arch=f"sm_{capability}", ok=False,
                        num_warps=int(case.get("num_warps", 4)), num_stages=int(case.get("num_stages", 3)),
                        uses_mma=bool(case.get("uses_mma", False)), input_precision=case.get("input_precision"),
                        smem_limit=SMEM_LIMIT.get(capability, 0), bytes=int(case.get("bytes", 0)),
                        flops=int(case.get("flops", 0)))
    try:
        validate_case(case)
        res.dtype = case_dtype(case)
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        fn = case["fn"]
        if not isinstance(fn, triton.runtime.jit.JITFunction):
            raise TypeError(f"{type(fn).__name__} is not a JITFunction: Triton's interpreter is on in this process "
                            "(TRITON_INTERPRET=1); use compile_cases(), which compiles without it")
        sig, const, attrs = specialise(case)
        src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
        options = {"num_warps": res.num_warps, "num_stages": res.num_stages, **(case.get("options") or {})}
        compiled, triton_report = _compile_with_ptxas_log(triton, src, GPUTarget("cuda", capability, 32), options)
        md = compiled.metadata
        res.shared_bytes = int(md.shared if hasattr(md, "shared") else md["shared"])
        n_regs = getattr(md, "n_regs", None)
        res.n_regs = int(n_regs) if isinstance(n_regs, int) and n_regs > 0 else None
        ptx = compiled.asm["ptx"]
        m = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.MULTILINE)
        res.arch = m.group(1) if m else res.arch
        res.ptxas_report, cub = _inspect_cached(compiled, ptx, res.arch, triton_report)
        info = parse_ptxas(res.ptxas_report)
        res.registers, res.spill_stores, res.spill_loads = info["registers"], info["spill_stores"], info["spill_loads"]
        res.stack_bytes = info["stack_bytes"]
        res.mma_instructions = cub["mma"]
        res.ffma_count = cub["ffma"]
        res.has_hgmma = any(k.startswith("HGMMA") for k in cub["mma"])
        res.has_hmma = any(k.startswith("HMMA") for k in cub["mma"])
        usage = cub["usage"]
        if usage:
            res.cubin_registers = usage["REG"]
            res.static_shared_bytes = usage["SHARED"]
            # Triton's cubin is what runs: if its stack differs from our ptxas run, trust the larger.
            res.stack_bytes = max(res.stack_bytes or 0, usage["STACK"])
        res.blocks_per_sm = blocks_per_sm(capability, res.cubin_registers or res.registers, res.num_warps,
                                          res.total_shared_bytes)
        res.ok = True
    except Exception as e:  # noqa: BLE001 - a kernel that does not compile is a result, reported by the caller
        res.error = f"{type(e).__name__}: {e}"
    res.compile_seconds = time.perf_counter() - t0
    return res


def case_modules() -> list[str]:
    """The kernel modules (full names) whose files exist in this package."""
    here = os.path.dirname(os.path.abspath(__file__))
    pkg = __name__.rsplit(".", 1)[0]
    return [f"{pkg}.{m}" for m in KERNEL_MODULES if os.path.isfile(os.path.join(here, f"{m}.py"))]


def module_cases(module_name: str, capability: int) -> list[dict]:
    """gpu_compile_cases(capability) of one module; import errors and a missing function raise."""
    mod = importlib.import_module(module_name)
    get = getattr(mod, "gpu_compile_cases", None)
    if get is None:
        raise AttributeError(f"{module_name} has no gpu_compile_cases(capability)")
    cases = list(get(capability))
    for c in cases:
        validate_case(c)
    return cases


def all_cases(capability: int) -> list[dict]:
    """Every case of every kernel module that exists (an existing module that fails to import raises)."""
    out = []
    for m in case_modules():
        out.extend(module_cases(m, capability))
    return out


# ----------------------------------------------------------------------------------------------- parallel, deduped

def _freeze(v):
    if isinstance(v, dict):
        return tuple(sorted((repr(k), _freeze(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    return repr(v)


def case_key(case: dict, capability: int) -> tuple:
    """Identical compiles have identical keys (the case's name, bytes and flops do not change the binary)."""
    fn = _raw_fn(case["fn"])
    return (capability, fn.__module__, fn.__qualname__, _freeze(case["signature"]), _freeze(case["constexprs"]),
            int(case["num_warps"]), int(case["num_stages"]), _freeze(case.get("attrs")), _freeze(case.get("options")),
            _freeze(case.get("arg_values")))


def _portable(case: dict) -> dict:
    """The case with its kernel replaced by a reference (module, file, name) a worker process can import."""
    fn = _raw_fn(case["fn"])
    mod = sys.modules.get(fn.__module__)
    out = {k: v for k, v in case.items() if k != "fn"}
    out["fn_ref"] = (fn.__module__, getattr(mod, "__file__", None), fn.__name__)
    return out


def _resolve(fn_ref):
    module, path, name = fn_ref
    if module in sys.modules:
        mod = sys.modules[module]
    else:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            if not path:
                raise
            spec = importlib.util.spec_from_file_location(module, path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[module] = mod
            spec.loader.exec_module(mod)
    fn = getattr(mod, name)
    if _raw_fn(fn).__name__ != name:
        raise LookupError(f"{module}.{name} is not the kernel {name}")
    return fn


def _worker_compile(pcase: dict, capability: int) -> CompileResult:
    try:
        case = dict(pcase)
        case["fn"] = _resolve(case.pop("fn_ref"))
    except Exception as e:  # noqa: BLE001
        return CompileResult(name=pcase.get("name", "?"), capability=capability, arch=f"sm_{capability}", ok=False,
                             error=f"could not import the kernel {pcase.get('fn_ref')}: {type(e).__name__}: {e}",
                             smem_limit=SMEM_LIMIT.get(capability, 0))
    return compile_case(case, capability)


def _serve() -> None:
    """Worker loop: reads (sys.path) then (case, capability) pickles on stdin, writes CompileResult pickles.

    The protocol owns the original stdout; anything the compiler prints goes to stderr instead."""
    import pickle
    proto_in = sys.stdin.buffer
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for p in reversed(pickle.load(proto_in)):
        if p not in sys.path:
            sys.path.insert(0, p)
    while True:
        try:
            job = pickle.load(proto_in)
        except EOFError:
            return
        if job is None:
            return
        pickle.dump(_worker_compile(*job), proto_out)
        proto_out.flush()


def _interpreter_on() -> bool:
    from bertfast.kernels._launch import interpreter_on

    return interpreter_on()


def _compile_in_workers(jobs: list[tuple[dict, int]], workers: int) -> list[CompileResult]:
    """Compiles jobs in `workers` Python subprocesses started with Triton's interpreter off; each takes the next
    job from a shared queue."""
    import pickle
    import queue
    import threading

    todo: queue.Queue = queue.Queue()
    for i, (case, cap) in enumerate(jobs):
        todo.put((i, _portable(case), cap))
    out: list[CompileResult | None] = [None] * len(jobs)
    errors: list[str] = []
    env = dict(os.environ, TRITON_INTERPRET="0")

    def run_worker():
        proc = subprocess.Popen([sys.executable, "-c", f"from {__name__} import _serve; _serve()"], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            pickle.dump(list(sys.path), proc.stdin)
            proc.stdin.flush()
            while True:
                try:
                    i, pcase, cap = todo.get_nowait()
                except queue.Empty:
                    break
                pickle.dump((pcase, cap), proc.stdin)
                proc.stdin.flush()
                try:
                    out[i] = pickle.load(proc.stdout)
                except EOFError:
                    errors.append(f"compile worker died on {pcase.get('name')} (sm_{cap}); see stderr")
                    out[i] = CompileResult(name=pcase.get("name", "?"), capability=cap, arch=f"sm_{cap}", ok=False,
                                           error="the compile worker process died", smem_limit=SMEM_LIMIT.get(cap, 0))
                    return
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass
            proc.wait(timeout=60)

    threads = [threading.Thread(target=run_worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # a worker that died leaves jobs behind: compile them in a fresh one
    left = [(i, j) for i, j in enumerate(jobs) if out[i] is None]
    if left and not errors:
        raise RuntimeError("compile workers finished without compiling every job")
    if left:
        redo = _compile_in_workers([j for _, j in left], 1) if len(left) < len(jobs) else []
        for (i, _), r in zip(left, redo):
            out[i] = r
        for i, r in enumerate(out):
            if r is None:
                case, cap = jobs[i]
                out[i] = CompileResult(name=case["name"], capability=cap, arch=f"sm_{cap}", ok=False,
                                       error="; ".join(errors), smem_limit=SMEM_LIMIT.get(cap, 0))
    return out  # type: ignore[return-value]


def compile_cases(cases: list[dict], capabilities=(90,), workers: int | None = None) -> list[CompileResult]:
    """Compiles every case for every capability; results in order (case-major, then capability)."""
    if isinstance(capabilities, int):
        capabilities = (capabilities,)
    return compile_pairs([(case, cap) for case in cases for cap in capabilities], workers)


def compile_pairs(pairs: list[tuple[dict, int]], workers: int | None = None) -> list[CompileResult]:
    """Compiles each (case, capability) pair; results in the same order.

    Identical configurations compile once (the copy names the original in `cached_as`). With the interpreter on,
    or workers > 1, the compiles run in worker subprocesses with TRITON_INTERPRET=0; otherwise in this process.
    Triton's cache (~/.triton/cache, TRITON_CACHE_DIR) makes a second run cheap; ptxas -v and cuobjdump rerun."""
    jobs: dict[tuple, tuple[dict, int]] = {}
    order: list[tuple[dict, int, tuple]] = []
    for case, cap in pairs:
        validate_case(case)
        key = case_key(case, cap)
        jobs.setdefault(key, (case, cap))
        order.append((case, cap, key))
    # the heaviest (matmul) compiles first, so that the workers finish together
    keys = sorted(jobs, key=lambda k: not jobs[k][0].get("uses_mma"))
    if workers is None:
        workers = int(os.environ.get("BERTFAST_COMPILE_WORKERS", min(2, os.cpu_count() or 1)))
    workers = max(1, min(workers, len(keys)))
    if not keys:
        done = []
    elif not _interpreter_on() and workers == 1:
        done = [compile_case(*jobs[k]) for k in keys]
    else:
        done = _compile_in_workers([jobs[k] for k in keys], workers)
    by_key = dict(zip(keys, done))
    results = []
    for case, cap, key in order:
        r = by_key[key]
        if r.name != case["name"]:
            r = dataclasses.replace(r, name=case["name"], cached_as=r.name, bytes=int(case.get("bytes", 0)),
                                    flops=int(case.get("flops", 0)), uses_mma=bool(case.get("uses_mma", False)),
                                    input_precision=case.get("input_precision"), dtype=case_dtype(case),
                                    compile_seconds=0.0)
        results.append(r)
    return results


# ----------------------------------------------------------------------------------------------- roofline

# H100 SXM5 (the GPU the project is tuned for): HBM3 3.35 TB/s; dense tensor-core rates 989 TFLOP/s fp16/bf16,
# ~495 TFLOP/s tf32; 67 TFLOP/s fp32 on the CUDA cores (FFMA), which elementwise/reduction kernels use.
H100 = {"bandwidth": 3.35e12, "mma_fp16": 989e12, "mma_tf32": 495e12, "fp32": 67e12}


def roofline(result: CompileResult, gpu: dict = H100) -> dict[str, Any]:
    """Time the case's bytes and FLOPs imply on the GPU: max(bytes / bandwidth, flops / peak)."""
    if result.uses_mma and result.input_precision != "ieee":
        peak = gpu["mma_tf32"] if result.dtype == "fp32" else gpu["mma_fp16"]
    else:
        peak = gpu["fp32"]
    t_mem = result.bytes / gpu["bandwidth"]
    t_math = result.flops / peak if result.flops else 0.0
    return {"t_mem_us": t_mem * 1e6, "t_math_us": t_math * 1e6, "t_us": max(t_mem, t_math) * 1e6,
            "bound": "memory" if t_mem >= t_math else "compute", "peak_flops": peak,
            "intensity": (result.flops / result.bytes) if result.bytes else None}
