"""Corpus sources -> one Hugging Face ``datasets.Dataset`` of documents, column ``sentences`` (list of str).

Every source goes through ``datasets`` (caching, ``num_proc``, streaming): the hub corpora through
``datasets.load_dataset(path, config)``, local files through its ``text`` / ``json`` / ``parquet`` builders, the
built-in corpus through ``Dataset.from_dict``. ``datasets`` is imported inside functions only: ``import
bertfast.data`` must work on machines without it.
"""

from __future__ import annotations

import codecs
import glob
import logging
import math
import os
from dataclasses import dataclass
from fractions import Fraction

from . import builtin_corpus
from .errors import OFFLINE_HINT, DataError, DataNotFoundError
from .sentences import split_sentences

log = logging.getLogger(__name__)

VERSION = 3  # bump when the documents built here change: it keys the on-disk caches

# name -> hub dataset. "rows": what one row is. bookcorpus is one sentence per row, books back to back, with no
# book boundary marker: consecutive rows are grouped into documents of `sentences_per_doc` sentences.
HUB_SOURCES = {
    "bookcorpus": dict(path="bookcorpus/bookcorpus", name=None, rows="sentences"),
    "wikipedia": dict(path="wikimedia/wikipedia", name="20231101.en", rows="documents"),
}
BOOKCORPUS_SENTENCES_PER_DOC = 64  # the hub bookcorpus has no book boundary: this many rows make a document
# Train-split sizes published on the hub cards, used to turn a streaming loading_ratio into a row count.
KNOWN_TRAIN_ROWS = {"bookcorpus/bookcorpus": 74_004_228, ("wikimedia/wikipedia", "20231101.en"): 6_407_814}
FILE_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
PARQUET_REVISION = "refs/convert/parquet"  # the hub's automatic parquet conversion of every public dataset
SNIFF_BYTES = 1 << 20  # check_sources reads this much of each text file for its encoding ...
SNIFF_TOTAL = 64 << 20  # ... and at most this much in all (many files: less of each, at least 4 KiB)
KNOWN_NAMES = "'builtin', 'bookcorpus', 'wikipedia[:CONFIG]', 'hub:ORG/NAME[:CONFIG][@REVISION]'"


@dataclass(frozen=True)
class SourceSpec:
    """One data source. ``name`` is the spec as written (without its ratio); ``kind`` is builtin, hub or local.
    Hub sources carry the dataset id (``path``), ``config``, ``revision`` and ``rows``: what one row is
    ("documents", or "sentences" for bookcorpus, whose consecutive rows are grouped into documents)."""

    name: str
    ratio: float = 1.0
    kind: str = "local"
    path: str | None = None
    config: str | None = None
    revision: str | None = None
    rows: str = "documents"

    @property
    def hub_label(self) -> str:
        return (f"hub dataset {self.path!r}" + (f" config {self.config!r}" if self.config else "")
                + (f" revision {self.revision!r}" if self.revision else ""))


def _parse_ratio(text: str) -> float | None:
    try:
        return float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        return None


def _spec(item: str, ratio: float) -> SourceSpec:
    if item == "builtin":
        return SourceSpec(item, ratio, "builtin")
    if os.path.exists(item):
        return SourceSpec(item, ratio, "local", path=item)
    if item == "bookcorpus":
        return SourceSpec(item, ratio, "hub", path=HUB_SOURCES[item]["path"], rows="sentences")
    if item == "wikipedia" or item.startswith("wikipedia:"):
        config = item.partition(":")[2] or HUB_SOURCES["wikipedia"]["name"]
        return SourceSpec(item, ratio, "hub", path=HUB_SOURCES["wikipedia"]["path"], config=config, rows="articles")
    if item.startswith("hub:"):
        body, _, revision = item[4:].partition("@")
        path, _, config = body.partition(":")
        if path.count("/") > 1 or not path.strip("/") or any(c.isspace() for c in path):
            raise DataError(f"data source {item!r}", "a hub source is hub:ORG/NAME[:CONFIG][@REVISION][:RATIO]",
                            "E.g. hub:wikimedia/wikipedia:20231101.de:0.01 or hub:bookcorpus/bookcorpus@main.")
        return SourceSpec(item, ratio, "hub", path=path, config=config or None, revision=revision or None)
    return SourceSpec(item, ratio, "local", path=item)


