"""The pretraining loop: AdamW + linear warmup/decay, mixed precision, gradient accumulation, DDP, metrics,
atomic checkpoints and exact resume. `train(TrainConfig(...))` is the programmatic entry point; the CLI
(`python -m bertfast.pretrain`) builds a TrainConfig from its flags and calls it.

The run, in the order `_train` reads:
    plan      validate_config: every check possible without data, and the one checkpoint lookup of a resume
    prepare   device, data, model, optimizer, schedule, precision
    restore   a resume loads weights, optimizer, schedule, data position, RunState and RNG from the checkpoint
    loop      one optimizer step; log; epoch lines; maybe checkpoint; until the last step
    finish    the summary, --export-hf
The counters and metric sums live in one RunState (bertfast/train/state.py); the settings in TrainConfig
(bertfast/train/config.py); the resume checks in bertfast/train/plan.py; ranks, device, collectives and the
graceful stop in bertfast/train/dist.py.

Step semantics. One optimizer step consumes `grad_accum` batches of `batch_size` sequences on each of
`world_size` ranks (the global batch). Its objective is the mean MLM cross-entropy over every predicted token of
the global batch plus the mean NSP cross-entropy over its sequences: each micro-batch's loss is weighted by its
share of the global token (sequence) count, so N ranks x b sequences give the same loss and gradients as one
process with N x b sequences, and accumulation gives the same as a bigger batch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from bertfast.train import checkpoint as ckpt
from bertfast.train.flops import peak_flops, training_flops
from bertfast.model.bert import BertForPreTraining
from bertfast.train.precision import autocast
from bertfast.train.dist import (  # noqa: F401 - _Dist, _select_device: for the tests
    PeerFailed, TrainingError, _all_reduce_sum, _barrier, _Dist, _on_every_rank, _preparation_group, _select_device,
    _setup_distributed, _StopRequest)
from bertfast.train.plan import RunPlan, plan_run
from bertfast.train.state import HOST_READS, RunState, device_values, host_read, on_device, summarize
from bertfast.train.config import (PRECISIONS, ConfigError, TrainConfig, build_model_config, check_settings,
                                   data_arguments)
from bertfast.train.lock import FINETUNING, RunLock, describe_kind, folder_kind, refuse_run_as_export

EVAL_BATCH_FACTOR = 2  # evaluation batches are this many times --batch-size (no activations kept for backward)

__all__ = ["TrainConfig", "ConfigError", "TrainingError", "PeerFailed", "Interrupted", "train", "validate_config",
           "param_groups", "LinearWarmupDecay", "export_hf", "build_model_config"]


class Interrupted(Exception):
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption) stopped the run after a whole step, and a checkpoint
    of that step was written: `--resume` continues exactly where it stopped."""

    def __init__(self, signum: int, step: int, checkpoint: str | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}; checkpoint {checkpoint}; "
                         "continue with --resume")


# ---------------------------------------------------------------------------------------------- validation
def validate_config(cfg: TrainConfig, given=None) -> RunPlan:
    """Raise ConfigError for a setting that cannot work, before any data is loaded or anything written; return
    the plan train() follows (for a resume: the checkpoint found, its state, the checked tokenizer, and the
    settings: with `given`, see train())."""
    return plan_run(cfg, given)


