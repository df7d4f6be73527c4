"""Held-out evaluation (issue 16 section 1, bertfast/train/evaluate.py): the token-weighted numbers equal a float64
reference over the whole set, the same at every call, no RNG stream shifted, modes restored, and 2 gloo ranks
(each a slice, reduced) give what 1 process gives over the same set."""
from __future__ import annotations

import json
import os
import random
import re
import time
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("datasets")

from bertfast import BertConfig, BertForPreTraining  # noqa: E402
from bertfast.data import load_data  # noqa: E402
from bertfast.data.batch import Batch  # noqa: E402
from bertfast.data.loader import EvalLoader  # noqa: E402
from bertfast.train.evaluate import EVAL_KEYS, eval_postfix, evaluate, format_eval  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaluate")
    tok, loader = load_data("builtin", builtin_docs=80, eval_fraction=0.1, batch_size=8, max_len=64,
                            vocab_size=300, output_dir=str(d / "out"), cache_dir=str(d / "cache"))
    assert loader.eval_loader is not None and len(loader.eval_loader) >= 4
    return tok, loader


@pytest.fixture(scope="module")
def small_ev(data):
    """3 batches of 8 from the eval set (an EvalLoader: fixed masks, draws nothing), for the quicker tests."""
    ev = data[1].eval_loader
    return EvalLoader(ev.pairs.select(range(24)), ev.collator, batch_size=8, seed=ev.seed)


@pytest.fixture(scope="module")
def weights(data):
    torch.manual_seed(1)
    sd = BertForPreTraining(BertConfig.preset("tiny", vocab_size=len(data[0]))).state_dict()
    # larger logits than at initialisation: losses that differ from batch to batch, as a trained model's do
    sd["word_embeddings.weight"] *= 8
    sd["nsp.weight"] *= 8
    # and a preference for the most frequent targets, so that some predictions are right (MLM accuracy not 0)
    targets = torch.cat([b.mlm_labels[b.mlm_labels != -100] for b in data[1].eval_loader])
    ids, counts = targets.unique(return_counts=True)
    for rank, i in enumerate(counts.argsort(descending=True)[:5].tolist()):
        sd["mlm_bias"][ids[i]] = 12.0 - rank
    return sd


def _model(weights, cls=BertForPreTraining):
    m = cls(BertConfig.preset("tiny", vocab_size=weights["word_embeddings.weight"].shape[0]))
    m.load_state_dict(weights)
    return m


class DrawingModel(BertForPreTraining):
    """Draws from every global generator at each forward (as a model with a stray rand in eval would), records
    the mode and grad state it ran in, and raises at forward number `fail_at` (if set)."""

    def __init__(self, config):
        super().__init__(config)
        self.seen, self.fail_at = [], None

    def forward(self, *args, **kwargs):
        self.seen.append((self.training, torch.is_grad_enabled()))
        torch.rand(3), random.random(), np.random.rand()
        if self.fail_at is not None and len(self.seen) >= self.fail_at:
            raise RuntimeError("boom")
        return super().forward(*args, **kwargs)


def _rng_snapshot():
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def _assert_same_rng(a, b):
    assert torch.equal(a[0], b[0]), "torch's CPU generator moved"
    assert a[1] == b[1], "python's random moved"
    assert a[2][0] == b[2][0] and np.array_equal(a[2][1], b[2][1]) and a[2][2:] == b[2][2:], "numpy's moved"


