"""bertfast.data sources: check_sources (cheap checks before any work), generic hub sources, wikipedia configs,
script-era datasets, offline behaviour, text/doc columns, rows grouped into documents, bad encodings.

The hub is never reached: `datasets.load_dataset` is replaced by a fake that serves local parquet files shaped
like the hub's, and raises what the real call raises (a loading script refused by datasets >= 4)."""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil

import pytest

datasets = pytest.importorskip("datasets")

from bertfast.data import DataError, DataNotFoundError, check_sources, load_data  # noqa: E402
from bertfast.data import sources  # noqa: E402

REAL_LOAD = datasets.load_dataset


def _parquet(path, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return str(path)


@pytest.fixture
def kw(tmp_path):
    return dict(cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "out"), vocab_size=300, max_len=64,
                batch_size=2)


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


class FakeHub:
    """Stands in for ``datasets.load_dataset`` on hub ids: ``repos[path]`` maps a config (None: default) to
    parquet files; ``scripts`` holds the ids that still ship a loading script (refused unless the revision is the
    parquet conversion, served when ``converted``)."""

    def __init__(self):
        self.repos, self.scripts, self.converted, self.calls = {}, set(), set(), []

    def __call__(self, path, name=None, **kw):
        if path not in self.repos:
            return REAL_LOAD(path, name, **kw)
        self.calls.append((path, name, dict(kw)))
        revision, data_dir = kw.pop("revision", None), kw.pop("data_dir", None)
        assert kw.pop("data_files", None) is None
        if path in self.scripts and revision != sources.PARQUET_REVISION:
            raise RuntimeError(f"Dataset scripts are no longer supported, but found {path.split('/')[-1]}.py")
        if revision == sources.PARQUET_REVISION:
            if path not in self.converted:
                raise FileNotFoundError(f"Revision '{revision}' doesn't exist for dataset '{path}' on the Hub.")
            # one folder per config; without a data_dir every file of the conversion is read
            files = self.repos[path].get(data_dir) if data_dir else sorted({f for v in self.repos[path].values()
                                                                             for f in v})
            return REAL_LOAD("parquet", data_files={"train": files}, **kw)
        files = self.repos[path].get(name)
        if files is None:
            raise ValueError(f"BuilderConfig '{name}' not found. Available: {list(self.repos[path])}")
        return REAL_LOAD("parquet", data_files={"train": files}, **kw)


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub()
    monkeypatch.setattr(datasets, "load_dataset", fake)
    monkeypatch.setattr(sources, "hub_offline", lambda: None)  # the fake hub is always reachable
    return fake


def _book_rows(n_books=6, per_book=30):
    return [f"book {b} line {i} the cat sat on the mat number {i % 7} ." for b in range(n_books)
            for i in range(per_book)]


# ------------------------------------------------------------------------------------------------ check_sources


def test_check_sources_refuses_before_any_work(tmp_path, monkeypatch):
    def no_loading(*a, **k):
        raise AssertionError("check_sources must not load anything")

    monkeypatch.setattr(datasets, "load_dataset", no_loading)
    with pytest.raises(DataNotFoundError, match=r"'.*missing\.txt'.*no such file.*builtin"):
        check_sources(str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match=r"\*\.jsonl.*glob matches no file"):  # also a FileNotFoundError
        check_sources(f"builtin {tmp_path}/*.jsonl")
    with pytest.raises(DataNotFoundError, match=r"'bookcorpuss'.*known: 'builtin', 'bookcorpus'.*hub:ORG/NAME"):
        check_sources("bookcorpuss")
    with pytest.raises(DataError, match=r"wikipedia.*loading_ratio=1\.5.*\(0, 1\]"):
        check_sources("wikipedia:3/2")
    with pytest.raises(DataError, match=r"loading ratio"):
        check_sources("builtin", loading_ratio=0)
    with pytest.raises(DataError, match=r"hub:ORG/NAME\[:CONFIG\]"):
        check_sources("hub:a/b/c")
    with pytest.raises(DataError, match=r"sentences_per_doc=0.*positive"):
        check_sources("builtin", sentences_per_doc=0)
    with pytest.raises(DataError, match=r"--doc-column / --sentences-per-doc"):
        check_sources("builtin", doc_column="doc_id", sentences_per_doc=4)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"body": "hello."}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl.*no text column 'text'.*\['body'\].*--text-column"):
        check_sources(str(jsonl))
    check_sources(str(jsonl), text_column="body")
    pq_file = _parquet(tmp_path / "p.parquet", {"text": ["a."], "doc": [1]})
    with pytest.raises(DataError, match=r"p\.parquet.*no doc column 'doc_id'.*--doc-column"):
        check_sources(pq_file, doc_column="doc_id")
    specs = check_sources(f"builtin:0.5 {pq_file}:1/4 wikipedia:20231101.de:0.1 hub:o/n:cfg@v2",
                          doc_column="doc", hub_overrides={"wikipedia": {}, "hub:o/n:cfg@v2": {}})
    assert [(s.kind, s.ratio) for s in specs] == [("builtin", 0.5), ("local", 0.25), ("hub", 0.1), ("hub", 1.0)]
    assert (specs[2].path, specs[2].config) == ("wikimedia/wikipedia", "20231101.de")
    assert (specs[3].path, specs[3].config, specs[3].revision) == ("o/n", "cfg", "v2")