# ---------------------------------------------------------------------------------------------- optimisation
def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices (linear weights, embeddings); none on biases and LayerNorm
    weights (every 1-d parameter: the layers', the embeddings' LayerNorm, the MLM head's)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class LinearWarmupDecay:
    """lr(step) = base * step / warmup for step < warmup, then base * (total - step) / (total - warmup), reaching
    0 at `total`. `step()` is called once per optimizer step (skipped steps included)."""

    def __init__(self, optimizer, warmup_steps: int, total_steps: int):
        self.optimizer = optimizer
        self.warmup, self.total = int(warmup_steps), int(total_steps)
        self.base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        for g, lr in zip(optimizer.param_groups, self.base_lrs):
            g["initial_lr"] = lr
        self.step_count = 0
        self._apply()

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return step / self.warmup
        if step >= self.total:
            return 0.0
        return (self.total - step) / max(1, self.total - self.warmup)

    def _apply(self):
        f = self.factor(self.step_count)
        for g, lr in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = lr * f

    def step(self):
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "warmup": self.warmup, "total": self.total,
                "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])  # warmup / total / lr: the current run's settings
        self._apply()


# ---------------------------------------------------------------------------------------------- the run
def _say(msg: str, d: _Dist, log) -> None:
    if d.is_main:
        log(msg)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _truncate_metrics(path: str, step: int) -> None:
    """Keep only the records up to `step` (a killed run may have logged past its last checkpoint)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                break  # a torn last line
            if rec.get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
    ckpt.atomic_write_text(path, "".join(keep))


class _Batches:
    """Micro-batches in order across epochs: next() -> (batch, its epoch, whether it ends that epoch)."""

    def __init__(self, loader):
        self.loader, self.per_epoch = loader, len(loader)
        self._it, self._fresh = None, 0

    def next(self):
        while True:
            if self._it is None:
                self._it = iter(self.loader)
                self._fresh += 1
                if self._fresh > 2:
                    raise TrainingError("the data loader yields no batches")
            epoch = self.loader.epoch
            try:
                b = next(self._it)
            except StopIteration:
                self._it = None
                continue
            self._fresh = 0
            return b, epoch, self.loader.consumed == self.per_epoch


@dataclass
class _Run:
    """Everything the loop works with; `state` is what changes from step to step."""

    cfg: TrainConfig
    d: _Dist
    log: object
    device: torch.device
    threads: int
    tokenizer: object
    loader: object
    mcfg: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LinearWarmupDecay
    scaler: torch.amp.GradScaler
    state: RunState
    ddp_model: torch.nn.Module | None = None
    resume_rng: dict | None = None
    peak: float | None = None  # the device's peak FLOP/s, for MFU
    flops: float = 0.0  # training FLOPs since the last log
    t_window: float = 0.0  # when the log window began
    window_from: int = 0  # the step the log window began after
    last_eval: dict | None = None  # the latest evaluation record
    postfix: dict = dataclasses.field(default_factory=dict)  # the progress bar's figures

    def say(self, msg: str) -> None:
        _say(msg, self.d, self.log)

    def autocast(self):
        return autocast(self.device.type, PRECISIONS[self.cfg.precision])


def train(cfg: TrainConfig, *, log=print, loss_hook=None, given=None) -> dict:
    """Pretrain as `cfg` says; returns a summary {"step", "loss", "mlm_loss", "nsp_loss", "mlm_acc", "nsp_acc",
    "checkpoint", "output_dir", "epochs": [per-epoch summaries]}.

    Data-parallel under torchrun's variables (WORLD_SIZE > 1), or inside a default process group the caller
    already started (then left for the caller to destroy).

    A first SIGINT / SIGTERM during the loop (when train() runs in the main thread) finishes the current step,
    writes its checkpoint and raises Interrupted; a second one raises KeyboardInterrupt at once.

    loss_hook(step, mlm_loss) -> mlm_loss: a test hook applied to each micro-batch's MLM loss before it is
    logged and back-propagated (e.g. to inject a non-finite value). given: the names of the fields the caller set
    on purpose (the CLI passes the flags on its command line): on a resume every other field keeps the value saved
    in the checkpoint; None (the default) takes every field from cfg. Raises ConfigError for bad settings (before
    any work), TrainingError when the run must stop, checkpoint.CheckpointError for a checkpoint that does not
    fit."""
    check_settings(cfg)  # the checks that need nothing (again in the plan): before any process group or lock
    if cfg.prepare_only:  # --prepare-only: the data this run would use, and no training
        return _prepare_only(cfg, given, log)
    dev_type = "cuda" if (cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())) \
        else "cpu"
    dist_ = _setup_distributed(dev_type)
    threads = torch.get_num_threads()
    try:
        with _output_locks(cfg, dist_, log):  # one writer per folder; the plan reads the folder only under it
            plan = validate_config(cfg, given)
            if plan.nothing_left:
                return _nothing_left(plan, log)
            return _train(plan, dist_, log, loss_hook)
    finally:
        torch.set_num_threads(threads)  # the run's setting is not left behind for the caller
        if dist_.initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def _prepare_only(cfg: TrainConfig, given, log) -> dict:
    """--prepare-only: build the tokenizer and the cached datasets (in the data cache, not in --output-dir, so no
    run-folder lock is needed) and report them."""
    plan = validate_config(cfg, given)
    if plan.nothing_left:
        return _nothing_left(plan, log)
    from bertfast.train.prepare import prepare_data

    return prepare_data(plan, log)


@contextlib.contextmanager
def _output_locks(cfg: TrainConfig, d: _Dist, log):
    """Hold --output-dir's (and --export-hf's) lock for the run (bertfast.train.lock). Rank 0 takes them: the
    ranks of one torchrun job are one writer; when rank 0 is refused, the others stop with its message. A folder
    that holds a fine-tuning run is refused unless --overwrite-output-dir."""
    folders = [(cfg.output_dir, "--output-dir")]
    if cfg.export_hf and os.path.realpath(cfg.export_hf) != os.path.realpath(cfg.output_dir):
        folders.append((cfg.export_hf, "--export-hf"))
    with contextlib.ExitStack() as stack:
        def take():
            for folder, flag in folders:
                lock = stack.enter_context(RunLock(folder, flag, enabled=d.is_main))
                if lock.took_over:
                    log(lock.took_over)
            kind = folder_kind(cfg.output_dir)
            if kind == FINETUNING and not cfg.overwrite_output_dir:
                raise ConfigError("--output-dir", f"{describe_kind(cfg.output_dir, kind)}; pretraining there would "
                                  "replace its metrics.jsonl. Choose another --output-dir, or pass "
                                  "--overwrite-output-dir to write there anyway")
            refuse_run_as_export(cfg.export_hf, cfg.output_dir, cfg.overwrite_output_dir)

        _on_every_rank(d, take, run_here=d.is_main)
        yield


def _train(plan: RunPlan, d: _Dist, log, loss_hook) -> dict:
    run = _prepare(plan, d, log)
    if plan.resuming:
        _restore(run, plan)
    _write_run_files(run, plan)
    _announce(run, plan)
    _start_rng(run)
    batches = _Batches(run.loader)
    metrics_f, bar = _open_outputs(run, plan)
    stop = _StopRequest(lambda m: print(m, file=sys.stderr, flush=True) if d.is_main else None)
    stop.install()
    run.t_window = time.perf_counter()
    try:
        while not run.state.done:
            ended, grad_norm, stop_signum = _optimizer_step(run, batches, loss_hook, stop)
            if bar is not None:
                bar.update(1)
            _check_bad_steps(run)
            if run.state.step % run.cfg.log_every == 0 or run.state.done:
                _log(run, grad_norm, metrics_f, bar)
            if _eval_due(run):
                _evaluate(run, metrics_f, bar)
            _report_epochs(run, ended, bar)
            _maybe_checkpoint(run, stop_signum)
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
        if metrics_f is not None:
            metrics_f.close()
    return _finish(run)


# ---------------------------------------------------------------------------------------------- prepare
def _prepare(plan: RunPlan, d: _Dist, log) -> _Run:
    """Device, data, model, optimizer, schedule and precision; nothing under --output-dir is written yet."""
    cfg = plan.cfg
    device = _select_device(cfg, d)
    threads = cfg.threads or max(1, torch.get_num_threads() // (d.local_world_size if device.type == "cpu" else 1))
    torch.set_num_threads(threads)
    tokenizer, loader = _load_data(plan, d, device)
    total_steps = plan.total_steps(len(loader))
    if total_steps < 1:
        raise ConfigError("--grad-accum", f"{cfg.grad_accum} micro-batches per step but an epoch has only "
                          f"{len(loader)} batches: lower --grad-accum or --batch-size, or set --max-steps")
    if cfg.warmup_steps > total_steps:
        _say(f"warning: --warmup-steps {cfg.warmup_steps} is more than the run's {total_steps} steps: the "
             f"warmup is cut to {total_steps} steps, so the learning rate rises over the whole run and never decays; lower "
             "--warmup-steps", d, log)
    mcfg = build_model_config(cfg, tokenizer, vocab_size=plan.kept_vocab_size())
    _seed_everything(cfg.seed)  # the same initial weights on every rank
    model = BertForPreTraining(mcfg, impl=cfg.impl)
    if plan.init is not None:  # --init-from: its weights (checked to fit in the plan), everything else fresh
        model.load_state_dict(plan.init.model.state_dict())
    model = model.to(device)
    # value checks read the device back: a sync on a GPU, and under --compile a graph break at each check (4 in
    # the forward: tests/test_run_features.py::test_compile_on_cpu); the collator's batches are valid
    model.check_inputs = device.type != "cuda" and not cfg.compile
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = _optimizer(cfg, model)
    scheduler = LinearWarmupDecay(optimizer, min(cfg.warmup_steps, total_steps), total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    peak = peak_flops(torch.cuda.get_device_name(device), cfg.precision) if device.type == "cuda" else None
    return _Run(cfg=cfg, d=d, log=log, device=device, threads=threads, tokenizer=tokenizer, loader=loader,
                mcfg=mcfg, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                state=RunState(device, total_steps), peak=peak)


def _optimizer(cfg: TrainConfig, model) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "lamb":  # trust ratio on matrices only (the default): NVIDIA's BERT recipe
        from bertfast.train.optim import Lamb

        return Lamb(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-6)
    # fused: one kernel over all parameters (CPU and CUDA); on 2 CPU cores it is 6x faster than foreach at
    # BERT-base (55 vs 345 ms a step)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-6, fused=True)


def _load_data(plan: RunPlan, d: _Dist, device: torch.device):
    """(tokenizer, loader). Rank 0 first: it trains (or finds in its cache) the tokenizer and processes the
    corpus; the others then reuse both. A trained vocabulary goes to the data cache, not to --output-dir: the run
    copies it there once every check has passed. A resume uses the plan's checked tokenizer and trains none."""
    from bertfast.data import load_data

    cfg = plan.cfg
    if not cfg.progress:
        _quiet_datasets()

    tokenizer = plan.tokenizer if plan.resuming else plan.init.tokenizer if plan.init else cfg.tokenizer

    def load():
        return load_data(**data_arguments(cfg, tokenizer), batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                         rank=d.rank, world_size=d.world_size, output_dir=None, drop_last=True,
                         pin_memory=device.type == "cuda", eval_batch_size=EVAL_BATCH_FACTOR * cfg.batch_size)

    group = _preparation_group(d)  # waiting for rank 0's preparation never times out
    first = _on_every_rank(d, load, run_here=d.is_main, group=group)
    rest = _on_every_rank(d, load, run_here=not d.is_main, group=group)
    return first if d.is_main else rest


