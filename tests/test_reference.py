"""Each reference op against a float64 computation written differently (loops, explicit formulas)."""
import math

import pytest
import torch

from _utils import assert_close

from bertfast import ops, padding, reference
from bertfast.kernels._launch import draw_seed

DT = [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)]


def _close(out, ref64, tol):
    # the shared rule with the float64 result rounded to out's dtype as the "same dtype" answer: within twice
    # that rounding of the truth, plus tol absolute and relative
    assert_close(out, ref64, ref64.to(out.dtype), atol=tol, rtol=tol)


@pytest.mark.parametrize("shape", [(1, 1, 8), (3, 37, 100), (2, 1023)])
@pytest.mark.parametrize("dtype, tol", DT)
def test_layer_norm(shape, dtype, tol):
    x, r = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    xb = torch.randn(shape[-1], dtype=dtype)
    w, b = torch.randn(shape[-1]), torch.randn(shape[-1])
    h = x.double() + xb.double() + r.double()
    mean = h.sum(-1, keepdim=True) / shape[-1]
    var = ((h - mean) ** 2).sum(-1, keepdim=True) / shape[-1]
    ref = (h - mean) / torch.sqrt(var + 1e-12) * w.double() + b.double()
    out = reference.layer_norm(x, w, b, 1e-12, r, x_bias=xb)
    assert out.dtype == dtype and out.shape == x.shape
    _close(out, ref, tol * 4)


def _seed_then_keep(torch_seed, shape, p):
    """The keep mask a dropout call makes right after torch.manual_seed(torch_seed): its seed is the next
    draw_seed() of the generator."""
    torch.manual_seed(torch_seed)
    return reference.dropout_keep_mask(draw_seed(), shape, p)


def test_layer_norm_dropout_scales_kept_values():
    x = torch.randn(64, 32)
    w, b = torch.ones(32), torch.zeros(32)
    torch.manual_seed(3)
    out = reference.layer_norm(x, w, b, 1e-5, None, dropout_p=0.5)
    keep = _seed_then_keep(3, x.shape, 0.5)
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(x * keep / 0.5, (32,), w, b, 1e-5))


def test_dropout_keep_rate_and_scale():
    x = torch.ones(400, 500, requires_grad=True)
    y = reference.dropout(x, 0.1)
    kept = y != 0
    rate = kept.float().mean().item()
    n = x.numel()
    assert abs(rate - 0.9) < 5 * (0.9 * 0.1 / n) ** 0.5
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.9))
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() / 0.9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_dropout_draw_contract_is_bit_exact(dtype):
    """The mask is dropout_keep_mask(seed) for the seed draw_seed() gives (one draw of torch's generator, which it
    leaves where one draw_seed leaves it), the kept values scaled by 1 / (1 - p): bit for bit, forward and
    gradient."""
    p = 0.1
    x = torch.randn(37, 50, dtype=dtype, requires_grad=True)
    g = torch.randn(37, 50, dtype=dtype)
    torch.manual_seed(11)
    y = reference.dropout(x, p)
    (gx,) = torch.autograd.grad(y, x, g)
    after = torch.rand(4)
    torch.manual_seed(11)
    seed = draw_seed()
    assert torch.equal(after, torch.rand(4))
    scaled_keep = reference.dropout_keep_mask(seed, x.shape, p).to(dtype) * (1.0 / (1.0 - p))
    assert torch.equal(y, x.detach() * scaled_keep)
    assert torch.equal(gx, g * scaled_keep)
    assert torch.equal(reference.dropout(x, p, seed=seed), y)  # a given seed: the same mask again


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
def test_dropout_hash_keeps_the_right_share_independently(p):
    """The counter hash as a random source: the keep rate is 1 - p within 5 sigma over 10**6 elements; masks of
    two seeds, neighbouring elements and elements a row apart agree as often as independent draws would; every
    seed gives another mask."""
    n = 1000 * 1000
    masks = [reference.dropout_keep_mask(s, (1000, 1000), p) for s in (0, 1, 2 ** 31 - 1)]
    q = 1.0 - p
    sigma = max((q * p / n) ** 0.5, 1e-12)
    for m in masks:
        assert abs(m.float().mean().item() - q) <= 5 * sigma + 1e-7
    if p == 0.0:
        assert all(m.all() for m in masks)
        return
    same = q * q + p * p  # P(two independent draws agree)
    sd = (same * (1 - same) / n) ** 0.5
    flat = masks[0].flatten()
    for a, b in ((masks[0], masks[1]), (masks[1], masks[2]), (flat[:-1], flat[1:]), (flat[:-1000], flat[1000:])):
        agree = (a == b).float().mean().item()
        assert abs(agree - same) < 5 * sd, (agree, same)


