"""Test helpers shared by every test file (as Liger-Kernel's test/utils.py): the tolerance rule against a float64
reference, the "can Triton run here" marker, NaN-filled buffers and the device the small tests run on.

Import as `from _utils import assert_close, requires_triton, ...` (pytest puts tests/ on sys.path). conftest.py
holds only pytest hooks and fixtures; nothing imports it as a module.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from bertfast.kernels._launch import triton_unavailable_reason

__all__ = ["assert_close", "requires_triton", "triton_runnable", "triton_device", "nan_like", "nan_filled_empty",
           "LaunchRecorder", "assert_one_line_error"]


def assert_one_line_error(err: str) -> None:
    """What every command-line tool's refusal must look like (bertfast._cli.Parser): one line naming the problem,
    no usage dump before it."""
    assert "usage:" not in err and err.count("\n") == 1, err


def triton_runnable() -> bool:
    """Whether Triton kernels can run in this process: on a CUDA GPU, or on CPU tensors in Triton's interpreter
    (TRITON_INTERPRET=1, which tests/conftest.py sets before anything imports triton when there is no GPU)."""
    return triton_unavailable_reason(triton_device()) is None


def triton_device() -> torch.device:
    """Where the small Triton tests run: the GPU when there is one, else the CPU (Triton's interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


requires_triton = pytest.mark.skipif(
    not triton_runnable(),
    reason="Triton needs a CUDA GPU or, on CPU tensors, TRITON_INTERPRET=1 (set by tests/conftest.py without a GPU)")


def assert_close(out: torch.Tensor, ref64: torch.Tensor, same_dtype_ref: torch.Tensor, *, atol: float = 0.0,
                 rtol: float = 0.0, what: str = "output", elementwise: bool = True, check_dtype: bool = True):
    """flash-attention's rule: the kernel is at most twice as far from the float64 truth as eager torch computing
    in the same dtype, plus a small slack:

        |out - ref64| <= 2 |same_dtype_ref - ref64| + atol + rtol |ref64|

    elementwise (default), or with each side's max over all elements (elementwise=False: for kernels whose
    accumulation order differs from torch's, where a single element of torch can be exact by luck). NaN in `out`
    always fails. `check_dtype`: out has same_dtype_ref's dtype (off where an op returns a wider type, e.g. a
    float32 loss for float16 logits)."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)}, expected {tuple(ref64.shape)}"
    if check_dtype:
        assert out.dtype == same_dtype_ref.dtype, f"{what}: dtype {out.dtype}, expected {same_dtype_ref.dtype}"
    out64, ref64, same64 = out.detach().double(), ref64.detach().double(), same_dtype_ref.detach().double()
    assert not out64.isnan().any(), f"{what}: {int(out64.isnan().sum())} NaN element(s)"
    err = (out64 - ref64).abs()
    base = (same64 - ref64).abs()
    if elementwise:
        bound = 2 * base + atol + rtol * ref64.abs()
        bad = ~(err <= bound)
        if bad.any():
            worst = (err - bound).flatten().argmax()
            raise AssertionError(
                f"{what}: {int(bad.sum())} of {bad.numel()} elements out of tolerance; worst: error "
                f"{err.flatten()[worst].item():.3g} > bound {bound.flatten()[worst].item():.3g} (same-dtype torch "
                f"error there {base.flatten()[worst].item():.3g}, atol {atol:.3g}, rtol {rtol:.3g})")
        return
    if err.numel() == 0:
        return
    e, b = err.max().item(), base.max().item()
    bound = 2 * b + atol + rtol * ref64.abs().max().item()
    assert e <= bound, f"{what}: max error {e:.3g} > bound {bound:.3g} (same-dtype torch max error {b:.3g})"


def nan_like(t: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """A NaN-filled buffer (t's device; t's shape and dtype unless given) to hand a launcher as its output, so an
    element the kernel never writes fails the comparison."""
    return torch.full(t.shape if shape is None else shape, float("nan"), dtype=dtype or t.dtype, device=t.device)


@contextlib.contextmanager
def nan_filled_empty():
    """While on, every torch.empty / at::empty (including those inside C++/CUDA kernels) is NaN-filled (torch's
    deterministic mode fills uninitialised memory), so an output element a kernel forgets to write shows up."""
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.utils.deterministic.fill_uninitialized_memory
        assert torch.empty(4).isnan().all()  # the mechanism itself works
        yield
    finally:
        torch.use_deterministic_algorithms(old)


class LaunchRecorder:
    """Replaces every @triton.jit function of the given kernel modules with a fake that records its launches, and
    `_launch.device_guard` with one that records the device it is entered with, so a test can check (without a
    GPU, and without running anything) that each launch happens inside the guard of its tensors' device.

    launches: [{"kernel": name, "grid": grid, "guards": [devices of the guards open at launch], "kwargs": ...}]."""

    def __init__(self, monkeypatch, *modules):
        import triton

        from bertfast.kernels import _launch

        self.launches, self._open = [], []
        rec = self

        @contextlib.contextmanager
        def guard(t):
            rec._open.append(t.device)
            try:
                yield
            finally:
                rec._open.pop()

        class _Fake:
            def __init__(self, name):
                self.name = name

            def __getitem__(self, grid):
                return lambda *args, **kwargs: rec.launches.append(
                    {"kernel": self.name, "grid": tuple(grid), "guards": list(rec._open), "kwargs": kwargs})

        monkeypatch.setattr(_launch, "device_guard", guard)
        for mod in modules:
            for name, obj in list(vars(mod).items()):
                if isinstance(obj, triton.runtime.jit.KernelInterface):  # JITFunction, or InterpretedFunction
                    monkeypatch.setattr(mod, name, _Fake(name))