def _quiet_datasets() -> None:
    """--no-progress also hides the `datasets` preparation bars."""
    try:
        import datasets

        datasets.disable_progress_bars()
    except (ImportError, AttributeError):
        pass


# ---------------------------------------------------------------------------------------------- restore
def _restore(run: _Run, plan: RunPlan) -> None:
    """Continue from the plan's checkpoint: weights, optimizer, schedule, GradScaler, data position, RunState;
    the RNG state is set when the loop starts. Settings the plan lets change are applied here."""
    found, state, cfg = plan.resume_from, plan.saved_state, run.cfg
    ckpt.check_model_config(found.path, run.mcfg.to_dict())
    ckpt.load_checkpoint(found.path, run.model, map_location="cpu")
    fresh_groups = [{k: g[k] for k in ("lr", "initial_lr", "weight_decay")} for g in run.optimizer.param_groups]
    run.optimizer.load_state_dict(state["optimizer"])
    for g, fresh in zip(run.optimizer.param_groups, fresh_groups):
        g.update(fresh)  # this run's --lr / --weight-decay (the schedule sets lr below)
    run.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler") and run.scaler.is_enabled():
        run.scaler.load_state_dict(state["scaler"])
    try:
        run.loader.load_state_dict(state["data"])
    except ValueError as e:
        raise ConfigError("--resume", f"{e}. Resume with the same --batch-size, --seed, --data and number of "
                          "processes as the checkpointed run.") from None
    saved_world = int(state.get("world_size", 1))
    if saved_world != run.d.world_size:
        raise ConfigError("--resume", f"checkpoint {os.path.basename(found.path)} was written by {saved_world} "
                          f"process(es), this run has {run.d.world_size}: resume with the same number of processes")
    mine = state["ranks"][run.d.rank]
    run.state.load_state_dict(state, mine)
    run.state.last_checkpoint = found.path
    run.window_from = run.state.step - int(run.state.window.host["steps"])
    run.resume_rng = mine["rng"]
    saved_total = state.get("total_steps")
    if saved_total is not None and saved_total != run.state.total_steps:
        run.say(f"warning: the checkpoint's run had {saved_total} total steps, this one {run.state.total_steps}: "
                "the learning-rate schedule changes from here")
    if run.d.is_main:
        _truncate_metrics(os.path.join(cfg.output_dir, "metrics.jsonl"), run.state.step)


