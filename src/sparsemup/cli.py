"""The ``sparsemup`` command line: coordinate checks and parameterization tables."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import coord
from .coordcases import COORD_DEFAULTS, GPT_DEFAULTS, MLP_DEFAULTS, gpt_cases, mlp_cases
from .explain import explain
from .models import GPTConfig, build_gpt
from .rules import SCHEMES

__all__ = ["main", "write_json_atomic"]


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _densities(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated densities, got {text!r}") from None
    if not values or any(not (0.0 < v <= 1.0) for v in values):
        raise argparse.ArgumentTypeError(f"densities must be in (0, 1], got {text!r}")
    return values


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temp file beside ``path`` and rename it in place: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _coord_check(args: argparse.Namespace) -> int:
    defaults = COORD_DEFAULTS[args.model]
    widths = args.widths or defaults["widths"]
    densities = args.densities or defaults["densities"]
    lr = args.lr if args.lr is not None else defaults["lr"]
    base_width = args.base_width or defaults["base_width"]
    batch_size = args.batch_size or (MLP_DEFAULTS if args.model == "mlp" else GPT_DEFAULTS)["batch_size"]
    settings = {
        "model": args.model, "scheme": args.scheme, "widths": widths, "densities": densities,
        "steps": args.steps, "seeds": args.seeds, "base_width": base_width, "base_density": 1.0,
        "optimizer": "Adam", "lr": lr, "batch": defaults["batch"].format(batch_size), "data": defaults["data"],
        "threshold": coord.THRESHOLD,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    make = gpt_cases if args.model == "gpt" else mlp_cases
    total = len(widths) * len(densities) * args.seeds
    bar = tqdm(total=total, desc=f"coord-check {args.model}/{args.scheme}", unit="model", file=sys.stderr)

    def progress(case: coord.Case) -> None:
        bar.set_postfix(width=case.width, density=f"{case.density:g}", seed=case.seed)
        bar.update(1)

    start = time.perf_counter()
    rows = coord.run(make(args.scheme, widths, densities, args.seeds, base_width, batch_size), torch.optim.Adam,
                     lr, args.steps, progress)
    bar.close()
    fits = coord.fit_slopes(rows)
    verdict = coord.verdict(fits)
    result = {"scheme": args.scheme, "settings": settings, "verdict": verdict, "slopes": fits,
              "measurements": rows, "seconds": round(time.perf_counter() - start, 1)}
    write_json_atomic(args.out / "coord.json", result)
    from .figures import plot_coord

    figures = plot_coord(rows, args.out, f"{args.model} / {args.scheme}", args.steps)
    _print_summary(args, fits, verdict, figures)
    failed = any(v["pass"] is False for v in verdict.values())
    return 1 if (args.strict and failed) else 0


def _print_summary(args: argparse.Namespace, fits: list[dict], verdict: dict, figures: list[Path]) -> None:
    print(f"\ncoordinate check: {args.model}, scheme {args.scheme} (max |log-log slope| over hidden layers)")
    print(f"{'quantity':10s} {'vs width':>9s} {'vs density':>11s}")
    for quantity in coord.QUANTITIES:
        row = [f for f in fits if f["role"] == "hidden" and f["quantity"] == quantity]
        cells = []
        for key in ("width_slope", "density_slope"):
            values = [abs(f[key]) for f in row if f[key] is not None]
            cells.append(f"{max(values):.3f}" if values else "-")
        print(f"{quantity:10s} {cells[0]:>9s} {cells[1]:>11s}")
    for axis, v in verdict.items():
        if v["pass"] is None:
            print(f"{axis:8s} verdict: not measured (one {axis} only)")
            continue
        worst = v["worst"]
        print(f"{axis:8s} verdict: {'PASS' if v['pass'] else 'FAIL'}  max |slope| {v['max_abs_slope']:.3f} "
              f"(threshold {v['threshold']}; worst: {worst['layer']} {worst['quantity']} step {worst['step']})")
    by_width = verdict["density"].get("max_abs_slope_by_width")
    if by_width and len(by_width) > 1:
        print("max |density slope| at each width: "
              + ", ".join(f"{w}: {v:.3f}" for w, v in by_width.items() if v is not None))
    print(f"wrote {args.out / 'coord.json'}" + "".join(f", {p}" for p in figures))


def _explain(args: argparse.Namespace) -> int:
    cfg = GPTConfig(width=args.width, depth=args.depth, head_dim=args.head_dim)
    model, _ = build_gpt(cfg, args.base_width, scheme=args.scheme, density=args.density)
    print(explain(model, args.optimizer))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsemup", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    cc = sub.add_parser("coord-check", help="measure that a scheme keeps activations and updates Θ(1)",
                        description="Train each (width, density, seed) a few Adam steps on one fixed synthetic "
                        "batch and fit log-log slopes of layer RMS against width and density. "
                        "See docs/COORD_CHECK.md.")
    cc.add_argument("--model", choices=("mlp", "gpt"), default="gpt")
    cc.add_argument("--scheme", choices=tuple(SCHEMES), default="supar")
    cc.add_argument("--widths", type=_ints, help="comma-separated widths (default: per model)")
    cc.add_argument("--densities", type=_densities, help="comma-separated densities in (0, 1] (default: per model)")
    cc.add_argument("--steps", type=int, default=5, help="training steps per model (default 5)")
    cc.add_argument("--seeds", type=int, default=2,
                    help="seeds 0..N-1; each draws its own init, masks and batch; RMS is averaged over seeds")
    cc.add_argument("--base-width", type=int, help="width of the dense base model (default 64)")
    cc.add_argument("--lr", type=float, help="base Adam learning rate η_base (default: per model)")
    cc.add_argument("--batch-size", type=int,
                    help="samples (MLP, default 256) or 64-token sequences (GPT, default 2) in the fixed batch")
    cc.add_argument("--out", type=Path, default=Path("coord-check"), help="output directory (default ./coord-check)")
    cc.add_argument("--strict", action="store_true", help="exit with status 1 when a verdict fails")
    cc.set_defaults(func=_coord_check)

    ex = sub.add_parser("explain", help="print the per-parameter table of the reference GPT")
    ex.add_argument("--scheme", choices=tuple(SCHEMES), default="supar")
    ex.add_argument("--width", type=int, default=256)
    ex.add_argument("--base-width", type=int, default=64)
    ex.add_argument("--depth", type=int, default=2)
    ex.add_argument("--head-dim", type=int, default=64)
    ex.add_argument("--density", type=float, default=0.25)
    ex.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    ex.set_defaults(func=_explain)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("steps", "seeds", "batch_size", "base_width"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            build_parser().error(f"--{flag.replace('_', '-')} must be at least 1")
    try:
        return args.func(args)
    except ValueError as err:
        print(f"sparsemup: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
