"""What every Triton kernel configuration costs on the GPU, known before any GPU runs it.

    python -m bertfast.kernels.report [--arch 80|90|all] [--json PATH] [--filter TEXT] [--workers N]

For each case of each kernel module's gpu_compile_cases (the launch configurations the launchers pick at BERT
shapes), compiled for sm_80 / sm_90 here (see bertfast.kernels._compile): registers per thread, shared memory,
spills, tensor-core instructions, resident blocks per SM, and a roofline estimate from the case's bytes moved and
FLOPs per launch on an H100 SXM (3.35 TB/s HBM3; 989 TFLOP/s dense fp16/bf16 tensor cores, ~495 tf32, 67 fp32 on
the CUDA cores): t = max(bytes / bandwidth, flops / peak), the time a launch cannot beat. A measured time a few
times above it says where to look. Exit status 1 when any configuration fails the gpu_compile checks.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Iterable

from bertfast.kernels import _compile as gc


def _row(r: gc.CompileResult) -> dict:
    d = r.to_dict()
    d.pop("ptxas_report", None)
    d["roofline"] = gc.roofline(r)
    return d


def write_json(results: Iterable[gc.CompileResult], path) -> None:
    rows = [_row(r) for r in results]
    with open(path, "w") as f:
        json.dump(rows, f, indent=1, default=str)


def _mma(r: gc.CompileResult) -> str:
    if not r.mma_instructions:
        return "FFMA" if r.uses_mma else "-"
    top = max(r.mma_instructions, key=r.mma_instructions.get)
    return top.replace(".F32", "", 1) if len(top) > 22 else top


def _fmt_us(x: float) -> str:
    return f"{x:8.2f}" if x < 1000 else f"{x:8.0f}"


def format_table(results: Iterable[gc.CompileResult]) -> str:
    """One line per kernel configuration and arch."""
    results = list(results)
    w = max([len("kernel config")] + [len(r.name) for r in results])
    head = (f"{'kernel config':{w}} {'arch':7} {'w/s':5} {'regs':>4} {'smem KiB':>8} {'spill B':>7} {'blk/SM':>6} "
            f"{'mma':22} {'MB':>8} {'GFLOP':>8} {'t_mem us':>8} {'t_math us':>9} {'bound':7} status")
    lines = [head, "-" * len(head)]
    for r in results:
        ws = f"{r.num_warps}/{r.num_stages}"
        if not r.ok:
            lines.append(f"{r.name:{w}} {r.arch:7} {ws:5} FAILED: {(r.error or '').splitlines()[0][:160]}")
            continue
        rf = gc.roofline(r)
        problems = r.problems()
        status = "ok" if not problems else "FAIL: " + "; ".join(p.split(":")[0] for p in problems)
        lines.append(
            f"{r.name:{w}} {r.arch:7} {ws:5} {r.registers:4d} {r.total_shared_bytes / 1024:8.1f} {r.spills:7d} "
            f"{r.blocks_per_sm:6d} {_mma(r)[:22]:22} {r.bytes / 1e6:8.2f} {r.flops / 1e9:8.2f} "
            f"{_fmt_us(rf['t_mem_us'])} {_fmt_us(rf['t_math_us']):>9} {rf['bound']:7} {status}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bertfast.kernels.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="90", choices=["80", "90", "all"],
                    help="compute capability to compile for (default 90: H100/H200); all = 80 and 90")
    ap.add_argument("--json", metavar="PATH", help="also write every result (with its roofline) as JSON")
    ap.add_argument("--filter", default="", help="only cases whose name contains this text")
    ap.add_argument("--workers", type=int, default=None, help="compile processes (default: 2)")
    args = ap.parse_args(argv)
    caps = (80, 90) if args.arch == "all" else (int(args.arch),)

    mods = gc.case_modules()
    if not mods:
        print("no Triton kernel modules with gpu_compile_cases yet (looked for "
              f"{', '.join(gc.KERNEL_MODULES)} in bertfast.kernels)")
        return 0
    # gpu_compile_cases may pick differently per capability: each capability compiles its own list
    pairs = [(c, cap) for cap in caps for c in gc.all_cases(cap) if args.filter in c["name"]]
    results = gc.compile_pairs(pairs, workers=args.workers)
    print(f"Triton kernels at BERT shapes, modules: {', '.join(m.rsplit('.', 1)[1] for m in mods)}; roofline on an "
          f"H100 SXM: {gc.H100['bandwidth'] / 1e12:.2f} TB/s, {gc.H100['mma_fp16'] / 1e12:.0f} TFLOP/s fp16/bf16 "
          f"MMA, {gc.H100['mma_tf32'] / 1e12:.0f} tf32, {gc.H100['fp32'] / 1e12:.0f} fp32 FFMA")
    print("w/s = num_warps/num_stages; smem = dynamic + static per block; blk/SM = resident blocks per SM\n")
    print(format_table(results))
    if args.json:
        write_json(results, args.json)
        print(f"\nwrote {args.json}")
    bad = [r for r in results if r.problems()]
    if bad:
        print(f"\n{len(bad)} configuration(s) fail the gpu_compile checks:")
        for r in bad:
            print(f"  {r.name} sm_{r.capability}: " + "; ".join(r.problems()))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
