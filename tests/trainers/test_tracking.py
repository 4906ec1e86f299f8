"""The run's metrics log and curves: an earlier run's log is kept aside; the curves plot what is
plottable (a diverged run's inf, NaN and missing values are left out)."""
import json
import math

import pytest

from hfrl.trainers.tracking import MetricsLog, plot_metrics, read_metrics, set_aside


def test_plot_skips_values_that_are_not_finite(tmp_path):
    pytest.importorskip("matplotlib")
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "critic/score/mean": math.inf, "perf/throughput": 10.0},
            {"step": 2, "critic/score/mean": None, "perf/throughput": math.nan},
            {"step": 3, "critic/score/mean": 0.5, "perf/throughput": 12.0}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))   # json writes Infinity / NaN
    png = tmp_path / "curves.png"
    assert plot_metrics(metrics, png) == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics.write_text(json.dumps({"step": 1, "critic/score/mean": math.inf}) + "\n")
    assert plot_metrics(metrics, tmp_path / "none.png") is None   # nothing finite: no plot
    assert not (tmp_path / "none.png").exists()


def test_set_aside_keeps_an_earlier_runs_metrics(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    assert set_aside(metrics) is None   # nothing yet
    metrics.write_text("")
    assert set_aside(metrics) is None and metrics.exists()   # empty: nothing to keep
    metrics.write_text(json.dumps({"step": 1, "x": 1.0}) + "\n")
    (tmp_path / "metrics.previous.jsonl").write_text("older\n")
    assert set_aside(metrics) == tmp_path / "metrics.previous.jsonl" and not metrics.exists()
    log = MetricsLog(metrics)
    log.write({"step": 1, "x": 2.0})
    log.close()
    assert read_metrics(metrics) == [{"step": 1, "x": 2.0}]
    assert read_metrics(tmp_path / "metrics.previous.jsonl") == [{"step": 1, "x": 1.0}]

