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


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


needs_interpreter = pytest.mark.skipif(
    not interpreter_on(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest without a GPU)")
