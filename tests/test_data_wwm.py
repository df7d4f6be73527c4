"""Whole-word masking on a bert-base-uncased style WordPiece vocabulary (a vocab.txt written here: whole
words, `##` continuation pieces and single-character fallbacks, as in Google's release)."""

from __future__ import annotations

import math
import string

import pytest
import torch

from bertfast.data import (PretrainingCollator, continuation_table, default_max_predictions, mask_tokens,
                           word_ids_from_pieces)

WORDS = ("the a of and to in was he she it his her they we on at for with as by from that this is were had "
         "play run walk jump read writ talk believ cat dog house garden river city mountain book story").split()
PIECES = "##ing ##ed ##s ##er ##able ##ly ##ness ##ful ##less ##est ##ation ##ment ##believ ##ous".split()
PREFIXES = "un re dis over under".split()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from bertfast.data import tokenizer as tokmod

    vocab = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(".,!?'") + list(string.ascii_lowercase)
             + ["##" + c for c in string.ascii_lowercase] + WORDS + PIECES + PREFIXES)
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    t = tokmod.load_tokenizer(str(path))
    assert isinstance(t, transformers.PreTrainedTokenizerBase)
    return t


TEXT = ("the unbelievable walker was reading his remarkable storybook . she jumped over the mountains and "
        "talked endlessly with the playful dogs in the overgrown garden . they were walking to the river city .")


def _words(tok, ids):
    """Word spans (start, end) of a token list by the ## convention."""
    pieces = tok.convert_ids_to_tokens(ids)
    starts = [i for i, p in enumerate(pieces) if not p.startswith("##")]
    return list(zip(starts, starts[1:] + [len(pieces)]))


def test_vocab_splits_words_into_pieces(tok):
    pieces = tok.tokenize("unbelievable walker readings")
    assert pieces == ["un", "##believ", "##able", "walk", "##er", "read", "##ing", "##s"]
    table = continuation_table(tok)
    ids = torch.tensor(tok.convert_tokens_to_ids(pieces))
    assert table[ids].tolist() == [p.startswith("##") for p in pieces]
    wid = word_ids_from_pieces(ids, torch.zeros_like(ids, dtype=torch.bool), table)
    assert wid.tolist() == [1, 1, 1, 2, 2, 3, 3, 3]


def test_whole_words_chosen_quota_and_per_word_decision(tok):
    ids = torch.tensor(tok(TEXT, add_special_tokens=False)["input_ids"])
    words = _words(tok, ids.tolist())
    assert sum(e - s > 1 for s, e in words) >= 10  # plenty of multi-piece words
    n, V, MASK = ids.numel(), len(tok), tok.mask_token_id
    rows = 3000
    batch = ids.repeat(rows, 1)
    special = torch.zeros_like(batch, dtype=torch.bool)
    special[:, 0] = True  # position 0 never chosen
    table = continuation_table(tok)
    word_ids = word_ids_from_pieces(batch, special, table)
    g = torch.Generator().manual_seed(0)
    masked, labels = mask_tokens(batch, special, V, MASK, 0.15, generator=g, max_predictions=12,
                                 word_ids=word_ids)
    chosen = labels != -100
    k = min(round((n - 1) * 0.15), 12)
    counts = chosen.sum(-1)
    assert (counts <= k).all() and (counts >= 1).all() and not chosen[:, 0].any()
    assert counts.float().mean() > 0.9 * k  # skipped long words are made up by later ones: close to the quota
    assert torch.equal(labels[chosen], batch[chosen])
    # the draws mask_tokens took (priority, action, random ids): one decision per word, at its first piece
    g2 = torch.Generator().manual_seed(0)
    _, action, random_ids = (torch.rand(batch.shape, generator=g2), torch.rand(batch.shape, generator=g2),
                             torch.randint(V, batch.shape, generator=g2))
    states = {"mask": 0, "random": 0, "same": 0}
    multi_chosen = 0
    for r in range(rows):
        for s, e in words:
            if s == 0:
                continue
            c = chosen[r, s:e]
            assert c.all() or not c.any(), "a word is predicted whole or not at all"
            if not c.any():
                continue
            multi_chosen += e - s > 1
            a = float(action[r, s])
            key = "mask" if a < 0.8 else "random" if a < 0.9 else "same"
            want = {"mask": torch.full((e - s,), MASK), "random": random_ids[r, s:e], "same": batch[r, s:e]}[key]
            assert torch.equal(masked[r, s:e], want), (key, masked[r, s:e], want)
            states[key] += 1
    total = sum(states.values())
    assert multi_chosen > 0.2 * total
    for key, p in (("mask", 0.8), ("random", 0.1), ("same", 0.1)):
        assert abs(states[key] / total - p) < 5 * math.sqrt(p * (1 - p) / total), states
    # the cap: P slots bound the count even when the quota is larger
    _, capped = mask_tokens(batch[:50], special[:50], V, MASK, 0.5, generator=g, max_predictions=5,
                            word_ids=word_ids[:50])
    assert ((capped != -100).sum(-1) <= 5).all() and ((capped != -100).sum(-1) >= 1).all()