def _write_run_files(run: _Run, plan: RunPlan) -> None:
    """What this run is: its settings, its model config and (a new run's) tokenizer; written only now that every
    check has passed."""
    out = run.cfg.output_dir
    if not run.d.is_main:
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "train_config.json"), "w") as f:
        json.dump(dataclasses.asdict(run.cfg), f, indent=2)
    with open(os.path.join(out, "model_config.json"), "w") as f:
        json.dump(run.mcfg.to_dict(), f, indent=2)
    for path in ckpt.remove_stale_temporaries(out):
        run.say(f"removed {path}, left by an interrupted write")
    tok_dir = os.path.join(out, "tokenizer")
    if plan.restore_tokenizer:
        ckpt.restore_tokenizer(plan.resume_from.path, tok_dir)
    elif not plan.resuming:
        tmp = f"{tok_dir}.tmp-{os.getpid()}"
        run.tokenizer.save_pretrained(tmp)
        if os.path.isdir(tok_dir):  # left by an attempt that never checkpointed
            import shutil

            shutil.rmtree(tok_dir)
        os.replace(tmp, tok_dir)


def _announce(run: _Run, plan: RunPlan) -> None:
    from bertfast import ops

    cfg, d, mcfg, device = run.cfg, run.d, run.mcfg, run.device
    global_batch = cfg.batch_size * d.world_size * cfg.grad_accum
    run.say("bertfast pretraining\n  config: " + json.dumps(dataclasses.asdict(cfg)))
    run.say(f"  device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                                     f" ({run.threads} threads)") +
            f", world size {d.world_size}, precision {cfg.precision}")
    run.say("  ops: " + ", ".join(f"{k}={v}" for k, v in ops.describe(device, cfg.impl).items()))
    run.say(f"  model: {cfg.preset} ({mcfg.num_hidden_layers} layers x {mcfg.hidden_size}, vocab "
            f"{mcfg.vocab_size}), {run.model.num_parameters():,} parameters")
    run.say(f"  data: {len(run.loader.pairs):,} sequence pairs, {len(run.loader)} global batches per epoch; global "
            f"batch {global_batch} = {cfg.batch_size} per device x {d.world_size} device(s) x {cfg.grad_accum} "
            f"accumulation; {run.state.total_steps} steps")
    for note in plan.notes:
        run.say(note)
    if plan.resuming:
        run.say(f"  resuming from {plan.resume_from.path} at step {run.state.step} (epoch {run.loader.epoch}, "
                f"batch {run.loader.consumed})")


