"""Build bertfast._C from csrc/ and install kernels/ as bertfast.kernels.

The extension is a CUDAExtension (csrc/*.cpp + csrc/*.cu) whenever a CUDA toolkit is found, GPU or not, and a
CppExtension (csrc/*.cpp only) otherwise. Environment switches:

  BERTFAST_CUDA=auto|1|0   auto (default): CUDA build when a toolkit is found; 1: require it (error if none);
                           0: CPU-only build even with a toolkit.
  CUDA_HOME / CUDA_PATH    where the toolkit lives (checked first; then /usr/local/cuda, then nvcc on PATH).
  TORCH_CUDA_ARCH_LIST     GPU architectures to compile for (default "8.0;9.0": A100 and H100/H200).
  MAX_JOBS                 parallel compile jobs for ninja.

A failed compile fails the install: there is no silent fallback to a package without _C.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"


def _is_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_home():
    """The CUDA toolkit root to build with, or None for a CPU-only build.

    torch guesses CUDA_HOME from `which nvcc`; where nvcc is a wrapper script (/usr/local/bin/nvcc on the
    project's machines) that guess is /usr/local, which has no lib64/libcudart. So a candidate counts only if it
    holds bin/nvcc and include/cuda_runtime.h.
    """
    mode = os.environ.get("BERTFAST_CUDA", "auto").strip().lower()
    if mode in ("0", "off", "false", "no", "cpu"):
        return None
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for cand in candidates:
        if _is_toolkit(cand):
            return os.path.realpath(cand)
    if mode in ("1", "on", "true", "yes", "cuda"):
        raise RuntimeError(
            "BERTFAST_CUDA=1 but no CUDA toolkit was found (looked at CUDA_HOME, CUDA_PATH, /usr/local/cuda, "
            f"nvcc on PATH: {candidates}). Set CUDA_HOME to the toolkit root (the folder holding bin/nvcc), "
            "or BERTFAST_CUDA=0 for a CPU-only build.")
    return None


def extensions():
    cuda_home = find_cuda_home()
    if cuda_home is not None:
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once, at import.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    if cuda_home is not None and torch.version.cuda is None:
        if os.environ.get("BERTFAST_CUDA", "auto").strip().lower() in ("1", "on", "true", "yes", "cuda"):
            raise RuntimeError(f"BERTFAST_CUDA=1 but torch {torch.__version__} is a CPU-only build: "
                               "install a CUDA build of torch, or build with BERTFAST_CUDA=0.")
        cuda_home = None

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
    print(f"bertfast: building _C {'with CUDA from ' + cuda_home if with_cuda else 'CPU-only'}"
          f" against torch {torch.__version__}"
          + (f", archs {os.environ['TORCH_CUDA_ARCH_LIST']}" if with_cuda else ""))
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


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


ext_modules, cmdclass = extensions()

setup(
    packages=find_packages(include=["bertfast", "bertfast.*"]) + ["bertfast.kernels"],
    package_dir={"bertfast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
