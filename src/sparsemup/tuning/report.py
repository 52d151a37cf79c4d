"""Report of a sweep directory: tables of optima and drift, loss-vs-log2(x) figures and report.md."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypedDict

from ..core.atomic import write_atomic, write_json_atomic, write_text_atomic
from .analysis import REFERENCE, SEED_KEY, Analysis, Curve, Drift, analyze, setting_label
from .store import STORE_NAME, ConfigValue, ResultStore, RunRecord, StoreError

__all__ = ["Preset", "load_records", "merge_records", "optimum_cell", "preset_values", "tables", "plot_curves",
           "with_interval", "write_report", "write_preset"]

LINE_KEYS = ("model.density", "model.width", "model.depth")  # a line per value of the first that varies


class Preset(TypedDict):
    """What ``write_preset`` wrote: the runs it took the values from, and the values."""

    runs: list[RunRecord]
    values: dict[str, ConfigValue]


def load_records(out: Path) -> list[RunRecord]:
    """The records of a sweep directory's store; an error naming the fix when there is none."""
    path = Path(out) / STORE_NAME
    if not path.exists():
        raise StoreError(f"{path} does not exist; run `sparsemup sweep --config FILE --out {out}` first")
    return list(ResultStore(path).records.values())


def _num(value: float | None, fmt: str = ".3f") -> str:
    return "—" if value is None else format(value, fmt)


def optimum_cell(row: dict[str, Any]) -> str:
    """An optimum as ``x ± se``; ``flat (lo … hi)`` when it has none; ``≥ x (edge)`` on the grid's edge."""
    if row["best_log2_x"] is None:
        return "all diverged"
    if row["edge"]:
        return f"{'≤' if row['edge'] == 'low' else '≥'} {row['best_log2_x']:.2f} (edge)"
    if row["flat"]:
        return f"flat ({row['interval'][0]:.1f} … {row['interval'][1]:.1f})"
    return f"{row['best_log2_x']:.2f} ± {row['se']:.2f}"


def with_interval(value: float | None, interval: list[float] | None, fmt: str) -> str:
    """``value [lo, hi]`` in ``fmt``; — for None."""
    if value is None:
        return "—"
    return format(value, fmt) + ("" if interval is None else f" [{interval[0]:{fmt}}, {interval[1]:{fmt}}]")


def _shift(row: dict[str, Any]) -> str:
    """The signed shift with its interval; a bound when the optimum is on the grid's edge, none when flat."""
    if row["shift"] is None or row["flat"]:
        return "—"
    if row["edge"]:
        return f"{'≤' if row['edge'] == 'low' else '≥'} {row['shift']:+.2f}"
    return with_interval(row["shift"], row["shift_interval"], "+.2f")


def _regret(value: float | None, interval: list[float] | None) -> str:
    return "diverged or off the grid" if value is None else with_interval(value, interval, ".3f")


def noise_line(result: Analysis) -> str:
    """Where the per-run noise behind the intervals came from."""
    n = result["noise"]
    source = (f"pooled from {n['pairs']} seed pairs within 0.1 nats of their curve's minimum" if n["pairs"]
              else "the default (this store has too few seed pairs)")
    return (f"Per-run noise: median seed-to-seed difference {n['pair_median']:.4f} nats, {source}; intervals are "
            "95 % (parametric bootstrap, docs/SWEEPS.md).")


def regret_summary(result: Analysis) -> list[str]:
    """The lead table: per group, the worst transfer regret (what keeping the reference's optimum costs) and the
    drift of the located optima."""
    axis = result["axis"].split(".")[-1]
    lines = [f"| setting | across | worst regret: loss at the reference's log2 {axis} − best (nats) [95 %] | at "
             f"| drift of the located optima (log2 {axis}) | flat: no optimum |", "|---|---|---|---|---|---|"]
    for d in result["drifts"]:
        along = d["along"].split(".")[-1]
        worst = d["worst_regret"] or {}
        drift = "—" if d["drift_log2"] is None else ("≥ " if d["edge_involved"] else "") + f"{d['drift_log2']:.2f}"
        lines.append(f"| {d['label'] or 'all'} | {along} | {_regret(worst.get('regret'), worst.get('interval'))} | "
                     f"{'—' if not worst else format(worst[d['along']], 'g')} | {drift} | "
                     f"{', '.join(format(v, 'g') for v in d['flat']) or '—'} |")
    return lines


