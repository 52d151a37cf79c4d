"""The demo's code path on a tiny plan (coordinate check, sweep over two seeds, report, summary.json, resuming) and
its verdict: a category fixed in advance, with every criterion's numbers."""

import json

import pytest

from helpers import sweep_base
from sparsemup.tuning.demo import KEEP, PAYS, VERDICTS, DemoPlan, run_demo, verdict


@pytest.mark.slow
def test_tiny_demo_writes_summary_and_resumes(tmp_path, corpus):
    lrs = {1.0: [-8.0, -6.0, -4.0], 0.5: [-8.0, -6.0, -4.0]}
    plan = DemoPlan(densities=[1.0, 0.5], log2_lrs={"sp": lrs, "supar": lrs},
                    base=sweep_base(corpus, steps=3), coord_widths=[64, 128], coord_densities=[1.0, 0.25],
                    coord_seeds=1, seed=3, cores=2)
    logs: list[str] = []
    summary = run_demo(tmp_path / "demo", plan, log=logs.append)
    saved = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert saved["conclusion"] == summary["conclusion"] and logs[-1].startswith("wrote ")
    assert saved["seeds"] == [3, 4] and saved["threads"] == 1
    assert saved["verdict"]["category"] in VERDICTS and saved["conclusion"].startswith("verdict: ")
    assert set(saved["verdict"]["criteria"]) == {"supar_keeps", "sp_pays", "shifts_apart"}
    for scheme in ("sp", "supar"):
        found = saved["schemes"][scheme]
        assert set(found["best_lr_by_density"]) == {"1", "0.5"}
        assert all(lr is None or 2**-8 <= lr <= 2**-4 for lr in found["best_lr_by_density"].values())
        assert set(saved["coord_check"][scheme]) == {"width", "density"}
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "## 2. LR × density sweep" in report and "sweep/loss-vs-lr.png" in report and "seeds 3 and 4" in report
    assert (tmp_path / "demo" / "coord-supar" / "density.png").exists()
    logs.clear()
    run_demo(tmp_path / "demo", plan, log=logs.append)
    assert any("24 already stored, 0 to run" in line for line in logs)


def _summary(supar_regret, sp_regret, supar_shift, sp_shift):
    def scheme(regret, shift):
        return {"worst_regret": {"regret": sum(regret) / 2, "interval": regret},
                "shift_log2_by_density": {"0.0625": {"shift": sum(shift) / 2, "interval": shift}}}
    return {"densities": [1.0, 0.0625], "schemes": {"supar": scheme(supar_regret, supar_shift),
                                                   "sp": scheme(sp_regret, sp_shift)}}


@pytest.mark.parametrize("supar, sp, supar_shift, sp_shift, category, unmet", [
    ((0.0, KEEP / 2), (2 * PAYS, 3 * PAYS), (-0.3, 0.4), (1.2, 2.0), "transfers", set()),
    ((0.0, 2 * KEEP), (2 * PAYS, 3 * PAYS), (-0.3, 0.4), (1.2, 2.0), "inconclusive", {"supar_keeps"}),
    ((0.0, KEEP / 2), (PAYS / 2, 3 * PAYS), (-0.3, 0.4), (1.2, 2.0), "inconclusive", {"sp_pays"}),
    ((0.0, KEEP / 2), (2 * PAYS, 3 * PAYS), (-0.3, 1.4), (1.2, 2.0), "inconclusive", {"shifts_apart"}),
])
def test_the_verdict_is_a_category_naming_what_was_not_met(supar, sp, supar_shift, sp_shift, category, unmet):
    found = verdict(_summary(supar, sp, supar_shift, sp_shift))
    assert found["category"] == category and found["meaning"] == VERDICTS[category]
    assert {name for name, c in found["criteria"].items() if not c["met"]} == unmet
    missing = _summary(supar, sp, supar_shift, sp_shift)
    missing["schemes"]["sp"]["worst_regret"] = None  # no interval (e.g. a flat curve): never counted as met
    assert not verdict(missing)["criteria"]["sp_pays"]["met"]
