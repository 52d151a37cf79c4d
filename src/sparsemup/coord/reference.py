"""A whole coordinate check of a reference model (MLP or GPT): settings, measurement, verdict and files.

The one sequence behind ``sparsemup coord-check`` and the demo's first part; ``measurement.check``
is the same for a model family of your own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from ..core.atomic import make_dirs, write_json_atomic
from ..core.rules import check_depth_alpha
from ..core.vocab import BackendChoice, hf_model_spec
from ..dynamic import SET, DynamicSparsity, RigL
from ..sparse import Fixes, check_backend
from .cases import COORD_DEFAULTS, GPT_DEFAULTS, HF_DEFAULTS, MLP_DEFAULTS, gpt_cases, hf_cases, mlp_cases
from .depth import DepthCase, depth_cases, evaluate_depth, hf_depth_cases
from .measurement import THRESHOLD, Case, MaskUpdates, evaluate

__all__ = ["CheckSettings", "ModelName", "MODEL_NAMES", "model_family", "parse_model", "run_check", "write_check",
           "verdict_summary"]

ModelName = Literal["mlp", "gpt"]  # the reference models a check can build
MODEL_NAMES: tuple[ModelName, ...] = get_args(ModelName)
COORD_METHODS = ("static", "set", "rigl")  # mask evolutions a check compares at fixed densities


def parse_model(text: str) -> str:
    """A --model value: a reference model name or ``hf:TYPE`` (a transformers model type or config.json)."""
    if text in MODEL_NAMES or hf_model_spec(text) is not None:
        return text
    raise ValueError(f"unknown model {text!r}: use {', '.join(MODEL_NAMES)} or hf:TYPE (a transformers model type "
                     "such as hf:llama, hf:gpt2, hf:qwen2, or hf:path/to/config.json)")


def model_family(model: str) -> str:
    """The key of ``COORD_DEFAULTS`` for a --model value: mlp, gpt or hf."""
    return "hf" if hf_model_spec(model) is not None else model


COORD_FIXES = Fixes(block_masks="add --blocks B, or use --backend rows for the paper's row masks",
                    masked_dense="drop --backend", element_masks="drop --blocks")


@dataclass(frozen=True)
class CheckSettings:
    """The grid and training of one coordinate check; ``resolve`` fills the model's defaults."""

    model: str  # a ModelName or hf:TYPE
    scheme: str
    widths: list[int]
    densities: list[float]
    steps: int
    seeds: int
    base_width: int
    lr: float
    batch_size: int
    block: int | None = None  # b of block masks; None: row masks
    backend: BackendChoice = "masked_dense"  # how the sparse cases' masked layers run
    depth: int | None = None  # hf: num_hidden_layers
    head_dim: int | None = None  # hf: the fixed head dim
    sparsity_method: str = "static"  # static, set or rigl: how the sparse cases' masks evolve
    update_every: int = 5  # set/rigl: steps between mask updates
    depths: list[int] | None = None  # the depth axis (docs/COORD_CHECK.md): numbers of blocks; None: no depth check
    depth_alpha: float | None = None  # the depth rule of the depth check's models (None: none)
    base_depth: int | None = None  # L_base of the depth rule (and the base case's depth)

    @classmethod
    def resolve(cls, model: str, scheme: str, widths: list[int] | None = None,
                densities: list[float] | None = None, steps: int | None = None, seeds: int = 2,
                base_width: int | None = None, lr: float | None = None, batch_size: int | None = None,
                block: int | None = None, backend: BackendChoice | None = None, depth: int | None = None,
                head_dim: int | None = None, sparsity_method: str = "static",
                update_every: int = 5, depths: list[int] | None = None, depth_alpha: float | None = None,
                base_depth: int | None = None) -> CheckSettings:
        """Settings with every unset value taken from ``COORD_DEFAULTS`` of ``model`` (``steps`` None: 5, or
        20 with a dynamic ``sparsity_method`` so that updates happen inside the check; ``backend`` None: blocks
        with ``block``, else masked dense). With ``depths`` the check runs across depth (reference GPT, static
        masks, masked dense) with the depth rule ``depth_alpha`` (None: none) and ``base_depth`` (default: the
        smallest depth)."""
        family = model_family(parse_model(model))
        base_depth = _check_depth_settings(model, depths, depth_alpha, base_depth, block, backend, sparsity_method,
                                           depth)
        if sparsity_method not in COORD_METHODS:
            raise ValueError(f"unknown sparsity method {sparsity_method!r} for the coordinate check: use "
                             f"{', '.join(COORD_METHODS)} (gmp changes the density during the check, so the "
                             "density axis would not hold one density)")
        backend = backend or ("blocks" if block else "masked_dense")
        check_backend(backend, "blocks" if block else "rows", sparsity_method, COORD_FIXES)
        steps = steps if steps is not None else 5 if sparsity_method == "static" else 20
        defaults = COORD_DEFAULTS[family]
        sizes = {"mlp": MLP_DEFAULTS, "gpt": GPT_DEFAULTS, "hf": HF_DEFAULTS}[family]
        if family != "hf" and (depth is not None or head_dim is not None):
            raise ValueError("--depth and --head-dim apply to --model hf:TYPE only")
        if family == "hf" and block:
            raise ValueError("--blocks is not supported with --model hf:TYPE in coord-check (block masks of a "
                             "transformers model are a library option: sparsemup.hf.build(..., mask_kind='blocks'))")
        if family == "hf":  # the extra and the model type, before anything is written
            from .. import hf  # needs sparsemup[hf]; its error names the extra

            hf.small_config(str(hf_model_spec(model)))
        narrow = [w for w in widths or defaults["widths"] if w < (base_width or defaults["base_width"])]
        if narrow:
            raise ValueError(f"--widths {','.join(map(str, narrow))} below the base width "
                             f"{base_width or defaults['base_width']}: the check measures models at least as wide as "
                             "their base; lower --base-width or drop those widths")
        settings = cls(model, scheme, widths or defaults["widths"], densities or defaults["densities"], steps, seeds,
                       base_width or defaults["base_width"], lr if lr is not None else defaults["lr"],
                       batch_size or sizes["batch_size"], block, backend,
                       depth or (sizes["depth"] if family == "hf" and not depths else None),
                       head_dim or (sizes["head_dim"] if family == "hf" else None), sparsity_method, update_every,
                       depths, depth_alpha, base_depth)
        settings.method()  # a cadence without an update inside the check is an error now
        return settings

    def method(self) -> RigL | None:
        """The dynamic-sparsity method of the sparse cases (None: static masks): updates every ``update_every``
        steps until 3/4 of the check, 30% of the kept weights (RigL: decayed by cosine)."""
        if self.sparsity_method == "static":
            return None
        kind = SET if self.sparsity_method == "set" else RigL
        try:
            return kind(stop_step=int(0.75 * self.steps + 0.5), update_every=self.update_every, fraction=0.3)
        except ValueError as error:
            raise ValueError(f"--sparsity-method {self.sparsity_method} with --steps {self.steps}: {error}") from None

    def mask_updates(self) -> MaskUpdates | None:
        """``mask_updates(model, seed)`` for ``measurement.run``, or None for static masks."""
        method = self.method()
        if method is None:
            return None
        return lambda model, seed: DynamicSparsity(model, method, seed=seed)

    @property
    def total(self) -> int:
        """Models to build and measure: the grid, and the base once per seed (to judge stability)."""
        return (len(self.widths) * len(self.densities) * len(self.depths or [1]) + 1) * self.seeds

    def describe(self) -> dict[str, Any]:
        """The settings as recorded in coord.json."""
        defaults = COORD_DEFAULTS[model_family(self.model)]
        hf = {k: v for k, v in (("depth", self.depth), ("head_dim", self.head_dim)) if v is not None}
        return {
            "model": self.model, "scheme": self.scheme, "widths": self.widths, "densities": self.densities,
            "steps": self.steps, "seeds": self.seeds, "base_width": self.base_width, "base_density": 1.0,
            "optimizer": "Adam", "lr": self.lr, "batch": defaults["batch"].format(self.batch_size),
            "data": defaults["data"], "threshold": THRESHOLD,
            "masks": f"blocks (b = {self.block})" if self.block else "rows",
            "backend": self.backend, **hf,
            **self._sparsity(),
            **({"depths": self.depths, "depth_alpha": self.depth_alpha, "base_depth": self.base_depth,
                "depth_quantities": "act: RMS of the last block's output (reported); delta: RMS of its change "
                                    "since step 0 (judged); block_delta: depth x mean over blocks of the RMS of the "
                                    "change of each block's own update, output minus input re-run on its step-0 "
                                    "input (judged)"}
               if self.depths else {}),
        }

    def _sparsity(self) -> dict[str, Any]:
        """The dynamic masks' settings as recorded in coord.json (nothing for static masks)."""
        method = self.method()
        if method is None:
            return {}
        return {"sparsity": {"method": self.sparsity_method, "update_every": method.update_every,
                             "stop_step": method.stop_step, "update_fraction": method.fraction}}