def parse_sources(name, loading_ratio: float = 1.0) -> list[SourceSpec]:
    """``"bookcorpus"``, ``"wikipedia:20231101.de:1/41"``, ``"hub:ORG/NAME:CONFIG@REV:0.1"``,
    ``"a.txt b.parquet:0.5"`` or a list of such -> specs. The last ``:RATIO`` (a number or a fraction) is the
    loading ratio; a hub config that is itself a number needs an explicit ratio after it (``hub:o/n:2023:1``)."""
    if isinstance(name, (list, tuple)):
        items = [os.fspath(x) if isinstance(x, os.PathLike) else str(x) for x in name]
    elif isinstance(name, (str, os.PathLike)):
        name = os.fspath(name)
        items = [name] if os.path.exists(name) else name.split()
    else:
        raise DataError(f"load_data(name={name!r})", "name must be a string or a list of strings")
    if not items:
        raise DataError("load_data(name='')", "no data source was named")
    specs = []
    for item in items:
        ratio = loading_ratio
        if not os.path.exists(item) and ":" in item:
            head, tail = item.rsplit(":", 1)
            parsed = _parse_ratio(tail)
            if parsed is not None:
                item, ratio = head, parsed
        if not (isinstance(ratio, (int, float)) and 0.0 < ratio <= 1.0):
            raise DataError(f"data source {item!r} with loading_ratio={ratio}",
                            "the loading ratio must be in (0, 1]", "Use e.g. bookcorpus:0.1 or loading_ratio=1/41.")
        specs.append(_spec(item, float(ratio)))
    return specs


def _hash(obj) -> str:
    from datasets.fingerprint import Hasher

    return Hasher.hash(obj)


def cached_map(ds, fn, *, fingerprint: str, cache_dir: str | None, **kw):
    """``ds.map`` keyed by an explicit fingerprint, so the next run with the same inputs reloads it from disk.

    Datasets read from files cache next to their arrow files automatically; in-memory ones (the built-in
    corpus) cache under ``cache_dir`` when one is given. ``num_proc`` is capped at one process per row
    (datasets would lower it itself, with a warning on stderr).
    """
    if "num_proc" in kw:
        kw["num_proc"] = _procs(kw["num_proc"], len(ds))
    if not ds.cache_files and cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        kw["cache_file_name"] = os.path.join(cache_dir, f"bertfast-{fingerprint}.arrow")
    try:
        return ds.map(fn, new_fingerprint=fingerprint, **kw)
    except Exception as e:
        raise disk_full_error(e, kw.get("desc", "preparing the data"), ds) or e


def disk_full_error(e: BaseException, what: str, ds=None) -> DataError | None:
    """A DataError saying the disk is full when ``e`` (or its cause) is ENOSPC; None otherwise."""
    import errno

    while e is not None and not (isinstance(e, OSError) and e.errno == errno.ENOSPC):
        e = e.__cause__ or e.__context__
    if e is None:
        return None
    where = os.path.dirname(ds.cache_files[0]["filename"]) if ds is not None and ds.cache_files else \
        getattr(e, "filename", None) or "the datasets cache"
    return DataError(what, f"no space left on device ({where})",
                     "Free space there, or point HF_DATASETS_CACHE (or cache_dir) at a larger disk; files "
                     "already complete are reused by the next run, a half-written one is not.")


def _head(ds, ratio: float):
    """The first ``ceil(ratio * len)`` rows (a contiguous prefix: cheap, and keeps bookcorpus books whole)."""
    if ratio >= 1.0:
        return ds
    return ds.select(range(max(1, math.ceil(ratio * len(ds)))))


def _split_docs(batch):
    out = [split_sentences(t) if isinstance(t, str) else [] for t in batch["text"]]
    return {"sentences": [s for s in out if s]}


class _DocRanges:
    """Rows [start, end) of ``ds`` -> one document: each row split into sentences (``doc_column``), or each row
    kept as one sentence (``split=False``: ``sentences_per_doc``). A document never straddles two batches, so the
    documents do not depend on the batch size nor on ``num_proc``."""

    def __init__(self, ds, split: bool = True):
        self.ds, self.split = ds, split

    def _sentences(self, rows) -> list[str]:
        if self.split:
            return [x for t in rows if isinstance(t, str) for x in split_sentences(t)]
        return [t.strip() for t in rows if isinstance(t, str) and t.strip()]

    def __call__(self, batch):
        if not batch["start"]:
            return {"sentences": []}
        lo, hi = batch["start"][0], batch["end"][-1]
        texts = self.ds[lo:hi]["text"]
        out = [self._sentences(texts[s - lo : e - lo]) for s, e in zip(batch["start"], batch["end"])]
        return {"sentences": [d for d in out if d]}


def _ranges(starts, ends, fp: str):
    """A dataset of row ranges [start, end), fingerprinted by ``fp``."""
    import datasets
    import numpy as np

    ranges = datasets.Dataset.from_dict({"start": np.asarray(starts, dtype=np.int64),
                                         "end": np.asarray(ends, dtype=np.int64)})
    ranges._fingerprint = _hash([fp, "ranges"])
    return ranges


