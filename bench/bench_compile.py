"""--compile on the CPU: the training step (forward + backward + AdamW) eager vs compiled the way the trainer compiles
it (bertfast.train.trainer.compile_for_training) and with its optimizer (fused AdamW), side by side in one
process, interleaved batch by batch.

Two data cases: `random` (BERT's 30522-word vocabulary, random tokens, lengths uniform in [S/2, S], from the
collator) and `builtin` (the default run's corpus and vocabulary through load_data). Batches are bucketed, so the
compiled model meets a few bucket shapes; every batch runs once compiled before timing (the compilations: a static
graph for the first shape, a symbolic one for the rest). Rows: provider `eager` and `compile`, `seconds` the median
step over every timed step, with its spread; `compile_s` on the compile row: that first pass over all batches,
`speedup` eager / compiled. Without --benchmark: the tiny preset, random case, two steps each, as a smoke check
(still compiles: ~1 min on 2 cores).
"""
import dataclasses
import statistics
import time

import pytest
import torch
from _harness import bench_device

from bertfast import BertConfig, BertForPreTraining
from bertfast.data.batch import PretrainingCollator
from bertfast.train.config import TrainConfig
from bertfast.train.trainer import _optimizer, compile_for_training

ROUNDS = 3  # timed passes over the batches, alternating which provider goes first


def _batches(cfg, n, b, s, seed=0):
    col = PretrainingCollator(vocab_size=cfg.vocab_size, pad_token_id=0, mask_token_id=4, max_len=s,
                              max_predictions=max(1, round(0.15 * s)))
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        lens = torch.randint(s // 2, s + 1, (b,), generator=g).tolist()
        samples = [dict(input_ids=[2] + torch.randint(5, cfg.vocab_size, (k - 2,), generator=g).tolist() + [3],
                        len_a=k // 2, is_next=j % 2, seed=i * b + j) for j, k in enumerate(lens)]
        out.append(col(samples).model_inputs())
    return out


def _stepper(cfg, compiled):
    torch.manual_seed(0)
    model = BertForPreTraining(cfg).train()
    model.check_inputs = False
    opt = _optimizer(TrainConfig(lr=1e-4), model)  # the trainer's: fused AdamW
    fwd = compile_for_training(model) if compiled else model

    def step(batch):
        loss = fwd(**batch, detach_scores=True).loss  # as the trainer calls it
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def _builtin_batches(n, b, s):
    """The default run's data: the builtin corpus through load_data (its trained vocabulary, ~1.7k words), as the
    trainer gets it; the model's vocabulary padded to a multiple of 8 as a new run's."""
    from bertfast.data import load_data
    from bertfast.train.config import padded_vocab_size

    tokenizer, loader = load_data("builtin", batch_size=b, max_len=s)
    batches = []
    for batch in loader:
        batches.append((batch[0] if isinstance(batch, tuple) else batch).model_inputs(static_mlm=True))
        if len(batches) == n:
            break
    return padded_vocab_size(len(tokenizer)), batches


@pytest.mark.parametrize("data", ["random", "builtin"])
def test_compile_vs_eager(record, request, data):
    if bench_device().type != "cpu":
        pytest.skip("the CPU measurement; on a GPU bench_train_step's *-compile providers time torch.compile")
    timing = request.config.getoption("--benchmark")
    if not timing and data == "builtin":
        pytest.skip("the smoke check compiles one case")
    preset, b, s, n = ("mini", 16, 128, 12) if timing else ("tiny", 4, 32, 2)
    cfg = BertConfig.preset(preset)
    if data == "random":  # BERT's vocabulary (30522), random tokens
        batches = _batches(cfg, n, b, s)
    else:
        vocab, batches = _builtin_batches(n, b, s)
        cfg = dataclasses.replace(cfg, vocab_size=vocab)
    steps = {"eager": _stepper(cfg, False), "compile": _stepper(cfg, True)}
    start = time.perf_counter()
    for batch in batches:
        steps["compile"](batch)
    compile_s = time.perf_counter() - start
    steps["eager"](batches[0])  # allocator and thread-pool warm-up
    times = {name: [] for name in steps}
    for r in range(ROUNDS if timing else 1):
        for batch in batches:
            for name in (("eager", "compile") if r % 2 == 0 else ("compile", "eager")):
                t = time.perf_counter()
                steps[name](batch)
                times[name].append(time.perf_counter() - t)
    if not timing:
        return
    rows = len({int(x["unpad_indices"].shape[0]) for x in batches})
    shape = f"{preset} b{b} s{s} vocab {cfg.vocab_size}, {data} tokens, {rows} buckets"
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4, method="inclusive")
        extra = dict(compile_s=round(compile_s, 1), speedup=round(med["eager"] / med["compile"], 3)) \
            if name == "compile" else {}
        record(op="train_step_compile", mode="fwd+bwd+opt", provider=name, shape=shape, dtype="float32",
               seconds=med[name], min_s=min(ts), q1_s=q[0], q3_s=q[2], max_s=max(ts), rounds=len(ts), **extra)