def _reference(model, batches):
    """Per-batch model outputs (eval mode, no grad), every loss recomputed in float64 from the logits, summed over
    the whole set; also the mean of per-batch means (the wrong weighting) to show the test can tell them apart."""
    model.eval()
    mlm = nsp = mlm_ok = nsp_ok = 0.0
    n_mlm = n_seq = tokens = 0
    batch_means = []
    with torch.no_grad():
        for b in batches:
            o = model(**b.model_inputs(static_mlm=True))
            keep = o.mlm_targets != -100
            logits, tgt = o.prediction_scores[keep].double(), o.mlm_targets[keep]
            ce = F.cross_entropy(logits, tgt, reduction="sum").item()
            mlm += ce
            batch_means.append(ce / int(keep.sum()))
            mlm_ok += (logits.argmax(-1) == tgt).sum().item()
            nsp += F.cross_entropy(o.seq_relationship_score.double(), b.is_next, reduction="sum").item()
            nsp_ok += (o.seq_relationship_score.argmax(-1) == b.is_next).sum().item()
            n_mlm += int(keep.sum())
            n_seq += len(b)
            tokens += int(b.attention_mask.sum())
    ref = {"eval_mlm_loss": mlm / n_mlm, "eval_mlm_acc": mlm_ok / n_mlm, "eval_nsp_loss": nsp / n_seq,
           "eval_nsp_acc": nsp_ok / n_seq, "eval_tokens": tokens, "eval_sequences": n_seq, "eval_predictions": n_mlm}
    ref["eval_loss"] = ref["eval_mlm_loss"] + ref["eval_nsp_loss"]
    return ref, sum(batch_means) / len(batch_means)


def _split(batch, at: int):
    return (Batch(**{k: v[:at] for k, v in batch.items()}), Batch(**{k: v[at:] for k, v in batch.items()}))


def test_matches_float64_reference(data, weights):
    """Batches of very different sizes (1 and 15 sequences, 3 and 13): the token-weighted mean over the whole set
    is far from an average of per-batch means, and evaluate() must give the former."""
    ev = list(data[1].eval_loader)[:2]
    batches = [*_split(ev[0], 1), *_split(ev[1], 3)]
    model = _model(weights)
    model.train()
    rec = evaluate(model, batches, device="cpu")
    assert set(rec) == set(EVAL_KEYS)
    assert 0 < rec["eval_mlm_acc"] < 1 and 0 < rec["eval_nsp_acc"] < 1
    ref, mean_of_means = _reference(_model(weights), batches)
    for k in ("eval_tokens", "eval_sequences", "eval_predictions"):
        assert rec[k] == ref[k] and isinstance(rec[k], int), k
    for k in ("eval_mlm_acc", "eval_nsp_acc"):
        assert rec[k] == pytest.approx(ref[k], abs=1e-12), k
    for k in ("eval_mlm_loss", "eval_nsp_loss", "eval_loss"):
        assert rec[k] == pytest.approx(ref[k], rel=2e-6), k
    assert abs(mean_of_means - ref["eval_mlm_loss"]) > 20 * 2e-6 * ref["eval_mlm_loss"]  # the weighting matters
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_whole_eval_set_same_numbers_every_call(data, weights):
    ev = data[1].eval_loader
    model = _model(weights)
    rec = evaluate(model, ev, device="cpu")
    assert rec["eval_sequences"] == ev.num_samples
    assert rec["eval_tokens"] == sum(int(b.attention_mask.sum()) for b in ev)
    assert rec["eval_predictions"] == sum(int((b.mlm_labels != -100).sum()) for b in ev)
    assert 0.01 < rec["eval_mlm_acc"] < 0.9 and 0.1 < rec["eval_nsp_acc"] < 0.9
    assert evaluate(model, ev, device="cpu") == rec  # fixed masks: the very same numbers at the next evaluation


def test_leaves_every_rng_stream_and_mode_as_found(small_ev, weights):
    ev = small_ev
    model = _model(weights, DrawingModel)
    model.train()
    model.nsp.eval()  # a mix of modes comes back as it was

    def seeded():
        torch.manual_seed(7), random.seed(7), np.random.seed(7)

    seeded()
    expected_next = (torch.rand(4), random.random(), np.random.rand())
    seeded()
    before = _rng_snapshot()
    rec = evaluate(model, ev, device="cpu")
    _assert_same_rng(before, _rng_snapshot())
    assert (torch.rand(4).tolist(), random.random(), np.random.rand()) == (expected_next[0].tolist(),
                                                                            *expected_next[1:])
    assert len(model.seen) == len(ev) and all(mode == (False, False) for mode in model.seen)  # eval, no grad
    assert model.training and not model.nsp.training
    assert all(m.training for name, m in model.named_modules() if not name.startswith("nsp"))
    # the model really draws: the same forward outside evaluate moves all three generators
    seeded()
    with torch.no_grad():
        model(**next(iter(ev)).model_inputs())
    after = _rng_snapshot()
    assert not torch.equal(before[0], after[0]) and before[1] != after[1]
    # drawing did not change the numbers
    assert evaluate(_model(weights), ev, device="cpu") == rec


