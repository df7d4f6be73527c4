"""Fused Triton attention (bertfast.kernels.attention, bertfast.ops._triton_attention) against a float64
explicit-softmax reference, forward and every gradient, padded and varlen, with and without dropout.

On CPU the kernels run in Triton's interpreter (float32 and float16; bfloat16 tl.dot is broken there, so bf16
and large shapes are marked `gpu`). Shapes stay small (batch * heads <= 6) to keep the interpreter fast.
"""
import math

import pytest
import torch
import torch.utils._python_dispatch

from _utils import LaunchRecorder, assert_close, nan_like, requires_triton, triton_device

from bertfast import ops, padding, reference
from bertfast.kernels import attention as K
from bertfast.ops import _triton_attention as T


@pytest.fixture(autouse=True)
def _poisoned_memory(nan_empty):
    """Every test here runs with uninitialised memory NaN-filled (torch.use_deterministic_algorithms +
    fill_uninitialized_memory: torch.empty returns NaN), so any element a kernel fails to write fails a test."""
    yield


def _tol32():
    """float32 comparison tolerance: exact-ish dots in the interpreter, TF32 dots on a GPU."""
    return dict(atol=5e-3, rtol=5e-3) if torch.cuda.is_available() else dict(atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------------
# The reference: explicit masked softmax (not SDPA), in the dtype of its inputs
# ------------------------------------------------------------------------------------------------------------

def ref_attention(q, k, v, mask, scale, keep=None, dropout_p=0.0):
    """q, k, v [B, S, H, D]; mask bool [B, S] (True = real); keep bool [B, H, S, S] or None.
    out[b, i] = sum_j P[b, i, j] * keep / (1 - p) * v[b, j], P = softmax over real keys; 0 at padded rows."""
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # fully padded sequence: no real key
    e = torch.exp(s - m)
    p = e / e.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)
    if keep is not None:
        p = p * keep.to(p.dtype) / (1.0 - dropout_p)
    out = torch.einsum("bhij,bjhd->bihd", p, v)
    return out * mask[:, :, None, None].to(out.dtype)


