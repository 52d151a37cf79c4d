"""The ``sparsemup`` command line: training, evaluation, coordinate checks and parameterization tables."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import Field, replace
from pathlib import Path
from typing import Any, TypeAlias, TypeVar, cast

import torch
from tqdm import tqdm

from .benchmark import BENCH_MASKS
from .coord import QUANTITIES, UNSTABLE, Case, CheckRecord, CheckSettings, across_depth, run_check, write_check
from .coord.depth import DEPTH_QUANTITIES, DepthFit, DepthRule, DepthVerdict
from .coord.measurement import AxisVerdict, Fit
from .coord.settings import parse_count, parse_counts, parse_densities, parse_model, setting_fields
from .core.atomic import WriteError, make_dirs
from .core.explain import explain
from .core.rules import Family
from .core.vocab import SCHEME_NAMES, hf_model_spec
from .models import GPTConfig, build_gpt
from .sparse.timing import DTYPES
from .train import Diverged, evaluate_checkpoint, load_config, train
from .train.checkpoint import ConfigOrigin
from .train.config import describe
from .train.data import VOCAB_SIZE
from .train.distributed import exit_process

__all__ = ["main"]


T = TypeVar("T")
_Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"  # add_parser makes a subcommand


def _arg(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse ``type=`` of a parser that raises ValueError: its message becomes argparse's error."""
    def typed(text: str) -> T:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    typed.__name__ = parse.__name__  # argparse names the type in some errors
    return typed


_count = _arg(parse_count)  # an integer of at least 1
_ints = _arg(parse_counts)
_densities = _arg(parse_densities)
_model = _arg(parse_model)


def _shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in (v.strip() for v in text.split(",") if v.strip()):
        out, sep, inp = item.lower().partition("x")
        if not (sep and out.isdigit() and inp.isdigit() and int(out) > 0 and int(inp) > 0):
            raise argparse.ArgumentTypeError(f"expected comma-separated OUTxIN shapes such as 2048x2048, got {item!r}")
        shapes.append((int(out), int(inp)))
    if not shapes:
        raise argparse.ArgumentTypeError(f"expected at least one OUTxIN shape, got {text!r}")
    return shapes


def _names(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        wrong = [v for v in values if v not in choices]
        if not values or wrong:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(choices)}, got {text!r}")
        return values

    return parse


def _coord_check(args: argparse.Namespace) -> int:
    settings = CheckSettings.resolve(**{f.name: getattr(args, f.name) for f in setting_fields()})
    make_dirs(args.out)  # a bad --out fails now, not after the measurements
    bar = tqdm(total=settings.total, desc=f"coord-check {args.model}/{args.scheme}", unit="model", file=sys.stderr)

    def progress(case: Case) -> None:
        depth = {"depth": case.depth} if case.depth is not None else {}
        bar.set_postfix(width=case.width, density=f"{case.density:g}", **depth, seed=case.seed)
        bar.update(1)

    result = run_check(settings, progress)
    bar.close()
    figures = write_check(result, args.out)
    if across_depth(result):
        _print_depth_summary(args, result["slopes"], result["verdict"]["depth"], figures)
        verdicts: list[AxisVerdict | DepthVerdict] = list(result["verdict"].values())
    else:
        width_check = cast(CheckRecord, result)
        _print_summary(args, width_check["slopes"], width_check["verdict"], figures)
        verdicts = list(width_check["verdict"].values())
    failed = any(v["pass"] is False or v.get("reason") == UNSTABLE for v in verdicts)
    return 1 if (args.strict and failed) else 0


