"""BERT's masked-LM corruption (paper section 3.1 / create_pretraining_data.py), in torch.

``mask_tokens`` is the one implementation: the collator calls it once per sample with that sample's own
generator, so a sample's mask depends only on (seed, epoch, sample index), never on the batch it lands in.
"""

from __future__ import annotations

import math

import torch


def default_max_predictions(max_len: int, mlm_probability: float = 0.15) -> int:
    """P, the static number of prediction slots per sequence: 20 at max_len 128 (as the BERT release), scaled."""
    return max(1, math.ceil(max_len * mlm_probability))


def mask_tokens(
    input_ids: torch.Tensor,
    special_tokens_mask: torch.Tensor,
    vocab_size: int,
    mask_token_id: int,
    mlm_probability: float = 0.15,
    generator: torch.Generator | None = None,
    max_predictions: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose positions to predict and corrupt them; returns ``(masked_input_ids, labels)``.

    As in the original data generator, each row predicts exactly ``round(n * mlm_probability)`` of its ``n``
    non-special positions (at least one when ``n > 0`` and the probability is positive, at most
    ``max_predictions``), chosen uniformly at random. Of the chosen positions 80% become ``mask_token_id``,
    10% a uniformly random token id in ``[0, vocab_size)`` and 10% keep their token. ``labels`` holds the
    original id at chosen positions and -100 elsewhere. ``input_ids`` is ``[..., S]``; nothing is modified in
    place. Three draws of the row's shape are taken from ``generator`` (one per random decision).
    """
    if input_ids.shape != special_tokens_mask.shape:
        raise ValueError(
            f"mask_tokens: input_ids {tuple(input_ids.shape)} and special_tokens_mask "
            f"{tuple(special_tokens_mask.shape)} must have the same shape"
        )
    if not 0.0 <= mlm_probability <= 1.0:
        raise ValueError(f"mask_tokens: mlm_probability must be in [0, 1], got {mlm_probability}")
    dev, shape = input_ids.device, input_ids.shape
    priority = torch.rand(shape, generator=generator, device=dev)
    action = torch.rand(shape, generator=generator, device=dev)
    random_ids = torch.randint(vocab_size, shape, generator=generator, device=dev, dtype=input_ids.dtype)
    return mask_from_draws(input_ids, special_tokens_mask, priority, action, random_ids, mask_token_id,
                           mlm_probability, max_predictions)


def _rank(x: torch.Tensor) -> torch.Tensor:
    """Rank of each element along the last dim. On CPU through numpy: single-threaded, so a collator running
    next to the training loop never waits for torch's intra-op thread pool on these small tensors."""
    if x.device.type == "cpu":
        import numpy as np

        return torch.from_numpy(np.argsort(np.argsort(x.numpy(), axis=-1), axis=-1))
    return x.argsort(-1).argsort(-1)


def mask_from_draws(input_ids, special_tokens_mask, priority, action, random_ids, mask_token_id: int,
                    mlm_probability: float = 0.15, max_predictions: int | None = None):
    """The decisions of :func:`mask_tokens` from given uniform draws (``priority``, ``action`` in [0, 1) and
    ``random_ids``, each shaped like ``input_ids``): the collator draws them per sample, of the sample's own
    length, then masks the padded batch at once."""
    special = special_tokens_mask.bool()
    # Random priority per position; special positions sort last so they are never chosen.
    priority = priority.masked_fill(special, 2.0)
    n = (~special).sum(-1, keepdim=True)  # [..., 1] candidates per row
    k = torch.round(n.double() * mlm_probability).long()
    if mlm_probability > 0:
        k = torch.where(n > 0, k.clamp(min=1), k)
    if max_predictions is not None:
        k = k.clamp(max=max_predictions)
    rank = _rank(priority)  # 0 = smallest priority
    chosen = rank < k
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    # 80% [MASK], 10% random token, 10% unchanged.
    masked = torch.where(chosen & (action < 0.8), torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids.to(input_ids.dtype), masked)
    return masked, labels
