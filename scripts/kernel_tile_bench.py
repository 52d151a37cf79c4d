"""Forward and backward of the native sparse kernels at each token-tile size: rows (SPARSEMUP_ROWS_TILE) or blocks
(SPARSEMUP_BLOCKS_CHUNK).

The size is fixed per process, so each runs in its own subprocess; all sizes run side by side in one invocation on
one machine, alternating for --rounds rounds (this VM's timings drift by 10-30 % within minutes), and the CPU is
printed with them (docs/PERFORMANCE.md). The kernels' defaults (csrc/kernels.cpp: tile_size, blocks_chunk) are the
sizes this script found fastest; rerun it on a new CPU to check.
    python scripts/kernel_tile_bench.py --kernel rows --sizes 16,32,64
    python scripts/kernel_tile_bench.py --kernel blocks --block 32 --sizes 32,64,128
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
from sparsemup.sparse import native
kernel, block, out, fan_in, tokens, threads, denominators = json.loads(sys.argv[1])
torch.set_num_threads(threads)
module = native.load()
assert module is not None, native.status()["reason"]
gen = torch.Generator().manual_seed(0)
x, g = torch.randn(tokens, fan_in, generator=gen), torch.randn(tokens, out, generator=gen)

def best(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3

rows = []
for d in denominators:
    if kernel == "rows":
        k = max(1, fan_in // d)
        index = torch.stack([torch.randperm(fan_in, generator=gen)[:k].sort().values for _ in range(out)]).int()
        values = torch.randn(out, k, generator=gen)
        fwd = best(lambda: module.rows_forward(x, values, index))
        bwd = best(lambda: module.rows_backward(g, x, values, index, True, True))
    else:
        cols = fan_in // block
        k = max(1, cols // d)
        index = torch.stack([torch.randperm(cols, generator=gen)[:k].sort().values for _ in range(out // block)]).int()
        values = torch.randn(out // block, k, block, block, generator=gen)
        fwd = best(lambda: module.blocks_forward(x, values, index))
        bwd = best(lambda: module.blocks_backward(g, x, values, index, True, True))
    rows.append({"density": f"1/{d}", "fwd_ms": round(fwd, 2), "bwd_ms": round(bwd, 2),
                 "total_ms": round(fwd + bwd, 2)})
print(json.dumps(rows))
"""

VARIABLE = {"rows": "SPARSEMUP_ROWS_TILE", "blocks": "SPARSEMUP_BLOCKS_CHUNK"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", choices=sorted(VARIABLE), default="rows")
    parser.add_argument("--block", type=int, default=32, help="b of the block kernels' b×b blocks")
    parser.add_argument("--shape", default="2048x2048", help="OUTxIN")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--densities", default="16,128", help="denominators d of ρ = 1/d")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", default=None, help="tile sizes (default rows 16,32,64; blocks 32,64,128)")
    parser.add_argument("--rounds", type=int, default=2, help="times each size runs, alternating")
    args = parser.parse_args()
    out, fan_in = (int(v) for v in args.shape.lower().split("x"))
    if args.kernel == "blocks" and (out % args.block or fan_in % args.block):
        parser.error(f"--block {args.block} must divide both dims of --shape {args.shape}")
    sizes = (args.sizes or ("16,32,64" if args.kernel == "rows" else "32,64,128")).split(",")
    job = json.dumps([args.kernel, args.block, out, fan_in, args.tokens, args.threads,
                      [int(d) for d in args.densities.split(",")]])
    print(subprocess.run(["lscpu"], capture_output=True, text=True).stdout)
    what = f"{args.kernel}" + (f" b={args.block}" if args.kernel == "blocks" else "")
    for _ in range(args.rounds):
        for size in sizes:
            env = {**os.environ, VARIABLE[args.kernel]: size}
            result = subprocess.run([sys.executable, "-c", CHILD, job], env=env, capture_output=True, text=True)
            if result.returncode:
                raise SystemExit(f"size {size} failed:\n{result.stderr}")
            for row in json.loads(result.stdout.splitlines()[-1]):
                print(f"{what} tile {size:>3}  {args.shape}, {args.tokens} tokens, {args.threads} threads, density "
                      f"{row['density']:>5}: fwd {row['fwd_ms']:7.1f} ms  bwd {row['bwd_ms']:7.1f} ms  total "
                      f"{row['total_ms']:7.1f} ms")


if __name__ == "__main__":
    main()
