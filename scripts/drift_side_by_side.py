"""Best LR per density and its drift, for several sweep stores side by side (docs/MODELS.md).

Reads each store's report.json (``sparsemup report DIR`` writes it) and prints, per scheme, the
optimum log2 LR at each of the given densities (the report's optimum, sparsemup.tuning.estimate; an
optimum on the grid's edge is marked, a flat curve, with no optimum within noise, is marked and left
out) and the drift: the largest minus the smallest of the located ones. Run from the
repository root, e.g.:

    sparsemup report results/hf-llama-lr-density > /dev/null
    python scripts/drift_side_by_side.py results/a-lr-density-untuned results/hf-llama-lr-density
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def optima(directory: Path) -> dict[tuple[str, float], tuple[float, str | None, float]]:
    """{(scheme, density): (best log2 lr, edge or "flat", best loss)} from a store's report.json."""
    report = json.loads((directory / "report.json").read_text())
    out = {}
    for curve in report["curves"]:
        setting, best = curve["setting"], curve["optimum"]
        if best is not None:
            mark = best.get("edge") or ("flat" if best.get("flat") else None)
            out[(setting["model.scheme"], float(setting["model.density"]))] = (best["log2_x"], mark, best["loss"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stores", nargs="+", type=Path)
    parser.add_argument("--densities", default="1,0.25,0.0625", help="comma-separated densities")
    parser.add_argument("--schemes", default="sp,supar")
    args = parser.parse_args()
    densities = [float(d) for d in args.densities.split(",")]
    print("| store | scheme | " + " | ".join(f"best log2 lr at ρ = {d:g}" for d in densities) + " | drift |")
    print("|---|---|" + "---|" * len(densities) + "---|")
    for store in args.stores:
        found = optima(store)
        for scheme in args.schemes.split(","):
            cells, values = [], []
            for density in densities:
                if (scheme, density) not in found:
                    cells.append("–")
                    continue
                x, mark, loss = found[(scheme, density)]
                if mark != "flat":
                    values.append(x)
                cells.append(f"{x:.2f}" + {None: "", "flat": " (flat)"}.get(mark, " (edge)") + f", loss {loss:.3f}")
            drift = f"{max(values) - min(values):.2f}" if len(values) > 1 else "–"
            print(f"| {store.name} | {scheme} | " + " | ".join(cells) + f" | {drift} |")


if __name__ == "__main__":
    main()