def test_bad_encodings_name_the_file_and_the_byte(tmp_path, kw):
    good = "Plain text here. Two sentences.\n\n" * 3
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(good.encode() + "Caf\u00e9 au lait.".encode("latin-1") + b"\n")
    at = len(good.encode()) + 3
    with pytest.raises(DataError, match=rf"latin1\.txt.*not UTF-8.*0xe9 at byte offset {at}.*iconv"):
        check_sources(str(latin))
    binary = tmp_path / "d" / "blob.txt"
    binary.parent.mkdir()
    binary.write_bytes(b"ok text\n" + b"\x00\x01\x02" * 10)
    with pytest.raises(DataError, match=r"blob\.txt.*binary.*NUL byte at byte offset 8"):
        check_sources(str(tmp_path / "d"))
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"fake\.parquet.*not a parquet file"):
        check_sources(str(tmp_path / "fake.parquet"))
    # a multi-byte character cut by the sniff limit is not an error; a bad byte beyond the limit is caught when
    # loading, with the same message (today's `DatasetGenerationError: An error occurred` said neither)
    late = tmp_path / "late.txt"
    head = ("Ein schöner Satz. Noch einer.\n\n" * 40).encode()
    late.write_bytes(head + b"Bad \xff byte here. And more.\n")
    check_sources(str(late), sniff_bytes=13)  # cuts "ö" in half
    check_sources(str(late), sniff_bytes=len(head))
    with pytest.raises(DataError, match=rf"late\.txt.*0xff at byte offset {len(head) + 4}"):
        sources.load_local(sources.parse_sources(str(late))[0], cache_dir=kw["cache_dir"])


def test_sniffing_many_files_stays_cheap(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "SNIFF_TOTAL", 8 * 4096)
    d = tmp_path / "many"
    d.mkdir()
    for i in range(16):
        (d / f"{i:02d}.txt").write_bytes(b"Fine text. " * 600 + (b"\xff" if i == 15 else b""))  # bad at 6600
    check_sources(str(d))  # 16 files: 4 KiB of each is read
    with pytest.raises(DataError, match=r"15\.txt.*0xff at byte offset 6600"):
        check_sources(str(d / "15.txt"))  # one file: its first MiB


# ------------------------------------------------------------------------------------------------ offline


def _cache_as_hub(cache, repo, parquet_file, config="default"):
    """Put a prepared copy of ``parquet_file`` where datasets looks for ``repo`` when the hub is unreachable."""
    REAL_LOAD("parquet", data_files={"train": [parquet_file]}, split="train", cache_dir=cache)
    src = next(p for p in glob.glob(os.path.join(cache, "parquet", "*", "*", "*")) if os.path.isdir(p))
    org, name = repo.split("/")
    dst = os.path.join(cache, f"{org}___{name}", config, "0.0.0", os.path.basename(src))
    shutil.copytree(src, dst)
    for f in glob.glob(os.path.join(dst, "parquet-*.arrow")):
        os.rename(f, f.replace(f"{os.sep}parquet-", f"{os.sep}{name}-"))


def test_offline_hub_source_not_cached_is_one_clear_error(tmp_path, kw, offline, monkeypatch):
    def no_loading(*a, **k):
        raise AssertionError("refused before loading")

    monkeypatch.setattr(datasets, "load_dataset", no_loading)
    for spec, pattern in [
        ("hub:someorg/corpus:en@v1", r"'hub:someorg/corpus:en@v1'.*'someorg/corpus' config 'en' revision 'v1'"),
        ("wikipedia:20231101.de", r"'wikipedia:20231101.de'.*wikimedia/wikipedia.*20231101\.de"),
        ("bookcorpus", r"'bookcorpus'.*bookcorpus/bookcorpus"),
    ]:
        with pytest.raises(DataError, match=pattern + r".*not in the datasets cache.*HF_HUB_OFFLINE=1.*"
                           r"Pre-download.*download_sources\(.*--data builtin") as e:
            check_sources(spec, cache_dir=kw["cache_dir"])
        assert "\n" not in str(e.value)
        with pytest.raises(DataError, match=pattern):
            load_data(spec, **kw)  # load_data checks first too


