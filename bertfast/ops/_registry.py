"""The one list of bertfast's ops. bertfast.ops builds its dispatch tables from it (which impls an op has, which is
fastest where) and the GPU-compile check builds its kernel list from it (kernels/_compile.py KERNEL_MODULES).

Adding an op: a line here; its eager version in bertfast/ops/reference.py (impl "torch"); its argument checks in
bertfast/ops/_checks.py; its public function in bertfast/ops/__init__.py; and, for a Triton op, the kernels and
launchers in kernels/<name>.py (with gpu_compile_cases) and the torch.library ops in bertfast/ops/_triton_<name>.py
(named bertfast::<op> and bertfast::<op>_backward), or, for an extension op, csrc/ (schema in ops.cpp, checks in
checks.h, CPU and CUDA kernels) and its wrapper in bertfast/ops/_ext.py.

This module imports nothing, so anything can read it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OpSpec:
    name: str
    gpu: str  # the impl "auto" picks on CUDA tensors
    cpu: str  # the impl "auto" picks on CPU tensors
    impls: dict  # impl ("triton" / "ext") -> module holding a function named `name`; "torch" is bertfast.ops.reference
    kernels: tuple = ()  # bertfast.kernels modules whose gpu_compile_cases cover the op's Triton kernels


OPS = (
    OpSpec("layer_norm", gpu="triton", cpu="torch", impls={"triton": "bertfast.ops._triton_norm"},
           kernels=("layer_norm",)),
    OpSpec("bias_gelu", gpu="triton", cpu="torch", impls={"triton": "bertfast.ops._triton_gelu"}, kernels=("gelu",)),
    OpSpec("attention", gpu="triton", cpu="torch", impls={"triton": "bertfast.ops._triton_attention"},
           kernels=("attention",)),
    OpSpec("varlen_attention", gpu="triton", cpu="torch", impls={"triton": "bertfast.ops._triton_attention"},
           kernels=("attention",)),
    OpSpec("mlm_gather", gpu="ext", cpu="ext", impls={"ext": "bertfast.ops._ext"}),
    OpSpec("softmax_cross_entropy", gpu="ext", cpu="ext", impls={"ext": "bertfast.ops._ext"}),
)
BY_NAME = {op.name: op for op in OPS}

# the Triton kernel modules (in bertfast.kernels) of all ops, in order, each once
KERNEL_MODULES = tuple(dict.fromkeys(k for op in OPS for k in op.kernels))
