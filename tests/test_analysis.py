"""Seed averaging, optima, regret and drift tables, and the report on a tiny synthetic store (the estimator's own
tests: test_estimate.py)."""

import json
import math

import pytest

from helpers import known
from sparsemup.cli import main
from sparsemup.tuning.analysis import analyze
from sparsemup.tuning.estimate import point_estimate
from sparsemup.tuning.report import preset_values
from sparsemup.tuning.store import ConfigValue, ResultStore, RunRecord, StoreError
from sparsemup.tuning.sweep import load_sweep

GRID = [-10, -9, -8, -7, -6, -5, -4]


def test_interior_minimum_is_recovered_between_grid_points():
    found = known(point_estimate(GRID, [(x + 6.3) ** 2 + 2.0 for x in GRID]))
    assert found["edge"] is None
    assert found["log2_x"] == pytest.approx(-6.3) and found["loss"] == pytest.approx(2.0)


@pytest.mark.parametrize("losses, edge, x", [
    ([1.0, 2, 3, 4, 5, 6, 7], "low", -10),
    ([7.0, 6, 5, 4, 3, 2, 1], "high", -4),
    ([7.0, 6, 5, 4, None, float("nan"), 9], "high", -7),  # the minimum next to diverged points is an edge
])
def test_edge_minimum_is_flagged_not_fitted(losses, edge, x):
    found = known(point_estimate(GRID, losses))
    assert found["edge"] == edge and found["log2_x"] == x


def test_diverged_points_are_excluded_and_all_diverged_is_none():
    assert point_estimate(GRID, [None] * 7) is None
    found = known(point_estimate(GRID, [5.0, float("nan"), 3.0, 2.1, 2.0, 2.1, None]))
    assert found["edge"] is None and found["log2_x"] == pytest.approx(-6.0)


def _record(scheme: str, density: float, log2_lr: float, seed: int, loss: float | None) -> RunRecord:
    overrides: dict[str, ConfigValue] = {"model.scheme": scheme, "model.density": density, "optim.lr": 2.0**log2_lr,
                                         "train.seed": seed}
    completed = loss is not None
    return {"id": f"{scheme}{density}{log2_lr}{seed}", "status": "completed" if completed else "diverged",
            "final_val_loss": loss, "steps": 8 if completed else 5, "diverged_at_step": None if completed else 6,
            "seconds": 1.0, "overrides": overrides, "config": {**overrides, "model.width": 128}}


def synthetic_records() -> list[RunRecord]:
    """SµPar's optimum at -7 at every density; SP's moves by +1 per halving of density; two seeds."""
    records = []
    for scheme, shift in (("sp", 1.0), ("supar", 0.0)):
        for k, density in enumerate((1.0, 0.5, 0.25)):
            best = -8 + shift * k if scheme == "sp" else -7.0
            for log2_lr in GRID:
                for seed, noise in ((0, 0.01), (1, -0.01)):
                    loss = None if log2_lr == -4 and scheme == "sp" and density == 1.0 else \
                        2.0 + 0.05 * k + 0.1 * (log2_lr - best) ** 2 + noise
                    records.append(_record(scheme, density, log2_lr, seed, loss))
    return records


