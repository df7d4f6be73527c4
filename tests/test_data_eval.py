"""Held-out evaluation data (issue 16 section 1, data side): whole documents held out before pairs are built,
or another corpus; fixed eval masks; eval sharding; the training stream is untouched by evaluation."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("datasets")

from bertfast.data import DataError, load_data  # noqa: E402
from bertfast.data import loader as loader_mod  # noqa: E402
from bertfast.data import tokenizer as tokmod  # noqa: E402


def batches_equal(a, b) -> bool:
    return all(torch.equal(x, y) for (_, x), (_, y) in zip(a.items(), b.items()))


def _marker_corpus(n_docs=60, n_sents=6):
    """Sentence j of document i reads 'docIsJ ...': decoded pairs reveal which sentences they hold."""
    words = ["alpha", "beta", "gamma", "delta", "omega"]
    return ["\n".join(f"doc{i}s{j} {words[(i + j) % 5]} {words[j % 5]} {words[(i * j) % 5]}." for j in range(n_sents))
            for i in range(n_docs)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("evalcorpus")
    (d / "c.txt").write_text("\n\n".join(_marker_corpus()) + "\n")
    return d


def _kw(corpus, **extra):
    return {**dict(cache_dir=str(corpus / "cache"), output_dir=str(corpus / "out"), vocab_size=400, max_len=48,
                   batch_size=4, short_seq_prob=0.0, dupe_factor=2), **extra}


def _sentences(tok, pairs):
    found = set()
    for row in pairs:
        found.update(re.findall(r"doc\d+s\d+", tok.decode(row["input_ids"]).replace(" ", "")))
    return found


def test_held_out_documents_never_in_training(corpus, monkeypatch):
    seen = []
    real = tokmod.trained_tokenizer
    monkeypatch.setattr(tokmod, "trained_tokenizer",
                        lambda save_dir, vs, sents: real(save_dir, vs, seen.extend(sents) or iter(seen)))
    tok, loader = load_data(str(corpus / "c.txt"), eval_fraction=0.2, **_kw(corpus, output_dir=None))
    ev = loader.eval_loader
    assert ev is not None and len(ev) >= loader_mod.MIN_EVAL_BATCHES
    assert len(loader.documents) + len(ev.documents) == 60 and len(ev.documents) == 12  # ceil(0.2 * 60)
    train_s, eval_s = _sentences(tok, loader.pairs), _sentences(tok, ev.pairs)
    assert train_s and eval_s and not train_s & eval_s  # no sentence in both
    train_docs = {s.split("s")[0] for s in train_s}
    assert not train_docs & {s.split("s")[0] for s in eval_s}  # whole documents held out
    # the vocabulary was trained on the training documents only
    trained_on = {m for s in seen for m in re.findall(r"doc\d+s\d+", s.replace(" ", ""))}
    assert trained_on and trained_on <= train_s | {f"{d}s{j}" for d in train_docs for j in range(6)}
    assert not trained_on & eval_s
    # the split depends on the seed alone: another seed holds out other documents
    _, other = load_data(str(corpus / "c.txt"), eval_fraction=0.2, tokenizer=tok, **_kw(corpus, seed=1))
    assert _sentences(tok, other.eval_loader.pairs) != eval_s


def test_eval_masks_fixed_across_passes_runs_and_workers(corpus):
    tok, a = load_data(str(corpus / "c.txt"), eval_fraction=0.2, **_kw(corpus))
    first = list(a.eval_loader)
    next(iter(a))  # training moves on: a new epoch position, fresh training masks
    list(a)
    again = list(a.eval_loader)
    assert len(first) == len(again) == len(a.eval_loader) >= 4
    assert all(batches_equal(x, y) for x, y in zip(first, again))
    assert all((b.labels != -100).any() for b in first)
    _, b = load_data(str(corpus / "c.txt"), eval_fraction=0.2, tokenizer=tok, num_workers=2, **_kw(corpus))
    assert all(batches_equal(x, y) for x, y in zip(first, b.eval_loader))  # another run, with workers
    _, c = load_data(str(corpus / "c.txt"), eval_fraction=0.2, tokenizer=tok, **_kw(corpus, seed=5))
    assert not all(batches_equal(x, y) for x, y in zip(first, c.eval_loader))  # the seed matters


def test_training_stream_unchanged_by_evaluation(corpus):
    tok, with_eval = load_data(str(corpus / "c.txt"), eval_fraction=0.2, **_kw(corpus))
    _, without = load_data(str(corpus / "c.txt"), eval_fraction=0.2, tokenizer=tok, **_kw(corpus))
    torch.manual_seed(7)
    ref = [b for _ in range(2) for b in without]  # two epochs, no evaluation
    torch.manual_seed(7)
    got = []
    for _ in range(2):
        for i, b in enumerate(with_eval):
            got.append(b)
            if i % 3 == 0:
                state = torch.get_rng_state()
                list(with_eval.eval_loader)  # evaluate between training steps
                assert torch.equal(torch.get_rng_state(), state)  # no draw from torch's global generator
    assert len(got) == len(ref) and all(batches_equal(x, y) for x, y in zip(got, ref))
    # eval_fraction=0 (the default) gives no eval loader and the whole corpus to train on
    _, full = load_data(str(corpus / "c.txt"), tokenizer=tok, **_kw(corpus))
    assert full.eval_loader is None and len(full.documents) == 60


def test_eval_sharded_like_training(corpus):
    tok, single = load_data(str(corpus / "c.txt"), eval_fraction=0.3, eval_batch_size=4, **_kw(corpus))
    _, r0 = load_data(str(corpus / "c.txt"), eval_fraction=0.3, eval_batch_size=2, tokenizer=tok, rank=0,
                      world_size=2, **_kw(corpus))
    _, r1 = load_data(str(corpus / "c.txt"), eval_fraction=0.3, eval_batch_size=2, tokenizer=tok, rank=1,
                      world_size=2, **_kw(corpus))
    assert len(single.eval_loader) == len(r0.eval_loader) == len(r1.eval_loader) >= 4
    for g, a, b in zip(single.eval_loader, r0.eval_loader, r1.eval_loader):
        assert torch.equal(g.is_next, torch.cat([a.is_next, b.is_next]))
        assert torch.equal(g.mlm_labels, torch.cat([a.mlm_labels, b.mlm_labels]))  # same samples, same masks
    ia, ib = r0.eval_loader.batch_indices(), r1.eval_loader.batch_indices()
    assert not {i for x in ia for i in x} & {i for x in ib for i in x}


def test_eval_data_corpus_and_bad_eval_arguments(corpus, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(d.replace("doc", "oth") for d in _marker_corpus(20)) + "\n")
    tok, loader = load_data(str(corpus / "c.txt"), eval_data=str(other), **_kw(corpus))
    assert len(loader.documents) == 60 and len(loader.eval_loader.documents) == 20
    assert re.search(r"oth\d+s\d+", tok.decode(loader.eval_loader.pairs[0]["input_ids"]).replace(" ", ""))
    assert len(loader.eval_loader) >= 4 and loader.eval_loader.batch_size <= 8  # default 2 x batch_size
    with pytest.raises(DataError, match=r"eval_fraction=0\.1 with eval_data.*not both"):
        load_data(str(corpus / "c.txt"), eval_data=str(other), eval_fraction=0.1, **_kw(corpus))
    with pytest.raises(DataError, match=r"eval_fraction=1\.0.*\[0, 1\)"):
        load_data(str(corpus / "c.txt"), eval_fraction=1.0, **_kw(corpus))
    with pytest.raises(DataError, match=r"eval_batch_size=0"):
        load_data(str(corpus / "c.txt"), eval_fraction=0.1, eval_batch_size=0, **_kw(corpus))
    with pytest.raises(DataError, match=r"missing\.txt.*no such file"):  # checked before any work
        load_data(str(corpus / "c.txt"), eval_data=str(tmp_path / "missing.txt"), **_kw(corpus))
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("One.\n\nTwo.\n")  # at most one pair per document
    with pytest.raises(DataError, match=r"evaluation data.*tiny\.txt.*fewer than 4 batches"):
        load_data(str(corpus / "c.txt"), eval_data=str(tiny), **_kw(corpus, dupe_factor=1))


@pytest.mark.parametrize("arg, value", [("seed", -1), ("seed", 1e23), ("seed", 2**64), ("batch_size", "8"),
                                        ("max_len", 4), ("mlm_probability", 0), ("short_seq_prob", 1.5)])
def test_bad_numbers_refused_before_any_work(arg, value, monkeypatch):
    from bertfast.data import sources

    monkeypatch.setattr(sources, "load_documents", lambda *a, **k: pytest.fail("loaded before the check"))
    with pytest.raises(DataError, match=rf"load_data\({arg}=.*{arg} must be"):
        load_data("builtin", **{arg: value})
