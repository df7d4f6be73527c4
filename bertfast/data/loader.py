"""``load_data`` and the resumable, shardable, worker-count-independent loader it returns."""

from __future__ import annotations

import logging
import math
import os
import signal
import warnings

import numpy as np
import torch

from .batch import PretrainingCollator, sample_seed
from .errors import DataError, NSPBalanceWarning
from .masking import default_max_predictions

log = logging.getLogger(__name__)


def _worker_ignores_stop_signals(worker_id: int) -> None:
    """Ctrl-C reaches every process of the terminal's process group, and schedulers send SIGTERM to all of a
    job's processes: the training process handles both (it finishes its step and checkpoints), so a loader
    worker ignores them rather than die under it. Workers still exit with the loader or the training process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _PairSamples(torch.utils.data.Dataset):
    """Map-style view of the pair dataset; a sample key is ``(epoch, index)`` so its mask seed can be derived."""

    def __init__(self, pairs, seed: int):
        self.pairs = pairs
        self.seed = seed

    def __len__(self):
        return len(self.pairs)

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[dict]:
        rows = self.pairs[[int(i) for _, i in keys]]  # one arrow read per batch
        return [
            {"input_ids": rows["input_ids"][k], "len_a": rows["len_a"][k], "is_next": rows["is_next"][k],
             "seed": sample_seed(self.seed, epoch, int(i))}
            for k, (epoch, i) in enumerate(keys)
        ]

    def __getitem__(self, key: tuple[int, int]) -> dict:
        return self.__getitems__([key])[0]


class PretrainingLoader:
    """Batches of NSP pairs with fresh MLM masks, in an order fixed by (seed, epoch).

    * Order: epoch ``e`` shuffles the pairs with a generator seeded by (seed, e) and cuts *global* batches of
      ``batch_size * world_size`` samples; rank ``r`` takes the slice ``[r * batch_size, (r + 1) * batch_size)``
      of each. So world_size=2 with batch_size=b sees, step for step, exactly the samples of world_size=1 with
      batch_size=2b. With ``group_by_length``, each run of 64 global batches of the shuffled order is sorted by
      length before it is cut, and the batch order is then shuffled: little padding, still random.
    * Masks: sample i of epoch e is masked with a generator seeded by (seed, e, i); nothing depends on worker
      processes, so any ``num_workers`` gives the same batches.
    * Position: ``state_dict()`` records the epoch and the batches consumed in it; after ``load_state_dict`` the
      next ``__iter__`` starts at the next unconsumed batch, skipping by index (nothing skipped is loaded).
      Breaking out of a loop and iterating again also continues where it stopped. When an epoch is iterated to
      its end the loader moves to the next epoch by itself; ``set_epoch(e)`` chooses one (a no-op when ``e`` is
      the current epoch, so it does not undo a restored position).
    """

    def __init__(self, pairs, collator: PretrainingCollator, *, batch_size: int = 32, seed: int = 0,
                 shuffle: bool = True, drop_last: bool | None = None, num_workers: int = 0, rank: int = 0,
                 world_size: int = 1, group_by_length: bool = False, pin_memory: bool = False,
                 prefetch_factor: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if drop_last is None:
            drop_last = world_size > 1
        if world_size > 1 and not drop_last:
            raise ValueError("world_size > 1 needs drop_last=True: a partial global batch cannot be split evenly")
        self.pairs = pairs
        self.samples = _PairSamples(pairs, seed)
        self.collator = collator
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.num_workers, self.rank, self.world_size = num_workers, rank, world_size
        self.group_by_length, self.pin_memory, self.prefetch_factor = group_by_length, pin_memory, prefetch_factor
        self.epoch = 0
        self.consumed = 0  # batches of `self.epoch` already handed out
        self._lengths = None

    # ---------------------------------------------------------------- order
    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        n, g = len(self.pairs), self.global_batch_size
        return n // g if self.drop_last else math.ceil(n / g)

    def _global_batches(self, epoch: int) -> list[np.ndarray]:
        n, g = len(self.pairs), self.global_batch_size
        rng = np.random.Generator(np.random.PCG64([self.seed, epoch, 0xB5A7]))
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.group_by_length:
            if self._lengths is None:
                self._lengths = np.asarray(self.pairs.with_format("numpy")["length"])
            mega = 64 * g
            order = np.concatenate([
                c[np.argsort(-self._lengths[c], kind="stable")] for c in np.split(order, range(mega, n, mega))
            ]) if n else order
        batches = [order[i : i + g] for i in range(0, n, g)]
        if self.drop_last and batches and len(batches[-1]) < g:
            batches.pop()
        if self.group_by_length and self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def batch_indices(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's batches of ``epoch`` (default: the current one) as lists of pair indices."""
        e = self.epoch if epoch is None else epoch
        b, r = self.batch_size, self.rank
        return [gb[r * b : (r + 1) * b].tolist() for gb in self._global_batches(e)]

    # ---------------------------------------------------------------- iteration
    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = int(epoch), 0

    def __iter__(self):
        epoch, start = self.epoch, self.consumed
        keys = [[(epoch, i) for i in idx] for idx in self.batch_indices(epoch)[start:]]
        if self.num_workers > 0:
            dl = torch.utils.data.DataLoader(
                self.samples, batch_sampler=keys, collate_fn=self.collator, num_workers=self.num_workers,
                pin_memory=self.pin_memory, prefetch_factor=self.prefetch_factor,
                worker_init_fn=_worker_ignores_stop_signals,
                # its own generator for the workers' base seed: drawing it from the global one would shift the
                # training process's dropout stream by one draw per iterator (samples are seeded by their key)
                generator=torch.Generator().manual_seed(self.seed))
            it = iter(dl)
        else:
            it = (self.collator(self.samples.__getitems__(k)) for k in keys)
        for batch in it:
            if self.pin_memory and self.num_workers == 0:
                batch = batch.pin_memory()
            self.consumed += 1  # before yielding: a state_dict taken now must count this batch
            yield batch
        if self.epoch == epoch:
            self.epoch, self.consumed = epoch + 1, 0

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_consumed": self.consumed, "seed": self.seed,
                "batch_size": self.batch_size, "world_size": self.world_size, "num_pairs": len(self.pairs),
                "batches_per_epoch": len(self)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "batch_size", "world_size", "num_pairs"):
            if key in state and state[key] != getattr(self, key, None) and not (
                    key == "num_pairs" and state[key] == len(self.pairs)):
                raise ValueError(f"cannot resume: the saved data position has {key}={state[key]}, this loader "
                                 f"{key}={len(self.pairs) if key == 'num_pairs' else getattr(self, key)}")
        self.epoch, self.consumed = int(state["epoch"]), int(state["batches_consumed"])


