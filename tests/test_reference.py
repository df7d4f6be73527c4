"""Each reference op against a float64 computation written differently (loops, explicit formulas)."""
import math

import pytest
import torch

from _utils import assert_close

from bertfast import ops, reference

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


def test_layer_norm_dropout_scales_kept_values():
    x = torch.randn(64, 32)
    w, b = torch.ones(32), torch.zeros(32)
    torch.manual_seed(3)
    out = reference.layer_norm(x, w, b, 1e-5, None, dropout_p=0.5)
    torch.manual_seed(3)
    keep = torch.rand_like(x) >= 0.5
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
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
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
