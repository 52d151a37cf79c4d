"""µTransfer sweeps and what is made of them: planning and running sweeps into a results store,
analysis and reports, presets, the demo, and the end-to-end benchmark."""

from .report import write_preset, write_report
from .store import ResultStore, StoreError
from .sweep import SweepCounts, SweepError, SweepSpec, load_sweep, parse_sweep, run_sweep

__all__ = ["ResultStore", "StoreError", "SweepCounts", "SweepError", "SweepSpec", "load_sweep", "parse_sweep",
           "run_sweep", "write_preset", "write_report"]
