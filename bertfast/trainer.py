"""The pretraining loop: AdamW + linear warmup/decay, mixed precision, gradient accumulation, DDP, metrics,
atomic checkpoints and exact resume. `train(TrainConfig(...))` is the programmatic entry point; the CLI
(`python -m bertfast.pretrain`) builds a TrainConfig from its flags and calls it.

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
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from bertfast import checkpoint as ckpt
from bertfast.flops import peak_flops, training_flops
from bertfast.model import PRESETS, BertConfig, BertForPreTraining

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """Everything a run depends on; the CLI flags map 1:1 onto these fields (`--grad-accum` -> grad_accum)."""

    preset: str = "tiny"
    data: list[str] = field(default_factory=lambda: ["builtin"])  # NAME[:RATIO] specs for bertfast.data.load_data
    tokenizer: str | None = None  # hub name / local folder; None trains a WordPiece vocabulary on the corpus
    vocab_size: int = 8192  # size of the trained vocabulary (ignored with --tokenizer)
    builtin_docs: int = 1200  # documents of the built-in corpus
    max_len: int = 128
    epochs: int = 6
    max_steps: int = 0  # > 0: stop after this many optimizer steps (overrides epochs)
    batch_size: int = 32  # sequences per rank per micro-batch
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 30
    clip_grad: float = 1.0  # max global gradient norm; 0 disables clipping
    dropout: float | None = None  # None: the preset's (0.1), hidden and attention
    precision: str = "fp32"
    impl: str = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch CPU threads; 0: torch's default (divided among ranks on one machine)
    output_dir: str = "runs/bertfast"
    checkpoint_every: int = 200  # optimizer steps; 0: only at the end
    keep_checkpoints: int = 3
    resume: bool = False
    seed: int = 0
    log_every: int = 10
    num_workers: int = 0
    max_bad_steps: int = 5  # stop after this many non-finite losses in a row
    export_hf: str | None = None
    progress: bool = True  # the tqdm bar


class ConfigError(ValueError):
    """A bad setting, reported before any work starts. `flag` names the CLI flag."""

    def __init__(self, flag: str, message: str):
        self.flag, self.message = flag, message
        super().__init__(f"argument {flag}: {message}")


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite losses in a row)."""


class Interrupted(Exception):
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption) stopped the run after a whole step, and a checkpoint
    of that step was written: `--resume` continues exactly where it stopped."""

    def __init__(self, signum: int, step: int, checkpoint: str | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}; checkpoint {checkpoint}; "
                         "continue with --resume")


class _StopRequest:
    """While the loop runs, the first SIGINT / SIGTERM only asks it to finish the current step, write a
    checkpoint and stop; another one at least `again_after` seconds later interrupts at once (KeyboardInterrupt).
    Signals within that window count as the first: a terminal's Ctrl-C under torchrun reaches a worker twice,
    once from the terminal and once forwarded by torchrun. Handlers can only be set from the main thread:
    elsewhere the signals keep their own behaviour."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, say, again_after: float = 1.0):
        self.signum: int | None = None
        self._say = say
        self._again_after = again_after
        self._first = 0.0
        self._previous = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self.signum is not None:
            if time.monotonic() - self._first >= self._again_after:
                raise KeyboardInterrupt
            return
        self.signum, self._first = signum, time.monotonic()
        self._say(f"\n{signal.Signals(signum).name}: finishing this step, then writing a checkpoint and stopping "
                  "(send it again to stop at once, without a checkpoint)")


