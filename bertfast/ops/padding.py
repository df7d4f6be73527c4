"""Padded <-> unpadded ("varlen") token layouts, in one place.

A padded batch is [batch, seqlen, ...] with an attention_mask (1 = real token). Its unpadded form keeps only the
real tokens, sequence after sequence: [total_tokens, ...]. What describes the unpadded form is a `VarlenLayout`:

    indices     int64 [total_tokens]  row of each real token in the flattened padded layout [batch * seqlen]
    cu_seqlens  int32 [batch + 1]     sequence i is unpadded rows cu_seqlens[i]:cu_seqlens[i + 1]
    max_seqlen  int                   the longest sequence (what varlen attention needs; one host sync to get)
    batch, seqlen                     the padded shape

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
        return self.indices.numel()

    @property
    def seqlens(self) -> torch.Tensor:
        """int32 [B]: real tokens per sequence."""
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    def sequence_index(self) -> torch.Tensor:
        """int64 [T]: the sequence each unpadded token belongs to."""
        return torch.div(self.indices, self.seqlen, rounding_mode="floor")

    def position_ids(self) -> torch.Tensor:
        """int64 [T]: each token's position counted from its sequence's first real token."""
        return torch.arange(self.total, device=self.indices.device) - self.cu_seqlens.long()[self.sequence_index()]

    def first_token_index(self) -> torch.Tensor:
        """int64 [B]: the unpadded row of each sequence's first real token ([CLS]); -1 for an empty sequence."""
        first = self.cu_seqlens[:-1].long()
        return torch.where(self.seqlens > 0, first, torch.full_like(first, -1))

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, ...] -> [T, ...]."""
        return x.reshape(self.batch * self.seqlen, *x.shape[2:]).index_select(0, self.indices)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[T, ...] -> [B, S, ...], zeros at padding (differentiable: the gradient is gathered back)."""
        # index_copy, not new_zeros(...).index_put((indices,), x): identical outputs and gradients, but no faster on
        # CPU for the model's [T, heads, head_dim] (forward 0.9-1.0x, forward+backward 0.6-1.0x, 2026-12-02)
        out = x.new_zeros(self.batch * self.seqlen, *x.shape[1:]).index_copy(0, self.indices, x)
        return out.view(self.batch, self.seqlen, *x.shape[1:])

    def unpadded_rows(self, flat: torch.Tensor) -> torch.Tensor:
        """Flat padded-layout indices (b * seqlen + column; -1 = unused) -> unpadded rows (-1 stays -1; a
        padding position also maps to -1). No host sync."""
        rows = torch.full((self.batch * self.seqlen,), -1, dtype=torch.int64, device=self.indices.device)
        rows[self.indices] = torch.arange(self.total, device=rows.device)
        return torch.where(flat >= 0, rows[flat.clamp(min=0)], flat)


def layout_from_mask(attention_mask: torch.Tensor) -> VarlenLayout:
    """The layout of a [batch, seqlen] attention mask (nonzero = real token). One host sync (max_seqlen)."""
    b, s = attention_mask.shape
    keep = attention_mask.bool()
    seqlens = keep.sum(1, dtype=torch.int32)  # [B]
    indices = keep.reshape(-1).nonzero().squeeze(1)  # [T], sequence by sequence
    max_seqlen = int(seqlens.max()) if b else 0  # the host sync
    return VarlenLayout(indices, cu_seqlens_from_seqlens(seqlens), max_seqlen, b, s)


def layout_from_cu_seqlens(cu_seqlens: torch.Tensor, max_seqlen: int, total: int | None = None) -> VarlenLayout:
    """The right-padded [batch, max_seqlen] layout of sequences given by cu_seqlens (no host sync when `total`,
    the token count, is given)."""
    cu = cu_seqlens.to(torch.int64)
    if total is None:
        total = int(cu[-1])
    tok = torch.arange(total, device=cu.device)
    seq = torch.searchsorted(cu[1:], tok, right=True)  # the sequence of each token
    indices = seq * max_seqlen + (tok - cu[seq])
    return VarlenLayout(indices, cu_seqlens.to(torch.int32), max_seqlen, cu.numel() - 1, max_seqlen)


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
