"""The default run (`python -m bertfast.pretrain`: tiny preset, built-in corpus, batch 32, max_len 128) for a few
steps, in-process through bertfast.train.trainer.train with the CLI's defaults: the throughput a newcomer sees.

Providers: `bertfast-auto` (the default, --impl auto) and `torch` (--impl torch: the eager reference ops, the
`vs eager` baseline). Each row:
  seconds        median wall time of one optimizer step (the time between consecutive steps' loss, first
                 WARMUP_STEPS steps left out), with its min, quartiles and max over the steps
  tokens_per_s   real (non-padding) tokens per second: the median of the run's metrics.jsonl windows after the first
  wall_s         the whole train() call: data preparation (a cached tokenizer and corpus after the first run),
                 model set-up, the steps and the final checkpoint
Without --benchmark it runs 3 steps on a 200-document corpus as a smoke check (nothing recorded).
"""
import json
import os
import statistics
import time

import pytest
import torch

from bertfast.train.trainer import TrainConfig, train  # the README's entry point

STEPS = int(os.environ.get("BERTFAST_BENCH_DEFAULT_STEPS", "40"))
WARMUP_STEPS = 5  # first steps: allocator and thread-pool warm-up
LOG_EVERY = 5


def _quartiles(xs):
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


@pytest.mark.parametrize("provider", ["bertfast-auto", "torch"])
def test_default_run(record, request, tmp_path, provider):
    timing = request.config.getoption("--benchmark")
    steps = STEPS if timing else 3
    cfg = TrainConfig(impl="auto" if provider == "bertfast-auto" else "torch", max_steps=steps, progress=False,
                      output_dir=str(tmp_path / "run"), log_every=LOG_EVERY if timing else 1,
                      **({} if timing else {"builtin_docs": 200, "vocab_size": 1000}))
    stamps = []

    def hook(step, mlm_loss):  # called once per micro-batch (grad_accum 1: once per step)
        stamps.append(time.perf_counter())
        return mlm_loss

    threads = torch.get_num_threads()
    start = time.perf_counter()
    summary = train(cfg, log=lambda *a, **k: None, loss_hook=hook)
    wall = time.perf_counter() - start
    assert torch.get_num_threads() == threads
    assert summary["step"] == steps and len(stamps) == steps
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        windows = [json.loads(line) for line in f if line.strip()]
    windows = [w for w in windows if "tokens_per_s" in w]
    assert windows and all(w["tokens_per_s"] > 0 for w in windows)
    if not timing:
        return
    per_step = [b - a for a, b in zip(stamps[WARMUP_STEPS:], stamps[WARMUP_STEPS + 1:])]
    q1, q3 = _quartiles(per_step)
    record(op="default_run", mode=f"{steps} steps", provider=provider, shape="tiny b32 s128 builtin",
           dtype="float32" if cfg.precision == "fp32" else cfg.precision, seconds=statistics.median(per_step),
           min_s=min(per_step), q1_s=q1, q3_s=q3, max_s=max(per_step), rounds=len(per_step),
           tokens_per_s=statistics.median(w["tokens_per_s"] for w in windows[1:] or windows), wall_s=wall)