def run_check(settings: CheckSettings, progress: Callable[[Case | DepthCase], None] | None = None) -> dict[str, Any]:
    """Measure every case with Adam; returns {scheme, settings, verdict, slopes, measurements, seconds}."""
    s = settings
    spec = hf_model_spec(s.model)
    if s.depths:
        assert s.base_depth is not None  # resolve sets it with depths
        grid = (s.scheme, s.widths, s.densities, s.depths, s.seeds, s.base_width, s.depth_alpha, s.base_depth,
                s.batch_size)
        depth_grid = depth_cases(*grid) if spec is None else hf_depth_cases(spec, *grid, s.head_dim)
        found = evaluate_depth(depth_grid, s.lr, s.steps, progress)
        return {"scheme": settings.scheme, "settings": settings.describe(), **found}
    if spec is not None:
        cases = hf_cases(spec, s.scheme, s.widths, s.densities, s.seeds, s.base_width,
                         s.batch_size, s.depth, s.head_dim, s.backend)
    else:
        make = gpt_cases if s.model == "gpt" else mlp_cases
        cases = make(s.scheme, s.widths, s.densities, s.seeds, s.base_width, s.batch_size, s.block, s.backend)
    found = evaluate(cases, torch.optim.Adam, settings.lr, settings.steps, progress, settings.mask_updates())
    return {"scheme": settings.scheme, "settings": settings.describe(), **found}


