"""Adaptive base tuning (Optuna samplers): trials fixed by seed and store, resumable, recorded like any run."""

import json
import math
from typing import Any

import pytest

from helpers import sweep_base
from sparsemup.cli import main
from sparsemup.tuning import sweep as sweep_module
from sparsemup.tuning.search import Search, Study
from sparsemup.tuning.sweep import SweepError, parse_sweep, run_sweep

optuna = pytest.importorskip("optuna", reason="the Optuna samplers need the extra sparsemup[tune]")

BOUNDS = {"optim.lr": (2**-10, 2**-2), "model.init_std": (0.005, 0.3), "model.input_alpha": (0.25, 32.0),
          "model.output_alpha": (0.125, 8.0)}


def _bowl(values):
    """A noiseless stand-in for a loss: a log-space bowl with its minimum inside the ranges."""
    best = {"optim.lr": 2**-6, "model.init_std": 0.05, "model.input_alpha": 2.0, "model.output_alpha": 1.0}
    return sum(math.log(values[k] / best[k]) ** 2 for k in best)


def _drive(search, objective):
    """Ask and tell a whole search in batches; returns the trials' values in trial order."""
    study = Study(search)
    trials: list[dict[str, Any]] = []
    for first in range(0, search.samples, search.batch):
        batch = [study.ask() for _ in range(min(search.batch, search.samples - first))]
        for number, values in batch:
            assert number == len(trials)
            trials.append(values)
            study.tell(number, objective(values))
    return trials


@pytest.mark.parametrize("sampler", ["tpe", "cmaes"])
def test_trials_are_a_function_of_seed_and_results(sampler):
    search = Search(sampler, 0, 24, 2, BOUNDS)
    a, b = _drive(search, _bowl), _drive(search, _bowl)
    assert a == b  # a rebuilt study proposes the same trials: what resuming from the store relies on
    assert a != _drive(Search(sampler, 1, 24, 2, BOUNDS), _bowl)
    shifted = _drive(search, lambda v: _bowl({**v, "optim.lr": v["optim.lr"] * 16}))
    assert shifted != a  # the sampler adapts to what it is told
    for values in a:
        assert all(low <= values[k] <= high for k, (low, high) in BOUNDS.items())


@pytest.mark.parametrize("sampler", ["tpe", "cmaes"])
def test_an_adaptive_sampler_beats_random_sampling_on_a_bowl(sampler):
    budget = 60
    found = min(map(_bowl, _drive(Search(sampler, 0, budget, 2, BOUNDS), _bowl)))
    import random

    rng = random.Random(0)
    logs = {k: (math.log(lo), math.log(hi)) for k, (lo, hi) in BOUNDS.items()}
    randomly = min(_bowl({k: math.exp(rng.uniform(*r)) for k, r in logs.items()}) for _ in range(budget))
    assert found < randomly / 2


def test_a_diverged_trial_is_told_as_failed():
    study = Study(Search("tpe", 0, 2, 1, BOUNDS))
    number, _ = study.ask()
    study.tell(number, None)
    assert study._study.trials[0].state == optuna.trial.TrialState.FAIL


def _search_spec(corpus, sampler="tpe", seed=0, samples=3, batch=2):
    return parse_sweep({"base": sweep_base(corpus), "grid": {"train.seed": [0]},
                        "random": {"sampler": sampler, "seed": seed, "samples": samples, "batch": batch,
                                   "log_uniform": {"optim.lr": ["2**-9", "2**-5"]}}}, "t")


def _records(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_a_search_records_its_trials_and_a_rerun_runs_nothing(corpus, tmp_path):
    spec = _search_spec(corpus)
    assert spec.points == [] and spec.search is not None
    out = tmp_path / "s"
    logs: list[str] = []
    counts = run_sweep(spec, out, log=logs.append)
    assert counts.completed == 3
    records = sorted(_records(out), key=lambda r: r["trial"])
    assert [r["trial"] for r in records] == [0, 1, 2]
    assert all(r["search"] == {"sampler": "tpe", "seed": 0} and r["overrides"]["train.seed"] == 0 for r in records)
    assert all(2**-9 <= r["overrides"]["optim.lr"] <= 2**-5 for r in records)
    assert any("tpe search, 3 trials × 1 grid point(s) in batches of 2" in line for line in logs)
    again = run_sweep(_search_spec(corpus), out, log=lambda s: None)
    assert again.stored == 3 and again.completed == 0 and len(_records(out)) == 3
    other = parse_sweep({"base": sweep_base(corpus), "grid": {"train.seed": [0]},
                         "random": {"sampler": "tpe", "seed": 0, "samples": 3, "batch": 2,
                                    "log_uniform": {"optim.lr": ["2**-8", "2**-5"]}}}, "t")
    with pytest.raises(SweepError, match="trial 0 of this tpe search .* is stored as run"):
        run_sweep(other, out, log=lambda s: None)  # same sampler and seed, other range: not mixed in
    assert run_sweep(_search_spec(corpus, seed=5), out, log=lambda s: None).completed == 3  # a second search
    assert sorted(r["search"]["seed"] for r in _records(out)) == [0, 0, 0, 5, 5, 5]


def test_a_search_stopped_by_a_failed_run_resumes_to_the_same_trials(corpus, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    run_sweep(_search_spec(corpus, samples=4), whole, log=lambda s: None)
    execute, calls = sweep_module._execute, []

    def failing_third(config, run_dir):
        calls.append(run_dir)
        return {"error": "Boom"} if len(calls) == 3 else execute(config, run_dir)

    monkeypatch.setattr(sweep_module, "_execute", failing_third)
    cut = tmp_path / "cut"
    logs: list[str] = []
    counts = run_sweep(_search_spec(corpus, samples=4), cut, log=logs.append)
    assert counts.failed == 1 and len(_records(cut)) == 3  # the batch finished; no trial asked after it
    assert any("search stopped at trial 2" in line for line in logs)
    monkeypatch.setattr(sweep_module, "_execute", execute)
    assert run_sweep(_search_spec(corpus, samples=4), cut, log=lambda s: None).completed == 1
    by_trial = {r["trial"]: (r["id"], r["final_val_loss"]) for r in _records(whole)}
    assert {r["trial"]: (r["id"], r["final_val_loss"]) for r in _records(cut)} == by_trial


@pytest.mark.parametrize("table, message", [
    ({"sampler": "bayes"}, "sampler = 'bayes': choose one of random, tpe, cmaes"),
    ({"sampler": "tpe", "batch": 0}, "batch = 0"),
    ({"batch": 2}, "the random sampler takes none"),
])
def test_bad_sampler_settings_are_refused(corpus, table, message):
    with pytest.raises(SweepError, match="\\[random\\]") as error:
        parse_sweep({"base": sweep_base(corpus), "random": {"samples": 2, **table,
                                                            "log_uniform": {"optim.lr": [0.001, 0.01]}}}, "t")
    assert message in str(error.value)


def test_missing_optuna_is_named_with_its_extra(corpus, monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "optuna" else real(name, *a))
    path = tmp_path / "s.toml"
    path.write_text(f'[base.data]\npath = "{corpus}"\n[random]\nsampler = "tpe"\nsamples = 2\n'
                    '[random.log_uniform]\n"optim.lr" = [0.001, 0.01]\n')
    assert main(["sweep", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "pip install 'sparsemup[tune]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
