"""Corpus sources -> one Hugging Face ``datasets.Dataset`` of documents, column ``sentences`` (list of str).

Every source goes through ``datasets`` (caching, ``num_proc``, streaming): the hub corpora through
``datasets.load_dataset(path, config)``, local files through its ``text`` / ``json`` / ``parquet`` builders, the
built-in corpus through ``Dataset.from_dict``. ``datasets`` is imported inside functions only: ``import
bertfast.data`` must work on machines without it.
"""

from __future__ import annotations

import glob
import logging
import math
import os
from dataclasses import dataclass
from fractions import Fraction

from . import builtin_corpus
from .errors import OFFLINE_HINT, DataError
from .sentences import split_sentences

log = logging.getLogger(__name__)

VERSION = 3  # bump when the documents built here change: it keys the on-disk caches

# name -> hub dataset. "rows": what one row is. bookcorpus is one sentence per row, books back to back, with no
# book boundary marker: consecutive rows are grouped into documents of `sentences_per_doc` sentences.
HUB_SOURCES = {
    "bookcorpus": dict(path="bookcorpus/bookcorpus", name=None, rows="sentences"),
    "wikipedia": dict(path="wikimedia/wikipedia", name="20231101.en", rows="documents"),
}
# Train-split sizes published on the hub cards, used to turn a streaming loading_ratio into a row count.
KNOWN_TRAIN_ROWS = {"bookcorpus/bookcorpus": 74_004_228, ("wikimedia/wikipedia", "20231101.en"): 6_407_814}
FILE_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class SourceSpec:
    name: str  # "bookcorpus", "wikipedia", "builtin" or a local path / folder / glob
    ratio: float = 1.0


def _parse_ratio(text: str) -> float | None:
    try:
        return float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        return None


def parse_sources(name, loading_ratio: float = 1.0) -> list[SourceSpec]:
    """``"bookcorpus"``, ``"wikipedia:1/41"``, ``"a.txt b.parquet:0.5"`` or a list of such -> specs."""
    if isinstance(name, (list, tuple)):
        items = [str(x) for x in name]
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
        if not 0.0 < ratio <= 1.0:
            raise DataError(f"data source {item!r} with loading_ratio={ratio}",
                            "the loading ratio must be in (0, 1]", "Use e.g. bookcorpus:0.1 or loading_ratio=1/41.")
        specs.append(SourceSpec(item, float(ratio)))
    return specs


def _hash(obj) -> str:
    from datasets.fingerprint import Hasher

    return Hasher.hash(obj)


def cached_map(ds, fn, *, fingerprint: str, cache_dir: str | None, **kw):
    """``ds.map`` keyed by an explicit fingerprint, so the next run with the same inputs reloads it from disk.

    Datasets read from files cache next to their arrow files automatically; in-memory ones (built-in corpus,
    streamed prefixes) cache under ``cache_dir`` when one is given.
    """
    if not ds.cache_files and cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        kw["cache_file_name"] = os.path.join(cache_dir, f"bertfast-{fingerprint}.arrow")
    return ds.map(fn, new_fingerprint=fingerprint, **kw)


def _head(ds, ratio: float):
    """The first ``ceil(ratio * len)`` rows (a contiguous prefix: cheap, and keeps bookcorpus books whole)."""
    if ratio >= 1.0:
        return ds
    return ds.select(range(max(1, math.ceil(ratio * len(ds)))))


def _split_docs(batch):
    out = [split_sentences(t) if isinstance(t, str) else [] for t in batch["text"]]
    return {"sentences": [s for s in out if s]}


def _group_rows(batch):
    sents = [t.strip() for t in batch["text"] if isinstance(t, str) and t.strip()]
    return {"sentences": [sents] if sents else []}


# ---------------------------------------------------------------------------------------------------- hub


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


def load_hub(key: str, ratio: float, *, streaming: bool = False, cache_dir=None, num_proc=None,
             override: dict | None = None, sentences_per_doc: int = 64):
    """Load ``bookcorpus`` / ``wikipedia`` from the hub (or what ``override`` points at) -> (documents, key).

    ``override`` may replace ``path``, ``name`` (the config) and give ``data_files``: tests point this very code
    at local parquet files with ``{"path": "parquet", "name": None, "data_files": {...}}``.
    """
    import datasets

    spec = {**HUB_SOURCES[key], **(override or {})}
    path, name, data_files = spec["path"], spec.get("name"), spec.get("data_files")
    asked = f"load_data({key!r}) from {path!r}" + (f" config {name!r}" if name else "")
    try:
        if streaming:
            ids = datasets.load_dataset(path, name, data_files=data_files, split="train", streaming=True)
            total = _stream_rows(ids, path, name, data_files) if ratio < 1.0 else None
            stream = ids.select_columns(["text"])
            if total is not None:
                stream = stream.take(max(1, math.ceil(ratio * total)))
            # Only the prefix is read (no full download); it is kept in memory and processed like the rest.
            texts = [row["text"] for row in stream]
            if total is None and ratio < 1.0:
                texts = texts[: max(1, math.ceil(ratio * len(texts)))]
            ds = datasets.Dataset.from_dict({"text": texts})
            fp = _hash(["stream", path, name, str(data_files), len(texts)])
        else:
            ds = datasets.load_dataset(path, name, data_files=data_files, split="train", cache_dir=cache_dir,
                                       num_proc=num_proc)
            fp = None
    except DataError:
        raise
    except Exception as e:  # ConnectionError, hub offline, DatasetNotFoundError, ...
        raise DataError(asked, f"the dataset could not be loaded ({type(e).__name__}: {e})",
                        "If there is no network: " + OFFLINE_HINT) from e
    if "text" not in ds.column_names:
        raise DataError(asked, f"it has no `text` column (columns: {ds.column_names})")
    if not streaming:
        ds = _head(ds, ratio)
        fp = _hash([ds._fingerprint, "head"])
    ds = ds.select_columns(["text"])
    if spec["rows"] == "sentences":
        # Grouping is sequential (single process): num_proc would shift group boundaries with the shard edges.
        docs = cached_map(ds, _group_rows, fingerprint=_hash([fp, "group", sentences_per_doc, VERSION]),
                          cache_dir=cache_dir, batched=True, batch_size=sentences_per_doc,
                          remove_columns=["text"], desc=f"{key}: grouping sentences into documents")
    else:
        docs = cached_map(ds, _split_docs, fingerprint=_hash([fp, "split", VERSION]), cache_dir=cache_dir,
                          batched=True, num_proc=num_proc, remove_columns=["text"],
                          desc=f"{key}: splitting sentences")
    return docs, _hash([fp, spec["rows"], sentences_per_doc, VERSION])