def test_dropout_hash_blocks_of_a_huge_tensor(monkeypatch):
    """Over 2**31 elements the counter runs per block of 2**31 with a key of its own (checked with 2**10 blocks):
    the first block is the small-tensor mask, the later ones are not copies of it."""
    small = reference.dropout_keep_mask(7, (8, 1024), 0.5)
    monkeypatch.setattr(reference, "_BLOCK_BITS", 10)
    big = reference.dropout_keep_mask(7, (8, 1024), 0.5)
    assert torch.equal(big[0], small[0])
    for i in range(1, 8):
        assert 0.35 < (big[i] == big[0]).float().mean().item() < 0.65
    assert abs(big.float().mean().item() - 0.5) < 0.03


def test_dropout_keep_mask_rejects_bad_p():
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="dropout p"):
            reference.dropout_keep_mask(0, (4,), p)


def test_attention_dropout_is_the_hash_mask_on_the_probabilities():
    """With dropout the reference attention is softmax(q k^T * scale) with the hash dropout on the probabilities
    (the seed from torch's generator), then times v; fully padded sequences stay zero; gradients are finite."""
    b, s, h, d = 3, 7, 2, 4
    q, k, v = (torch.randn(b, s, h, d, dtype=torch.float64) for _ in range(3))
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [0] * 7], dtype=torch.bool)
    torch.manual_seed(5)
    out = reference.attention(q, k, v, mask, dropout_p=0.25, softmax_scale=0.7)
    keep = _seed_then_keep(5, (b, h, s, s), 0.25)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.7
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0) * keep / 0.75
    ref = torch.einsum("bhqk,bkhd->bqhd", probs, v) * mask[:, :, None, None]
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert torch.all(out[2] == 0)
    q.requires_grad_(True)
    reference.attention(q, k, v, mask, dropout_p=0.25).sum().backward()
    assert torch.isfinite(q.grad).all() and torch.all(q.grad[2] == 0)


@pytest.mark.parametrize("dtype, tol", DT)
def test_bias_gelu(dtype, tol):
    x, bias = torch.randn(5, 37, dtype=dtype), torch.randn(37, dtype=dtype)
    h = x.double() + bias.double()
    ref = 0.5 * h * (1.0 + torch.special.erf(h / math.sqrt(2.0)))
    _close(reference.bias_gelu(x, bias), ref, tol * 2)


def _attention_loop(q, k, v, mask, scale):
    """Explicit per-sequence, per-head softmax attention in float64, over the real keys only."""
    b, s, h, d = q.shape
    out = torch.zeros(b, s, h, d, dtype=torch.float64)
    for i in range(b):
        n = int(mask[i].sum())
        keys = mask[i].nonzero().squeeze(1)
        for j in range(h):
            for t in range(s):
                if not mask[i, t]:
                    continue
                logits = [sum(q[i, t, j, c].item() * k[i, key, j, c].item() for c in range(d)) * scale
                          for key in keys.tolist()]
                m = max(logits)
                e = [math.exp(x - m) for x in logits]
                z = sum(e)
                for c in range(d):
                    out[i, t, j, c] = sum(e[u] / z * v[i, key, j, c].item() for u, key in enumerate(keys.tolist()))
        assert n == len(keys)
    return out


def test_attention_against_loop():
    b, s, h, d = 3, 7, 2, 4
    q, k, v = (torch.randn(b, s, h, d) for _ in range(3))
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [0] * 7], dtype=torch.bool)
    out = reference.attention(q, k, v, mask)
    ref = _attention_loop(q, k, v, mask, 1 / math.sqrt(d))
    _close(out, ref, 1e-5)
    assert torch.all(out[2] == 0) and not torch.isnan(out).any()  # fully padded sequence: zeros, no NaN
    q.requires_grad_(True)
    reference.attention(q, k, v, mask).sum().backward()
    assert torch.isfinite(q.grad).all() and torch.all(q.grad[2] == 0)