def test_collator_whole_word_masking_seeded_and_both_label_forms(tok):
    col = PretrainingCollator.from_tokenizer(tok, max_len=64, whole_word_masking=True)
    plain = PretrainingCollator.from_tokenizer(tok, max_len=64)
    assert col.whole_word_masking and not plain.whole_word_masking
    a = tok("the unbelievable walker was reading his storybook", add_special_tokens=False)["input_ids"]
    b = tok("she jumped over the mountains and talked endlessly", add_special_tokens=False)["input_ids"]
    samples = [{"input_ids": [tok.cls_token_id, *a, tok.sep_token_id, *b, tok.sep_token_id],
                "len_a": len(a) + 2, "is_next": 1, "seed": s} for s in range(64)]
    batch = col(samples)
    assert torch.equal(col(samples).labels, batch.labels)  # per-sample seeds fix the mask
    assert torch.equal(col(samples[5:6]).labels[0], batch.labels[5, : len(samples[5]["input_ids"])])
    P = default_max_predictions(64)
    assert batch.mlm_positions.shape == (64, P)
    words = _words(tok, samples[0]["input_ids"])
    for r in range(64):
        pos = (batch.labels[r] != -100).nonzero().squeeze(-1)
        assert 1 <= pos.numel() <= P
        k = pos.numel()
        assert torch.equal(batch.mlm_positions[r, :k], pos) and (batch.mlm_positions[r, k:] == -1).all()
        assert torch.equal(batch.mlm_labels[r, :k], batch.labels[r, pos])
        chosen = batch.labels[r] != -100
        for s, e in words:
            assert chosen[s:e].all() or not chosen[s:e].any()
        for special in (0, len(a) + 1, len(samples[r]["input_ids"]) - 1):
            assert not chosen[special]
    # the same draws without whole words choose single tokens: some multi-piece word is split somewhere
    pb = plain(samples)
    split = any(0 < int((pb.labels[r, s:e] != -100).sum()) < e - s for r in range(64) for s, e in words)
    assert split


def test_load_data_whole_word_masking(tok, tmp_path):
    pytest.importorskip("datasets")
    from bertfast.data import load_data

    docs = [" ".join([TEXT] * 2), TEXT.replace("the", "a"), TEXT.upper(), TEXT[::-1].replace(".", "").strip() + "."]
    (tmp_path / "c.txt").write_text("\n\n".join(d.replace(" . ", ".\n") for d in docs * 5) + "\n")
    kw = dict(tokenizer=tok, cache_dir=str(tmp_path / "cache"), max_len=32, batch_size=4)
    _, wwm = load_data(str(tmp_path / "c.txt"), whole_word_masking=True, **kw)
    _, plain = load_data(str(tmp_path / "c.txt"), **kw)
    assert wwm.collator.whole_word_masking and not plain.collator.whole_word_masking
    table = continuation_table(tok)
    for batch in list(wwm)[:5]:
        cont = table[batch.input_ids]
        chosen = batch.labels != -100
        # a piece is chosen exactly when the token it continues is (unless the piece opens a segment)
        prev_chosen = torch.nn.functional.pad(chosen[:, :-1], (1, 0))
        prev_special = torch.nn.functional.pad(batch.input_ids[:, :-1] == tok.sep_token_id, (1, 0))
        inner = cont & ~prev_special & (batch.attention_mask == 1)
        assert torch.equal(chosen[inner], prev_chosen[inner])
        assert (chosen.sum(-1) <= batch.mlm_positions.shape[1]).all()
