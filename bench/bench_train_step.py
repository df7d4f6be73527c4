"""End-to-end training step (forward + backward + AdamW step): bertfast vs transformers.

Providers, all from the same weights (`from_hf`) on the same batches:
  bertfast-auto    impl="auto", unpadded encoder (the fast path)
  torch            bertfast impl="torch", padded encoder: the eager reference (the `vs eager` baseline)
  hf-sdpa          transformers' BertForPreTraining, attn_implementation="sdpa"
  *-compile        the same under torch.compile (GPU only by default; BERTFAST_BENCH_COMPILE=1 adds them on CPU)
Batches: lengths uniform in [S/2, S], 15% of real non-special positions masked. tokens/s counts real tokens;
TFLOP/s uses bertfast.train.flops.training_flops (real tokens, predicted MLM rows), MFU divides by the card's peak.

Targets (issue 8): CPU fp32 2 threads, mini, batch 16, seq 128: bertfast-auto >= 2.5x hf-sdpa; base, batch 8:
>= 1.4x. H100 bf16 BERT-base seq 128 batch 256: >= 1.5x hf-sdpa, >= 1.15x hf-sdpa-compile, MFU >= 45%.
"""
import os

import pytest
import torch
from _harness import bench_device, measure, peak_memory

from bertfast import BertConfig, BertForPreTraining
from bertfast.train.flops import peak_flops, training_flops
from bertfast.model.hf import to_hf_config

transformers = pytest.importorskip("transformers")

DEV = bench_device()
if DEV.type == "cuda":
    CASES = [("base", 256, 128)]
    DTYPE = torch.bfloat16
else:
    CASES = [("mini", 16, 128), ("base", 8, 128)]
    DTYPE = torch.float32
COMPILE = DEV.type == "cuda" or os.environ.get("BERTFAST_BENCH_COMPILE") == "1"
PROVIDERS = ["bertfast-auto", "torch", "hf-sdpa"] + (
    ["bertfast-auto-compile", "hf-sdpa-compile"] if COMPILE else [])


def make_batch(vocab: int, b: int, s: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(s // 2, s + 1, (b,), generator=g)
    mask = torch.arange(s)[None, :] < lengths[:, None]
    ids = torch.randint(5, vocab, (b, s), generator=g) * mask
    types = ((torch.arange(s)[None, :] >= lengths[:, None] // 2) & mask).long()
    chosen = (torch.rand(b, s, generator=g) < 0.15) & mask
    chosen[:, 0] = False
    p = max(1, int(chosen.sum(1).max()))
    positions = torch.full((b, p), -1)
    mlm_labels = torch.full((b, p), -100)
    for i in range(b):
        pos = chosen[i].nonzero().squeeze(1)
        positions[i, :len(pos)] = pos
        mlm_labels[i, :len(pos)] = ids[i, pos]
    labels = torch.full((b, s), -100)
    labels[chosen] = ids[chosen]
    nsp = torch.randint(0, 2, (b,), generator=g)
    batch = dict(input_ids=ids, attention_mask=mask.long(), token_type_ids=types, labels=labels,
                 mlm_positions=positions, mlm_labels=mlm_labels, next_sentence_label=nsp)
    return {k: v.to(DEV) for k, v in batch.items()}, lengths.tolist(), int(chosen.sum())


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("preset, batch, seqlen", CASES)
def test_train_step(benchmark, record, provider, preset, batch, seqlen):
    cfg = BertConfig.preset(preset, max_len=512)
    torch.manual_seed(0)
    hf = transformers.BertForPreTraining._from_config(to_hf_config(cfg), attn_implementation="sdpa")
    if provider.startswith("hf"):
        model = hf
    else:
        model = BertForPreTraining.from_hf(hf, impl="auto" if provider.startswith("bertfast") else "torch",
                                           unpad=provider.startswith("bertfast"))
        model.check_inputs = False
    model = model.to(DEV).train()
    inputs, seqlens, n_pred = make_batch(cfg.vocab_size, batch, seqlen)
    if provider.startswith("hf"):
        kwargs = {k: inputs[k] for k in ("input_ids", "attention_mask", "token_type_ids", "labels",
                                         "next_sentence_label")}
    else:
        kwargs = {k: inputs[k] for k in ("input_ids", "attention_mask", "token_type_ids", "mlm_positions",
                                         "mlm_labels", "next_sentence_label")}
    fwd = torch.compile(model) if provider.endswith("compile") else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # the same optimizer for every provider

    def step():
        with torch.autocast(DEV.type, dtype=DTYPE, enabled=DTYPE != torch.float32):
            loss = fwd(**kwargs)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    step()  # warm-up (and compilation) outside the timing
    peak = peak_memory(step, device=DEV)
    seconds = measure(benchmark, step, device=DEV, inner=1, rounds=10 if DEV.type == "cuda" else 3, warmup=1)
    flops = training_flops(cfg, sum(seqlens), sum(n * n for n in seqlens), n_pred, batch)
    row = record(op="train_step", mode="fwd+bwd+opt", provider=provider, shape=f"{preset} b{batch} s{seqlen}",
                 dtype=str(DTYPE).replace("torch.", ""), seconds=seconds, flops=flops, tokens=sum(seqlens),
                 peak_bytes=peak)
    if seconds and DEV.type == "cuda":
        peak_rate = peak_flops(torch.cuda.get_device_name(), "bf16")
        if peak_rate:
            row["mfu"] = flops / seconds / peak_rate