MIN_EVAL_DOCS = 8  # a held-out split takes at least this many documents
MIN_EVAL_BATCHES = 4  # per rank; the eval batch shrinks to give this many when the held-out set is small
EVAL_EPOCH = 0xE7A1_5EED  # the "epoch" of eval mask seeds: (seed, EVAL_EPOCH, i), never a training epoch


class EvalLoader:
    """Held-out batches with fixed masks: the same batches at every pass, in every run with the same seed.

    * Order: the pairs sorted by length (stable; little padding), cut into global batches of
      ``batch_size * world_size``; rank ``r`` takes the slice ``[r * batch_size, (r + 1) * batch_size)`` of
      each, as the training loader does. The remainder (less than one global batch) is left out, so every rank
      runs the same number of batches.
    * Masks: pair ``i`` is masked with a generator seeded by ``(seed, EVAL_EPOCH, i)``: nothing depends on the
      training loader's epoch or position, on workers, or on torch's global generator (nothing is drawn from it).
    Iterating in the main process; ``len()`` is batches per pass on this rank.
    """

    def __init__(self, pairs, collator: PretrainingCollator, *, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, pin_memory: bool = False, documents=None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.pairs, self.collator, self.batch_size, self.seed = pairs, collator, batch_size, seed
        self.rank, self.world_size, self.pin_memory = rank, world_size, pin_memory
        self.samples = _PairSamples(pairs, seed)
        self.documents = documents
        lengths = np.asarray(pairs.data.column("length")) if len(pairs) else np.zeros(0, dtype=np.int64)
        self._order = np.argsort(-lengths, kind="stable")

    def __len__(self) -> int:
        return len(self.pairs) // (self.batch_size * self.world_size)

    @property
    def num_samples(self) -> int:
        """Pairs evaluated per pass, over all ranks."""
        return len(self) * self.batch_size * self.world_size

    def batch_indices(self) -> list[list[int]]:
        g, b, r = self.batch_size * self.world_size, self.batch_size, self.rank
        return [self._order[i * g + r * b : i * g + (r + 1) * b].tolist() for i in range(len(self))]

    def __iter__(self):
        for idx in self.batch_indices():
            batch = self.collator(self.samples.__getitems__([(EVAL_EPOCH, i) for i in idx]))
            yield batch.pin_memory() if self.pin_memory else batch


def load_data(
    name="builtin", loading_ratio: float = 1.0, *, tokenizer=None, vocab_size: int = 8192, max_len: int = 128,
    batch_size: int = 32, max_predictions: int | None = None, mlm_probability: float = 0.15, seed: int = 0,
    num_workers: int = 0, rank: int = 0, world_size: int = 1, streaming: bool = False, num_proc: int | None = None,
    cache_dir: str | None = None, output_dir: str | None = None, group_by_length: bool = False,
    short_seq_prob: float = 0.1, dupe_factor: int = 1, pad_to_multiple_of: int | None = None, shuffle: bool = True,
    drop_last: bool | None = None, pin_memory: bool = False, hub_overrides: dict | None = None,
    sentences_per_doc: int | None = None, builtin_docs: int = 1200, text_column: str = "text",
    doc_column: str | None = None, whole_word_masking: bool = False, eval_fraction: float = 0.0, eval_data=None,
    eval_batch_size: int | None = None,
):
    """Build the pretraining data; returns ``(tokenizer, loader)``.

    name: ``"builtin"`` (offline default: ``builtin_docs`` documents), ``"bookcorpus"``, ``"wikipedia"`` (English) or
        ``"wikipedia:20231101.de"`` (another language), ``"hub:ORG/NAME[:CONFIG][@REVISION]"`` (any hub
        dataset), a local file / folder / glob (.txt with blank-line-separated documents, .jsonl / .parquet with a text
        column), or several ``"NAME[:RATIO]"`` specs (a list, or one string separated by spaces):
        ``"bookcorpus:0.1 wikipedia:1/41"``. :func:`check_sources` runs first (cheap checks, no reading).
    loading_ratio: fraction of each source's train split to use (a prefix), unless its spec gives one.
    tokenizer: a ``BertTokenizerFast`` or a hub name / local folder to load one from. None: train an uncased
        WordPiece vocabulary of ``vocab_size`` on the corpus, saved in ``output_dir/tokenizer`` (or a cache folder
        keyed by the corpus) and reused by the next run.
    max_predictions: P, the static prediction slots per sequence (default ceil(0.15 * max_len), 20 at 128).
    rank, world_size: data-parallel sharding (see :class:`PretrainingLoader`); batch_size is per rank.
    streaming: stream hub sources; only the loading_ratio prefix is written to the datasets cache (docs/data.md).
    num_proc: processes for the maps (None: this one; capped at the cores); the data do not depend on it.
    hub_overrides: ``{"bookcorpus": {"path": ..., "name": ..., "data_files": ...}}`` replaces a hub id / config.
    dupe_factor: how many times pairs are built from each document with different random choices (BERT: 10).
    cache_dir: ``datasets``' cache (default: its own). text_column: the text of hub and .jsonl / .parquet rows.
    doc_column: consecutive rows sharing this column's value form one document, in row order.
    eval_fraction: hold out this fraction of the documents (at least 8; split by (seed, fraction) before pairs
        are built, so no sentence is in both) as the evaluation corpus; the vocabulary is trained on the rest.
    eval_data: other sources (same grammar as ``name``) as the evaluation corpus instead.
    eval_batch_size: per rank (default ``2 * batch_size``); it shrinks to give at least 4 batches per rank.
        The returned loader's ``eval_loader`` is an :class:`EvalLoader` (fixed masks), or None without evaluation.
    whole_word_masking: mask whole words (a token and its following ``##`` pieces) instead of single tokens.
    sentences_per_doc: N consecutive rows form one document, each row one sentence (.txt files are then read one
        row per line). Neither: 64 rows for bookcorpus, one document per row elsewhere.
    """
    _check_arguments(seed=seed, batch_size=batch_size, max_len=max_len, vocab_size=vocab_size,
                     dupe_factor=dupe_factor, num_workers=num_workers, mlm_probability=mlm_probability,
                     short_seq_prob=short_seq_prob, eval_fraction=eval_fraction, eval_data=eval_data,
                     eval_batch_size=eval_batch_size, num_proc=num_proc)
    what, num_proc = f"load_data({name!r}, loading_ratio={loading_ratio})", usable_procs(num_proc)
    docs, docs_key, eval_docs, eval_key = _read_documents(
        name, loading_ratio, eval_data, eval_fraction, seed, what, streaming=streaming, num_proc=num_proc,
        builtin_docs=builtin_docs, hub_overrides=hub_overrides, cache_dir=cache_dir, text_column=text_column,
        doc_column=doc_column, sentences_per_doc=sentences_per_doc)
    tok = _get_tokenizer(tokenizer, docs, docs_key, vocab_size, output_dir, cache_dir)  # training documents only
    pair_kw = dict(max_len=max_len, short_seq_prob=short_seq_prob, seed=seed, dupe_factor=dupe_factor,
                   cache_dir=cache_dir, num_proc=num_proc)
    tokens, pairs = _training_pairs(docs, docs_key, tok, what, pair_kw)
    share = check_nsp_balance(pairs, tokens, what)  # called from here: its warning points at load_data's caller
    loader = _loaders(tok, (pairs, tokens, share), (eval_docs, eval_key, eval_data), pair_kw, what, dict(
        max_predictions=max_predictions, mlm_probability=mlm_probability, pad_to_multiple_of=pad_to_multiple_of,
        whole_word_masking=whole_word_masking), batch_size=batch_size, seed=seed, shuffle=shuffle,
        drop_last=drop_last, num_workers=num_workers, rank=rank, world_size=world_size,
        group_by_length=group_by_length, pin_memory=pin_memory, eval_batch_size=eval_batch_size)
    log.info("%s: %d documents, %d pairs, %d batches per epoch", name, len(docs), len(pairs), len(loader))
    return tok, loader


MAX_DEFAULT_PROCS = 8  # the CLI's default --num-proc: the cores, at most this many


def available_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one, e.g. under a scheduler)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def default_procs() -> int:
    """The CLI's default --num-proc: ``min(cores, MAX_DEFAULT_PROCS)``."""
    return min(available_cores(), MAX_DEFAULT_PROCS)


