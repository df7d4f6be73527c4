"""Data preparation at corpus scale (issue 27): --num-proc (same data for any N), --prepare-only (the training run
then reuses every cached dataset), waiting ranks that never time out while rank 0 prepares, --streaming through the
CLI, and a preparation killed half-way that is not trusted by the next run."""
from __future__ import annotations

import json
import os
import socket
import time

import pytest
import torch

datasets = pytest.importorskip("datasets")

from _utils import assert_one_line_error  # noqa: E402

from bertfast.data import load_data, pairs as pairs_mod, sources, tokenizer as tok_mod  # noqa: E402
from bertfast.train.trainer import TrainConfig, train  # noqa: E402

REAL_LOAD = datasets.load_dataset


def _rows(n_docs=12, per_doc=9):
    return [f"Document {d} says line {i}. The cat {i % 5} sat on mat {d}." for d in range(n_docs)
            for i in range(per_doc)]


def _parquet(path, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return str(path)


@pytest.mark.parametrize("grouping", ["sentences_per_doc", "doc_column"])
def test_grouped_documents_and_pairs_do_not_depend_on_num_proc(tmp_path, grouping):
    rows = _rows()
    f = _parquet(tmp_path / "c.parquet", {"text": rows, "doc": [i // 9 for i in range(len(rows))]})
    kw = dict(vocab_size=200, max_len=32, batch_size=2, eval_fraction=0.0)
    kw.update(sentences_per_doc=7) if grouping == "sentences_per_doc" else kw.update(doc_column="doc")
    got, tok = {}, None  # one vocabulary for both (WordPiece training breaks ties differently from run to run)
    for n in (1, 2):
        tok, loader = load_data(f, num_proc=n, cache_dir=str(tmp_path / f"cache{n}"), tokenizer=tok,
                                output_dir=str(tmp_path / f"out{n}"), **kw)
        got[n] = (list(loader.documents["tokens"]), list(loader.pairs["input_ids"]), list(loader.pairs["is_next"]))
    assert len(got[1][0]) == (16 if grouping == "sentences_per_doc" else 12)  # 108 rows: 15 x 7 + 3; 12 docs
    assert got[1] == got[2]


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_load_data_refuses_a_bad_num_proc(bad):
    from bertfast.data import DataError

    with pytest.raises(DataError, match="num_proc"):
        load_data("builtin", num_proc=bad)


@pytest.mark.parametrize("bad", ["0", "-1"])
def test_cli_refuses_a_bad_num_proc_before_any_work(bad, capsys):
    from bertfast.pretrain import main

    assert main(["--num-proc", bad, "--prepare-only"]) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err)
    assert "--num-proc" in err and bad in err


def test_a_huge_num_proc_is_capped_at_the_cores():
    from bertfast.data.loader import available_cores, usable_procs

    assert usable_procs(10 ** 6) in (None, available_cores())
    assert usable_procs(1) is None and usable_procs(None) is None


def _cfg(tmp_path, corpus, **kw):
    return TrainConfig(preset="tiny", data=[corpus], vocab_size=300, max_len=32, batch_size=4, max_steps=1,
                       output_dir=str(tmp_path / "run"), progress=False, threads=1, device="cpu",
                       checkpoint_every=0, num_proc=1, **kw)


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the trained vocabulary's cache folder
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    path = tmp_path / "corpus.txt"
    docs = [" ".join(f"Sentence {i} of document {d} is here." for i in range(8)) for d in range(40)]
    path.write_text("\n\n".join(docs))
    return str(path)


def _forbid_preparation(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("preparation ran again instead of reading the cache")

    monkeypatch.setattr(tok_mod, "train_wordpiece", boom)
    monkeypatch.setattr(pairs_mod._Tokenize, "__call__", boom)
    monkeypatch.setattr(pairs_mod._BuildPairs, "__call__", boom)
    monkeypatch.setattr(sources, "split_sentences", boom)


def test_prepare_only_then_training_reuses_everything(tmp_path, corpus, monkeypatch, capsys):
    lines = []
    out = train(_cfg(tmp_path, corpus, prepare_only=True), log=lines.append)
    assert out["prepared"] and out["bytes"] > 0 and out["pairs"] > 0
    text = "\n".join(lines)
    assert "prepared in" in text and "tokenizer:" in text and "training NSP pairs" in text, text
    assert not os.path.exists(tmp_path / "run" / "checkpoints")  # nothing trained
    _forbid_preparation(monkeypatch)
    t0 = time.perf_counter()
    again = train(_cfg(tmp_path, corpus, prepare_only=True), log=lambda *_: None)
    assert again["bytes"] == out["bytes"] and time.perf_counter() - t0 < 10
    summary = train(_cfg(tmp_path, corpus), log=lambda *_: None)  # the training run: nothing prepared again
    assert summary["step"] == 1


def test_prepare_only_cli_exits_0_and_says_where(tmp_path, corpus, capsys):
    from bertfast.pretrain import main

    argv = ["--data", corpus, "--vocab-size", "300", "--max-len", "32", "--batch-size", "4", "--num-proc", "2",
            "--output-dir", str(tmp_path / "run"), "--no-progress", "--prepare-only"]
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "prepared in" in said and str(tmp_path / "hf") in said and ("MB" in said or "KB" in said), said
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_a_vocabulary_whose_saving_was_killed_is_trained_again(tmp_path, corpus, monkeypatch):
    save = tmp_path / "tok"
    sentences = [f"word{i % 50} other{i % 30} thing" for i in range(400)]
    tok_mod.trained_tokenizer(str(save), 120, iter(sentences))
    meta = save / tok_mod.META_FILE
    assert meta.exists()
    # a kill while a new vocabulary is being saved over it: files half-written, the old meta removed first
    calls = []
    real = tok_mod.train_wordpiece
    monkeypatch.setattr(tok_mod, "train_wordpiece", lambda *a, **k: calls.append(1) or real(*a, **k))
    meta.unlink()
    (save / "vocab.txt").write_text("[PAD]\n")  # truncated
    tok = tok_mod.trained_tokenizer(str(save), 120, iter(sentences))
    assert calls and len(tok) > 10 and meta.exists()


# ------------------------------------------------------------------------------------------- streaming via CLI
def test_streaming_flag_reaches_the_hub_loader(tmp_path, corpus, monkeypatch):
    rows = _rows(20, 9)
    files = [_parquet(tmp_path / "hub" / "train-0.parquet", {"text": rows})]
    calls = []

    def fake(path, name=None, **kw):
        if path != "someone/corpus":
            return REAL_LOAD(path, name, **kw)
        calls.append(kw.get("streaming", False))
        kw.pop("revision", None), kw.pop("data_files", None)
        return REAL_LOAD("parquet", data_files={"train": files}, **kw)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    monkeypatch.setattr(sources, "hub_offline", lambda: None)
    monkeypatch.setattr(sources, "_stream_rows", lambda *a: len(rows))
    out = train(_cfg(tmp_path, "hub:someone/corpus:0.5", streaming=True, prepare_only=True), log=lambda *_: None)
    assert calls == [True] and out["pairs"] > 0
    calls.clear()
    full = train(_cfg(tmp_path, "hub:someone/corpus:0.5", prepare_only=True), log=lambda *_: None)
    assert calls == [False] and full["pairs"] == out["pairs"]  # the same prefix, streamed or downloaded


def test_a_streamed_prefix_is_written_to_disk_once_and_a_killed_stream_leaves_nothing(tmp_path, corpus,
                                                                                       monkeypatch):
    """The prefix goes to an arrow file in the datasets cache as it streams (not held in memory): the next run
    with the same flags reads that file and every map after it from the cache, without iterating the stream; a
    stream that dies half-way leaves no file that a later run would trust."""
    rows = _rows(20, 9)
    files = [_parquet(tmp_path / "hub" / "train-0.parquet", {"text": rows})]
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, **kw: REAL_LOAD(
        "parquet", data_files={"train": files}, split="train", streaming=kw.get("streaming", False)))
    monkeypatch.setattr(sources, "hub_offline", lambda: None)
    monkeypatch.setattr(sources, "_stream_rows", lambda *a: len(rows))
    folder = tmp_path / "hf" / "bertfast-streamed"
    real_iter = datasets.IterableDataset.__iter__

    def dies_half_way(self):
        for i, row in enumerate(real_iter(self)):
            if i == 40:
                raise ConnectionError("the hub went away")
            yield row

    monkeypatch.setattr(datasets.IterableDataset, "__iter__", dies_half_way)
    from bertfast.data import DataError

    with pytest.raises(DataError, match="ConnectionError: the hub went away"):
        train(_cfg(tmp_path, "hub:someone/corpus:0.5", streaming=True, prepare_only=True), log=lambda *_: None)
    assert not folder.exists() or [p for p in folder.rglob("*") if p.is_file()] == []  # nor its temporary
    monkeypatch.setattr(datasets.IterableDataset, "__iter__", real_iter)

    first = train(_cfg(tmp_path, "hub:someone/corpus:0.5", streaming=True, prepare_only=True), log=lambda *_: None)
    (written,) = folder.glob("*/rows.arrow")
    assert len(datasets.Dataset.from_file(str(written))) == 90  # ceil(0.5 * 180) rows
    cached = sorted(folder.rglob("*"))

    def no_stream(self):
        raise AssertionError("streamed again instead of reading the written prefix")

    monkeypatch.setattr(datasets.IterableDataset, "__iter__", no_stream)
    _forbid_preparation(monkeypatch)
    again = train(_cfg(tmp_path, "hub:someone/corpus:0.5", streaming=True), log=lambda *_: None)
    assert again["step"] == 1 and first["pairs"] > 0
    assert sorted(folder.rglob("*")) == cached  # nothing streamed, prepared or written again

    written.write_bytes(written.read_bytes()[:100])  # damaged by hand: named, with what to do
    with pytest.raises(DataError, match=r"rows.arrow cannot be read .*Delete the folder"):
        train(_cfg(tmp_path / "2", "hub:someone/corpus:0.5", streaming=True), log=lambda *_: None)


def test_a_streamed_prefix_of_unknown_size_is_counted_once(tmp_path, corpus, monkeypatch):
    """Without a published row count the split is streamed once to count it; the next run finds the written
    prefix without that pass (the stream is never iterated)."""
    rows = _rows(20, 9)
    files = [_parquet(tmp_path / "hub" / "train-0.parquet", {"text": rows})]
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, **kw: REAL_LOAD(
        "parquet", data_files={"train": files}, split="train", streaming=kw.get("streaming", False)))
    monkeypatch.setattr(sources, "hub_offline", lambda: None)
    monkeypatch.setattr(sources, "_stream_rows", lambda *a: None)
    first = train(_cfg(tmp_path, "hub:someone/corpus:0.5", streaming=True, prepare_only=True), log=lambda *_: None)
    (written,) = (tmp_path / "hf" / "bertfast-streamed").glob("*/rows.arrow")
    assert len(datasets.Dataset.from_file(str(written))) == 90 and first["pairs"] > 0

    def no_stream(self):
        raise AssertionError("streamed again (to count the rows) instead of reading the written prefix")

    monkeypatch.setattr(datasets.IterableDataset, "__iter__", no_stream)
    again = train(_cfg(tmp_path, "hub:someone/corpus:0.5", streaming=True, prepare_only=True), log=lambda *_: None)
    assert again["pairs"] == first["pairs"]


# ------------------------------------------------------------------------------------------- torchrun waiting
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slow_worker(rank: int, port: int, out: str, logdir: str, delay: float, fail: bool):
    import bertfast.data
    from bertfast.data import DataError

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), BERTFAST_DIST_TIMEOUT_S="5")
    real = bertfast.data.load_data

    def load_data(*a, **k):
        if rank == 0:
            time.sleep(delay)  # a preparation longer than the process group's timeout (5 s: 2 s was tight for
            # the training step after it on a loaded machine)
            if fail:
                raise DataError("--data corpus.txt", "the disk is full while preparing", "Free some space.")
        return real(*a, **k)
    bertfast.data.load_data = load_data
    cfg = TrainConfig(preset="tiny", max_len=32, builtin_docs=60, batch_size=4, max_steps=1, output_dir=out,
                      progress=False, threads=1, device="cpu", checkpoint_every=0, num_proc=1)
    try:
        summary = train(cfg, log=lambda *_: None)
        result = {"error": None, "step": summary["step"]}
    except Exception as e:  # noqa: BLE001 - recorded for the test
        result = {"error": type(e).__name__, "message": str(e)}
    with open(os.path.join(logdir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


@pytest.mark.parametrize("fail", [False, True])
def test_waiting_ranks_outlast_the_process_group_timeout(tmp_path, fail):
    ctx = torch.multiprocessing.spawn(_slow_worker, args=(_free_port(), str(tmp_path / "out"), str(tmp_path), 7.5,
                                                          fail), nprocs=2, join=False)
    try:
        while not ctx.join(timeout=120):
            pass
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    got = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)}
    if not fail:
        assert got[0] == got[1] == {"error": None, "step": 1}, got
    else:
        assert got[0]["error"] == "DataError", got
        assert got[1]["error"] == "PeerFailed" and "the disk is full while preparing" in got[1]["message"], got


def test_a_full_disk_during_a_map_is_one_clear_error(tmp_path):
    import errno

    from bertfast.data import DataError

    def full(batch):
        raise OSError(errno.ENOSPC, "No space left on device")

    ds = datasets.Dataset.from_dict({"text": ["a b c"] * 4})
    with pytest.raises(DataError, match="splitting: no space left on device.*larger disk"):
        sources.cached_map(ds, full, fingerprint="f" * 16, cache_dir=str(tmp_path), batched=True, desc="splitting")
    with pytest.raises(ValueError, match="other"):  # any other error is left as it is
        sources.cached_map(ds, lambda b: (_ for _ in ()).throw(ValueError("other")), fingerprint="e" * 16,
                           cache_dir=str(tmp_path), batched=True)