def _ref_with_grads(q, k, v, mask, scale, dout, dtype, keep=None, dropout_p=0.0):
    """(out, dq, dk, dv) of ref_attention computed in `dtype`."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = ref_attention(*leaves, mask, scale, keep, dropout_p)
    grads = torch.autograd.grad(out, leaves, dout.to(dtype))
    return (out.detach(),) + grads


def _fused_qkv(b, s, h, d, dtype, device):
    """q, k, v as the model makes them: views of one [B, S, 3, H, D] projection (non-contiguous)."""
    qkv = torch.randn(b, s, 3, h, d, device=device, dtype=torch.float32).to(dtype)
    return qkv.unbind(2)


def _lengths(b, s, generator=None):
    """Random lengths per sequence including 0 and full (the first two)."""
    lens = torch.randint(1, s + 1, (b,), generator=generator)
    lens[0] = 0
    if b > 1:
        lens[1] = s
    return lens


def _mask(lens, s, device):
    return torch.arange(s, device=device)[None, :] < lens.to(device)[:, None]


# tolerances: |kernel - ref64| <= 2 * |ref_same_dtype - ref64| + atol (flash-attention's rule), max norm
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
ATOL_TF32 = 2e-3  # float32 on a GPU: tl.dot uses TF32 (10-bit mantissa), torch's reference does not


def _atol(dtype, device):
    return ATOL_TF32 if (dtype == torch.float32 and device.type == "cuda") else ATOL[dtype]


def _assert_close_to_ref(name, got, ref64, ref_same, dtype):
    # max-norm form of the rule (the kernels' accumulation order differs from torch's), slack relative to |ref|
    assert_close(got, ref64, ref_same, atol=_atol(dtype, got.device) * max(1.0, ref64.abs().max().item()),
                 what=name, elementwise=False)


def _check_padded(b, s, h, d, dtype, lens, dropout_p=0.0, seed=0, scale=None):
    dev = triton_device()
    q, k, v = _fused_qkv(b, s, h, d, dtype, dev)
    mask = _mask(lens, s, dev)
    sc = 1.0 / math.sqrt(d) if scale is None else scale
    # launcher level, every output buffer NaN-filled so an unwritten element fails
    out = nan_like(q, q.shape)
    lse = torch.full((b, h, s), float("nan"), device=dev)
    out, lse = K.attention_forward(q, k, v, key_padding_mask=mask, dropout_p=dropout_p, softmax_scale=scale,
                                   seed=seed, out=out, lse=lse)
    dout = torch.randn(out.shape, device=dev).to(dtype)
    dq, dk, dv = (nan_like(q, q.shape) for _ in range(3))
    dq, dk, dv = K.attention_backward(dout, q, k, v, out, lse, key_padding_mask=mask, dropout_p=dropout_p,
                                      softmax_scale=scale, seed=seed, dq=dq, dk=dk, dv=dv)
    keep = K.dropout_keep_mask(seed, dropout_p, b, h, s, device=dev) if dropout_p > 0 else None
    ref64 = _ref_with_grads(q, k, v, mask, sc, dout, torch.float64, keep, dropout_p)
    same = _ref_with_grads(q, k, v, mask, sc, dout, dtype, keep, dropout_p)
    for name, got, r64, rs in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ref64, same):
        _assert_close_to_ref(name, got, r64, rs, dtype)
    # padding gives exact zeros (outputs at padded query rows, gradients of padded tokens)
    pad = ~mask
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert (t[pad] == 0).all(), f"{name} is not zero at padded tokens"
    # lse: natural-log logsumexp at real rows, +inf at padded ones
    s64 = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) * sc
    s64 = s64.masked_fill(~mask[:, None, None, :], float("-inf"))
    lse_ref = torch.logsumexp(s64, dim=-1)  # [B, H, S]
    real = mask[:, None, :].expand(b, h, s)
    torch.testing.assert_close(lse[real].double(), lse_ref[real], atol=max(1e-5, _atol(dtype, dev)), rtol=1e-3)
    assert torch.isinf(lse[~real]).all() and (lse[~real] > 0).all()
    return out, dq, dk, dv


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("seqlen", [1, 17, 100, 129])
def test_padded_matches_reference(seqlen, head_dim, dtype):
    b, h = 3, 2
    lens = _lengths(b, seqlen)
    _check_padded(b, seqlen, h, head_dim, dtype, lens)


@requires_triton
def test_all_padding_gives_zeros_not_nan():
    b, s, h, d = 2, 23, 2, 32
    _check_padded(b, s, h, d, torch.float32, torch.zeros(b, dtype=torch.int64))


@requires_triton
def test_no_mask_and_custom_scale():
    b, s, h, d = 2, 37, 2, 32
    dev = triton_device()
    q, k, v = (t.requires_grad_() for t in (torch.randn(b, s, h, d, device=dev) for _ in range(3)))
    out = T.attention(q, k, v, None, 0.0, 0.3)
    dout = torch.randn_like(out)
    got = (out,) + torch.autograd.grad(out, (q, k, v), dout)
    ref = _ref_with_grads(q, k, v, torch.ones(b, s, dtype=torch.bool, device=dev), 0.3, dout, torch.float64)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r, **_tol32())


@requires_triton
def test_head_dim_not_power_of_two():
    """head_dim 48 runs in a 64-wide block with the extra lanes masked."""
    _check_padded(2, 21, 2, 48, torch.float32, torch.tensor([13, 21]))


@requires_triton
def test_mask_with_holes():
    """A key padding mask that is not a prefix is applied exactly (keys and query rows)."""
    b, s, h, d = 2, 41, 2, 32
    dev = triton_device()
    q, k, v = _fused_qkv(b, s, h, d, torch.float32, dev)
    mask = torch.rand(b, s, device=dev) < 0.6
    mask[:, 0] = True
    out, lse = K.attention_forward(q, k, v, key_padding_mask=mask)
    dout = torch.randn_like(out)
    grads = K.attention_backward(dout, q, k, v, out, lse, key_padding_mask=mask)
    ref = _ref_with_grads(q, k, v, mask, 1 / math.sqrt(d), dout, torch.float64)
    for g, r in zip((out,) + tuple(grads), ref):
        torch.testing.assert_close(g.double(), r, **_tol32())


@requires_triton
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_varlen_equals_padded(dtype, dropout_p):
    """varlen on the unpadded tokens gives the padded result at the real tokens (output and gradients),
    including with dropout: the keep mask is indexed by positions inside each sequence."""
    b, s, h, d = 3, 70, 2, 64
    dev = triton_device()
    lens = torch.tensor([0, s, 45])
    mask = _mask(lens, s, dev)
    q, k, v = (t.detach().requires_grad_() for t in _fused_qkv(b, s, h, d, dtype, dev))
    torch.manual_seed(7)
    out_p = T.attention(q, k, v, mask, dropout_p)
    dout = torch.randn(out_p.shape, device=dev).to(dtype)
    grads_p = torch.autograd.grad(out_p, (q, k, v), dout)

    layout = padding.layout_from_mask(mask)
    ql, kl, vl = (layout.unpad(t.detach()).requires_grad_() for t in (q, k, v))
    torch.manual_seed(7)
    out_v = T.varlen_attention(ql, kl, vl, layout.cu_seqlens, s, dropout_p)
    grads_v = torch.autograd.grad(out_v, (ql, kl, vl), layout.unpad(dout))
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-3, rtol=1e-3)
    if dev.type == "cuda":
        tol = dict(atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(out_v, layout.unpad(out_p), **tol)
    for gv, gp in zip(grads_v, grads_p):
        torch.testing.assert_close(gv, layout.unpad(gp), **tol)


@requires_triton
def test_varlen_matches_project_reference():
    """Against bertfast.ops.reference.varlen_attention (the impl="torch" path) through the public dispatch."""
    dev = triton_device()
    lens = torch.tensor([5, 0, 33, 1])
    cu = padding.cu_seqlens_from_seqlens(lens.to(dev))
    total, h, d = int(lens.sum()), 2, 32
    q, k, v = (torch.randn(total, h, d, device=dev, requires_grad=True) for _ in range(3))
    out = ops.varlen_attention(q, k, v, cu, 33, impl="triton")
    ref = reference.varlen_attention(q, k, v, cu, 33)
    dout = torch.randn_like(out)
    g = torch.autograd.grad(out, (q, k, v), dout)
    gr = torch.autograd.grad(ref, (q, k, v), dout)
    torch.testing.assert_close(out, ref, **_tol32())
    for a, r in zip(g, gr):
        torch.testing.assert_close(a, r, **_tol32())


# ------------------------------------------------------------------------------------------------------------
# Bucket-padded varlen rows (issue 31): T_pad > cu_seqlens[-1]
# ------------------------------------------------------------------------------------------------------------

def _varlen_with_padding_rows(lens, s, h, d, dtype, extra, dev):
    """(q, k, v padded [B, S, H, D], mask, layout, ql, kl, vl [T + extra, H, D] leaves): the unpadded tokens
    followed by `extra` padding rows of large random values (any leak into a real row would show)."""
    q, k, v = _fused_qkv(len(lens), s, h, d, dtype, dev)
    mask = _mask(lens, s, dev)
    layout = padding.layout_from_mask(mask)
    junk = [(100 * torch.randn(extra, h, d, device=dev)).to(dtype) for _ in range(3)]
    ql, kl, vl = (torch.cat([layout.unpad(t), j]).requires_grad_() for t, j in zip((q, k, v), junk))
    return q, k, v, mask, layout, ql, kl, vl


@requires_triton
@pytest.mark.parametrize("extra", [1, 150])  # one row more; several 64-row blocks more
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_varlen_padding_rows_are_zero_and_inert(dtype, extra):
    """Real rows match the float64 reference; padding rows (t >= cu_seqlens[-1]) are exactly 0 in out, dq, dk,
    dv; lse is +inf there; all under poisoned memory (an unwritten row is NaN and fails)."""
    dev = triton_device()
    s, h, d = 40, 2, 32
    lens = torch.tensor([7, 0, 40, 23])
    q, k, v, mask, layout, ql, kl, vl = _varlen_with_padding_rows(lens, s, h, d, dtype, extra, dev)
    total = int(lens.sum())
    out = T.varlen_attention(ql, kl, vl, layout.cu_seqlens, s)
    dout = torch.randn(out.shape, device=dev).to(dtype)
    grads = torch.autograd.grad(out, (ql, kl, vl), dout)
    dout_pad = layout.pad(dout[:total])
    ref64 = _ref_with_grads(q, k, v, mask, 1 / math.sqrt(d), dout_pad, torch.float64)
    same = _ref_with_grads(q, k, v, mask, 1 / math.sqrt(d), dout_pad, dtype)
    for name, got, r64, rs in zip(("out", "dq", "dk", "dv"), (out,) + grads, ref64, same):
        assert got.shape[0] == total + extra
        _assert_close_to_ref(name, got[:total], layout.unpad(r64), layout.unpad(rs), dtype)
        assert (got[total:] == 0).all(), f"{name} is not exactly zero at padding rows"
    _, lse = K.attention_forward(ql.detach(), kl.detach(), vl.detach(), cu_seqlens=layout.cu_seqlens, max_seqlen=s)
    assert torch.isfinite(lse[:, :total]).all()
    assert torch.isinf(lse[:, total:]).all() and (lse[:, total:] > 0).all()


@requires_triton
def test_varlen_padding_rows_with_dropout_match_the_unpadded_batch():
    """With dropout too, the padded batch's real rows and their gradients equal the exact batch's (same seed)."""
    dev = triton_device()
    lens, s, h, d = torch.tensor([9, 33]), 33, 2, 16
    q, k, v, mask, layout, ql, kl, vl = _varlen_with_padding_rows(lens, s, h, d, torch.float32, 70, dev)
    total = int(lens.sum())
    exact = [t.detach()[:total].clone().requires_grad_() for t in (ql, kl, vl)]
    torch.manual_seed(5)
    out_p = T.varlen_attention(ql, kl, vl, layout.cu_seqlens, s, 0.3)
    torch.manual_seed(5)
    out_e = T.varlen_attention(*exact, layout.cu_seqlens, s, 0.3)
    dout = torch.randn(out_p.shape, device=dev)
    gp = torch.autograd.grad(out_p, (ql, kl, vl), dout)
    ge = torch.autograd.grad(out_e, exact, dout[:total])
    assert torch.equal(out_p[:total], out_e) and (out_p[total:] == 0).all()
    for a, b in zip(gp, ge):
        assert torch.equal(a[:total], b) and (a[total:] == 0).all()


# ------------------------------------------------------------------------------------------------------------
# dq, dk, dv in one [tokens, 3, heads, head_dim] buffer (issue 26)
# ------------------------------------------------------------------------------------------------------------

@requires_triton
def test_backward_writes_dq_dk_dv_into_one_packed_buffer():
    """The three gradients are the unbind(-3) views of one [T, 3, H, D] buffer (no separate allocations to be
    copied into the fused QKV gradient)."""
    dev = triton_device()
    cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=dev)
    q, k, v = (torch.randn(14, 2, 16, device=dev, requires_grad=True) for _ in range(3))
    out = T.varlen_attention(q, k, v, cu, 7)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    storage = dq.untyped_storage().data_ptr()
    assert dk.untyped_storage().data_ptr() == storage == dv.untyped_storage().data_ptr()
    assert dk.data_ptr() - dq.data_ptr() == 2 * 16 * dq.element_size()  # [T, 3, H, D]: q, k, v of a token adjacent
    assert dq.stride() == dk.stride() == dv.stride() == (3 * 2 * 16, 16, 1)


@requires_triton
@pytest.mark.parametrize("extra", [0, 3])
def test_qkvpacked_gives_the_same_qkv_weight_gradient_without_a_copy(extra):
    """qkv = linear(x).view(T, 3, H, D) as bert.py builds it: the packed op gives the same output and the same
    QKV weight / bias / input gradients as unbind + varlen_attention, and qkv's gradient is the backward op's buffer
    itself (what reaches the linear layer is not a stacked copy)."""
    dev = triton_device()
    lens, s, h, d = torch.tensor([6, 11]), 11, 2, 16
    cu = padding.cu_seqlens_from_seqlens(lens.to(dev))
    n = int(lens.sum()) + extra
    lin = torch.nn.Linear(h * d, 3 * h * d).to(dev)
    x = torch.randn(n, h * d, device=dev, requires_grad=True)
    dout = torch.randn(n, h, d, device=dev)
    results, qkv_grads, copies = [], [], []
    for packed in (False, True):
        qkv = lin(x).view(n, 3, h, d)
        qkv.register_hook(qkv_grads.append)
        out = (T.varlen_attention_qkvpacked(qkv, cu, s) if packed else T.varlen_attention(*qkv.unbind(-3), cu, s))
        with _OpLog() as log:
            results.append((out,) + torch.autograd.grad(out, (lin.weight, lin.bias, x), dout))
        copies.append([op for op in log.ops if op in ("stack", "cat", "copy_", "clone")])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(qkv_grads[1], qkv_grads[0], atol=0, rtol=0)
    assert "stack" in copies[0]  # the unpacked path: UnbindBackward stacks dq, dk, dv into a new tensor
    assert copies[1] == [], copies[1]  # the packed path copies nothing


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=requires_triton)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_public_packed_op_equals_varlen_attention(impl, dropout_p):
    """ops.varlen_attention_qkvpacked (what the unpadded model calls) is ops.varlen_attention of qkv.unbind(1):
    the same output and qkv gradient, dropout included (the same torch seed draws the same mask), bucket padding
    rows past cu_seqlens[-1] zero in the output and in the gradient."""
    dev = triton_device() if impl == "triton" else torch.device("cpu")
    cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=dev)
    base = torch.randn(15, 3, 2, 16, device=dev)
    dout = torch.randn(15, 2, 16, device=dev)
    results = []
    for packed in (False, True):
        qkv = base.clone().requires_grad_()
        torch.manual_seed(7)
        out = (ops.varlen_attention_qkvpacked(qkv, cu, 7, dropout_p, impl=impl) if packed
               else ops.varlen_attention(*qkv.unbind(1), cu, 7, dropout_p, impl=impl))
        out.backward(dout)
        results.append((out.detach(), qkv.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    out, grad = results[1]
    assert not out[12:].any() and not grad[12:].any()


def test_public_packed_op_rejects_an_unpacked_tensor():
    cu = torch.tensor([0, 4], dtype=torch.int32)
    for bad in (torch.randn(4, 2, 16), torch.randn(4, 2, 2, 16)):  # q alone; 2 instead of 3 on dim 1
        with pytest.raises(ops.OpArgumentError, match=r"varlen_attention_qkvpacked: qkv must be \[total_tokens, 3"):
            ops.varlen_attention_qkvpacked(bad, cu, 4)


@requires_triton
def test_unpadded_model_backward_stacks_no_qkv_gradient():
    """The unpadded BERT layer calls the packed op: with Triton its backward makes no stacked copy of dq/dk/dv
    (one [tokens, 3 * hidden] copy per layer saved), and the padded layout (torch impl) still works."""
    from bertfast import BertConfig, BertForPreTraining

    dev = triton_device()
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40,
                     max_len=16, dropout=0.0, attention_dropout=0.0)
    ids = torch.randint(1, 50, (2, 9), device=dev)
    mask = torch.ones(2, 9, dtype=torch.long, device=dev)
    mask[1, 6:] = 0
    model = BertForPreTraining(cfg, impl="triton", unpad=True).to(dev)
    loss = model(ids, mask, labels=torch.where(mask.bool(), ids, -100)).loss
    with _OpLog() as log:
        loss.backward()
    assert log.ops.count("attention_backward") == cfg.num_hidden_layers
    assert "stack" not in log.ops, log.ops


@requires_triton
def test_backward_builds_no_zero_filled_gradient_for_lse():
    """lse gets no gradient: the backward allocates no zero-filled [heads, T] buffer for it (issue 26)."""
    dev = triton_device()
    cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=dev)
    qkv = torch.randn(12, 3, 2, 16, device=dev, requires_grad=True)
    for out in (T.varlen_attention(*qkv.unbind(1), cu, 7), T.varlen_attention_qkvpacked(qkv, cu, 7)):
        with _OpLog() as log:
            out.sum().backward()
        assert "attention_backward" in log.ops
        assert not {"zeros", "zeros_like", "zero_", "fill_"} & set(log.ops), log.ops


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the aten op names (overload packet) that run while it is on."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------------------------------------------------------
# Dropout
# ------------------------------------------------------------------------------------------------------------

@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dropout_matches_reference_with_kernel_mask(dtype):
    """softmax * keep / (1 - p) with the kernel's own keep mask: output and all gradients."""
    b, s, h, d = 3, 50, 2, 32
    lens = torch.tensor([0, s, 29])
    _check_padded(b, s, h, d, dtype, lens, dropout_p=0.3, seed=1234)


