"""torch.compile traces the model and its custom ops (fake kernels, autograd registrations)."""
import dataclasses

import pytest
import torch

from _utils import requires_triton, triton_device

from bertfast import BertConfig, BertForPreTraining
from bertfast.ops import reference
from bertfast.train.trainer import compile_for_training

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


def test_compiled_dropout_draws_the_eager_masks():
    """The reference dropout under --compile's inductor settings: the same output and gradient as eager for the
    same torch seed (the mask is a hash of a seed drawn from the generator), and a new mask on the next call (the
    seed is a runtime draw, not a constant of the graph)."""
    torch._dynamo.reset()
    w, b = torch.randn(48), torch.randn(48)

    def f(x, r):
        return reference.layer_norm(x, w, b, 1e-5, r, dropout_p=0.1) * reference.dropout(x, 0.3)

    compiled = compile_for_training(f)
    x = torch.randn(64, 48, requires_grad=True)
    r, g = torch.randn(64, 48), torch.randn(64, 48)
    torch.manual_seed(9)
    eager = f(x, r)
    (eager_grad,) = torch.autograd.grad(eager, x, g)
    torch.manual_seed(9)
    out = compiled(x, r)
    (grad,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-5, atol=1e-5)
    assert torch.equal(out == 0, eager == 0)  # the same dropped elements
    assert not torch.equal(compiled(x, r) == 0, out == 0)


def test_dropout_builds_no_bool_tensor():
    """No bool tensor in the dropout's graph, forward or backward, for the partitioner to save: inductor's CPU code
    stores a bool mask computed from int32 lanes one byte at a time behind a data-dependent branch (measured in the
    mini model: a third of a fused dropout + LayerNorm kernel's time; --compile went from 0.98x to 1.10x without)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(x, g):
        y = reference.layer_norm(x, torch.ones(8), torch.zeros(8), 1e-5, None, dropout_p=0.2)
        return torch.autograd.grad(y, x, g)

    graph = make_fx(step)(torch.randn(4, 8, requires_grad=True), torch.randn(4, 8))
    dtypes = {n.meta["val"].dtype for n in graph.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)}
    assert torch.int32 in dtypes and torch.bool not in dtypes, dtypes


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
    reference. The backward cannot be traced this way (autograd's engine wants a real CUDA context):
    test_gpu_impls_forward_and_backward_are_one_graph_each traces it with the same ops on CPU tensors."""
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


@requires_triton
def test_gpu_impls_forward_and_backward_are_one_graph_each():
    """The backward of the CUDA path's ops, traced where autograd can run without a GPU: impl="triton" (the Triton
    ops, run by the interpreter on CPU; the extension's ops, whose CPU and CUDA kernels share schema, fake kernels and
    autograd) under torch.compile(fullgraph=True, dynamic=False), dropout on. AOTAutograd makes one forward and one
    backward graph; the backward calls the ops' own backward kernels (LayerNorm, bias+GELU, packed attention, MLM
    gather), not autograd of the torch reference; the compiled gradients equal eager's with the same impl."""
    from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func

    torch._dynamo.reset()
    graphs = []

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs.append((kind, gm))
            return make_boxed_func(gm)
        return compiler

    def backend(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=keep("forward"), bw_compiler=keep("backward"))

    dev = triton_device()
    cfg = dataclasses.replace(CFG, num_hidden_layers=2, dropout=0.1, attention_dropout=0.1)
    model = BertForPreTraining(cfg, impl="triton").to(dev)
    model.check_inputs = False
    batch = _collated((11, 16, 7)).model_inputs()
    inputs = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    torch.manual_seed(4)
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    compiled(**inputs).loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert [k for k, _ in graphs] == ["forward", "backward"]
    called = {k: {str(n.target) for n in g.graph.nodes if n.op == "call_function"} for k, g in graphs}
    ours = {k: {c.split(".")[1] for c in v if c.startswith("bertfast.")} for k, v in called.items()}
    assert {"layer_norm", "bias_gelu", "attention_qkvpacked", "mlm_gather", "softmax_cross_entropy"} <= ours["forward"]
    assert {"layer_norm_backward", "bias_gelu_backward", "attention_backward", "mlm_gather_backward"} <= \
        ours["backward"], ours["backward"]
    reference_ops = [c for c in called["backward"] if not c.startswith("bertfast.")
                     and any(n in c for n in ("native_layer_norm", "gelu_backward", "_softmax"))]
    assert not reference_ops, reference_ops
    model.zero_grad()
    torch.manual_seed(4)
    model(**inputs).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)
