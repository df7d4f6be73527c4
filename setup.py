"""Build bertfast._C from csrc/ and install kernels/ as bertfast.kernels (see the note at setup() below).

When the CUDA kernels are compiled (measured on 2 cores: the C++ CPU kernels ~110 s of CPU time, the CUDA kernels
~60 s more, for two architectures):

  BERTFAST_CUDA=auto (default)  CUDA build when a CUDA toolkit is found, torch is a CUDA build, and either a GPU is
                                visible or TORCH_CUDA_ARCH_LIST is set (you asked for GPU code); CPU-only otherwise.
  BERTFAST_CUDA=1               CUDA build, GPU or not (CI does this so the .cu sources keep compiling); an error
                                without a toolkit or with a CPU-only torch.
  BERTFAST_CUDA=0               CPU-only build even with a GPU.
  CUDA_HOME / CUDA_PATH         where the toolkit lives (checked first; then /usr/local/cuda, then nvcc on PATH).
  TORCH_CUDA_ARCH_LIST          GPU architectures to compile for (default "8.0;9.0": A100 and H100/H200).
  MAX_JOBS                      parallel compile jobs for ninja.

Rebuilds: the object files live in build/temp-* (git-ignored) instead of the throw-away folder pip gives an
editable install, so ninja recompiles only the sources that changed; and each linked _C is kept in build/_C-cache/
under a hash of csrc/, the compile flags and the torch it was built against, so a reinstall with csrc/ unchanged
(`pip install -e ".[test]"` after `pip install -e .`, even in pip's isolated build environment, whose include paths
differ each time) copies it in seconds. `rm -rf build` forces a full rebuild.

A failed compile fails the install: there is no silent fallback to a package without _C.
"""
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"


def _is_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


_ON = ("1", "on", "true", "yes", "cuda")
_OFF = ("0", "off", "false", "no", "cpu")


def cuda_mode() -> str:
    mode = os.environ.get("BERTFAST_CUDA", "auto").strip().lower()
    if mode in _ON:
        return "1"
    if mode in _OFF:
        return "0"
    if mode != "auto":
        raise RuntimeError(f"BERTFAST_CUDA={mode!r}: use 0 (CPU-only build), 1 (compile the CUDA kernels) or auto "
                           "(CUDA when a GPU is visible or TORCH_CUDA_ARCH_LIST is set).")
    return "auto"


def find_cuda_home():
    """The CUDA toolkit root, or None when there is none.

    torch guesses CUDA_HOME from `which nvcc`; where nvcc is a wrapper script (/usr/local/bin/nvcc on the
    project's machines) that guess is /usr/local, which has no lib64/libcudart. So a candidate counts only if it
    holds bin/nvcc and include/cuda_runtime.h.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for cand in candidates:
        if _is_toolkit(cand):
            return os.path.realpath(cand)
    return None


def gpu_visible() -> bool:
    """A CUDA device node or nvidia-smi's answer; cheap, and does not initialise CUDA in the build process."""
    if glob.glob("/dev/nvidia[0-9]*"):
        return True
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
            return out.returncode == 0 and "GPU" in out.stdout
        except (OSError, subprocess.SubprocessError):
            return False
    return False


def choose_cuda_home():
    """(toolkit root or None for a CPU-only build, the reason as one line)."""
    mode = cuda_mode()
    if mode == "0":
        return None, "BERTFAST_CUDA=0"
    cuda_home = find_cuda_home()
    if mode == "1":
        if cuda_home is None:
            raise RuntimeError(
                "BERTFAST_CUDA=1 but no CUDA toolkit was found (looked at CUDA_HOME, CUDA_PATH, /usr/local/cuda, "
                "nvcc on PATH, /usr/local/cuda-*). Set CUDA_HOME to the toolkit root (the folder holding bin/nvcc), "
                "or BERTFAST_CUDA=0 for a CPU-only build.")
        return cuda_home, "BERTFAST_CUDA=1"
    if cuda_home is None:
        return None, "no CUDA toolkit found"
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return cuda_home, "TORCH_CUDA_ARCH_LIST is set"
    if gpu_visible():
        return cuda_home, "a GPU is visible"
    return None, "no GPU visible; BERTFAST_CUDA=1 or TORCH_CUDA_ARCH_LIST compiles the CUDA kernels anyway"


def extensions():
    cuda_home, why = choose_cuda_home()
    if cuda_home is not None:
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once, at import.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    if cuda_home is not None and torch.version.cuda is None:
        if cuda_mode() == "1":
            raise RuntimeError(f"BERTFAST_CUDA=1 but torch {torch.__version__} is a CPU-only build: "
                               "install a CUDA build of torch, or build with BERTFAST_CUDA=0.")
        cuda_home, why = None, f"torch {torch.__version__} is a CPU-only build"

    std = cxx_standard(torch)
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    opt = ["-O3"]
    cxx = opt + [std]
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for's OpenMP backend is inline in torch's headers: without -fopenmp the CPU kernels'
        # loops silently run on one thread. Links libgomp.so.1, the runtime torch itself loads.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    with_cuda = cuda_home is not None
    _write_build_info(torch, with_cuda, cuda_home, std)
    if with_cuda:
        nvcc = opt + [std, "--use_fast_math", "-lineinfo", "-DBERTFAST_WITH_CUDA"]
        ext = CUDAExtension("bertfast._C", cpp + cu, define_macros=[("BERTFAST_WITH_CUDA", None)],
                            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link)
    else:
        ext = CppExtension("bertfast._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    print(f"bertfast: building _C {'with CUDA from ' + cuda_home if with_cuda else 'CPU-only'} ({why})"
          f" against torch {torch.__version__}"
          + (f", archs {os.environ['TORCH_CUDA_ARCH_LIST']}" if with_cuda else ""), flush=True)
    return [ext], {"build_ext": cached_build_ext(torch, with_cuda)}


