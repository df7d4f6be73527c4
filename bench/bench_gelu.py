"""Benchmarks: bias + exact GELU, Triton (bertfast.ops._triton_gelu) vs eager PyTorch (F.gelu(x + b)), forward /
backward / both, in GB/s.

    pytest bench/bench_gelu.py               each body once, untimed (smoke check)
    pytest bench/bench_gelu.py --benchmark   timed; results go to bench/results and bench/RESULTS.md

On CUDA: rows = 16384 (e.g. batch 32 x seqlen 512), widths 768, 1024, 3072, 4096 (BERT's intermediate sizes are
3072 / 4096), bfloat16. On CPU: a tiny smoke size, both providers (Triton runs in the interpreter).

GB/s uses the bytes the op must move at least, the same figure for both providers; M rows, N width, e bytes per
element:  fwd: read x; write y = 2MNe;  bwd: read dy, x; write dx = 3MNe;  "fwd+bwd" is the sum (the bias and
the [programs, N] float32 partial sums of d_bias are left out: < 1%). bench_norm.py's `copy` is the yardstick.

Target (for the GPU session; H100, bfloat16), not enforced by tests: >= 80% of the copy bandwidth, fwd+bwd >= 2x
eager. The launch heuristics in kernels/gelu.py (fwd_config / bwd_config) are untuned.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _harness import bench_device, run_modes, skip_unless_triton

DEV = bench_device()
ON_GPU = DEV.type == "cuda"
ROWS = 16384 if ON_GPU else 32
WIDTHS = [768, 1024, 3072, 4096] if ON_GPU else [96]
DTYPE = torch.bfloat16 if ON_GPU else torch.float32


def _eager(x, bias):
    return F.gelu(x + bias)


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["triton", "torch"])
@pytest.mark.parametrize("n", WIDTHS)
def test_bias_gelu(benchmark, record, n, provider, mode):
    if provider == "triton":
        skip_unless_triton(DEV)
        from bertfast.ops import _triton_gelu
        fn = _triton_gelu.bias_gelu
    else:
        fn = _eager
    m, dt = ROWS, DTYPE
    x = torch.randn(m, n, device=DEV, dtype=dt, requires_grad=True)
    bias = torch.randn(n, device=DEV, dtype=dt, requires_grad=True)
    s = run_modes(benchmark, fn, (x, bias), mode, device=DEV)
    e = x.element_size()
    fwd_bytes = 2 * m * n * e  # read x; write y
    bwd_bytes = 3 * m * n * e  # read dy, x; write dx
    nbytes = {"fwd": fwd_bytes, "bwd": bwd_bytes, "fwd+bwd": fwd_bytes + bwd_bytes}[mode]
    record(op="bias_gelu", mode=mode, provider=provider, shape=f"{m}x{n}", dtype=str(dt)[6:], seconds=s,
           bytes=nbytes)
