"""pytest-benchmark wiring for `pytest bench/ --benchmark`.

Without --benchmark every benchmark body runs once (pytest-benchmark disabled) as a smoke check. With it,
pytest-benchmark times each one, and at the end of the session every recorded figure is written to
bench/results/<date>_<device>.json, with each row's spread over its rounds and the machine's load average before
and after the session, and bench/RESULTS.md plus the plots are regenerated (bench/_report.py). Tracked docs are
never edited: the README's table changes only through `python bench/_report.py --update-readme RUN.json`.
"""
import glob
import json
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
    config._bertfast_load_before = os.getloadavg() if hasattr(os, "getloadavg") else None


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def record(request):
    """record(op=..., mode=..., provider=..., shape=..., dtype=..., seconds=..., bytes=..., flops=..., ...)

    Stores one figure of this run. `seconds` is None when timing is off (then nothing is written). When the test
    timed with pytest-benchmark (bench/_harness.measure) and gives no spread itself, the rounds' min, quartiles,
    max and count are added (min_s, q1_s, q3_s, max_s, rounds), scaled like `seconds`."""
    rows = request.config._bertfast_rows

    def _record(**row):
        row.setdefault("test", request.node.nodeid)
        if row.get("seconds") and "q1_s" not in row:
            import _report  # bench/_report.py, importable because pytest puts bench/ on sys.path

            row.update(_report.spread_from_benchmark(request.node.funcargs.get("benchmark"), row["seconds"]))
        rows.append(row)
        return row

    return _record


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    rows = [r for r in getattr(config, "_bertfast_rows", []) if r.get("seconds") is not None]
    if not config.getoption("--benchmark") or not rows:
        return
    import _report  # bench/_report.py, importable because pytest puts bench/ on sys.path

    before = getattr(config, "_bertfast_load_before", None)
    path = _report.save_run(rows, load_before=[round(x, 2) for x in before] if before else None)
    _report.regenerate()
    with open(path) as f:
        env = json.load(f)["env"]
    print(f"\nbertfast: wrote {path} and regenerated bench/RESULTS.md"
          + (f" (NOISY run: {env['noisy_why']})" if env.get("noisy") else "")
          + f"; the README is unchanged: `python bench/_report.py --update-readme {os.path.relpath(path)}` "
          "puts this run's table there")
