"""pytest hooks and fixtures for the whole suite (helpers that tests import live in tests/_utils.py; nothing
imports this file as a module)."""
import glob
import os

# Triton's interpreter must be switched on before triton is imported (torch may import it), so decide here,
# before anything imports torch: without a GPU, Triton kernels run on CPU tensors in the interpreter.
if "TRITON_INTERPRET" not in os.environ and not glob.glob("/dev/nvidia[0-9]*"):
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def nan_empty():
    """Every torch.empty / at::empty (including those inside the kernels) is NaN-filled while the test runs, so an
    output element a kernel forgets to write fails the comparison (see _utils.nan_filled_empty)."""
    from _utils import nan_filled_empty

    with nan_filled_empty():
        yield