@requires_triton
def test_dropout_same_seed_same_output_and_torch_seed_controls_it():
    b, s, h, d = 2, 33, 2, 32
    dev = triton_device()
    q, k, v = _fused_qkv(b, s, h, d, torch.float32, dev)
    mask = _mask(torch.tensor([20, 33]), s, dev)
    torch.manual_seed(3)
    o1 = T.attention(q, k, v, mask, 0.2)
    torch.manual_seed(3)
    o2 = T.attention(q, k, v, mask, 0.2)
    o3 = T.attention(q, k, v, mask, 0.2)  # the generator moved on: a different mask
    assert torch.equal(o1, o2)
    assert not torch.equal(o1, o3)
    # the op's seed is draw_seed(q.device) after torch.manual_seed: the helper's mask reproduces its output exactly
    torch.manual_seed(3)
    keep = T.dropout_keep_mask(T.draw_seed(dev), 0.2, b, h, s, device=dev)
    ref = ref_attention(q.double(), k.double(), v.double(), mask, 1 / math.sqrt(d), keep, 0.2)
    torch.testing.assert_close(o1.double(), ref, **_tol32())
    no_drop = ref_attention(q.double(), k.double(), v.double(), mask, 1 / math.sqrt(d))
    assert (o1.double() - no_drop).abs().max() > 1e-2  # dropout did something


