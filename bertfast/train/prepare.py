"""--prepare-only: build the tokenizer and every cached dataset a training run with the same data flags would use,
report where they are, their size on disk and the time taken, and train nothing. The training run then finds all
of it in the cache (the same ``load_data`` arguments: :func:`bertfast.train.config.data_arguments`)."""
from __future__ import annotations

import os
import time

from bertfast.train.config import data_arguments


def _size(paths) -> int:
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(p))


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def _datasets(loader) -> list[tuple[str, object]]:
    """(what, dataset) of everything load_data built that lives in the cache."""
    out = [("tokenised training documents", loader.documents), ("training NSP pairs", loader.pairs)]
    ev = loader.eval_loader
    if ev is not None:
        out += [("tokenised evaluation documents", ev.documents), ("evaluation NSP pairs", ev.pairs)]
    return out


def _tokenizer_dir(tok) -> str | None:
    path = getattr(tok, "name_or_path", None)
    return path if path and os.path.isdir(path) else None


def report(tok, loader, seconds: float) -> tuple[list[str], int]:
    """The report's lines, and the bytes on disk of what they list."""
    lines, total = [], 0
    tdir = _tokenizer_dir(tok)
    if tdir:
        files = [os.path.join(tdir, f) for f in os.listdir(tdir)]
        total += _size(files)
        lines.append(f"  tokenizer: {tdir} ({_human(_size(files))})")
    else:
        lines.append(f"  tokenizer: {tok.name_or_path or 'given'} (not trained here)")
    for what, ds in _datasets(loader):
        files = [f["filename"] for f in ds.cache_files]
        if not files:
            lines.append(f"  {what}: {len(ds)} rows, in memory (an in-memory corpus, e.g. builtin: rebuilt each run)")
            continue
        total += _size(files)
        folder = os.path.dirname(files[0])
        lines.append(f"  {what}: {len(ds)} rows, {len(files)} file(s) in {folder} ({_human(_size(files))})")
    lines.insert(0, f"prepared in {seconds:.1f} s, {_human(total)} on disk:")
    return lines, total


def prepare_data(plan, log=print) -> dict:
    """Prepare the data of ``plan`` (a checked RunPlan) as rank 0 of its run would, and report it; no process
    group, no model. Under torchrun only rank 0 prepares (the others return at once)."""
    from bertfast.data import load_data

    cfg = plan.cfg
    if int(os.environ.get("RANK", "0")) != 0:
        return {"prepared": False, "rank": int(os.environ["RANK"])}
    if not cfg.progress:
        import datasets

        datasets.disable_progress_bars()
    tokenizer = plan.tokenizer if plan.resuming else plan.init.tokenizer if plan.init else cfg.tokenizer
    t0 = time.perf_counter()
    tok, loader = load_data(**data_arguments(cfg, tokenizer), batch_size=cfg.batch_size, output_dir=None,
                            drop_last=True)
    seconds = time.perf_counter() - t0
    lines, total = report(tok, loader, seconds)
    log("\n".join(lines))
    log("--prepare-only: nothing trained; the same command without --prepare-only starts from this cache")
    return {"prepared": True, "seconds": seconds, "bytes": total, "pairs": len(loader.pairs), "report": lines}
