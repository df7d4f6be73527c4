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