def _doc_column_ranges(ds, doc_column: str, fp: str, what: str):
    """Ranges of consecutive rows sharing ``doc_column``'s value."""
    import numpy as np

    if doc_column not in ds.column_names:
        raise DataError(what, f"it has no doc column {doc_column!r} (columns: {ds.column_names})",
                        "Pass an existing column as doc_column / --doc-column, or leave it unset for one "
                        "document per row.")
    vals = ds.data.column(doc_column).to_numpy(zero_copy_only=False) if len(ds) else np.array([])
    if ds._indices is not None:  # a selected prefix of the table
        vals = np.asarray(ds[doc_column], dtype=object)
    cut = np.flatnonzero(vals[1:] != vals[:-1]) + 1 if len(vals) else np.array([], dtype=np.int64)
    starts = np.concatenate([[0], cut]) if len(vals) else cut
    ends = np.append(cut, len(vals)) if len(vals) else cut
    return _ranges(starts, ends, fp)


def to_documents(ds, *, fp: str, what: str, cache_dir=None, num_proc=None, doc_column=None,
                 sentences_per_doc=None, rows="documents"):
    """Rows with a ``text`` column -> documents (``sentences``: list of str), in one of three ways:

    * ``doc_column``: consecutive rows sharing that column's value form one document, in row order (each row
      split into sentences);
    * ``sentences_per_doc`` N (or ``rows == "sentences"``: bookcorpus): N consecutive rows form a document,
      each row kept as one sentence;
    * otherwise one document per row, split into sentences.
    Documents do not depend on ``num_proc`` (grouping maps over row ranges, never cut by a batch). Wikipedia (``rows ==
    "articles"``) is always one document per row: ``doc_column`` and ``sentences_per_doc`` leave it alone, so
    that they can be given for a mix such as ``"wikipedia bookcorpus"``.
    """
    if rows == "articles":
        doc_column = sentences_per_doc = None
    if doc_column is not None:
        ranges = _doc_column_ranges(ds, doc_column, fp, what)
        return cached_map(ranges, _DocRanges(ds.select_columns(["text"])),
                          fingerprint=_hash([fp, "doc_column", doc_column, VERSION]), cache_dir=cache_dir,
                          batched=True, batch_size=1000, num_proc=num_proc,
                          remove_columns=["start", "end"], desc=f"{what}: grouping rows by {doc_column}")
    ds = ds.select_columns(["text"])
    if sentences_per_doc or rows == "sentences":
        n = sentences_per_doc or BOOKCORPUS_SENTENCES_PER_DOC
        starts = range(0, len(ds), n)
        ranges = _ranges(starts, [min(s + n, len(ds)) for s in starts], fp)
        return cached_map(ranges, _DocRanges(ds, split=False), fingerprint=_hash([fp, "group", n, VERSION]),
                          cache_dir=cache_dir, batched=True, batch_size=1000,
                          num_proc=num_proc, remove_columns=["start", "end"],
                          desc=f"{what}: grouping rows into documents of {n} sentences")
    return cached_map(ds, _split_docs, fingerprint=_hash([fp, "split", VERSION]), cache_dir=cache_dir, batched=True,
                      num_proc=num_proc, remove_columns=["text"], desc=f"{what}: splitting sentences")


def _procs(num_proc, rows: int):
    """datasets refuses more processes than rows: at most one per row (None stays None: one process)."""
    return None if num_proc is None or num_proc <= 1 else max(1, min(num_proc, rows)) if rows else None


def _use_text_column(ds, what: str, text_column: str, doc_column: str | None):
    """Keep ``text_column`` (renamed ``text``) and ``doc_column``; a clear error when one is missing."""
    if text_column not in ds.column_names:
        raise DataError(what, f"it has no text column {text_column!r} (columns: {ds.column_names})",
                        "Name the column that holds the text with text_column= / --text-column.")
    if doc_column and doc_column not in ds.column_names:
        raise DataError(what, f"it has no doc column {doc_column!r} (columns: {ds.column_names})",
                        "Name an existing column with doc_column= / --doc-column, or leave it unset for one "
                        "document per row.")
    keep = [text_column] + ([doc_column] if doc_column else [])
    ds = ds.select_columns(keep)
    if text_column != "text":
        if "text" in ds.column_names:
            ds = ds.remove_columns(["text"])
        ds = ds.rename_column(text_column, "text")
    return ds


# ---------------------------------------------------------------------------------------------------- hub


def hub_offline() -> str | None:
    """Why the hub cannot be used now ("HF_HUB_OFFLINE=1", "HF_ENDPOINT ... cannot be reached"), or None.

    The endpoint is ``datasets.config.HF_ENDPOINT`` (``HF_ENDPOINT``), probed with one HEAD request through
    urllib, which honours the usual proxy variables; any HTTP answer counts as reachable."""
    import urllib.error
    import urllib.request

    import datasets

    if datasets.config.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1"
    endpoint = datasets.config.HF_ENDPOINT
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=5)
    except urllib.error.HTTPError:
        return None
    except Exception as e:  # DNS failure, refused, timeout
        return f"the hub {endpoint} cannot be reached ({getattr(e, 'reason', e)})"
    return None