def usable_procs(num_proc: int | None) -> int | None:
    """Processes for the ``datasets`` maps: None or 1 -> None (in this process); more than the cores -> the
    cores (more processes than cores only add start-up and memory; the result is the same for any number)."""
    if num_proc is None or num_proc <= 1:
        return None
    cores = available_cores()
    if num_proc > cores:
        log.info("num_proc=%d is more than the %d cores: using %d processes", num_proc, cores, cores)
    return min(num_proc, cores) if cores > 1 else None


def _loaders(tok, data, evaluation, pair_kw: dict, what: str, collate_kw: dict, *, eval_batch_size, seed, rank,
             world_size, pin_memory, batch_size, **loader_kw) -> PretrainingLoader:
    """The collator and the training loader, with its ``eval_loader`` (None without evaluation data),
    ``tokenizer``, ``documents`` (the tokenised training documents) and ``is_next_share``."""
    (pairs, tokens, share), (eval_docs, eval_key, eval_data) = data, evaluation
    mlm_probability, max_len = collate_kw["mlm_probability"], pair_kw["max_len"]
    collate_kw["max_predictions"] = collate_kw["max_predictions"] or default_max_predictions(max_len, mlm_probability)
    collator = PretrainingCollator.from_tokenizer(tok, max_len=max_len, **collate_kw)
    loader = _training_loader(pairs, collator, what, batch_size=batch_size, seed=seed, rank=rank,
                              world_size=world_size, pin_memory=pin_memory, **loader_kw)
    loader.eval_loader = None if eval_docs is None else _eval_loader(
        eval_docs, eval_key, tok, collator, pair_kw, eval_data=eval_data, what=what,
        eval_batch_size=eval_batch_size or 2 * batch_size, seed=seed, rank=rank, world_size=world_size,
        pin_memory=pin_memory)
    loader.tokenizer, loader.documents, loader.is_next_share = tok, tokens, share
    return loader