def test_drift_and_transfer_tables():
    result = analyze(synthetic_records())
    drifts = {d["setting"]["model.scheme"]: d for d in result["drifts"]}
    assert set(drifts) == {"sp", "supar"} and all(d["along"] == "model.density" for d in result["drifts"])
    assert drifts["supar"]["drift_log2"] == pytest.approx(0.0, abs=1e-9)
    assert drifts["sp"]["drift_log2"] == pytest.approx(2.0)
    assert drifts["sp"]["transferred_log2_x"] == pytest.approx(-8.0)
    rows = {r["model.density"]: r for r in drifts["sp"]["rows"]}
    assert rows[0.25]["loss_at_transferred"] == pytest.approx(2.1 + 0.4)  # two steps off its optimum
    assert rows[0.25]["regret"] == pytest.approx(0.4) and rows[0.25]["shift"] == pytest.approx(2.0)
    assert all(r["regret"] == pytest.approx(0.0, abs=1e-9) for r in drifts["supar"]["rows"])
    lo, hi = rows[0.25]["shift_interval"]
    assert lo < 2.0 < hi and hi - lo < 1.5  # both seeds differ by 0.02 everywhere: the pooled noise
    assert result["noise"]["pairs"] > 0 and result["noise"]["pair_median"] == pytest.approx(0.02)
    assert result["regret"][0]["setting"] == {"model.scheme": "sp"} and result["regret"][0]["regret"] == \
        pytest.approx(0.4)  # the JSON leads with what transfer costs
    curve = next(c for c in result["curves"] if c["setting"] == {"model.density": 1.0, "model.scheme": "sp"})
    assert curve["seeds"] == 2 and curve["loss"][-1] is None  # seeds averaged (noise cancels), diverged kept None
    assert curve["loss"][2] == pytest.approx(2.0)