def hub_cache_root(cache_dir=None) -> str:
    import datasets

    return os.path.expanduser(str(cache_dir or datasets.config.HF_DATASETS_CACHE))


def hub_is_cached(spec: SourceSpec, cache_dir=None) -> bool:
    """Whether ``datasets`` has this hub dataset (and config) prepared in its cache: where
    ``load_dataset`` looks when the hub cannot be reached (``<cache>/<org>___<name>/<config>/<version>/<hash>``)."""
    from datasets.naming import camelcase_to_snakecase

    parts = spec.path.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    root = os.path.join(hub_cache_root(cache_dir), "___".join(parts))
    config = glob.escape(spec.config) + "*" if spec.config else "*"
    return any(os.path.isdir(p) for p in glob.glob(os.path.join(root, config, "*", "*")))


def predownload_command(spec: SourceSpec, cache_dir=None) -> str:
    args = [repr(spec.name)] + ([f"cache_dir={cache_dir!r}"] if cache_dir else [])
    return f'python -c "from bertfast.data import download_sources; download_sources({", ".join(args)})"'


def download_sources(name, *, cache_dir=None, num_proc=None) -> list[str]:
    """Download and prepare the hub sources among ``name`` (same grammar as ``load_data``) into the ``datasets``
    cache, with the script-era retry of ``load_data``, so that a later run loads them offline. Local and built-in
    sources are skipped. Returns the hub ids prepared."""
    done = []
    for s in parse_sources(name):
        if s.kind == "hub":
            try:
                _load_hub_dataset(s, {}, streaming=False, cache_dir=cache_dir, num_proc=num_proc)
            except DataError:
                raise
            except Exception as e:
                raise DataError(f"download_sources({s.name!r}) ({s.hub_label})",
                                f"the download failed ({type(e).__name__}: {e})",
                                "Check the network, the name, config and revision on the hub.") from e
            log.info("%s: %s is in the datasets cache (%s)", s.name, s.path, hub_cache_root(cache_dir))
            done.append(s.path)
    return done


def _is_script_error(e: BaseException) -> bool:
    return "scripts are no longer supported" in str(e) or "trust_remote_code" in str(e)


def _stream_rows(ids, path, name, data_files) -> int | None:
    """Rows in a streamed train split, without reading it when the size is known."""
    splits = getattr(ids.info, "splits", None)
    if splits and "train" in splits and splits["train"].num_examples:
        return splits["train"].num_examples
    known = KNOWN_TRAIN_ROWS.get((path, name)) or (KNOWN_TRAIN_ROWS.get(path) if name is None else None)
    if known and data_files is None:
        return known
    files = data_files.get("train", data_files) if isinstance(data_files, dict) else data_files
    files = [files] if isinstance(files, str) else files
    if files and all(str(f).endswith(".parquet") and os.path.exists(f) for f in files):
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    return None


def _load_hub_dataset(spec: SourceSpec, override: dict, *, streaming: bool, cache_dir, num_proc):
    """``datasets.load_dataset`` for a hub source; a dataset that still ships a loading script (refused since
    ``datasets`` 4) is retried once on the hub's parquet conversion, and said so."""
    import datasets

    path = override.get("path", spec.path)
    name = override.get("name", spec.config)
    revision = override.get("revision", spec.revision)
    data_files = override.get("data_files")
    kw = dict(data_files=data_files, split="train")
    kw.update(dict(streaming=True) if streaming else dict(cache_dir=cache_dir, num_proc=num_proc))
    try:
        return datasets.load_dataset(path, name, revision=revision, **kw), (path, name, revision, data_files)
    except Exception as e:
        if not _is_script_error(e) or revision == PARQUET_REVISION:
            raise
        first = e
    log.warning("%s: %s ships a loading script, which datasets %s no longer runs; retrying once with the hub's "
                "parquet conversion (revision=%r%s)", spec.name, path, datasets.__version__, PARQUET_REVISION,
                f", data_dir={name!r}" if name else "")
    try:
        # the conversion holds one folder per config and no loading script: the config is a data_dir there
        ds = datasets.load_dataset(path, revision=PARQUET_REVISION, data_dir=name, **kw)
    except Exception as e:
        raise DataError(
            f"data source {spec.name!r} ({spec.hub_label})",
            f"the dataset ships a loading script, which datasets {datasets.__version__} refuses ({first}), and "
            f"its parquet conversion (revision={PARQUET_REVISION!r}) could not be loaded either "
            f"({type(e).__name__}: {e})",
            "Either install a datasets release that still runs scripts (pip install 'datasets<4'; it then asks "
            "for trust_remote_code), or download the dataset's files yourself and point --data at them "
            "(e.g. --data 'corpus/*.parquet', with --text-column/--doc-column/--sentences-per-doc as needed).",
        ) from e
    return ds, (path, name, PARQUET_REVISION, data_files)