# The steps of load_data, in the order it takes them.


def _check_arguments(*, seed, batch_size, max_len, vocab_size, dupe_factor, num_workers, mlm_probability,
                     short_seq_prob, eval_fraction, eval_data, eval_batch_size, num_proc=None) -> None:
    """A DataError naming the first bad argument, before anything is read."""
    if num_proc is not None and (isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1):
        raise DataError(f"load_data(num_proc={num_proc!r})", "num_proc must be None or an integer >= 1",
                        "Pass a number of processes (--num-proc N), or None for one.")
    for arg, value, lo, hi in (("seed", seed, 0, 2**63 - 1), ("batch_size", batch_size, 1, None),
                               ("max_len", max_len, 8, None), ("vocab_size", vocab_size, 6, None),
                               ("dupe_factor", dupe_factor, 1, None), ("num_workers", num_workers, 0, None)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
            raise DataError(f"load_data({arg}={value!r})", f"{arg} must be an integer in [{lo}, {hi or 'inf'}]"
                            + (" ([CLS] A [SEP] B [SEP] needs room)" if arg == "max_len" else ""),
                            f"Pass a whole number (--{arg.replace('_', '-')}).")
    for arg, value, lo_open in (("mlm_probability", mlm_probability, True), ("short_seq_prob", short_seq_prob, False)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                (0 < value if lo_open else 0 <= value) and value <= 1):
            raise DataError(f"load_data({arg}={value!r})", f"{arg} must be a number in {'(0' if lo_open else '[0'}, 1]",
                            "E.g. 0.15 for mlm_probability, 0.1 for short_seq_prob.")
    if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, (int, float)) \
            or not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"eval_fraction={eval_fraction!r}", "the held-out fraction must be in [0, 1)",
                        "Use e.g. --eval-fraction 0.01, or 0 for no held-out split.")
    if eval_data and eval_fraction:
        raise DataError(f"eval_fraction={eval_fraction} with eval_data={eval_data!r}",
                        "evaluation takes either held-out documents or another corpus, not both",
                        "Give --eval-fraction 0 with --eval-data, or leave --eval-data out.")
    if eval_batch_size is not None and (isinstance(eval_batch_size, bool) or not isinstance(eval_batch_size, int)
                                        or eval_batch_size < 1):
        raise DataError(f"eval_batch_size={eval_batch_size!r}", "it must be a positive integer",
                        "Use e.g. --eval-batch-size 64, or leave it unset (twice the batch size).")


