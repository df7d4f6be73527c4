"""The C++/CUDA extension bertfast._C (bertfast.ops._ext): mlm_gather and the fused softmax cross-entropy,
against float64 references computed from the same inputs, forward and gradients. CUDA cases are marked `gpu`."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from _utils import assert_close

from bertfast import reference
from bertfast.ops import _ext

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# absolute slack added to the "2 x eager error" rule, per dtype (loss, gradient)
ATOL = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 1e-7), torch.float16: (2e-4, 2e-5),
        torch.bfloat16: (2e-4, 2e-4)}


def _targets(n, v, ignore_index=-100, p_ignore=0.3):
    t = torch.randint(0, v, (n,))
    t[torch.rand(n) < p_ignore] = ignore_index
    return t


def _ce_ref(x, t, ignore_index, label_smoothing=0.0):
    """loss and d loss / d x of the mean cross-entropy, computed by eager torch in x's dtype (sum / count)."""
    x = x.detach().clone().requires_grad_()
    xs = x if x.dtype != torch.float16 or x.device.type != "cpu" else x  # eager supports all dtypes on CPU
    total = F.cross_entropy(xs, t, ignore_index=ignore_index, reduction="sum", label_smoothing=label_smoothing)
    loss = total / (t != ignore_index).sum().clamp(min=1)
    loss.backward()
    return loss.detach(), x.grad


def check_ce(x, t, ignore_index=-100, label_smoothing=0.0, grad_scale=1.0):
    dtype = x.dtype
    x = x.detach().requires_grad_()
    loss = _ext.softmax_cross_entropy(x, t, ignore_index, label_smoothing)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.shape == ()
    (loss * grad_scale).backward()
    ref_loss, ref_grad = _ce_ref(x.double(), t, ignore_index, label_smoothing)
    same_loss, same_grad = _ce_ref(x, t, ignore_index, label_smoothing)
    atol_l, atol_g = ATOL[dtype]
    assert_close(loss, ref_loss, same_loss, atol=atol_l * max(1.0, ref_loss.abs().item()), what="loss",
                 check_dtype=False)
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    assert_close(x.grad, ref_grad * grad_scale, same_grad * grad_scale, atol=atol_g * abs(grad_scale), what="grad")
    return loss, x.grad


# ----------------------------------------------------------------------------------------------------------------
# softmax_cross_entropy, CPU
# ----------------------------------------------------------------------------------------------------------------

SHAPES = [(0, 7), (1, 7), (37, 7), (300, 7), (1, 1001), (37, 1001), (300, 1001), (1, 30522), (37, 30522)]


