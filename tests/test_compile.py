"""torch.compile traces the model and its custom ops (fake kernels, autograd registrations)."""
import dataclasses

import pytest
import torch

from bertfast import BertConfig, BertForPreTraining

CFG = BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                 max_len=16, dropout=0.0, attention_dropout=0.0)


@pytest.mark.parametrize("unpad", [True, False])
def test_compiled_model_matches_eager(unpad):
    torch._dynamo.reset()
    model = BertForPreTraining(CFG, unpad=unpad)
    model.check_inputs = False
    ids = torch.randint(1, CFG.vocab_size, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    positions = torch.tensor([[1, 4], [2, -1]])
    mlm_labels = torch.tensor([[5, 6], [7, -100]])
    nsp = torch.tensor([1, 0])
    kwargs = dict(attention_mask=mask, mlm_positions=positions, mlm_labels=mlm_labels, next_sentence_label=nsp)
    eager = model(ids, **kwargs).loss
    eager.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager")
    loss = compiled(ids, **kwargs).loss
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-6, msg=n)


def _collated(lens, seed=0):
    """A batch from the collator (layout on the host, token count padded to a bucket of 3 * 16 tokens)."""
    from bertfast.data.batch import PretrainingCollator

    g = torch.Generator().manual_seed(seed)
    samples = [dict(input_ids=[2] + torch.randint(5, CFG.vocab_size, (n - 2,), generator=g).tolist() + [3],
                    len_a=n // 2, is_next=i % 2, seed=seed * 10 + i) for i, n in enumerate(lens)]
    col = PretrainingCollator(vocab_size=CFG.vocab_size, pad_token_id=0, mask_token_id=4, max_len=16,
                              max_predictions=4)
    return col(samples)


def test_forward_has_no_graph_break_with_the_collators_layout():
    """Issue 26: one graph (no import inside an op call, no host read with input checks off)."""
    torch._dynamo.reset()
    model = BertForPreTraining(dataclasses.replace(CFG, num_hidden_layers=2))
    model.check_inputs = False
    explained = torch._dynamo.explain(model)(**_collated((11, 16, 7)).model_inputs())
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def test_fullgraph_compile_does_not_recompile_within_a_bucket():
    """torch.compile(fullgraph=True, dynamic=False) of forward + backward: batches with different token counts in
    one bucket (and one width) reuse the first graph; the gradients match eager."""
    torch._dynamo.reset()
    model = BertForPreTraining(CFG)
    model.check_inputs = False
    batches = [_collated(lens, seed) for seed, lens in enumerate([(11, 16, 7), (13, 16, 7), (11, 16, 11)])]
    assert len({b.rows for b in batches}) == 1 and len({int(b.attention_mask.sum()) for b in batches}) == 3
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    compiled(**batches[0].model_inputs()).loss.backward()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for b in batches[1:]:
            model.zero_grad()
            compiled(**b.model_inputs()).loss.backward()
            got = {n: p.grad.clone() for n, p in model.named_parameters()}
            model.zero_grad()
            model(**b.model_inputs()).loss.backward()
            for n, p in model.named_parameters():
                torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_cuda_forward_is_one_graph_of_the_gpu_kernels_on_fake_cuda_tensors():
    """The CUDA path traced without a GPU: model and batch as fake tensors on `cuda` (as torch.compile sees them),
    impl auto, dropout on. Dynamo makes one graph with no break, and that graph calls the GPU impls (the Triton
    LayerNorm, bias+GELU and packed attention ops, the extension's MLM gather and cross-entropy), never the torch
    reference. The backward cannot be traced this way: autograd's engine wants a real CUDA device; the backward ops'
    fake kernels are checked by each op's opcheck test."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch._dynamo.reset()
    inputs = _collated((11, 16, 7)).model_inputs()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, torch.device("cuda"):
        model = BertForPreTraining(dataclasses.replace(CFG, num_hidden_layers=2, dropout=0.1, attention_dropout=0.1))
        inputs = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    model.check_inputs = False
    with mode:
        explained = torch._dynamo.explain(model)(**inputs)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    called = [str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    ours = {c.split(".")[1] for c in called if c.startswith("bertfast.")}
    assert ours == {"layer_norm", "bias_gelu", "attention_qkvpacked", "mlm_gather", "softmax_cross_entropy"}, ours
    assert not any(name in c for c in called for name in ("layer_norm.default", "gelu", "softmax", "bmm")
                   if not c.startswith("bertfast.")), called
