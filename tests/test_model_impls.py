"""The whole model with each op's fast impl equals the torch reference (forward and every gradient)."""
import pytest
import torch

from _utils import requires_triton, triton_device

from bertfast import BertConfig, BertForPreTraining

CFG = BertConfig(vocab_size=73, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40,
                 max_len=24, dropout=0.0, attention_dropout=0.0)


def _run(impl, unpad, device="cpu"):
    torch.manual_seed(0)
    model = BertForPreTraining(CFG, impl=impl, unpad=unpad).to(device)
    g = torch.Generator().manual_seed(1)
    b, s = 3, 13
    ids = torch.randint(1, CFG.vocab_size, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    positions = torch.tensor([[1, 5, -1], [2, 8, 3], [1, -1, -1]])
    mlm_labels = torch.where(positions >= 0, torch.randint(0, CFG.vocab_size, (b, 3), generator=g), -100)
    nsp = torch.tensor([0, 1, 1])
    out = model(*(t.to(device) for t in (ids, mask)), mlm_positions=positions.to(device),
                mlm_labels=mlm_labels.to(device), next_sentence_label=nsp.to(device))
    out.loss.backward()
    grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters()}
    return out.loss.detach().cpu(), out.prediction_scores.detach().cpu(), grads


def _compare(a, b, tol):
    torch.testing.assert_close(a[0], b[0], rtol=tol, atol=tol)
    torch.testing.assert_close(a[1], b[1], rtol=tol, atol=tol)
    for n in a[2]:
        torch.testing.assert_close(a[2][n], b[2][n], rtol=tol, atol=tol, msg=n)


@pytest.mark.parametrize("unpad", [True, False])
def test_auto_on_cpu_equals_torch(unpad):
    """On CPU, auto runs the C++ MLM gather and cross-entropy."""
    _compare(_run("auto", unpad), _run("torch", unpad), 1e-5)


def test_model_wide_impl_applies_to_the_ops_that_have_it():
    """impl="ext" (or "triton") for the whole model: those kernels where they exist, "auto" for the other ops."""
    from bertfast import ops

    assert ops.describe("cpu", "ext") == ops.describe("cpu", "auto")
    assert ops.describe("cuda", "ext") == ops.describe("cuda", "triton") == ops.describe("cuda", "auto")
    assert set(ops.describe("cuda", "auto").values()) == {"triton", "ext"}
    assert ops.op_impl("layer_norm", "ext") == "auto" and ops.op_impl("mlm_gather", "ext") == "ext"
    assert ops.op_impl("mlm_gather", "triton") == "auto" and ops.op_impl("attention", "triton") == "triton"
    _compare(_run("ext", True), _run("torch", True), 1e-5)


def _triton_tol(dev) -> float:
    return 1e-4 if dev.type == "cpu" else 2e-3  # Triton's interpreter on CPU; on a GPU its dots may use TF32


@requires_triton
@pytest.mark.parametrize("unpad", [True, False])
def test_model_wide_triton_equals_torch(unpad):
    dev = triton_device()
    _compare(_run("triton", unpad, dev), _run("torch", unpad, dev), _triton_tol(dev))


@requires_triton
@pytest.mark.parametrize("unpad", [True, False])
def test_triton_equals_torch(unpad):
    impl = {"layer_norm": "triton", "bias_gelu": "triton", "attention": "triton", "varlen_attention": "triton",
            "mlm_gather": "ext", "softmax_cross_entropy": "ext"}
    dev = triton_device()
    _compare(_run(impl, unpad, dev), _run("torch", unpad, dev), _triton_tol(dev))


@pytest.mark.gpu
@pytest.mark.parametrize("unpad", [True, False])
def test_auto_on_gpu_equals_torch(unpad):
    torch.backends.cuda.matmul.allow_tf32 = False
    _compare(_run("auto", unpad, "cuda"), _run("torch", unpad, "cuda"), 2e-3)
