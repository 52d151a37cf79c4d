"""The ``sparsemup`` command line: training, evaluation, coordinate checks and parameterization tables."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .benchmark import BENCH_MASKS
from .coord import QUANTITIES, UNSTABLE, Case, CheckSettings, run_check, write_check
from .coord.depth import DEPTH_QUANTITIES, DepthCase
from .coord.reference import parse_model
from .core.atomic import WriteError, make_dirs
from .core.explain import explain
from .core.rules import Family
from .core.vocab import BACKEND_CHOICES, SCHEME_NAMES, hf_model_spec
from .dynamic import METHOD_NAMES
from .models import GPTConfig, build_gpt
from .sparse.timing import DTYPES
from .train import evaluate_checkpoint, load_config, train
from .train.checkpoint import ConfigOrigin
from .train.config import describe
from .train.data import VOCAB_SIZE
from .train.distributed import exit_process

__all__ = ["main"]


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
        values = [float(Fraction(v.strip())) for v in text.split(",") if v.strip()]
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected comma-separated densities such as 1/16,0.25, got {text!r}") \
            from None
    if not values or any(not (0.0 < v <= 1.0) for v in values):
        raise argparse.ArgumentTypeError(f"densities must be in (0, 1], got {text!r}")
    return values


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


def _model(text: str) -> str:
    try:
        return parse_model(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _names(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        wrong = [v for v in values if v not in choices]
        if not values or wrong:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(choices)}, got {text!r}")
        return values

    return parse


def _coord_check(args: argparse.Namespace) -> int:
    settings = CheckSettings.resolve(args.model, args.scheme, args.widths, args.densities, args.steps, args.seeds,
                                     args.base_width, args.lr, args.batch_size, args.blocks, args.backend,
                                     args.depth, args.head_dim, args.sparsity_method, args.update_every,
                                     args.depths, args.depth_alpha, args.base_depth)
    make_dirs(args.out)  # a bad --out fails now, not after the measurements
    bar = tqdm(total=settings.total, desc=f"coord-check {args.model}/{args.scheme}", unit="model", file=sys.stderr)

    def progress(case: Case | DepthCase) -> None:
        depth = {"depth": case.depth} if isinstance(case, DepthCase) else {}
        bar.set_postfix(width=case.width, density=f"{case.density:g}", **depth, seed=case.seed)
        bar.update(1)

    result = run_check(settings, progress)
    bar.close()
    figures = write_check(result, args.out)
    if settings.depths:
        _print_depth_summary(args, result["slopes"], result["verdict"]["depth"], figures)
    else:
        _print_summary(args, result["slopes"], result["verdict"], figures)
    failed = any(v["pass"] is False or v.get("reason") == UNSTABLE for v in result["verdict"].values())
    return 1 if (args.strict and failed) else 0


def _print_depth_summary(args: argparse.Namespace, fits: list[dict], verdict: dict, figures: list[Path]) -> None:
    print(f"\ncoordinate check across depth: {args.model}, scheme {args.scheme}, depth_alpha {args.depth_alpha} "
          "(max |log-log slope| against depth over steps)")
    print(f"{'width':>6s} {'density':>8s} " + " ".join(f"{q:>12s}" for q in DEPTH_QUANTITIES))
    for width, density in sorted({(f["width"], f["density"]) for f in fits}, key=lambda wd: (wd[0], -wd[1])):
        cells = []
        for quantity in DEPTH_QUANTITIES:
            values = [abs(f["depth_slope"]) for f in fits if (f["width"], f["density"], f["quantity"]) ==
                      (width, density, quantity) and f["depth_slope"] is not None]
            cells.append(f"{max(values):.3f}" if values else "-")
        print(f"{width:6d} {density:8g} " + " ".join(f"{c:>12s}" for c in cells))
    if verdict.get("reason") == UNSTABLE:
        print(f"depth    verdict: none, {UNSTABLE} ({len(verdict['unstable'])} case(s))")
    elif verdict["pass"] is not None:
        worst = verdict["worst"]
        print(f"depth    verdict: {'PASS' if verdict['pass'] else 'FAIL'}  max |slope| {verdict['max_abs_slope']:.3f} "
              f"(threshold {verdict['threshold']}; worst: width {worst['width']} density {worst['density']:g} "
              f"{worst['quantity']} step {worst['step']})")
    print(f"wrote {args.out / 'coord.json'}" + "".join(f", {p}" for p in figures))


def _print_summary(args: argparse.Namespace, fits: list[dict], verdict: dict, figures: list[Path]) -> None:
    print(f"\ncoordinate check: {args.model}, scheme {args.scheme} (max |log-log slope| over hidden layers)")
    print(f"{'quantity':10s} {'vs width':>9s} {'vs density':>11s}")
    for quantity in QUANTITIES:
        row = [f for f in fits if f["role"] == "hidden" and f["quantity"] == quantity]
        cells = []
        for key in ("width_slope", "density_slope"):
            values = [abs(f[key]) for f in row if f[key] is not None]
            cells.append(f"{max(values):.3f}" if values else "-")
        print(f"{quantity:10s} {cells[0]:>9s} {cells[1]:>11s}")
    for axis, v in verdict.items():
        if v.get("reason") == UNSTABLE:
            cases = "; ".join(("the base" if c["base"] else f"width {c['width']} density {c['density']:g}")
                              + f" seed {c['seed']}: loss {c['first']:.3g} "
                              f"-> {c['last']:.3g}" + (f", worst rise {c['worst_rise']:+.0%}"
                                                       if c["worst_rise"] is not None else "")
                              for c in v["unstable"][:3])
            more = f" (+{len(v['unstable']) - 3} more)" if len(v["unstable"]) > 3 else ""
            print(f"{axis:8s} verdict: none, {UNSTABLE} ({cases}{more})")
            continue
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
    spec = hf_model_spec(args.model)
    depth: dict[str, Any] = {}
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
    if result.get("status") == "diverged":
        print(f"diverged at step {result['diverged_at_step']} (non-finite loss or gradient); last good checkpoint: "
              f"step {result['last_checkpoint_step']}; wrote {args.out / 'result.json'}", file=sys.stderr)
    elif result:
        print(f"completed {result['steps']} steps: val loss {result['final_val_loss']:.4f} "
              f"({result['final_val_bits_per_byte']:.4f} bits/byte); wrote {args.out}", file=sys.stderr)
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
        print(json.dumps(result))
    else:
        print(f"{result['checkpoint']} (step {result['step']}): val loss {result['val_loss']:.4f} nats/token, "
              f"{result['bits_per_byte']:.4f} bits/byte over {result['val_tokens']} tokens")
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
    print(f"sweep done: {counts['stored']} already stored, {counts['completed']} completed, "
          f"{counts['diverged']} diverged, {counts['failed']} failed; results in {args.out / 'results.jsonl'}; "
          f"next: sparsemup report {args.out}", file=sys.stderr)
    return 1 if counts["failed"] else 0


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
    keys = ("shapes", "tokens", "densities", "dtypes", "masks")
    filters: dict[str, Any] = {key: tuple(getattr(args, key)) for key in keys if getattr(args, key) is not None}
    if filters:  # only the rows asked for: the GPT step is skipped
        grid = replace(grid, **filters, gpt_step=False)
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
    parser = argparse.ArgumentParser(prog="sparsemup", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    cc = sub.add_parser("coord-check", help="measure that a scheme keeps activations and updates Θ(1)",
                        description="Train each (width, density, seed) a few Adam steps on one fixed synthetic "
                        "batch and fit log-log slopes of layer RMS against width and density. "
                        "See docs/COORD_CHECK.md.")
    cc.add_argument("--model", type=_model, default="gpt",
                    help="mlp, gpt (the reference models) or hf:TYPE, a transformers causal LM: a model type "
                    "(hf:llama, hf:gpt2, hf:qwen2, ...) or hf:path/to/config.json (needs sparsemup[hf])")
    cc.add_argument("--depth", type=int, help="hf: num_hidden_layers (default 2)")
    cc.add_argument("--depths", type=_ints, help="comma-separated numbers of blocks: the check across depth "
                    "(reference GPT; slopes of the last block's output and each block's update against depth)")
    cc.add_argument("--depth-alpha", type=float, help="with --depths: the depth rule of the models, 1 (CompleteP) "
                    "or 0.5 (depth-µP); default none")
    cc.add_argument("--base-depth", type=int, help="with --depths: the depth rule's base depth (default: the "
                    "smallest of --depths)")
    cc.add_argument("--head-dim", type=int, help="hf: the head dim, fixed as heads grow with width (default 64)")
    cc.add_argument("--scheme", choices=SCHEME_NAMES, default="supar")
    cc.add_argument("--widths", type=_ints, help="comma-separated widths (default: per model)")
    cc.add_argument("--densities", type=_densities, help="comma-separated densities in (0, 1] (default: per model)")
    cc.add_argument("--steps", type=int, help="training steps per model (default 5; 20 with a dynamic "
                    "--sparsity-method)")
    cc.add_argument("--seeds", type=int, default=2,
                    help="seeds 0..N-1; each draws its own init, masks and batch; RMS is averaged over seeds")
    cc.add_argument("--base-width", type=int, help="width of the dense base model (default 64)")
    cc.add_argument("--lr", type=float, help="base Adam learning rate η_base (default: per model)")
    cc.add_argument("--batch-size", type=int,
                    help="samples (MLP, default 256) or 64-token sequences (GPT, default 2) in the fixed batch")
    cc.add_argument("--out", type=Path, default=Path("coord-check"), help="output directory (default ./coord-check)")
    cc.add_argument("--blocks", type=int, metavar="B", help="use B×B block masks (needs B ≤ density·width at "
                    "every grid point), run on --backend")
    cc.add_argument("--backend", choices=BACKEND_CHOICES,
                    help="how the sparse cases' masked layers run (default: blocks with --blocks, else "
                    "masked_dense; rows: row-sparse native kernels; auto: calibrated on this machine)")
    cc.add_argument("--sparsity-method", choices=METHOD_NAMES, default="static",
                    help="how the sparse cases' masks evolve: static, set or rigl (drop 30%% of kept weights by "
                    "magnitude and regrow, every --update-every steps until 3/4 of --steps); see docs/DYNAMIC.md")
    cc.add_argument("--update-every", type=int, default=5, help="steps between mask updates (default 5)")
    cc.add_argument("--strict", action="store_true", help="exit with status 1 when a verdict fails")
    cc.set_defaults(func=_coord_check)

    tr = sub.add_parser("train", help="train the reference GPT (one process, or many under torchrun)",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Train a parameterized GPT on byte-level text. Under torchrun --nproc_per_node=N "
                        "the same command trains with DDP (or FSDP2 with --fsdp). See docs/TRAINING.md.",
                        epilog="configuration keys (--set section.key=value; numbers may be written 2**-7 or 1/4):\n"
                        + describe())
    tr.add_argument("--config", type=Path, help="a .toml or .yaml config (default: built-in defaults)")
    tr.add_argument("--set", action="extend", nargs="+", metavar="KEY=VALUE",
                    help="override config keys, e.g. --set model.width=512 optim.lr=2**-8")
    tr.add_argument("--out", type=Path, required=True, help="run directory (config, metrics, checkpoint, result)")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    tr.add_argument("--fsdp", action="store_true", help="shard with FSDP2 under torchrun (= --set dist.fsdp=true)")
    tr.set_defaults(func=_train)

    tk = sub.add_parser("tokenize", help="token files (train.bin, val.bin, tokens.json) of a text corpus, by a "
                        "byte-level BPE trained here or a local tokenizer.json",
                        description="Split the corpus as training does, train a byte-level BPE on its training split "
                        "(--vocab) or use a tokenizer.json (--tokenizer), and write the token files and the tokenizer "
                        "into --out; train on them with --set data.path=OUT. See docs/TRAINING.md.")
    tk.add_argument("corpus", nargs="?", default="", help="a text file or a folder of .txt files (default: "
                    "Shakespeare's plays)")
    tk.add_argument("--vocab", type=int, help="train a byte-level BPE of this many tokens (at least 256)")
    tk.add_argument("--tokenizer", type=Path, help="a local tokenizer.json to use instead")
    tk.add_argument("--out", type=Path, required=True, help="folder for train.bin, val.bin, tokens.json, tokenizer")
    tk.add_argument("--val-fraction", type=float, default=0.1, help="the last fraction of every file is validation "
                    "(default 0.1, as data.val_fraction)")
    tk.set_defaults(func=_tokenize)

    sm = sub.add_parser("sample", help="text generated by a trained checkpoint (deterministic under --seed)")
    sm.add_argument("run", type=Path, help="a run directory or a checkpoint file")
    sm.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    sm.add_argument("--tokens", type=int, default=200, help="tokens to generate (default 200; bytes on text data)")
    sm.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    sm.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1; 0: greedy)")
    sm.add_argument("--top-k", type=int, default=0, help="draw from the k most likely tokens only (default 0: all)")
    sm.set_defaults(func=_sample)

    ev = sub.add_parser("eval", help="validation loss and bits per byte of a checkpoint")
    ev.add_argument("checkpoint", type=Path, help="a run directory or a checkpoint file")
    ev.add_argument("--windows", type=int, help="validation windows to use (default: all, non-overlapping)")
    ev.add_argument("--batch", type=int, default=32, help="windows per forward pass (default 32)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=_eval)

    sw = sub.add_parser("sweep", help="run a grid / random search of training runs, resumably",
                        description="Run every point of a sweep file (docs/SWEEPS.md) not yet in DIR's results "
                        "store; rerunning the same command resumes. See docs/SWEEPS.md.")
    sw.add_argument("--config", type=Path, required=True, help="the sweep file (.toml)")
    sw.add_argument("--out", type=Path, required=True, help="sweep directory: results.jsonl and runs/<id>/")
    sw.add_argument("--workers", type=int, default=1,
                    help="runs in parallel processes, each with max(1, cores // N) threads (default 1)")
    sw.add_argument("--engine", choices=("local", "ray"), default="local",
                    help="local: a process pool on this machine (default); ray: every run a Ray task, on a private "
                    "instance or the cluster at --address (needs sparsemup[ray]; docs/SWEEPS.md)")
    sw.add_argument("--address", help="--engine ray: local (default: a private instance), auto, or HOST:PORT")
    sw.add_argument("--dry-run", action="store_true", help="list the planned runs (id and overrides) and exit")
    sw.set_defaults(func=_sweep)

    tf = sub.add_parser("transfer", help="write a target config: a tuned proxy's whole config with the listed "
                        "changes (width, density), refusing any other difference when run",
                        description="Write TARGET.toml holding every setting of the proxy (a run directory, its "
                        "config file, or a sweep directory: its best run) with the --set changes. A run started "
                        "from it refuses any other difference from the proxy, naming the key and --allow. "
                        "See docs/TRANSFER.md.")
    tf.add_argument("proxy", type=Path, help="the tuned proxy: a run directory, a config file or a sweep directory")
    tf.add_argument("--out", type=Path, required=True, help="the target config to write (.toml)")
    tf.add_argument("--set", action="extend", nargs="+", metavar="KEY=VALUE",
                    help="the changes, e.g. --set model.width=1024 model.density=1/16")
    tf.add_argument("--allow", action="extend", nargs="+", metavar="KEY",
                    help="keys a run may change further without refusal (e.g. optim.lr to sweep it around the "
                    "tuned value)")
    tf.set_defaults(func=_transfer)

    rp = sub.add_parser("report", help="optima, drift and transfer tables and figures of a sweep directory")
    rp.add_argument("dir", type=Path, help="a sweep directory (holding results.jsonl)")
    rp.add_argument("--axis", default="optim.lr", help="the swept key to optimise over (default optim.lr; "
                    "e.g. model.init_std)")
    rp.add_argument("--json", action="store_true", help="print the analysis as one JSON object")
    rp.add_argument("--with", dest="merge", type=Path, action="append", default=[], metavar="OTHER",
                    help="also analyse the runs of sweep directory OTHER (repeatable), e.g. an ablation beside "
                    "the sweep of the full schemes; the report is written into dir")
    rp.add_argument("--preset", type=Path, help="also write the best run's swept keys as a config file "
                    "(a sweep's [sweep] preset)")
    rp.add_argument("--top", type=int, default=1, help="with --preset: the geometric mean of the TOP best runs' "
                    "values (default 1: the best run's), steadier when the best runs tie within noise")
    rp.set_defaults(func=_report)

    dm = sub.add_parser("demo", help="coordinate check + LR × density sweep for SP and SµPar (minutes on 2 cores)")
    dm.add_argument("--out", type=Path, default=Path("sparsemup-demo"), help="output directory "
                    "(default ./sparsemup-demo); rerun to resume")
    dm.add_argument("--seed", type=int, default=0, help="the first of the two seeds (default 0: seeds 0 and 1)")
    dm.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1: two runs at a time "
                    "on two cores); another count sums in another order, as another CPU would")
    dm.set_defaults(func=_demo)

    bn = sub.add_parser("bench", help="time sparse layers on every backend and a GPT training step",
                        description="Forward + backward of one layer for masked dense, torch CSR and sparsemup's "
                        "row-sparse and block-sparse backends over shapes, tokens, densities and dtypes, then one "
                        "GPT training step. Any of --shapes, --tokens, --densities, --dtypes, --masks replaces that "
                        "part of the grid and skips the GPT step. See docs/PERFORMANCE.md.")
    bn.add_argument("--json", type=Path, help="also write every row to this JSON file")
    bn.add_argument("--quick", action="store_true", help="a tiny grid (seconds), to check the setup")
    bn.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    bn.add_argument("--shapes", type=_shapes, help="layer shapes OUTxIN, e.g. 2048x2048,4096x1024 (a filter)")
    bn.add_argument("--tokens", type=_ints, help="token counts, e.g. 4096 (a filter)")
    bn.add_argument("--densities", type=_densities, help="densities, e.g. 1/16,1/128 (a filter)")
    bn.add_argument("--dtypes", type=_names(tuple(DTYPES)), help="fp32 and/or bf16 (a filter)")
    bn.add_argument("--masks", type=_names(BENCH_MASKS), help="rows (unstructured) and/or blocks (a filter)")
    bn.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where to run; cuda measures bigger layers (default cpu)")
    bn.set_defaults(func=_bench)

    dr = sub.add_parser("doctor", help="which fast paths are active on this machine, and why (or why not)",
                        description="torch version and threads, the CPU's model and SIMD flags, the compiler, "
                        "whether the native sparse kernels (rows, blocks) built (and where they are cached), the auto "
                        "backend's calibration cache, and the installed extras.")
    dr.add_argument("--json", action="store_true", help="print the facts as JSON")
    dr.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    dr.set_defaults(func=_doctor)

    ex = sub.add_parser("explain", help="print the per-parameter table of the reference GPT or a transformers model")
    ex.add_argument("--model", type=_model, default="gpt",
                    help="gpt (the reference GPT) or hf:TYPE, a transformers causal LM built by sparsemup.hf.build "
                    "with a 256-token vocabulary (hf:llama, hf:gpt2, ..., hf:path/to/config.json; needs sparsemup[hf])")
    ex.add_argument("--scheme", choices=SCHEME_NAMES, default="supar")
    ex.add_argument("--width", type=int, default=256)
    ex.add_argument("--base-width", type=int, default=64)
    ex.add_argument("--depth", type=int, default=2)
    ex.add_argument("--head-dim", type=int, default=64)
    ex.add_argument("--density", type=float, default=0.25)
    ex.add_argument("--depth-alpha", type=float, help="the depth rule: 1 (CompleteP) or 0.5 (depth-µP); default none")
    ex.add_argument("--base-depth", type=int, help="with --depth-alpha: the base's number of blocks (default --depth)")
    ex.add_argument("--optimizer", choices=tuple(f.value for f in Family), default="adam",
                    help="the optimizer family whose rule the LR/WD columns show")
    ex.set_defaults(func=_explain)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("steps", "seeds", "batch_size", "base_width", "workers", "top", "depth", "head_dim", "update_every",
                 "threads"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            build_parser().error(f"--{flag.replace('_', '-')} must be at least 1")
    try:
        status = args.func(args)
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