@requires_triton
def test_dropout_seed_lives_on_the_device_and_is_never_read_by_the_host():
    """CUDA-graph readiness (issue 26): the seed is a tensor on the op's device drawn by a device op (randint), and
    forward + backward never read it back to the host (no item / _local_scalar_dense: a captured graph would bake a
    host value and replay the same mask). A step replayed with the very same host-side arguments but the device
    seed advanced in place (what a graph replay's randint does) draws a different mask; restored, the same."""
    dev = triton_device()
    cu = torch.tensor([0, 9, 30], dtype=torch.int32, device=dev)
    q, k, v = (torch.randn(30, 2, 16, device=dev, requires_grad=True) for _ in range(3))
    with _OpLog() as log:
        out = T.varlen_attention(q, k, v, cu, 21, 0.3)
        out.sum().backward()
    assert "randint" in log.ops and "attention_backward" in log.ops
    assert not {"_local_scalar_dense", "item", "nonzero"} & set(log.ops), log.ops
    seed = T.draw_seed(dev)
    assert seed.device == q.device and seed.dtype == torch.int64
    step_args = (q.detach(), k.detach(), v.detach(), None, cu, 21, 0.3, 0.25, seed)  # the captured host state
    out1, _ = T.attention_op(*step_args)
    saved = seed.clone()
    seed.copy_(T.draw_seed(dev))  # the device state advances on the device
    out2, _ = T.attention_op(*step_args)
    seed.copy_(saved)
    out3, _ = T.attention_op(*step_args)
    assert not torch.equal(out1, out2) and torch.equal(out1, out3)


