"""The batch type and the collator that builds it from NSP pair samples (padding + dynamic masking)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from bertfast.ops import padding
from .masking import continuation_table, default_max_predictions, mask_from_draws, word_ids_from_pieces

_MASK64 = (1 << 64) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` of ``epoch``: splitmix64 over the three numbers (cheap, well mixed).

    Every random draw for a sample comes from a generator seeded with this, so batches do not depend on the
    number of DataLoader workers, on which rank loads the sample, or on what was loaded before.
    """
    x = 0
    for v in (seed, epoch, index):
        x = (x ^ (v & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
        x ^= x >> 31
    return x >> 1


@dataclass
class Batch:
    """One pretraining batch; every field an int64 tensor.

    input_ids, attention_mask, token_type_ids, labels: [B, S] (S = longest sequence in the batch, optionally
    rounded up to a multiple of 8); labels is Hugging Face style, -100 where nothing is predicted.
    mlm_positions [B, P] (-1 for unused slots) and mlm_labels [B, P] (-100 unused): the same predictions in the
    static form, P = max predictions per sequence. is_next: [B], 1 when segment B really follows segment A.

    The unpadded layout, computed on the host by the collator (None when a batch is built without it; the model
    then derives it from attention_mask, with a host sync): unpad_indices int64 [R], the flat position
    (b * S + column) of each real token, sequence after sequence, then R - T bucket-padding rows holding B * S
    (R: the token count T padded up to a bucket, see bertfast.ops.padding.bucket_rows); cu_seqlens int32 [B + 1];
    max_seqlen, a host int (S, the batch's width: a bound that is static for a given S). `items()` and
    `as_dict()` give the seven fields above only.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor
    labels: torch.Tensor
    mlm_positions: torch.Tensor
    mlm_labels: torch.Tensor
    is_next: torch.Tensor
    unpad_indices: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None

    def _map(self, fn) -> "Batch":
        layout = {k: None if getattr(self, k) is None else fn(getattr(self, k)) for k in _LAYOUT_TENSORS}
        return Batch(**{k: fn(v) for k, v in self.items()}, **layout, max_seqlen=self.max_seqlen)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return self._map(lambda v: v.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":  # called by DataLoader(pin_memory=True)
        return self._map(lambda v: v.pin_memory())

    def items(self):
        return ((name, getattr(self, name)) for name in FIELDS)

    @property
    def rows(self) -> int:
        """The encoder's unpadded rows (the bucket), or the real token count without a layout."""
        return int(self.attention_mask.sum()) if self.unpad_indices is None else self.unpad_indices.numel()

    def as_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.items())

    def model_inputs(self, static_mlm: bool = True) -> dict[str, torch.Tensor]:
        """Keyword arguments for ``BertForPreTraining.forward``: the static MLM form, or HF ``labels``."""
        d = dict(input_ids=self.input_ids, attention_mask=self.attention_mask,
                 token_type_ids=self.token_type_ids, next_sentence_label=self.is_next)
        if static_mlm:
            d.update(mlm_positions=self.mlm_positions, mlm_labels=self.mlm_labels)
        else:
            d.update(labels=self.labels)
        if self.unpad_indices is not None:
            d.update(unpad_indices=self.unpad_indices, cu_seqlens=self.cu_seqlens, max_seqlen=self.max_seqlen)
        return d

    def __len__(self) -> int:
        return self.input_ids.shape[0]


FIELDS = ("input_ids", "attention_mask", "token_type_ids", "labels", "mlm_positions", "mlm_labels", "is_next")
_LAYOUT_TENSORS = ("unpad_indices", "cu_seqlens")
DEFAULT_TOKEN_BUCKETS = 16


class PretrainingCollator:
    """Pads NSP pair samples into a :class:`Batch` and masks them (a fresh mask on every draw).

    A sample is a dict with ``input_ids`` (``[CLS] A [SEP] B [SEP]``, a list of ints), ``len_a`` (length of
    ``[CLS] A [SEP]``), ``is_next`` and optionally ``seed``: the seed of that sample's generator (see
    :func:`sample_seed`). Without ``seed``, the collator's own generator is used. [CLS], both [SEP] and padding
    are never masked. ``continuation``: a ``[vocab]`` bool table of ``##`` pieces (see
    :func:`~bertfast.data.masking.continuation_table`) turns on whole-word masking
    (``from_tokenizer(tok, whole_word_masking=True)`` builds it).

    ``token_buckets``: the batch's unpadded layout (``unpad_indices``, ``cu_seqlens``, ``max_seqlen``) is computed
    here, on the host, with the token count padded up to one of ``token_buckets`` evenly spaced sizes of
    batch * max_len (:func:`bertfast.ops.padding.bucket_rows`), so the encoder sees a bounded set of shapes and
    the model needs no host sync to unpad. 0: the exact token count; None: no layout (the model derives it).
    """

    def __init__(self, *, vocab_size: int, pad_token_id: int, mask_token_id: int, max_len: int = 128,
                 max_predictions: int | None = None, mlm_probability: float = 0.15,
                 pad_to_multiple_of: int | None = None, generator: torch.Generator | None = None,
                 continuation: torch.Tensor | None = None, token_buckets: int | None = DEFAULT_TOKEN_BUCKETS):
        self.vocab_size = vocab_size
        self.max_len = max_len
        self.token_buckets = token_buckets
        self.pad_token_id = pad_token_id
        self.mask_token_id = mask_token_id
        self.mlm_probability = mlm_probability
        self.max_predictions = max_predictions or default_max_predictions(max_len, mlm_probability)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.generator = generator
        self.continuation = continuation

    @property
    def whole_word_masking(self) -> bool:
        return self.continuation is not None

    @classmethod
    def from_tokenizer(cls, tokenizer, *, whole_word_masking: bool = False, **kw) -> "PretrainingCollator":
        if whole_word_masking:
            kw["continuation"] = continuation_table(tokenizer)
        return cls(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                   mask_token_id=tokenizer.mask_token_id, **kw)

    def __call__(self, samples: list[dict]) -> Batch:
        B = len(samples)
        lens = torch.tensor([len(s["input_ids"]) for s in samples], dtype=torch.long)
        len_a = torch.tensor([int(s["len_a"]) for s in samples], dtype=torch.long)
        S = int(lens.max())
        if self.pad_to_multiple_of:
            S = -(-S // self.pad_to_multiple_of) * self.pad_to_multiple_of
        P = self.max_predictions
        rows = torch.arange(B)
        pos = torch.arange(S)
        real = pos < lens[:, None]  # [B, S]
        input_ids = torch.full((B, S), self.pad_token_id, dtype=torch.long)
        # Every random draw of a sample comes from its own generator, in its own length: a sample's mask does
        # not depend on the batch it is in (padding, neighbours, rank, worker). Rows are filled one by one with
        # small serial ops: no boolean-mask scatter, which goes to torch's thread pool and stalls on a busy CPU.
        priority, action, random_ids = torch.ones(B, S), torch.ones(B, S), torch.zeros(B, S, dtype=torch.long)
        for b, (s, n) in enumerate(zip(samples, lens.tolist())):
            input_ids[b, :n] = torch.as_tensor(s["input_ids"], dtype=torch.long)
            g = self.generator if s.get("seed") is None else torch.Generator().manual_seed(int(s["seed"]))
            torch.rand(n, generator=g, out=priority[b, :n])
            torch.rand(n, generator=g, out=action[b, :n])
            torch.randint(self.vocab_size, (n,), generator=g, out=random_ids[b, :n])
        special = ~real
        special[rows, 0] = special[rows, len_a - 1] = special[rows, lens - 1] = True  # [CLS], [SEP], [SEP]
        word_ids = None
        if self.continuation is not None:
            ids = input_ids.clamp(max=len(self.continuation) - 1)
            word_ids = word_ids_from_pieces(ids, special, self.continuation)
        input_ids, labels = mask_from_draws(input_ids, special, priority, action, random_ids, self.mask_token_id,
                                            self.mlm_probability, max_predictions=P, word_ids=word_ids)
        # Static form: the predicted positions of each row in ascending order, then -1 (at most P by construction).
        chosen = labels != -100
        r, c = chosen.nonzero(as_tuple=True)  # row-major: each row's positions in ascending order
        slot = chosen.long().cumsum(1)[r, c] - 1
        mlm_positions = torch.full((B, P), -1, dtype=torch.long)
        mlm_labels = torch.full((B, P), -100, dtype=torch.long)
        mlm_positions[r, slot] = c
        mlm_labels[r, slot] = labels[r, c]
        batch = Batch(input_ids=input_ids, attention_mask=real.long(),
                      token_type_ids=((pos >= len_a[:, None]) & real).long(), labels=labels,
                      mlm_positions=mlm_positions, mlm_labels=mlm_labels,
                      is_next=torch.tensor([int(s["is_next"]) for s in samples], dtype=torch.long))
        return self.add_layout(batch)

    def add_layout(self, batch: Batch, token_buckets: int | None = None) -> Batch:
        """The batch with its unpadded layout, the token count padded to this collator's bucket (or to
        `token_buckets`' when given; 0 = exact). token_buckets None on the collator: the batch unchanged."""
        buckets = self.token_buckets if token_buckets is None else token_buckets
        if buckets is None:
            return batch
        b, s = batch.input_ids.shape
        tokens = int(batch.attention_mask.sum())
        rows = padding.bucket_rows(tokens, b * max(self.max_len, s), buckets)
        lay = padding.batch_layout(batch.attention_mask, rows)
        return dataclasses.replace(batch, unpad_indices=lay.indices, cu_seqlens=lay.cu_seqlens,
                                   max_seqlen=lay.max_seqlen)
