"""Python side of the C++/CUDA extension bertfast._C: typed wrappers, fake (meta) kernels and autograd.

The operators themselves (schemas in csrc/ops.cpp, CPU kernels there, CUDA kernels in csrc/ops_cuda.cu) are
registered with the dispatcher when bertfast._C is imported; the dispatcher picks the CPU or CUDA kernel by the
tensors' device, so nothing here branches on it.
"""
from __future__ import annotations

import torch

__all__ = ["mlm_gather", "softmax_cross_entropy", "extension_info"]


def _load():
    try:
        from bertfast import _C  # noqa: F401  (registers torch.ops.bertfast.*)
    except ImportError as e:
        msg = (f"bertfast's C++/CUDA extension bertfast._C is not built or failed to load ({e}). Build it with "
               "`pip install -e .` (or `pip install --no-build-isolation -e .` to build against the torch "
               "already installed).")
        try:
            from bertfast import _build_info
            if _build_info.TORCH_VERSION != torch.__version__:
                msg = (f"bertfast._C was built against torch {_build_info.TORCH_VERSION} but torch "
                       f"{torch.__version__} is installed ({e}). Rebuild it with "
                       "`pip install --no-build-isolation -e .`.")
        except ImportError:
            pass
        raise ImportError(msg) from e
    try:
        from bertfast import _build_info
        built_with = _build_info.TORCH_VERSION
    except ImportError:
        built_with = None
    if built_with is not None and built_with != torch.__version__:
        raise ImportError(
            f"bertfast._C was built against torch {built_with} but torch {torch.__version__} is installed: "
            "the extension must be rebuilt for this torch. Reinstall with `pip install --no-build-isolation -e .`.")
    return built_with


_BUILT_WITH = _load()
_ops = torch.ops.bertfast


def extension_info() -> dict:
    """What the extension was built with: {built, with_cuda (CUDA kernels registered), torch, built_with_torch}."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return {
        "built": True,
        "with_cuda": bool(has("bertfast::softmax_cross_entropy", "CUDA") and has("bertfast::mlm_gather", "CUDA")),
        "torch": torch.__version__,
        "built_with_torch": _BUILT_WITH,
    }


# ----------------------------------------------------------------------------------------------------------------
# mlm_gather
# ----------------------------------------------------------------------------------------------------------------

def mlm_gather(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """hidden [B, S, H], positions int64 [B, P] (-1 = unused) -> [B * P, H], zero rows (and no gradient) for -1."""
    return _ops.mlm_gather(hidden, positions)


@torch.library.register_fake("bertfast::mlm_gather")
def _mlm_gather_fake(hidden, positions):
    torch._check(hidden.dim() == 3, lambda: "mlm_gather: hidden must be [batch, seqlen, hidden]")
    torch._check(positions.dim() == 2, lambda: "mlm_gather: positions must be [batch, P]")
    return hidden.new_empty(hidden.shape[0] * positions.shape[1], hidden.shape[2])


@torch.library.register_fake("bertfast::mlm_gather_backward")
def _mlm_gather_backward_fake(grad, positions, seq_len):
    return grad.new_empty(positions.shape[0], seq_len, grad.shape[1])


def _mlm_gather_setup(ctx, inputs, output):
    hidden, positions = inputs
    ctx.seq_len = hidden.shape[1]
    ctx.save_for_backward(positions)


def _mlm_gather_bwd(ctx, grad):
    (positions,) = ctx.saved_tensors
    return _ops.mlm_gather_backward(grad, positions, ctx.seq_len), None


torch.library.register_autograd("bertfast::mlm_gather", _mlm_gather_bwd, setup_context=_mlm_gather_setup)


# ----------------------------------------------------------------------------------------------------------------
# softmax_cross_entropy
# ----------------------------------------------------------------------------------------------------------------

def softmax_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                          label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the rows of logits [N, V] whose target is not ignore_index (0 if none).

    The loss is float32 for float16/bfloat16/float32 logits (float64 for float64). When logits require grad, the
    gradient is computed in the same pass as the loss (see the memory note below)."""
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, _ = _ops.softmax_cross_entropy(logits, target, ignore_index, label_smoothing, compute_grad)
    return loss


@torch.library.register_fake("bertfast::softmax_cross_entropy")
def _sce_fake(logits, target, ignore_index=-100, label_smoothing=0.0, compute_grad=False):
    torch._check(logits.dim() == 2, lambda: "softmax_cross_entropy: logits must be [N, vocab]")
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = logits.new_empty((), dtype=acc)
    grad = logits.new_empty(logits.shape, dtype=grad_dtype(logits.dtype)) if compute_grad else logits.new_empty(0)
    return loss, grad