@pytest.mark.gpu
def test_gpu_cuda_graph_replays_draw_fresh_dropout_masks():
    """A captured attention step replays with new masks (the seed comes from the CUDA generator's graph-safe state)."""
    dev = torch.device("cuda")
    cu = torch.tensor([0, 100, 300], dtype=torch.int32, device=dev)
    q = torch.randn(300, 4, 64, device=dev, dtype=torch.float16)
    torch.manual_seed(0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        T.varlen_attention(q, q, q, cu, 200, 0.2)  # warm-up: compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = T.varlen_attention(q, q, q, cu, 200, 0.2)
    graph.replay()
    first = out.clone()
    graph.replay()
    assert not torch.equal(first, out)


@requires_triton
def test_dropout_keep_rate_and_independence():
    p, b, h, s = 0.1, 1, 2, 200
    dev = triton_device()
    keep = K.dropout_keep_mask(99, p, b, h, s, device=dev)
    n = keep.numel()
    rate = keep.float().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(rate - (1 - p)) < 5 * sigma, f"keep rate {rate:.4f}, expected {1 - p} +- {5 * sigma:.4f}"
    # heads, rows and seeds draw different masks; the mask is not symmetric in (query, key)
    assert not torch.equal(keep[0, 0], keep[0, 1])
    assert not torch.equal(keep[0, 0], keep[0, 0].T)
    assert not torch.equal(keep, K.dropout_keep_mask(100, p, b, h, s, device=dev))
    # per-row keep rates are all plausible (no stuck rows)
    row_rate = keep.float().mean(-1)
    assert (row_rate - (1 - p)).abs().max() < 6 * math.sqrt(p * (1 - p) / s)
    # and a given (seed, p, batch, heads, max_seqlen) gives the same mask on every call
    assert torch.equal(keep, K.dropout_keep_mask(99, p, b, h, s, device=dev))


# ------------------------------------------------------------------------------------------------------------
# torch.library registration
# ------------------------------------------------------------------------------------------------------------

@requires_triton
def test_opcheck():
    dev = triton_device()
    b, s, h, d = 2, 9, 2, 32
    q, k, v = (t.detach().requires_grad_() for t in _fused_qkv(b, s, h, d, torch.float32, dev))
    mask = _mask(torch.tensor([4, 9]), s, dev)
    fwd = torch.ops.bertfast.attention.default
    torch.library.opcheck(fwd, (q, k, v, mask, None, s, 0.1, 0.3, T.draw_seed(dev)))
    layout = padding.layout_from_mask(mask)
    ql, kl, vl = (layout.unpad(t.detach()).requires_grad_() for t in (q, k, v))
    torch.library.opcheck(fwd, (ql, kl, vl, None, layout.cu_seqlens, s, 0.0, 0.3, None))
    out, lse = fwd(q.detach(), k.detach(), v.detach(), mask, None, s, 0.0, 0.3, None)
    torch.library.opcheck(torch.ops.bertfast.attention_backward.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, mask, None, s, 0.0,
                           0.3, None))


