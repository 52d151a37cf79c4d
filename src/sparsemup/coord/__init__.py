"""Coordinate checks: hooks that measure layer RMS across width and density, the reference models'
grids, the verdict against a fixed slope threshold, and figures."""

from .measurement import QUANTITIES, THRESHOLD, Case, check, evaluate, fit_slopes, measure, run, verdict
from .reference import CheckSettings, run_check, write_check

__all__ = ["CheckSettings", "Case", "QUANTITIES", "THRESHOLD", "check", "evaluate", "fit_slopes", "measure", "run",
           "run_check", "verdict", "write_check"]