def test_no_network_is_detected_like_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(DataError, match=r"not in the datasets cache.*http://127\.0\.0\.1:9 cannot be reached"):
        check_sources("hub:someorg/corpus", cache_dir=str(tmp_path))


def test_cached_hub_source_loads_offline(tmp_path, kw, offline):
    arts = [f"Article {i} tells about topic {i}. It has a second sentence. And a third one." for i in range(20)]
    _cache_as_hub(kw["cache_dir"], "someorg/corpus", _parquet(tmp_path / "src" / "a.parquet", {"text": arts}))
    assert check_sources("hub:someorg/corpus", cache_dir=kw["cache_dir"])
    _, loader = load_data("hub:someorg/corpus:0.5", **kw)
    assert len(loader.documents) == 10 and all(len(d) == 3 for d in loader.documents["tokens"])


# ------------------------------------------------------------------------------------------------ hub sources


def test_generic_hub_source_with_columns_and_revision(tmp_path, kw, hub):
    rows = [f"Story {i} begins. It goes on for a while. It ends {i}." for i in range(30)]
    hub.repos["someorg/stories"] = {"v2": [_parquet(tmp_path / "s.parquet", {"id": list(range(30)), "content": rows})]}
    _, loader = load_data("hub:someorg/stories:v2@abc123:1/3", text_column="content", **kw)
    assert hub.calls[-1][0:2] == ("someorg/stories", "v2") and hub.calls[-1][2]["revision"] == "abc123"
    assert len(loader.documents) == 10 and all(len(d) == 3 for d in loader.documents["tokens"])
    with pytest.raises(DataError, match=r"no text column 'text'.*\['id', 'content'\].*--text-column"):
        load_data("hub:someorg/stories:v2", **kw)
    with pytest.raises(DataError, match=r"'hub:someorg/stories:v9'.*could not be loaded.*BuilderConfig"):
        load_data("hub:someorg/stories:v9", text_column="content", **kw)


def test_hub_doc_column_groups_rows_in_order(tmp_path, kw, hub):
    # a cleaned BookCorpus copy: one sentence per row, doc_id / sent_id columns
    doc_id = [d for d in range(8) for _ in range(5 + d)]
    sent_id = [s for d in range(8) for s in range(5 + d)]
    text = [f"book {d} sentence {s} the dog ran home ." for d, s in zip(doc_id, sent_id)]
    hub.repos["someone/bookcorpus-clean"] = {None: [_parquet(tmp_path / "b.parquet",
                                                            {"text": text, "doc_id": doc_id, "sent_id": sent_id})]}
    tok, loader = load_data("hub:someone/bookcorpus-clean", doc_column="doc_id", **kw)
    docs = loader.documents["tokens"]
    assert [len(d) for d in docs] == [5 + d for d in range(8)]
    first = [tok.decode(s).replace(" ", "") for s in docs[3]]
    assert first == [f"book3sentence{s}thedogranhome." for s in range(8)]
    # streaming reads the same prefix and groups it the same way
    _, streamed = load_data("hub:someone/bookcorpus-clean:0.5", doc_column="doc_id", streaming=True, **kw)
    assert [len(d) for d in streamed.documents["tokens"]] == [5, 6, 7, 8, 8]  # the first 34 rows of the 68
    _, half = load_data("hub:someone/bookcorpus-clean:0.5", doc_column="doc_id", **kw)
    assert list(half.documents["tokens"]) == list(streamed.documents["tokens"])
    for streaming in (False, True):
        with pytest.raises(DataError, match=r"no doc column 'book'.*\['text', 'doc_id', 'sent_id'\]"):
            load_data("hub:someone/bookcorpus-clean", doc_column="book", streaming=streaming, **kw)


def test_wikipedia_other_language_config(tmp_path, kw, hub):
    arts = [f"Der Artikel {i} handelt von Dr. Müller und seinem Haus in Köln. Er hat drei Sätze. Das ist alles."
            for i in range(30)]
    hub.repos["wikimedia/wikipedia"] = {"20231101.de": [_parquet(tmp_path / "de.parquet", {
        "id": [str(i) for i in range(30)], "url": [f"https://de.wikipedia.org/{i}" for i in range(30)],
        "title": [f"T{i}" for i in range(30)], "text": arts})]}
    _, loader = load_data("wikipedia:20231101.de:1/3", **kw)
    assert hub.calls[-1][1] == "20231101.de"
    assert len(loader.documents) == 10 and all(len(d) == 3 for d in loader.documents["tokens"])
    with pytest.raises(DataError, match=r"'wikipedia'.*config '20231101\.en'.*could not be loaded"):
        load_data("wikipedia", **kw)  # the default config is English


