"""Benchmark: one optimizer step at BERT-base's parameter shapes (158 tensors, 110M float32 parameters, the
trainer's two param groups): bertfast's LAMB (foreach) beside torch's fused AdamW (the trainer's default) and
torch's foreach AdamW.

    pytest bench/bench_optim.py               each body once, untimed (smoke check)
    pytest bench/bench_optim.py --benchmark   timed; results go to bench/results and bench/RESULTS.md
    python bench/bench_optim.py [--preset base] [--steps 5]   prints median ms per step and LAMB / fused AdamW,
                                                              writes nothing

Providers: "torch" (torch.optim.AdamW(fused=True), the baseline), "adamw-foreach" (torch.optim.AdamW(foreach=True))
and "lamb" (bertfast.train.optim.Lamb, with global gradient pre-normalisation as NVIDIA's recipe). Parameters and
gradients float32 on the device (a GPU when there is one).

Bytes: an Adam-type step must read p, g, m, v and write p, m, v: 7 x 4 bytes per parameter, the figure used for
every provider, so LAMB's extra passes (the norms of w and of the update, the pre-normalisation) show as lower GB/s.
FLOPs are not reported: the step is memory-bound.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import bench_device, measure, sync  # noqa: E402

DEV = bench_device()
PROVIDERS = ["torch", "adamw-foreach", "lamb"]
LR, WD = 1e-4, 0.01


def bert_param_shapes(preset: str = "base") -> list[torch.Size]:
    """The trainable parameters' shapes of BertForPreTraining at `preset` (built on the meta device: no memory)."""
    from bertfast import BertConfig, BertForPreTraining

    with torch.device("meta"):
        model = BertForPreTraining(BertConfig.preset(preset, vocab_size=30522))
    return [p.shape for p in model.parameters() if p.requires_grad]


def make_params(shapes, device) -> list[torch.nn.Parameter]:
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, device=device) * 0.02)
        p.grad = torch.randn(s, device=device) * 1e-3
        params.append(p)
    return params


def make_optimizer(provider: str, params):
    """The trainer's groups (bertfast.train.trainer.param_groups): decay on >= 2-d tensors, none on the 1-d ones."""
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": WD},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    if provider == "torch":
        return torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.999), eps=1e-6, fused=True)
    if provider == "adamw-foreach":
        return torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.999), eps=1e-6, foreach=True)
    if provider == "lamb":
        from bertfast.train.optim import Lamb

        return Lamb(groups, lr=LR, betas=(0.9, 0.999), eps=1e-6, max_grad_norm=1.0)
    raise ValueError(f"unknown provider {provider!r}")


def step_bytes(params) -> int:
    return 7 * 4 * sum(p.numel() for p in params)  # read p, g, m, v; write p, m, v (float32)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_optimizer_step(benchmark, record, provider):
    shapes = bert_param_shapes("base")
    params = make_params(shapes, DEV)
    opt = make_optimizer(provider, params)
    opt.step()  # creates the state (not timed)
    s = measure(benchmark, opt.step, device=DEV, inner=1)
    record(op="optimizer_step", mode="step", provider=provider, shape="bert-base", dtype="float32", seconds=s,
           bytes=step_bytes(params))
    assert all(torch.isfinite(p).all() for p in params[:3])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Time one optimizer step at BERT parameter shapes (prints only).")
    ap.add_argument("--preset", default="base")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per optimizer (after one untimed)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    shapes = bert_param_shapes(args.preset)
    n = sum(torch.Size(s).numel() for s in shapes)
    print(f"{args.preset}: {len(shapes)} tensors, {n / 1e6:.1f}M parameters, float32 on {DEV}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    medians = {}
    for provider in PROVIDERS:
        params = make_params(shapes, DEV)
        opt = make_optimizer(provider, params)
        opt.step()
        sync(DEV)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            opt.step()
            sync(DEV)
            times.append(time.perf_counter() - t0)
        medians[provider] = statistics.median(times)
        gbs = step_bytes(params) / medians[provider] / 1e9
        print(f"  {provider:14s} {1e3 * medians[provider]:9.1f} ms/step (min {1e3 * min(times):.1f}, max "
              f"{1e3 * max(times):.1f})  {gbs:6.1f} GB/s")
        del opt, params
    print(f"LAMB / fused AdamW: {medians['lamb'] / medians['torch']:.2f}x; LAMB / foreach AdamW: "
          f"{medians['lamb'] / medians['adamw-foreach']:.2f}x")
    after = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load:
        print(f"load average (1, 5, 15 min) before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, after "
              f"{after[0]:.2f} {after[1]:.2f} {after[2]:.2f}; {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
