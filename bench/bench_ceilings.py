"""The device's own ceilings, measured in the same run as the kernels: copy bandwidth (bytes read + written
by a device-to-device copy) and dense matmul rate. Memory-bound kernels are judged against the first
(`GB/s` of op rows vs this row), matmul-bound work (attention, the training step) against the second."""
import torch
from _harness import bench_device, measure

DEV = bench_device()


def test_copy_bandwidth(benchmark, record):
    n = (1 << 28) if DEV.type == "cuda" else (1 << 24)  # 1 GiB / 64 MiB of float32
    src = torch.randn(n, device=DEV)
    dst = torch.empty_like(src)
    seconds = measure(benchmark, lambda: dst.copy_(src), device=DEV)
    record(op="ceiling", mode="copy", provider="device", shape=f"{n * 4 >> 20} MiB", dtype="float32",
           seconds=seconds, bytes=2 * n * 4)  # read n*4 bytes + write n*4 bytes


def test_matmul_rate(benchmark, record):
    if DEV.type == "cuda":
        n, dtype = 8192, torch.bfloat16
    else:
        n, dtype = 1024, torch.float32
    a = torch.randn(n, n, device=DEV, dtype=dtype)
    b = torch.randn(n, n, device=DEV, dtype=dtype)
    seconds = measure(benchmark, lambda: a @ b, device=DEV)
    record(op="ceiling", mode="matmul", provider="device", shape=f"{n}^3", dtype=str(dtype).replace("torch.", ""),
           seconds=seconds, flops=2 * n ** 3)