def _start_rng(run: _Run) -> None:
    """The dropout stream: different per rank, fixed per seed; a resume continues the checkpoint's. Then DDP."""
    if run.resume_rng is None:
        _seed_everything(run.cfg.seed + 1000003 * run.d.rank + 1)
    else:
        ckpt.set_rng_state(run.resume_rng)
    run.ddp_model = run.model
    if run.d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        run.ddp_model = DDP(run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    if run.cfg.compile:
        run.ddp_model = compile_for_training(run.ddp_model)


def compile_for_training(model):
    """--compile: torch.compile with inductor's fallback_random, so the few random draws left (one dropout seed per
    dropout call: the masks are a hash of seed and position, bertfast.ops.reference.dropout) come from ATen's
    generator as in eager: a compiled step draws the eager step's masks, and inductor fuses each mask's hash into
    the kernel that applies it. Shapes stay torch.compile's default: the first bucket gets a static graph, the next
    a symbolic one that the other buckets reuse (dynamic=False, one graph per bucket, measured no faster on CPU
    within the noise and compiles each of up to 16 buckets: ~90 s each for mini on 2 cores)."""
    return torch.compile(model, options={"fallback_random": True})


def _open_outputs(run: _Run, plan: RunPlan):
    """metrics.jsonl (a new run starts it afresh, dropping what an attempt that never checkpointed logged; a
    resume appends to the file cut back to its checkpoint) and the progress bar, on rank 0."""
    if not run.d.is_main:
        return None, None
    metrics_f = open(os.path.join(run.cfg.output_dir, "metrics.jsonl"), "a" if plan.resuming else "w")
    bar = None
    if run.cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=run.state.total_steps, initial=run.state.step, desc="train", dynamic_ncols=True,
                   file=sys.stderr)
    return metrics_f, bar


# ---------------------------------------------------------------------------------------------- one step
def _optimizer_step(run: _Run, batches: _Batches, loss_hook, stop: _StopRequest):
    """grad_accum micro-batches forward and backward, then the update (or a skipped step). Returns (the epochs
    that ended, with their reduced sums), the gradient norm and the stop signal every rank agreed on."""
    micro = [batches.next() for _ in range(run.cfg.grad_accum)]
    n_mlm = [int((b.mlm_labels != -100).sum()) for b, _, _ in micro]
    n_seq = [len(b) for b, _, _ in micro]
    g_mlm, g_seq = _global_counts(run, float(sum(n_mlm)), float(sum(n_seq)))
    finite = torch.ones((), dtype=torch.bool, device=run.device)
    ended = []
    for i, (b, epoch, last_of_epoch) in enumerate(micro):
        last = i == len(micro) - 1
        finite &= _micro_step(run, b, n_mlm[i], n_seq[i], g_mlm, g_seq, last, loss_hook)
        if last_of_epoch:
            ended.append((epoch, run.state.epoch.reduce(lambda t: _all_reduce_sum(t, run.d))))
            run.state.epoch.reset()
    grad_norm, stop_signum = _update(run, finite, stop)
    return ended, grad_norm, stop_signum


def _global_counts(run: _Run, n_mlm: float, n_seq: float):
    """The step's MLM targets and sequences over all ranks (at least 1 each), for the loss weights: known on the
    host in one process; under DDP one all-reduce, kept on the device (float32 0-dim tensors: exact for counts
    below 2**24, and the loss stays float32), so that DDP reads nothing more than one process does."""
    if not run.d.enabled:
        return max(n_mlm, 1.0), max(n_seq, 1.0)
    counts = torch.stack([on_device(n_mlm, run.device), on_device(n_seq, run.device)])
    g_mlm, g_seq = _all_reduce_sum(counts, run.d).clamp_min(1.0).float().unbind()
    return g_mlm, g_seq


def _micro_step(run: _Run, b, n_mlm: int, n_seq: int, g_mlm, g_seq, last: bool, loss_hook):
    """Forward and backward of one micro-batch, its loss weighted by its share of the global counts; adds its
    metrics to the windows. Returns whether its loss was finite (a device tensor: no host sync)."""
    d, st = run.d, run.state
    lens = b.attention_mask.sum(1, dtype=torch.float64)
    tokens, len_sq = float(lens.sum()), float((lens * lens).sum())
    run.flops += training_flops(run.mcfg, tokens, len_sq, n_mlm, n_seq)
    x = b.to(run.device, non_blocking=True)
    sync = contextlib.nullcontext() if (not d.enabled or last) else run.ddp_model.no_sync()
    with sync:
        with run.autocast():
            o = run.ddp_model(**x.model_inputs(static_mlm=True), detach_scores=True)
        mlm_loss = o.mlm_loss if loss_hook is None else loss_hook(st.step, o.mlm_loss)
        mlm_sum = mlm_loss.float() * n_mlm
        nsp_sum = o.nsp_loss.float() * n_seq
        loss = (mlm_sum / g_mlm + nsp_sum / g_seq) * d.world_size  # DDP averages over ranks
        run.scaler.scale(loss).backward()
    with torch.no_grad():
        tgt = o.mlm_targets
        mlm_ok = ((o.prediction_scores.argmax(-1) == tgt) & (tgt != -100)).sum()
        nsp_ok = (o.seq_relationship_score.argmax(-1) == x.is_next).sum()
        vals = device_values(mlm_loss_sum=mlm_sum, mlm_count=n_mlm, nsp_loss_sum=nsp_sum, nsp_count=n_seq,
                             mlm_correct=mlm_ok, nsp_correct=nsp_ok)
        for w in (st.window, st.epoch):
            w.add_batch(vals, tokens, len_sq)
        return torch.isfinite(loss.detach())


