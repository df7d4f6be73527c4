"""Tokenisation and NSP sentence-pair construction, as in BERT's create_pretraining_data.py.

Both are fingerprinted ``datasets`` maps: cached on disk, reused by the next run with the same inputs, parallel
with ``num_proc``. Pair building draws its randomness per document from (seed, dupe, document index), so the
pairs do not depend on ``num_proc``.
"""

from __future__ import annotations

import random

from .batch import sample_seed
from .sources import VERSION, _hash, cached_map


class _Tokenize:
    """Documents (lists of sentences) -> lists of token-id lists; empty sentences and documents dropped."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, batch):
        flat = [s for doc in batch["sentences"] for s in doc]
        ids = self.tokenizer(flat, add_special_tokens=False, return_attention_mask=False,
                             return_token_type_ids=False, verbose=False)["input_ids"] if flat else []
        out, i = [], 0
        for doc in batch["sentences"]:
            toks = [t for t in ids[i : i + len(doc)] if t]
            i += len(doc)
            if toks:
                out.append(toks)
        return {"tokens": out}


def tokenize_documents(docs, tokenizer, docs_key: str, *, cache_dir=None, num_proc=None):
    fp = _hash([docs_key, tokenizer.backend_tokenizer.to_str(), "tokenize", VERSION])
    return cached_map(docs, _Tokenize(tokenizer), fingerprint=fp, cache_dir=cache_dir, batched=True,
                      num_proc=num_proc, remove_columns=docs.column_names, desc="tokenizing"), fp


def truncate_seq_pair(tokens_a: list, tokens_b: list, max_num_tokens: int, rng: random.Random) -> None:
    """Trim the longer segment first, one token at a time from its front or back at random (in place)."""
    while len(tokens_a) + len(tokens_b) > max_num_tokens:
        trunc = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
        if rng.random() < 0.5:
            del trunc[0]
        else:
            trunc.pop()


def instances_from_document(doc_index: int, document: list[list[int]], random_document, n_docs: int,
                            max_len: int, short_seq_prob: float, rng: random.Random):
    """NSP pairs ``(tokens_a, tokens_b, is_next)`` from one document (create_instances_from_document).

    Segments are filled with whole sentences up to a target length (``max_len - 3``, or with probability
    ``short_seq_prob`` a random shorter one); A is a random number of the gathered sentences. With probability
    1/2 B is a random span of another document and the unused sentences are put back; otherwise B is the rest
    of the gathered sentences: the real continuation. When a single sentence fills the target, the next one is
    gathered too (the original would force a random B), and a document's lone last sentence gets a random B on
    one half of the coin and is dropped on the other, so that NSP classes stay balanced.
    """
    max_num_tokens = max_len - 3
    target = _target_length(max_num_tokens, short_seq_prob, rng)
    out = []
    chunk: list[list[int]] = []
    length = 0
    i = 0
    while i < len(document):
        chunk.append(document[i])
        length += len(document[i])
        if i == len(document) - 1 or length >= target:
            if len(chunk) == 1 and i + 1 < len(document):
                # One sentence already reached the target: borrow the next one, so that B can be the real
                # continuation half of the time (the original forces a random B here, which biases NSP towards
                # "not next").
                i += 1
                chunk.append(document[i])
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
            tokens_a = [t for s in chunk[:a_end] for t in s]
            random_next = rng.random() < 0.5
            if len(chunk) == 1 and not random_next:
                # A document's lone last sentence has no real continuation: drop it on the "real" half of the
                # coin instead of forcing a random B, which would tilt NSP towards "not next".
                break
            if random_next:
                is_next = 0
                tokens_b, keep = _random_segment(doc_index, random_document, n_docs, target - len(tokens_a), rng)
                i -= len(chunk) - a_end  # put the unused sentences back
            else:
                is_next, keep = 1, True
                tokens_b = [t for s in chunk[a_end:] for t in s]
            truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng)
            if keep and tokens_a and tokens_b:
                out.append((tokens_a, tokens_b, is_next))
            chunk, length = [], 0
        i += 1
    return out


def _target_length(max_num_tokens: int, short_seq_prob: float, rng: random.Random) -> int:
    """Tokens a pair is filled up to: ``max_num_tokens``, or with probability ``short_seq_prob`` a random
    shorter length (so that the model also sees short sequences)."""
    if rng.random() < short_seq_prob:
        return rng.randint(2, max_num_tokens)
    return max_num_tokens


def _random_segment(doc_index: int, random_document, n_docs: int, target: int, rng: random.Random):
    """B of a "not next" pair: whole sentences of another document from a random one on, until ``target``
    tokens -> (tokens, found): ``found`` is False only for a one-document corpus (or 10 unlucky draws)."""
    j = doc_index
    for _ in range(10):  # a different document (the original tries 10 times too)
        j = rng.randrange(n_docs)
        if j != doc_index:
            break
    other = random_document(j)
    tokens: list[int] = []
    for s in other[rng.randrange(len(other)) :]:
        tokens.extend(s)
        if len(tokens) >= target:
            break
    return tokens, j != doc_index


class _BuildPairs:
    def __init__(self, tokens_ds, cls_id: int, sep_id: int, max_len: int, short_seq_prob: float, seed: int,
                 dupe_factor: int):
        self.tokens_ds, self.cls_id, self.sep_id = tokens_ds, cls_id, sep_id
        self.max_len, self.short_seq_prob, self.seed, self.dupe_factor = max_len, short_seq_prob, seed, dupe_factor

    def __call__(self, batch, indices):
        out = {"input_ids": [], "len_a": [], "is_next": [], "length": []}
        n_docs = len(self.tokens_ds)
        fetch = lambda j: self.tokens_ds[j]["tokens"]  # noqa: E731
        for dupe in range(self.dupe_factor):
            for doc, idx in zip(batch["tokens"], indices):
                rng = random.Random(sample_seed(self.seed, 1_000_003 + dupe, idx))
                for a, b, is_next in instances_from_document(idx, doc, fetch, n_docs, self.max_len,
                                                             self.short_seq_prob, rng):
                    ids = [self.cls_id, *a, self.sep_id, *b, self.sep_id]
                    out["input_ids"].append(ids)
                    out["len_a"].append(len(a) + 2)
                    out["is_next"].append(is_next)
                    out["length"].append(len(ids))
        return out


def build_pairs(tokens_ds, tokens_key: str, tokenizer, *, max_len: int, short_seq_prob: float, seed: int,
                dupe_factor: int = 1, cache_dir=None, num_proc=None):
    """One row per NSP instance: ``input_ids`` ([CLS] A [SEP] B [SEP]), ``len_a``, ``is_next``, ``length``."""
    import datasets

    fp = _hash([tokens_key, max_len, short_seq_prob, seed, dupe_factor, "pairs", VERSION])
    features = datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32")), "len_a": datasets.Value("int32"),
        "is_next": datasets.Value("int8"), "length": datasets.Value("int32")})
    fn = _BuildPairs(tokens_ds, tokenizer.cls_token_id, tokenizer.sep_token_id, max_len, short_seq_prob, seed,
                     dupe_factor)
    return cached_map(tokens_ds, fn, fingerprint=fp, cache_dir=cache_dir, batched=True, with_indices=True,
                      num_proc=num_proc, remove_columns=tokens_ds.column_names, features=features,
                      desc="building NSP pairs")