def _read_documents(name, loading_ratio, eval_data, eval_fraction, seed, what, *, streaming, num_proc, builtin_docs,
                    **src_kw):
    """Check every source first (cheap, nothing read), then read the training documents and the evaluation
    ones (held out of the training corpus, or read from ``eval_data``)
    -> (docs, docs_key, eval_docs, eval_key); the eval pair is None without evaluation."""
    from .sources import check_sources, load_documents

    specs = check_sources(name, loading_ratio, **src_kw)
    eval_specs = check_sources(eval_data, 1.0, **src_kw) if eval_data else None
    load_kw = dict(streaming=streaming, num_proc=num_proc, builtin_docs=builtin_docs, **src_kw)
    docs, docs_key = load_documents(specs, **load_kw)
    if eval_fraction:
        return split_documents(docs, docs_key, eval_fraction, seed, what)
    if eval_specs:
        return (docs, docs_key, *load_documents(eval_specs, **load_kw))
    return docs, docs_key, None, None


def _training_pairs(docs, docs_key: str, tok, what: str, pair_kw: dict):
    """Tokenise the training documents and build their NSP pairs -> (tokens, pairs); a DataError when fewer
    than 2 documents have text or no pair can be built."""
    from .pairs import build_pairs, tokenize_documents

    tokens, tokens_key = tokenize_documents(docs, tok, docs_key, cache_dir=pair_kw["cache_dir"],
                                            num_proc=pair_kw["num_proc"])
    if len(tokens) < 2:
        raise DataError(what, f"the corpus has {len(tokens)} document(s) with text; next-sentence prediction "
                        "needs at least 2 (random segments come from a different document)",
                        "Give more text (documents are separated by blank lines in .txt files) or a larger ratio.")
    pairs = build_pairs(tokens, tokens_key, tok, **pair_kw)
    if len(pairs) == 0:
        raise DataError(what, "no sentence pair could be built from the corpus", "Give longer documents.")
    return tokens, pairs