def test_varlen_attention_equals_padded():
    lengths = [5, 0, 9, 1]
    h, d = 2, 8
    cu = padding.cu_seqlens_from_seqlens(torch.tensor(lengths))
    q, k, v = (torch.randn(int(cu[-1]), h, d, dtype=torch.float64) for _ in range(3))
    out = reference.varlen_attention(q, k, v, cu, max(lengths), softmax_scale=0.3)
    for i, n in enumerate(lengths):
        lo = int(cu[i])
        if n == 0:
            continue
        sl = slice(lo, lo + n)
        ref = _attention_loop(q[sl][None], k[sl][None], v[sl][None], torch.ones(1, n, dtype=torch.bool), 0.3)[0]
        _close(out[sl], ref, 1e-10)


def test_mlm_gather_against_loop():
    hidden = torch.randn(3, 6, 4, requires_grad=True)
    positions = torch.tensor([[0, 5, -1], [2, 2, 1], [-1, -1, -1]])
    out = reference.mlm_gather(hidden, positions)
    assert out.shape == (9, 4)
    for i in range(3):
        for j in range(3):
            p = positions[i, j].item()
            expect = hidden[i, p] if p >= 0 else torch.zeros(4)
            assert torch.equal(out[i * 3 + j], expect)
    out.sum().backward()
    expect_grad = torch.zeros(3, 6, 4)
    expect_grad[0, 0] = expect_grad[0, 5] = expect_grad[1, 1] = 1
    expect_grad[1, 2] = 2
    assert torch.equal(hidden.grad, expect_grad)


@pytest.mark.parametrize("dtype, tol", DT)
def test_softmax_cross_entropy_against_formula(dtype, tol):
    logits = torch.randn(37, 101, dtype=dtype) * 3
    target = torch.randint(0, 101, (37,))
    target[::4] = -100
    ref = 0.0
    count = 0
    for row, t in zip(logits.double(), target.tolist()):
        if t == -100:
            continue
        ref += (torch.logsumexp(row, 0) - row[t]).item()
        count += 1
    out = reference.softmax_cross_entropy(logits, target)
    assert abs(out.item() - ref / count) <= tol * 3


def test_softmax_cross_entropy_all_ignored_is_zero():
    logits = torch.randn(4, 9, requires_grad=True)
    out = reference.softmax_cross_entropy(logits, torch.full((4,), -100))
    out.backward()
    assert out.item() == 0.0 and torch.all(logits.grad == 0)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.bias_gelu(torch.zeros(2, 4), torch.zeros(4), impl="triton")


def test_auto_on_cpu_picks_reference_and_ext():
    table = ops.describe("cpu")
    assert table["layer_norm"] == "torch" and table["attention"] == "torch"
    assert table["mlm_gather"] == "ext" and table["softmax_cross_entropy"] == "ext"
    assert ops.describe("cuda")["attention"] == "triton"


# ----------------------------------------------------------------------------------------------------------------
# Argument checks of the public ops (issue 14): the same ValueError, naming the argument, whatever the impl
# ----------------------------------------------------------------------------------------------------------------

def _qkv3(total=10, h=2, d=8):
    return tuple(torch.randn(total, h, d) for _ in range(3))


def _cu(*values):
    return torch.tensor(values, dtype=torch.int32)


VARLEN_BAD = {  # name -> (kwargs changes, expected words in the message)
    "cu_past_tokens": (dict(cu_seqlens=_cu(0, 4, 12)), r"cu_seqlens must end at most at the number of rows.*= 12"),
    "cu_not_from_0": (dict(cu_seqlens=_cu(2, 4, 10)), r"cu_seqlens must start at 0"),
    "cu_decreasing": (dict(cu_seqlens=_cu(0, 6, 4, 10)), r"cu_seqlens must be non-decreasing"),
    "cu_int64": (dict(cu_seqlens=_cu(0, 4, 10).long()), r"cu_seqlens must be int32"),
    "cu_2d": (dict(cu_seqlens=_cu(0, 4, 10)[None]), r"cu_seqlens must be 1-D"),
    "max_seqlen_short": (dict(max_seqlen=5), r"max_seqlen=5 is smaller than the longest sequence \(6 tokens"),
    "max_seqlen_float": (dict(max_seqlen=6.0), r"max_seqlen must be an int"),
    "dropout_1": (dict(dropout_p=1.0), r"dropout_p must be a number in \[0, 1\)"),
    "dropout_neg": (dict(dropout_p=-0.1), r"dropout_p"),
    "q_4d": (dict(q=torch.randn(1, 10, 2, 8)), r"q must be 3-D"),
    "k_shape": (dict(k=torch.randn(10, 2, 4)), r"k and v must have q's shape"),
    "v_dtype": (dict(v=torch.randn(10, 2, 8).half()), r"v has dtype"),
    "q_int": (dict(q=torch.zeros(10, 2, 8, dtype=torch.int32), k=torch.zeros(10, 2, 8, dtype=torch.int32),
                   v=torch.zeros(10, 2, 8, dtype=torch.int32)), r"q has dtype torch.int32"),
}


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("case", list(VARLEN_BAD))
def test_varlen_attention_rejects_bad_arguments(case, impl):
    q, k, v = _qkv3()
    args = dict(q=q, k=k, v=v, cu_seqlens=_cu(0, 4, 10), max_seqlen=6, dropout_p=0.0)
    change, match = VARLEN_BAD[case]
    args.update(change)
    with pytest.raises(ValueError, match="varlen_attention: " + match):
        ops.varlen_attention(**args, impl=impl)


