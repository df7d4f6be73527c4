"""`python -m bertfast.plot RUN_DIR [RUN_DIR ...] [--output PNG]`: training curves of pretraining runs as a PNG.

Six panels against the optimizer step: loss, MLM accuracy, NSP accuracy, MLM loss, learning rate and tokens/s.
Training records are solid lines; evaluation records (``eval_mlm_loss``, ``eval_mlm_acc``, ``eval_nsp_loss``,
``eval_nsp_acc`` in metrics.jsonl) dashed with markers, when a run has them. Each run has its colour, so several
runs overlay for comparison. From Python: ``plot_runs(run_dirs, output)`` (needs matplotlib; the trainer may call
it at the end of a run).
"""
from __future__ import annotations

import json
import os
import sys

from bertfast._cli import Parser

# (panel title, y label, train key, eval key); the loss panel's eval value is eval_mlm_loss + eval_nsp_loss
PANELS = (
    ("Loss (MLM + NSP)", "loss", "loss", "eval_loss"),
    ("MLM accuracy", "accuracy", "mlm_acc", "eval_mlm_acc"),
    ("NSP accuracy", "accuracy", "nsp_acc", "eval_nsp_acc"),
    ("MLM loss", "cross-entropy", "mlm_loss", "eval_mlm_loss"),
    ("Learning rate", "lr", "lr", None),
    ("Throughput", "tokens / s", "tokens_per_s", None),
)


def read_metrics(run_dir: str) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl (a torn or foreign line is skipped); FileNotFoundError / ValueError
    naming the run when there is nothing to plot."""
    path = run_dir if os.path.isfile(run_dir) else os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(run_dir):
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is it a `python -m bertfast.pretrain --output-dir` "
                                "folder?)")
    records = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
                if "eval_mlm_loss" in rec and "eval_nsp_loss" in rec and "eval_loss" not in rec:
                    rec["eval_loss"] = rec["eval_mlm_loss"] + rec["eval_nsp_loss"]
                records.append(rec)
    if not records:
        raise ValueError(f"{path} holds no step records to plot")
    return records


def _labels(run_dirs: list[str]) -> list[str]:
    """Short distinct names: the folder names, with their parents when two runs share a name."""
    full = [os.path.normpath(os.path.abspath(d)) for d in run_dirs]
    for depth in range(1, 6):
        names = [os.path.join(*p.split(os.sep)[-depth:]) for p in full]
        if len(set(names)) == len(names):
            return names
    return [os.path.normpath(d) for d in run_dirs]


def _series(records, key):
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_runs(run_dirs, output: str, *, title: str | None = None) -> str:
    """Draw the runs' curves into `output` (PNG); returns its path. Raises ImportError without matplotlib,
    FileNotFoundError / ValueError for a folder without metrics."""
    import matplotlib.pyplot as plt

    fig = figure(run_dirs, title=title)
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def figure(run_dirs, *, title: str | None = None):
    """The matplotlib Figure of the runs' curves (2 x 3 panels, PANELS order)."""
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    run_dirs = [os.fspath(d) for d in ([run_dirs] if isinstance(run_dirs, (str, os.PathLike)) else run_dirs)]
    if not run_dirs:
        raise ValueError("no run folder given")
    runs = [read_metrics(d) for d in run_dirs]
    labels = _labels(run_dirs)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5), constrained_layout=True)
    any_eval = False
    for ax, (name, ylabel, key, eval_key) in zip(axes.flat, PANELS):
        drawn = False
        for i, records in enumerate(runs):
            c = colors[i % len(colors)]
            x, y = _series(records, key)
            if x:
                ax.plot(x, y, color=c, lw=1.6, label=labels[i])
                drawn = True
            if eval_key:
                x, y = _series(records, eval_key)
                if x:
                    ax.plot(x, y, color=c, lw=1.4, ls="--", marker="o", ms=4)
                    drawn = any_eval = True
        ax.set_title(name, fontsize=12)
        ax.set_xlabel("step", fontsize=10)
        ax.set_ylabel(ylabel, fontsize=10)
        ax.grid(True, alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    handles = [Line2D([], [], color=colors[i % len(colors)], lw=2.5, label=labels[i]) for i in range(len(runs))]
    handles.append(Line2D([], [], color="black", lw=1.6, label="train"))
    if any_eval:
        handles.append(Line2D([], [], color="black", lw=1.4, ls="--", marker="o", ms=4, label="eval (held out)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=10, frameon=False)
    fig.suptitle(title or ("bertfast pretraining: " + ", ".join(labels)), fontsize=14)
    return fig


def main(argv=None) -> int:
    p = Parser(prog="python -m bertfast.plot",
               description="Plot the training (and evaluation) curves of bertfast pretraining runs.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (holding metrics.jsonl); several overlay")
    p.add_argument("--output", "-o", default=None, help="the PNG to write (default: RUN_DIR/training.png for one "
                   "run, training_curves.png here for several)")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    output = args.output or (os.path.join(args.runs[0], "training.png") if len(args.runs) == 1
                             else "training_curves.png")
    try:
        plot_runs(args.runs, output, title=args.title)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    except ImportError:
        p.error("matplotlib is not installed: pip install matplotlib")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
