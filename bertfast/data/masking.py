"""BERT's masked-LM corruption (paper section 3.1 / create_pretraining_data.py), in torch.

``mask_tokens`` is the one implementation: the collator calls it once per sample with that sample's own
generator, so a sample's mask depends only on (seed, epoch, sample index), never on the batch it lands in.

Whole-word masking (``word_ids``): a word is a token with its following ``##`` pieces; whole words are chosen
in random order until the row's quota is reached (a word that would overshoot it is skipped, as in Google's
``create_pretraining_data.py --do_whole_word_mask``), every piece of a chosen word is predicted, and one
80/10/10 decision is taken per word: all its pieces become ``[MASK]``, or all random ids, or all stay.
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
    word_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose positions to predict and corrupt them; returns ``(masked_input_ids, labels)``.

    As in the original data generator, each row predicts exactly ``round(n * mlm_probability)`` of its ``n``
    non-special positions (at least one when ``n > 0`` and the probability is positive, at most
    ``max_predictions``), chosen uniformly at random. Of the chosen positions 80% become ``mask_token_id``,
    10% a uniformly random token id in ``[0, vocab_size)`` and 10% keep their token. ``labels`` holds the
    original id at chosen positions and -100 elsewhere. ``input_ids`` is ``[..., S]``; nothing is modified in
    place. Three draws of the row's shape are taken from ``generator`` (one per random decision).

    ``word_ids`` (shaped like ``input_ids``, integers): whole-word masking. Consecutive non-special positions
    with the same id form one word (see :func:`word_ids_from_pieces`); words are chosen instead of tokens until
    ``round(n * mlm_probability)`` tokens are predicted (a word that would overshoot is skipped; if no word fits,
    the first word of at most ``max_predictions`` pieces is taken, so a row still predicts something), and the
    80/10/10 decision is drawn once per word (at its first piece).
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
                           mlm_probability, max_predictions, word_ids=word_ids)


def continuation_table(tokenizer) -> torch.Tensor:
    """``[len(tokenizer)]`` bool: True for WordPiece continuation pieces (``##...``) of ``tokenizer``'s vocab."""
    vocab = tokenizer.get_vocab()
    table = torch.zeros(max(len(tokenizer), max(vocab.values(), default=-1) + 1), dtype=torch.bool)
    ids = [i for t, i in vocab.items() if t.startswith("##") and len(t) > 2]
    table[ids] = True
    return table


def word_ids_from_pieces(input_ids: torch.Tensor, special_tokens_mask: torch.Tensor,
                         continuation: torch.Tensor) -> torch.Tensor:
    """Word ids for whole-word masking: a new word starts at every token that is not a ``##`` piece (per the
    ``continuation`` table of :func:`continuation_table`) and at every special position."""
    if input_ids.device.type == "cpu" and continuation.device.type == "cpu":
        import numpy as np

        # numpy, single-threaded: torch's indexing and cumsum on these small tensors wait for its thread pool
        # on a busy CPU (20 ms a batch measured next to a training loop, against 1 ms here)
        starts = ~continuation.numpy()[input_ids.numpy()] | special_tokens_mask.bool().numpy()
        return torch.from_numpy(np.cumsum(starts, axis=-1, dtype=np.int64))
    starts = ~continuation[input_ids] | special_tokens_mask.bool()
    return starts.long().cumsum(-1)


def _rank(x: torch.Tensor) -> torch.Tensor:
    """Rank of each element along the last dim. On CPU through numpy: single-threaded, so a collator running
    next to the training loop never waits for torch's intra-op thread pool on these small tensors."""
    if x.device.type == "cpu":
        import numpy as np

        return torch.from_numpy(np.argsort(np.argsort(x.numpy(), axis=-1), axis=-1))
    return x.argsort(-1).argsort(-1)


def _whole_words(priority, special, word_ids, k, cap):
    """Chosen positions ``[R, S]`` and, per position, the index of its word's first piece (for the per-word
    80/10/10 decision). Words are runs of equal ``word_ids`` among the non-special positions of a row, taken
    in order of their first piece's priority while they fit in the row's quota ``k``."""
    import numpy as np

    pr, sp, w, kk = priority.cpu().numpy(), special.cpu().numpy(), word_ids.cpu().numpy(), k.view(-1).cpu().numpy()
    R, S = pr.shape
    chosen = np.zeros((R, S), dtype=bool)
    first = np.broadcast_to(np.arange(S), (R, S)).copy()
    for r in range(R):
        cand = np.flatnonzero(~sp[r])
        quota = int(kk[r])
        if quota <= 0 or cand.size == 0:
            continue
        wr = w[r, cand]
        starts = np.flatnonzero(np.concatenate(([True], wr[1:] != wr[:-1])))
        sizes = np.diff(np.append(starts, cand.size))
        order = np.argsort(pr[r, cand[starts]], kind="stable")
        # the words in priority order that fit before the first overshoot, at once; then the sequential rule
        # (skip a word that would overshoot, go on while the quota is not met) for the few that remain
        fit = int(np.searchsorted(np.cumsum(sizes[order]), quota, side="right"))
        picked = order[:fit].tolist()
        count = int(sizes[order[:fit]].sum())
        for wi in order[fit:].tolist():
            if count >= quota:
                break
            if count + sizes[wi] <= quota:
                picked.append(wi)
                count += int(sizes[wi])
        if not picked:  # every word is longer than the quota: take the first that fits in the P slots
            picked = [wi for wi in order if sizes[wi] <= cap][:1]
        widx = np.repeat(np.arange(starts.size), sizes)  # word of each candidate position
        take = np.zeros(starts.size, dtype=bool)
        take[picked] = True
        chosen[r, cand[take[widx]]] = True
        first[r, cand] = cand[starts[widx]]
    dev = priority.device
    return torch.from_numpy(chosen).to(dev), torch.from_numpy(first).to(dev)


def mask_from_draws(input_ids, special_tokens_mask, priority, action, random_ids, mask_token_id: int,
                    mlm_probability: float = 0.15, max_predictions: int | None = None, word_ids=None):
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
    if word_ids is None:
        rank = _rank(priority)  # 0 = smallest priority
        chosen = rank < k
    else:
        if word_ids.shape != input_ids.shape:
            raise ValueError(f"mask_tokens: word_ids {tuple(word_ids.shape)} must have the shape of input_ids "
                             f"{tuple(input_ids.shape)}")
        shape = input_ids.shape
        flat = lambda t: t.reshape(-1, shape[-1])  # noqa: E731
        cap = max_predictions if max_predictions is not None else shape[-1]
        chosen, first = _whole_words(flat(priority), flat(special), flat(word_ids), k.reshape(-1), cap)
        action = flat(action).gather(-1, first).reshape(shape)  # one decision per word, at its first piece
        chosen = chosen.reshape(shape)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    # 80% [MASK], 10% random token, 10% unchanged.
    masked = torch.where(chosen & (action < 0.8), torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids.to(input_ids.dtype), masked)
    return masked, labels
