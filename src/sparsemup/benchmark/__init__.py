"""The benchmark behind ``sparsemup bench`` and docs/PERFORMANCE.md: sparse layers on every backend against
masked dense and torch's CSR (``layers``: grids, tables, thresholds) and a reference-GPT training step
(``gpt_step``: the driver that writes the JSON record). Nothing outside the CLI and scripts imports it; the
calibrated ``auto`` choice times layers with ``sparsemup.sparse.timing``.
"""

from .gpt_step import run, run_gpt_step
from .layers import BENCH_MASKS, FULL, GPU, QUICK, Grid

__all__ = ["BENCH_MASKS", "FULL", "GPU", "QUICK", "Grid", "run", "run_gpt_step"]
