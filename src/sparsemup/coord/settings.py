"""The settings of a coordinate check, declared once: each field carries its documentation and how the command
line gives it (``sparsemup coord-check`` builds its flags from them); ``resolve`` fills the model's defaults."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field, fields
from fractions import Fraction
from typing import Any, Literal, TypedDict, get_args

from ..core.rules import check_depth_alpha
from ..core.vocab import BACKEND_CHOICES, SCHEME_NAMES, BackendChoice, hf_model_spec
from ..dynamic import METHOD_NAMES, SET, DynamicSparsity, RigL
from ..sparse import Fixes, check_backend
from .cases import COORD_DEFAULTS, GPT_DEFAULTS, HF_DEFAULTS, MLP_DEFAULTS
from .measurement import THRESHOLD, MaskUpdates

__all__ = ["CheckSettings", "RecordedSettings", "ModelName", "MODEL_NAMES", "model_family", "parse_model",
           "parse_count", "parse_counts", "parse_densities", "setting_fields"]

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


def parse_count(text: str) -> int:
    """A count given as text: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")
    return value


def parse_counts(text: str) -> list[int]:
    """Comma-separated positive integers, e.g. ``64,128``."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"expected positive integers, got {text!r}")
    return values


def parse_densities(text: str) -> list[float]:
    """Comma-separated densities in (0, 1], fractions allowed: ``1/16,0.25``."""
    try:
        values = [float(Fraction(v.strip())) for v in text.split(",") if v.strip()]
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"expected comma-separated densities such as 1/16,0.25, got {text!r}") from None
    if not values or any(not (0.0 < v <= 1.0) for v in values):
        raise ValueError(f"densities must be in (0, 1], got {text!r}")
    return values


def _setting(doc: str, parse: Callable[[str], Any] | None = None, *, default: Any = MISSING, unset: Any = None,
             choices: tuple[str, ...] = (), flag: str | None = None, metavar: str | None = None) -> Any:
    """A setting with its documentation and command-line form.

    default: the dataclass default (none: ``resolve`` always sets it). unset: the value when not given, on the
    command line and in ``resolve`` (None: ``resolve`` derives it, mostly from the model's defaults).
    parse: the text's parser (raises ValueError); choices: the accepted strings; flag: the option's name
    (default ``--`` and the field's name with dashes)."""
    return field(default=default, metadata={"doc": doc, "parse": parse, "unset": unset, "choices": choices,
                                            "flag": flag, "metavar": metavar})


def setting_fields() -> tuple[Field[Any], ...]:
    """The settings' fields, in declaration order: their metadata gives the command line."""
    return fields(CheckSettings)


COORD_FIXES = Fixes(block_masks="add --blocks B, or use --backend rows for the paper's row masks",
                    masked_dense="drop --backend", element_masks="drop --blocks")


class _RecordedSparsity(TypedDict):
    method: str
    update_every: int
    stop_step: int
    update_fraction: float


class _RecordedBase(TypedDict):
    model: str
    scheme: str
    widths: list[int]
    densities: list[float]
    steps: int
    seeds: int
    base_width: int
    base_density: float
    optimizer: str
    lr: float
    batch: str
    data: str
    threshold: float
    masks: str
    backend: str


class RecordedSettings(_RecordedBase, total=False):
    """The settings as coord.json records them (``CheckSettings.describe``): hf models add depth and head_dim,
    dynamic masks their sparsity, the check across depth its depths and rule."""

    depth: int
    head_dim: int
    sparsity: _RecordedSparsity
    depths: list[int]
    depth_alpha: float | None
    base_depth: int | None
    depth_quantities: str


@dataclass(frozen=True)
class CheckSettings:
    """The grid and training of one coordinate check; ``resolve`` fills the model's defaults."""

    model: str = _setting("mlp, gpt (the reference models) or hf:TYPE, a transformers causal LM: a model type "
                          "(hf:llama, hf:gpt2, hf:qwen2, ...) or hf:path/to/config.json (needs sparsemup[hf])",
                          parse_model, unset="gpt")
    scheme: str = _setting("the parameterization: sp, mup, supar (or an ablation: mup+density_init, "
                           "mup+density_lr)", unset="supar", choices=SCHEME_NAMES)
    widths: list[int] = _setting("comma-separated widths (default: per model)", parse_counts)
    densities: list[float] = _setting("comma-separated densities in (0, 1] (default: per model)", parse_densities)
    steps: int = _setting("training steps per model (default 5; 20 with a dynamic --sparsity-method)", parse_count)
    seeds: int = _setting("seeds 0..N-1; each draws its own init, masks and batch; RMS is averaged over seeds",
                          parse_count, unset=2)
    base_width: int = _setting("width of the dense base model (default 64)", parse_count)
    lr: float = _setting("base Adam learning rate η_base (default: per model)", float)
    batch_size: int = _setting("samples (MLP, default 256) or 64-token sequences (GPT, default 2) in the fixed batch",
                               parse_count)
    block: int | None = _setting("use B×B block masks (needs B ≤ density·width at every grid point), run on "
                                 "--backend", int, default=None, flag="--blocks", metavar="B")
    backend: BackendChoice = _setting("how the sparse cases' masked layers run (default: blocks with --blocks, else "
                                      "masked_dense; rows: row-sparse native kernels; auto: calibrated on this "
                                      "machine)", default="masked_dense", choices=BACKEND_CHOICES)
    depth: int | None = _setting("hf: num_hidden_layers (default 2)", parse_count, default=None)
    head_dim: int | None = _setting("hf: the head dim, fixed as heads grow with width (default 64)", parse_count,
                                    default=None)
    sparsity_method: str = _setting("how the sparse cases' masks evolve: static, set or rigl (drop 30% of kept "
                                    "weights by magnitude and regrow, every --update-every steps until 3/4 of "
                                    "--steps); see docs/DYNAMIC.md", default="static", unset="static",
                                    choices=METHOD_NAMES)
    update_every: int = _setting("steps between mask updates (default 5)", parse_count, default=5, unset=5)
    depths: list[int] | None = _setting("comma-separated numbers of blocks: the check across depth (reference GPT; "
                                        "slopes of the last block's output and each block's update against depth)",
                                        parse_counts, default=None)
    depth_alpha: float | None = _setting("with --depths: the depth rule of the models, 1 (CompleteP) or 0.5 "
                                         "(depth-µP); default none", float, default=None)
    base_depth: int | None = _setting("with --depths: the depth rule's base depth (default: the smallest of "
                                      "--depths)", int, default=None)

    @classmethod
    def resolve(cls, model: str, scheme: str, **given: Any) -> CheckSettings:
        """Settings from the ``given`` ones (keywords named as the fields; a missing or None one is unset), every
        unset value taken from ``COORD_DEFAULTS`` of ``model`` (``steps``: 5, or 20 with a dynamic
        ``sparsity_method`` so that updates happen inside the check; ``backend``: blocks with ``block``, else
        masked dense). With ``depths`` the check runs across depth (reference GPT, static masks, masked dense)
        with the depth rule ``depth_alpha`` (none: none) and ``base_depth`` (default: the smallest depth)."""
        known = {f.name: f.metadata["unset"] for f in fields(cls)}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise TypeError(f"CheckSettings.resolve: unknown settings {', '.join(unknown)}; known: {', '.join(known)}")
        v = {**known, **{k: x for k, x in given.items() if x is not None}, "model": model, "scheme": scheme}
        family = model_family(parse_model(model))
        v["base_depth"] = _check_depth_settings(model, v["depths"], v["depth_alpha"], v["base_depth"], v["block"],
                                                v["backend"], v["sparsity_method"], v["depth"])
        if v["sparsity_method"] not in COORD_METHODS:
            raise ValueError(f"unknown sparsity method {v['sparsity_method']!r} for the coordinate check: use "
                             f"{', '.join(COORD_METHODS)} (gmp changes the density during the check, so the "
                             "density axis would not hold one density)")
        v["backend"] = v["backend"] or ("blocks" if v["block"] else "masked_dense")
        check_backend(v["backend"], "blocks" if v["block"] else "rows", v["sparsity_method"], COORD_FIXES)
        if v["steps"] is None:
            v["steps"] = 5 if v["sparsity_method"] == "static" else 20
        _check_family(family, model, v["depth"], v["head_dim"], v["block"])
        defaults = COORD_DEFAULTS[family]
        sizes = {"mlp": MLP_DEFAULTS, "gpt": GPT_DEFAULTS, "hf": HF_DEFAULTS}[family]
        v["widths"] = v["widths"] or defaults["widths"]
        v["base_width"] = v["base_width"] or defaults["base_width"]
        narrow = [w for w in v["widths"] if w < v["base_width"]]
        if narrow:
            raise ValueError(f"--widths {','.join(map(str, narrow))} below the base width {v['base_width']}: the "
                             "check measures models at least as wide as their base; lower --base-width or drop "
                             "those widths")
        v["densities"] = v["densities"] or defaults["densities"]
        v["lr"] = v["lr"] if v["lr"] is not None else defaults["lr"]
        v["batch_size"] = v["batch_size"] or sizes["batch_size"]
        if family == "hf":
            v["depth"] = v["depth"] or (None if v["depths"] else sizes["depth"])
            v["head_dim"] = v["head_dim"] or sizes["head_dim"]
        settings = cls(**v)
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

    def describe(self) -> RecordedSettings:
        """The settings as recorded in coord.json."""
        defaults = COORD_DEFAULTS[model_family(self.model)]
        recorded: RecordedSettings = {
            "model": self.model, "scheme": self.scheme, "widths": self.widths, "densities": self.densities,
            "steps": self.steps, "seeds": self.seeds, "base_width": self.base_width, "base_density": 1.0,
            "optimizer": "Adam", "lr": self.lr, "batch": defaults["batch"].format(self.batch_size),
            "data": defaults["data"], "threshold": THRESHOLD,
            "masks": f"blocks (b = {self.block})" if self.block else "rows", "backend": self.backend,
        }
        if self.depth is not None:
            recorded["depth"] = self.depth
        if self.head_dim is not None:
            recorded["head_dim"] = self.head_dim
        method = self.method()
        if method is not None:
            recorded["sparsity"] = {"method": self.sparsity_method, "update_every": method.update_every,
                                    "stop_step": method.stop_step, "update_fraction": method.fraction}
        if self.depths:
            recorded.update({"depths": self.depths, "depth_alpha": self.depth_alpha, "base_depth": self.base_depth,
                             "depth_quantities": "act: RMS of the last block's output (reported); delta: RMS of its "
                             "change since step 0 (judged); block_delta: depth x mean over blocks of the RMS of the "
                             "change of each block's own update, output minus input re-run on its step-0 input "
                             "(judged)"})
        return recorded


def _check_family(family: str, model: str, depth: int | None, head_dim: int | None, block: int | None) -> None:
    """The settings that only some model families take."""
    if family != "hf" and (depth is not None or head_dim is not None):
        raise ValueError("--depth and --head-dim apply to --model hf:TYPE only")
    if family == "hf" and block:
        raise ValueError("--blocks is not supported with --model hf:TYPE in coord-check (block masks of a "
                         "transformers model are a library option: sparsemup.hf.build(..., mask_kind='blocks'))")
    if family == "hf":  # the extra and the model type, before anything is written
        from .. import hf  # needs sparsemup[hf]; its error names the extra

        hf.small_config(str(hf_model_spec(model)))


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
