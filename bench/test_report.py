"""bench/_report.py: a benchmark run never edits the README, noisy rows and runs are marked, the README changes only
through --update-readme (refused for a noisy run), and the plot has one panel per group. CPU-only, a few seconds."""
import json
import os

import _report
import pytest


def _rows(spread=0.02, descheduled=False):
    rows = []
    for op, mode, shape, base_s, fast_s, prov in [("bias_gelu", "fwd", "32x96", 1e-4, 5e-5, "triton"),
                                                  ("softmax_cross_entropy", "fwd+bwd", "N=8", 2e-3, 1e-3, "ext"),
                                                  ("train_step", "fwd+bwd+opt", "mini", 0.5, 0.4, "bertfast-auto")]:
        for provider, s in (("torch" if op != "softmax_cross_entropy" else "eager", base_s), (prov, fast_s)):
            rows.append(dict(op=op, mode=mode, shape=shape, dtype="float32", provider=provider, seconds=s,
                             min_s=s / (3 if descheduled else 1.01), q1_s=s * (1 - spread), q3_s=s * (1 + spread),
                             max_s=s * 1.5, rounds=9))
    return rows


@pytest.fixture
def results(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    return d


def test_quiet_run_saved_with_load_and_spread(results, tmp_path):
    path = _report.save_run(_rows(), load_before=[0.1, 0.1, 0.1], load_after=[0.5, 0.2, 0.1], results_dir=str(results))
    run = json.load(open(path))
    assert run["env"]["load"] == {"before": [0.1, 0.1, 0.1], "after": [0.5, 0.2, 0.1]}
    assert run["env"]["noisy"] is False
    row = next(r for r in run["rows"] if r["provider"] == "ext")
    assert row["iqr_rel"] == pytest.approx(0.04) and row["noisy"] is False
    assert row["speedup"] == pytest.approx(2.0)
    md = _report.regenerate(str(results), str(tmp_path / "RESULTS.md"))
    text = open(md).read()
    assert "0.10/0.10/0.10 before, 0.50/0.20/0.10 after" in text and "Noisy run" not in text
    assert "| 4% |" in text


@pytest.mark.parametrize("why, kwargs, load", [("spread", dict(spread=0.2), [0.1, 0.1, 0.1]),
                                               ("descheduled", dict(descheduled=True), [0.1, 0.1, 0.1]),
                                               ("load", {}, [8.0, 4.0, 2.0])])
def test_noisy_run_marked(results, tmp_path, why, kwargs, load):
    path = _report.save_run(_rows(**kwargs), load_before=load, results_dir=str(results))
    run = json.load(open(path))
    assert run["env"]["noisy"] is True, why
    if why != "load":
        assert all(r["noisy"] for r in run["rows"])
        assert "rows noisy" in run["env"]["noisy_why"]
    else:
        assert "load average 8.00" in run["env"]["noisy_why"]
    text = open(_report.regenerate(str(results), str(tmp_path / "RESULTS.md"))).read()
    assert "**Noisy run**" in text


def test_regenerate_leaves_readme_alone_and_update_readme_is_explicit(results, tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:start -->\nold table\n<!-- bench:end -->\nafter\n")
    monkeypatch.setattr(_report, "README", str(readme))
    quiet = _report.save_run(_rows(), load_before=[0.1, 0.1, 0.1], results_dir=str(results))
    _report.regenerate(str(results), str(tmp_path / "RESULTS.md"))
    assert "old table" in readme.read_text()

    _report.update_readme(quiet, readme=str(readme))
    text = readme.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("<!-- bench:end -->\nafter\n")
    assert "| softmax_cross_entropy | fwd+bwd | N=8 | float32 | ext | 1.000 | 4% |" in text

    noisy = _report.save_run(_rows(spread=0.3), load_before=[0.1, 0.1, 0.1], results_dir=str(results))
    with pytest.raises(SystemExit, match="noisy run"):
        _report.update_readme(noisy, readme=str(readme))
    assert readme.read_text() == text
    _report.update_readme(noisy, allow_noisy=True, readme=str(readme))
    assert "60% noisy" in readme.read_text()  # IQR = 2 x 0.3 of the median


def test_plot_panels(results):
    pytest.importorskip("matplotlib")
    path = _report.save_run(_rows(), load_before=[0.1, 0.1, 0.1], results_dir=str(results))
    run = _report.load_run(path)
    run["env"]["kind"] = "cpu"
    assert _report.plot_rows(run)["kernels"] == []  # Triton's interpreter on a CPU: not a timing
    run["env"]["kind"] = "gpu"
    panels = _report.plot_rows(run)
    assert {k: [r["provider"] for r in v] for k, v in panels.items()} == {
        "kernels": ["triton"], "loss": ["ext"], "end-to-end": ["bertfast-auto"]}
    png = _report.plot(path, run)
    assert png and os.path.getsize(png) > 10_000


def test_spread_from_pytest_benchmark():
    class Stats:
        min, q1, median, q3, max, rounds = 1.0, 1.5, 2.0, 3.0, 4.0, 7

    class Bench:
        stats = type("Meta", (), {"stats": Stats})()

    assert _report.spread_from_benchmark(Bench(), 0.2) == pytest.approx(
        {"min_s": 0.1, "q1_s": 0.15, "q3_s": 0.3, "max_s": 0.4, "rounds": 7})  # measure()'s inner=10
    assert _report.spread_from_benchmark(Bench(), 2.0)["q3_s"] == pytest.approx(3.0)
    assert _report.spread_from_benchmark(Bench(), 0.7) == {}  # not the benchmark's median: no spread attached
    assert _report.spread_from_benchmark(None, 0.7) == {}