def _update(run: _Run, finite: torch.Tensor, stop: _StopRequest):
    """Clip, then step the optimizer unless a loss was non-finite on any rank; advance the schedule and the step.
    Returns (gradient norm, the stop signal any rank received, 0 if none)."""
    st, scaler, optimizer = run.state, run.scaler, run.optimizer
    if scaler.is_enabled():
        scaler.unscale_(optimizer)
    max_norm = run.cfg.clip_grad if run.cfg.clip_grad > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in run.model.parameters() if p.requires_grad], max_norm)
    # one host sync per step for three flags; under DDP the MAX over ranks makes every rank skip the same steps
    # and stop at the same step when any of them got a signal
    flags = torch.stack([(~finite).double(), (~torch.isfinite(grad_norm)).double(),
                         torch.full((), float(stop.signum or 0), dtype=torch.float64, device=run.device)])
    if run.d.enabled:
        import torch.distributed as dist

        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    loss_bad, grad_bad, stop_signum = host_read(flags, "step")
    if loss_bad > 0 or (grad_bad > 0 and not scaler.is_enabled()):
        st.bad_in_row += 1
        st.window.count("skipped")
    else:
        st.bad_in_row = 0
        if grad_bad > 0:  # fp16: the gradients overflowed (unscale_ found an inf; so is their norm): no step
            st.window.count("overflow")
        else:  # not scaler.step(), which would read found_inf again: the flags above already said it
            optimizer.step()
    if scaler.is_enabled():
        scaler.update()  # on the device: lowers the scale after an inf (recorded by unscale_), else may grow it
    optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    st.step += 1
    st.window.count("steps")
    return grad_norm, int(stop_signum)


def _check_bad_steps(run: _Run) -> None:
    st, cfg = run.state, run.cfg
    if st.bad_in_row >= cfg.max_bad_steps:
        where = (f"the last good checkpoint, {st.last_checkpoint}, is intact: resume from it with --resume"
                 if st.last_checkpoint else "no checkpoint had been written yet")
        raise TrainingError(f"stopping at step {st.step}: {st.bad_in_row} non-finite losses in a row "
                            f"(--max-bad-steps {cfg.max_bad_steps}); {where}. Lower --lr, raise --warmup-steps, or "
                            "use --precision bf16 / fp32.")