@requires_triton
def test_torch_compile_fullgraph():
    dev = triton_device()
    b, s, h, d = 2, 9, 2, 32
    q, k, v = (t.detach().requires_grad_() for t in _fused_qkv(b, s, h, d, torch.float32, dev))
    mask = _mask(torch.tensor([4, 9]), s, dev)

    def f(q, k, v):
        return T.attention(q, k, v, mask, 0.1).sum()

    torch.manual_seed(1)
    eager = f(q, k, v)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.manual_seed(1)
    got = compiled(q, k, v)
    got.backward()
    assert torch.isfinite(got) and q.grad is not None and torch.isfinite(q.grad).all()
    torch.testing.assert_close(got, eager)


def test_launch_config_choices():
    """The launch-config function: every kind/head_dim/dtype/capability gives power-of-two blocks >= 16
    (tl.dot's minimum) and the blocks the compile cases report."""
    for cap in (None, 80, 90):
        for kind in K.KINDS:
            for d in (32, 64, 80, 128):
                for dt in (torch.float16, torch.bfloat16, torch.float32):
                    cfg = K.attention_config(kind, d, dt, cap)
                    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_D"):
                        assert cfg[key] >= 16 and cfg[key] & (cfg[key] - 1) == 0, (kind, d, dt, cap, cfg)
                    assert cfg["BLOCK_D"] >= d
    names = [c["name"] for c in K.gpu_compile_cases(90)]
    assert len(names) == len(set(names))
    for kind in K.KINDS:
        for d in (32, 64, 128):
            assert any(n.startswith(f"attention_{kind}_d{d}_") for n in names)
    with pytest.raises(ValueError):
        K.attention_config("fwd", 512, torch.float16, 90)


