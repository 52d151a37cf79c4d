#!/usr/bin/env bash
# Run the small-scale experiments of docs/RESULTS.md in order, resumably: rerun this script after a
# kill and every sweep continues where it stopped (finished runs are skipped, unfinished ones resume).
# Results go to results/<name>/ (results.jsonl, report.md, figures; per-run folders are git-ignored).
# It commits nothing. Usage: scripts/run_experiments.sh [WORKERS] [NAME ...]   (default: 2, all).
# d-iso-parameter-gpu takes ≈ 9 h on 2 cores (extrapolated) (≈ 4 min on an H100 with 8 workers).
set -euo pipefail
cd "$(dirname "$0")/.."
workers="${1:-2}"
shift || true
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(a-lr-density-untuned tune-base a-lr-density a-lr-density-seed1 b-init-density
                                  c-loss-density d-iso-parameter-gpu e-ablation f-dynamic f-static-kept)
preset=experiments/presets/base.toml
for name in "${names[@]}"; do
    echo "=== $name ($(date -u +%H:%M:%S))"
    if [ "$name" != a-lr-density-untuned ] && [ "$name" != tune-base ] && [ ! -f "$preset" ]; then
        echo "writing $preset from results/tune-base"
        sparsemup report results/tune-base --preset "$preset" --top 5 > /dev/null
    fi
    sparsemup sweep --config "experiments/$name.toml" --out "results/$name" --workers "$workers"
    case "$name" in f-*)  # (f) is reported by its own script, beside (a)'s static runs
        if [ -f results/f-dynamic/results.jsonl ]; then python scripts/dynamic_report.py > /dev/null; fi
        echo "report: results/f-dynamic/report.md"; continue ;; esac
    args=(--axis optim.lr)
    [ "$name" = b-init-density ] && args=(--axis model.init_std)
    case "$name" in a-lr-density-seed1|e-ablation) args+=(--with results/a-lr-density) ;; esac
    sparsemup report "results/$name" "${args[@]}" > /dev/null
    echo "report: results/$name/report.md"
done
