"""Coordinate checks: hooks that measure layer RMS across width and density, the reference models'
grids, the verdict against a fixed slope threshold, and figures."""

from .measurement import (
    QUANTITIES,
    THRESHOLD,
    UNSTABLE,
    Case,
    check,
    evaluate,
    fit_slopes,
    measure,
    run,
    unstable_cases,
    verdict,
)
from .reference import CheckRecord, DepthCheckRecord, across_depth, run_check, write_check
from .settings import CheckSettings

__all__ = ["CheckSettings", "CheckRecord", "DepthCheckRecord", "Case", "QUANTITIES", "THRESHOLD", "UNSTABLE",
           "across_depth", "check", "evaluate", "fit_slopes", "measure", "run", "run_check", "unstable_cases",
           "verdict", "write_check"]
