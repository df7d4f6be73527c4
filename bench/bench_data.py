"""Data loader throughput: batches/s of the loader alone (no model), on the built-in corpus.

Timed: iterating N_BATCHES batches (reading pairs, per-sample masking with its own generator, padding), after
the corpus, tokenizer and pairs were built once outside the timing (they are cached by `datasets`).
`pytest bench/bench_data.py --benchmark -s` prints batches/s; without --benchmark each body runs once.
"""

from __future__ import annotations

import itertools
import os
import tempfile

import pytest

pytest.importorskip("datasets")  # the GPU machine has no `datasets`: nothing to measure there

from bertfast.data import load_data  # noqa: E402

N_BATCHES = 50
BATCH_SIZE = 32
MAX_LEN = 128


def _loader(**kw):
    cache = os.path.join(tempfile.gettempdir(), "bertfast-bench-data")
    _, loader = load_data("builtin", cache_dir=cache, output_dir=cache, batch_size=BATCH_SIZE, max_len=MAX_LEN,
                          **kw)
    return loader


def _time(benchmark, loader, label):
    def run():
        loader.load_state_dict({"epoch": 0, "batches_consumed": 0})  # every round reads the same batches
        n = 0
        for _ in itertools.islice(iter(loader), N_BATCHES):
            n += 1
        return n

    n = benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)
    assert n == N_BATCHES
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        median = stats.stats.median
        benchmark.extra_info.update(batches_per_s=N_BATCHES / median, batch_size=BATCH_SIZE, max_len=MAX_LEN)
        print(f"\n{label}: {N_BATCHES / median:.1f} batches/s ({N_BATCHES * BATCH_SIZE / median:.0f} samples/s)")


def test_data_loader_throughput(benchmark):
    """The default loader: main process, random order."""
    _time(benchmark, _loader(), "builtin loader, num_workers=0")


def test_data_loader_throughput_workers_grouped(benchmark):
    """Two worker processes and length-grouped batches (less padding)."""
    _time(benchmark, _loader(num_workers=2, group_by_length=True), "builtin loader, num_workers=2, grouped")


def test_data_loader_throughput_whole_word(benchmark):
    """Whole-word masking: the words of each row are chosen in a per-row loop (numpy), the rest as by default."""
    _time(benchmark, _loader(whole_word_masking=True), "builtin loader, num_workers=0, whole-word masking")


# ------------------------------------------------------------------------------ preparation throughput (issue 27)
# `python bench/bench_data.py [MB] [repeats]`: the MB/s of load_data's preparation (sentence splitting,
# tokenizing, pair building; a given WordPiece vocabulary, a fresh cache each time) with 1 process and with every
# core, side by side in alternation, and the bare `tokenizers` encoding of the same lines for reference.


def _corpus(path: str, mb: float) -> int:
    """A .txt corpus of about ``mb`` MB (built-in documents, blank-line separated) -> its size in bytes."""
    from bertfast.data.builtin_corpus import builtin_texts

    n_docs = max(16, int(mb * 1e6 / 1100))
    with open(path, "w") as f:
        f.write("\n\n".join(builtin_texts(n_docs, 1)))
    return os.path.getsize(path)


def _vocabulary(corpus: str, folder: str):
    from bertfast.data.tokenizer import train_wordpiece

    with open(corpus) as f:
        return train_wordpiece((line for line in f if line.strip()), 8192, folder)


def _prepare_seconds(corpus: str, tok, num_proc: int, cache: str) -> float:
    import shutil
    import time

    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    load_data(corpus, tokenizer=tok, cache_dir=cache, num_proc=num_proc, max_len=MAX_LEN, batch_size=BATCH_SIZE)
    return time.perf_counter() - t0


def _encode_seconds(corpus: str, tok) -> float:
    import time

    with open(corpus) as f:
        lines = [line for line in f if line.strip()]
    t0 = time.perf_counter()
    tok.backend_tokenizer.encode_batch(lines, add_special_tokens=False)
    return time.perf_counter() - t0


def measure_preparation(mb: float = 30.0, repeats: int = 3, workdir: str | None = None) -> dict:
    """Seconds of each try: {"mb", "cores", "bare_encoding": [...], 1: [...], cores: [...]}; the datasets cache
    is redirected into ``workdir`` so that every try processes the corpus from scratch."""
    import datasets

    from bertfast.data.loader import available_cores

    workdir = workdir or tempfile.mkdtemp(prefix="bertfast-bench-prep-")
    datasets.config.HF_DATASETS_CACHE = os.path.join(workdir, "hf")
    datasets.disable_progress_bars()
    corpus = os.path.join(workdir, "corpus.txt")
    size = _corpus(corpus, mb)
    tok = _vocabulary(corpus, os.path.join(workdir, "tok"))
    cores = available_cores()
    out = {"mb": size / 1e6, "cores": cores, "bare_encoding": [], 1: [], cores: []}
    for _ in range(repeats):  # alternating, so that a change of the machine's load hits both alike
        for n in dict.fromkeys((1, cores)):
            datasets.config.HF_DATASETS_CACHE = os.path.join(workdir, f"hf{n}")
            out[n].append(_prepare_seconds(corpus, tok, n, os.path.join(workdir, f"cache{n}")))
        out["bare_encoding"].append(_encode_seconds(corpus, tok))
    return out


def _summary(res: dict) -> str:
    def line(label, secs):
        mbs = sorted(res["mb"] / s for s in secs)
        return f"  {label}: {res['mb'] / sorted(secs)[len(secs) // 2]:.2f} MB/s median (range {mbs[0]:.2f}-{mbs[-1]:.2f}" \
               f" over {len(secs)}), {min(secs):.1f}-{max(secs):.1f} s"

    rows = [f"preparation of a {res['mb']:.1f} MB corpus (load_data, given vocabulary, fresh cache):"]
    for n in dict.fromkeys((1, res["cores"])):
        rows.append(line(f"num_proc={n}", res[n]))
    rows.append(line("bare tokenizers encoding", res["bare_encoding"]))
    return "\n".join(rows)


def test_preparation_throughput(tmp_path):
    """A small run of the measurement (the numbers in README.md come from `python bench/bench_data.py 30`)."""
    res = measure_preparation(mb=0.5, repeats=1, workdir=str(tmp_path))
    assert res[1] and res[res["cores"]] and all(s > 0 for s in res[1])
    print("\n" + _summary(res))


if __name__ == "__main__":
    import subprocess
    import sys

    mb, repeats = float(sys.argv[1]) if len(sys.argv) > 1 else 30.0, int(sys.argv[2]) if len(sys.argv) > 2 else 3
    print("load before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    result = measure_preparation(mb, repeats)
    print(_summary(result))
    print("load after:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