# ---------------------------------------------------------------------------------------------- validation
def validate_config(cfg: TrainConfig) -> None:
    """Raise ConfigError for a setting that cannot work, before anything is loaded or written."""
    def need(cond, flag, msg):
        if not cond:
            raise ConfigError(flag, msg)

    need(cfg.preset in PRESETS, "--preset", f"unknown preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
    need(cfg.batch_size >= 1, "--batch-size", f"must be a positive number of sequences per device, got "
         f"{cfg.batch_size}")
    need(cfg.grad_accum >= 1, "--grad-accum", f"must be >= 1 (1 = no accumulation), got {cfg.grad_accum}")
    need(cfg.epochs >= 1, "--epochs", f"must be >= 1, got {cfg.epochs}")
    need(cfg.max_steps >= 0, "--max-steps", f"must be >= 0 (0 = run --epochs), got {cfg.max_steps}")
    need(math.isfinite(cfg.lr) and cfg.lr > 0, "--lr", f"must be a positive learning rate (e.g. 1e-4), "
         f"got {cfg.lr}")
    need(math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0, "--weight-decay",
         f"must be >= 0, got {cfg.weight_decay}")
    need(cfg.warmup_steps >= 0, "--warmup-steps", f"must be >= 0, got {cfg.warmup_steps}")
    need(cfg.clip_grad >= 0, "--clip-grad", f"must be >= 0 (0 disables clipping), got {cfg.clip_grad}")
    need(cfg.dropout is None or 0 <= cfg.dropout < 1, "--dropout", f"must be in [0, 1), got {cfg.dropout}")
    need(8 <= cfg.max_len <= 8192, "--max-len", f"must be in [8, 8192] tokens, got {cfg.max_len}")
    need(cfg.vocab_size >= 16, "--vocab-size", f"must be >= 16, got {cfg.vocab_size}")
    need(cfg.builtin_docs >= 2, "--builtin-docs", f"must be >= 2, got {cfg.builtin_docs}")
    need(cfg.precision in PRECISIONS, "--precision", f"choose one of {', '.join(PRECISIONS)}, got "
         f"{cfg.precision!r}")
    from bertfast.ops import IMPLS
    need(cfg.impl in IMPLS, "--impl", f"choose one of {', '.join(IMPLS)}, got {cfg.impl!r}")
    need(cfg.checkpoint_every >= 0, "--checkpoint-every", f"must be >= 0 (0 = only at the end), got "
         f"{cfg.checkpoint_every}")
    need(cfg.keep_checkpoints >= 1, "--keep-checkpoints", f"must be >= 1, got {cfg.keep_checkpoints}")
    need(cfg.log_every >= 1, "--log-every", f"must be >= 1, got {cfg.log_every}")
    need(cfg.num_workers >= 0, "--num-workers", f"must be >= 0, got {cfg.num_workers}")
    need(cfg.max_bad_steps >= 1, "--max-bad-steps", f"must be >= 1, got {cfg.max_bad_steps}")
    need(cfg.threads >= 0, "--threads", f"must be >= 0, got {cfg.threads}")
    need(bool(cfg.data), "--data", "give at least one corpus (e.g. builtin)")
    dev = cfg.device
    if dev != "auto":
        try:
            d = torch.device(dev)
        except (RuntimeError, ValueError):
            raise ConfigError("--device", f"{dev!r} is not a device; use auto, cpu, cuda or cuda:N") from None
        need(d.type in ("cpu", "cuda"), "--device", f"{dev!r}: bertfast trains on cpu or cuda")
        if d.type == "cuda":
            need(torch.cuda.is_available(), "--device", f"{dev!r} asked but no CUDA GPU is visible; use "
                 "--device cpu (or auto)")
            need(d.index is None or d.index < torch.cuda.device_count(), "--device",
                 f"{dev!r}: only {torch.cuda.device_count()} GPU(s) visible")
    on_cpu = torch.device(dev).type == "cpu" if dev != "auto" else not torch.cuda.is_available()
    if cfg.impl == "triton" and on_cpu:
        from bertfast.kernels._launch import interpreter_on

        need(interpreter_on(), "--impl", "triton on the CPU needs Triton's interpreter (slow: it is for tests), which "
             "is off: set TRITON_INTERPRET=1 in the environment, or use --impl auto (or torch) on the CPU")
    _check_writable(cfg.output_dir, "--output-dir")
    if cfg.export_hf:
        _check_writable(cfg.export_hf, "--export-hf")
    if cfg.resume:
        found = ckpt.find_latest_checkpoint(cfg.output_dir)
        if found is None or found.step < 0:
            why = ("; ".join(found.skipped) if found else
                   f"no checkpoint under {os.path.join(cfg.output_dir, ckpt.CHECKPOINT_DIR)}")
            raise ConfigError("--resume", f"nothing to resume in --output-dir {cfg.output_dir!r} ({why}). Drop "
                              "--resume to start a new run, or point --output-dir at the run to continue.")
        _check_preset_matches(cfg, found.path)
    else:
        found = ckpt.find_latest_checkpoint(cfg.output_dir)  # None without checkpoints; step -1: all corrupt
        if found is not None and found.step >= 0:
            raise ConfigError("--output-dir", f"{cfg.output_dir!r} already holds a run (its latest checkpoint is at "
                              f"step {found.step}); a new run there would mix its metrics and checkpoints with that "
                              "one's. Continue it with --resume, or choose a new --output-dir.")


def _check_writable(path: str, flag: str) -> None:
    probe_dir = os.path.abspath(path)
    while not os.path.exists(probe_dir):  # the nearest existing ancestor must let us create the folder
        parent = os.path.dirname(probe_dir)
        if parent == probe_dir:
            break
        probe_dir = parent
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(flag, f"{path!r} exists and is not a folder; choose another path")
    if not (os.path.isdir(probe_dir) and os.access(probe_dir, os.W_OK | os.X_OK)):
        raise ConfigError(flag, f"{path!r} is not writable ({probe_dir!r} does not allow creating files); "
                          "choose a folder you can write to")


def _check_preset_matches(cfg: TrainConfig, path: str) -> None:
    """The part of the model config known before the data is loaded must match the checkpoint's."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return  # verified already; the full check after loading reports anything else
    want = _model_fields(cfg)
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {v!r}" for k, v in want.items() if saved.get(k) != v]
    if diff:
        raise ConfigError("--resume", f"checkpoint {os.path.basename(path)} was written for another model "
                          f"configuration ({', '.join(diff)}). Resume with the same --preset / --max-len / "
                          "--dropout, or use a new --output-dir.")


def _model_fields(cfg: TrainConfig) -> dict:
    layers, hidden = PRESETS[cfg.preset]
    d = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
             intermediate_size=4 * hidden, max_len=cfg.max_len)
    if cfg.dropout is not None:
        d.update(dropout=cfg.dropout, attention_dropout=cfg.dropout)
    return d


def build_model_config(cfg: TrainConfig, tokenizer) -> BertConfig:
    extra = {k: v for k, v in _model_fields(cfg).items()
             if k not in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")}
    return BertConfig.preset(cfg.preset, vocab_size=len(tokenizer), pad_token_idx=tokenizer.pad_token_id, **extra)


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


# ---------------------------------------------------------------------------------------------- distributed
@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device_type: str) -> _Dist:
    """The ranks of this run: an already initialized default process group (a caller's own launcher) is used
    as it is and left for its owner to destroy; otherwise torchrun's environment (WORLD_SIZE > 1) starts one."""
    import torch.distributed as dist

    joined = dist.is_available() and dist.is_initialized()
    if joined:
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return _Dist()
        rank = int(os.environ["RANK"])
    d = _Dist(rank=rank, world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")),
              local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))
    if joined:
        return d
    if device_type == "cuda":
        torch.cuda.set_device(d.local_rank)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    d.initialized_here = True
    return d


def _resolve_device(cfg: TrainConfig, d: _Dist) -> torch.device:
    if cfg.device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(cfg.device)
    if dev.type == "cuda":
        dev = torch.device("cuda", d.local_rank if d.enabled else (dev.index or 0))
    return dev


def _barrier(d: _Dist):
    if d.enabled:
        import torch.distributed as dist

        dist.barrier()


def _all_reduce_sum(t: torch.Tensor, d: _Dist) -> torch.Tensor:
    if d.enabled:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# ---------------------------------------------------------------------------------------------- metrics
# per-step sums kept on the device (no host sync per step): index -> meaning
_MLM_SUM, _MLM_N, _NSP_SUM, _NSP_N, _MLM_OK, _NSP_OK = range(6)
_NDEV = 6
# host-side sums (known from the CPU batch): real tokens, sum of squared lengths, steps, skipped, overflow
_TOK, _LEN2, _STEPS, _SKIPPED, _OVERFLOW = range(5)
_NHOST = 5


class _Window:
    """Sums since the last log (or epoch end); all ranks reduce them together when read."""

    def __init__(self, device):
        self.device = device
        self.dev = torch.zeros(_NDEV, dtype=torch.float64, device=device)
        self.host = [0.0] * _NHOST

    def reset(self):
        self.dev.zero_()
        self.host = [0.0] * _NHOST

    def state(self) -> dict:
        return {"dev": self.dev.cpu().tolist(), "host": list(self.host)}

    def load(self, s: dict):
        self.dev = torch.tensor(s["dev"], dtype=torch.float64, device=self.device)
        self.host = list(s["host"])

    def reduce(self, d: _Dist) -> tuple[list[float], list[float]]:
        """(device sums, host sums) over all ranks (host sums: token counts add up; step counters are shared)."""
        packed = torch.cat([self.dev, torch.tensor(self.host[:2], dtype=torch.float64, device=self.device)])
        packed = _all_reduce_sum(packed.clone(), d).tolist()
        return packed[:_NDEV], packed[_NDEV:] + self.host[2:]


def _summary(dev: list[float], host: list[float]) -> dict:
    mlm = dev[_MLM_SUM] / max(dev[_MLM_N], 1.0)
    nsp = dev[_NSP_SUM] / max(dev[_NSP_N], 1.0)
    return {"loss": mlm + nsp, "mlm_loss": mlm, "nsp_loss": nsp, "mlm_acc": dev[_MLM_OK] / max(dev[_MLM_N], 1.0),
            "nsp_acc": dev[_NSP_OK] / max(dev[_NSP_N], 1.0)}


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


def train(cfg: TrainConfig, *, log=print, loss_hook=None) -> dict:
    """Pretrain as `cfg` says; returns a summary {"step", "loss", "mlm_loss", "nsp_loss", "mlm_acc", "nsp_acc",
    "checkpoint", "output_dir", "epochs": [per-epoch summaries]}.

    Data-parallel under torchrun's variables (WORLD_SIZE > 1), or inside a default process group the caller
    already started (then left for the caller to destroy).

    A first SIGINT / SIGTERM during the loop (when train() runs in the main thread) finishes the current step,
    writes its checkpoint and raises Interrupted; a second one raises KeyboardInterrupt at once.

    loss_hook(step, mlm_loss) -> mlm_loss: a test hook applied to each micro-batch's MLM loss before it is
    logged and back-propagated (e.g. to inject a non-finite value). Raises ConfigError for bad settings (before
    any work), TrainingError when the run must stop, checkpoint.CheckpointError for a checkpoint that does not
    fit."""
    validate_config(cfg)
    from bertfast import ops
    from bertfast.data import load_data

    dev_type = "cuda" if (cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())) \
        else "cpu"
    dist_ = _setup_distributed(dev_type)
    threads = torch.get_num_threads()
    try:
        return _train(cfg, dist_, log, loss_hook, ops, load_data)
    finally:
        torch.set_num_threads(threads)  # the run's setting is not left behind for the caller
        if dist_.initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(cfg, d: _Dist, log, loss_hook, ops, load_data) -> dict:
    device = _resolve_device(cfg, d)
    threads = cfg.threads or max(1, torch.get_num_threads() // (d.local_world_size if device.type == "cpu" else 1))
    torch.set_num_threads(threads)
    out = cfg.output_dir
    if d.is_main:
        os.makedirs(out, exist_ok=True)

    found = ckpt.find_latest_checkpoint(out) if cfg.resume else None
    if found is not None:
        for msg in found.skipped:
            _say(f"warning: {msg}; using the previous good checkpoint {os.path.basename(found.path)}", d, log)

    # ---- data (rank 0 first: it trains / caches the tokenizer and the processed corpus; the others reuse them)
    if not d.is_main:
        _barrier(d)
    tokenizer, loader = load_data(
        cfg.data, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size, max_len=cfg.max_len,
        batch_size=cfg.batch_size, seed=cfg.seed, num_workers=cfg.num_workers, rank=d.rank,
        world_size=d.world_size, output_dir=out, drop_last=True, builtin_docs=cfg.builtin_docs,
        pin_memory=device.type == "cuda")
    if d.is_main:
        _barrier(d)
    batches_per_epoch = len(loader)
    total_steps = cfg.max_steps or (cfg.epochs * batches_per_epoch) // cfg.grad_accum
    if total_steps < 1:
        raise ConfigError("--grad-accum", f"{cfg.grad_accum} micro-batches per step but an epoch has only "
                          f"{batches_per_epoch} batches: lower --grad-accum or --batch-size, or set --max-steps")

    # ---- model, optimizer, schedule, precision
    mcfg = build_model_config(cfg, tokenizer)
    _seed_everything(cfg.seed)  # the same initial weights on every rank
    model = BertForPreTraining(mcfg, impl=cfg.impl).to(device)
    model.check_inputs = device.type != "cuda"  # value checks sync the host; the collator's batches are valid
    # fused: one kernel over all parameters (CPU and CUDA); on 2 CPU cores it is 6x faster than foreach at
    # BERT-base (55 vs 345 ms a step)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-6,
                                  fused=True)
    scheduler = LinearWarmupDecay(optimizer, min(cfg.warmup_steps, total_steps), total_steps)
    amp_dtype = PRECISIONS[cfg.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext

    step = 0
    epoch_stats: list[dict] = []
    window, epoch_win = _Window(device), _Window(device)
    bad_in_row = 0
    last_ckpt = None
    if found is not None:
        ckpt.check_model_config(found.path, mcfg.to_dict())
        state = ckpt.load_checkpoint(found.path, model, map_location="cpu")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        try:
            loader.load_state_dict(state["data"])
        except ValueError as e:
            raise ConfigError("--resume", f"{e}. Resume with the same --batch-size, --seed, --data and number of "
                              "processes as the checkpointed run.") from None
        step = int(state["step"])
        saved_world = int(state.get("world_size", 1))
        if saved_world != d.world_size:
            raise ConfigError("--resume", f"checkpoint {os.path.basename(found.path)} was written by {saved_world} "
                              f"process(es), this run has {d.world_size}: resume with the same number of processes")
        mine = state["ranks"][d.rank]
        window.load(mine["window"])
        epoch_win.load(mine["epoch_window"])
        epoch_stats = list(state.get("epochs", []))
        bad_in_row = int(state.get("bad_in_row", 0))
        saved_total = state.get("total_steps")
        if saved_total is not None and saved_total != total_steps:
            _say(f"warning: the checkpoint's run had {saved_total} total steps, this one {total_steps}: the "
                 "learning-rate schedule changes from here", d, log)
        resume_rng = mine["rng"]
        last_ckpt = found.path
        if d.is_main:
            _truncate_metrics(os.path.join(out, "metrics.jsonl"), step)
    else:
        resume_rng = None

    ddp_model = model
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    # ---- what this run is
    if d.is_main:
        with open(os.path.join(out, "train_config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
        with open(os.path.join(out, "model_config.json"), "w") as f:
            json.dump(mcfg.to_dict(), f, indent=2)
        tok_dir = os.path.join(out, "tokenizer")
        if not os.path.isdir(tok_dir):
            tokenizer.save_pretrained(tok_dir)
    impls = ops.describe(device, cfg.impl)
    nparams = model.num_parameters()
    global_batch = cfg.batch_size * d.world_size * cfg.grad_accum
    _say("bertfast pretraining\n  config: " + json.dumps(dataclasses.asdict(cfg)), d, log)
    _say(f"  device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                                  f" ({threads} threads)") + f", world size {d.world_size}, precision {cfg.precision}",
         d, log)
    _say("  ops: " + ", ".join(f"{k}={v}" for k, v in impls.items()), d, log)
    _say(f"  model: {cfg.preset} ({mcfg.num_hidden_layers} layers x {mcfg.hidden_size}, vocab {mcfg.vocab_size}), "
         f"{nparams:,} parameters", d, log)
    _say(f"  data: {len(loader.pairs):,} sequence pairs, {batches_per_epoch} global batches per epoch; global batch "
         f"{global_batch} = {cfg.batch_size} per device x {d.world_size} device(s) x {cfg.grad_accum} accumulation; "
         f"{total_steps} steps", d, log)
    if found is not None:
        _say(f"  resuming from {found.path} at step {step} (epoch {loader.epoch}, batch {loader.consumed})", d, log)

    # ---- the loop
    seed_rng = resume_rng is None
    if seed_rng:
        _seed_everything(cfg.seed + 1000003 * d.rank + 1)  # dropout: different per rank, fixed per seed
    else:
        ckpt.set_rng_state(resume_rng)
    peak = peak_flops(torch.cuda.get_device_name(device), cfg.precision) if device.type == "cuda" else None
    metrics_path = os.path.join(out, "metrics.jsonl")
    # a new run starts the file afresh (metrics of an earlier attempt that never checkpointed are dropped); a
    # resumed one appends to the file cut back to its checkpoint
    metrics_f = open(metrics_path, "a" if found is not None else "w") if d.is_main else None
    bar = None
    if d.is_main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True, file=sys.stderr)

    it = None
    fresh_iters = 0

    def next_batch():
        nonlocal it, fresh_iters
        while True:
            if it is None:
                it = iter(loader)
                fresh_iters += 1
                if fresh_iters > 2:
                    raise TrainingError("the data loader yields no batches")
            epoch = loader.epoch
            try:
                b = next(it)
            except StopIteration:
                it = None
                continue
            fresh_iters = 0
            return b, epoch, loader.consumed == batches_per_epoch

    params = [p for p in model.parameters() if p.requires_grad]
    t_window = time.perf_counter()
    flops_window = 0.0
    result = {}
    stop = _StopRequest(lambda m: print(m, file=sys.stderr, flush=True) if d.is_main else None)
    stop.install()
    try:
        while step < total_steps:
            micro = [next_batch() for _ in range(cfg.grad_accum)]
            n_mlm = [int((b.mlm_labels != -100).sum()) for b, _, _ in micro]
            n_seq = [len(b) for b, _, _ in micro]
            counts = torch.tensor([sum(n_mlm), sum(n_seq)], dtype=torch.float64, device=device)
            g_mlm, g_seq = (max(x, 1.0) for x in _all_reduce_sum(counts, d).tolist())
            finite = torch.ones((), dtype=torch.bool, device=device)
            ended = []
            for i, (b, epoch, last_of_epoch) in enumerate(micro):
                lens = b.attention_mask.sum(1, dtype=torch.float64)
                tokens, len2 = float(lens.sum()), float((lens * lens).sum())
                flops_window += training_flops(mcfg, tokens, len2, n_mlm[i], n_seq[i])
                x = b.to(device, non_blocking=True)
                sync = contextlib.nullcontext() if (not d.enabled or i == len(micro) - 1) else ddp_model.no_sync()
                with sync:
                    with autocast():
                        o = ddp_model(**x.model_inputs(static_mlm=True))
                    mlm_loss = o.mlm_loss if loss_hook is None else loss_hook(step, o.mlm_loss)
                    mlm_sum = mlm_loss.float() * n_mlm[i]
                    nsp_sum = o.nsp_loss.float() * n_seq[i]
                    loss = (mlm_sum / g_mlm + nsp_sum / g_seq) * d.world_size  # DDP averages over ranks
                    scaler.scale(loss).backward()
                with torch.no_grad():
                    finite &= torch.isfinite(loss.detach())
                    tgt = o.mlm_targets
                    mlm_ok = ((o.prediction_scores.argmax(-1) == tgt) & (tgt != -100)).sum()
                    nsp_ok = (o.seq_relationship_score.argmax(-1) == x.is_next).sum()
                    vals = torch.stack([mlm_sum.detach().double(), torch.tensor(float(n_mlm[i]), device=device,
                                        dtype=torch.float64), nsp_sum.detach().double(),
                                        torch.tensor(float(n_seq[i]), device=device, dtype=torch.float64),
                                        mlm_ok.double(), nsp_ok.double()])
                    for w in (window, epoch_win):
                        w.dev += vals
                        w.host[_TOK] += tokens
                        w.host[_LEN2] += len2
                if last_of_epoch:
                    ended.append((epoch, epoch_win.reduce(d)))
                    epoch_win.reset()

            # ---- the update (or a skipped step)
            if scaler.is_enabled():
                scaler.unscale_(optimizer)
            max_norm = cfg.clip_grad if cfg.clip_grad > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            # one host sync per step for three flags; under DDP the MAX over ranks makes every rank skip the same
            # steps and stop at the same step when any of them got a signal
            flags = torch.stack([(~finite).double(), (~torch.isfinite(grad_norm)).double(),
                                 torch.full((), float(stop.signum or 0), dtype=torch.float64, device=device)])
            if d.enabled:
                import torch.distributed as dist

                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            loss_bad, grad_bad, stop_signum = flags.tolist()
            loss_bad, grad_bad, stop_signum = loss_bad > 0, grad_bad > 0, int(stop_signum)
            bad = loss_bad or (grad_bad and not scaler.is_enabled())
            if bad:
                bad_in_row += 1
                window.host[_SKIPPED] += 1
                if scaler.is_enabled():
                    scaler.update()  # lowers the scale, as after an overflow
            else:
                bad_in_row = 0
                if scaler.is_enabled():
                    scale = scaler.get_scale()
                    scaler.step(optimizer)  # skips the update itself if a gradient overflowed
                    scaler.update()
                    if scaler.get_scale() < scale:
                        window.host[_OVERFLOW] += 1
                else:
                    optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            window.host[_STEPS] += 1
            if bar is not None:
                bar.update(1)

            if bad_in_row >= cfg.max_bad_steps:
                where = (f"the last good checkpoint, {last_ckpt}, is intact: resume from it with --resume"
                         if last_ckpt else "no checkpoint had been written yet")
                raise TrainingError(
                    f"stopping at step {step}: {bad_in_row} non-finite losses in a row (--max-bad-steps "
                    f"{cfg.max_bad_steps}); {where}. Lower --lr, raise --warmup-steps, or use --precision bf16 / "
                    "fp32.")

            # ---- logs
            if step % cfg.log_every == 0 or step == total_steps:
                dsum, hsum = window.reduce(d)
                now = time.perf_counter()
                dt = max(now - t_window, 1e-9)
                rec = {"step": step, **_summary(dsum, hsum), "lr": scheduler.get_last_lr()[0],
                       "grad_norm": float(grad_norm), "tokens_per_s": hsum[_TOK] / dt,
                       "skipped_steps": int(hsum[_SKIPPED]), "epoch": loader.epoch}
                if scaler.is_enabled():
                    rec["loss_scale"] = scaler.get_scale()
                    rec["overflow_steps"] = int(hsum[_OVERFLOW])
                if peak:
                    rec["mfu"] = flops_window * d.world_size / dt / (peak * d.world_size)
                    rec["tflops_per_s"] = flops_window * d.world_size / dt / 1e12
                if metrics_f is not None:
                    metrics_f.write(json.dumps(rec) + "\n")
                    metrics_f.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", mlm_acc=f"{rec['mlm_acc']:.3f}",
                                    nsp_acc=f"{rec['nsp_acc']:.3f}", lr=f"{rec['lr']:.2e}",
                                    tok_s=f"{rec['tokens_per_s']:.0f}", refresh=False)
                result = rec
                window.reset()
                t_window, flops_window = time.perf_counter(), 0.0

            for epoch, (dsum, hsum) in ended:
                s = _summary(dsum, hsum)
                epoch_stats.append({"epoch": epoch, "step": step, **s})
                msg = (f"EP{epoch}_train, avg_loss={s['loss']:.4f} (mlm {s['mlm_loss']:.4f}, nsp "
                       f"{s['nsp_loss']:.4f}), NSP_acc={100 * s['nsp_acc']:.2f}%, MLM_acc={100 * s['mlm_acc']:.2f}%")
                if bar is not None:
                    bar.write(msg)
                else:
                    _say(msg, d, log)

            # ---- checkpoints
            due = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == total_steps
            if due or stop_signum:  # a stop writes the checkpoint of the step it stops at
                last_ckpt = _save(cfg, d, model, mcfg, optimizer, scheduler, scaler, loader, step, total_steps,
                                  window, epoch_win, epoch_stats, bad_in_row)
            if stop_signum and step < total_steps:
                raise Interrupted(stop_signum, step, last_ckpt)
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
        if metrics_f is not None:
            metrics_f.close()

    if d.is_main:
        if result:
            log(f"done: {step} steps; last logged loss {result['loss']:.4f}, NSP acc "
                f"{100 * result['nsp_acc']:.1f}%; checkpoint {last_ckpt}")
        else:  # --resume of a run that had already reached its last step
            log(f"done: nothing left to train, {last_ckpt} is already at the run's last step ({step}); raise "
                "--max-steps or --epochs to train further")
        if cfg.export_hf:
            export_hf(model, cfg.export_hf, tokenizer)
            log(f"exported a transformers BertForPreTraining + tokenizer to {cfg.export_hf}")
    _barrier(d)
    return {**{k: result.get(k) for k in ("step", "loss", "mlm_loss", "nsp_loss", "mlm_acc", "nsp_acc")},
            "step": step, "checkpoint": last_ckpt, "output_dir": out, "epochs": epoch_stats}


def _save(cfg, d, model, mcfg, optimizer, scheduler, scaler, loader, step, total_steps, window, epoch_win,
          epoch_stats, bad_in_row) -> str | None:
    # per-rank parts: RNG states and the metric sums not yet reduced (each rank resumes with its own)
    mine = {"rng": ckpt.rng_state(), "window": window.state(), "epoch_window": epoch_win.state()}
    if d.enabled:
        import torch.distributed as dist

        ranks = [None] * d.world_size
        dist.all_gather_object(ranks, mine)
    else:
        ranks = [mine]
    path = None
    if d.is_main:
        state = {"step": step, "total_steps": total_steps, "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                 "data": loader.state_dict(), "ranks": ranks, "epochs": epoch_stats, "bad_in_row": bad_in_row,
                 "train_config": dataclasses.asdict(cfg), "world_size": d.world_size}
        path = ckpt.save_checkpoint(cfg.output_dir, step, model, mcfg.to_dict(), state, keep=cfg.keep_checkpoints)
    else:
        path = os.path.join(cfg.output_dir, ckpt.CHECKPOINT_DIR, ckpt.checkpoint_name(step))
    _barrier(d)
    return path


def export_hf(model, output_dir: str, tokenizer=None) -> str:
    """Write a transformers-loadable copy (config.json, model.safetensors, tokenizer) of `model` to output_dir."""
    from bertfast.hf import export_hf as _export

    model = getattr(model, "module", model)
    was_training = model.training
    try:
        return _export(model, output_dir, tokenizer)
    finally:
        model.train(was_training)


__all__ = ["TrainConfig", "ConfigError", "TrainingError", "Interrupted", "train", "validate_config",
           "param_groups", "LinearWarmupDecay", "export_hf", "build_model_config"]
