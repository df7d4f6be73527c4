"""Benchmark results: one JSON per run under bench/results/, a PNG per run, and bench/RESULTS.md regenerated
from all saved runs (newest first). A benchmark run writes only those; the README's results table changes only
when asked:

    python bench/_report.py                              # regenerate RESULTS.md and the plots from the JSONs
    python bench/_report.py --update-readme RUN.json     # put RUN's table in the README (refused if RUN is noisy,
                                                         # unless --allow-noisy)
    python bench/_report.py --update-readme latest       # the newest GPU run, else the newest CPU run

Each row carries its spread over the timed rounds (min, quartiles, max, scaled like `seconds`), and each run the
machine's load average before and after it. A row is noisy when its interquartile range is over NOISY_IQR of its
median or its median over NOISY_MEDIAN_OVER_MIN times its fastest round; a run is noisy when the machine was
already busy (1-minute load average before the run at least its core count) or when more than NOISY_ROWS of its
rows are noisy.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import math
import os
import platform
import re
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")
RESULTS_MD = os.path.join(HERE, "RESULTS.md")
README = os.path.join(os.path.dirname(HERE), "README.md")
# The provider every other provider of a group is compared with (the first of these present in the group):
# bertfast's torch reference for the ops and the padded training step, eager cross-entropy for the loss, and
# PyTorch's SDPA with a padding mask for attention.
BASELINES = ("torch", "eager", "sdpa-mask")
HF = "hf-sdpa"  # transformers, the second reference of the end-to-end benchmarks

NOISY_IQR = 0.10  # interquartile range / median
NOISY_MEDIAN_OVER_MIN = 2.0  # median / fastest round: the process was descheduled for most rounds
NOISY_ROWS = 0.25  # share of noisy rows that makes the whole run noisy

# Plot panels: which ops go where (anything else lands in "kernels").
GROUPS = (("kernels", "kernels: attention, bias+GELU, LayerNorm (vs eager PyTorch)"),
          ("loss", "MLM loss: C++/CUDA extension (vs eager PyTorch)"),
          ("end-to-end", "end-to-end training (vs bertfast on its torch reference ops)"))
LOSS_OPS = ("softmax_cross_entropy", "mlm_gather")
END_TO_END_OPS = ("train_step", "default_run")


def group_of(row: dict) -> str | None:
    op = str(row.get("op", ""))
    if op == "ceiling":
        return None
    if op in LOSS_OPS:
        return "loss"
    if op in END_TO_END_OPS:
        return "end-to-end"
    return "kernels"


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):  # pragma: no cover - not on Linux
        return None


def environment() -> dict:
    import torch

    env = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "torch": torch.__version__, "python": platform.python_version(), "cuda": torch.version.cuda,
           "threads": torch.get_num_threads(), "cores": os.cpu_count()}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # pragma: no cover - triton is a dependency on Linux
        env["triton"] = None
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["kind"] = "gpu"
        env["capability"] = "sm_%d%d" % torch.cuda.get_device_capability()
    else:
        env["device"] = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
        env["kind"] = "cpu"
    return env


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40]


def derive(row: dict) -> dict:
    """Adds the figures that follow from a row: GB/s, TFLOP/s, tokens/s, the spread and the noisy flag."""
    s = row.get("seconds")
    out = dict(row)
    if s:
        if row.get("bytes"):
            out["gbps"] = row["bytes"] / s / 1e9
        if row.get("flops"):
            out["tflops"] = row["flops"] / s / 1e12
        if row.get("tokens"):
            out["tokens_per_s"] = row["tokens"] / s
        if row.get("q1_s") is not None and row.get("q3_s") is not None:
            out["iqr_rel"] = (row["q3_s"] - row["q1_s"]) / s
        noisy = out.get("iqr_rel", 0.0) > NOISY_IQR
        if row.get("min_s"):
            noisy = noisy or s / row["min_s"] > NOISY_MEDIAN_OVER_MIN
        if "iqr_rel" in out or row.get("min_s"):
            out["noisy"] = bool(noisy)
    return out


def spread_from_benchmark(benchmark, seconds) -> dict:
    """A row's spread from pytest-benchmark's statistics of its rounds, in the units of `seconds`.

    bench/_harness.measure reports the median divided by its `inner` calls per round; the same factor applies to
    the other statistics. Nothing when the row's seconds are not that median (a figure the test computed itself)."""
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is None or not stats.median or not seconds:
        return {}
    inner = stats.median / seconds
    if round(inner) < 1 or abs(inner - round(inner)) > 1e-6 * inner:
        return {}
    k = 1.0 / round(inner)
    return {"min_s": stats.min * k, "q1_s": stats.q1 * k, "q3_s": stats.q3 * k, "max_s": stats.max * k,
            "rounds": stats.rounds}