# ---------------------------------------------------------------------------------------------- log, epochs
def _log(run: _Run, grad_norm: torch.Tensor, metrics_f, bar) -> None:
    """One metrics.jsonl record over the window since the last one (all ranks reduce; rank 0 writes)."""
    st, d = run.state, run.d
    sums = st.window.reduce(lambda t: _all_reduce_sum(t, d))
    dt = max(time.perf_counter() - run.t_window, 1e-9)
    rec = {"step": st.step, **summarize(sums), "lr": run.scheduler.get_last_lr()[0],
           "grad_norm": host_read(grad_norm, "log"),
           "tokens_per_s": sums["tokens"] / dt, "skipped_steps": int(sums["skipped"]), "epoch": run.loader.epoch}
    if run.scaler.is_enabled():
        rec["loss_scale"] = run.scaler.get_scale()
        HOST_READS["fp16_scale"] += 1
        rec["overflow_steps"] = int(sums["overflow"])
    if run.peak:
        rec["mfu"] = run.flops * d.world_size / dt / (run.peak * d.world_size)
        rec["tflops_per_s"] = run.flops * d.world_size / dt / 1e12
    if metrics_f is not None:
        metrics_f.write(json.dumps(rec) + "\n")
        metrics_f.flush()
    if bar is not None:
        run.postfix.update(loss=f"{rec['loss']:.3f}", mlm_acc=f"{rec['mlm_acc']:.3f}", nsp_acc=f"{rec['nsp_acc']:.3f}",
                           lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
        bar.set_postfix(run.postfix, refresh=False)
    st.last_log = dict(rec, window_from=run.window_from)
    st.window.reset()
    run.window_from = st.step
    run.t_window, run.flops = time.perf_counter(), 0.0


def _eval_due(run: _Run) -> bool:
    """--eval-every N: every N steps and at the end; unset: at every scheduled checkpoint and at the end (not at a
    stop request's checkpoint: runs stopped and resumed log the same records as uninterrupted ones)."""
    every = run.cfg.eval_every if run.cfg.eval_every is not None else run.cfg.checkpoint_every
    if run.loader.eval_loader is None or run.cfg.eval_every == 0:
        return False
    return run.state.done or bool(every and run.state.step % every == 0)


EVAL_FIELDS = ("mlm_loss_sum", "mlm_count", "nsp_loss_sum", "nsp_count", "mlm_correct", "nsp_correct", "tokens")


def _evaluate(run: _Run, metrics_f, bar) -> dict:
    """MLM and NSP loss and accuracy on the held-out batches (fixed masks), in eval mode under no_grad, each rank
    its slice, summed over ranks; one metrics.jsonl record. No training RNG stream moves: dropout is off, and the
    generators are restored afterwards anyway."""
    model, ev = run.model, run.loader.eval_loader
    sums = torch.zeros(len(EVAL_FIELDS), dtype=torch.float64, device=run.device)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []), torch.no_grad():
        for b in ev:
            x = b.to(run.device, non_blocking=True)
            with run.autocast():
                o = model(**x.model_inputs(static_mlm=True))
            n_mlm, n_seq = (x.mlm_labels != -100).sum().double(), float(len(x))
            tgt = o.mlm_targets
            sums += torch.stack([o.mlm_loss.double() * n_mlm, n_mlm, o.nsp_loss.double() * n_seq,
                                 on_device(n_seq, run.device),
                                 ((o.prediction_scores.argmax(-1) == tgt) & (tgt != -100)).sum().double(),
                                 (o.seq_relationship_score.argmax(-1) == x.is_next).sum().double(),
                                 x.attention_mask.sum().double()])
    model.train(was_training)
    t = dict(zip(EVAL_FIELDS, host_read(_all_reduce_sum(sums, run.d), "eval")))
    mlm_n, nsp_n = max(t["mlm_count"], 1.0), max(t["nsp_count"], 1.0)
    rec = {"step": run.state.step, "eval_mlm_loss": t["mlm_loss_sum"] / mlm_n, "eval_mlm_acc": t["mlm_correct"] / mlm_n,
           "eval_nsp_loss": t["nsp_loss_sum"] / nsp_n, "eval_nsp_acc": t["nsp_correct"] / nsp_n,
           "eval_tokens": int(t["tokens"])}
    if metrics_f is not None:
        metrics_f.write(json.dumps(rec) + "\n")
        metrics_f.flush()
    if bar is not None:
        run.postfix.update(eval_mlm=f"{rec['eval_mlm_loss']:.3f}", eval_mlm_acc=f"{rec['eval_mlm_acc']:.3f}")
        bar.set_postfix(run.postfix, refresh=False)
    run.last_eval = rec
    return rec


def _report_epochs(run: _Run, ended: list, bar) -> None:
    for epoch, sums in ended:
        s = summarize(sums)
        run.state.epochs.append({"epoch": epoch, "step": run.state.step, **s})
        msg = (f"EP{epoch}_train, avg_loss={s['loss']:.4f} (mlm {s['mlm_loss']:.4f}, nsp {s['nsp_loss']:.4f}), "
               f"NSP_acc={100 * s['nsp_acc']:.2f}%, MLM_acc={100 * s['mlm_acc']:.2f}%")
        if run.last_eval:
            e = run.last_eval
            msg += (f"; eval at step {e['step']}: mlm {e['eval_mlm_loss']:.4f}, nsp {e['eval_nsp_loss']:.4f}, "
                    f"NSP_acc={100 * e['eval_nsp_acc']:.2f}%, MLM_acc={100 * e['eval_mlm_acc']:.2f}%")
        if bar is not None:
            bar.write(msg)
        else:
            run.say(msg)


# ---------------------------------------------------------------------------------------------- checkpoints
def _maybe_checkpoint(run: _Run, stop_signum: int) -> None:
    """At --checkpoint-every, at the last step, and at the step a stop request ends (then raise Interrupted)."""
    st, cfg = run.state, run.cfg
    due = (cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0) or st.done
    if due or stop_signum:
        st.last_checkpoint = _save(run)
    if stop_signum and not st.done:
        raise Interrupted(stop_signum, st.step, st.last_checkpoint)


def _save(run: _Run) -> str:
    """Write the checkpoint of the current step (rank 0 writes; every rank contributes its RNG and sums)."""
    st, d, cfg = run.state, run.d, run.cfg
    mine = {"rng": ckpt.rng_state(), **st.rank_state_dict()}
    if d.enabled:
        import torch.distributed as dist

        ranks = [None] * d.world_size
        dist.all_gather_object(ranks, mine)
    else:
        ranks = [mine]

    def write():
        state = {**st.state_dict(), "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                 "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
                 "data": run.loader.state_dict(), "ranks": ranks, "train_config": dataclasses.asdict(cfg),
                 "world_size": d.world_size}
        return ckpt.save_checkpoint(cfg.output_dir, st.step, run.model, run.mcfg.to_dict(), state,
                                    keep=cfg.keep_checkpoints, tokenizer=run.tokenizer, log=run.say)

    path = _on_every_rank(d, write, run_here=d.is_main)  # a full disk on rank 0 stops every rank with its message
    return path or os.path.join(cfg.output_dir, ckpt.CHECKPOINT_DIR, ckpt.checkpoint_name(st.step))


