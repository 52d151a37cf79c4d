"""Coordinate checks: hooks that measure layer RMS across width and density, the reference models'
grids, the verdict against a fixed slope threshold, and figures."""

from .check import CheckSettings, run_check, write_check
from .measurement import QUANTITIES, THRESHOLD, Case, fit_slopes, measure, run, verdict

__all__ = ["CheckSettings", "Case", "QUANTITIES", "THRESHOLD", "fit_slopes", "measure", "run", "run_check",
           "verdict", "write_check"]