def add_ratios(rows: list[dict]) -> list[dict]:
    """speedup = baseline seconds / seconds and vs_hf = transformers' seconds / seconds, within one
    (op, mode, shape, dtype) group of the same run."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r.get("op"), r.get("mode"), r.get("shape"), r.get("dtype"))].append(r)
    for members in groups.values():
        base = None
        for name in BASELINES:
            base = next((m for m in members if m.get("provider") == name and m.get("seconds")), None)
            if base is not None:
                break
        hf = next((m for m in members if m.get("provider") == HF and m.get("seconds")), None)
        for m in members:
            m.pop("speedup", None)
            m.pop("vs_hf", None)
            if base is not None and m.get("seconds"):
                m["speedup"] = base["seconds"] / m["seconds"]
                m["baseline"] = base["provider"]
            if hf is not None and m.get("seconds"):
                m["vs_hf"] = hf["seconds"] / m["seconds"]
    return rows


def run_noise(env: dict, rows: list[dict]) -> tuple[bool, str]:
    """(noisy?, why) for a whole run, from the load before it and its rows' spread."""
    reasons = []
    load = (env.get("load") or {}).get("before")
    cores = env.get("cores") or os.cpu_count() or 1
    if load and load[0] >= cores:
        reasons.append(f"1-min load average {load[0]:.2f} before the run on {cores} cores")
    flagged = [r for r in rows if "noisy" in r]
    noisy = [r for r in flagged if r["noisy"]]
    if flagged and len(noisy) > NOISY_ROWS * len(flagged):
        reasons.append(f"{len(noisy)} of {len(flagged)} rows noisy")
    return bool(reasons), "; ".join(reasons)


def save_run(rows: list[dict], load_before: list[float] | None = None, load_after: list[float] | None = None,
             results_dir: str = RESULTS_DIR) -> str:
    env = environment()
    env["load"] = {"before": load_before, "after": load_after if load_after is not None else load_average()}
    rows = add_ratios([derive(r) for r in rows])
    env["noisy"], env["noisy_why"] = run_noise(env, rows)
    os.makedirs(results_dir, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(results_dir, f"{stamp}_{_slug(env['device'])}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return path


def load_run(path: str) -> dict:
    with open(path) as f:
        run = json.load(f)
    run["rows"] = add_ratios([derive(r) for r in run["rows"]])  # runs saved before a figure existed get it too
    run["env"]["noisy"], run["env"]["noisy_why"] = run_noise(run["env"], run["rows"])
    return run


def load_runs(results_dir: str = RESULTS_DIR) -> list[tuple[str, dict]]:
    return [(p, load_run(p)) for p in sorted(glob.glob(os.path.join(results_dir, "*.json")), reverse=True)]


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def _spread(r: dict) -> str:
    if r.get("iqr_rel") is None:
        return ""
    return f"{100 * r['iqr_rel']:.0f}%" + (" noisy" if r.get("noisy") else "")


def table(rows: list[dict]) -> str:
    head = ("| op | mode | shape | dtype | provider | time (ms) | spread (IQR) | GB/s | TFLOP/s | tokens/s | peak MiB "
            "| vs eager | vs transformers |\n|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    key = lambda r: (str(r.get("op")), str(r.get("shape")), str(r.get("dtype")), str(r.get("mode")),  # noqa: E731
                     str(r.get("provider")))
    for r in sorted(rows, key=key):
        peak = r.get("peak_bytes")
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            r.get("op", ""), r.get("mode", ""), r.get("shape", ""), r.get("dtype", ""), r.get("provider", ""),
            _fmt(r["seconds"] * 1e3 if r.get("seconds") else None, ".3f"), _spread(r), _fmt(r.get("gbps"), ".1f"),
            _fmt(r.get("tflops"), ".2f"), _fmt(r.get("tokens_per_s"), ",.0f"),
            _fmt(peak / 2**20 if peak else None, ".1f"),
            _fmt(r.get("speedup"), ".2f") + ("x" if r.get("speedup") else ""),
            _fmt(r.get("vs_hf"), ".2f") + ("x" if r.get("vs_hf") else "")))
    return "\n".join(lines)


def _interpreted(run: dict, row: dict) -> bool:
    """Triton on a CPU run is Triton's interpreter: a smoke check, not a timing to compare."""
    return run["env"].get("kind") == "cpu" and str(row.get("provider", "")).startswith("triton")


def _load_text(env: dict) -> str:
    load = env.get("load") or {}
    if not load.get("before") and not load.get("after"):
        return "load average not recorded"
    show = lambda v: "/".join(f"{x:.2f}" for x in v) if v else "?"  # noqa: E731
    return f"load average (1/5/15 min) {show(load.get('before'))} before, {show(load.get('after'))} after"


