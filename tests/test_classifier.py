"""BertForSequenceClassification against transformers' on the same weights (logits, loss, every gradient), its
weight conversions (transformers' BertModel / BertForMaskedLM / BertForPreTraining / BertForSequenceClassification,
bertfast's BertForPreTraining) and its input checks."""
import pytest
import torch

from bertfast import BertConfig, BertForPreTraining, BertForSequenceClassification
from bertfast.model.hf import convert_to_hf, export_hf, to_hf_config

transformers = pytest.importorskip("transformers")

CFG = BertConfig(vocab_size=89, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                 max_len=24, type_vocab_size=2, pad_token_idx=0)


def _randomise(model, seed):
    """Random weights everywhere (LayerNorms and biases included), so no parameter is left at its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("LayerNorm.weight") else 0.0
            p.copy_(base + (0.5 if "LayerNorm" in name else 0.05) * torch.randn(p.shape, generator=g))
    return model


def _hf(num_labels, problem_type, seed=1):
    hf = transformers.BertForSequenceClassification(to_hf_config(CFG, num_labels=num_labels,
                                                                 problem_type=problem_type))
    return _randomise(hf, seed).eval()


def _batch(b=5, s=13, seed=2):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, s + 1, (b,), generator=g)
    lengths[0] = s
    mask = (torch.arange(s)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, CFG.vocab_size, (b, s), generator=g) * mask
    types = (torch.arange(s)[None, :] >= lengths[:, None] // 2).long() * mask
    return ids, mask, types


@pytest.mark.parametrize("unpad", [True, False])
@pytest.mark.parametrize("num_labels, problem_type", [(3, "single_label_classification"), (1, "regression"),
                                                      (2, "regression")])
def test_matches_transformers(num_labels, problem_type, unpad):
    hf = _hf(num_labels, problem_type)
    ours = BertForSequenceClassification.from_hf(hf, impl="torch", unpad=unpad).eval()
    assert ours.num_labels == num_labels and ours.problem_type == problem_type and ours.fresh_parameters == []
    ids, mask, types = _batch()
    b = ids.shape[0]
    g = torch.Generator().manual_seed(3)
    if problem_type == "regression":
        labels = torch.randn((b,) if num_labels == 1 else (b, num_labels), generator=g)
    else:
        labels = torch.randint(0, num_labels, (b,), generator=g)
        labels[1] = -100  # ignored, as in transformers' CrossEntropyLoss
    ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    ref.loss.backward()
    out = ours(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    loss, logits = out  # unpacks as (loss, logits)
    loss.backward()
    assert logits.shape == (b, num_labels)
    torch.testing.assert_close(logits, ref.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, ref.loss, rtol=1e-5, atol=1e-7)
    grads = convert_to_hf({n: p.grad for n, p in ours.named_parameters()}, ours.config)
    names = [n for n, _ in hf.named_parameters()]
    assert sorted(grads) == sorted(names)
    for name, p in hf.named_parameters():
        # key biases have an exactly-zero true gradient (softmax ignores a per-row shift): float noise ~1e-11
        assert (grads[name] - p.grad).abs().max() <= 1e-5 * p.grad.abs().max() + 1e-9, name
    with torch.no_grad():
        no_labels = ours(ids, attention_mask=mask, token_type_ids=types)
    assert no_labels.loss is None and torch.equal(no_labels.logits, logits.detach())


def test_to_hf_state_dict_loads_strictly_and_exports():
    model = _randomise(BertForSequenceClassification(CFG, num_labels=4), seed=4)
    hf = transformers.BertForSequenceClassification(to_hf_config(CFG, num_labels=4))
    hf.load_state_dict(model.to_hf_state_dict(), strict=True)
    back = BertForSequenceClassification.from_hf(hf.state_dict(), config=CFG)
    assert back.num_labels == 4
    for (n, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n


def test_export_hf_folder_loads_in_transformers(tmp_path):
    model = _randomise(BertForSequenceClassification(CFG, num_labels=1), seed=5).eval()
    export_hf(model, tmp_path)
    hf = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert hf.config.num_labels == 1 and hf.config.problem_type == "regression"
    ids, mask, types = _batch()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask, types).logits,
                                   hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits,
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("source", ["BertModel", "BertForMaskedLM", "BertForPreTraining"])
@pytest.mark.parametrize("as_state_dict", [False, True])
def test_from_hf_encoders_without_classifier(source, as_state_dict):
    """The encoder weights come over; the classifier (and a BertForMaskedLM's missing pooler) keep a fresh init."""
    src = _randomise(getattr(transformers, source)(to_hf_config(CFG)), seed=6)
    model = BertForSequenceClassification.from_hf(src.state_dict() if as_state_dict else src, num_labels=3)
    fresh = {"classifier.weight", "classifier.bias"}
    if source == "BertForMaskedLM":  # transformers builds it without a pooler
        fresh |= {"pooler.weight", "pooler.bias"}
    assert set(model.fresh_parameters) == fresh and model.num_labels == 3
    bert = src if source == "BertModel" else src.bert
    theirs = convert_to_hf(model.state_dict(), model.config)
    for name, p in bert.state_dict().items():
        assert torch.equal(theirs["bert." + name], p), name
    assert model.classifier.weight.std().item() == pytest.approx(0.02, rel=0.5)


def test_from_hf_num_labels_conflict():
    hf = _hf(3, "single_label_classification")
    with pytest.raises(ValueError, match="num_labels=2 but the source's classifier has 3 labels"):
        BertForSequenceClassification.from_hf(hf, num_labels=2)


def test_from_bertfast_pretraining():
    pre = _randomise(BertForPreTraining(CFG), seed=7)
    for src in (pre, pre.state_dict()):
        kwargs = {} if src is pre else dict(config=CFG)
        model = BertForSequenceClassification.from_pretraining(src, num_labels=5, **kwargs)
        sd = model.state_dict()
        assert model.fresh_parameters == ["classifier.weight", "classifier.bias"]
        assert set(sd) == {k for k in pre.state_dict() if not k.startswith(("mlm_", "nsp"))} | {
            "classifier.weight", "classifier.bias"}
        for k, v in pre.state_dict().items():
            if k in sd:
                assert torch.equal(sd[k], v), k
    assert BertForSequenceClassification.from_hf(pre, num_labels=5).num_labels == 5
    with pytest.raises(ValueError, match="needs config="):
        BertForSequenceClassification.from_pretraining(pre.state_dict())


def test_same_encoder_as_pretraining_model():
    """The classifier's pooled vector is the pretraining model's (same weights, NSP head = classifier)."""
    pre = _randomise(BertForPreTraining(CFG, impl="torch"), seed=8).eval()
    clf = BertForSequenceClassification.from_pretraining(pre, num_labels=2, impl="torch").eval()
    with torch.no_grad():
        clf.classifier.weight.copy_(pre.nsp.weight)
        clf.classifier.bias.copy_(pre.nsp.bias)
        ids, mask, types = _batch()
        torch.testing.assert_close(clf(ids, mask, types).logits, pre(ids, mask, types).seq_relationship_score)


class TestErrors:
    def test_constructor(self):
        with pytest.raises(ValueError, match="num_labels=0"):
            BertForSequenceClassification(CFG, num_labels=0)
        with pytest.raises(ValueError, match="problem_type='multi'"):
            BertForSequenceClassification(CFG, problem_type="multi")
        with pytest.raises(ValueError, match="needs num_labels >= 2"):
            BertForSequenceClassification(CFG, num_labels=1, problem_type="single_label_classification")
        assert BertForSequenceClassification(CFG, num_labels=1).problem_type == "regression"

    def test_labels(self):
        ids, mask, _ = _batch(b=3)
        clf = BertForSequenceClassification(CFG, num_labels=3)
        with pytest.raises(ValueError, match="integer class ids"):
            clf(ids, mask, labels=torch.zeros(3))
        with pytest.raises(ValueError, match=r"labels holds 3, outside \[0, num_labels=3\)"):
            clf(ids, mask, labels=torch.tensor([0, 3, 1]))
        with pytest.raises(ValueError, match="one class id per sequence"):
            clf(ids, mask, labels=torch.tensor([0, 1]))
        reg = BertForSequenceClassification(CFG, num_labels=1)
        with pytest.raises(ValueError, match="must be floats for regression"):
            reg(ids, mask, labels=torch.tensor([0, 1, 1]))
        with pytest.raises(ValueError, match="needs 3 values"):
            reg(ids, mask, labels=torch.zeros(4))

    def test_empty_batch(self):
        with pytest.raises(ValueError, match="at least one sequence"):
            BertForSequenceClassification(CFG)(torch.zeros(0, 5, dtype=torch.long))