def test_varlen_value_checks_always_run_on_cpu_and_can_be_skipped_on_gpu():
    q, k, v = _qkv3()
    with pytest.raises(ValueError, match="cu_seqlens must end"):  # check_values=False does not apply to CPU
        ops.varlen_attention(q, k, v, _cu(0, 4, 12), 6, check_values=False, impl="torch")
    # the opt-out plumbing, without a GPU: meta tensors stand for device tensors (reading their values fails)
    qm, km, vm = (t.to("meta") for t in (q, k, v))
    cu = _cu(0, 4, 12).to("meta")
    from bertfast.ops import _checks
    _checks.varlen_attention(qm, km, vm, cu, 6, 0.0, None, check_values=False)  # argument checks only: passes
    with pytest.raises(Exception):
        _checks.varlen_attention(qm, km, vm, cu, 6, 0.0, None, check_values=True)  # tries to read the values


ATTENTION_BAD = {
    "q_3d": (dict(q=torch.randn(6, 2, 8), k=torch.randn(6, 2, 8), v=torch.randn(6, 2, 8)), r"q must be 4-D"),
    "k_shape": (dict(k=torch.randn(2, 5, 2, 8)), r"k and v must have q's shape"),
    "mask_shape": (dict(key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), r"key_padding_mask must be \[batch"),
    "mask_float": (dict(key_padding_mask=torch.ones(2, 6)), r"key_padding_mask must be bool"),
    "dropout_1": (dict(dropout_p=1), r"dropout_p must be a number in \[0, 1\)"),
    "scale_nan": (dict(softmax_scale=float("nan")), r"softmax_scale must be"),
}


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("case", list(ATTENTION_BAD))
def test_attention_rejects_bad_arguments(case, impl):
    q, k, v = (torch.randn(2, 6, 2, 8) for _ in range(3))
    args = dict(q=q, k=k, v=v, key_padding_mask=torch.ones(2, 6, dtype=torch.bool), dropout_p=0.0)
    change, match = ATTENTION_BAD[case]
    args.update(change)
    with pytest.raises(ValueError, match="attention: " + match):
        ops.attention(**args, impl=impl)


LAYER_NORM_BAD = {
    "weight_int": (dict(weight=torch.ones(16, dtype=torch.int64)), r"weight has dtype torch.int64"),
    "weight_float64": (dict(weight=torch.ones(16, dtype=torch.float64)), r"weight has dtype torch.float64"),
    "bias_size": (dict(bias=torch.zeros(15)), r"bias must be 1-D of size 16"),
    "x_bias_size": (dict(x_bias=torch.zeros(4, 4)), r"x_bias must be 1-D of size 16"),
    "residual_shape": (dict(residual=torch.randn(3, 16)), r"residual has shape"),
    "residual_dtype": (dict(residual=torch.randn(4, 16).half()), r"residual has dtype"),
    "dropout_1": (dict(dropout_p=1.0), r"dropout_p must be a number in \[0, 1\)"),
    "eps_negative": (dict(eps=-1.0), r"eps must be"),
    "weight_none": (dict(weight=None), r"weight must be a torch.Tensor"),
}


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("case", list(LAYER_NORM_BAD))
def test_layer_norm_rejects_bad_arguments(case, impl):
    args = dict(x=torch.randn(4, 16), weight=torch.ones(16), bias=torch.zeros(16))
    change, match = LAYER_NORM_BAD[case]
    args.update(change)
    with pytest.raises(ValueError, match="layer_norm: " + match):
        ops.layer_norm(**args, impl=impl)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bias_gelu_rejects_bad_bias(impl):
    with pytest.raises(ValueError, match=r"bias_gelu: bias must be 1-D of size 16 \(x's last dim\), got shape \(15,\)"):
        ops.bias_gelu(torch.randn(4, 16), torch.zeros(15), impl=impl)
    with pytest.raises(ValueError, match=r"bias_gelu: x has dtype torch.int32"):
        ops.bias_gelu(torch.zeros(4, 16, dtype=torch.int32), torch.zeros(16), impl=impl)


