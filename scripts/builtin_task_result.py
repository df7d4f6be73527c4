"""Measure what pretraining buys on the built-in fine-tuning task: the table of docs/finetune.md, in one command.

    python scripts/builtin_task_result.py --pretrain runs/pre          # the default pretraining first (~2 min CPU)
    python scripts/builtin_task_result.py --model runs/pre             # an existing run, checkpoint or HF folder

For each seed it runs, as separate processes, exactly the commands docs/finetune.md gives:
    python -m bertfast.finetune --model MODEL --task builtin --lr 5e-4 --epochs 10 --seed S [--from-scratch]
then prints validation accuracy per seed, mean and sample standard deviation for the pretrained model and for
--from-scratch, the difference of the means, and the machine's load average; `--json FILE` also writes them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

RECIPE = ["--task", "builtin", "--lr", "5e-4", "--epochs", "10"]


def _run(cmd: list[str], log_path: str) -> None:
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.exit(f"builtin_task_result: {' '.join(cmd)} exited with {rc}; see {log_path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a pretrained model (run folder, checkpoint, transformers folder, hub name)")
    which.add_argument("--pretrain", metavar="DIR",
                       help="run the default `python -m bertfast.pretrain --output-dir DIR` first and use it")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--work-dir", default="runs/builtin_task", help="fine-tuning runs and their logs")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    py = sys.executable
    load_before = os.getloadavg()
    t0 = time.time()
    model = args.model
    if args.pretrain:
        print(f"pretraining: python -m bertfast.pretrain --output-dir {args.pretrain}", flush=True)
        _run([py, "-m", "bertfast.pretrain", "--output-dir", args.pretrain, "--no-progress"],
             os.path.join(args.work_dir, "pretrain.log"))
        model = args.pretrain
    acc = {"pretrained": [], "from_scratch": []}
    for seed in args.seeds:
        for kind, extra in (("pretrained", []), ("from_scratch", ["--from-scratch"])):
            out = os.path.join(args.work_dir, f"{kind}_seed{seed}")
            cmd = [py, "-m", "bertfast.finetune", "--model", model, *RECIPE, "--seed", str(seed), *extra,
                   "--output-dir", out, "--no-progress"]
            _run(cmd, out + ".log")
            with open(os.path.join(out, "results.json")) as f:
                acc[kind].append(100 * json.load(f)["accuracy"])
            print(f"{kind:>12} seed {seed}: {acc[kind][-1]:.1f}", flush=True)
    summary = {k: {"accuracy": v, "mean": statistics.mean(v), "sd": statistics.stdev(v) if len(v) > 1 else 0.0}
               for k, v in acc.items()}
    gap = summary["pretrained"]["mean"] - summary["from_scratch"]["mean"]
    result = {"model": model, "recipe": RECIPE, "seeds": args.seeds, **summary, "difference": gap,
              "load_before": load_before, "load_after": os.getloadavg(), "seconds": round(time.time() - t0, 1)}
    print("\n| model | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean | sd |")
    print("|---|" + "---:|" * (len(args.seeds) + 2))
    for k in acc:
        print(f"| {k.replace('_', ' ')} | " + " | ".join(f"{a:.1f}" for a in acc[k])
              + f" | {summary[k]['mean']:.1f} | {summary[k]['sd']:.1f} |")
    print(f"\npretrained - from scratch: {gap:+.1f} accuracy points; load average {load_before[0]:.2f} -> "
          f"{result['load_after'][0]:.2f}; {result['seconds']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