def best_runs(records: list[RunRecord], n: int = 5) -> list[RunRecord]:
    """The ``n`` completed runs of lowest final validation loss."""
    done = [(loss, r) for r in records if r["status"] == "completed" and (loss := r["final_val_loss"]) is not None]
    return [r for _, r in sorted(done, key=lambda found: found[0])][:n]


def preset_values(records: list[RunRecord], top: int = 1) -> dict[str, ConfigValue]:
    """The swept hyperparameters of the ``top`` best runs, for a preset: their geometric mean (4 significant
    digits) for floats, the common value for anything else. The seed is left out: it is not a hyperparameter.

    With top > 1 the preset is less exposed to one run's noise when the best runs are within noise of
    each other but far apart in their settings.
    """
    best = best_runs(records, top)
    if len(best) < top:
        raise StoreError(f"--top {top} needs {top} completed runs; the store has {len(best)}")
    keys = [k for k in best[0]["overrides"] if k != SEED_KEY]
    for r in best[1:]:
        if set(r["overrides"]) - {SEED_KEY} != set(keys):
            raise StoreError(f"the {top} best runs swept different keys ({sorted(keys)} vs "
                             f"{sorted(set(r['overrides']) - {SEED_KEY})}), e.g. from two versions of a sweep file; "
                             "use --top 1")
    values: dict[str, ConfigValue] = {}
    for key in keys:
        seen = [r["overrides"][key] for r in best]
        if len({repr(v) for v in seen}) == 1:
            values[key] = seen[0]
        elif len(positive := [v for v in seen if type(v) is float and v > 0]) == len(seen):
            values[key] = float(f"{math.exp(sum(map(math.log, positive)) / len(positive)):.4g}")
        else:
            raise StoreError(f"the {top} best runs differ in {key} ({', '.join(map(repr, seen))}), which has no "
                             "geometric mean (only positive floats are averaged); use --top 1 or a sweep that fixes it")
    return values


def write_preset(out: Path, path: Path, top: int = 1) -> Preset:
    """Write the swept hyperparameters of ``out``'s best run (geometric mean of the ``top`` best) as a training
    config (a sweep's ``preset``); returns {"runs": the runs used, "values": the values written}."""
    records = load_records(out)
    best = best_runs(records, top)
    if not best:
        raise StoreError(f"{out} has no completed run to take a preset from")
    values = preset_values(records, top)
    sections: dict[str, list[str]] = defaultdict(list)
    for key, value in sorted(values.items()):
        section, _, name = key.partition(".")
        sections[section].append(f"{name} = {value!r}" if not isinstance(value, str) else f'{name} = "{value}"')
    origin = (f"best run {best[0]['id']}" if top == 1 else
              f"geometric mean of the {top} best runs ({', '.join(r['id'] for r in best)})")
    losses = ", ".join(f"{r['final_val_loss']:.4f}" for r in best)
    text = (f"# preset: {origin} of {out} (val loss {losses})\n"
            f"# written by: sparsemup report {out} --preset {path}" + (f" --top {top}" if top > 1 else "") + "\n"
            f"# holds only the swept keys ({', '.join(sorted(values))}): every other setting is a default. To train "
            "a wider, sparser model with all of the proxy's settings, write its config with\n"
            f"#   sparsemup transfer {out} --out TARGET.toml --set model.width=... model.density=...\n")
    text += "".join(f"\n[{s}]\n" + "\n".join(lines) + "\n" for s, lines in sections.items())
    write_text_atomic(Path(path), text)
    return {"runs": best, "values": values}


