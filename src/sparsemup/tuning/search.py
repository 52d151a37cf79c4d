"""Adaptive base tuning with Optuna samplers (extra ``sparsemup[tune]``): TPE or CMA-ES over log-uniform ranges.

Trials are asked in batches of ``batch``. Before a batch is asked, the sampler has been told the
result of every earlier trial, in trial order; so trial k is a function of the seed and of the
results before its batch, never of the number of workers or of the order in which runs finish.
A rerun rebuilds the study by asking and telling again from the results store, so a killed search
resumes to the same trials. Records name their search (sampler, seed) and trial, so several
searches share one store; a stored trial the sampler would not propose again (other ranges or
grid, another Optuna version) is refused rather than mixed in.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from typing import Any

from .store import SearchIdentity

__all__ = ["SAMPLERS", "ADAPTIVE_SAMPLERS", "Search", "Study", "require_sampler"]

SAMPLERS = ("random", "tpe", "cmaes")  # random: today's plan drawn once from the seed, no Optuna needed
ADAPTIVE_SAMPLERS = ("tpe", "cmaes")


@dataclass(frozen=True)
class Search:
    """An adaptive search: ``samples`` trials per grid point over log-uniform ``bounds``, ``batch`` at a time."""

    sampler: str
    seed: int
    samples: int
    batch: int
    bounds: dict[str, tuple[float, float]]  # key: (low, high), both > 0

    def identity(self) -> SearchIdentity:
        """What a record names as the search it belongs to (with its trial number)."""
        return {"sampler": self.sampler, "seed": self.seed}


def require_sampler(sampler: str) -> None:
    """A ValueError naming the extra unless the packages ``sampler`` needs can be imported."""
    needs = {"tpe": ("optuna",), "cmaes": ("optuna", "cmaes")}.get(sampler, ())
    missing = [name for name in needs if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"sampler = {sampler!r} needs {' and '.join(missing)}, not installed: "
                         "pip install 'sparsemup[tune]' (or use sampler = \"random\")")


class Study:
    """One Optuna study of a search (minimising the final validation loss); trials asked and told by number."""

    def __init__(self, search: Search) -> None:
        require_sampler(search.sampler)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)
        with warnings.catch_warnings():  # multivariate TPE and the constant liar are marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler: optuna.samplers.BaseSampler = (
                optuna.samplers.TPESampler(seed=search.seed, multivariate=True, constant_liar=True)
                if search.sampler == "tpe" else optuna.samplers.CmaEsSampler(seed=search.seed))
        self._study = optuna.create_study(direction="minimize", sampler=sampler)
        self._space: dict[str, optuna.distributions.BaseDistribution] = {
            key: optuna.distributions.FloatDistribution(low, high, log=True)
            for key, (low, high) in sorted(search.bounds.items())}
        self._open: dict[int, Any] = {}

    def ask(self) -> tuple[int, dict[str, float]]:
        """The next trial: (its number, its values)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's experimental-feature notices, once per ask
            trial = self._study.ask(self._space)
        self._open[trial.number] = trial
        return trial.number, {key: float(value) for key, value in trial.params.items()}

    def tell(self, number: int, loss: float | None) -> None:
        """Report trial ``number``'s final validation loss; None (the run diverged) tells Optuna it failed."""
        import optuna

        trial = self._open.pop(number)
        if loss is None:
            self._study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            self._study.tell(trial, loss)
