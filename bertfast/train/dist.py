"""Data parallelism and signals for the trainer: the ranks of a run (torchrun's variables or a caller's process
group), its device, collectives that turn one rank's failure into every rank's error, and the graceful stop on
SIGINT / SIGTERM."""
from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only: train_config does not import this module's users
    from bertfast.train.config import TrainConfig


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite losses in a row)."""


class PeerFailed(TrainingError):
    """Another rank failed (bad data, a full disk, ...); its error, repeated here, is the cause. Every rank raises,
    so whichever one torchrun reports as the root cause names the real error, not a broken connection."""


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


# ---------------------------------------------------------------------------------------------- distributed
@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    initialized_here: bool = False
    prep_group: object = None  # the long-timeout group of data preparation (see _preparation_group)

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
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", timeout=_collective_timeout())
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


TIMEOUT_ENV = "BERTFAST_DIST_TIMEOUT_S"  # the training collectives' timeout in seconds (tests shorten it)
PREPARATION_TIMEOUT = timedelta(days=365)  # waiting for rank 0's data preparation: as long as it takes


def _collective_timeout() -> timedelta | None:
    """The process group's timeout: torch's default (10 minutes with NCCL, 30 with gloo) unless TIMEOUT_ENV
    gives one."""
    value = os.environ.get(TIMEOUT_ENV)
    return timedelta(seconds=float(value)) if value else None


def _preparation_group(d: _Dist):
    """A gloo group over every rank whose collectives wait PREPARATION_TIMEOUT: the ranks that wait while rank 0
    prepares the corpus (hours for a real one) block in it, not in the default group, whose timeout (10 minutes
    with NCCL) would kill the run before its first step; training collectives keep the default group and its
    timeout. Created once (collectively: every rank calls this at the same point)."""
    if d.prep_group is None and d.enabled:
        import torch.distributed as dist

        d.prep_group = dist.new_group(backend="gloo", timeout=PREPARATION_TIMEOUT)
    return d.prep_group


def _on_every_rank(d: _Dist, fn, *, run_here: bool = True, group=None):
    """fn() where run_here, then a collective in place of a barrier: when fn failed on any rank, that rank re-raises
    its error and the others raise PeerFailed with its message, instead of crashing on the dead rank's broken
    connection (which torchrun would then report as the root cause). ``group``: the process group of that
    collective (default: the default one, with its timeout)."""
    error, result = None, None
    if run_here:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below on this rank, reported to the others
            error = e
    if d.enabled:
        import torch.distributed as dist

        seen = [None] * d.world_size
        dist.all_gather_object(seen, None if error is None else f"{type(error).__name__}: {error}", group=group)
        failed = [(r, msg) for r, msg in enumerate(seen) if msg is not None]
        if failed and error is None:
            r, msg = failed[0]
            raise PeerFailed(f"rank {r} failed, so rank {d.rank} stops too: {msg}")
    if error is not None:
        raise error
    return result


def _all_reduce_sum(t: torch.Tensor, d: _Dist) -> torch.Tensor:
    if d.enabled:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _select_device(cfg: TrainConfig, d: _Dist) -> torch.device:
    """The run's device; a GPU is also made the current one (Triton launches, and anything else that uses the
    current device rather than the tensors', then runs on it, not on GPU 0)."""
    dev = _resolve_device(cfg, d)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev
