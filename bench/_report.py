"""Benchmark results: one JSON per run under bench/results/, a PNG per run, and bench/RESULTS.md regenerated
from all saved runs (newest first). The README's results table is the latest GPU run (or, before any GPU run,
the latest CPU run, labelled as such).

    python bench/_report.py            # regenerate RESULTS.md, the plots and the README table from the JSONs
"""
from __future__ import annotations

import datetime as _dt
import glob
import json
import os
import platform
import re
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")
RESULTS_MD = os.path.join(HERE, "RESULTS.md")
README = os.path.join(os.path.dirname(HERE), "README.md")
BASELINES = ("torch", "eager")  # the provider every other provider of a group is compared with
HF = "hf-sdpa"  # transformers, the second reference of the end-to-end benchmarks


def environment() -> dict:
    import torch

    env = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "torch": torch.__version__, "python": platform.python_version(), "cuda": torch.version.cuda,
           "threads": torch.get_num_threads()}
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
    """Adds the figures that follow from a row: GB/s, TFLOP/s, tokens/s."""
    s = row.get("seconds")
    out = dict(row)
    if s:
        if row.get("bytes"):
            out["gbps"] = row["bytes"] / s / 1e9
        if row.get("flops"):
            out["tflops"] = row["flops"] / s / 1e12
        if row.get("tokens"):
            out["tokens_per_s"] = row["tokens"] / s
    return out


def add_ratios(rows: list[dict]) -> list[dict]:
    """speedup = baseline seconds / seconds and vs_hf = transformers' seconds / seconds, within one
    (op, mode, shape, dtype) group of the same run."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r.get("op"), r.get("mode"), r.get("shape"), r.get("dtype"))].append(r)
    for members in groups.values():
        base = next((m for m in members if m.get("provider") in BASELINES and m.get("seconds")), None)
        hf = next((m for m in members if m.get("provider") == HF and m.get("seconds")), None)
        for m in members:
            if base is not None and m.get("seconds"):
                m["speedup"] = base["seconds"] / m["seconds"]
            if hf is not None and m.get("seconds"):
                m["vs_hf"] = hf["seconds"] / m["seconds"]
    return rows


def save_run(rows: list[dict]) -> str:
    env = environment()
    rows = add_ratios([derive(r) for r in rows])
    os.makedirs(RESULTS_DIR, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(RESULTS_DIR, f"{stamp}_{_slug(env['device'])}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return path


def load_runs() -> list[tuple[str, dict]]:
    runs = []
    for p in sorted(glob.glob(os.path.join(RESULTS_DIR, "*.json")), reverse=True):
        with open(p) as f:
            runs.append((p, json.load(f)))
    return runs


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    head = ("| op | mode | shape | dtype | provider | time (ms) | GB/s | TFLOP/s | tokens/s | peak MiB | vs eager "
            "| vs transformers |\n|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    key = lambda r: (str(r.get("op")), str(r.get("shape")), str(r.get("dtype")), str(r.get("mode")),  # noqa: E731
                     str(r.get("provider")))
    for r in sorted(rows, key=key):
        peak = r.get("peak_bytes")
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            r.get("op", ""), r.get("mode", ""), r.get("shape", ""), r.get("dtype", ""), r.get("provider", ""),
            _fmt(r["seconds"] * 1e3 if r.get("seconds") else None, ".3f"), _fmt(r.get("gbps"), ".1f"),
            _fmt(r.get("tflops"), ".2f"), _fmt(r.get("tokens_per_s"), ",.0f"),
            _fmt(peak / 2**20 if peak else None, ".1f"),
            _fmt(r.get("speedup"), ".2f") + ("x" if r.get("speedup") else ""),
            _fmt(r.get("vs_hf"), ".2f") + ("x" if r.get("vs_hf") else "")))
    return "\n".join(lines)


def _interpreted(run: dict, row: dict) -> bool:
    """Triton on a CPU run is Triton's interpreter: a smoke check, not a timing to compare."""
    return run["env"].get("kind") == "cpu" and str(row.get("provider", "")).startswith("triton")