def test_input_validation():
    q = torch.randn(2, 8, 2, 32)
    with pytest.raises(ValueError, match="same shape"):
        K.attention_forward(q, q, q[:, :4])
    with pytest.raises(TypeError, match="dtype"):
        K.attention_forward(q.double(), q.double(), q.double())
    with pytest.raises(ValueError, match="key_padding_mask"):
        K.attention_forward(q, q, q, key_padding_mask=torch.ones(2, 7, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------------------
# Launch plumbing, recorded without running a kernel: device guard, grid limits, TF32 choice
# ------------------------------------------------------------------------------------------------------------

def _launch_everything(b, s, h, d, dtype=torch.float32, dropout_p=0.1):
    """Calls every attention launcher (padded fwd/bwd, varlen fwd/bwd, the dense dropout-mask helper) on the test
    device (with LaunchRecorder's fakes in place nothing runs)."""
    dev = triton_device()
    q = torch.randn(b, s, h, d, dtype=dtype, device=dev)
    mask = torch.ones(b, s, dtype=torch.bool, device=dev)
    out, lse = K.attention_forward(q, q, q, key_padding_mask=mask, dropout_p=dropout_p, seed=1)
    K.attention_backward(q, q, q, q, out, lse, key_padding_mask=mask, dropout_p=dropout_p, seed=1)
    ql = q.reshape(b * s, h, d)
    cu = torch.arange(0, b * s + 1, s, dtype=torch.int32, device=dev)
    out, lse = K.attention_forward(ql, ql, ql, cu_seqlens=cu, max_seqlen=s)
    K.attention_backward(ql, ql, ql, ql, out, lse, cu_seqlens=cu, max_seqlen=s)
    K.dropout_keep_mask(1, dropout_p, b, h, s, device=dev)
    return q


def test_every_launch_runs_under_its_tensors_device_guard(monkeypatch):
    """Triton launches on the current CUDA device, not the tensors' (issue 15): each launch must sit inside
    _launch.device_guard(tensor) of its own tensors."""
    rec = LaunchRecorder(monkeypatch, K)
    q = _launch_everything(2, 9, 2, 16)
    kernels = {launch["kernel"] for launch in rec.launches}
    assert kernels == {"_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel",
                       "_attn_bwd_dq_kernel", "_dropout_mask_kernel", "_zero_tail_kernel"}
    for launch in rec.launches:
        assert launch["guards"] == [q.device], launch


def test_device_guard_selects_the_tensors_gpu():
    from types import SimpleNamespace

    from bertfast.kernels import _launch
    guard = _launch.device_guard(SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1  # built, not entered: no GPU needed
    assert not isinstance(_launch.device_guard(torch.zeros(1)), torch.cuda.device)


def test_grids_keep_axes_1_and_2_within_cuda_limits(monkeypatch):
    """batch * heads = 65544 > 65535 (BERT-base, a no-grad eval batch of 5462): CUDA rejects a grid axis 1 or 2 past
    65535, so every attention launch (and the dense keep-mask helper) must put batch * heads on axis 0."""
    rec = LaunchRecorder(monkeypatch, K)
    b, s, h = 5462, 3, 12
    _launch_everything(b, s, h, 16)
    # 9 attention launches + 3 padding-row fills of varlen (out, lse; the packed dq/dk/dv buffer)
    assert len(rec.launches) == 12
    for launch in rec.launches:
        grid = launch["grid"]
        assert len(grid) <= 3 and all(0 < g <= lim for g, lim in zip(grid, (2 ** 31 - 1, 65535, 65535))), launch
        if launch["kernel"] == "_zero_tail_kernel":
            continue  # a grid over token rows, not (row block, batch, head)
        cfg = launch["kwargs"]
        block = cfg.get("BLOCK_N") if launch["kernel"] == "_attn_bwd_dkdv_kernel" else cfg.get("BLOCK_M",
                                                                                               cfg.get("BLOCK"))
        programs = math.prod(grid)
        per_head = math.ceil(s / block) * (math.ceil(s / block) if launch["kernel"] == "_dropout_mask_kernel" else 1)
        assert programs == per_head * b * h, launch  # every (row block, batch, head) gets exactly one program


@pytest.mark.parametrize("setting, expect", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_fp32_dots_follow_torchs_tf32_setting(monkeypatch, setting, expect):
    """The kernels' float32 tl.dot uses TF32 exactly when torch's float32 matmuls may (issue 15: `--precision fp32`
    must mean one thing); half-precision operands are unaffected."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(setting)
    try:
        assert torch.backends.cuda.matmul.allow_tf32 == (expect == "tf32")  # the same switch, seen from torch
        assert K.dot_precision(torch.float32) == expect
        assert K.dot_precision(torch.bfloat16) == K.dot_precision(torch.float16) == "tf32"
        rec = LaunchRecorder(monkeypatch, K)
        _launch_everything(2, 9, 2, 16)
        for launch in rec.launches:
            if launch["kernel"] in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
                assert launch["kwargs"]["INPUT_PRECISION"] == expect, launch
    finally:
        torch.set_float32_matmul_precision(old)


@requires_triton
def test_fp32_full_precision_matches_reference():
    """INPUT_PRECISION="ieee" (torch's default "highest") runs and matches the float64 reference."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        _check_padded(2, 21, 2, 32, torch.float32, torch.tensor([13, 21]))
    finally:
        torch.set_float32_matmul_precision(old)


# ------------------------------------------------------------------------------------------------------------
# GPU: bfloat16, BERT and long shapes
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("seqlen", [128, 512, 1000])
def test_gpu_padded_matches_reference(seqlen, head_dim, dtype):
    b, h = 4, 3
    _check_padded(b, seqlen, h, head_dim, dtype, _lengths(b, seqlen))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_dropout_and_varlen(dtype):
    b, s, h, d = 4, 300, 4, 64
    lens = torch.tensor([0, s, 77, 200])
    _check_padded(b, s, h, d, dtype, lens, dropout_p=0.1, seed=42)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_long_sequence(head_dim):
    b, s, h = 1, 4096, 2
    _check_padded(b, s, h, head_dim, torch.bfloat16, torch.tensor([4000]))


@pytest.mark.gpu
def test_gpu_matches_sdpa_bert_shape():
    dev = torch.device("cuda")
    b, s, h, d = 8, 512, 12, 64
    q, k, v = (t.detach().requires_grad_() for t in _fused_qkv(b, s, h, d, torch.bfloat16, dev))
    lens = torch.randint(1, s + 1, (b,))
    mask = _mask(lens, s, dev)
    out = T.attention(q, k, v, mask)
    ref = reference.attention(q, k, v, mask)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