def load_hub(spec: SourceSpec, *, streaming: bool = False, cache_dir=None, num_proc=None,
             override: dict | None = None, sentences_per_doc: int | None = None, text_column: str = "text",
             doc_column: str | None = None):
    """Load a hub source (or what ``override`` points at) -> (documents, key).

    ``override`` may replace ``path``, ``name`` (the config), ``revision`` and give ``data_files``: tests point
    this very code at local parquet files with ``{"path": "parquet", "name": None, "data_files": {...}}``.
    ``text_column`` / ``doc_column`` apply to ``hub:`` sources; bookcorpus and wikipedia use their own layout.
    """
    on_hub = override is None
    override = override or {}
    if not spec.name.startswith("hub:"):  # bookcorpus / wikipedia: their own `text` column, no doc column
        text_column, doc_column = "text", None
    asked = f"data source {spec.name!r} ({spec.hub_label})"
    offline = None
    if streaming and on_hub:
        offline = hub_offline()
        if offline:
            log.warning("%s: streaming needs the hub (%s): reading the cached copy instead", spec.name, offline)
            streaming = False
    try:
        if streaming:
            ds, fp = _stream_prefix(spec, override, asked, text_column, doc_column, cache_dir=cache_dir,
                                    num_proc=num_proc)
        else:
            ds, _ = _load_hub_dataset(spec, override, streaming=False, cache_dir=cache_dir, num_proc=num_proc)
            fp = None
    except DataError:
        raise
    except Exception as e:  # ConnectionError, hub offline, DatasetNotFoundError, ...
        offline = offline or (hub_offline() if on_hub else None)
        if offline and on_hub:
            raise _not_cached_error(spec, offline, cache_dir) from e
        raise DataError(asked, f"the dataset could not be loaded ({type(e).__name__}: {e})",
                        "Check the name, config and revision on the hub. If there is no network: "
                        + OFFLINE_HINT) from e
    ds = _use_text_column(ds, asked, text_column, doc_column)
    if not streaming:
        ds = _head(ds, spec.ratio)
        fp = _hash([ds._fingerprint, "head"])
    docs = to_documents(ds, fp=fp, what=spec.name, cache_dir=cache_dir, num_proc=num_proc, doc_column=doc_column,
                        sentences_per_doc=sentences_per_doc, rows=spec.rows)
    return docs, docs._fingerprint


def _stream_prefix(spec: SourceSpec, override: dict, asked: str, text_column: str, doc_column: str | None, *,
                   cache_dir, num_proc):
    """Stream the train split and write its ``spec.ratio`` prefix, the text (and doc) column only, to one arrow
    file in the datasets cache -> (dataset, fingerprint). Only the prefix is read (no full download) and it never
    sits in memory whole: rows go to disk as they arrive, and the maps after it cache next to that file like a
    downloaded dataset's. The file is keyed by the source (path, config, revision, files) and the row count, so the
    next run with the same flags (or after ``--prepare-only``) reads it from disk instead of streaming again."""
    import datasets

    ratio = spec.ratio
    ids, (path, name, rev, data_files) = _load_hub_dataset(spec, override, streaming=True, cache_dir=cache_dir,
                                                            num_proc=num_proc)
    for what_col, col in (("text", text_column), ("doc", doc_column)):
        if col is not None and col not in (ids.column_names or [col]):
            raise DataError(asked, f"it has no {what_col} column {col!r} (columns: {ids.column_names})",
                            f"Name an existing column with {what_col}_column= / --{what_col}-column.")
    columns = [text_column] + ([doc_column] if doc_column else [])
    stream = ids.select_columns(columns)
    total = _stream_rows(ids, path, name, data_files)
    counted = total is None and ratio < 1.0  # the size is not published: only a full pass would tell it, so the
    take = None if total is None else max(1, math.ceil(ratio * total)) if ratio < 1.0 else total
    size = f"ratio {ratio}" if counted else take  # file is keyed by the ratio and counted while it is not on disk
    fp = _hash(["stream", path, name, rev, str(data_files), columns, size, VERSION])
    file = os.path.join(hub_cache_root(cache_dir), "bertfast-streamed", fp, "rows.arrow")  # maps cache beside it
    if not os.path.exists(file):
        if counted:  # nothing is kept from this pass
            total = sum(1 for _ in _progress(stream, None, f"{spec.name}: counting the streamed rows"))
            take = max(1, math.ceil(ratio * total))
        if take is not None:
            stream = stream.take(take)
        try:
            n = _write_rows(stream, columns, _features(ids, columns), file, take,
                            f"{spec.name}: streaming the first {take or 'all'} rows")
        except Exception as e:
            raise disk_full_error(e, f"{spec.name}: writing the streamed rows") or e
        if n == 0:
            raise DataError(asked, "its train split streamed no rows", "Check the name, config and revision.")
    try:
        return datasets.Dataset.from_file(file), fp
    except Exception as e:  # damaged after it was written (it is renamed into place only when complete)
        raise DataError(asked, f"its streamed prefix {file} cannot be read ({type(e).__name__}: {e})",
                        f"Delete the folder {os.path.dirname(file)}: the next run streams the prefix again.") from e


