"""A whole coordinate check of a reference model (MLP or GPT): measurement, verdict and files.

The one sequence behind ``sparsemup coord-check`` and the demo's first part; ``measurement.check``
is the same for a model family of your own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeGuard, cast

import torch

from ..core.atomic import make_dirs, write_json_atomic
from ..core.vocab import hf_model_spec
from .cases import gpt_cases, hf_cases, mlp_cases
from .depth import DepthEvaluation, DepthVerdict, depth_cases, evaluate_depth, hf_depth_cases
from .measurement import AxisVerdict, Case, Evaluation, evaluate
from .settings import CheckSettings, RecordedSettings

__all__ = ["CheckRecord", "DepthCheckRecord", "run_check", "across_depth", "write_check", "verdict_summary"]


class CheckRecord(Evaluation):
    """coord.json of a check across width and density: the evaluation, its scheme and settings."""

    scheme: str
    settings: RecordedSettings


class DepthCheckRecord(DepthEvaluation):
    """coord.json of a check across depth: the evaluation, its scheme and settings."""

    scheme: str
    settings: RecordedSettings


def run_check(settings: CheckSettings,
              progress: Callable[[Case], None] | None = None) -> CheckRecord | DepthCheckRecord:
    """Measure every case with Adam; returns {scheme, settings, verdict, slopes, measurements, losses, seconds}
    (across depth with ``settings.depths``: ``across_depth`` tells which)."""
    s = settings
    spec = hf_model_spec(s.model)
    if s.depths:
        assert s.base_depth is not None  # resolve sets it with depths
        if spec is None:
            depth_grid = depth_cases(s.scheme, s.widths, s.densities, s.depths, s.seeds, s.base_width, s.depth_alpha,
                                     s.base_depth, batch_size=s.batch_size)
        else:
            depth_grid = hf_depth_cases(spec, s.scheme, s.widths, s.densities, s.depths, s.seeds, s.base_width,
                                        s.depth_alpha, s.base_depth, batch_size=s.batch_size, head_dim=s.head_dim)
        depth_found = evaluate_depth(depth_grid, s.lr, s.steps, progress)
        return {"scheme": s.scheme, "settings": s.describe(), **depth_found}
    if spec is not None:
        cases = hf_cases(spec, s.scheme, s.widths, s.densities, s.seeds, s.base_width, batch_size=s.batch_size,
                         depth=s.depth, head_dim=s.head_dim, backend=s.backend)
    else:
        make = gpt_cases if s.model == "gpt" else mlp_cases
        cases = make(s.scheme, s.widths, s.densities, s.seeds, s.base_width, batch_size=s.batch_size, block=s.block,
                     backend=s.backend)
    found = evaluate(cases, torch.optim.Adam, s.lr, s.steps, progress, s.mask_updates())
    return {"scheme": s.scheme, "settings": s.describe(), **found}


def across_depth(record: CheckRecord | DepthCheckRecord) -> TypeGuard[DepthCheckRecord]:
    """Whether a check's record is of the check across depth."""
    return bool(record["settings"].get("depths"))


def write_check(result: CheckRecord | DepthCheckRecord, out: Path) -> list[Path]:
    """Write coord.json and the width/density figures (or, across depth, the depth figure) into ``out``; returns
    the figures' paths."""
    from .figures import plot_coord, plot_depth

    out = Path(out)
    make_dirs(out)
    write_json_atomic(out / "coord.json", result)
    s = result["settings"]
    if across_depth(result):
        return [plot_depth(result["slopes"], out, f"{s['model']} / {s['scheme']} / depth_alpha {s['depth_alpha']}",
                           s["steps"])]
    return plot_coord(cast(CheckRecord, result)["measurements"], out, f"{s['model']} / {s['scheme']}", s["steps"])


def verdict_summary(found: Mapping[str, AxisVerdict | DepthVerdict]) -> str:
    """``width PASS (max |slope| 0.05), density FAIL (...)`` of a verdict."""
    return ", ".join(f"{axis} {'PASS' if v['pass'] else 'FAIL'} (max |slope| {v['max_abs_slope']:.2f})"
                     for axis, v in found.items())
