"""pytest-benchmark wiring for `pytest bench/ --benchmark`.

Without --benchmark every benchmark body runs once (pytest-benchmark disabled) as a smoke check. With it,
pytest-benchmark times each one, and at the end of the session every recorded figure is written to
bench/results/<date>_<device>.json and bench/RESULTS.md plus the plot are regenerated (bench/report.py).
"""
import glob
import os

if "TRITON_INTERPRET" not in os.environ and not glob.glob("/dev/nvidia[0-9]*"):
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="time the benchmarks and write bench/results/*.json, bench/RESULTS.md and the plot "
                          "(without it each benchmark runs once, untimed, as a smoke check)")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if not config.getoption("--benchmark"):
        config.option.benchmark_disable = True
    config._bertfast_rows = []


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def record(request):
    """record(op=..., mode=..., provider=..., shape=..., dtype=..., seconds=..., bytes=..., flops=..., ...)

    Stores one figure of this run. `seconds` is None when timing is off (then nothing is written)."""
    rows = request.config._bertfast_rows

    def _record(**row):
        row.setdefault("test", request.node.nodeid)
        rows.append(row)
        return row

    return _record


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    rows = [r for r in getattr(config, "_bertfast_rows", []) if r.get("seconds") is not None]
    if not config.getoption("--benchmark") or not rows:
        return
    import _report  # bench/_report.py, importable because pytest puts bench/ on sys.path

    path = _report.save_run(rows)
    _report.regenerate()
    print(f"\nbertfast: wrote {path} and regenerated bench/RESULTS.md")