def _features(ids, columns: list[str]):
    """The streamed columns' declared types (None when the stream declares none: inferred from the rows)."""
    import datasets

    feats = getattr(ids, "features", None)
    return datasets.Features({c: feats[c] for c in columns}) if feats and all(c in feats for c in columns) else None


def _write_rows(rows, columns: list[str], features, file: str, total: int | None, desc: str) -> int:
    """Write streamed rows to ``file`` (an arrow file ``datasets`` reads) as they arrive -> rows written. A
    temporary name is renamed when complete, so a run killed half-way leaves nothing a later one would trust."""
    from datasets.arrow_writer import ArrowWriter

    os.makedirs(os.path.dirname(file), exist_ok=True)
    tmp = f"{file}.{os.getpid()}.tmp"
    n = 0
    try:
        with ArrowWriter(path=tmp, features=features, writer_batch_size=1000) as writer:
            for row in _progress(rows, total, desc):
                writer.write({c: row[c] for c in columns})
                n += 1
            if n == 0:
                return 0
            writer.finalize()
        os.replace(tmp, file)
        return n
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _progress(it, total, desc):
    from datasets.utils.tqdm import tqdm  # hidden with the other datasets bars (--no-progress)

    return tqdm(it, total=total, desc=desc, unit=" rows")


def _not_cached_error(spec: SourceSpec, why: str, cache_dir=None) -> DataError:
    return DataError(
        f"data source {spec.name!r} ({spec.hub_label})",
        f"it is not in the datasets cache ({hub_cache_root(cache_dir)}) and the hub cannot be used ({why})",
        f"Pre-download it once with network (same HF_HOME / cache_dir): {predownload_command(spec, cache_dir)}; "
        "then it loads offline. Or: " + OFFLINE_HINT)


# ---------------------------------------------------------------------------------------------------- local


def local_files(spec: str) -> list[str]:
    """The corpus files a path, folder or glob names (sorted); DataNotFoundError / DataError otherwise."""
    if any(c in spec for c in "*?["):
        files = sorted(f for f in glob.glob(spec, recursive=True) if os.path.isfile(f))
        if not files:
            raise DataNotFoundError(f"data source {spec!r}", "the glob matches no file",
                                    "Check the pattern (quote it so the shell does not expand it). " + OFFLINE_HINT)
    elif os.path.isdir(spec):
        files = sorted(
            os.path.join(root, f) for root, _, names in os.walk(spec) for f in names
            if os.path.splitext(f)[1].lower() in FILE_BUILDERS
        )
        if not files:
            raise DataError(f"data source {spec!r}", "the folder holds no .txt, .jsonl or .parquet file")
    elif os.path.isfile(spec):
        files = [spec]
    else:
        raise DataNotFoundError(f"data source {spec!r}",
                                f"no such file, folder or known dataset (known: {KNOWN_NAMES})", OFFLINE_HINT)
    bad = [f for f in files if os.path.splitext(f)[1].lower() not in FILE_BUILDERS]
    if bad:
        raise DataError(f"data source {spec!r}", f"unsupported file type: {bad[0]}",
                        "Use .txt (documents separated by blank lines), .jsonl or .parquet with a `text` column.")
    return files


def check_file_encoding(path: str, limit: int | None = SNIFF_BYTES) -> None:
    """DataError when ``path`` (the first ``limit`` bytes; None: all) is not what its extension says: a parquet
    file without the parquet magic, or a text / jsonl file that is binary (NUL bytes) or not UTF-8; the message
    names the file, the problem and the byte offset."""
    ext = os.path.splitext(path)[1].lower()
    todo = ("Convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8.txt) or remove it from the "
            "data (folders and globs take every .txt/.jsonl/.parquet file below them).")
    if ext == ".parquet":
        with open(path, "rb") as f:
            head = f.read(4)
        if os.path.getsize(path) and head != b"PAR1":
            raise DataError(f"data file {path}", f"it is not a parquet file (it starts with {head!r}, not b'PAR1')",
                            "Give .parquet only to parquet files.")
        return
    dec = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while limit is None or offset < limit:
            chunk = f.read(min(1 << 20, limit - offset) if limit is not None else 1 << 20)
            if not chunk:
                break
            nul = chunk.find(b"\x00")
            try:
                dec.decode(chunk[:nul] if nul >= 0 else chunk)
            except UnicodeDecodeError as e:
                # offset of the chunk, minus the bytes of an unfinished character carried from the last chunk
                at = offset + e.start - (len(e.object) - len(chunk[:nul] if nul >= 0 else chunk))
                bad = e.object[e.start : e.start + 1]
                raise DataError(f"data file {path}", f"it is not UTF-8 text: byte 0x{bad.hex()} at byte offset "
                                f"{at} cannot be decoded ({e.reason})", todo) from None
            if nul >= 0:
                raise DataError(f"data file {path}", f"it is binary, not UTF-8 text: a NUL byte at byte offset "
                                f"{offset + nul} (a binary file, or UTF-16 text)", todo)
            offset += len(chunk)


