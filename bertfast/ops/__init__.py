"""bertfast's ops, each with an `impl` switch.

impl:
  "torch"  - the eager PyTorch reference (bertfast.ops.reference); runs everywhere.
  "triton" - the Triton kernels (layer_norm, bias_gelu, attention, varlen_attention). On CPU tensors they run
             in Triton's interpreter, which must be switched on with TRITON_INTERPRET=1 before triton is imported.
  "ext"    - the C++/CUDA extension bertfast._C (mlm_gather, softmax_cross_entropy); CPU and CUDA kernels.
  "auto"   - the fastest that runs on the tensors' device: on CUDA, Triton for the Triton ops and the extension
             for the extension ops; on CPU, the torch reference for the Triton ops and the extension's C++
             kernels for the extension ops.

Padded rows (issue 31): a batch's token count may be padded up to a fixed bucket, so the unpadded ops see rows
that belong to no sequence (rows t >= cu_seqlens[-1]). The contract, shared by every impl: row-wise ops
(layer_norm, bias_gelu) compute them like any row (finite in, finite out); varlen_attention writes zeros there,
gives them zero dq/dk/dv and lets no real row attend to them; so they add exactly nothing to the loss or to any
parameter's gradient. Every output element an op returns is written (never left as uninitialised memory).

Every op checks its arguments first, the same way whatever the impl (bertfast.ops._checks): a ValueError
(OpArgumentError) naming the argument. Checks of tensor contents (cu_seqlens, positions, targets) need a host sync
on a GPU: they always run on CPU tensors, and on CUDA tensors unless the op is called with check_values=False.
"""
from __future__ import annotations

import importlib

import torch

from bertfast.ops import reference
from bertfast.kernels._launch import triton_unavailable_reason
from bertfast.ops import _checks
from bertfast.ops._checks import OpArgumentError
from bertfast.ops._registry import BY_NAME as _OPS  # the one list of ops and their impls

IMPLS = ("auto", "triton", "ext", "torch")


def resolve_impl(op: str, impl: str, device: torch.device | str) -> str:
    """The concrete impl ("triton", "ext" or "torch") that `op` runs with for tensors on `device`."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    device = torch.device(device)
    spec = _OPS[op]
    if impl == "auto":
        return spec.gpu if device.type == "cuda" else spec.cpu
    if impl != "torch" and impl not in spec.impls:
        have = ["auto", "torch"] + list(spec.impls)
        raise ValueError(f"impl={impl!r} has no {op}; {op} runs with impl in {have}")
    if impl == "triton" and device.type == "cpu" and triton_unavailable_reason(device) is not None:
        raise RuntimeError(
            f"impl='triton' on CPU tensors ({op}) runs Triton's interpreter, which is off: set TRITON_INTERPRET=1 "
            "in the environment before triton is imported (before `import torch` is safest), or use impl='torch' "
            "/ impl='auto' on CPU.")
    return impl


def op_impl(op: str, impl: str) -> str:
    """The impl `op` gets from a model-wide choice: "triton" and "ext" apply to the ops that have them, and the
    other ops run as with "auto" (so impl="ext" means the extension's loss kernels plus the default elsewhere)."""
    if impl in ("triton", "ext") and impl not in _OPS[op].impls:
        return "auto"
    return impl


# (op, impl) -> the function that runs it, resolved once: no import inside an op call, which torch.compile cannot
# trace (a graph break per call). The reference and the extension's wrappers (light modules) are resolved here;
# the Triton ops' modules too where Triton can run (a GPU, or the interpreter on), so a compiled CUDA model breaks
# no graph on its first call (measured on fake CUDA tensors: 30 breaks otherwise); elsewhere on first use, as they
# import triton (~0.2 s), which would also fix the interpreter setting before a user sets TRITON_INTERPRET.
_BACKENDS = {(op, "torch"): getattr(reference, op) for op in _OPS}
_BACKENDS.update({(op, "ext"): getattr(importlib.import_module(spec.impls["ext"]), op)
                  for op, spec in _OPS.items() if "ext" in spec.impls})


def _backend(op: str, impl: str, name: str | None = None):
    """The function `name` (default: the op's own) of `op`'s `impl` module."""
    name = name or op
    fn = _BACKENDS.get((name, impl))
    if fn is None:
        fn = _BACKENDS[(name, impl)] = getattr(importlib.import_module(_OPS[op].impls[impl]), name)
    return fn


if triton_unavailable_reason("cuda") is None or triton_unavailable_reason("cpu") is None:
    for _op in (op for op, spec in _OPS.items() if "triton" in spec.impls):
        _backend(_op, "triton")
    _backend("varlen_attention", "triton", "varlen_attention_qkvpacked")


def describe(device: torch.device | str, impl: str = "auto") -> dict[str, str]:
    """{op: concrete impl} for tensors on `device` under the model-wide choice `impl` (see op_impl): what the
    trainer prints at start."""
    return {op: resolve_impl(op, op_impl(op, impl), device) for op in _OPS}


def layer_norm(x, weight, bias, eps: float = 1e-12, residual=None, *, x_bias=None, dropout_p: float = 0.0,
               impl: str = "auto"):
    """LayerNorm(dropout(x + x_bias) + residual) over the last dim; x_bias, dropout and residual optional."""
    _checks.layer_norm(x, weight, bias, eps, residual, x_bias, dropout_p)
    fn = _backend("layer_norm", resolve_impl("layer_norm", impl, x.device))
    return fn(x, weight, bias, eps, residual, x_bias=x_bias, dropout_p=dropout_p)


def bias_gelu(x, bias, *, impl: str = "auto"):
    """Exact (erf) GELU of x + bias, bias [x.shape[-1]] broadcast over the last dim; bias=None: GELU of x."""
    _checks.bias_gelu(x, bias)
    concrete = resolve_impl("bias_gelu", impl, x.device)
    if bias is None and concrete == "triton":
        bias = x.new_zeros(x.shape[-1])  # the kernel always adds a bias
    return _backend("bias_gelu", concrete)(x, bias)


def attention(q, k, v, key_padding_mask=None, dropout_p: float = 0.0, softmax_scale=None, *, impl: str = "auto"):
    """Bidirectional attention on [batch, seqlen, heads, head_dim]; mask True = real token."""
    _checks.attention(q, k, v, key_padding_mask, dropout_p, softmax_scale)
    fn = _backend("attention", resolve_impl("attention", impl, q.device))
    return fn(q, k, v, key_padding_mask, dropout_p, softmax_scale)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, dropout_p: float = 0.0, softmax_scale=None, *,
                     impl: str = "auto", check_values: bool = True):
    """Attention on unpadded tokens [rows, heads, head_dim], sequences delimited by cu_seqlens (int32, from 0,
    non-decreasing, cu_seqlens[-1] <= rows), max_seqlen >= the longest sequence. check_values=False skips the
    checks of cu_seqlens' contents on CUDA (a host sync); invalid contents are then undefined behaviour.

    Padded rows (every impl): rows t >= cu_seqlens[-1] are bucket padding (the collator pads the token count to a
    fixed bucket). Their output rows are written as zeros, their dq/dk/dv rows are zeros, no real row attends to
    them, and they add nothing to any gradient; their inputs must be finite."""
    _checks.varlen_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, check_values)
    fn = _backend("varlen_attention", resolve_impl("varlen_attention", impl, q.device))
    return fn(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale)


