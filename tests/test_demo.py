"""The demo's code path on a tiny plan: coordinate check, sweep, report, summary.json, and resuming."""

import json

import pytest

from helpers import sweep_base
from sparsemup.tuning.demo import DemoPlan, run_demo


@pytest.mark.slow
def test_tiny_demo_writes_summary_and_resumes(tmp_path, corpus):
    plan = DemoPlan(densities=[1.0, 0.5], log2_lrs=[-8, -6, -4], base=sweep_base(corpus, steps=3),
                    coord_widths=[64, 128], coord_densities=[1.0, 0.25], coord_seeds=1, workers=1)
    logs: list[str] = []
    summary = run_demo(tmp_path / "demo", plan, log=logs.append)
    saved = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert saved["conclusion"] == summary["conclusion"] and "best-LR drift across densities 1 … 0.5" in logs[-1]
    for scheme in ("sp", "supar"):
        found = saved["schemes"][scheme]
        assert set(found["best_lr_by_density"]) == {"1", "0.5"}
        assert isinstance(found["drift_log2"], float)
        assert all(2**-8 <= lr <= 2**-4 for lr in found["best_lr_by_density"].values())
        assert set(saved["coord_check"][scheme]) == {"width", "density"}
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "## 2. LR × density sweep" in report and "sweep/loss-vs-lr.png" in report
    assert (tmp_path / "demo" / "coord-supar" / "density.png").exists()
    logs.clear()
    run_demo(tmp_path / "demo", plan, log=logs.append)
    assert any("12 already stored, 0 to run" in line for line in logs)
