"""Padded <-> unpadded ("varlen") token layouts, in one place.

A padded batch is [batch, seqlen, ...] with an attention_mask (1 = real token). Its unpadded form keeps only the
real tokens, sequence after sequence: [total_tokens, ...]. What describes the unpadded form is a `VarlenLayout`:

    indices     int64 [rows]          row of each real token in the flattened padded layout [batch * seqlen];
                                      rows >= total_tokens are bucket padding and hold batch * seqlen
    cu_seqlens  int32 [batch + 1]     sequence i is unpadded rows cu_seqlens[i]:cu_seqlens[i + 1]
    max_seqlen  int                   >= the longest sequence (what varlen attention needs; one host sync to get
                                      from a device mask, none when the collator computed it: `batch_layout`)
    batch, seqlen                     the padded shape

Bucket padding (issue 31): the collator may pad the token count up to a fixed bucket (`bucket_rows`), so that the
encoder sees a bounded set of shapes. Rows t >= cu_seqlens[-1] are then padding rows: `unpad` fills them with a
given value (the pad token's id, so they carry finite activations), varlen attention gives them zero outputs and
zero gradients and no real row attends to them, `pad` drops them, and nothing the heads read comes from them, so
they add exactly nothing to the loss or to any gradient. Without bucket padding rows == total_tokens.

Each sequence's real tokens must be one contiguous run in its row: right padding (BERT's collators) or left
padding. Positions inside a sequence count from its first real token (`position_ids`), so a left-padded
sequence is encoded exactly as the same sequence right-padded.

    x_unpad, layout = unpad_input(x, attention_mask)   # [B, S, ...] -> [T, ...]
    x = pad_input(x_unpad, layout)                      # [T, ...] -> [B, S, ...], zeros at padding
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def cu_seqlens_from_seqlens(seqlens: torch.Tensor) -> torch.Tensor:
    """Sequence lengths [batch] -> cu_seqlens int32 [batch + 1]: 0, then the running sum."""
    return F.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0))


@dataclass(frozen=True)
class VarlenLayout:
    """Where the real tokens of a padded [batch, seqlen] batch sit (see the module docstring)."""

    indices: torch.Tensor  # int64 [T]
    cu_seqlens: torch.Tensor  # int32 [B + 1]
    max_seqlen: int
    batch: int
    seqlen: int

    @property
    def total(self) -> int:
        """The unpadded rows, bucket padding included (the real token count is cu_seqlens[-1])."""
        return self.indices.numel()

    @property
    def pad_slot(self) -> int:
        """The flat padded-layout index that bucket-padding rows hold: one past the last position."""
        return self.batch * self.seqlen

    def real_rows(self) -> torch.Tensor:
        """bool [rows]: True for a real token, False for a bucket-padding row (no host sync)."""
        return self.indices < self.pad_slot

    @property
    def seqlens(self) -> torch.Tensor:
        """int32 [B]: real tokens per sequence."""
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    def sequence_index(self) -> torch.Tensor:
        """int64 [T]: the sequence each unpadded token belongs to (batch for a bucket-padding row)."""
        return torch.div(self.indices, max(self.seqlen, 1), rounding_mode="floor")

    def position_ids(self) -> torch.Tensor:
        """int64 [T]: each token's position counted from its sequence's first real token (0 for padding rows)."""
        pos = torch.arange(self.total, device=self.indices.device) - self.cu_seqlens.long()[self.sequence_index()]
        return torch.where(self.real_rows(), pos, 0)

    def first_token_index(self) -> torch.Tensor:
        """int64 [B]: the unpadded row of each sequence's first real token ([CLS]); -1 for an empty sequence."""
        first = self.cu_seqlens[:-1].long()
        return torch.where(self.seqlens > 0, first, torch.full_like(first, -1))

    def unpad(self, x: torch.Tensor, fill=0) -> torch.Tensor:
        """[B, S, ...] -> [T, ...]; bucket-padding rows hold `fill`."""
        flat = x.reshape(self.batch * self.seqlen, *x.shape[2:])
        flat = torch.cat([flat, flat.new_full((1, *flat.shape[1:]), fill)])  # row pad_slot: the fill
        return flat.index_select(0, self.indices)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[T, ...] -> [B, S, ...], zeros at padding (differentiable: the gradient is gathered back; bucket-padding
        rows land in a dropped extra row, so they get a zero gradient)."""
        # index_copy, not new_zeros(...).index_put((indices,), x): identical outputs and gradients, but no faster on
        # CPU for the model's [T, heads, head_dim] (forward 0.9-1.0x, forward+backward 0.6-1.0x, 2026-12-02)
        n = self.batch * self.seqlen
        out = x.new_zeros(n + 1, *x.shape[1:]).index_copy(0, self.indices, x)[:n]
        return out.view(self.batch, self.seqlen, *x.shape[1:])

    def unpadded_rows(self, flat: torch.Tensor) -> torch.Tensor:
        """Flat padded-layout indices (b * seqlen + column; -1 = unused) -> unpadded rows (-1 stays -1; a
        padding position also maps to -1). No host sync."""
        rows = torch.full((self.batch * self.seqlen + 1,), -1, dtype=torch.int64, device=self.indices.device)
        rows[self.indices] = torch.arange(self.total, device=rows.device)
        rows[-1] = -1
        return torch.where(flat >= 0, rows[flat.clamp(min=0)], flat)


def layout_from_mask(attention_mask: torch.Tensor) -> VarlenLayout:
    """The layout of a [batch, seqlen] attention mask (nonzero = real token). One host sync (max_seqlen)."""
    b, s = attention_mask.shape
    keep = attention_mask.bool()
    seqlens = keep.sum(1, dtype=torch.int32)  # [B]
    indices = keep.reshape(-1).nonzero().squeeze(1)  # [T], sequence by sequence
    max_seqlen = int(seqlens.max()) if b else 0  # the host sync
    return VarlenLayout(indices, cu_seqlens_from_seqlens(seqlens), max_seqlen, b, s)


def bucket_rows(tokens: int, capacity: int, buckets: int) -> int:
    """The bucket a batch of `tokens` real tokens is padded to: the smallest of `buckets` evenly spaced sizes
    ceil(k * capacity / buckets) rounded up to a multiple of 8, k = 1..buckets (capacity: batch * max_len, the most
    tokens a batch can hold), never below `tokens`. buckets <= 0: no padding (the exact count)."""
    if buckets <= 0 or tokens <= 0:
        return tokens
    for k in range(1, buckets + 1):
        share = -(-k * capacity // buckets)  # ceil(k * capacity / buckets)
        size = -(-share // 8) * 8
        if size >= tokens:
            return size
    return -(-tokens // 8) * 8  # more tokens than the capacity (samples longer than max_len): still a multiple of 8


def batch_layout(attention_mask: torch.Tensor, rows: int | None = None, max_seqlen: int | None = None
                 ) -> VarlenLayout:
    """The layout of a host (CPU) [batch, seqlen] mask with `rows` unpadded rows (>= the token count; default the
    token count): what the collator computes once per batch, so that the model on the device needs no host sync.
    max_seqlen: default the mask's width (a static value; varlen attention takes any bound >= the longest)."""
    b, s = attention_mask.shape
    lay = layout_from_mask(attention_mask)
    rows = lay.total if rows is None else rows
    if rows < lay.total:
        raise ValueError(f"rows={rows} is fewer than the batch's {lay.total} real tokens")
    indices = torch.cat([lay.indices, torch.full((rows - lay.total,), b * s, dtype=torch.int64)])
    return VarlenLayout(indices, lay.cu_seqlens, s if max_seqlen is None else max_seqlen, b, s)