def _along_value(drift: Drift, row: dict[str, Any]) -> str:
    """A drift row's density (or width), with the width beside a density when the two are set together."""
    width = f" (width {row['model.width']})" if drift["along"] != "model.width" and "model.width" in row else ""
    return f"{row[drift['along']]:g}{width}"


def _fixed_tables(result: Analysis) -> list[str]:
    """Loss along density (or width) at fixed hyperparameters (one value of the axis per setting), with the
    spread over seeds: the sweep of paper Fig. 3, where nothing is retuned."""
    axis = result["axis"].split(".")[-1]
    lines = [f"Runs: {result['runs']} ({result['diverged']} diverged); one {axis} per setting: losses at fixed "
             "hyperparameters, averaged over seeds (spread: max − min over seeds, — with one seed)."]
    for d in result["drifts"]:
        along = d["along"].split(".")[-1]
        lines += ["", f"**{d['label'] or 'all'}**, across {along}:", "",
                  f"| {along} | log2 {axis} | loss | seed spread |", "|---|---|---|---|"]
        for r in d["rows"]:
            loss = "diverged" if r["best_loss"] is None else f"{r['best_loss']:.3f}"
            lines.append(f"| {_along_value(d, r)} | {_num(r['best_log2_x'], '.2f')} | {loss} | "
                         f"{_num(r['seed_spread'], '.3f')} |")
    return lines


def tables(result: Analysis, records: list[RunRecord] | None = None) -> str:
    """Markdown tables: the best runs, every setting's optimum, then one drift table per group of settings."""
    axis = result["axis"].split(".")[-1]
    lines = []
    if records:
        lines += ["| best runs: val loss | overrides |", "|---|---|"]
        lines += [f"| {r['final_val_loss']:.4f} | "
                  + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["overrides"].items())
                  + " |" for r in best_runs(records)]
        lines.append("")
    single = all(len(c["log2_x"]) < 2 for c in result["curves"])  # one x per setting: nothing to fit
    if single and result["drifts"]:
        return "\n".join(lines + _fixed_tables(result)) + "\n"
    if single:
        return "\n".join(lines + [f"Runs: {result['runs']} ({result['diverged']} diverged); every setting has one "
                                   f"{axis} (a random search): no optima to fit."]) + "\n"
    lines += [f"Runs: {result['runs']} ({result['diverged']} diverged). {noise_line(result)}", ""]
    if result["drifts"]:
        lines += ["**What transfer costs.** Per group, the largest loss paid for keeping the reference's optimum (the "
                  "densest, narrowest or shallowest setting's: where the hyperparameters are tuned) instead of each "
                  "setting's own, and the spread of the optima that are located:", "", *regret_summary(result), ""]
    lines += [f"Optima in log2 {axis} (± standard error; flat: no optimum within noise, with its 95 % interval; "
              "an optimum on the edge of the stable grid is marked, not fitted):", "",
              f"| setting | seeds | best log2 {axis} | best loss |", "|---|---|---|---|"]
    for c in result["curves"]:
        o = c["optimum"]
        best = "all diverged" if o is None else optimum_cell({"best_log2_x": o["log2_x"], **o})
        lines.append(f"| {c['label'] or 'all'} | {c['seeds']} | {best} | {_num(None if o is None else o['loss'])} |")
    for d in result["drifts"]:
        along = d["along"].split(".")[-1]
        lines += ["", f"**{d['label'] or 'all'}**, across {along}: transferred log2 {axis} "
                  f"{_num(d['transferred_log2_x'], '.2f')} (the {REFERENCE[d['along']]} "
                  "setting's optimum)", "",
                  f"| {along} | regret (nats) [95 %] | shift of the optimum [95 %] | best log2 {axis} | best loss "
                  "| loss at transferred |", "|---|---|---|---|---|---|"]
        for n, r in enumerate(d["rows"]):
            moved = ("reference | 0" if n == 0 else f"{_regret(r['regret'], r['regret_interval'])} | {_shift(r)}")
            lines.append(f"| {_along_value(d, r)} | {moved} | {optimum_cell(r)} | {_num(r['best_loss'])} | "
                         f"{_num(r['loss_at_transferred'])} |")
    return "\n".join(lines) + "\n"


