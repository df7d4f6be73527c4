"""Triton residual + LayerNorm (with fused bias + dropout) and bias + GELU: forward and every gradient against a
float64 reference; NaN-prefilled outputs; dropout mask, determinism and keep rate; input validation; opcheck and
torch.compile tracing. On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest)."""
import pytest
import torch
import torch.nn.functional as F
import triton

from _utils import LaunchRecorder, assert_close, requires_triton, triton_device

from bertfast import ops, reference
from bertfast.kernels import _launch
from bertfast.kernels import gelu as gelu_kernels
from bertfast.kernels import layer_norm as ln_kernels
from bertfast.ops import _triton_gelu as tg
from bertfast.ops import _triton_norm as tn

DEVICE = triton_device()

pytestmark = requires_triton

SHAPES = [(1, 1, 8), (3, 37, 100), (5, 768), (2, 1023), (4, 4096)]
DTYPES = [  # dtype, atol, rtol: on top of twice the error of eager torch in the same dtype
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 2e-3, 2e-3),
    (torch.bfloat16, 1e-2, 1e-2),
]
EPS = 1e-5


@pytest.fixture(autouse=True)
def _poisoned_memory(nan_empty):
    """Every test here runs with uninitialised memory NaN-filled (torch.use_deterministic_algorithms +
    fill_uninitialized_memory: torch.empty returns NaN), so any element a kernel fails to write fails a test."""
    yield


def ref_layer_norm(x, weight, bias, eps, residual, x_bias, keep, p, compute):
    """LayerNorm(dropout(x + x_bias) + residual) in `compute` dtype with an explicit keep-mask, cast to x's dtype."""
    h = x.to(compute)
    if x_bias is not None:
        h = h + x_bias.to(compute)
    if keep is not None:
        h = torch.where(keep, h * (1.0 / (1.0 - p)), torch.zeros((), dtype=compute, device=h.device))
    if residual is not None:
        h = h + residual.to(compute)
    out = F.layer_norm(h, (h.shape[-1],), weight.to(compute), bias.to(compute), eps)
    return out.to(x.dtype)


def leaves(tensors, dtype=None):
    return [None if t is None else t.detach().clone().to(dtype or t.dtype).requires_grad_() for t in tensors]


def grads(tensors):
    return [None if t is None else t.grad for t in tensors]


# ---------------------------------------------------------------------------------------------------------------
# LayerNorm
# ---------------------------------------------------------------------------------------------------------------
VARIANTS = {  # name -> (residual, x_bias, dropout_p)
    "plain": (False, False, 0.0),
    "residual": (True, False, 0.0),
    "bias_residual": (True, True, 0.0),
    "bias_dropout_residual": (True, True, 0.1),
}


def make_ln_inputs(shape, dtype, residual, x_bias, param_dtype=torch.float32):
    n = shape[-1]
    x = torch.randn(shape, device=DEVICE).to(dtype)
    w = (1 + 0.5 * torch.randn(n, device=DEVICE)).to(param_dtype)
    b = (0.5 * torch.randn(n, device=DEVICE)).to(param_dtype)
    r = torch.randn(shape, device=DEVICE).to(dtype) if residual else None
    xb = (0.5 * torch.randn(n, device=DEVICE)).to(param_dtype) if x_bias else None
    return x, w, b, r, xb


def check_layer_norm(shape, dtype, atol, rtol, residual, x_bias, p, param_dtype=torch.float32):
    x, w, b, r, xb = make_ln_inputs(shape, dtype, residual, x_bias, param_dtype)
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    inputs = [x, w, b, r, xb]
    keep = None
    torch.manual_seed(1234)
    if p > 0:
        keep = tn.dropout_keep_mask(tn.draw_seed(DEVICE), shape, p, DEVICE)
        torch.manual_seed(1234)  # layer_norm draws the same seed again

    ours = leaves(inputs)
    y = tn.layer_norm(ours[0], ours[1], ours[2], EPS, ours[3], x_bias=ours[4], dropout_p=p)
    y.backward(dy)

    r64 = leaves(inputs, torch.float64)
    y64 = ref_layer_norm(*r64[:3], EPS, r64[3], r64[4], keep, p, torch.float64)
    y64.backward(dy.double())

    same = leaves(inputs)  # eager torch on the same dtypes, computed in float32 like bertfast.ops.reference
    ys = ref_layer_norm(*same[:3], EPS, same[3], same[4], keep, p, torch.float32)
    ys.backward(dy)

    names = ["x", "weight", "bias", "residual", "x_bias"]
    assert_close(y, y64, ys, atol=atol, rtol=rtol, what="y")
    for name, g, g64, gs in zip(names, grads(ours), grads(r64), grads(same)):
        if g64 is None:
            continue
        assert g is not None, f"no gradient for {name}"
        assert_close(g, g64, gs, atol=atol, rtol=rtol, what=f"d{name}")


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_layer_norm_matches_float64(shape, dtype, atol, rtol, variant):
    residual, x_bias, p = VARIANTS[variant]
    check_layer_norm(shape, dtype, atol, rtol, residual, x_bias, p)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES[1:], ids=lambda v: str(v).replace("torch.", ""))