def layout_from_cu_seqlens(cu_seqlens: torch.Tensor, max_seqlen: int, total: int | None = None) -> VarlenLayout:
    """The right-padded [batch, max_seqlen] layout of sequences given by cu_seqlens (no host sync when `total`,
    the number of unpadded rows, is given). Rows t >= cu_seqlens[-1] (when total is larger) are bucket padding:
    their index is batch * max_seqlen."""
    cu = cu_seqlens.to(torch.int64)
    if total is None:
        total = int(cu[-1])
    b = cu.numel() - 1
    tok = torch.arange(total, device=cu.device)
    seq = torch.searchsorted(cu[1:], tok, right=True)  # the sequence of each token; b for a padding row
    real = seq < b
    seq = seq.clamp(max=max(b - 1, 0))
    indices = torch.where(real, seq * max_seqlen + (tok - cu[seq]), b * max_seqlen)
    return VarlenLayout(indices, cu_seqlens.to(torch.int32), max_seqlen, b, max_seqlen)


def layout_from_seqlens(seqlens: torch.Tensor, seqlen: int | None = None) -> VarlenLayout:
    """The right-padded layout of sequences with these lengths (seqlen: the padded width, default the longest)."""
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0
    width = max_seqlen if seqlen is None else seqlen
    mask = torch.arange(width, device=seqlens.device)[None, :] < seqlens[:, None]
    return layout_from_mask(mask)


def unpad_input(x: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, VarlenLayout]:
    """x [B, S, ...] and its mask [B, S] -> (x at the real tokens [T, ...], the layout)."""
    layout = layout_from_mask(attention_mask)
    return layout.unpad(x), layout


def pad_input(x: torch.Tensor, layout: VarlenLayout) -> torch.Tensor:
    """[T, ...] -> [B, S, ...] with zeros at padding."""
    return layout.pad(x)


def first_token_columns(attention_mask: torch.Tensor) -> torch.Tensor:
    """int64 [B]: the column of each row's first real token (0 for an empty row). No host sync."""
    return attention_mask.bool().to(torch.uint8).argmax(dim=1)


def check_mask(attention_mask: torch.Tensor, name: str = "attention_mask") -> None:
    """ValueError unless the mask holds only 0/1 and each row's real tokens are one contiguous run (right or
    left padding). Syncs the host."""
    values_ok = bool(((attention_mask == 0) | (attention_mask == 1)).all())
    if not values_ok:
        raise ValueError(f"{name} must hold only 0 (padding) and 1 (real token)")
    keep = attention_mask.bool()
    starts = keep & ~F.pad(keep, (1, 0))[:, :-1]  # a real token after padding or at column 0
    runs = starts.sum(1)
    if bool((runs > 1).any()):
        row = int((runs > 1).nonzero()[0, 0])
        raise ValueError(f"{name} row {row} has padding between real tokens: each sequence's real tokens must be "
                         f"one contiguous run (right or left padding)")
