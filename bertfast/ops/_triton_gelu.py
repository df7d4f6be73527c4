"""Autograd-aware torch.library ops over the Triton bias + GELU kernels (bertfast.kernels.gelu).

Public (called by bertfast.ops with impl="triton"): bias_gelu(x, bias) = exact (erf) GELU of x + bias.

The custom ops, named as every bertfast op: `bertfast::bias_gelu` (forward) and `bertfast::bias_gelu_backward`
((dx, dbias)), each with `register_fake`; the forward's `register_autograd` calls the backward op; both only call
the plain launchers.
"""
from __future__ import annotations

import torch
from torch import Tensor

from bertfast.kernels import gelu as _gelu


@torch.library.custom_op("bertfast::bias_gelu", mutates_args=())
def bias_gelu_op(x: Tensor, bias: Tensor) -> Tensor:
    """gelu(x + bias), exact erf form."""
    return _gelu.bias_gelu_fwd(x, bias)


@bias_gelu_op.register_fake
def _(x, bias):
    return x.new_empty(x.shape)


@torch.library.custom_op("bertfast::bias_gelu_backward", mutates_args=())
def bias_gelu_backward_op(dy: Tensor, x: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """(dx, dbias) of bias_gelu_op."""
    return _gelu.bias_gelu_bwd(dy, x, bias)


@bias_gelu_backward_op.register_fake
def _(dy, x, bias):
    return x.new_empty(x.shape), bias.new_empty(bias.shape)


def _setup(ctx, inputs, output):
    x, bias = inputs
    ctx.save_for_backward(x, bias)


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    return bias_gelu_backward_op(dy, x, bias)


bias_gelu_op.register_autograd(_backward, setup_context=_setup)


def bias_gelu(x: Tensor, bias: Tensor) -> Tensor:
    """Exact (erf) GELU of x + bias, x [..., N], bias [N]; float32 / float16 / bfloat16, computed in float32."""
    _gelu.check_inputs(x, bias)
    return bias_gelu_op(x, bias)


__all__ = ["bias_gelu"]
