"""Held-out evaluation of a pretraining model: MLM and NSP loss and accuracy over a whole
evaluation set, reduced over the ranks of a data-parallel run, without touching any training RNG stream.

    from bertfast.train.evaluate import evaluate, format_eval
    rec = evaluate(model, loader.eval_loader, device=device, precision="bf16")   # on every rank
    print(format_eval(rec))

The numbers are sums over every prediction of the evaluation set divided by the counts of the whole set:

    eval_mlm_loss = sum over batches of (mean MLM cross-entropy of the batch x its predictions) / all predictions
    eval_nsp_loss = the same with sequences; eval_*_acc: correct / all, likewise

so they do not depend on how the set is cut into batches or ranks (up to float rounding). The sums are kept on
the device in float64 (one host sync per evaluation, after the all_reduce).
"""
from __future__ import annotations

import contextlib
import random
import sys

import numpy as np
import torch

from bertfast.train.precision import PRECISIONS, autocast

__all__ = ["evaluate", "format_eval", "eval_postfix", "preserve_rng", "EVAL_KEYS"]

EVAL_KEYS = ("eval_loss", "eval_mlm_loss", "eval_mlm_acc", "eval_nsp_loss", "eval_nsp_acc", "eval_tokens",
             "eval_sequences", "eval_predictions")


# The per-rank sums, in the order of the packed tensor that is all-reduced.
_SUMS = ("mlm_loss_sum", "predictions", "mlm_correct", "nsp_loss_sum", "sequences", "nsp_correct", "tokens")


@contextlib.contextmanager
def preserve_rng():
    """Every generator a training step draws from (torch's CPU generator, each initialised CUDA device's, Python's
    `random`, numpy's global one) is the same on leaving as on entering, exceptions included."""
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """Every module in eval mode; each one's own previous mode back on leaving (a partly frozen model keeps its
    mix of modes), exceptions included."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, was in modes:
            m.training = was


def _autocast_dtype(precision):
    if isinstance(precision, torch.dtype):
        return None if precision == torch.float32 else precision
    if isinstance(precision, str) and precision in PRECISIONS:
        return PRECISIONS[precision]
    raise ValueError(f"evaluate(precision={precision!r}): choose one of {', '.join(PRECISIONS)} (or a torch dtype), "
                     "as the run's --precision")


def _group(process_group):
    """(group, world size) to reduce over; (None, 1): stay local. process_group: None (the default group when one
    is initialised), a torch.distributed ProcessGroup, False (local only), or an object with a `world_size`
    attribute, as the trainer's rank descriptor (the default group when world_size > 1, else local)."""
    import torch.distributed as dist

    if process_group is False:
        return None, 1
    described = getattr(process_group, "world_size", None) if not isinstance(process_group, (type(None), bool)) \
        else None
    if not (dist.is_available() and dist.is_initialized()):
        if isinstance(described, int) and described > 1:
            raise RuntimeError(f"evaluate(process_group=...) describes {described} ranks, but no torch.distributed "
                               "process group is initialised: call torch.distributed.init_process_group first")
        return None, 1
    if isinstance(process_group, dist.ProcessGroup):
        group = process_group
    elif process_group is None:
        group = None  # the default group
    elif isinstance(described, int):
        if described <= 1:
            return None, 1
        group = None
    else:
        raise TypeError(f"evaluate(process_group={process_group!r}): pass None, False, a torch.distributed "
                        "ProcessGroup or an object with a world_size attribute")
    world = dist.get_world_size(group)
    return (group, world) if world > 1 else (None, 1)


