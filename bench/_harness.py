"""Timing helpers shared by the benchmarks (pytest-benchmark does the timing and statistics)."""
from __future__ import annotations

import time

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(benchmark, fn, *, device, rounds: int | None = None, warmup: int | None = None,
            inner: int | None = None):
    """Times fn() with pytest-benchmark and returns the median seconds per call (None when timing is off).

    The device is synchronised inside the timed call. On CUDA, `inner` calls are made per timed round (so
    launch-bound kernels are not dominated by the synchronisation) and the median is divided by it."""
    dev = torch.device(device)
    if inner is None:
        inner = 10 if dev.type == "cuda" else 1
    if warmup is None:
        warmup = 3 if dev.type == "cuda" else 1

    def call():
        for _ in range(inner):
            out = fn()
        sync(dev)
        return out

    if rounds is None:
        if dev.type == "cuda":
            rounds = 20
        else:  # enough rounds for ~0.3 s of timing (sub-millisecond CPU ops are noisy over 5 rounds)
            start = time.perf_counter()
            call()
            once = time.perf_counter() - start
            rounds = int(min(200, max(5, 0.3 / max(once, 1e-6))))

    benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return None
    return stats.stats.median / inner


def peak_memory(fn, *, device) -> int | None:
    """Peak CUDA memory allocated during fn() above what was allocated before it (None on CPU)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    sync(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    fn()
    sync(dev)
    return torch.cuda.max_memory_allocated(dev) - base


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def skip_unless_triton(device) -> None:
    """Skips the calling benchmark when Triton cannot run on `device` (the rule the ops and tests use)."""
    import pytest

    from bertfast.kernels._launch import triton_unavailable_reason

    reason = triton_unavailable_reason(device)
    if reason is not None:
        pytest.skip(reason)


def run_modes(benchmark, fn, inputs, mode: str, *, device):
    """Median seconds of `mode` ("fwd", "bwd" or "fwd+bwd") for y = fn(*inputs) (None when timing is off); "bwd"
    times torch.autograd.grad alone on one retained graph."""
    import torch as _torch

    dy = _torch.randn_like(fn(*inputs))
    if mode == "fwd":
        return measure(benchmark, lambda: fn(*inputs), device=device)
    if mode == "bwd":
        y = fn(*inputs)
        grad_inputs = [t for t in inputs if t.requires_grad]
        return measure(benchmark, lambda: _torch.autograd.grad(y, grad_inputs, dy, retain_graph=True), device=device)

    def both():
        fn(*inputs).backward(dy)
    return measure(benchmark, both, device=device)