def test_layer_norm_half_params(dtype, atol, rtol):
    """weight / bias / x_bias in the activations' half dtype (a model cast with .to(dtype)); grads keep it."""
    check_layer_norm((3, 37, 100), dtype, atol, rtol, True, True, 0.1, param_dtype=dtype)


def test_layer_norm_widest_row():
    check_layer_norm((2, ln_kernels.MAX_WIDTH), torch.float32, 1e-5, 1e-5, True, True, 0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [768, 1024, 3000, 8192])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=lambda v: str(v).replace("torch.", ""))
def test_layer_norm_gpu_large(n, dtype, atol, rtol):
    check_layer_norm((4, 512, n), dtype, atol, rtol, True, True, 0.1)
    check_layer_norm((4, 512, n), dtype, atol, rtol, False, False, 0.0)


@pytest.mark.parametrize("variant", ["plain", "bias_dropout_residual"])
def test_layer_norm_launchers_write_every_element(variant):
    """Launchers given NaN-filled outputs must overwrite all of them (y, mean, rstd, dx, dresidual)."""
    residual, x_bias, p = VARIANTS[variant]
    shape = (3, 37, 100)
    x, w, b, r, xb = make_ln_inputs(shape, torch.float16, residual, x_bias)
    nan = float("nan")
    y = torch.full(shape, nan, dtype=x.dtype, device=DEVICE)
    mean = torch.full(shape[:-1], nan, device=DEVICE)
    rstd = torch.full(shape[:-1], nan, device=DEVICE)
    out = ln_kernels.layer_norm_fwd(x, w, b, EPS, r, xb, p, 77, out=y, mean=mean, rstd=rstd)
    assert out[0] is y
    for t in (y, mean, rstd):
        assert not t.isnan().any()
    dy = torch.randn(shape, device=DEVICE).to(x.dtype)
    dx = torch.full(shape, nan, dtype=x.dtype, device=DEVICE)
    dres = torch.full(shape, nan, dtype=x.dtype, device=DEVICE) if residual else None
    got = ln_kernels.layer_norm_bwd(dy, x, w, mean, rstd, r, xb, p, 77, dx=dx, dresidual=dres)
    assert got[0] is dx and not dx.isnan().any()
    if residual:
        assert got[1] is dres and not dres.isnan().any()
    for t in got[2:]:
        assert t is None or not t.isnan().any()


def _persistent_rows(config) -> int:
    """A row count at which config(rows)'s persistent grid has fewer programs than row tiles (each loops), with a
    last round only partly full."""
    rows = 64
    while config(rows)["grid"][0] >= triton.cdiv(rows, config(rows)["BLOCK_M"]):
        rows *= 2
    return rows + 37