def evaluate(model: torch.nn.Module, eval_loader, *, device, precision="fp32", process_group=None,
             progress: bool = False) -> dict:
    """MLM and NSP loss and accuracy of `model` (a BertForPreTraining, or a DDP wrapping one) over every batch of
    `eval_loader` (an EvalLoader, or any iterable of `Batch`), summed over the ranks of `process_group`.

    Runs in eval mode under torch.no_grad() and autocast to `precision` ("fp32", "bf16", "fp16" as the trainer,
    or a torch dtype); puts every module back in its previous mode, and leaves every RNG stream (torch CPU and
    CUDA, Python's `random`, numpy) as it found them, even when it raises. Under DDP it is a collective: every
    rank must call it, with its own slice (EvalLoader gives every rank the same number of batches). A DDP model
    is unwrapped (its `.module` is called: no gradient-sync hooks, no buffer broadcast).

    Returns floats (counts as ints), the same on every rank:
        eval_mlm_loss     mean cross-entropy over every predicted (masked) position of the whole set
        eval_mlm_acc      share of those positions whose argmax is the target
        eval_nsp_loss     mean NSP cross-entropy over every sequence; eval_nsp_acc likewise
        eval_loss         eval_mlm_loss + eval_nsp_loss (as the training records' `loss`)
        eval_tokens       real (non-padding) tokens evaluated; eval_sequences; eval_predictions (MLM positions)
    Raises ValueError for no eval_loader, one sliced for another number of ranks than the group has, or a set
    that (all ranks together) holds no sequence.
    """
    import torch.distributed as dist

    device = torch.device(device)
    dtype = _autocast_dtype(precision)
    group, world = _group(process_group)
    if eval_loader is None:
        raise ValueError("evaluate(eval_loader=None): there is no evaluation set; load_data(..., eval_fraction=F) or "
                         "load_data(..., eval_data=...) gives the training loader an eval_loader")
    sliced_for = getattr(eval_loader, "world_size", None)
    if world > 1 and sliced_for is not None and sliced_for != world:
        raise ValueError(f"evaluate(eval_loader=...) is cut into slices for {sliced_for} rank(s) but the process group "
                         f"has {world}: build it with load_data(..., rank=RANK, world_size={world}) so that each rank "
                         "evaluates its own slice (or pass process_group=False to evaluate it on this rank alone)")
    net = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    sums = torch.zeros(len(_SUMS), dtype=torch.float64, device=device)
    batches = eval_loader
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = len(eval_loader) if hasattr(eval_loader, "__len__") else None
        batches = bar = tqdm(eval_loader, total=total, desc="eval", leave=False, dynamic_ncols=True, file=sys.stderr)
    try:
        with preserve_rng(), _eval_mode(net), torch.no_grad():
            for b in batches:
                sums += _batch_sums(net, b.to(device, non_blocking=True), device, dtype)
    finally:
        if bar is not None:
            bar.close()
    if world > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    s = dict(zip(_SUMS, sums.tolist()))
    if s["sequences"] == 0:
        raise ValueError("evaluate(eval_loader=...): the evaluation set holds no sequence (on any rank); hold out "
                         "more data (--eval-fraction / --eval-data) or turn evaluation off (--eval-every 0)")
    n_mlm, n_seq = max(s["predictions"], 1.0), s["sequences"]
    mlm, nsp = s["mlm_loss_sum"] / n_mlm, s["nsp_loss_sum"] / n_seq
    return {"eval_loss": mlm + nsp, "eval_mlm_loss": mlm, "eval_mlm_acc": s["mlm_correct"] / n_mlm,
            "eval_nsp_loss": nsp, "eval_nsp_acc": s["nsp_correct"] / n_seq, "eval_tokens": int(s["tokens"]),
            "eval_sequences": int(n_seq), "eval_predictions": int(s["predictions"])}


def _batch_sums(net, x, device: torch.device, dtype) -> torch.Tensor:
    """One batch's sums in _SUMS order, float64 on the device (no host sync)."""
    with autocast(device.type, dtype):
        o = net(**x.model_inputs(static_mlm=True))
    tgt = o.mlm_targets
    real = tgt != -100
    n_mlm = real.sum()
    # o.mlm_loss is the mean over the batch's predictions: x count = their sum (0, not 0/0, for a batch with none)
    mlm_sum = torch.where(n_mlm > 0, o.mlm_loss.double() * n_mlm, 0.0)
    mlm_ok = ((o.prediction_scores.argmax(-1) == tgt) & real).sum()
    n_seq = x.is_next.numel()
    nsp_sum = o.nsp_loss.double() * n_seq
    nsp_ok = (o.seq_relationship_score.argmax(-1) == x.is_next.reshape(-1)).sum()
    tokens = x.attention_mask.sum()
    vals = (mlm_sum, n_mlm, mlm_ok, nsp_sum, n_seq, nsp_ok, tokens)
    return torch.stack([v.double() if torch.is_tensor(v) else torch.tensor(float(v), dtype=torch.float64,
                                                                           device=device) for v in vals])


def format_eval(rec: dict, prefix: str = "eval") -> str:
    """One line for the log / epoch report, in the trainer's epoch-line style:
    'eval, avg_loss=5.1234 (mlm 4.4300, nsp 0.6934), NSP_acc=50.00%, MLM_acc=12.34% (8,192 predictions, 51,200
    tokens)'."""
    return (f"{prefix}, avg_loss={rec['eval_loss']:.4f} (mlm {rec['eval_mlm_loss']:.4f}, nsp "
            f"{rec['eval_nsp_loss']:.4f}), NSP_acc={100 * rec['eval_nsp_acc']:.2f}%, "
            f"MLM_acc={100 * rec['eval_mlm_acc']:.2f}% ({rec['eval_predictions']:,} predictions, "
            f"{rec['eval_tokens']:,} tokens)")


def eval_postfix(rec: dict) -> dict[str, str]:
    """Short fields for a tqdm bar: bar.set_postfix(**train_fields, **eval_postfix(rec))."""
    return {"eval_mlm": f"{rec['eval_mlm_loss']:.3f}", "eval_mlm_acc": f"{rec['eval_mlm_acc']:.3f}",
            "eval_nsp_acc": f"{rec['eval_nsp_acc']:.3f}"}