def varlen_attention_qkvpacked(qkv, cu_seqlens, max_seqlen: int, dropout_p: float = 0.0, softmax_scale=None, *,
                               impl: str = "auto", check_values: bool = True):
    """varlen_attention of q, k, v = qkv.unbind(-3), qkv [total_tokens, 3, heads, head_dim] (the fused QKV
    projection's output viewed per head, as the model builds it): the same impls (those of varlen_attention), the
    same result and padded-rows contract. With Triton, qkv's gradient is the backward kernel's one dq/dk/dv buffer
    itself; unbinding first would make autograd stack the three into a new tensor (a copy of qkv per layer)."""
    _checks.varlen_attention_qkvpacked(qkv, cu_seqlens, max_seqlen, dropout_p, softmax_scale, check_values)
    concrete = resolve_impl("varlen_attention", impl, qkv.device)
    if concrete == "triton":
        fn = _backend("varlen_attention", concrete, "varlen_attention_qkvpacked")
        return fn(qkv, cu_seqlens, max_seqlen, dropout_p, softmax_scale)
    q, k, v = qkv.unbind(-3)
    return _backend("varlen_attention", concrete)(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale)


def mlm_gather(hidden, positions, *, impl: str = "auto", check_values: bool = True):
    """hidden [B, S, H], positions int64 [B, P] (-1 unused) -> [B * P, H], zero rows for -1. check_values=False
    skips the range check of positions on CUDA (a host sync); the extension still asserts on the device."""
    _checks.mlm_gather(hidden, positions, check_values)
    return _backend("mlm_gather", resolve_impl("mlm_gather", impl, hidden.device))(hidden, positions)


def softmax_cross_entropy(logits, target, ignore_index: int = -100, *, impl: str = "auto",
                          check_values: bool = True):
    """Mean cross-entropy over the non-ignored rows of logits [N, V]; 0 (and zero gradients) if all ignored.
    check_values=False skips the range check of target on CUDA (a host sync); the kernels still assert there."""
    _checks.softmax_cross_entropy(logits, target, ignore_index, check_values)
    fn = _backend("softmax_cross_entropy", resolve_impl("softmax_cross_entropy", impl, logits.device))
    return fn(logits, target, ignore_index)


__all__ = ["IMPLS", "OpArgumentError", "resolve_impl", "op_impl", "describe", "layer_norm", "bias_gelu", "attention",
           "varlen_attention", "varlen_attention_qkvpacked", "mlm_gather", "softmax_cross_entropy"]