def _check_depth_settings(model: str, depths: list[int] | None, depth_alpha: float | None, base_depth: int | None,
                          block: int | None, backend: BackendChoice | None, sparsity_method: str,
                          depth: int | None) -> int | None:
    """The depth check's settings are consistent; returns the base depth (default: the smallest depth)."""
    if not depths:
        if depth_alpha is not None or base_depth is not None:
            raise ValueError("--depth-alpha and --base-depth apply to the check across depth: add --depths")
        return None
    if model == "mlp":
        raise ValueError("--depths runs a transformer (--model gpt or hf:TYPE): the MLP has no residual blocks")
    if block or (backend or "masked_dense") != "masked_dense" or sparsity_method != "static":
        raise ValueError("--depths measures static row masks on masked dense: drop --blocks, --backend and "
                         "--sparsity-method")
    if depth is not None:
        raise ValueError("--depth and --depths together: --depths gives the numbers of layers of the check across "
                         "depth; drop --depth")
    if any(d < 1 for d in depths) or len(set(depths)) < 2:
        raise ValueError(f"--depths {','.join(map(str, depths))}: give at least two different depths, each >= 1")
    check_depth_alpha(depth_alpha)
    if base_depth is not None and base_depth < 1:
        raise ValueError(f"--base-depth {base_depth}: must be at least 1")
    return base_depth or min(depths)


def write_check(result: dict[str, Any], out: Path) -> list[Path]:
    """Write coord.json and the width/density figures (or, across depth, the depth figure) into ``out``; returns
    the figures' paths."""
    from .figures import plot_coord, plot_depth

    out = Path(out)
    make_dirs(out)
    write_json_atomic(out / "coord.json", result)
    s = result["settings"]
    if s.get("depths"):
        return [plot_depth(result["slopes"], out, f"{s['model']} / {s['scheme']} / depth_alpha {s['depth_alpha']}",
                           s["steps"])]
    return plot_coord(result["measurements"], out, f"{s['model']} / {s['scheme']}", s["steps"])


def verdict_summary(found: dict[str, dict[str, Any]]) -> str:
    """``width PASS (max |slope| 0.05), density FAIL (...)`` of a verdict."""
    return ", ".join(f"{axis} {'PASS' if v['pass'] else 'FAIL'} (max |slope| {v['max_abs_slope']:.2f})"
                     for axis, v in found.items())