def _print_depth_summary(args: argparse.Namespace, fits: list[DepthFit], verdict: DepthVerdict,
                         figures: list[Path]) -> None:
    print(f"\ncoordinate check across depth: {args.model}, scheme {args.scheme}, depth_alpha {args.depth_alpha} "
          "(max |log-log slope| against depth over steps)")
    print(f"{'width':>6s} {'density':>8s} " + " ".join(f"{q:>12s}" for q in DEPTH_QUANTITIES))
    for width, density in sorted({(f["width"], f["density"]) for f in fits}, key=lambda wd: (wd[0], -wd[1])):
        cells = []
        for quantity in DEPTH_QUANTITIES:
            values = [abs(slope) for f in fits if (f["width"], f["density"], f["quantity"]) ==
                      (width, density, quantity) and (slope := f["depth_slope"]) is not None]
            cells.append(f"{max(values):.3f}" if values else "-")
        print(f"{width:6d} {density:8g} " + " ".join(f"{c:>12s}" for c in cells))
    worst = verdict["worst"]
    if verdict.get("reason") == UNSTABLE:
        print(f"depth    verdict: none, {UNSTABLE} ({len(verdict['unstable'])} case(s))")
    elif verdict["pass"] is not None and worst is not None:
        print(f"depth    verdict: {'PASS' if verdict['pass'] else 'FAIL'}  max |slope| {verdict['max_abs_slope']:.3f} "
              f"(threshold {verdict['threshold']}; worst: width {worst['width']} density {worst['density']:g} "
              f"{worst['quantity']} step {worst['step']})")
    print(f"wrote {args.out / 'coord.json'}" + "".join(f", {p}" for p in figures))


def _print_summary(args: argparse.Namespace, fits: list[Fit], verdict: dict[str, AxisVerdict],
                   figures: list[Path]) -> None:
    print(f"\ncoordinate check: {args.model}, scheme {args.scheme} (max |log-log slope| over hidden layers)")
    print(f"{'quantity':10s} {'vs width':>9s} {'vs density':>11s}")
    for quantity in QUANTITIES:
        row = [f for f in fits if f["role"] == "hidden" and f["quantity"] == quantity]
        cells = []
        for slopes in ([f["width_slope"] for f in row], [f["density_slope"] for f in row]):
            values = [abs(v) for v in slopes if v is not None]
            cells.append(f"{max(values):.3f}" if values else "-")
        print(f"{quantity:10s} {cells[0]:>9s} {cells[1]:>11s}")
    for axis, v in verdict.items():
        print(f"{axis:8s} verdict: " + _axis_verdict(axis, v))
    by_width = verdict["density"].get("max_abs_slope_by_width")
    if by_width and len(by_width) > 1:
        print("max |density slope| at each width: "
              + ", ".join(f"{w}: {v:.3f}" for w, v in by_width.items() if v is not None))
    print(f"wrote {args.out / 'coord.json'}" + "".join(f", {p}" for p in figures))


def _axis_verdict(axis: str, v: AxisVerdict) -> str:
    """One axis's verdict line, after its name."""
    if v.get("reason") == UNSTABLE:
        unstable = v["unstable"]
        cases = "; ".join(("the base" if c["base"] else f"width {c['width']} density {c['density']:g}")
                          + f" seed {c['seed']}: loss {c['first']:.3g} -> {c['last']:.3g}"
                          + (f", worst rise {c['worst_rise']:+.0%}" if c["worst_rise"] is not None else "")
                          for c in unstable[:3])
        more = f" (+{len(unstable) - 3} more)" if len(unstable) > 3 else ""
        return f"none, {UNSTABLE} ({cases}{more})"
    worst = v["worst"]
    if v["pass"] is None or worst is None:
        return f"not measured (one {axis} only)"
    return (f"{'PASS' if v['pass'] else 'FAIL'}  max |slope| {v['max_abs_slope']:.3f} (threshold {v['threshold']}; "
            f"worst: {worst['layer']} {worst['quantity']} step {worst['step']})")


def _explain(args: argparse.Namespace) -> int:
    spec = hf_model_spec(args.model)
    depth: DepthRule = {}
    if args.depth_alpha is not None:
        depth = {"depth_alpha": args.depth_alpha, "base_depth": args.base_depth or args.depth}
    model: torch.nn.Module
    if spec is not None:
        from . import hf  # needs sparsemup[hf]; its error names the extra

        template = hf.small_config(spec, VOCAB_SIZE, args.depth)
        model = hf.build(template, args.width, args.base_width, head_dim=args.head_dim, scheme=args.scheme,
                         density=args.density, **depth)
    elif args.model == "gpt":
        cfg = GPTConfig(width=args.width, depth=args.depth, head_dim=args.head_dim)
        model, _ = build_gpt(cfg, args.base_width, scheme=args.scheme, density=args.density, **depth)
    else:
        raise ValueError(f"explain shows gpt or hf:TYPE, not {args.model!r}")
    print(explain(model, args.optimizer))
    return 0


