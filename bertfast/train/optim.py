"""LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes") as NVIDIA's
BERT recipe runs it, on torch's multi-tensor (`torch._foreach_*`) primitives.

One step, for each parameter w with gradient g (t = the parameter's step count, from 1):

    g      <- g / max(||G|| / max_grad_norm, 1)      optional global pre-normalisation (NVIDIA's FusedLAMB):
                                                      ||G|| is the norm over every gradient of the optimizer
    m      <- b1 m + (1 - b1) g                       Adam moments
    v      <- b2 v + (1 - b2) g^2
    u      <- (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd w      bias-corrected Adam direction plus
                                                                        decoupled weight decay
    r      <- ||w|| / ||u||  if both norms > 0, else 1                   per-tensor trust ratio
    w      <- w - lr r u

So a layer whose trust ratio is on moves by exactly lr ||w|| per step whatever its gradients' scale: this is what
lets LAMB train BERT at batch 32k-64k.

Which tensors get the trust ratio and weight decay: the param groups decide. `weight_decay` is per group as in
AdamW; `trust_ratio` is per group too: True (every tensor of the group), False (none: plain AdamW steps) or None
(the default: tensors with two or more dimensions, i.e. matrices and embeddings, and not the biases and
LayerNorm weights, as in the paper and NVIDIA's BERT). With bertfast.train.trainer.param_groups (every 1-d parameter in
the group with weight_decay 0) the default gives NVIDIA's recipe: neither decay nor trust ratio on 1-d tensors.

Why not a library: torch-optimizer's Lamb (the maintained-looking choice on PyPI; last release 0.3.0, 2021)
departs from the paper and from NVIDIA's recipe -- it clamps ||w|| at 10, leaves out bias correction by default,
applies the trust ratio to every tensor including biases and LayerNorm weights, and steps one tensor at a time with
host synchronisations -- and would add a dependency. apex's FusedLAMB needs a CUDA build of apex. torch itself
has no LAMB. The foreach version below is ~60 lines, runs on CPU and GPU, keeps its state in the standard
`state_dict` format, and is tested against a float64 per-tensor transcription of the formulas above.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch

__all__ = ["Lamb"]


class Lamb(torch.optim.Optimizer):
    """LAMB: Adam moments with bias correction, decoupled weight decay, a per-tensor trust ratio (see the module
    docstring for the formulas and for the `trust_ratio` group option).

    Args: lr, betas, eps, weight_decay (per group, as torch.optim.AdamW; defaults are NVIDIA BERT's except lr),
    trust_ratio (per group: True / False / None = tensors with ndim >= 2), bias_correction (per group),
    max_grad_norm: None (off) or > 0: divide every gradient by ||G|| / max_grad_norm when the global gradient norm
    ||G|| exceeds it (NVIDIA uses 1.0; equivalent to torch.nn.utils.clip_grad_norm_ before step(), so use one or
    the other). The gradients themselves are not modified. After a step with max_grad_norm set,
    `last_grad_norm` holds ||G|| (a tensor; no host synchronisation).

    State per parameter: "step" (a float32 CPU tensor, as torch's Adam), "exp_avg", "exp_avg_sq" (the parameter's
    dtype and device). Parameters of any floating dtype work; keep them in float32 (master weights, with autocast
    for bf16/fp16 compute) for the moments and norms to be float32."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, *, trust_ratio: bool | None = None, bias_correction: bool = True,
                 max_grad_norm: float | None = None):
        _check_hparams(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, trust_ratio=trust_ratio)
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0
                                              and math.isfinite(max_grad_norm)):
            raise ValueError(f"Lamb: max_grad_norm must be None (off) or a finite number > 0, got {max_grad_norm!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, trust_ratio=trust_ratio,
                        bias_correction=bias_correction)
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_hparams(**{k: group[k] for k in ("lr", "betas", "eps", "weight_decay", "trust_ratio")})
        self.max_grad_norm = max_grad_norm
        self.last_grad_norm: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []  # (group, params, grads) of the parameters that have a gradient
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            for p in ps:
                if p.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients (e.g. nn.Embedding(sparse=True))")
            if ps:
                work.append((group, ps, [p.grad for p in ps]))
        if not work:
            return loss

        scale = None  # 1 / max(||G|| / max_grad_norm, 1), a 0-dim tensor (no host synchronisation)
        if self.max_grad_norm is not None:
            grads = [g for _, _, gs in work for g in gs]
            dev = grads[0].device
            acc = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
            norms = [n.to(device=dev, dtype=acc) for n in torch._foreach_norm(grads)]
            gnorm = torch.linalg.vector_norm(torch.stack(norms))
            self.last_grad_norm = gnorm
            scale = 1.0 / torch.clamp(gnorm / self.max_grad_norm, min=1.0)

        for group, ps, gs in work:
            for (device, _), idx in _buckets(ps).items():
                self._step_bucket(group, [ps[i] for i in idx], [gs[i] for i in idx],
                                  None if scale is None else scale.to(device))
        return loss

    def _step_bucket(self, group, params, grads, scale):
        """One LAMB step on parameters of one device and dtype (the formulas of the module docstring)."""
        b1, b2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        m, v, steps = [], [], []
        for p in params:
            st = self.state[p]
            if not st:
                st["step"] = torch.tensor(0.0, dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["step"] += 1
            m.append(st["exp_avg"])
            v.append(st["exp_avg_sq"])
            steps.append(st["step"].item())  # a CPU tensor: no device synchronisation

        if scale is not None:
            grads = torch._foreach_mul(grads, scale)  # pre-normalised copies; p.grad stays as it was
        torch._foreach_lerp_(m, grads, 1 - b1)  # m = b1 m + (1 - b1) g
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, 1 - b2)  # v = b2 v + (1 - b2) g^2
        del grads  # the pre-normalised copies, if any, are not needed any more

        # u = m_hat / (sqrt(v_hat) + eps) = m / (sqrt(v) (1 - b1^t) / sqrt(1 - b2^t) + eps (1 - b1^t)): the bias
        # corrections folded into the denominator, so the direction takes four passes over memory
        denom = torch._foreach_sqrt(v)
        if group["bias_correction"]:
            bc1 = [1 - b1 ** t for t in steps]
            torch._foreach_mul_(denom, [c / math.sqrt(1 - b2 ** t) for c, t in zip(bc1, steps)])
            torch._foreach_add_(denom, [eps * c for c in bc1])
        else:
            torch._foreach_add_(denom, eps)
        u = torch._foreach_div(m, denom)
        del denom
        if wd != 0:
            torch._foreach_add_(u, params, alpha=wd)  # decoupled weight decay joins the direction (and its norm)

        # w -= lr r u with the per-tensor trust ratio r = ||w|| / ||u|| (1 when either norm is 0) on the tensors
        # the group selects, r = 1 on the others
        sel = _trust_ratio_tensors(group["trust_ratio"], params)
        rest = sorted(set(range(len(params))) - set(sel))
        if rest:
            torch._foreach_add_([params[i] for i in rest], [u[i] for i in rest], alpha=-lr)
        if sel:
            p_sel, u_sel = [params[i] for i in sel], [u[i] for i in sel]
            acc = torch.promote_types(params[0].dtype, torch.float32)  # float32 norms for bf16 / fp16 tensors
            w_norm = torch.stack(torch._foreach_norm(p_sel)).to(acc)
            u_norm = torch.stack(torch._foreach_norm(u_sel)).to(acc)
            ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
            torch._foreach_addcmul_(p_sel, u_sel, list(ratio.unbind(0)), value=-lr)


def _trust_ratio_tensors(option, params) -> list[int]:
    if option is None:
        return [i for i, p in enumerate(params) if p.ndim >= 2]
    return list(range(len(params))) if option else []


def _buckets(params) -> dict:
    """Indices of `params` grouped by (device, dtype): each foreach call runs on one kind."""
    out: dict = defaultdict(list)
    for i, p in enumerate(params):
        out[(p.device, p.dtype)].append(i)
    return out


def _check_hparams(*, lr, betas, eps, weight_decay, trust_ratio) -> None:
    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not (number(lr) and lr >= 0):
        raise ValueError(f"Lamb: lr must be a finite number >= 0, got {lr!r}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(number(b) and 0 <= b < 1 for b in betas)):
        raise ValueError(f"Lamb: betas must be two numbers in [0, 1), got {betas!r}")
    if not (number(eps) and eps >= 0):
        raise ValueError(f"Lamb: eps must be a finite number >= 0, got {eps!r}")
    if not (number(weight_decay) and weight_decay >= 0):
        raise ValueError(f"Lamb: weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if trust_ratio not in (None, True, False):
        raise ValueError(f"Lamb: trust_ratio must be True, False or None (tensors with ndim >= 2), got "
                         f"{trust_ratio!r}")