def _training_loader(pairs, collator: PretrainingCollator, what: str, **kw) -> PretrainingLoader:
    """The :class:`PretrainingLoader`; a DataError when the pairs make no full batch."""
    loader = PretrainingLoader(pairs, collator, **kw)
    if len(loader) == 0:
        raise DataError(what, f"{len(pairs)} pairs make no full batch of {loader.batch_size} x {loader.world_size} "
                        "ranks", "Use a smaller batch size or more data.")
    return loader


def _eval_loader(eval_docs, eval_key: str, tok, collator: PretrainingCollator, pair_kw: dict, *, eval_data,
                 what: str, eval_batch_size: int, seed: int, rank: int, world_size: int,
                 pin_memory: bool) -> EvalLoader:
    """Tokenise the evaluation documents and pair them as the training ones (same settings) -> an
    :class:`EvalLoader` whose batch shrinks below ``eval_batch_size`` to give each rank MIN_EVAL_BATCHES."""
    from .pairs import build_pairs, tokenize_documents

    what = f"evaluation data {eval_data!r}" if eval_data else f"{what} held-out documents"
    etokens, etokens_key = tokenize_documents(eval_docs, tok, eval_key, cache_dir=pair_kw["cache_dir"],
                                              num_proc=pair_kw["num_proc"])
    if len(etokens) < 2:
        raise DataError(what, f"it has {len(etokens)} document(s) with text; NSP pairs need at least 2",
                        "Give a larger --eval-fraction or more --eval-data.")
    epairs = build_pairs(etokens, etokens_key, tok, **pair_kw)
    ebs = min(eval_batch_size, len(epairs) // (MIN_EVAL_BATCHES * world_size))
    if ebs < 1:
        raise DataError(what, f"it gives {len(epairs)} sentence pairs, fewer than {MIN_EVAL_BATCHES} batches x "
                        f"{world_size} rank(s) of one pair", "Give a larger --eval-fraction or more --eval-data.")
    loader = EvalLoader(epairs, collator, batch_size=ebs, seed=seed, rank=rank, world_size=world_size,
                        pin_memory=pin_memory, documents=etokens)
    log.info("%s: %d documents, %d pairs, %d eval batches of %d per rank", what, len(etokens), len(epairs),
             len(loader), ebs)
    return loader


NSP_BALANCE = (0.4, 0.6)


def check_nsp_balance(pairs, tokens, what: str) -> float:
    """The share of ``is_next`` pairs; an :class:`NSPBalanceWarning` saying why when it is outside 40-60% by
    more than chance (3 binomial standard deviations from one half: a corpus of a few pairs is not warned)."""
    import numpy as np
    import pyarrow.compute as pc

    share = float(np.asarray(pairs.data.column("is_next")).mean()) if len(pairs) else 0.0
    log.info("%s: %.1f%% of %d NSP pairs are is_next", what, 100 * share, len(pairs))
    lo, hi = NSP_BALANCE
    if lo <= share <= hi or abs(share - 0.5) <= 3 * 0.5 / math.sqrt(max(len(pairs), 1)):
        return share
    sents = np.asarray(pc.list_value_length(tokens.data.column("tokens"))) if len(tokens) else np.zeros(1)
    median, one = float(np.median(sents)), float((sents <= 1).mean())
    if share < lo and median <= 3:
        why = (f"the documents are very short (median {median:g} sentences, {one:.0%} with one sentence): only "
               "sentences inside a document can be a real continuation, so nearly every B is random. Data with "
               "one sentence per row (e.g. a local BookCorpus copy: each .parquet/.jsonl row, or each blank-line "
               "paragraph of a .txt, is read as a whole document) needs its rows grouped: sentences_per_doc=N "
               "(--sentences-per-doc N, e.g. 64) or doc_column= (--doc-column doc_id)")
    else:
        why = (f"(median {median:g} sentences per document) check the document boundaries and max_len: NSP "
               "would learn the skewed prior instead of sentence order")
    warnings.warn(f"{what}: {share:.1%} of the {len(pairs)} NSP pairs are is_next, outside "
                  f"{lo:.0%}-{hi:.0%}: {why}.", NSPBalanceWarning, stacklevel=3)
    log.warning("%s: %.1f%% of the NSP pairs are is_next: %s", what, 100 * share, why)
    return share


def _docs_needed(fraction: float) -> int:
    """The fewest documents a held-out split of `fraction` leaves 2 of to train on (split_documents' rule)."""
    n = MIN_EVAL_DOCS + 2
    while n - max(MIN_EVAL_DOCS, math.ceil(fraction * n)) < 2 and n < 10 ** 8:
        n += 1 if n < 10 ** 4 else n // 100
    return n


def split_documents(docs, docs_key: str, fraction: float, seed: int, what: str = "load_data"):
    """Hold out whole documents: ``max(8, ceil(fraction * n))`` of them, chosen by a generator seeded by
    ``seed`` alone; both parts keep corpus order. -> (train docs, train key, eval docs, eval key). The split
    depends only on the corpus, the seed and the fraction (not on batch size, ranks or whether evaluation runs).
    """
    n = len(docs)
    n_eval = max(MIN_EVAL_DOCS, math.ceil(fraction * n))
    if n - n_eval < 2:  # two documents at least to train on (NSP's random B comes from another document)
        if n_eval >= n:
            why = (f"the corpus has only {n} document{'s' if n != 1 else ''}, and the held-out split takes whole "
                   f"documents, at least {MIN_EVAL_DOCS}" + (f" (here {n_eval})" if n_eval != MIN_EVAL_DOCS else "")
                   + ": none would be left to train on")
        else:
            why = f"holding out {n_eval} of its {n} documents would leave only {n - n_eval} to train on (2 needed)"
        raise DataError(f"{what} with eval_fraction={fraction}", why,
                        f"Turn the held-out split off (--eval-fraction 0), evaluate on other data (--eval-data), "
                        f"or give at least {_docs_needed(fraction)} documents (a blank line separates documents in "
                        "a .txt file).")
    rng = np.random.Generator(np.random.PCG64([seed, 0x5E1D_0C5]))
    held = np.zeros(n, dtype=bool)
    held[rng.permutation(n)[:n_eval]] = True
    train_idx, eval_idx = np.flatnonzero(~held), np.flatnonzero(held)
    from .sources import _hash

    key = [docs_key, "split", seed, float(fraction), MIN_EVAL_DOCS]
    return docs.select(train_idx), _hash(key + ["train"]), docs.select(eval_idx), _hash(key + ["eval"])


def _get_tokenizer(tokenizer, docs, docs_key: str, vocab_size: int, output_dir, cache_dir):
    from .tokenizer import load_tokenizer, trained_tokenizer

    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer  # already a tokenizer object
    if tokenizer is not None:
        return load_tokenizer(os.fspath(tokenizer))
    if output_dir is not None:
        save_dir = os.path.join(output_dir, "tokenizer")
    else:
        root = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "bertfast")
        save_dir = os.path.join(root, "tokenizers", f"{docs_key}-{vocab_size}")
    return trained_tokenizer(save_dir, vocab_size, _sentences_with_progress(docs))


def _sentences_with_progress(docs):
    """Every sentence of ``docs``, with a progress bar (and ETA) over the documents, as the ``datasets`` maps
    have: the vocabulary's training reads the whole corpus. Hidden with theirs (``--no-progress``)."""
    from datasets.utils.tqdm import tqdm

    with tqdm(total=len(docs), desc="training the WordPiece vocabulary", unit=" documents") as bar:
        for batch in docs.iter(batch_size=1000):
            for doc in batch["sentences"]:
                yield from doc
            bar.update(len(batch["sentences"]))