# ---------------------------------------------------------------------------------------------- finish
def _finish(run: _Run) -> dict:
    st, cfg = run.state, run.cfg
    rec = st.last_log
    _refuse_a_non_finite_end(run)
    if run.d.is_main and not rec:  # a resume whose step count was only known once the data was loaded
        run.log(f"done: nothing left to train, {st.last_checkpoint} is already at the run's last step ({st.step}); "
                "raise --max-steps or --epochs to train further")
    elif run.d.is_main:
        run.log(f"done: {st.step} steps; over steps {rec['window_from'] + 1}-{st.step} (the last logged window): "
                f"loss {rec['loss']:.4f} (mlm {rec['mlm_loss']:.4f}, nsp {rec['nsp_loss']:.4f}), MLM acc "
                f"{100 * rec['mlm_acc']:.1f}%, NSP acc {100 * rec['nsp_acc']:.1f}%; checkpoint {st.last_checkpoint}")
    if run.d.is_main and cfg.export_hf:
        export_hf(run.model, cfg.export_hf, run.tokenizer)
        run.log(f"exported a transformers BertForPreTraining + tokenizer to {cfg.export_hf}")
    if run.d.is_main and rec:
        _plot_curves(cfg.output_dir, run.log)
    _barrier(run.d)
    return {**_summary(st.step, rec, st.last_checkpoint, cfg.output_dir, st.epochs), "eval": run.last_eval}


def _refuse_a_non_finite_end(run: _Run) -> None:
    """A run whose last step(s) had non-finite losses (skipped, fewer than --max-bad-steps of them) did not end
    trained: TrainingError (exit 1) instead of "done", its last checkpoint kept for debugging, no --export-hf. A
    bad step followed by good ones is only a warning (the window's logged loss shows the non-finite value)."""
    st, cfg = run.state, run.cfg
    if st.bad_in_row:
        first = st.step - st.bad_in_row + 1
        steps = f"step {st.step}" if st.bad_in_row == 1 else f"steps {first}-{st.step}"
        kept = f"{st.last_checkpoint} is kept for debugging" if st.last_checkpoint else "no checkpoint was written"
        export = f"; --export-hf {cfg.export_hf} was not written" if cfg.export_hf else ""
        raise TrainingError(f"the run ended with non-finite losses: the last {st.bad_in_row} step(s) ({steps}) were "
                            f"skipped, so the model did not train at the end; {kept}{export}. Lower --lr, raise "
                            "--warmup-steps, or use --precision fp32.")
    rec = st.last_log
    if rec and rec.get("skipped_steps"):
        run.say(f"warning: {rec['skipped_steps']} step(s) of the last logged window had non-finite losses and were "
                "skipped (its logged loss includes them); the steps after them were finite")


def _plot_curves(output_dir: str, log) -> None:
    """OUTPUT_DIR/metrics.png (bertfast.train.plot) when matplotlib is installed; a plot that fails never fails the run."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    from bertfast.train.plot import plot_runs

    try:
        log(f"training curves: {plot_runs([output_dir], os.path.join(output_dir, 'metrics.png'))}")
    except Exception as e:  # noqa: BLE001 - the run's results are already saved; the plot is a convenience
        log(f"warning: could not draw {os.path.join(output_dir, 'metrics.png')}: {e}")


def _summary(step, rec, checkpoint, output_dir, epochs) -> dict:
    return {**{k: rec.get(k) for k in ("loss", "mlm_loss", "nsp_loss", "mlm_acc", "nsp_acc")}, "step": step,
            "checkpoint": checkpoint, "output_dir": output_dir, "epochs": epochs}


def _nothing_left(plan: RunPlan, log) -> dict:
    """--resume of a run already at its last step: say so before any data is prepared (rank 0 speaks)."""
    step, path = int(plan.saved_state["step"]), plan.resume_from.path
    import torch.distributed as dist

    joined = dist.is_available() and dist.is_initialized()
    if (dist.get_rank() if joined else int(os.environ.get("RANK", "0"))) == 0:
        log(f"done: nothing left to train, {path} is already at the run's last step ({step}); raise --max-steps or "
            "--epochs to train further")
        if plan.cfg.export_hf:
            from bertfast.model.bert import BertConfig

            with open(os.path.join(path, "config.json")) as f:
                model = BertForPreTraining(BertConfig.from_dict(json.load(f)))
            ckpt.load_checkpoint(path, model)
            export_hf(model, plan.cfg.export_hf, plan.tokenizer)
            log(f"exported a transformers BertForPreTraining + tokenizer to {plan.cfg.export_hf}")
    return _summary(step, {}, path, plan.cfg.output_dir, list(plan.saved_state.get("epochs", [])))


def export_hf(model, output_dir: str, tokenizer=None) -> str:
    """Write a transformers-loadable copy (config.json, model.safetensors, tokenizer) of `model` to output_dir."""
    from bertfast.model.hf import export_hf as _export

    model = getattr(model, "module", model)
    was_training = model.training
    try:
        return _export(model, output_dir, tokenizer)
    finally:
        model.train(was_training)
