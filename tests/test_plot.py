"""`python -m bertfast.plot`: training and eval curves of runs as a PNG, several runs overlaid; clear errors."""
from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("matplotlib")

from bertfast.train.plot import PANELS, figure, main, plot_runs, read_metrics  # noqa: E402

from _utils import assert_one_line_error  # noqa: E402


def _run(folder, steps, with_eval=True, scale=1.0):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for s in steps:
            f.write(json.dumps({"step": s, "loss": scale * 10 / s, "mlm_loss": scale * 9 / s, "nsp_loss": 1 / s,
                                "mlm_acc": s / 1000, "nsp_acc": 0.5 + s / 2000, "lr": 1e-3 * s / 100,
                                "tokens_per_s": 1000.0 + s, "epoch": 0}) + "\n")
            if with_eval and s % 20 == 0:
                f.write(json.dumps({"step": s, "eval_mlm_loss": 8 / s, "eval_nsp_loss": 2 / s, "eval_mlm_acc": s / 900,
                                    "eval_nsp_acc": 0.5, "eval_tokens": 500}) + "\n")
        f.write('{"step": 99, "loss": 1.0')  # a torn last line (a killed run) is skipped
    return str(folder)


def _lines(ax):
    return [(list(line.get_xdata()), list(line.get_ydata()), line.get_linestyle()) for line in ax.get_lines()]


def test_curves_are_the_logged_values(tmp_path):
    a = _run(tmp_path / "a", [10, 20, 30, 40])
    b = _run(tmp_path / "b", [10, 20], with_eval=False, scale=2.0)
    fig = figure([a, b])
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert set(axes) == {p[0] for p in PANELS}
    loss = _lines(axes["Loss (MLM + NSP)"])
    # run a: train then eval (eval_mlm_loss + eval_nsp_loss at the eval steps, dashed); run b: train only
    assert loss[0] == ([10, 20, 30, 40], [1.0, 0.5, 10 / 30, 0.25], "-")
    assert loss[1][0] == [20, 40] and loss[1][1] == pytest.approx([0.5, 0.25]) and loss[1][2] == "--"
    assert loss[2] == ([10, 20], [2.0, 1.0], "-") and len(loss) == 3
    assert _lines(axes["MLM accuracy"])[1][1] == pytest.approx([20 / 900, 40 / 900])
    assert _lines(axes["Learning rate"])[0][1] == pytest.approx([1e-4, 2e-4, 3e-4, 4e-4])
    assert _lines(axes["Throughput"])[1][1] == [1010.0, 1020.0]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["a", "b", "train", "eval (held out)"]


def test_png_written_and_cli(tmp_path, capsys):
    import matplotlib.image as mpimg

    a = _run(tmp_path / "x" / "run", [10, 20, 30])
    b = _run(tmp_path / "y" / "run", [10, 20, 30], scale=3.0)
    out = plot_runs([a, b], str(tmp_path / "plots" / "c.png"))
    img = mpimg.imread(out)
    assert img.shape[0] > 500 and img.shape[1] > 1000
    assert main([a]) == 0 and os.path.isfile(os.path.join(a, "training.png"))
    assert "wrote" in capsys.readouterr().out
    # two runs of the same folder name get their parents in the legend
    fig = figure([a, b])
    assert [t.get_text() for t in fig.legends[0].get_texts()][:2] == ["x/run", "y/run"]


def test_missing_eval_and_bad_folders(tmp_path, capsys):
    a = _run(tmp_path / "a", [10, 20], with_eval=False)
    fig = figure([a])
    assert "eval (held out)" not in [t.get_text() for t in fig.legends[0].get_texts()]
    assert len(read_metrics(a)) == 2
    for argv, msg in (([str(tmp_path / "nope")], "no such run folder"),
                      ([str(tmp_path)], "no metrics.jsonl")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err, err
        assert_one_line_error(err)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds no step records"):
        plot_runs([str(tmp_path / "empty")], str(tmp_path / "e.png"))
