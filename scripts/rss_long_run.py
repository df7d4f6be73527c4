"""Host memory over a long run: the default run (tiny preset, built-in corpus) for --steps optimizer steps in this
process, its resident set size (VmRSS) sampled every --every steps; prints the samples and the ratio of the last to
the one at --reference (issue 26's bar: a 1600-step run within 1.15x of its RSS at step 400). Exit 1 over --limit.

    python scripts/rss_long_run.py --output-dir /tmp/rss [--steps 1600 --reference 400 --limit 1.15]
"""
from __future__ import annotations

import argparse
import sys


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", required=True, help="the run's folder (a fresh one: the run starts anew)")
    p.add_argument("--steps", type=int, default=1600)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--reference", type=int, default=400, help="the step whose RSS the last one is compared with")
    p.add_argument("--limit", type=float, default=1.15)
    args = p.parse_args(argv)
    if not 0 < args.reference <= args.steps:
        p.error(f"--reference must be in 1..--steps ({args.steps}), got {args.reference}")
    from bertfast.train.trainer import TrainConfig, train

    samples = {}

    def hook(step, mlm_loss):  # once per micro-batch; step counts optimizer steps done before it
        if step % args.every == 0 or step == args.reference:
            samples.setdefault(step, rss_mib())
        return mlm_loss
    cfg = TrainConfig(output_dir=args.output_dir, max_steps=args.steps, progress=False)
    train(cfg, log=lambda *a, **k: None, loss_hook=hook)
    samples[args.steps] = rss_mib()
    for step in sorted(samples):
        print(f"step {step:6d}  RSS {samples[step]:8.1f} MiB")
    ratio = samples[args.steps] / samples[args.reference]
    print(f"RSS at step {args.steps} / at step {args.reference}: {ratio:.3f} (limit {args.limit})")
    return 0 if ratio <= args.limit else 1


if __name__ == "__main__":
    sys.exit(main())