def grad_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    """dtype of the gradient buffer the forward writes (csrc/checks.h grad_dtype): float32 for float16 logits, whose
    unscaled gradients ((softmax - onehot) / count, ~1 / (V * count)) fall below fp16's smallest subnormal before
    a GradScaler's scale multiplies them in the backward; the logits' own dtype otherwise."""
    return torch.float32 if logits_dtype == torch.float16 else logits_dtype


@torch.library.register_fake("bertfast::softmax_cross_entropy_backward_")
def _sce_scale_fake(grad_logits, grad_output):
    return None


# Memory: the forward writes d loss / d logits (for grad_output = 1: (softmax - onehot) / count) into one
# logits-sized buffer, saved for backward; the backward scales that same buffer in place by grad_output and hands
# it to autograd. So besides the logits there is never more than one logits-sized buffer (eager cross_entropy holds
# log-probabilities, then a zero-filled grad of the log-probabilities, then the grad of the logits).
# Exception, float16 logits: the buffer is float32 (see grad_dtype), twice the logits' bytes, and the backward
# casts the scaled buffer to float16 (one more fp16-sized tensor, alive while autograd consumes it): 3x the logits'
# bytes at the backward's peak instead of 1x. bfloat16 and float32 keep the one-buffer plan.
# In place is safe because nothing else sees the buffer before the backward runs, and the backward runs once:
#   * a second backward through the same graph (retain_graph=True) would scale it twice (and it may by then be
#     logits.grad itself), so it raises instead (ctx.consumed);
#   * double backward (create_graph=True) is not implemented: the saved gradient is not a differentiable function
#     of the logits here, so it raises rather than give a silently wrong second derivative.
def _sce_setup(ctx, inputs, output):
    logits, target, ignore_index, label_smoothing, compute_grad = inputs
    ctx.compute_grad = compute_grad
    ctx.logits_dtype = logits.dtype
    ctx.consumed = False
    ctx.mark_non_differentiable(output[1])
    # The second output (the gradient buffer) gets no gradient; without this autograd would materialise a
    # logits-sized zero tensor for it in the backward.
    ctx.set_materialize_grads(False)
    if compute_grad:
        ctx.save_for_backward(output[1])
    else:
        # Called directly with compute_grad=False on logits that need grad: recompute the gradient in backward.
        ctx.ignore_index, ctx.label_smoothing = ignore_index, label_smoothing
        ctx.save_for_backward(logits, target)


def _sce_bwd(ctx, grad_loss, _grad_of_grad_buffer):
    if not ctx.compute_grad:
        logits, target = ctx.saved_tensors
        _, grad = _ops.softmax_cross_entropy(logits, target, ctx.ignore_index, ctx.label_smoothing, True)
        return (grad.to(grad_loss.dtype) * grad_loss).to(logits.dtype), None, None, None, None
    if ctx.consumed:
        raise RuntimeError(
            "bertfast softmax_cross_entropy (impl='ext') can be back-propagated only once: its backward scales the "
            "gradient saved by the forward in place. Recompute the loss for a second backward (or use impl='torch' "
            "with retain_graph=True).")
    (grad,) = ctx.saved_tensors
    if not _eager(grad, grad_loss):
        # Traced (torch.compile / AOTAutograd / make_fx): the same math out of place, which the compiler can fuse
        # and plan memory for; mutating a forward output inside the traced backward is not allowed there.
        return (grad.to(grad_loss.dtype) * grad_loss).to(ctx.logits_dtype), None, None, None, None
    if torch.is_grad_enabled():
        raise RuntimeError(
            "bertfast softmax_cross_entropy (impl='ext') does not support double backward (create_graph=True); "
            "use impl='torch' for higher-order gradients.")
    ctx.consumed = True
    _ops.softmax_cross_entropy_backward_(grad, grad_loss)
    # scaled in float32 for float16 logits, then rounded once to the logits' dtype (a no-op for the others)
    return grad.to(ctx.logits_dtype), None, None, None, None


def _eager(*tensors) -> bool:
    """True for plain eager tensors; False under tracing, where tensors are fake / functional / proxy subclasses."""
    return all(type(t) is torch.Tensor for t in tensors)


torch.library.register_autograd("bertfast::softmax_cross_entropy", _sce_bwd, setup_context=_sce_setup)