def test_training_with_evaluation_equals_training_without(small_ev, weights):
    """A few SGD steps with dropout (drawing from torch's generator), the model drawing from every generator at
    each forward: evaluating after each step leaves the training losses and weights bit for bit as they are
    without evaluation."""
    train_batches = [_split(b, 4)[0] for b in list(small_ev)[:2]]  # 2 steps of 4 sequences

    def run(with_eval: bool):
        torch.manual_seed(3), random.seed(3), np.random.seed(3)
        model = _model(weights, DrawingModel)
        assert model.config.dropout > 0
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model.train()
        losses = []
        for b in train_batches:
            loss = model(**b.model_inputs()).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
            if with_eval:
                evaluate(model, train_batches[:1], device="cpu")
        return losses, model.state_dict()

    (plain, w_plain), (evaluated, w_eval) = run(False), run(True)
    assert plain == evaluated
    assert all(torch.equal(w_plain[k], w_eval[k]) for k in w_plain)


def test_exception_restores_rng_and_mode(small_ev, weights):
    model = _model(weights, DrawingModel)
    model.fail_at = 2
    model.train()
    before = _rng_snapshot()
    with pytest.raises(RuntimeError, match="boom"):
        evaluate(model, small_ev, device="cpu")
    _assert_same_rng(before, _rng_snapshot())
    assert all(m.training for m in model.modules())


def test_bf16_autocast_and_progress(small_ev, weights, capsys):
    ev = small_ev
    model = _model(weights)
    fp32 = evaluate(model, ev, device="cpu", precision="fp32")
    bf16 = evaluate(model, ev, device="cpu", precision="bf16", progress=True)
    assert "eval" in capsys.readouterr().err  # the bar
    assert bf16["eval_mlm_loss"] != fp32["eval_mlm_loss"]  # autocast did run in bf16
    assert bf16["eval_mlm_loss"] == pytest.approx(fp32["eval_mlm_loss"], abs=0.05)
    assert bf16["eval_nsp_loss"] == pytest.approx(fp32["eval_nsp_loss"], abs=0.05)
    assert bf16["eval_tokens"] == fp32["eval_tokens"]


def test_bad_arguments_are_named(small_ev, weights):
    model = _model(weights)
    with pytest.raises(ValueError, match=r"evaluate\(precision='fp8'\).*fp32, bf16, fp16"):
        evaluate(model, small_ev, device="cpu", precision="fp8")
    with pytest.raises(ValueError, match=r"eval_loader.*no sequence.*--eval-fraction"):
        evaluate(model, [], device="cpu")
    with pytest.raises(ValueError, match=r"eval_loader=None.*eval_fraction"):
        evaluate(model, None, device="cpu")
    with pytest.raises(RuntimeError, match="describes 2 ranks.*init_process_group"):
        evaluate(model, small_ev, device="cpu", process_group=types.SimpleNamespace(world_size=2))
    # a 1-rank descriptor without a process group is fine (the trainer's single-process run)
    assert evaluate(model, small_ev, device="cpu",
                    process_group=types.SimpleNamespace(world_size=1))["eval_sequences"] > 0