def test_bias_gelu_without_bias_under_triton():
    from _utils import triton_runnable
    if not triton_runnable():
        pytest.skip("Triton cannot run here")
    x = torch.randn(3, 37)
    torch.testing.assert_close(ops.bias_gelu(x, None, impl="triton"), reference.bias_gelu(x, None))


@pytest.mark.parametrize("impl", ["torch", "ext"])
def test_mlm_gather_rejects_bad_arguments(impl):
    hidden = torch.randn(2, 9, 4)
    for positions, match in ((torch.tensor([[0, 9], [1, 2]]), r"positions\[0, 1\] = 9 is out of range"),
                             (torch.tensor([[0, 1], [-2, 2]]), r"positions\[1, 0\] = -2 is out of range"),
                             (torch.tensor([[0, 1], [1, 2]], dtype=torch.int32), r"positions must be int64"),
                             (torch.tensor([[0, 1]]), r"positions must be 2-D \[batch, P\] with batch = 2")):
        with pytest.raises(ValueError, match="mlm_gather: " + match):
            ops.mlm_gather(hidden, positions, impl=impl)
    with pytest.raises(ValueError, match=r"mlm_gather: hidden must be 3-D"):
        ops.mlm_gather(hidden[0], torch.zeros(2, 1, dtype=torch.long), impl=impl)


@pytest.mark.parametrize("impl", ["torch", "ext"])
def test_softmax_cross_entropy_rejects_bad_arguments(impl):
    logits = torch.randn(3, 5)
    for target, match in ((torch.tensor([0, 5, -100]), r"target\[1\] = 5 is out of range"),
                          (torch.tensor([0, -3, 1]), r"target\[1\] = -3 is out of range"),
                          (torch.tensor([0.0, 1.0, 2.0]), r"target must be int64"),
                          (torch.tensor([0, 1]), r"target must be 1-D \[N\] with N = 3")):
        with pytest.raises(ValueError, match="softmax_cross_entropy: " + match):
            ops.softmax_cross_entropy(logits, target, impl=impl)
    with pytest.raises(ValueError, match=r"softmax_cross_entropy: logits must be 2-D"):
        ops.softmax_cross_entropy(logits[0], torch.tensor([0]), impl=impl)


def test_one_registry_of_ops():
    """bertfast.ops' dispatch and the GPU-compile kernel list come from bertfast/ops/_registry.py: every op there
    has its public function, its reference, and a function of its name in each impl module it lists."""
    import importlib

    from bertfast.kernels import _compile
    from bertfast.ops import _registry
    names = [op.name for op in _registry.OPS]
    assert list(ops.describe("cpu")) == names
    assert _compile.KERNEL_MODULES == _registry.KERNEL_MODULES == ("layer_norm", "gelu", "attention")
    for op in _registry.OPS:
        assert callable(getattr(ops, op.name)) and callable(getattr(reference, op.name))
        assert ops.describe("cuda")[op.name] == op.gpu and ops.describe("cpu")[op.name] == op.cpu
        for impl, module in op.impls.items():
            assert callable(getattr(importlib.import_module(module), op.name)), (op.name, impl, module)
    # one namespace, one naming scheme: bertfast::<op> and bertfast::<op>_backward
    for name in ("layer_norm", "bias_gelu", "attention", "mlm_gather", "softmax_cross_entropy"):
        assert hasattr(torch.ops.bertfast, name)
    for name in ("layer_norm_backward", "bias_gelu_backward", "attention_backward", "mlm_gather_backward",
                 "softmax_cross_entropy_backward_"):
        assert hasattr(torch.ops.bertfast, name)
