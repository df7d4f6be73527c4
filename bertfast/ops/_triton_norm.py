"""Autograd-aware torch.library ops over the Triton LayerNorm kernels (bertfast.kernels.layer_norm).

Public (called by bertfast.ops with impl="triton"):
    layer_norm(x, weight, bias, eps, residual, x_bias=None, dropout_p=0.0)
        = LayerNorm(dropout(x + x_bias) + residual) over the last dim
and for tests: draw_seed() / dropout_keep_mask(seed, shape, p), which give the exact dropout mask a call uses.

The custom ops, named as every bertfast op: `bertfast::layer_norm` (forward: y, mean, rstd) and
`bertfast::layer_norm_backward`, each with `register_fake` (so torch.compile traces it as one opaque node); the
forward's `register_autograd` calls the backward op; both only call the plain launchers.

Dropout: the seed of the Philox keep-mask is `_launch.draw_seed(x.device)` (a 0-dim int64 tensor on x's device
from that device's generator, read by the kernels from device memory: CUDA-graph ready, no host read, and
torch.manual_seed makes runs repeatable); the backward receives it again to regenerate the same mask; no mask is
stored.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from bertfast.kernels import layer_norm as _ln
from bertfast.kernels._launch import draw_seed

MAX_WIDTH = _ln.MAX_WIDTH


def dropout_keep_mask(seed, shape, dropout_p: float, device="cpu") -> Tensor:
    """The bool keep-mask layer_norm applies with this seed (an int or draw_seed()'s tensor) to an x of `shape`;
    kept elements are scaled by 1 / (1 - dropout_p). Runs the kernels' own mask code."""
    return _ln.dropout_keep_mask(seed, shape, dropout_p, device)


# ----------------------------------------------------------------------------------------------------------------
# LayerNorm
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("bertfast::layer_norm", mutates_args=())
def layer_norm_op(x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor], x_bias: Optional[Tensor],
                  seed: Optional[Tensor], eps: float, dropout_p: float) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd): y = LayerNorm(dropout(x + x_bias) + residual); dropout only when seed is given."""
    p = dropout_p if seed is not None else 0.0
    return _ln.layer_norm_fwd(x, weight, bias, eps, residual, x_bias, p, seed)


@layer_norm_op.register_fake
def _(x, weight, bias, residual, x_bias, seed, eps, dropout_p):
    stats = x.shape[:-1]
    return (x.new_empty(x.shape), x.new_empty(stats, dtype=torch.float32), x.new_empty(stats, dtype=torch.float32))


@torch.library.custom_op("bertfast::layer_norm_backward", mutates_args=())
def layer_norm_backward_op(dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
                           residual: Optional[Tensor], x_bias: Optional[Tensor], seed: Optional[Tensor],
                           dropout_p: float, need_dresidual: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dresidual, dweight, dbias, dx_bias) of layer_norm_op.

    A custom op's outputs may not alias each other, so where there is nothing separate to return the slot holds
    an empty tensor: dresidual is empty unless dropout is on, residual given and need_dresidual (otherwise the
    residual's gradient is dx itself, or not needed); dx_bias is empty without x_bias."""
    p = dropout_p if seed is not None else 0.0
    dx, dres, dw, db, dxb = _ln.layer_norm_bwd(dy, x, weight, mean, rstd, residual, x_bias, p,
                                               seed, need_dresidual)
    empty = x.new_empty(0)
    dres = dres if (dres is not None and dres is not dx) else empty
    return dx, dres, dw, db, dxb if dxb is not None else empty.clone()


@layer_norm_backward_op.register_fake
def _(dy, x, weight, mean, rstd, residual, x_bias, seed, dropout_p, need_dresidual):
    n = x.shape[-1]
    separate_dres = seed is not None and dropout_p > 0.0 and residual is not None and need_dresidual
    return (x.new_empty(x.shape), x.new_empty(x.shape if separate_dres else (0,)), weight.new_empty(n),
            weight.new_empty(n), x_bias.new_empty(n) if x_bias is not None else x.new_empty(0))


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, residual, x_bias, seed, eps, dropout_p = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd, residual, x_bias, seed)
    # mean and rstd are statistics for the backward, never differentiated: without this, autograd builds two
    # zero-filled [rows] gradients for them in every backward (issue 26)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)
    ctx.dropout_p = dropout_p if seed is not None else 0.0
    ctx.bias_dtype = bias.dtype


def _layer_norm_backward(ctx, dy, dmean, drstd):
    # mean and rstd are saved statistics, not differentiable outputs: their gradients are ignored
    if dy is None:  # y took no part in the loss (materialize_grads is off)
        return (None,) * 8
    x, weight, mean, rstd, residual, x_bias, seed = ctx.saved_tensors
    need_dres = residual is not None and ctx.needs_input_grad[3]
    dx, dres, dw, db, dxb = layer_norm_backward_op(dy, x, weight, mean, rstd, residual, x_bias, seed, ctx.dropout_p,
                                                   need_dres)
    if residual is None or not need_dres:
        dres = None
    elif ctx.dropout_p == 0.0:
        dres = dx  # d residual == d h == dx without dropout
    return (dx, dw, db.to(ctx.bias_dtype), dres, dxb if x_bias is not None else None, None, None, None)


layer_norm_op.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-12, residual: Optional[Tensor] = None,
               x_bias: Optional[Tensor] = None, dropout_p: float = 0.0) -> Tensor:
    """LayerNorm(dropout(x + x_bias) + residual) over the last dim, x [..., N] (N <= MAX_WIDTH), in one pass.

    float32 / float16 / bfloat16 (computed in float32, stored in x's dtype); weight, bias and x_bias [N] of any
    of those dtypes; residual like x. dropout_p > 0 draws a seed from torch's generator (see draw_seed)."""
    _ln.check_inputs(x, weight, bias, residual, x_bias, dropout_p)
    seed = draw_seed(x.device) if dropout_p > 0.0 else None
    y, _, _ = layer_norm_op(x, weight, bias, residual, x_bias, seed, float(eps), float(dropout_p))
    return y


__all__ = ["MAX_WIDTH", "layer_norm", "draw_seed", "dropout_keep_mask"]
