"""The model against transformers' BertForPreTraining on the same weights, and its input checks."""
import pytest
import torch

import bertfast
from bertfast import BertConfig, BertForPreTraining
from bertfast.model.hf import convert_to_hf

transformers = pytest.importorskip("transformers")

CONFIGS = [
    dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, max_len=40),
    dict(vocab_size=211, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
         max_len=64, type_vocab_size=3, pad_token_idx=3),
]


def _hf_model(cfg: BertConfig, seed: int):
    """A transformers model with random weights everywhere (LayerNorms and biases included)."""
    from bertfast.model.hf import to_hf_config

    hf = transformers.BertForPreTraining(to_hf_config(cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            scale = 0.5 if "LayerNorm" in name else 0.05
            base = 1.0 if name.endswith("LayerNorm.weight") else 0.0
            p.copy_(base + scale * torch.randn(p.shape, generator=g))
    return hf.eval()


def _batch(cfg: BertConfig, b: int, s: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
    lengths = torch.randint(2, s + 1, (b,), generator=g)
    lengths[0] = s  # one full row
    mask = (torch.arange(s)[None, :] < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, cfg.pad_token_idx))
    types = (torch.arange(s)[None, :] >= (lengths[:, None] // 2)).long() * mask  # segment A then B
    labels = torch.full((b, s), -100)
    chosen = (torch.rand(b, s, generator=g) < 0.3) & mask.bool()
    chosen[:, 0] = False
    chosen[0, 1] = True
    labels[chosen] = torch.randint(0, cfg.vocab_size, (int(chosen.sum()),), generator=g)
    nsp = torch.randint(0, 2, (b,), generator=g)
    return ids, mask, types, labels, nsp


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("cfg_kwargs", CONFIGS)
@pytest.mark.parametrize("unpad", [True, False])
def test_matches_transformers(cfg_kwargs, unpad):
    cfg = BertConfig(**cfg_kwargs)
    hf = _hf_model(cfg, seed=1)
    ours = BertForPreTraining.from_hf(hf, impl="torch", unpad=unpad).eval()
    b, s = 4, 23
    ids, mask, types, labels, nsp = _batch(cfg, b, s, seed=2)

    # Without labels: full-sequence MLM logits (compared at real positions) and NSP logits.
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        out = ours(ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()
    assert out.prediction_scores.shape == (b, s, cfg.vocab_size)
    assert _rel(out.prediction_scores[real], ref.prediction_logits[real]) < 1e-5
    assert _rel(out.seq_relationship_score, ref.seq_relationship_logits) < 1e-5

    # With labels: the total loss and the gradient of every parameter.
    ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels, next_sentence_label=nsp)
    ref.loss.backward()
    total, scores, nsp_scores = ours(ids, attention_mask=mask, token_type_ids=types, labels=labels,
                                     next_sentence_label=nsp)
    total.backward()
    assert abs(total.item() - ref.loss.item()) <= 1e-5 * abs(ref.loss.item())
    n_pred = int((labels != -100).sum())
    assert scores.shape == (n_pred, cfg.vocab_size)
    assert _rel(scores, ref.prediction_logits[labels != -100]) < 1e-5

    grads = convert_to_hf({n: p.grad for n, p in ours.named_parameters()}, cfg)
    checked = 0
    for name, p in hf.named_parameters():
        assert p.grad is not None, name
        # key biases have an exactly-zero true gradient (softmax ignores a per-row shift): float noise ~1e-11
        assert (grads[name] - p.grad).abs().max() <= 1e-5 * p.grad.abs().max() + 1e-9, name
        checked += 1
    assert checked == len(list(hf.parameters()))


@pytest.mark.parametrize("unpad", [True, False])
def test_label_forms_agree(unpad):
    cfg = BertConfig(**CONFIGS[0])
    model = BertForPreTraining(cfg, impl="torch", unpad=unpad).eval()
    b, s = 3, 17
    ids, mask, types, labels, nsp = _batch(cfg, b, s, seed=5)
    p = 8
    positions = torch.full((b, p), -1)
    mlm_labels = torch.full((b, p), -100)
    for i in range(b):
        pos = (labels[i] != -100).nonzero().squeeze(1)[:p]
        positions[i, :len(pos)] = pos
        mlm_labels[i, :len(pos)] = labels[i, pos]
    labels = torch.where(
        torch.zeros_like(labels, dtype=torch.bool).scatter(1, positions.clamp(min=0), positions >= 0),
        labels, torch.full_like(labels, -100))
    a = model(ids, mask, types, labels=labels, next_sentence_label=nsp)
    bb = model(ids, mask, types, mlm_positions=positions, mlm_labels=mlm_labels, next_sentence_label=nsp)
    torch.testing.assert_close(a.loss, bb.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.mlm_loss, bb.mlm_loss, rtol=1e-6, atol=1e-6)
    assert bb.prediction_scores.shape == (b * p, cfg.vocab_size)
    assert torch.equal(bb.mlm_targets, mlm_labels.reshape(-1))


def test_unpadded_equals_padded_in_training_grads():
    cfg = BertConfig(**CONFIGS[0], dropout=0.0, attention_dropout=0.0)
    base = BertForPreTraining(cfg, impl="torch")
    ids, mask, types, labels, nsp = _batch(cfg, 5, 19, seed=7)
    grads = []
    for unpad in (True, False):
        base.zero_grad()
        base(ids, mask, types, labels=labels, next_sentence_label=nsp, unpad=unpad).loss.backward()
        grads.append({n: p.grad.clone() for n, p in base.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7, msg=n)


def test_hf_state_dict_roundtrip_strict():
    cfg = BertConfig(**CONFIGS[1])
    model = BertForPreTraining(cfg)
    sd = model.to_hf_state_dict()
    hf = transformers.BertForPreTraining(bertfast.model.hf.to_hf_config(cfg))
    hf.load_state_dict(sd, strict=True)
    back = BertForPreTraining.from_hf(hf.state_dict(), config=cfg)
    for (n, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n
    inferred = BertForPreTraining.from_hf(sd)  # sizes read from the tensors (heads = hidden / 64)
    assert inferred.config.num_hidden_layers == cfg.num_hidden_layers
    assert inferred.config.vocab_size == cfg.vocab_size


def test_keyword_constructor_and_presets():
    m = BertForPreTraining(vocab_size=120, type_vocab_size=2, hidden_size=64, max_len=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=96, dropout=0.1, pad_token_idx=0)
    assert m.config.hidden_size == 64 and len(m.layers) == 2
    for name, (layers, hidden) in bertfast.model.bert.PRESETS.items():
        c = BertConfig.preset(name)
        assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (
            layers, hidden, hidden // 64, 4 * hidden)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        BertConfig.preset("huge")


def test_init_follows_bert():
    m = BertForPreTraining(BertConfig.preset("mini", vocab_size=3000))
    w = m.layers[0].ffn_in.weight
    assert abs(w.std().item() - 0.02) < 0.002
    assert torch.count_nonzero(m.layers[0].ffn_in.bias) == 0
    assert torch.all(m.layers[0].attn_norm.weight == 1) and torch.count_nonzero(m.layers[0].attn_norm.bias) == 0
    assert torch.count_nonzero(m.word_embeddings.weight[m.config.pad_token_idx]) == 0


def test_output_unpacks_like_notebooks():
    cfg = BertConfig(**CONFIGS[0])
    model = BertForPreTraining(cfg, impl="torch")
    ids, mask, types, labels, nsp = _batch(cfg, 2, 9, seed=3)
    total_loss, prediction_scores, seq_relationship_score = model.forward(
        input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels, next_sentence_label=nsp)
    assert total_loss.dim() == 0 and seq_relationship_score.shape == (2, 2)
    correct = seq_relationship_score.argmax(dim=-1).eq(nsp.squeeze(-1)).sum().item()
    assert 0 <= correct <= 2


class TestErrors:
    cfg = BertConfig(**CONFIGS[0])

    def model(self):
        return BertForPreTraining(self.cfg, impl="torch")

    def test_heads_must_divide_hidden(self):
        with pytest.raises(ValueError, match="hidden_size=100 is not divisible by num_attention_heads=3"):
            BertConfig(hidden_size=100, num_attention_heads=3)

    def test_too_long(self):
        with pytest.raises(ValueError, match=r"seqlen 41 > max_len=40"):
            self.model()(torch.zeros(1, 41, dtype=torch.long))

    def test_token_id_out_of_vocab(self):
        ids = torch.zeros(2, 5, dtype=torch.long)
        ids[1, 3] = 97
        with pytest.raises(ValueError, match=r"token id 97, outside \[0, vocab_size=97\)"):
            self.model()(ids)
        ids[1, 3] = -2
        with pytest.raises(ValueError, match=r"token id -2"):
            self.model()(ids)

    def test_token_type_out_of_range(self):
        ids = torch.zeros(2, 5, dtype=torch.long)
        with pytest.raises(ValueError, match=r"token_type_ids holds 2, outside \[0, type_vocab_size=2\)"):
            self.model()(ids, token_type_ids=torch.full_like(ids, 2))

    @pytest.mark.parametrize("name", ["attention_mask", "token_type_ids", "labels"])
    def test_shape_mismatch(self, name):
        ids = torch.zeros(2, 5, dtype=torch.long)
        with pytest.raises(ValueError, match=rf"{name} has shape \(2, 4\) but input_ids has \(2, 5\)"):
            self.model()(ids, **{name: torch.zeros(2, 4, dtype=torch.long)})

    def test_label_form_mismatches(self):
        ids = torch.zeros(2, 5, dtype=torch.long)
        with pytest.raises(ValueError, match="give both or neither"):
            self.model()(ids, mlm_positions=torch.zeros(2, 3, dtype=torch.long))
        with pytest.raises(ValueError, match=r"must both be \[batch=2, P\]"):
            self.model()(ids, mlm_positions=torch.zeros(2, 3, dtype=torch.long),
                         mlm_labels=torch.zeros(2, 4, dtype=torch.long))
        with pytest.raises(ValueError, match=r"outside \[-1, seqlen=5\)"):
            self.model()(ids, mlm_positions=torch.full((2, 3), 5), mlm_labels=torch.zeros(2, 3, dtype=torch.long))
        with pytest.raises(ValueError, match="one per sequence"):
            self.model()(ids, next_sentence_label=torch.zeros(3, dtype=torch.long))

    def test_empty_batch(self):
        for shape in ((0, 5), (2, 0)):
            with pytest.raises(ValueError, match=r"a batch needs at least one sequence of at least one token"):
                self.model()(torch.zeros(shape, dtype=torch.long))

    def test_targets_on_padding(self):
        ids = torch.ones(2, 5, dtype=torch.long)
        mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
        ok = torch.tensor([[1, 2], [1, -1]])
        self.model()(ids, mask, mlm_positions=ok, mlm_labels=torch.ones_like(ok))
        with pytest.raises(ValueError, match=r"mlm_positions\[1, 0\] = 0 points at padding"):
            self.model()(ids, mask, mlm_positions=torch.tensor([[1, 2], [0, -1]]), mlm_labels=torch.ones(2, 2).long())
        labels = torch.full((2, 5), -100)
        labels[0, 4] = 3
        with pytest.raises(ValueError, match=r"labels\[0, 4\] = 3 is a target on padding"):
            self.model()(ids, mask, labels=labels)

    def test_mask_with_holes(self):
        ids = torch.ones(2, 5, dtype=torch.long)
        with pytest.raises(ValueError, match="attention_mask row 0 has padding between real tokens"):
            self.model()(ids, torch.tensor([[1, 0, 1, 1, 0], [1, 1, 1, 1, 1]]))
        with pytest.raises(ValueError, match="attention_mask must hold only 0"):
            self.model()(ids, torch.full((2, 5), 2))

    def test_bad_impl(self):
        with pytest.raises(ValueError, match="impl='cuda' is not one of"):
            bertfast.ops.layer_norm(torch.zeros(2, 4), torch.ones(4), torch.zeros(4), impl="cuda")
        with pytest.raises(ValueError, match="impl='ext' has no layer_norm"):
            bertfast.ops.layer_norm(torch.zeros(2, 4), torch.ones(4), torch.zeros(4), impl="ext")


def _left_padded(ids, mask, types, labels):
    """The same sequences with their padding moved to the left (each row rolled by its padding count)."""
    out = []
    for t in (ids, mask, types, labels):
        rows = [torch.roll(t[i], int((mask[i] == 0).sum())) for i in range(t.shape[0])]
        out.append(torch.stack(rows))
    return out


def test_left_padding_equals_right_padding_in_both_layouts():
    """Positions count from the first real token and [CLS] is the first real token, in both layouts: a left-padded
    batch gives the losses, scores and gradients of the same batch right-padded (they used to differ between the
    padded and unpadded layouts)."""
    cfg = BertConfig(**CONFIGS[0], dropout=0.0, attention_dropout=0.0)
    model = BertForPreTraining(cfg, impl="torch")
    right = _batch(cfg, 4, 15, seed=11)
    ids, mask, types, labels, nsp = right
    assert (mask == 0).any()
    left = _left_padded(ids, mask, types, labels) + [nsp]
    results = []
    for batch in (right, left):
        for unpad in (True, False):
            model.zero_grad()
            i, m, t, lab, n = batch
            out = model(i, m, t, labels=lab, next_sentence_label=n, unpad=unpad)
            out.loss.backward()
            results.append((out.loss.detach(), out.prediction_scores.detach(), out.seq_relationship_score.detach(),
                            {k: p.grad.clone() for k, p in model.named_parameters()}))
    ref = results[0]
    for res in results[1:]:
        torch.testing.assert_close(res[0], ref[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res[1], ref[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(res[2], ref[2], rtol=1e-5, atol=1e-5)
        for k in ref[3]:
            torch.testing.assert_close(res[3][k], ref[3][k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("unpad", [True, False])
def test_empty_sequence_pools_the_same_in_both_layouts(unpad):
    cfg = BertConfig(**CONFIGS[0], dropout=0.0, attention_dropout=0.0)
    model = BertForPreTraining(cfg, impl="torch").eval()
    ids, mask, types, _, _ = _batch(cfg, 3, 9, seed=4)
    mask[2] = 0
    with torch.no_grad():
        a = model(ids, mask, types, unpad=unpad).seq_relationship_score
        b = model(ids, mask, types, unpad=not unpad).seq_relationship_score
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[2], model.nsp(torch.tanh(model.pooler.bias)).detach())  # pooled from zeros


def test_hf_conversion_does_not_import_the_model():
    """bertfast.model.hf depends on bertfast.model.config only; the models import it (one direction, no cycle)."""
    import ast

    tree = ast.parse(open(bertfast.model.hf.__file__).read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "bertfast.model.bert" not in imported and "bertfast.model.config" in imported


def _spy_on_checked_ops(monkeypatch):
    """Record (op, check_values) of every call to the ops that take check_values; returns the record list."""
    from bertfast import ops

    seen = []
    for name in ("varlen_attention", "varlen_attention_qkvpacked", "mlm_gather", "softmax_cross_entropy"):
        real = getattr(ops, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen.append((_name, kwargs["check_values"]))
            return _real(*args, **kwargs)
        monkeypatch.setattr(ops, name, spy)
    return seen


@pytest.mark.parametrize("check_inputs", [True, False])
@pytest.mark.parametrize("unpad", [True, False])
@pytest.mark.parametrize("form", ["labels", "mlm_positions"])
def test_value_checks_of_the_ops_follow_check_inputs(monkeypatch, check_inputs, unpad, form):
    """The ops' device-syncing value checks (check_values) run on the user's targets and positions exactly when the
    model's check_inputs is on; the layout the model builds itself (cu_seqlens, [CLS] rows) is never re-checked.
    Both layouts (the padded one has no varlen attention) and both MLM target forms."""
    seen = _spy_on_checked_ops(monkeypatch)
    cfg = BertConfig(**CONFIGS[0])
    model = BertForPreTraining(cfg, impl="torch", unpad=unpad)
    model.check_inputs = check_inputs
    ids, mask, types, labels, nsp = _batch(cfg, 3, 11, seed=9)
    if form == "labels":
        model(ids, mask, types, labels=labels, next_sentence_label=nsp)
    else:
        positions = torch.tensor([[1, 4, -1], [1, -1, -1], [1, -1, -1]])  # real tokens (rows 1, 2 hold 2)
        mlm_labels = torch.where(positions >= 0, torch.tensor([[5, 6, 0], [7, 0, 0], [8, 0, 0]]), -100)
        model(ids, mask, types, mlm_positions=positions, mlm_labels=mlm_labels, next_sentence_label=nsp)
    own = [("varlen_attention_qkvpacked", False)] * (cfg.num_hidden_layers if unpad else 0) + [("mlm_gather", False)]
    users = [("mlm_gather", check_inputs), ("softmax_cross_entropy", check_inputs)] + [
        ("softmax_cross_entropy", check_inputs)]  # MLM positions, MLM targets, NSP labels
    assert seen == own + users


@pytest.mark.parametrize("check_inputs", [True, False])
def test_classifier_value_checks_follow_check_inputs(monkeypatch, check_inputs):
    """The classifier: its own layout and [CLS] rows unchecked, the user's class labels checked with check_inputs."""
    from bertfast import BertForSequenceClassification

    seen = _spy_on_checked_ops(monkeypatch)
    cfg = BertConfig(**CONFIGS[0])
    model = BertForSequenceClassification(cfg, num_labels=3, impl="torch")
    model.check_inputs = check_inputs
    ids, mask, types, _, _ = _batch(cfg, 3, 11, seed=9)
    model(ids, mask, types, labels=torch.tensor([0, 2, -100]))
    assert seen == ([("varlen_attention_qkvpacked", False)] * cfg.num_hidden_layers + [("mlm_gather", False)]
                    + [("softmax_cross_entropy", check_inputs)])