def test_script_era_dataset_retried_on_parquet_conversion(tmp_path, kw, hub, caplog):
    rows = _book_rows()
    hub.repos["bookcorpus/bookcorpus"] = {"plain_text": [_parquet(tmp_path / "bc.parquet", {"text": rows})]}
    hub.scripts.add("bookcorpus/bookcorpus")
    hub.converted.add("bookcorpus/bookcorpus")
    with caplog.at_level(logging.WARNING, logger="bertfast.data.sources"):
        _, loader = load_data("bookcorpus", loading_ratio=0.5, **kw)  # the notebook's call
    assert "ships a loading script" in caplog.text and "refs/convert/parquet" in caplog.text
    assert [c[2].get("revision") for c in hub.calls] == [None, sources.PARQUET_REVISION]
    assert len(loader.documents) == 90 // 64 + 1  # 90 rows, 64 sentences per document, as before
    assert [len(d) for d in loader.documents["tokens"]] == [64, 26]
    # the pre-download helper that the offline error names takes the same route
    from bertfast.data import download_sources

    hub.calls.clear()
    assert download_sources(f"bookcorpus builtin {tmp_path / 'bc.parquet'}", cache_dir=kw["cache_dir"]) == [
        "bookcorpus/bookcorpus"]
    assert [c[2].get("revision") for c in hub.calls] == [None, sources.PARQUET_REVISION]


def test_script_era_dataset_without_conversion_says_what_to_do(tmp_path, kw, hub):
    hub.repos["old/corpus"] = {"cfg": [_parquet(tmp_path / "o.parquet", {"text": ["A. B."] * 4})]}
    hub.scripts.add("old/corpus")
    with pytest.raises(DataError) as e:
        load_data("hub:old/corpus:cfg", **kw)
    msg = str(e.value)
    for part in ("'hub:old/corpus:cfg'", "ships a loading script", f"datasets {datasets.__version__}",
                 "corpus.py", "refs/convert/parquet", "pip install 'datasets<4'", "point --data at them"):
        assert part in msg, (part, msg)


# ------------------------------------------------------------------------------------------------ local grouping


def test_local_sentences_per_doc_and_doc_column(tmp_path, kw):
    lines = _book_rows(n_books=2, per_book=25)
    (tmp_path / "bc.txt").write_text("\n".join(lines) + "\n")  # one sentence per line, no blank lines
    _, grouped = load_data(str(tmp_path / "bc.txt"), sentences_per_doc=10, **kw)
    assert [len(d) for d in grouped.documents["tokens"]] == [10] * 5
    rows = _parquet(tmp_path / "r.parquet", {"body": lines, "book": [i // 25 for i in range(50)]})
    _, by_col = load_data(rows, text_column="body", doc_column="book", **kw)
    assert [len(d) for d in by_col.documents["tokens"]] == [25, 25]
    _, by_n = load_data(rows, text_column="body", sentences_per_doc=20, **kw)
    assert [len(d) for d in by_n.documents["tokens"]] == [20, 20, 10]
    with pytest.raises(DataError, match=r"bc\.txt.*no doc column 'book'"):
        load_data(str(tmp_path / "bc.txt"), doc_column="book", **kw)


def test_nsp_share_reported_and_one_sentence_rows_warned(tmp_path, kw):
    import warnings

    from bertfast.data import NSPBalanceWarning

    lines = _book_rows(n_books=4, per_book=40)
    rows = _parquet(tmp_path / "bc.parquet", {"text": lines})  # a local BookCorpus copy: one sentence per row
    with pytest.warns(NSPBalanceWarning, match=r"bc\.parquet.*\d+\.\d% of the \d+ NSP pairs are is_next, outside "
                      r"40%-60%.*median 1 sentences.*--sentences-per-doc"):
        _, loose = load_data(rows, **kw)
    assert loose.is_next_share < 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error", NSPBalanceWarning)
        _, grouped = load_data(rows, sentences_per_doc=40, **kw)
    assert 0.4 <= grouped.is_next_share <= 0.6
    assert grouped.is_next_share == pytest.approx(float(sum(grouped.pairs["is_next"])) / len(grouped.pairs))