def plot(path_json: str, run: dict) -> str | None:
    """A PNG beside the JSON: speed-up over eager per op and mode, one bar per provider. None without
    matplotlib (the GPU machine may lack it: rerun `python bench/_report.py` where it is installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in run["rows"] if r.get("speedup") and r.get("provider") not in BASELINES
            and not _interpreted(run, r)]
    if not rows:
        return None
    labels = [f"{r['op']} {r.get('mode', '')}\n{r.get('shape', '')} {r.get('dtype', '')}\n{r['provider']}"
              for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(rows)), 5))
    ax.bar(range(len(rows)), [r["speedup"] for r in rows],
           color=["tab:green" if r["speedup"] >= 1 else "tab:red" for r in rows])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.set_ylabel("speed-up over eager PyTorch (same run)")
    ax.set_title(f"bertfast on {run['env']['device']} ({run['env']['date']})")
    fig.tight_layout()
    png = path_json[:-5] + ".png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def regenerate() -> str:
    runs = load_runs()
    parts = ["# bertfast benchmark results\n",
             "Regenerated by `pytest bench/ --benchmark` (or `python bench/_report.py`) from bench/results/*.json, "
             "newest run first. `vs eager` is eager PyTorch's time over this provider's (for the training step, eager "
             "is bertfast's padded torch reference), `vs transformers` transformers' time over this provider's, "
             "both measured in the same run; "
             "GB/s counts the bytes each op must move, TFLOP/s the FLOPs written next to each benchmark.\n"]
    for path, run in runs:
        add_ratios(run["rows"])  # recomputed, so runs saved before a ratio existed get it too
        env = run["env"]
        png = plot(path, run) or (path[:-5] + ".png" if os.path.exists(path[:-5] + ".png") else None)
        parts.append(f"## {env['device']} — {env['date']}\n")
        parts.append(f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, "
                     f"python {env.get('python')}, threads {env.get('threads')}; file "
                     f"`{os.path.relpath(path, HERE)}`\n")
        if png:
            parts.append(f"![speed-ups]({os.path.relpath(png, HERE)})\n")
        if any(_interpreted(run, r) for r in run["rows"]):
            parts.append("Triton rows of a CPU run are Triton's interpreter (a smoke check, left out of the plot), "
                         "not a timing of the kernels.\n")
        parts.append(table(run["rows"]) + "\n")
    text = "\n".join(parts)
    with open(RESULTS_MD, "w") as f:
        f.write(text)
    _update_readme(runs)
    return RESULTS_MD


def _update_readme(runs) -> None:
    if not os.path.exists(README):
        return
    with open(README) as f:
        readme = f.read()
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    if start not in readme or end not in readme:
        return
    gpu = [(p, r) for p, r in runs if r["env"].get("kind") == "gpu"]
    chosen = gpu[0] if gpu else (runs[0] if runs else None)
    if chosen is None:
        body = "No benchmark run has been saved yet."
    else:
        env = chosen[1]["env"]
        note = "" if gpu else ("No GPU run has been recorded yet; this is the latest CPU run (2 cores, fp32; small "
                               "op shapes; Triton's interpreter rows left out).\n\n")
        body = (f"{note}{env['device']}, {env['date']}, torch {env.get('torch')}, triton {env.get('triton')}, "
                f"CUDA {env.get('cuda')}. Full history: [bench/RESULTS.md](bench/RESULTS.md).\n\n"
                + table([r for r in chosen[1]["rows"] if not _interpreted(chosen[1], r)]))
    new = readme[:readme.index(start) + len(start)] + "\n" + body + "\n" + readme[readme.index(end):]
    with open(README, "w") as f:
        f.write(new)


if __name__ == "__main__":
    print(regenerate())