def test_report_writes_tables_figures_and_json(tmp_path, capsys):
    store = ResultStore(tmp_path / "results.jsonl")
    for record in synthetic_records():
        store.append(record)
    assert main(["report", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    lead = text.index("**What transfer costs.**")
    assert lead < text.index("| setting | seeds | best log2 lr |")  # the regret comes first
    assert "| scheme=sp | density | 0.400 [" in text and "| 0.25 | 2.00 | — |" in text  # worst regret, drift
    assert "| 0.25 | 0.400 [" in text and "| +2.00 [" in text and "| -6.00 ± 0.06 | 2.100 | 2.500 |" in text
    assert "| 1.9900 | model.scheme=sp, model.density=1, optim.lr=0.003906, train.seed=1 |" in text  # best run
    for name in ("report.md", "report.json", "loss-vs-lr.png"):
        assert (tmp_path / name).stat().st_size > 100
    assert "![loss-vs-lr](loss-vs-lr.png)" in (tmp_path / "report.md").read_text()
    assert main(["report", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"axis", "runs", "diverged", "curves", "drifts", "files"} <= set(result)
    assert result["runs"] == 84 and result["diverged"] == 2
    assert math.isclose(next(d for d in result["drifts"] if d["setting"]["model.scheme"] == "sp")["drift_log2"], 2.0)


def test_report_merges_stores_counts_a_run_once_and_names_what_differs(tmp_path, capsys):
    records = synthetic_records()
    full, ablation = tmp_path / "full", tmp_path / "ablation"
    for r in records:  # SP in one store, SµPar in the other, one SP run in both
        ResultStore((full if r["overrides"]["model.scheme"] == "sp" else ablation)
                    / "results.jsonl").append(r)
    ResultStore(ablation / "results.jsonl").append(records[0])
    assert main(["report", str(ablation), "--with", str(full), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["runs"] == 84
    assert {d["setting"]["model.scheme"] for d in result["drifts"]} == {"sp", "supar"}
    report = (ablation / "report.md").read_text()
    assert f"Merged from {ablation} (43 runs), {full} (42 runs): 84 distinct runs; their fixed settings agree." \
        in report
    assert not (full / "report.md").exists()  # written into the first directory only
    assert json.loads((ablation / "report.json").read_text())["merged_from"] == [str(ablation), str(full)]

    # Same swept keys (so the same id) on another base: a different run, kept, and the difference named.
    other = tmp_path / "other"
    ResultStore(other / "results.jsonl").append({**records[0], "config": {**records[0]["config"], "model.width": 256}})
    assert main(["report", str(ablation), "--with", str(other), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["runs"] == 44
    assert "44 distinct runs; the stores differ in model.width." in (ablation / "report.md").read_text()

    assert main(["report", str(ablation), "--with", str(tmp_path / "typo")]) == 2
    assert f"--with {tmp_path / 'typo'}: " in capsys.readouterr().err
    assert main(["report", str(ablation), "--with", str(full), "--preset", str(tmp_path / "p.toml")]) == 2
    assert "drop --with" in capsys.readouterr().err
    assert main(["report", str(ablation), "--top", "3"]) == 2
    assert "--top K only applies with --preset" in capsys.readouterr().err


def test_report_without_a_store_names_the_fix(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "sparsemup sweep --config FILE" in capsys.readouterr().err


def iso_records():
    """An iso-parameter sweep: width set together with density; the optimum moves by 0.5 per step."""
    records = []
    for k, (density, width) in enumerate(((1.0, 256), (0.5, 384), (0.25, 512))):
        for log2_lr in GRID:
            record = _record("supar", density, log2_lr, 0, 2.0 + 0.1 * (log2_lr + 7 - 0.5 * k) ** 2)
            record["config"]["model.width"] = width
            records.append(record)
    return records


def test_iso_parameter_sweep_drifts_along_density_with_width_linked():
    (drift,) = analyze(iso_records())["drifts"]
    assert drift["along"] == "model.density" and drift["drift_log2"] == pytest.approx(1.0)
    assert [(r["model.density"], r["model.width"]) for r in drift["rows"]] == [(1.0, 256), (0.5, 384), (0.25, 512)]


def test_iso_parameter_figure_draws_linked_widths_as_lines_of_one_figure(tmp_path, monkeypatch):
    import matplotlib.axes

    from sparsemup.tuning.report import plot_curves

    labels: list[str | None] = []
    original = matplotlib.axes.Axes.plot

    def plot(ax, *a, **kw):
        labels.append(kw.get("label"))
        return original(ax, *a, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    records = iso_records()
    for r in records:  # a text key set together with density labels the lines too
        r["config"]["model.mask_kind"] = "rows" if r["config"]["model.density"] == 1.0 else "blocks"
    paths = plot_curves(analyze(records), tmp_path)
    assert [p.name for p in paths] == ["loss-vs-lr.png"]  # not one figure per width
    assert sorted(lab for lab in labels if lab) == ["density=0.25, mask_kind=blocks, width=512",
                                                    "density=0.5, mask_kind=blocks, width=384",
                                                    "density=1, mask_kind=rows, width=256"]


def test_records_from_before_a_config_key_existed_join_the_same_curve():
    from sparsemup.tuning.analysis import curves

    old = [_record("supar", 1.0, x, 0, (x + 7) ** 2 + 2) for x in GRID[:4]]
    new = [_record("supar", 1.0, x, 0, (x + 7) ** 2 + 2) for x in GRID[4:]]
    for r in new:  # stored by a later sparsemup, whose configs carry the new keys at their defaults
        r["config"].update({"model.mask_kind": "rows", "model.block_size": 32, "model.backend": "masked_dense"})
    (curve,) = curves(old + new)
    assert len(curve["log2_x"]) == len(GRID)
    assert known(analyze(old + new)["curves"][0]["optimum"])["log2_x"] == pytest.approx(-7)


def test_preset_of_the_top_runs_is_their_geometric_mean():
    records = [_record("supar", 1.0, x, 0, loss) for x, loss in ((-8, 2.0), (-6, 2.01), (-4, 2.5))]
    assert preset_values(records)["optim.lr"] == 2.0**-8
    top2 = preset_values(records, top=2)
    assert top2["optim.lr"] == pytest.approx(2.0**-7, rel=1e-3) and top2["model.scheme"] == "supar"
    with pytest.raises(StoreError, match="needs 4 completed runs"):
        preset_values(records, top=4)
    assert "train.seed" not in top2  # a seed is not a hyperparameter
    records[1]["overrides"]["train.seed"] = 7
    assert preset_values(records, top=2)["optim.lr"] == top2["optim.lr"]
    records[1]["overrides"]["model.width"] = 256  # a key the others did not sweep
    with pytest.raises(StoreError, match="swept different keys"):
        preset_values(records, top=2)
    for r, width in zip(records, (128, 256, 512)):
        r["overrides"]["model.width"] = width  # ints are not averaged: 181.02 is no width
    with pytest.raises(StoreError, match="differ in model.width"):
        preset_values(records, top=2)
    records[1]["overrides"].update({"model.width": 128, "model.scheme": "sp"})
    with pytest.raises(StoreError, match="differ in model.scheme"):
        preset_values(records, top=2)


def test_preset_of_the_top_runs_through_the_cli_feeds_a_sweep(tmp_path, capsys):
    store = ResultStore(tmp_path / "tune" / "results.jsonl")
    for k, (lr, std, loss) in enumerate(((2.0**-8, 0.02, 2.0), (2.0**-6, 0.08, 2.01), (2.0**-4, 0.5, 3.0))):
        overrides: dict[str, ConfigValue] = {"optim.lr": lr, "model.init_std": std, "train.seed": k}
        store.append({"id": str(k), "status": "completed", "final_val_loss": loss, "steps": 8, "diverged_at_step": None,
                      "seconds": 1.0, "overrides": overrides, "config": overrides})
    preset = tmp_path / "presets" / "base.toml"
    assert main(["report", str(tmp_path / "tune"), "--preset", str(preset), "--top", "2"]) == 0
    assert "geometric mean of the 2 best runs (0, 1)" in preset.read_text()
    sweep = tmp_path / "next.toml"
    sweep.write_text('[sweep]\npreset = "presets/base.toml"\n[grid]\n"train.seed" = [0]\n')
    spec = load_sweep(sweep)
    assert spec.base.optim.lr == pytest.approx(2.0**-7, rel=1e-3) and spec.base.model.init_std == pytest.approx(0.04)


def test_report_at_fixed_hyperparameters_tables_loss_along_density_with_seed_spread(tmp_path, capsys):
    store = ResultStore(tmp_path / "results.jsonl")
    for scheme, rise in (("sp", 0.2), ("supar", 0.0)):
        for k, density in enumerate((1.0, 0.5, 0.25)):
            for seed, noise in ((0, 0.01), (1, -0.01)):
                store.append(_record(scheme, density, -8, seed, 2.0 + rise * k + noise))
    assert main(["report", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "one lr per setting: losses at fixed hyperparameters" in text
    assert "**scheme=sp**, across density:" in text
    assert "| 0.25 | -8.00 | 2.400 | 0.020 |" in text and "| 0.25 | -8.00 | 2.000 | 0.020 |" in text
    assert (tmp_path / "loss-vs-density.png").stat().st_size > 100
    assert "![loss-vs-density](loss-vs-density.png)" in (tmp_path / "report.md").read_text()


def test_fixed_hyperparameters_with_width_and_density_each_get_a_figure_and_one_seed_no_spread(tmp_path, capsys):
    store = ResultStore(tmp_path / "results.jsonl")
    for density in (1.0, 0.5):
        for width in (128, 256):
            r = _record("supar", density, -8, 0, 2.0 + (1 - density) + 128 / width)
            r["id"] += str(width)
            r["overrides"]["model.width"] = r["config"]["model.width"] = width
            store.append(r)
    assert main(["report", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "across density:" in text and "across width:" in text
    assert "**width=256**, across density:\n\n| density | log2 lr | loss | seed spread |\n|---|---|---|---|\n" \
           "| 1 | -8.00 | 2.500 | — |\n| 0.5 | -8.00 | 3.000 | — |" in text  # one seed: no spread to show
    assert (tmp_path / "loss-vs-density.png").exists() and (tmp_path / "loss-vs-width.png").exists()

    linked = tmp_path / "iso"  # iso-parameter: width set with density, shown in the row
    for density, width in ((1.0, 128), (0.5, 192)):
        r = _record("supar", density, -8, 0, 2.0)
        r["overrides"]["model.width"] = r["config"]["model.width"] = width
        ResultStore(linked / "results.jsonl").append(r)
    assert main(["report", str(linked)]) == 0
    assert "| 0.5 (width 192) | -8.00 | 2.000 | — |" in capsys.readouterr().out
