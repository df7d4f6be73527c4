"""What a pretraining run carries from step to step: the step counter, the metric sums since the last log and
since the epoch began, the per-epoch summaries, the count of non-finite steps in a row and the last checkpoint.

`RunState.state_dict()` / `load_state_dict()` give the parts a checkpoint stores. The on-disk form is the one
checkpoints have always had (`step`, `total_steps`, `epochs`, `bad_in_row`, and per rank `window` /
`epoch_window` as {"dev": [...], "host": [...]} in the field order below), so older checkpoints still resume.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

import torch

# Every value the training loop reads back from the device goes through `host_read`, counted here by purpose, so
# that a test can see how many reads an optimizer step makes (issue 26: at most one small read per step).
HOST_READS: collections.Counter = collections.Counter()


def host_read(t: torch.Tensor, what: str) -> list | float:
    """t's values on the host (.tolist(): one blocking device-to-host copy on a GPU), counted under `what`.

    The one synchronisation allowed: under ``torch.cuda.set_sync_debug_mode("error")`` (the GPU test runs the
    steady-state steps so) it is let through, and any other sync in the step raises."""
    HOST_READS[what] += 1
    if t.device.type != "cuda":
        return t.tolist()
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        return t.tolist()
    finally:
        torch.cuda.set_sync_debug_mode(mode)

# Sums kept on the device, so that a step needs no host sync; the order is the checkpoint's list order.
DEVICE_FIELDS = ("mlm_loss_sum", "mlm_count", "nsp_loss_sum", "nsp_count", "mlm_correct", "nsp_correct")
# Sums known on the host: real tokens and squared lengths (added over ranks when reduced), then counters every
# rank shares (optimizer steps, skipped steps, fp16 overflows).
HOST_FIELDS = ("tokens", "len_sq", "steps", "skipped", "overflow")
_HOST_PER_RANK = 2  # the first two host fields differ per rank and are summed over ranks


class MetricWindow:
    """Sums of the training metrics since the last reset, by name. `reduce` adds them up over all ranks."""

    def __init__(self, device):
        self.device = device
        self.dev = torch.zeros(len(DEVICE_FIELDS), dtype=torch.float64, device=device)
        self.host = dict.fromkeys(HOST_FIELDS, 0.0)

    def reset(self) -> None:
        self.dev.zero_()
        self.host = dict.fromkeys(HOST_FIELDS, 0.0)

    def add_batch(self, values: torch.Tensor, tokens: float, len_sq: float) -> None:
        """values: a float64 tensor in DEVICE_FIELDS order (see `device_values`)."""
        self.dev += values
        self.host["tokens"] += tokens
        self.host["len_sq"] += len_sq

    def count(self, name: str, n: float = 1.0) -> None:
        self.host[name] += n

    def state(self) -> dict:
        return {"dev": host_read(self.dev, "checkpoint"), "host": [self.host[k] for k in HOST_FIELDS]}

    def load(self, s: dict) -> None:
        self.dev = torch.tensor(s["dev"], dtype=torch.float64, device=self.device)
        self.host = dict(zip(HOST_FIELDS, s["host"]))

    def reduce(self, all_reduce_sum) -> dict[str, float]:
        """Every field by name, summed over ranks (the shared counters taken as they are)."""
        per_rank = HOST_FIELDS[:_HOST_PER_RANK]
        packed = torch.cat([self.dev, torch.stack([on_device(self.host[k], self.device) for k in per_rank])])
        packed = host_read(all_reduce_sum(packed.clone()), "metrics")
        sums = dict(zip(DEVICE_FIELDS + per_rank, packed))
        sums.update({k: self.host[k] for k in HOST_FIELDS[_HOST_PER_RANK:]})
        return sums


def on_device(value: float, device) -> torch.Tensor:
    """A host number as a 0-dim float64 tensor on ``device``, written by a fill kernel: ``torch.tensor(v,
    device="cuda")`` copies from pageable host memory and synchronises the stream (a sync every step)."""
    return torch.full((), float(value), dtype=torch.float64, device=device)


def device_values(mlm_loss_sum, mlm_count, nsp_loss_sum, nsp_count, mlm_correct, nsp_correct) -> torch.Tensor:
    """One micro-batch's device sums as a float64 tensor in DEVICE_FIELDS order (tensors or numbers)."""
    dev = mlm_loss_sum.device
    vals = [v.detach().double() if torch.is_tensor(v) else on_device(v, dev)
            for v in (mlm_loss_sum, mlm_count, nsp_loss_sum, nsp_count, mlm_correct, nsp_correct)]
    return torch.stack(vals)


def summarize(sums: dict[str, float]) -> dict[str, float]:
    """Losses and accuracies from reduced sums: `loss` is the mean MLM plus the mean NSP cross-entropy."""
    mlm_n, nsp_n = max(sums["mlm_count"], 1.0), max(sums["nsp_count"], 1.0)
    mlm, nsp = sums["mlm_loss_sum"] / mlm_n, sums["nsp_loss_sum"] / nsp_n
    return {"loss": mlm + nsp, "mlm_loss": mlm, "nsp_loss": nsp, "mlm_acc": sums["mlm_correct"] / mlm_n,
            "nsp_acc": sums["nsp_correct"] / nsp_n}


@dataclass
class RunState:
    """The run's counters and metric sums. `window`: since the last log; `epoch`: since the epoch began."""

    device: torch.device
    total_steps: int
    step: int = 0
    bad_in_row: int = 0  # non-finite steps in a row
    epochs: list[dict] = field(default_factory=list)  # one summary per finished epoch
    last_checkpoint: str | None = None
    last_log: dict = field(default_factory=dict)  # the latest metrics.jsonl record

    def __post_init__(self):
        self.window = MetricWindow(self.device)
        self.epoch = MetricWindow(self.device)

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    def state_dict(self) -> dict:
        """The parts shared by all ranks."""
        return {"step": self.step, "total_steps": self.total_steps, "epochs": list(self.epochs),
                "bad_in_row": self.bad_in_row}

    def rank_state_dict(self) -> dict:
        """This rank's metric sums, not yet reduced (each rank resumes with its own)."""
        return {"window": self.window.state(), "epoch_window": self.epoch.state()}

    def load_state_dict(self, state: dict, rank_state: dict) -> None:
        """Restore from a checkpoint's state (the total steps stay the current run's)."""
        self.step = int(state["step"])
        self.epochs = list(state.get("epochs", []))
        self.bad_in_row = int(state.get("bad_in_row", 0))
        self.window.load(rank_state["window"])
        self.epoch.load(rank_state["epoch_window"])