def test_persistent_backward_grids_write_every_element(monkeypatch):
    """The backward grids are persistent (fewer programs than row tiles, each looping): under poisoned memory every
    element of dx and the column sums is written and right, for layer_norm (with and without dropout) and
    bias_gelu, with row counts that leave the last loop round partly empty. (One SM, to keep the interpreter's
    row counts small.)"""
    n = 16
    cap, sms = _launch.device_info(torch.empty(0, device=DEVICE))[0], 1
    for mod in (ln_kernels, gelu_kernels):
        monkeypatch.setattr(mod, "device_info", lambda t: (cap, sms))
    m = _persistent_rows(lambda rows: ln_kernels.bwd_config(rows, n, torch.float32, cap, sms, dropout=True))
    x = torch.randn(m, n, device=DEVICE)
    w, b = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
    for p in (0.0, 0.1):
        cfg = ln_kernels.bwd_config(m, n, x.dtype, cap, sms, dropout=p > 0)
        assert cfg["grid"][0] < triton.cdiv(m, cfg["BLOCK_M"])  # persistent: programs loop over row tiles
        y, mean, rstd = ln_kernels.layer_norm_fwd(x, w, b, EPS, x, None, p, 5)
        dy = torch.randn_like(x)
        dx, dres, dw, db, _ = ln_kernels.layer_norm_bwd(dy, x, w, mean, rstd, x, None, p, 5)
        keep = ln_kernels.dropout_keep_mask(5, (m, n), p, DEVICE) if p else torch.ones_like(x, dtype=torch.bool)
        leaves = [t.double().requires_grad_() for t in (x, w, b)]
        h = leaves[0] * keep / (1 - p) + leaves[0]
        ref = F.layer_norm(h, (n,), leaves[1], leaves[2], EPS)
        for got, want in zip((dx, dw, db), torch.autograd.grad(ref, leaves, dy.double())):
            assert not got.isnan().any()
            # dx here is d(dropout branch) only: the residual's share is dres
            want = want - dres.double() if got is dx else want
            torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    n = 64
    m = _persistent_rows(lambda rows: gelu_kernels.bwd_config(rows, n, torch.float32, cap, sms))
    cfg = gelu_kernels.bwd_config(m, n, x.dtype, cap, sms)
    assert cfg["grid"][0] < triton.cdiv(m, cfg["BLOCK_M"])
    xg = torch.randn(m, n, device=DEVICE, requires_grad=True)
    dy = torch.randn_like(xg)
    b = torch.randn(n, device=DEVICE)
    dx, dbias = gelu_kernels.bias_gelu_bwd(dy, xg.detach(), b)
    bl = b.clone().requires_grad_()
    want = torch.autograd.grad(F.gelu(xg + bl), (xg, bl), dy)
    torch.testing.assert_close(dx, want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dbias, want[1], atol=1e-3, rtol=1e-4)


def test_occupancy_from_registers_and_shared_memory():
    """blocks_per_sm from given register / shared-memory numbers (sm_90: 64K registers, 228 KiB shared, 64 warps,
    32 blocks per SM; registers allocated per warp in units of 256)."""
    occ = _launch.blocks_per_sm
    assert occ(90, 32, 4) == 16          # registers: 65536 / (1024 * 4) = 16; warps: 64 / 4 = 16
    assert occ(90, 40, 8) == 6           # 40 * 32 = 1280 per warp -> 65536 / (1280 * 8) = 6.4
    assert occ(90, 146, 8) == 1          # the attention backward's 146 registers: 1 block of 8 warps per SM
    assert occ(90, 64, 4, shared=100 * 1024) == 2  # shared memory: 228 KiB / (100 + 1) KiB
    assert occ(80, 64, 4, shared=100 * 1024) == 1  # sm_80: 164 KiB
    assert occ(90, 16, 1) == 32          # the per-SM block limit
    assert occ(90, 255, 16) == 1         # never 0: a kernel that launches at all runs one block per SM
    assert occ(90, None, 8) == 8         # registers unknown: the warps-only bound
    assert _launch.persistent_programs(10_000, 132, 3) == 396 and _launch.persistent_programs(7, 132, 3) == 7