def _train(args: argparse.Namespace) -> int:
    config_file = args.config
    if config_file is None and args.resume:  # continue with the run's own resolved config
        config_file = next((p for p in (args.out / "config.toml", args.out / "config.yaml") if p.is_file()), None)
    overrides = list(args.set or []) + (["dist.fsdp=true"] if args.fsdp else [])
    cfg = load_config(config_file, overrides)
    config_format = "yaml" if config_file is not None and config_file.suffix in (".yaml", ".yml") else "toml"
    origin = ConfigOrigin(args.config, tuple(item.partition("=")[0].strip() for item in overrides))
    result = train(cfg, args.out, resume=args.resume, config_format=config_format, origin=origin)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return 0
    if isinstance(result, Diverged):
        print(f"diverged at step {result.diverged_at_step} (non-finite loss or gradient); last good checkpoint: "
              f"step {result.last_checkpoint_step}; wrote {args.out / 'result.json'}", file=sys.stderr)
    else:
        print(f"completed {result.steps} steps: val loss {result.final_val_loss:.4f} "
              f"({result.final_val_bits_per_byte:.4f} bits/byte); wrote {args.out}", file=sys.stderr)
    return 0


def _tokenize(args: argparse.Namespace) -> int:
    from .train.tokenize import describe, tokenize_corpus

    files = tokenize_corpus(args.corpus, args.out, args.vocab, args.tokenizer, args.val_fraction)
    print(describe(files), file=sys.stderr)
    return 0


def _sample(args: argparse.Namespace) -> int:
    from .train.sample import sample

    print(sample(args.run, args.prompt, args.tokens, args.seed, args.temperature, args.top_k))
    return 0


def _eval(args: argparse.Namespace) -> int:
    result = evaluate_checkpoint(args.checkpoint, windows=args.windows, batch=args.batch)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(f"{result.checkpoint} (step {result.step}): val loss {result.val_loss:.4f} nats/token, "
              f"{result.bits_per_byte:.4f} bits/byte over {result.val_tokens} tokens")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from .tuning import load_sweep, run_sweep

    spec = load_sweep(args.config)  # the whole plan is validated before any run starts
    if args.dry_run:
        for point in spec.points:
            print(point.id, json.dumps(point.overrides))
        if spec.search is not None:  # its trials exist only once the results before them do
            for part in spec.grid_parts:
                print(f"{spec.search.sampler} search of {spec.search.samples} trials over "
                      f"{', '.join(spec.search.bounds)} at {json.dumps(part)}")
        runs = spec.search.samples * len(spec.grid_parts) if spec.search is not None else len(spec.points)
        print(f"{runs} runs", file=sys.stderr)
        return 0
    counts = run_sweep(spec, args.out, workers=args.workers, engine=args.engine, address=args.address)
    print(f"sweep done: {counts.stored} already stored, {counts.completed} completed, "
          f"{counts.diverged} diverged, {counts.failed} failed; results in {args.out / 'results.jsonl'}; "
          f"next: sparsemup report {args.out}", file=sys.stderr)
    return 1 if counts.failed else 0


def _transfer(args: argparse.Namespace) -> int:
    from .tuning.transfer import write_transfer

    done = write_transfer(args.proxy, args.out, args.set or [], args.allow or [])
    changed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in done["changed"].items()) or "nothing"
    print(f"wrote {args.out}: the config of {done['proxy']}, changed {changed}; a run from it refuses any other "
          f"difference (allowed: {', '.join(done['allow']) or 'none'})\nnext: sparsemup train --config {args.out} "
          "--out RUN_DIR", file=sys.stderr)
    return 0