def cached_build_ext(torch, with_cuda):
    """torch's BuildExtension (ninja) with a build folder that outlives the install and a cache of linked _C's."""
    from torch.utils.cpp_extension import BuildExtension

    build_root = os.path.join(ROOT, "build")
    tag = f"{sysconfig.get_config_var('SOABI') or sys.implementation.cache_tag}-{'cuda' if with_cuda else 'cpu'}"

    class CachedBuildExtension(BuildExtension):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("use_ninja", True)
            super().__init__(*args, **kwargs)

        def finalize_options(self):
            super().finalize_options()
            # pip's editable install hands build_ext a temporary build_temp, deleted after the install: keep the
            # objects in the repo's git-ignored build/ instead, so ninja only recompiles what changed.
            self.build_temp = os.path.join(build_root, f"temp-{tag}")

        def build_extension(self, ext):
            out = self.get_ext_fullpath(ext.name)
            key = build_key(ext, torch)
            cached = os.path.join(build_root, "_C-cache", key, os.path.basename(out))
            if os.path.isfile(cached):
                os.makedirs(os.path.dirname(out), exist_ok=True)
                shutil.copy2(cached, out)
                os.utime(os.path.dirname(cached))  # recently used: the last entry prune_cache removes
                print(f"bertfast: csrc/ and torch unchanged since a previous build: reusing "
                      f"{os.path.relpath(cached, ROOT)} (rm -rf build/ to recompile)", flush=True)
                return
            start = time.monotonic()
            super().build_extension(ext)
            print(f"bertfast: compiled _C in {time.monotonic() - start:.0f} s", flush=True)
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            tmp = cached + f".tmp{os.getpid()}"
            shutil.copy2(out, tmp)
            os.replace(tmp, cached)
            prune_cache(os.path.join(build_root, "_C-cache"), keep=4)

    return CachedBuildExtension


def prune_cache(folder: str, keep: int) -> None:
    """Keeps the `keep` most recently built or reused entries of build/_C-cache (a CUDA _C is tens of MB)."""
    entries = sorted((os.path.join(folder, d) for d in os.listdir(folder)), key=os.path.getmtime, reverse=True)
    for old in entries[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def _compiler_version() -> str | None:
    """The first line of `$CXX --version` (after a compiler upgrade, a _C built by the old one is not reused)."""
    try:
        out = subprocess.run([os.environ.get("CXX", "c++"), "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def build_key(ext, torch) -> str:
    """What a linked _C depends on: every file in csrc/ (sources and headers), the compile and link settings,
    the torch it compiles against (version and git hash fix its headers), the Python ABI and the CUDA archs."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True)):
        if os.path.isfile(path):
            h.update(os.path.relpath(path, ROOT).encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read() + b"\0")
    settings = {
        "sources": sorted(ext.sources),
        "compile": ext.extra_compile_args, "link": ext.extra_link_args, "macros": ext.define_macros,
        "torch": torch.__version__, "torch_git": getattr(torch.version, "git_version", None),
        "torch_cuda": torch.version.cuda, "abi": sysconfig.get_config_var("EXT_SUFFIX"),
        "archs": os.environ.get("TORCH_CUDA_ARCH_LIST") if ext.sources and any(
            s.endswith(".cu") for s in ext.sources) else None,
        "cuda_home": os.environ.get("CUDA_HOME") if any(s.endswith(".cu") for s in ext.sources) else None,
        "compiler": _compiler_version(),
        "cc": os.environ.get("CC"), "cxx": os.environ.get("CXX"), "cflags": os.environ.get("CFLAGS"),
        "cxxflags": os.environ.get("CXXFLAGS"), "ldflags": os.environ.get("LDFLAGS"),
    }
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def cxx_standard(torch) -> str:
    """torch >= 2.10's headers require C++20 (ATen.h refuses older standards); older ones build with C++17."""
    from torch.utils.cpp_extension import include_paths

    with open(os.path.join(include_paths()[0], "ATen", "ATen.h")) as f:
        return "-std=c++20" if "C++20" in f.read() else "-std=c++17"


def _write_build_info(torch, with_cuda, cuda_home, std):
    """Records what _C was built against, so that bertfast can say so when it is imported by another torch."""
    with open(os.path.join(ROOT, "bertfast", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"WITH_CUDA = {with_cuda!r}\n")
        f.write(f"CUDA_HOME = {cuda_home!r}\n")
        f.write(f"CXX_STD = {std!r}\n")
        f.write(f"CUDA_ARCHS = {os.environ.get('TORCH_CUDA_ARCH_LIST') if with_cuda else None!r}\n")


if __name__ == "__main__":  # pip (setuptools.build_meta) and `python setup.py` run it so; tests import it
    ext_modules, cmdclass = extensions()

    # kernels/ is bertfast.kernels: a wheel copies it there (package_dir), and in a source tree the relative link
    # bertfast/kernels -> ../kernels makes it so for editable installs and for code run from the clone. kernels/
    # has no __init__.py on purpose: the repository root is on sys.path when Python runs from there, and a regular
    # package kernels/ would shadow Hugging Face's `kernels` distribution (which transformers imports); a folder
    # without __init__.py is only a namespace portion, which every installed package of that name outranks.
    setup(
        packages=find_packages(include=["bertfast", "bertfast.*"]) + ["bertfast.kernels"],
        package_dir={"bertfast.kernels": "kernels"},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