def test_format_eval():
    rec = {"eval_loss": 5.5, "eval_mlm_loss": 4.75, "eval_mlm_acc": 0.1234, "eval_nsp_loss": 0.75,
           "eval_nsp_acc": 0.5, "eval_tokens": 51200, "eval_sequences": 800, "eval_predictions": 8192}
    assert format_eval(rec, prefix="EP1_eval") == ("EP1_eval, avg_loss=5.5000 (mlm 4.7500, nsp 0.7500), "
                                                   "NSP_acc=50.00%, MLM_acc=12.34% (8,192 predictions, 51,200 "
                                                   "tokens)")
    assert eval_postfix(rec) == {"eval_mlm": "4.750", "eval_mlm_acc": "0.123", "eval_nsp_acc": "0.500"}


# ---------------------------------------------------------------------------------------------- 2 ranks
def _rank_worker(rank: int, world: int, store: str, weights, pairs, collator, batch_size: int, seed: int,
                 out: str):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        ev = EvalLoader(pairs, collator, batch_size=batch_size, seed=seed, rank=rank, world_size=world)
        model = DDP(_model(weights))
        model.train()
        torch.manual_seed(100 + rank)
        before = torch.get_rng_state()
        recs = [evaluate(model, ev, device="cpu"),  # the default group
                evaluate(model, ev, device="cpu", process_group=types.SimpleNamespace(world_size=world)),
                evaluate(model, ev, device="cpu", process_group=False)]  # this rank's slice alone
        try:  # a loader cut for 1 rank under a 2-rank group: refused on every rank, before any collective
            evaluate(model, EvalLoader(pairs, collator, batch_size=batch_size, seed=seed), device="cpu")
            refused = ""
        except ValueError as e:
            refused = str(e)
        result = {"recs": recs, "refused": refused, "rng_same": bool(torch.equal(before, torch.get_rng_state())),
                  "training": model.module.training, "batches": len(ev)}
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(data, weights, tmp_path):
    ev = data[1].eval_loader
    half = ev.batch_size // 2
    assert half * 2 == ev.batch_size
    # 1 process over the set 2 ranks of `half` sequences cover: the same global batches, the same fixed masks
    one = evaluate(_model(weights), EvalLoader(ev.pairs, ev.collator, batch_size=2 * half, seed=ev.seed),
                   device="cpu")
    ctx = torch.multiprocessing.spawn(
        _rank_worker, args=(2, str(tmp_path / "store"), weights, ev.pairs, ev.collator, half, ev.seed, str(tmp_path)),
        nprocs=2, join=False)
    deadline = time.time() + 240
    try:
        while not ctx.join(timeout=1):
            assert time.time() < deadline, "the ranks still ran after 240 s (a hang in the all_reduce?)"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["rng_same"] and r["training"] for r in ranks)
    assert all(re.search(r"slices for 1 rank.*has 2.*world_size=2", r["refused"]) for r in ranks)
    assert ranks[0]["batches"] == ranks[1]["batches"] == len(ev)
    for r in ranks:
        default, described, alone = r["recs"]
        assert default == described == ranks[0]["recs"][0]  # every rank returns the reduced numbers
        for k in ("eval_tokens", "eval_sequences", "eval_predictions"):
            assert default[k] == one[k], k
        for k in ("eval_mlm_loss", "eval_nsp_loss", "eval_loss"):
            assert default[k] == pytest.approx(one[k], rel=1e-5), k
        for k, n in (("eval_mlm_acc", "eval_predictions"), ("eval_nsp_acc", "eval_sequences")):
            assert abs(default[k] - one[k]) <= 1.0 / one[n] + 1e-12, k  # at most one argmax tie broken otherwise
        assert alone["eval_sequences"] == one["eval_sequences"] // 2  # process_group=False: no reduction
    # the two local slices add up to the whole
    a, b = (r["recs"][2] for r in ranks)
    assert a["eval_tokens"] + b["eval_tokens"] == one["eval_tokens"]
    pooled = (a["eval_mlm_loss"] * a["eval_predictions"] + b["eval_mlm_loss"] * b["eval_predictions"]) / (
        a["eval_predictions"] + b["eval_predictions"])
    assert pooled == pytest.approx(one["eval_mlm_loss"], rel=1e-5)