def _report(args: argparse.Namespace) -> int:
    from .tuning import write_preset, write_report

    if args.top != 1 and args.preset is None:
        raise ValueError("--top K only applies with --preset FILE: add --preset, or drop --top")
    if args.preset is not None and args.merge:
        raise ValueError("--preset takes DIR's own runs; drop --with to write a preset")
    result, text = write_report(args.dir, axis=args.axis, merge=args.merge)
    if args.preset is not None:
        preset = write_preset(args.dir, args.preset, top=args.top)
        print(f"wrote preset {args.preset} from run(s) {', '.join(r['id'] for r in preset['runs'])}: "
              + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in preset["values"].items()),
              file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        print(text)
        print("wrote " + ", ".join(result["files"]), file=sys.stderr)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .tuning.demo import DemoPlan, run_demo

    summary = run_demo(args.out, DemoPlan(seed=args.seed, threads=args.threads))
    print(f"report: {args.out / 'report.md'}\n{summary['conclusion']}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .benchmark import FULL, GPU, QUICK, run

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("sparsemup bench --device cuda: no CUDA device is visible; use --device cpu")
    grid = QUICK if args.quick else GPU if args.device == "cuda" else FULL
    if any(getattr(args, key) is not None for key in ("shapes", "tokens", "densities", "dtypes", "masks")):
        # only the rows asked for (each filter given replaces that part of the grid): the GPT step is skipped
        grid = replace(grid, shapes=tuple(args.shapes or grid.shapes), tokens=tuple(args.tokens or grid.tokens),
                       densities=tuple(args.densities or grid.densities), dtypes=tuple(args.dtypes or grid.dtypes),
                       masks=tuple(args.masks or grid.masks), gpt_step=False)
    run(grid, args.json, args.threads, device=args.device)
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from .sparse.environment import render, report

    if args.threads:
        torch.set_num_threads(args.threads)
    facts = report()
    print(json.dumps(facts, indent=1) if args.json else render(facts))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per task, each added by its ``_add_*`` function."""
    parser = argparse.ArgumentParser(prog="sparsemup", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_coord_check, _add_train, _add_tokenize, _add_sample, _add_eval, _add_sweep, _add_transfer,
                _add_report, _add_demo, _add_bench, _add_doctor, _add_explain):
        add(sub)
    return parser


def _add_coord_check(sub: _Subcommands) -> None:
    p = sub.add_parser("coord-check", help="measure that a scheme keeps activations and updates Θ(1)",
                       description="Train each (width, density, seed) a few Adam steps on one fixed synthetic "
                       "batch and fit log-log slopes of layer RMS against width and density. "
                       "See docs/COORD_CHECK.md.")
    for setting in setting_fields():  # the settings' own docs and parsers (sparsemup.coord.settings)
        _add_setting(p, setting)
    p.add_argument("--out", type=Path, default=Path("coord-check"), help="output directory (default ./coord-check)")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when a verdict fails")
    p.set_defaults(func=_coord_check)


def _add_setting(parser: argparse.ArgumentParser, setting: Field[Any]) -> None:
    """A coordinate-check setting as an option: ``--`` and its name with dashes (or its flag), unset: None."""
    meta = setting.metadata
    flag = meta["flag"] or "--" + setting.name.replace("_", "-")
    parse = meta["parse"]
    parser.add_argument(flag, dest=setting.name, type=_arg(parse) if parse is not None else str,
                        choices=meta["choices"] or None, default=meta["unset"], metavar=meta["metavar"],
                        help=meta["doc"].replace("%", "%%"))


def _add_train(sub: _Subcommands) -> None:
    p = sub.add_parser("train", help="train the reference GPT (one process, or many under torchrun)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a parameterized GPT on byte-level text. Under torchrun --nproc_per_node=N "
                       "the same command trains with DDP (or FSDP2 with --fsdp). See docs/TRAINING.md.",
                       epilog="configuration keys (--set section.key=value; numbers may be written 2**-7 or 1/4):\n"
                       + describe())
    p.add_argument("--config", type=Path, help="a .toml or .yaml config (default: built-in defaults)")
    p.add_argument("--set", action="extend", nargs="+", metavar="KEY=VALUE",
                   help="override config keys, e.g. --set model.width=512 optim.lr=2**-8")
    p.add_argument("--out", type=Path, required=True, help="run directory (config, metrics, checkpoint, result)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 under torchrun (= --set dist.fsdp=true)")
    p.set_defaults(func=_train)


def _add_tokenize(sub: _Subcommands) -> None:
    p = sub.add_parser("tokenize", help="token files (train.bin, val.bin, tokens.json) of a text corpus, by a "
                       "byte-level BPE trained here or a local tokenizer.json",
                       description="Split the corpus as training does, train a byte-level BPE on its training split "
                       "(--vocab) or use a tokenizer.json (--tokenizer), and write the token files and the tokenizer "
                       "into --out; train on them with --set data.path=OUT. See docs/TRAINING.md.")
    p.add_argument("corpus", nargs="?", default="", help="a text file or a folder of .txt files (default: "
                   "Shakespeare's plays)")
    p.add_argument("--vocab", type=int, help="train a byte-level BPE of this many tokens (at least 256)")
    p.add_argument("--tokenizer", type=Path, help="a local tokenizer.json to use instead")
    p.add_argument("--out", type=Path, required=True, help="folder for train.bin, val.bin, tokens.json, tokenizer")
    p.add_argument("--val-fraction", type=float, default=0.1, help="the last fraction of every file is validation "
                   "(default 0.1, as data.val_fraction)")
    p.set_defaults(func=_tokenize)


def _add_sample(sub: _Subcommands) -> None:
    p = sub.add_parser("sample", help="text generated by a trained checkpoint (deterministic under --seed)")
    p.add_argument("run", type=Path, help="a run directory or a checkpoint file")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--tokens", type=int, default=200, help="tokens to generate (default 200; bytes on text data)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1; 0: greedy)")
    p.add_argument("--top-k", type=int, default=0, help="draw from the k most likely tokens only (default 0: all)")
    p.set_defaults(func=_sample)


def _add_eval(sub: _Subcommands) -> None:
    p = sub.add_parser("eval", help="validation loss and bits per byte of a checkpoint")
    p.add_argument("checkpoint", type=Path, help="a run directory or a checkpoint file")
    p.add_argument("--windows", type=int, help="validation windows to use (default: all, non-overlapping)")
    p.add_argument("--batch", type=int, default=32, help="windows per forward pass (default 32)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_eval)


def _add_sweep(sub: _Subcommands) -> None:
    p = sub.add_parser("sweep", help="run a grid / random search of training runs, resumably",
                       description="Run every point of a sweep file (docs/SWEEPS.md) not yet in DIR's results "
                       "store; rerunning the same command resumes. See docs/SWEEPS.md.")
    p.add_argument("--config", type=Path, required=True, help="the sweep file (.toml)")
    p.add_argument("--out", type=Path, required=True, help="sweep directory: results.jsonl and runs/<id>/")
    p.add_argument("--workers", type=_count, default=1,
                   help="runs in parallel processes, each with max(1, cores // N) threads (default 1)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: a process pool on this machine (default); ray: every run a Ray task, on a private "
                   "instance or the cluster at --address (needs sparsemup[ray]; docs/SWEEPS.md)")
    p.add_argument("--address", help="--engine ray: local (default: a private instance), auto, or HOST:PORT")
    p.add_argument("--dry-run", action="store_true", help="list the planned runs (id and overrides) and exit")
    p.set_defaults(func=_sweep)


def _add_transfer(sub: _Subcommands) -> None:
    p = sub.add_parser("transfer", help="write a target config: a tuned proxy's whole config with the listed "
                       "changes (width, density), refusing any other difference when run",
                       description="Write TARGET.toml holding every setting of the proxy (a run directory, its "
                       "config file, or a sweep directory: its best run) with the --set changes. A run started "
                       "from it refuses any other difference from the proxy, naming the key and --allow. "
                       "See docs/TRANSFER.md.")
    p.add_argument("proxy", type=Path, help="the tuned proxy: a run directory, a config file or a sweep directory")
    p.add_argument("--out", type=Path, required=True, help="the target config to write (.toml)")
    p.add_argument("--set", action="extend", nargs="+", metavar="KEY=VALUE",
                   help="the changes, e.g. --set model.width=1024 model.density=1/16")
    p.add_argument("--allow", action="extend", nargs="+", metavar="KEY",
                   help="keys a run may change further without refusal (e.g. optim.lr to sweep it around the "
                   "tuned value)")
    p.set_defaults(func=_transfer)


def _add_report(sub: _Subcommands) -> None:
    p = sub.add_parser("report", help="optima, drift and transfer tables and figures of a sweep directory")
    p.add_argument("dir", type=Path, help="a sweep directory (holding results.jsonl)")
    p.add_argument("--axis", default="optim.lr", help="the swept key to optimise over (default optim.lr; "
                   "e.g. model.init_std)")
    p.add_argument("--json", action="store_true", help="print the analysis as one JSON object")
    p.add_argument("--with", dest="merge", type=Path, action="append", default=[], metavar="OTHER",
                   help="also analyse the runs of sweep directory OTHER (repeatable), e.g. an ablation beside "
                   "the sweep of the full schemes; the report is written into dir")
    p.add_argument("--preset", type=Path, help="also write the best run's swept keys as a config file "
                   "(a sweep's [sweep] preset)")
    p.add_argument("--top", type=_count, default=1, help="with --preset: the geometric mean of the TOP best runs' "
                   "values (default 1: the best run's), steadier when the best runs tie within noise")
    p.set_defaults(func=_report)


def _add_demo(sub: _Subcommands) -> None:
    p = sub.add_parser("demo", help="coordinate check + LR × density sweep for SP and SµPar (minutes on 2 cores)")
    p.add_argument("--out", type=Path, default=Path("sparsemup-demo"), help="output directory "
                   "(default ./sparsemup-demo); rerun to resume")
    p.add_argument("--seed", type=int, default=0, help="the first of the two seeds (default 0: seeds 0 and 1)")
    p.add_argument("--threads", type=_count, default=1, help="torch threads per run (default 1: two runs at a time "
                   "on two cores); another count sums in another order, as another CPU would")
    p.set_defaults(func=_demo)


def _add_bench(sub: _Subcommands) -> None:
    p = sub.add_parser("bench", help="time sparse layers on every backend and a GPT training step",
                       description="Forward + backward of one layer for masked dense, torch CSR and sparsemup's "
                       "row-sparse and block-sparse backends over shapes, tokens, densities and dtypes, then one "
                       "GPT training step. Any of --shapes, --tokens, --densities, --dtypes, --masks replaces that "
                       "part of the grid and skips the GPT step. See docs/PERFORMANCE.md.")
    p.add_argument("--json", type=Path, help="also write every row to this JSON file")
    p.add_argument("--quick", action="store_true", help="a tiny grid (seconds), to check the setup")
    p.add_argument("--threads", type=_count, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--shapes", type=_shapes, help="layer shapes OUTxIN, e.g. 2048x2048,4096x1024 (a filter)")
    p.add_argument("--tokens", type=_ints, help="token counts, e.g. 4096 (a filter)")
    p.add_argument("--densities", type=_densities, help="densities, e.g. 1/16,1/128 (a filter)")
    p.add_argument("--dtypes", type=_names(tuple(DTYPES)), help="fp32 and/or bf16 (a filter)")
    p.add_argument("--masks", type=_names(BENCH_MASKS), help="rows (unstructured) and/or blocks (a filter)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where to run; cuda measures bigger layers (default cpu)")
    p.set_defaults(func=_bench)


def _add_doctor(sub: _Subcommands) -> None:
    p = sub.add_parser("doctor", help="which fast paths are active on this machine, and why (or why not)",
                       description="torch version and threads, the CPU's model and SIMD flags, the compiler, "
                       "whether the native sparse kernels (rows, blocks) built (and where they are cached), the auto "
                       "backend's calibration cache, and the installed extras.")
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    p.add_argument("--threads", type=_count, default=None, help="torch CPU threads (default: torch's)")
    p.set_defaults(func=_doctor)


def _add_explain(sub: _Subcommands) -> None:
    p = sub.add_parser("explain", help="print the per-parameter table of the reference GPT or a transformers model")
    p.add_argument("--model", type=_model, default="gpt",
                   help="gpt (the reference GPT) or hf:TYPE, a transformers causal LM built by sparsemup.hf.build "
                   "with a 256-token vocabulary (hf:llama, hf:gpt2, ..., hf:path/to/config.json; needs sparsemup[hf])")
    p.add_argument("--scheme", choices=SCHEME_NAMES, default="supar")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--base-width", type=_count, default=64)
    p.add_argument("--depth", type=_count, default=2)
    p.add_argument("--head-dim", type=_count, default=64)
    p.add_argument("--density", type=float, default=0.25)
    p.add_argument("--depth-alpha", type=float, help="the depth rule: 1 (CompleteP) or 0.5 (depth-µP); default none")
    p.add_argument("--base-depth", type=int, help="with --depth-alpha: the base's number of blocks (default --depth)")
    p.add_argument("--optimizer", choices=tuple(f.value for f in Family), default="adam",
                   help="the optimizer family whose rule the LR/WD columns show")
    p.set_defaults(func=_explain)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except ValueError as err:
        print(f"sparsemup: error: {err}", file=sys.stderr)
        status = 2
    except WriteError as err:  # what was written before stays: the atomic writes never leave half a file
        print(f"sparsemup: error: {err}", file=sys.stderr)
        status = 1
    exit_process(status)  # under torchrun: see train.distributed.exit_process for why
    return status


if __name__ == "__main__":
    sys.exit(main())