def _check_local_columns(path: str, text_column: str, doc_column: str | None) -> None:
    """The columns of a parquet file (its schema) or of the first row of a jsonl file, cheaply."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        import pyarrow.parquet as pq

        try:
            cols = pq.read_schema(path).names
        except Exception as e:
            raise DataError(f"data file {path}", f"it is not a readable parquet file ({type(e).__name__}: {e})",
                            "Check the file.") from e
    elif ext in (".jsonl", ".json"):
        import json

        with open(path, encoding="utf-8", errors="replace") as f:
            line = next((ln for ln in f if ln.strip()), None)
        if line is None:
            return
        try:
            row = json.loads(line)
        except ValueError:
            return  # a .json array or a broken line: the loader says more
        if not isinstance(row, dict):
            return
        cols = list(row)
    else:
        return
    for what, col in (("text", text_column), ("doc", doc_column)):
        if col is not None and col not in cols:
            flag = "--text-column" if what == "text" else "--doc-column"
            raise DataError(f"data file {path}", f"it has no {what} column {col!r} (columns: {cols})",
                            f"Name an existing column with {flag} ({what}_column=)"
                            + (", or store one document per row in a column named `text`." if what == "text"
                               else "."))


def load_local(spec: SourceSpec, *, cache_dir=None, num_proc=None, text_column: str = "text",
               doc_column: str | None = None, sentences_per_doc: int | None = None):
    """.txt (one document per blank-line-separated paragraph; one row per line with ``sentences_per_doc``),
    .jsonl / .parquet (a text column per row: a document, or rows grouped by ``doc_column`` /
    ``sentences_per_doc``)."""
    import datasets

    name = spec.path
    files = local_files(name)
    parts = []
    for builder in sorted({FILE_BUILDERS[os.path.splitext(f)[1].lower()] for f in files}):
        group = [os.path.abspath(f) for f in files if FILE_BUILDERS[os.path.splitext(f)[1].lower()] == builder]
        kw = {"sample_by": "line" if sentences_per_doc else "paragraph"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files={"train": group}, split="train", cache_dir=cache_dir,
                                       **kw)
        except Exception as e:
            full = disk_full_error(e, f"data source {name!r}: reading {builder} files into the datasets cache")
            if full:
                raise full from e
            for f in group:  # an encoding problem is the usual cause: name the file and the byte
                check_file_encoding(f, limit=None)
            raise DataError(f"data source {name!r}", f"reading {builder} files {group[:3]} failed "
                            f"({type(e).__name__}: {e})", "Check the files are valid and non-empty.") from e
        if builder == "text":
            cols = ["text"]
        else:
            ds = _use_text_column(ds, f"data source {name!r} ({group[0]})", text_column, doc_column)
            cols = ["text"] + ([doc_column] if doc_column else [])
        if doc_column and doc_column not in ds.column_names:
            raise DataError(f"data source {name!r} ({group[0]})",
                            f"it has no doc column {doc_column!r} (columns: {ds.column_names})",
                            "A .txt file has only text; use .jsonl/.parquet with that column, or --sentences-per-doc.")
        parts.append(ds.select_columns(cols))
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    ds = _head(ds, spec.ratio)
    fp = _hash([[p._fingerprint for p in parts], spec.ratio, "local", VERSION])
    if not doc_column and not sentences_per_doc:  # as before these options existed: the same cache keys
        docs = cached_map(ds, _split_docs, fingerprint=fp, cache_dir=cache_dir, batched=True, num_proc=num_proc,
                          remove_columns=["text"], desc=f"{name}: splitting sentences")
        return docs, fp
    docs = to_documents(ds, fp=fp, what=name, cache_dir=cache_dir, num_proc=num_proc, doc_column=doc_column,
                        sentences_per_doc=sentences_per_doc)
    return docs, docs._fingerprint


def load_builtin(ratio: float, *, n_docs: int = 1200, seed: int = 0, cache_dir=None, num_proc=None):
    import datasets

    texts = builtin_corpus.builtin_texts(n_docs, seed)
    ds = _head(datasets.Dataset.from_dict({"text": texts}), ratio)
    fp = _hash(["builtin", builtin_corpus.VERSION, n_docs, seed, len(ds), VERSION])
    docs = cached_map(ds, _split_docs, fingerprint=fp, cache_dir=cache_dir, batched=True, num_proc=num_proc,
                      remove_columns=["text"], desc="builtin: splitting sentences")
    return docs, fp


# ---------------------------------------------------------------------------------------------------- checks


def check_sources(name, loading_ratio: float = 1.0, *, hub_overrides: dict | None = None, cache_dir=None,
                  text_column: str = "text", doc_column: str | None = None, sentences_per_doc: int | None = None,
                  sniff_bytes: int | None = SNIFF_BYTES) -> list[SourceSpec]:
    """Cheap checks of data sources before any work; returns the parsed specs or raises :class:`DataError`.

    Refused: a bad spec or ratio; a local path, folder or glob that names no file, or an unknown name
    (:class:`DataNotFoundError`, also a ``FileNotFoundError``); an unsupported file type; a file whose first
    ``sniff_bytes`` are binary or not UTF-8 (parquet: no parquet magic); a parquet / jsonl file without the
    text or doc column; a hub source that is not in the ``datasets`` cache while the hub cannot be used
    (``HF_HUB_OFFLINE=1`` or no network). Reads no dataset; with many files, less of each (64 MiB in all,
    at least 4 KiB a file): a bad byte further in is found when the file is loaded.
    """
    if not isinstance(text_column, str) or not text_column:
        raise DataError(f"text_column={text_column!r}", "the text column must be a non-empty column name",
                        "Use e.g. --text-column text.")
    if doc_column is not None and (not isinstance(doc_column, str) or not doc_column):
        raise DataError(f"doc_column={doc_column!r}", "the doc column must be a non-empty column name or unset",
                        "Use e.g. --doc-column doc_id.")
    if sentences_per_doc is not None and (isinstance(sentences_per_doc, bool)
                                          or not isinstance(sentences_per_doc, int) or sentences_per_doc < 1):
        raise DataError(f"sentences_per_doc={sentences_per_doc!r}", "it must be a positive integer",
                        "Use e.g. --sentences-per-doc 64 (rows of a one-sentence-per-row corpus per document).")
    if doc_column and sentences_per_doc:
        raise DataError(f"doc_column={doc_column!r} with sentences_per_doc={sentences_per_doc}",
                        "documents are formed either by a doc column or by a row count, not both",
                        "Give one of --doc-column / --sentences-per-doc.")
    specs = parse_sources(name, loading_ratio)
    files = {s.name: local_files(s.path) for s in specs if s.kind == "local"}
    n_files = sum(len(f) for f in files.values())
    if sniff_bytes is not None and n_files:
        sniff_bytes = max(min(sniff_bytes, 4096), min(sniff_bytes, SNIFF_TOTAL // n_files))
    offline = "unknown"
    for s in specs:
        if s.kind == "local":
            for f in files[s.name]:
                check_file_encoding(f, sniff_bytes)
                _check_local_columns(f, text_column, doc_column)
        elif s.kind == "hub" and _override_for(hub_overrides, s) is None:
            if offline == "unknown":
                offline = hub_offline()
            if offline and not hub_is_cached(s, cache_dir):
                raise _not_cached_error(s, offline, cache_dir)
    return specs


def _override_for(hub_overrides, spec: SourceSpec):
    if not hub_overrides:
        return None
    base = spec.name.split(":", 1)[0] if spec.name.startswith(("wikipedia", "bookcorpus")) else spec.name
    return hub_overrides.get(spec.name, hub_overrides.get(base))


# ---------------------------------------------------------------------------------------------------- all


def load_documents(specs: list[SourceSpec], *, streaming=False, cache_dir=None, num_proc=None,
                   hub_overrides: dict | None = None, sentences_per_doc: int | None = None, builtin_docs: int = 1200,
                   text_column: str = "text", doc_column: str | None = None):
    """All sources, concatenated in the order given -> (documents dataset, a key naming its content).

    ``sentences_per_doc`` None: bookcorpus groups 64 rows per document, other sources one document per row."""
    import datasets

    parts, keys = [], []
    for s in specs:
        if s.kind == "builtin":
            docs, key = load_builtin(s.ratio, n_docs=builtin_docs, cache_dir=cache_dir, num_proc=num_proc)
        elif s.kind == "hub":
            docs, key = load_hub(s, streaming=streaming, cache_dir=cache_dir, num_proc=num_proc,
                                 override=_override_for(hub_overrides, s), sentences_per_doc=sentences_per_doc,
                                 text_column=text_column, doc_column=doc_column)
        else:
            docs, key = load_local(s, cache_dir=cache_dir, num_proc=num_proc, text_column=text_column,
                                   doc_column=doc_column, sentences_per_doc=sentences_per_doc)
        if len(docs) == 0:
            raise DataError(f"data source {s.name!r} (loading_ratio={s.ratio})",
                            "it holds no text: every document is empty",
                            "Check the files (a `text` column, documents separated by blank lines) or use a "
                            "larger loading_ratio.")
        log.info("%s: %d documents", s.name, len(docs))
        parts.append(docs)
        keys.append(key)
    docs = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return docs, _hash(keys)
