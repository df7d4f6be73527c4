"""The extension's loss ops against eager PyTorch: fused softmax cross-entropy vs F.cross_entropy (forward +
backward) and mlm_gather vs indexing, time and peak memory.

Shapes: on CUDA the BERT pretraining shapes (19660 predicted tokens = 256 x 512 x 15%, vocabulary 30522, bf16);
on CPU 2048 x 30522 float32 (2 threads). Bytes are what the op must move at least: read the logits once and write
their gradient once (2 * N * V * element_size); the ext op moves 4x that in total (forward: read logits, write
the gradient; backward: scale it in place), eager about 7x (see bertfast/ops/_ext.py).
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from _harness import bench_device, measure, peak_memory

from bertfast import reference
from bertfast.ops import _ext

DEV = bench_device()
if DEV.type == "cuda":
    CE_SHAPE, CE_DTYPE = (19660, 30522), torch.bfloat16
    GATHER_SHAPE, GATHER_DTYPE = (256, 512, 1024, 80), torch.bfloat16  # B, S, H, P
    # the model's layout: it gathers from h[None], so one row holds every prediction of the batch (256 x 80)
    GATHER_ONE_ROW = (1, 256 * 512, 1024, 20480)
else:
    CE_SHAPE, CE_DTYPE = (2048, 30522), torch.float32
    GATHER_SHAPE, GATHER_DTYPE = (32, 128, 768, 20), torch.float32
    GATHER_ONE_ROW = (1, 32768, 64, 20480)  # P as on the GPU, narrow rows to stay quick on 2 cores


def _ce_fn(provider, x, t):
    loss_fn = _ext.softmax_cross_entropy if provider == "ext" else F.cross_entropy

    def step():
        x.grad = None
        loss_fn(x, t).backward()
        return x.grad
    return step


@pytest.mark.parametrize("provider", ["ext", "eager"])
def test_softmax_cross_entropy(benchmark, record, provider):
    n, v = CE_SHAPE
    x = torch.randn(n, v, device=DEV, dtype=CE_DTYPE, requires_grad=True)
    t = torch.randint(0, v, (n,), device=DEV)
    t[torch.rand(n, device=DEV) < 0.1] = -100
    step = _ce_fn(provider, x, t)
    s = measure(benchmark, step, device=DEV, rounds=5 if DEV.type == "cpu" else 20)
    es = x.element_size()
    row = record(op="softmax_cross_entropy", mode="fwd+bwd", provider=provider, shape=f"N={n},V={v}",
                 dtype=str(CE_DTYPE).replace("torch.", ""), seconds=s,
                 bytes=2 * n * v * es,  # read logits + write grad_logits, the minimum
                 peak_bytes=peak_memory(step, device=DEV))
    if s is not None:
        print(f"\nsoftmax_cross_entropy {provider}: {s * 1e3:.2f} ms, {row['bytes'] / s / 1e9:.1f} GB/s (min bytes)")


# CPU peak memory: a fresh process per provider; Linux's high-water RSS (VmHWM) is reset through
# /proc/self/clear_refs once the inputs exist, so the peak of one forward+backward above them is VmHWM - VmRSS
# (the CPU allocator keeps no statistics; it returns large blocks to the OS when freed).
_RSS_SCRIPT = r"""
import json, sys, torch, torch.nn.functional as F
from bertfast.ops import _ext
torch.set_num_threads(2)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
n, v, provider = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
x = torch.randn(n, v, requires_grad=True); t = torch.randint(0, v, (n,))
fn = _ext.softmax_cross_entropy if provider == "ext" else F.cross_entropy
fn(x[:2], t[:2]).backward(); x.grad = None  # warm up code paths at a tiny size
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
base = status("VmRSS")
fn(x, t).backward()
print(json.dumps({"peak_bytes": status("VmHWM") - base, "logits_bytes": x.numel() * x.element_size()}))
"""


@pytest.mark.skipif(DEV.type != "cpu", reason="CPU peak memory (CUDA peaks are recorded with the timings)")
@pytest.mark.parametrize("provider", ["ext", "eager"])
def test_softmax_cross_entropy_cpu_peak_memory(record, provider, request):
    n, v = CE_SHAPE if request.config.getoption("--benchmark") else (256, 30522)
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(n), str(v), provider], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\nsoftmax_cross_entropy {provider}: peak {res['peak_bytes'] / 2**20:.0f} MiB above inputs "
          f"= {res['peak_bytes'] / res['logits_bytes']:.2f} x logits")
    record(op="softmax_cross_entropy", mode="fwd+bwd peak memory", provider=provider, shape=f"N={n},V={v}",
           dtype="float32", seconds=None, peak_bytes=res["peak_bytes"])


def _gather_fn(provider, hidden, pos, g):
    fn = _ext.mlm_gather if provider == "ext" else reference.mlm_gather

    def step():
        hidden.grad = None
        fn(hidden, pos).backward(g)
        return hidden.grad
    return step


@pytest.mark.parametrize("layout", ["per_sequence", "one_row"])
@pytest.mark.parametrize("provider", ["ext", "torch"])
def test_mlm_gather(benchmark, record, provider, layout):
    """per_sequence: positions [B, P]. one_row: [1, B * P] over the flattened batch, as the model calls it; before
    the backward was made linear in P, this case scanned P^2 / 2 slot pairs (issue 15)."""
    b, s, h, p = GATHER_SHAPE if layout == "per_sequence" else GATHER_ONE_ROW
    hidden = torch.randn(b, s, h, device=DEV, dtype=GATHER_DTYPE, requires_grad=True)
    pos = torch.stack([torch.randperm(s, device=DEV)[:p] for _ in range(b)])
    pos[:, -p // 10:] = -1
    g = torch.randn(b * p, h, device=DEV, dtype=GATHER_DTYPE)
    step = _gather_fn(provider, hidden, pos, g)
    sec = measure(benchmark, step, device=DEV)
    es = hidden.element_size()
    record(op="mlm_gather", mode="fwd+bwd", provider=provider, shape=f"B={b},S={s},H={h},P={p}",
           dtype=str(GATHER_DTYPE).replace("torch.", ""), seconds=sec,
           bytes=(3 * b * p * h + b * s * h) * es,  # fwd: read + write the gathered rows; bwd: read grad, write grad_hidden
           peak_bytes=peak_memory(step, device=DEV))