@pytest.mark.parametrize("n, v", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ce_matches_float64(n, v, dtype, nan_empty):
    x = (torch.randn(n, v, dtype=torch.float64) * 4).to(dtype)
    check_ce(x, _targets(n, v))


def test_ce_bert_vocab_300_rows_float64():
    n, v = 300, 30522
    check_ce(torch.randn(n, v, dtype=torch.float64) * 4, _targets(n, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ce_bert_vocab_300_rows(dtype):
    n, v = 300, 30522
    check_ce((torch.randn(n, v) * 4).to(dtype), _targets(n, v))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ce_all_ignored_gives_zero_not_nan(dtype, nan_empty):
    x = torch.randn(37, 1001, dtype=dtype, requires_grad=True)
    t = torch.full((37,), -100)
    loss = _ext.softmax_cross_entropy(x, t)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_ce_custom_ignore_index_and_grad_scale():
    v = 1001
    t = _targets(37, v, ignore_index=5, p_ignore=0.5)
    check_ce(torch.randn(37, v), t, ignore_index=5, grad_scale=-3.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_ce_label_smoothing(dtype):
    check_ce((torch.randn(37, 1001) * 3).to(dtype), _targets(37, 1001), label_smoothing=0.1)


def test_ce_extreme_logits():
    x = torch.randn(37, 1001) * 4
    x[0, :] = -1e4  # a row of equal very negative logits
    x[1, 3] = 1e4   # one dominant logit
    x[2, :500] = float("-inf")  # masked-out vocabulary entries
    t = _targets(37, 1001, p_ignore=0.0)
    t[2] = 700
    check_ce(x, t)


@pytest.mark.parametrize("layout", ["row_slice", "transposed", "row_stride"])
def test_ce_non_contiguous_logits(layout):
    n, v = 37, 1001
    if layout == "row_slice":      # [N, V] view of a wider buffer: row stride > V, unit column stride
        x = torch.randn(n, v + 13)[:, 3:v + 3]
    elif layout == "transposed":   # column-major
        x = torch.randn(v, n).t()
    else:                          # every other row
        x = torch.randn(2 * n, v)[::2]
    assert not x.is_contiguous()
    check_ce(x, _targets(n, v))


def test_ce_no_grad_forward_matches():
    x = torch.randn(37, 1001, requires_grad=True)
    t = _targets(37, 1001)
    with torch.no_grad():
        a = _ext.softmax_cross_entropy(x, t)
    b = _ext.softmax_cross_entropy(x.detach(), t)
    ref, _ = _ce_ref(x.double(), t, -100)
    torch.testing.assert_close(a.double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(a, b)
    assert a.grad_fn is None


def test_ce_op_without_compute_grad_still_differentiates():
    # calling the op directly with compute_grad=False: backward recomputes the gradient
    x = torch.randn(37, 1001, dtype=torch.float64, requires_grad=True)
    t = _targets(37, 1001)
    loss, _ = torch.ops.bertfast.softmax_cross_entropy(x, t, -100, 0.0, False)
    (2 * loss).backward()
    _, ref_grad = _ce_ref(x, t, -100)
    torch.testing.assert_close(x.grad, 2 * ref_grad)


def test_ce_backward_twice_raises():
    # the backward scales the forward's gradient buffer in place: a second pass would scale it twice
    x = torch.randn(37, 1001, requires_grad=True)
    loss = _ext.softmax_cross_entropy(x, _targets(37, 1001))
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()
    assert torch.equal(x.grad, first)  # the first gradient was not corrupted


def test_ce_double_backward_raises():
    x = torch.randn(37, 1001, dtype=torch.float64, requires_grad=True)
    loss = _ext.softmax_cross_entropy(x, _targets(37, 1001))
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_ce_gradient_flows_through_non_leaf_and_sum_of_losses():
    w = torch.randn(16, 1001, dtype=torch.float64, requires_grad=True)
    h = torch.randn(37, 16, dtype=torch.float64)
    t = _targets(37, 1001)
    (0.5 * _ext.softmax_cross_entropy(h @ w, t) + (w ** 2).sum()).backward()
    got = w.grad.clone()
    w.grad = None
    (0.5 * F.cross_entropy(h @ w, t) + (w ** 2).sum()).backward()
    torch.testing.assert_close(got, w.grad)


def test_ce_out_of_range_target_raises():
    x = torch.randn(5, 11)
    for bad in (11, 1000, -1, -7):
        t = torch.tensor([0, 1, 2, bad, 4])
        with pytest.raises(RuntimeError, match=rf"target\[3\] = {bad} is out of range"):
            _ext.softmax_cross_entropy(x, t)


@pytest.mark.parametrize("case", ["logits_1d", "target_float", "target_len", "smoothing"])
def test_ce_bad_inputs_raise(case):
    x, t, kw = torch.randn(5, 11), torch.tensor([0, 1, 2, 3, 4]), {}
    if case == "logits_1d":
        x, match = torch.randn(11), "logits must be"
    elif case == "target_float":
        t, match = t.float(), "target must be int64"
    elif case == "target_len":
        t, match = t[:4], "target must be"
    else:
        kw, match = {"label_smoothing": 1.5}, "label_smoothing"
    with pytest.raises(RuntimeError, match=match):
        _ext.softmax_cross_entropy(x, t, **kw)


@pytest.mark.parametrize("compute_grad", [True, False])
def test_ce_fp16_gradients_survive_a_gradscaler_scale(compute_grad):
    """fp16 logits under a GradScaler-sized loss scale: the gradient is (softmax - onehot) / count * scale rounded
    once to fp16. Stored unscaled in fp16 (before the fix), most of (softmax - onehot) / count (~1 / (V * count))
    fell below fp16's smallest subnormal and came out 0 or a few bits, whatever the scale."""
    n, v, scale = 256, 30522, 65536.0
    x = (torch.randn(n, v) * 2).half().requires_grad_()
    t = _targets(n, v, p_ignore=0.2)
    if compute_grad:
        loss = _ext.softmax_cross_entropy(x, t)
    else:  # the op called without its forward gradient: the backward recomputes it
        loss, _ = torch.ops.bertfast.softmax_cross_entropy(x, t, -100, 0.0, False)
    (loss * scale).backward()
    assert x.grad.dtype == torch.float16
    x64 = x.detach().double().requires_grad_()
    (F.cross_entropy(x64, t, reduction="sum") / (t != -100).sum() * scale).backward()
    ref = x64.grad
    err = (x.grad.double() - ref).abs()
    fp16_ulp = 2.0 ** -10 * ref.abs() + 2.0 ** -24  # one fp16 ulp of the true value (subnormal spacing below)
    assert (err <= fp16_ulp).all(), f"{int((err > fp16_ulp).sum())} gradients beyond fp16 rounding, worst {err.max()}"
    kept = t != -100
    assert (x.grad[kept] != 0).float().mean() > 0.999  # no flush to zero (ignored rows are exactly 0)
    assert torch.equal(x.grad[~kept], torch.zeros_like(x.grad[~kept]))


@pytest.mark.parametrize("dtype, grad_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float32, torch.float32), (torch.float64, torch.float64)],
                         ids=str)
def test_ce_gradient_buffer_dtype(dtype, grad_dtype):
    """The forward's gradient buffer is float32 for fp16 logits only (2 extra bytes per logit); others keep theirs."""
    x = torch.randn(5, 11, dtype=dtype)
    _, g = torch.ops.bertfast.softmax_cross_entropy(x, torch.arange(5), -100, 0.0, True)
    assert g.dtype == grad_dtype == _ext.grad_dtype(dtype)


@pytest.mark.parametrize("compute_grad", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ce_opcheck(compute_grad, dtype):
    x = torch.randn(37, 1001, dtype=dtype, requires_grad=True)
    t = _targets(37, 1001)
    torch.library.opcheck(torch.ops.bertfast.softmax_cross_entropy, (x, t, -100, 0.1, compute_grad))


def test_ce_backward_opcheck():
    torch.library.opcheck(torch.ops.bertfast.softmax_cross_entropy_backward_,
                          (torch.randn(37, 1001), torch.tensor(0.5)))


def test_ce_via_public_dispatch():
    from bertfast import ops
    x = torch.randn(37, 1001, requires_grad=True)
    t = _targets(37, 1001)
    a = ops.softmax_cross_entropy(x, t, impl="ext")
    b = ops.softmax_cross_entropy(x, t, impl="torch")
    torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------------------------
# mlm_gather, CPU
# ----------------------------------------------------------------------------------------------------------------

def _positions(b, p, s, dup=True):
    pos = torch.stack([torch.randperm(s)[:p] for _ in range(b)]) if p <= s else torch.randint(0, s, (b, p))
    pos[torch.rand(b, p) < 0.3] = -1
    if dup and p >= 3:
        pos[:, 1] = pos[:, 2] = pos[:, 0].clamp(min=0)  # duplicates accumulate in the backward
    return pos


@pytest.mark.parametrize("b, s, h, p", [(1, 1, 1, 1), (3, 37, 33, 7), (2, 128, 768, 20), (2, 5, 3, 9)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mlm_gather_matches_reference(b, s, h, p, dtype, nan_empty):
    hidden = torch.randn(b, s, h, dtype=torch.float64).to(dtype).requires_grad_()
    pos = _positions(b, p, s)
    out = _ext.mlm_gather(hidden, pos)
    assert out.shape == (b * p, h) and out.dtype == dtype
    ref = reference.mlm_gather(hidden.detach(), pos)
    assert torch.equal(out, ref)  # a copy: exact
    assert torch.all(out[(pos.reshape(-1) < 0)] == 0)
    g = torch.randn(b * p, h, dtype=torch.float64)
    out.backward(g.to(dtype))
    h64 = hidden.detach().double().requires_grad_()
    reference.mlm_gather(h64, pos).backward(g.to(dtype).double())
    hs = hidden.detach().clone().requires_grad_()
    reference.mlm_gather(hs, pos).backward(g.to(dtype))
    assert_close(hidden.grad, h64.grad, hs.grad, atol=1e-6 if dtype == torch.float64 else 1e-3, what="grad_hidden")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mlm_gather_backward_many_slots_in_one_row(dtype):
    """The model gathers from h[None]: one row holds every prediction of the batch (P = 20480 at batch 1024).
    Duplicated positions (here ~5 slots per position) sum in the backward; -1 slots give nothing."""
    s, h, p = 4096, 8, 20480
    hidden = torch.randn(1, s, h, dtype=torch.float64).to(dtype).requires_grad_()
    pos = torch.randint(-1, s, (1, p))
    g = torch.randn(p, h, dtype=torch.float64).to(dtype)
    _ext.mlm_gather(hidden, pos).backward(g)
    used = pos[0] >= 0
    expect64 = torch.zeros(s, h, dtype=torch.float64).index_add_(0, pos[0][used], g.double()[used])
    hs = hidden.detach().clone().requires_grad_()
    reference.mlm_gather(hs, pos).backward(g)
    assert_close(hidden.grad[0], expect64, hs.grad[0], atol=1e-6, what="grad_hidden")
    untouched = torch.bincount(pos[0][pos[0] >= 0], minlength=s) == 0
    assert untouched.any() and (hidden.grad[0][untouched] == 0).all()


def test_mlm_gather_non_contiguous_hidden():
    hidden = torch.randn(3, 33, 37).transpose(1, 2).requires_grad_()  # [3, 37, 33], stride(-1) != 1
    pos = _positions(3, 7, 37)
    out = _ext.mlm_gather(hidden, pos)
    torch.testing.assert_close(out, reference.mlm_gather(hidden.detach(), pos), rtol=0, atol=0)
    out.sum().backward()
    expect = torch.zeros(3, 37, 33)
    for bi in range(3):
        for pi in range(7):
            if pos[bi, pi] >= 0:
                expect[bi, pos[bi, pi]] += 1
    torch.testing.assert_close(hidden.grad, expect)


def test_mlm_gather_all_unused_and_empty():
    hidden = torch.randn(2, 9, 5, requires_grad=True)
    pos = torch.full((2, 4), -1)
    out = _ext.mlm_gather(hidden, pos)
    assert torch.equal(out, torch.zeros(8, 5))
    out.sum().backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    assert _ext.mlm_gather(hidden, torch.zeros(2, 0, dtype=torch.long)).shape == (0, 5)


@pytest.mark.parametrize("bad", [9, 100, -2])
def test_mlm_gather_out_of_range_raises(bad):
    hidden = torch.randn(2, 9, 5)
    pos = torch.tensor([[0, 1, 2], [3, bad, -1]])
    with pytest.raises(RuntimeError, match=rf"positions\[1, 1\] = {bad} is out of range"):
        _ext.mlm_gather(hidden, pos)


@pytest.mark.parametrize("case", ["int32", "batch", "rank"])
def test_mlm_gather_bad_inputs_raise(case):
    hidden, pos = torch.randn(2, 9, 5), torch.tensor([[0, 1], [2, 3]])
    if case == "int32":
        pos, match = pos.int(), "int64"
    elif case == "batch":
        pos, match = pos[:1], "batch"
    else:
        hidden, match = hidden[0], "hidden must be"
    with pytest.raises(RuntimeError, match=match):
        _ext.mlm_gather(hidden, pos)


def test_mlm_gather_opcheck():
    hidden = torch.randn(3, 37, 33, requires_grad=True)
    pos = _positions(3, 7, 37)
    torch.library.opcheck(torch.ops.bertfast.mlm_gather, (hidden, pos))
    torch.library.opcheck(torch.ops.bertfast.mlm_gather_backward, (torch.randn(21, 33), pos, 37))


def test_extension_info():
    info = _ext.extension_info()
    assert info["built"] is True
    assert info["torch"] == torch.__version__
    from bertfast import _build_info
    assert info["with_cuda"] == bool(_build_info.WITH_CUDA)


# ----------------------------------------------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("n, v", [(0, 7), (1, 7), (37, 7), (300, 1001), (37, 2049), (37, 30522), (300, 30522)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ce_cuda(n, v, dtype, nan_empty):
    x = (torch.randn(n, v, dtype=torch.float64) * 4).to(dtype).cuda()
    t = _targets(n, v).cuda()
    loss, grad = check_ce(x, t) if dtype != torch.float64 else (None, None)
    if dtype == torch.float64:  # the CUDA kernel accumulates in float32 for every dtype: float32 tolerance
        x = x.detach().requires_grad_()
        loss = _ext.softmax_cross_entropy(x, t)
        loss.backward()
        ref_loss, ref_grad = _ce_ref(x, t, -100)
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x.grad, ref_grad, atol=1e-7, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["row_slice", "transposed"])
def test_ce_cuda_non_contiguous_and_misaligned(layout):
    n, v = 37, 30522
    x = torch.randn(n, v + 13, device="cuda")[:, 3:v + 3] if layout == "row_slice" else \
        torch.randn(v, n, device="cuda").t()
    check_ce(x.to(torch.bfloat16) if layout == "row_slice" else x, _targets(n, v).cuda())


@pytest.mark.gpu
def test_ce_cuda_label_smoothing_all_ignored_and_twice():
    x = torch.randn(37, 30522, device="cuda", dtype=torch.bfloat16)
    check_ce(x, _targets(37, 30522).cuda(), label_smoothing=0.1, grad_scale=2.5)
    xi = x.detach().requires_grad_()
    loss = _ext.softmax_cross_entropy(xi, torch.full((37,), -100, device="cuda"))
    loss.backward(retain_graph=True)
    assert loss.item() == 0.0 and torch.equal(xi.grad, torch.zeros_like(xi))
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


@pytest.mark.gpu
def test_opcheck_cuda():
    x = torch.randn(37, 30522, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = _targets(37, 30522).cuda()
    torch.library.opcheck(torch.ops.bertfast.softmax_cross_entropy, (x, t, -100, 0.0, True))
    torch.library.opcheck(torch.ops.bertfast.softmax_cross_entropy_backward_,
                          (torch.randn(37, 1001, device="cuda"), torch.tensor(0.5, device="cuda")))
    hidden = torch.randn(3, 37, 33, device="cuda", requires_grad=True)
    pos = _positions(3, 7, 37).cuda()
    torch.library.opcheck(torch.ops.bertfast.mlm_gather, (hidden, pos))
    torch.library.opcheck(torch.ops.bertfast.mlm_gather_backward, (torch.randn(21, 33, device="cuda"), pos, 37))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mlm_gather_cuda(dtype, nan_empty):
    b, s, h, p = 4, 128, 771, 20  # H*es not a multiple of 16 for the 2-byte dtypes
    hidden = torch.randn(b, s, h, device="cuda", dtype=torch.float64).to(dtype).requires_grad_()
    pos = _positions(b, p, s).cuda()
    out = _ext.mlm_gather(hidden, pos)
    assert torch.equal(out, reference.mlm_gather(hidden.detach(), pos))
    g = torch.randn(b * p, h, device="cuda", dtype=dtype)
    out.backward(g)
    h64 = hidden.detach().double().requires_grad_()
    reference.mlm_gather(h64, pos).backward(g.double())
    hs = hidden.detach().clone().requires_grad_()
    reference.mlm_gather(hs, pos).backward(g)
    assert_close(hidden.grad, h64.grad, hs.grad, atol=1e-6 if dtype == torch.float64 else 1e-3, what="grad_hidden")


_ASSERT_SCRIPT = """
import torch
from bertfast.ops import _ext
{body}
torch.cuda.synchronize()
"""


@pytest.mark.gpu
@pytest.mark.parametrize("body", [
    "_ext.softmax_cross_entropy(torch.randn(4, 100, device='cuda'), torch.tensor([0, 1, 100, 2], device='cuda'))",
    "_ext.mlm_gather(torch.randn(2, 9, 5, device='cuda'), torch.tensor([[0, 9]], device='cuda').expand(2, 2))",
], ids=["ce_target", "gather_position"])
def test_cuda_out_of_range_is_a_device_assert(body):
    # a device-side assert poisons the CUDA context, so it runs in a child process
    proc = subprocess.run([sys.executable, "-c", _ASSERT_SCRIPT.format(body=body)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, CUDA_LAUNCH_BLOCKING="1"))
    assert proc.returncode != 0
    assert "assert" in proc.stderr.lower(), proc.stderr[-2000:]