def plot_curves(result: Analysis, out: Path) -> list[Path]:
    """Loss vs log2 x, a panel per scheme and a line per density (or width, depth); one figure per other setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = result["curves"]
    if all(len(c["log2_x"]) < 2 for c in curves):  # fixed HPs: loss along density, or a random search: nothing
        return [_plot_fixed(result, along, out, plt) for along in dict.fromkeys(d["along"] for d in result["drifts"])]
    line_key, tied, figures = _figure_groups(curves)
    paths = []
    axis = result["axis"].split(".")[-1]
    for n, (rest, members) in enumerate(figures.items()):
        fig = _plot_figure(plt, members, line_key, tied, axis)
        title = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in rest)
        if title:
            fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        path = Path(out) / f"loss-vs-{axis}{'-' + str(n) if len(figures) > 1 else ''}.png"
        write_atomic(path, partial(fig.savefig, format="png", dpi=110))
        plt.close(fig)
        paths.append(path)
    return paths


def _figure_groups(curves: list[Curve]) -> tuple[str | None, list[str],
                                                dict[tuple[tuple[str, ConfigValue], ...], list[Curve]]]:
    """The key a figure draws a line per value of (a ``LINE_KEYS`` one; None: none), the keys tied to it, and the
    curves of each figure by the settings they share (all but the scheme, line and tied keys)."""
    keys = list(curves[0]["setting"])
    line_key = next((k for k in LINE_KEYS if k in keys), None)
    # Keys set together with the line's (width × 1/√ρ in an iso-parameter sweep) share its lines.
    tied = [k for k in keys if line_key and k not in ("model.scheme", line_key)
            and len({(c["setting"][line_key], c["setting"][k]) for c in curves})
            == len({c["setting"][line_key] for c in curves})]
    figures: dict[tuple[tuple[str, ConfigValue], ...], list[Curve]] = defaultdict(list)
    for c in curves:
        rest = tuple((k, v) for k, v in c["setting"].items() if k not in ("model.scheme", line_key, *tied))
        figures[rest].append(c)
    return line_key, tied, figures


def _plot_figure(plt: Any, members: list[Curve], line_key: str | None, tied: list[str], axis: str) -> Any:
    """One figure: a panel per scheme, a line per value of ``line_key`` (one colour each across the panels),
    each curve's optimum as a star (hollow on the edge or when flat)."""
    schemes = list(dict.fromkeys(c["setting"].get("model.scheme", "") for c in members))
    fig, axes = plt.subplots(1, len(schemes), figsize=(4.2 * len(schemes), 3.6), sharey=True, squeeze=False)
    finite = [y for c in members for y in c["loss"] if y is not None]
    # One colour per density (or width, depth) across every panel, densest / widest / deepest first.
    values = sorted({c["setting"][line_key] for c in members}, reverse=True) if line_key else []
    colour: dict[ConfigValue | None, Any] = {v: plt.cm.viridis(0.85 * i / max(1, len(values) - 1))
                                             for i, v in enumerate(values)}
    for ax, scheme in zip(axes[0], schemes):
        for c in members:
            if c["setting"].get("model.scheme", "") != scheme:
                continue
            pts = [(x, y) for x, y in zip(c["log2_x"], c["loss"]) if y is not None]
            label = setting_label({k: c["setting"][k] for k in (line_key, *tied)}) if line_key else c["label"]
            line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label,
                           color=colour.get(c["setting"].get(line_key)) if line_key else None)[0]
            if c["optimum"] is not None:
                ax.plot(c["optimum"]["log2_x"], c["optimum"]["loss"], marker="*", ms=11, color=line.get_color(),
                        mfc="none" if c["optimum"]["edge"] or c["optimum"]["flat"] else line.get_color())
        ax.set_title(scheme or "all")
        ax.set_xlabel(f"log2 {axis}")
        ax.grid(alpha=0.3)
        if finite:
            low = min(finite)
            ax.set_ylim(low - 0.05, min(max(finite), low + 1.5) + 0.05)
    axes[0][0].set_ylabel("final validation loss (nats/byte)")
    if len(members) <= 3 * 12:
        for ax in axes[0]:
            ax.legend(fontsize=7)
    return fig


