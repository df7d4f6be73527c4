"""Gradient checkpointing of the encoder layers: with dropout on, the recomputation in the backward pass replays the
same dropout masks (torch's RNG state is restored, and the Triton kernels draw their Philox seeds from it), so
losses and every gradient equal those without checkpointing."""
import os

import pytest
import torch

from bertfast import BertConfig, BertForPreTraining, BertForSequenceClassification

CFG = BertConfig(vocab_size=71, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48,
                 max_len=20, dropout=0.2, attention_dropout=0.2)
TRITON = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU needs TRITON_INTERPRET=1")


def _batch(b=3, s=14):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, CFG.vocab_size, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 5:] = 0
    positions = torch.tensor([[1, 5, 12], [2, 8, -1], [1, 3, -1]])
    mlm_labels = torch.where(positions >= 0, torch.randint(0, CFG.vocab_size, (b, 3), generator=g), -100)
    return dict(input_ids=ids, attention_mask=mask, mlm_positions=positions, mlm_labels=mlm_labels,
                next_sentence_label=torch.tensor([0, 1, 1]))


def _step(model, batch, checkpointing: bool, steps: int = 2):
    """Losses and gradients of `steps` training forwards/backwards from seed 7 (the second step starts from the RNG
    state the first one left, so a checkpointed backward that shifted the RNG stream would show)."""
    if checkpointing:
        model.gradient_checkpointing_enable()
    else:
        model.gradient_checkpointing_disable()
    model.train()
    torch.manual_seed(7)
    losses, grads = [], []
    for _ in range(steps):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return losses, grads


def _assert_same(a, b):
    for la, lb in zip(a[0], b[0]):
        assert torch.equal(la, lb), (la, lb)
    for ga, gb in zip(a[1], b[1]):
        assert ga.keys() == gb.keys()
        for n in ga:
            torch.testing.assert_close(ga[n], gb[n], rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("unpad", [True, False])
@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_checkpointing_equal_losses_and_gradients_with_dropout(impl, unpad):
    torch.manual_seed(0)
    model = BertForPreTraining(CFG, impl=impl, unpad=unpad)
    batch = _batch()
    plain = _step(model, batch, False)
    ckpt = _step(model, batch, True)
    _assert_same(ckpt, plain)
    # dropout is really on: another seed gives another loss
    torch.manual_seed(8)
    assert not torch.equal(model(**batch).loss.detach(), plain[0][0])


@TRITON
@pytest.mark.parametrize("unpad", [True, False])
def test_checkpointing_with_triton_kernels_in_interpreter(unpad):
    """The Triton LayerNorm, GELU and attention kernels draw their dropout seeds from torch's RNG: replayed too."""
    torch.manual_seed(0)
    model = BertForPreTraining(CFG, impl="triton", unpad=unpad)
    batch = _batch()
    _assert_same(_step(model, batch, True, steps=1), _step(model, batch, False, steps=1))


def test_checkpointing_classifier():
    torch.manual_seed(0)
    model = BertForSequenceClassification(CFG, num_labels=3)
    batch = _batch()
    batch = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=torch.tensor([0, 2, 1]))
    _assert_same(_step(model, batch, True), _step(model, batch, False))


def test_checkpointing_is_off_by_default_and_skipped_without_grad():
    model = BertForPreTraining(CFG)
    assert model.gradient_checkpointing is False
    model.gradient_checkpointing_enable()
    assert model.gradient_checkpointing is True
    with torch.no_grad():
        model(**_batch())  # no checkpoint (nothing to recompute) and no warning from torch.utils.checkpoint