@pytest.mark.parametrize("config", ["layer_norm", "gelu"])
def test_persistent_grids_follow_the_occupancy(config):
    """The persistent backward grids are one wave of SMs x resident blocks, whatever that is (no fixed 4)."""
    def grid(resident):
        if config == "layer_norm":
            return ln_kernels.bwd_config(1 << 20, 768, torch.float16, 90, 132, resident_per_sm=resident)["grid"]
        return gelu_kernels.bwd_config(1 << 20, 3072, torch.float16, 90, 132, resident_per_sm=resident)["grid"]
    cols = grid(1)[1] if config == "gelu" else 1
    for resident in (1, 2, 3, 6, 12):
        assert grid(resident)[0] * cols == pytest.approx(132 * resident, abs=cols), resident
    num_warps = (ln_kernels.bwd_config(1 << 20, 768, torch.float16, 90, 132) if config == "layer_norm"
                 else gelu_kernels.bwd_config(1 << 20, 3072, torch.float16, 90, 132))["num_warps"]
    assert grid(None)[0] * cols == pytest.approx(132 * (64 // num_warps), abs=cols)  # unknown registers: warps bound


def test_kernel_occupancy_reads_the_compiled_kernel(monkeypatch):
    """On a GPU the launchers size their grids from Triton's compiled kernel (n_regs, metadata.shared via
    `warmup`, which compiles without launching), once per configuration; off CUDA there is nothing to read."""
    from types import SimpleNamespace

    calls = []

    class FakeKernel:
        n_regs, metadata = 80, SimpleNamespace(shared=20 * 1024)

        def _init_handles(self):
            pass

    class FakeFn:
        __name__ = "fake_kernel"

        def warmup(self, *args, grid, **kwargs):
            calls.append(kwargs)
            return FakeKernel()

    monkeypatch.setattr(_launch, "_OCCUPANCY", {})
    gpu = torch.device("cuda", 0)
    got = _launch.kernel_occupancy(FakeFn(), (1, 2), {"num_warps": 4, "BLOCK_M": 8}, gpu, 90)
    assert got == _launch.blocks_per_sm(90, 80, 4, 20 * 1024) == 6   # registers: 65536 / (2560 * 4)
    assert _launch.kernel_occupancy(FakeFn(), (1, 2), {"num_warps": 4, "BLOCK_M": 8}, gpu, 90) == got
    assert len(calls) == 1  # cached per configuration
    assert _launch.kernel_occupancy(FakeFn(), (1, 2), {"num_warps": 4}, torch.device("cpu"), 90) is None


def test_layer_norm_backward_builds_no_zero_filled_gradients():
    """mean and rstd get no gradient: no zero-filled [rows] buffers in the backward (issue 26)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpLog(TorchDispatchMode):
        ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    x, w, b, r, xb = (t.requires_grad_() for t in make_ln_inputs((3, 5, 40), torch.float32, True, True))
    y = tn.layer_norm(x, w, b, EPS, r, xb, 0.1)
    with OpLog() as log:
        y.sum().backward()
    assert "layer_norm_backward" in log.ops
    assert not {"zeros", "zeros_like", "zero_", "fill_"} & set(log.ops), log.ops
    assert all(t.grad is not None for t in (x, w, b, r, xb))


def test_layer_norm_noncontiguous_inputs():
    """x, residual and dy with a non-unit row stride (a slice of a wider tensor) and a transposed leading dim."""
    base = torch.randn(6, 40, 130, device=DEVICE)
    x = base[:, :, 10:110]  # [6, 40, 100], row stride 130
    r = torch.randn(40, 6, 100, device=DEVICE).transpose(0, 1)
    w, b = torch.randn(100, device=DEVICE), torch.randn(100, device=DEVICE)
    y = tn.layer_norm(x, w, b, EPS, r)
    ref = F.layer_norm(x.double() + r.double(), (100,), w.double(), b.double(), EPS)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------------------------------------------
def test_dropout_same_seed_same_output_and_new_seed_new_output():
    x, w, b, r, xb = make_ln_inputs((4, 300), torch.float32, True, True)
    torch.manual_seed(5)
    y1 = tn.layer_norm(x, w, b, EPS, r, x_bias=xb, dropout_p=0.3)
    torch.manual_seed(5)
    y2 = tn.layer_norm(x, w, b, EPS, r, x_bias=xb, dropout_p=0.3)
    y3 = tn.layer_norm(x, w, b, EPS, r, x_bias=xb, dropout_p=0.3)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_rate(p):
    """The keep fraction of 96,000 draws is within 5 binomial standard deviations of 1 - p; masks of different
    seeds differ; rows and columns are not copies of each other."""
    shape = (96, 1000)
    keep = tn.dropout_keep_mask(123, shape, p, DEVICE)
    n = keep.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 5 * sigma, (rate, 1 - p, sigma)
    other = tn.dropout_keep_mask(124, shape, p, DEVICE)
    assert not torch.equal(keep, other)
    assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[:, 0], keep[:, 4])
    # consecutive columns (the four lanes of one Philox draw) are not correlated
    a, c = keep[:, :-1].float(), keep[:, 1:].float()
    both = (a * c).mean().item()
    assert abs(both - (1 - p) ** 2) < 6 * ((1 - p) ** 2 * (1 - (1 - p) ** 2) / n) ** 0.5


def test_dropout_p_one_drops_everything():
    x, w, b, r, xb = make_ln_inputs((3, 50), torch.float32, True, True)
    xl = x.clone().requires_grad_()
    y = tn.layer_norm(xl, w, b, EPS, r, x_bias=xb, dropout_p=1.0)
    torch.testing.assert_close(y, F.layer_norm(r, (50,), w, b, EPS), atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert torch.equal(xl.grad, torch.zeros_like(x))
    assert not tn.dropout_keep_mask(1, (3, 50), 1.0, DEVICE).any()


# ---------------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------------
def test_layer_norm_rejects_rows_past_the_limit():
    n = ln_kernels.MAX_WIDTH + 1
    x = torch.randn(2, n, device=DEVICE)
    with pytest.raises(ValueError, match=f"{ln_kernels.MAX_WIDTH}.*impl='torch'"):
        tn.layer_norm(x, torch.ones(n, device=DEVICE), torch.zeros(n, device=DEVICE))


def test_validation_messages():
    x = torch.randn(4, 16, device=DEVICE)
    w, b = torch.ones(16, device=DEVICE), torch.zeros(16, device=DEVICE)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        tn.layer_norm(x.double(), w, b)
    with pytest.raises(ValueError, match="weight must be 1-D of size 16"):
        tn.layer_norm(x, torch.ones(15, device=DEVICE), b)
    with pytest.raises(TypeError, match="residual has dtype"):
        tn.layer_norm(x, w, b, residual=x.half())
    with pytest.raises(ValueError, match="residual has shape"):
        tn.layer_norm(x, w, b, residual=x[:2])
    with pytest.raises(ValueError, match="dropout_p must be in"):
        tn.layer_norm(x, w, b, dropout_p=1.5)
    with pytest.raises(ValueError, match="bias must be 1-D of size 16"):
        tg.bias_gelu(x, torch.zeros(4, 4, device=DEVICE))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        tg.bias_gelu(x.to(torch.int32), b)


def test_configs_are_what_the_launchers_use():
    """The launch-configuration functions cover widths 1..MAX_WIDTH and give whole-row blocks."""
    for n in (1, 3, 100, 768, 1023, 1024, 4096, ln_kernels.MAX_WIDTH):
        f = ln_kernels.fwd_config(16384, n, torch.bfloat16, 90)
        bw = ln_kernels.bwd_config(16384, n, torch.bfloat16, 90)
        assert f["BLOCK_N"] >= n and bw["BLOCK_N"] >= n and f["BLOCK_N"] == bw["BLOCK_N"]
        assert f["grid"][0] * f["BLOCK_M"] >= 16384 and bw["grid"][0] >= 1
    g = gelu_kernels.bwd_config(16384, 3072, torch.bfloat16, 90)
    assert g["grid"][1] * g["BLOCK_N"] >= 3072
    for mod in (ln_kernels, gelu_kernels):
        for case in mod.gpu_compile_cases(90):
            assert set(case) >= {"name", "fn", "signature", "constexprs", "num_warps", "num_stages", "uses_mma",
                                 "bytes", "flops"}
            assert all(case["signature"][k] == "constexpr" for k in case["constexprs"])


def test_every_launch_runs_under_its_tensors_device_guard(monkeypatch):
    """Triton launches on the current CUDA device, not the tensors' (issue 15): every LayerNorm / bias+GELU launch
    (forward, backward, the keep-mask helper) must sit inside _launch.device_guard of its own tensors."""
    rec = LaunchRecorder(monkeypatch, ln_kernels, gelu_kernels)
    x, w, b, r, xb = make_ln_inputs((3, 40), torch.float32, True, True)
    y, mean, rstd = ln_kernels.layer_norm_fwd(x, w, b, EPS, r, xb, 0.1, 7)
    ln_kernels.layer_norm_bwd(y, x, w, mean, rstd, r, xb, 0.1, 7)
    ln_kernels.dropout_keep_mask(7, (3, 40), 0.1, DEVICE)
    gelu_kernels.bias_gelu_fwd(x, xb)
    gelu_kernels.bias_gelu_bwd(x, x, xb)
    assert [launch["kernel"] for launch in rec.launches] == [
        "_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel", "_dropout_mask_kernel", "_bias_gelu_fwd_kernel",
        "_bias_gelu_bwd_kernel"]
    for launch in rec.launches:
        assert launch["guards"] == [x.device], launch


# ---------------------------------------------------------------------------------------------------------------
# bias + GELU
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bias_gelu_matches_float64(shape, dtype, atol, rtol):
    n = shape[-1]
    x = (2 * torch.randn(shape, device=DEVICE)).to(dtype)
    bias = torch.randn(n, device=DEVICE)
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    ours, r64, same = leaves([x, bias]), leaves([x, bias], torch.float64), leaves([x, bias])
    y = tg.bias_gelu(*ours)
    y.backward(dy)
    y64 = F.gelu(r64[0] + r64[1])
    y64.backward(dy.double())
    ys = reference.bias_gelu(*same)
    ys.backward(dy)
    assert_close(y, y64, ys, atol=atol, rtol=rtol, what="y")
    for name, g, g64, gs in zip(["x", "bias"], grads(ours), grads(r64), grads(same)):
        assert_close(g, g64, gs, atol=atol, rtol=rtol, what=f"d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("n", [3072, 4096, 1000])
def test_bias_gelu_gpu_large(n, dtype, atol, rtol):
    test_bias_gelu_matches_float64((8, 512, n), dtype, atol, rtol)


def test_bias_gelu_launchers_write_every_element():
    shape = (3, 37, 100)
    x = torch.randn(shape, device=DEVICE).half()
    bias = torch.randn(100, device=DEVICE)
    y = torch.full(shape, float("nan"), dtype=x.dtype, device=DEVICE)
    assert gelu_kernels.bias_gelu_fwd(x, bias, out=y) is y and not y.isnan().any()
    dx = torch.full(shape, float("nan"), dtype=x.dtype, device=DEVICE)
    got, dbias = gelu_kernels.bias_gelu_bwd(torch.randn_like(x), x, bias, dx=dx)
    assert got is dx and not dx.isnan().any() and not dbias.isnan().any()


# ---------------------------------------------------------------------------------------------------------------
# torch.library: opcheck, dispatch, torch.compile
# ---------------------------------------------------------------------------------------------------------------
def test_opcheck_layer_norm():
    x, w, b, r, xb = make_ln_inputs((3, 5, 40), torch.float32, True, True)
    seed = torch.tensor(99, dtype=torch.int64, device=DEVICE)  # draw_seed()'s contract: 0-dim int64 on x's device
    args = [t.requires_grad_() for t in (x, w, b, r, xb)]
    torch.library.opcheck(torch.ops.bertfast.layer_norm.default,
                          (*args[:3], args[3], args[4], seed, EPS, 0.1))
    torch.library.opcheck(torch.ops.bertfast.layer_norm.default,
                          (*args[:3], None, None, None, EPS, 0.0))
    y, mean, rstd = tn.layer_norm_op(x.detach(), w.detach(), b.detach(), r.detach(), xb.detach(), seed, EPS, 0.1)
    dy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.bertfast.layer_norm_backward.default,
                          (dy, x.detach(), w.detach(), mean, rstd, r.detach(), xb.detach(), seed, 0.1, True))


def test_opcheck_bias_gelu():
    x = torch.randn(3, 5, 40, requires_grad=True)
    bias = torch.randn(40, requires_grad=True)
    torch.library.opcheck(torch.ops.bertfast.bias_gelu.default, (x, bias))
    torch.library.opcheck(torch.ops.bertfast.bias_gelu_backward.default,
                          (torch.randn(3, 5, 40), x.detach(), bias.detach()))


def test_dispatch_through_bertfast_ops():
    x, w, b, r, xb = make_ln_inputs((2, 7, 64), torch.float32, True, True)
    y = ops.layer_norm(x, w, b, EPS, r, x_bias=xb, impl="triton")
    torch.testing.assert_close(y, reference.layer_norm(x, w, b, EPS, r, x_bias=xb), atol=1e-5, rtol=1e-5)
    g = ops.bias_gelu(x, xb, impl="triton")
    torch.testing.assert_close(g, reference.bias_gelu(x, xb), atol=1e-5, rtol=1e-5)


def test_torch_compile_traces_without_graph_breaks():
    """fullgraph=True fails on any graph break; aot_eager runs the traced forward and backward graphs."""
    x, w, b, r, xb = make_ln_inputs((2, 7, 64), torch.float32, True, True)
    fc = torch.randn(64, device=DEVICE)

    def block(x, r):
        h = tn.layer_norm(x, w, b, EPS, r, x_bias=xb, dropout_p=0.1)
        return tg.bias_gelu(h, fc)

    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    xs, rs = leaves([x, r])
    torch.manual_seed(3)
    out = compiled(xs, rs)
    out.sum().backward()
    xe, re_ = leaves([x, r])
    torch.manual_seed(3)
    ref = block(xe, re_)
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(xs.grad, xe.grad)
    torch.testing.assert_close(rs.grad, re_.grad)