def _plot_fixed(result: Analysis, along: str, out: Path, plt: Any) -> Path:
    """Loss vs log2 density (or width) at fixed hyperparameters, a line per group (scheme): paper Fig. 3."""
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for d in result["drifts"]:
        if d["along"] != along:
            continue
        rows = [r for r in d["rows"] if r["best_loss"] is not None]
        ax.plot([math.log2(r[along]) for r in rows], [r["best_loss"] for r in rows], marker="o", ms=4,
                label=d["label"] or "all")
    name = along.split(".")[-1]
    ax.set_xlabel(f"log2 {name}")
    ax.set_ylabel("final validation loss (nats/byte)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(out) / f"loss-vs-{name}.png"
    write_atomic(path, partial(fig.savefig, format="png", dpi=110))
    plt.close(fig)
    return path


def merge_records(dirs: Sequence[Path]) -> tuple[list[RunRecord], str]:
    """The records of several sweep directories (a run stored twice counts once) and a line saying what was merged.

    The line names the config keys that are constant within each store but differ between them, since
    those split the curves by store: e.g. merging sweeps of different widths is fine, but a different
    σ_base is probably a mistake worth seeing.
    """
    per_dir = []
    for n, d in enumerate(dirs):
        try:
            per_dir.append(load_records(d))
        except StoreError as err:
            raise StoreError(f"--with {d}: {err}" if n else str(err)) from None
    # A run id hashes only the swept keys, so stores with another base share ids: the same run means
    # the same id *and* the same full config.
    merged: dict[tuple[str, str], RunRecord] = {}
    for records in per_dir:
        for r in records:
            merged.setdefault((r["id"], json.dumps(r["config"], sort_keys=True)), r)
    if len(dirs) == 1:
        return list(merged.values()), ""
    constants = [{k: repr(v) for k, v in records[0]["config"].items()
                  if all(repr(r["config"].get(k)) == repr(v) for r in records)} for records in per_dir if records]
    differ = sorted({k for c in constants for k in c if any(k in o and o[k] != c[k] for o in constants)})
    verdict = (f"the stores differ in {', '.join(differ)}." if differ else
               "their fixed settings agree." if len(constants) > 1 else "only one of them holds runs.")
    line = ("Merged from " + ", ".join(f"{d} ({len(r)} runs)" for d, r in zip(dirs, per_dir))
            + f": {len(merged)} distinct runs; {verdict}")
    return list(merged.values()), line


def write_report(out: Path, axis: str = "optim.lr", title: str | None = None,
                 merge: Sequence[Path] = ()) -> tuple[Analysis, str]:
    """Analyse ``out``'s store (with the stores of the ``merge`` directories); write report.md, report.json and
    the figures into ``out``; return (result, text)."""
    out = Path(out)
    dirs = [out, *map(Path, merge)]
    records, merged = merge_records(dirs)
    result = analyze(records, axis)
    text = (merged + "\n\n" if merged else "") + tables(result, records)
    figures = plot_curves(result, out)
    body = [f"# {title or 'Sweep report: ' + out.name}", "", text, ""]
    body += [f"![{p.stem}]({p.name})" for p in figures]
    write_text_atomic(out / "report.md", "\n".join(body) + "\n")
    if merged:
        result["merged_from"] = [str(d) for d in dirs]
    write_json_atomic(out / "report.json", result)
    result["files"] = [str(out / "report.md"), str(out / "report.json"), *map(str, figures)]
    return result, text