# ---------------------------------------------------------------------------------------------------- local


def local_files(spec: str) -> list[str]:
    """The corpus files a path, folder or glob names (sorted); FileNotFoundError / DataError otherwise."""
    if any(c in spec for c in "*?["):
        files = sorted(f for f in glob.glob(spec, recursive=True) if os.path.isfile(f))
        if not files:
            raise FileNotFoundError(f"load_data({spec!r}): the glob matches no file. {OFFLINE_HINT}")
    elif os.path.isdir(spec):
        files = sorted(
            os.path.join(root, f) for root, _, names in os.walk(spec) for f in names
            if os.path.splitext(f)[1].lower() in FILE_BUILDERS
        )
        if not files:
            raise DataError(f"load_data({spec!r})", "the folder holds no .txt, .jsonl or .parquet file")
    elif os.path.isfile(spec):
        files = [spec]
    else:
        raise FileNotFoundError(
            f"load_data({spec!r}): no such file, folder or known dataset (known: 'builtin', "
            f"{', '.join(repr(k) for k in HUB_SOURCES)}). {OFFLINE_HINT}")
    bad = [f for f in files if os.path.splitext(f)[1].lower() not in FILE_BUILDERS]
    if bad:
        raise DataError(f"load_data({spec!r})", f"unsupported file type: {bad[0]}",
                        "Use .txt (documents separated by blank lines), .jsonl or .parquet with a `text` column.")
    return files


def load_local(spec: str, ratio: float, *, cache_dir=None, num_proc=None):
    """.txt (one document per blank-line-separated paragraph), .jsonl / .parquet (a `text` column per document)."""
    import datasets

    files = local_files(spec)
    parts = []
    for builder in sorted({FILE_BUILDERS[os.path.splitext(f)[1].lower()] for f in files}):
        group = [os.path.abspath(f) for f in files if FILE_BUILDERS[os.path.splitext(f)[1].lower()] == builder]
        kw = {"sample_by": "paragraph"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files={"train": group}, split="train", cache_dir=cache_dir,
                                       **kw)
        except Exception as e:
            raise DataError(f"load_data({spec!r})", f"reading {builder} files {group[:3]} failed "
                            f"({type(e).__name__}: {e})", "Check the files are valid and non-empty.") from e
        if "text" not in ds.column_names:
            raise DataError(f"load_data({spec!r})", f"{group[0]} has no `text` column (columns: {ds.column_names})",
                            "Store one document per row in a column named `text`.")
        parts.append(ds.select_columns(["text"]))
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    ds = _head(ds, ratio)
    fp = _hash([[p._fingerprint for p in parts], ratio, "local", VERSION])
    docs = cached_map(ds, _split_docs, fingerprint=fp, cache_dir=cache_dir, batched=True, num_proc=num_proc,
                      remove_columns=["text"], desc=f"{spec}: splitting sentences")
    return docs, fp


def load_builtin(ratio: float, *, n_docs: int = 1200, seed: int = 0, cache_dir=None, num_proc=None):
    import datasets

    texts = builtin_corpus.builtin_texts(n_docs, seed)
    ds = _head(datasets.Dataset.from_dict({"text": texts}), ratio)
    fp = _hash(["builtin", builtin_corpus.VERSION, n_docs, seed, len(ds), VERSION])
    docs = cached_map(ds, _split_docs, fingerprint=fp, cache_dir=cache_dir, batched=True, num_proc=num_proc,
                      remove_columns=["text"], desc="builtin: splitting sentences")
    return docs, fp


# ---------------------------------------------------------------------------------------------------- all


def load_documents(specs: list[SourceSpec], *, streaming=False, cache_dir=None, num_proc=None,
                   hub_overrides: dict | None = None, sentences_per_doc: int = 64, builtin_docs: int = 1200):
    """All sources, concatenated in the order given -> (documents dataset, a key naming its content)."""
    import datasets

    parts, keys = [], []
    for s in specs:
        if s.name == "builtin":
            docs, key = load_builtin(s.ratio, n_docs=builtin_docs, cache_dir=cache_dir, num_proc=num_proc)
        elif s.name in HUB_SOURCES and not os.path.exists(s.name):
            docs, key = load_hub(s.name, s.ratio, streaming=streaming, cache_dir=cache_dir, num_proc=num_proc,
                                 override=(hub_overrides or {}).get(s.name), sentences_per_doc=sentences_per_doc)
        else:
            docs, key = load_local(s.name, s.ratio, cache_dir=cache_dir, num_proc=num_proc)
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