def plot_rows(run: dict) -> dict[str, list[dict]]:
    """The rows each panel shows: those with a speed-up over their group's baseline, baselines left out."""
    panels = {name: [] for name, _ in GROUPS}
    for r in run["rows"]:
        g = group_of(r)
        if g is None or not r.get("speedup") or r.get("provider") == r.get("baseline") or _interpreted(run, r):
            continue
        panels[g].append(r)
    return panels


def plot(path_json: str, run: dict) -> str | None:
    """A PNG beside the JSON: one panel per group (kernels, loss, end-to-end), horizontal bars of the speed-up
    over the group's baseline on a log scale, one colour per provider, the value at each bar's end. None without
    matplotlib (the GPU machine may lack it: rerun `python bench/_report.py` where it is installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return None
    panels = plot_rows(run)
    if not any(panels.values()):
        return None
    providers = sorted({r["provider"] for rows in panels.values() for r in rows})
    cmap = plt.get_cmap("tab10")
    colour = {p: cmap(i % 10) for i, p in enumerate(providers)}
    heights = [max(1, len(rows)) for rows in panels.values()]
    fig, axes = plt.subplots(len(GROUPS), 1, figsize=(10, 1.6 + 0.42 * sum(heights) + 0.9 * len(GROUPS)),
                             gridspec_kw={"height_ratios": [h + 1.2 for h in heights]})
    values = [r["speedup"] for rows in panels.values() for r in rows]
    lo = min(min(values), 1.0) / 1.6
    hi = max(max(values), 1.0) * 2.2
    for ax, (name, title) in zip(axes, GROUPS):
        rows = sorted(panels[name], key=lambda r: (str(r.get("op")), str(r.get("shape")), str(r.get("mode")),
                                                    str(r.get("provider"))))
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ax.axvline(1.0, color="black", linewidth=0.9)
        if not rows:
            why = ("no row: on a CPU run the Triton kernels run in Triton's interpreter (a smoke check, not timed)"
                   if run["env"].get("kind") == "cpu" and name == "kernels" else "no row in this run")
            ax.text(0.5, 0.5, why, transform=ax.transAxes, ha="center", va="center", fontsize=9, color="0.35")
            ax.set_yticks([])
            continue
        y = list(range(len(rows)))[::-1]
        # bars grow from 1x: right is faster than the baseline, left slower
        ax.barh(y, [r["speedup"] - 1.0 for r in rows], left=1.0, height=0.7,
                color=[colour[r["provider"]] for r in rows],
                edgecolor=["black" if r.get("noisy") else "none" for r in rows])
        for yi, r in zip(y, rows):
            label = f"{r['speedup']:.2f}x" + (" (noisy)" if r.get("noisy") else "")
            ax.text(r["speedup"] * (1.04 if r["speedup"] >= 1 else 0.96), yi, label, va="center",
                    ha="left" if r["speedup"] >= 1 else "right", fontsize=8)
        ax.set_yticks(y)
        ax.set_yticklabels([f"{r['op']} {r.get('mode', '')} | {r.get('shape', '')} {r.get('dtype', '')}"
                            for r in rows], fontsize=8)
        ax.set_ylim(-0.7, len(rows) - 0.3)
        ax.grid(axis="x", which="both", color="0.9", linewidth=0.6)
        ax.set_axisbelow(True)
    ticks = [t for t in (0.01, 0.03, 0.1, 0.3, 0.5, 1, 2, 3, 5, 10, 20, 30, 100) if lo <= t <= hi]
    for ax in axes:
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}x" for t in ticks], fontsize=8)
        ax.minorticks_off()
    axes[-1].set_xlabel("speed-up over the baseline in the same run (log scale; > 1 is faster)")
    env = run["env"]
    fig.suptitle(f"bertfast on {env['device']}, {env['date']}, torch {env.get('torch')}"
                 + ("  [NOISY RUN]" if env.get("noisy") else ""), fontsize=11)
    fig.legend(handles=[Patch(color=colour[p], label=p) for p in providers], loc="lower center",
               ncol=min(len(providers), 5), fontsize=8, frameon=False, title="provider", title_fontsize=8)
    fig.tight_layout(rect=(0, 0.04 + 0.02 * math.ceil(len(providers) / 5), 1, 0.97))
    png = path_json[:-5] + ".png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def regenerate(results_dir: str = RESULTS_DIR, results_md: str = RESULTS_MD) -> str:
    """RESULTS.md and one PNG per run, from every JSON in results_dir. Never touches the README."""
    runs = load_runs(results_dir)
    parts = ["# bertfast benchmark results\n",
             "Regenerated by `pytest bench/ --benchmark` (or `python bench/_report.py`) from bench/results/*.json, "
             "newest run first. `time` is the median over the timed rounds and `spread` their interquartile range "
             f"as a share of it (`noisy`: over {NOISY_IQR:.0%}, or a median over {NOISY_MEDIAN_OVER_MIN:g}x the "
             "fastest round). `vs eager` is the baseline's time over this provider's (eager PyTorch; for attention, "
             "PyTorch's SDPA with a padding mask; for the training step, bertfast's padded torch reference), "
             "`vs transformers` transformers' time over this provider's, both measured in the same run; "
             "GB/s counts the bytes each op must move, TFLOP/s the FLOPs written next to each benchmark. "
             "The README's table changes only through `python bench/_report.py --update-readme RUN.json`.\n"]
    for path, run in runs:
        env = run["env"]
        png = plot(path, run) or (path[:-5] + ".png" if os.path.exists(path[:-5] + ".png") else None)
        parts.append(f"## {env['device']} — {env['date']}\n")
        parts.append(f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, "
                     f"python {env.get('python')}, threads {env.get('threads')}; {_load_text(env)}; file "
                     f"`{os.path.relpath(path, os.path.dirname(results_md))}`\n")
        if env.get("noisy"):
            parts.append(f"**Noisy run** ({env['noisy_why']}): its timings are not comparable; rerun on a quiet "
                         "machine.\n")
        if png:
            parts.append(f"![speed-ups]({os.path.relpath(png, os.path.dirname(results_md))})\n")
        if any(_interpreted(run, r) for r in run["rows"]):
            parts.append("Triton rows of a CPU run are Triton's interpreter (a smoke check, left out of the plot), "
                         "not a timing of the kernels.\n")
        parts.append(table(run["rows"]) + "\n")
    with open(results_md, "w") as f:
        f.write("\n".join(parts))
    return results_md


def readme_body(path: str, run: dict) -> str:
    env = run["env"]
    note = "" if env.get("kind") == "gpu" else (
        "No GPU run has been recorded yet; this is a CPU run (2 cores, fp32; small op shapes; Triton's interpreter "
        "rows left out).\n\n")
    rel = os.path.relpath(path, os.path.dirname(README))
    return (f"{note}{env['device']}, {env['date']}, torch {env.get('torch')}, triton {env.get('triton')}, "
            f"CUDA {env.get('cuda')}; {_load_text(env)}; file `{rel}`. Full history: "
            f"[bench/RESULTS.md](bench/RESULTS.md).\n\n"
            + table([r for r in run["rows"] if not _interpreted(run, r)]))


def update_readme(path: str, allow_noisy: bool = False, readme: str = README) -> str:
    """Replaces the README's table (between the bench markers) with the run saved at `path`."""
    run = load_run(path)
    if run["env"].get("noisy") and not allow_noisy:
        raise SystemExit(f"{path} is a noisy run ({run['env']['noisy_why']}): the README keeps its table. Rerun "
                         "`pytest bench/ --benchmark` on a quiet machine, or pass --allow-noisy to use it anyway.")
    with open(readme) as f:
        text = f.read()
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"{readme} has no {start} ... {end} markers: nothing to update.")
    new = text[:text.index(start) + len(start)] + "\n" + readme_body(path, run) + "\n" + text[text.index(end):]
    with open(readme, "w") as f:
        f.write(new)
    return readme


def latest(results_dir: str = RESULTS_DIR) -> str:
    runs = load_runs(results_dir)
    if not runs:
        raise SystemExit(f"no benchmark run saved in {results_dir}: run `pytest bench/ --benchmark` first.")
    gpu = [p for p, r in runs if r["env"].get("kind") == "gpu"]
    return gpu[0] if gpu else runs[0][0]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Regenerate bench/RESULTS.md and the plots from bench/results/*.json; "
                                             "optionally put one run's table in the README.")
    ap.add_argument("--update-readme", metavar="RUN.json",
                    help="replace the README's results table with this run ('latest': the newest GPU run, else the "
                         "newest run)")
    ap.add_argument("--allow-noisy", action="store_true",
                    help="with --update-readme: accept a run marked noisy (busy machine or large spread)")
    args = ap.parse_args(argv)
    print(regenerate())
    if args.update_readme:
        path = latest() if args.update_readme == "latest" else args.update_readme
        if not os.path.isfile(path):
            raise SystemExit(f"--update-readme {path}: no such file (the runs are in {RESULTS_DIR}).")
        print(update_readme(path, allow_noisy=args.allow_noisy))


if __name__ == "__main__":
    sys.exit(main())
