"""Forward and fused backward of the native row-sparse kernels at each token-tile size (SPARSEMUP_ROWS_TILE).

The tile is fixed per process, so each size runs in its own subprocess; all sizes run side by side in one
invocation on one machine, and the CPU is printed with them (docs/PERFORMANCE.md). The kernels' default
(csrc/rows.cpp, tile_size) is the size this script found fastest; rerun it on a new CPU to check.
    python scripts/rows_tile_bench.py --shape 2048x2048 --tokens 4096 --densities 16,128 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
from sparsemup.sparse import native, rowkernels
out, fan_in, tokens, threads, denominators = json.loads(sys.argv[1])
torch.set_num_threads(threads)
assert native.load() is not None, native.status()["reason"]
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
    k = max(1, fan_in // d)
    index = torch.stack([torch.randperm(fan_in, generator=gen)[:k].sort().values for _ in range(out)]).int()
    values = torch.randn(out, k, generator=gen)
    fwd = best(lambda: rowkernels.rows_forward(x, values, index))
    bwd = best(lambda: rowkernels.rows_backward(g, x, values, index, True, True))
    rows.append({"density": f"1/{d}", "fwd_ms": round(fwd, 2), "bwd_ms": round(bwd, 2),
                 "total_ms": round(fwd + bwd, 2)})
print(json.dumps(rows))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="2048x2048", help="OUTxIN")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--densities", default="16,128", help="denominators d of ρ = 1/d")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiles", default="16,32,64")
    args = parser.parse_args()
    out, fan_in = (int(v) for v in args.shape.lower().split("x"))
    job = json.dumps([out, fan_in, args.tokens, args.threads, [int(d) for d in args.densities.split(",")]])
    print(subprocess.run(["lscpu"], capture_output=True, text=True).stdout)
    for tile in args.tiles.split(","):
        env = {**os.environ, "SPARSEMUP_ROWS_TILE": tile}
        result = subprocess.run([sys.executable, "-c", CHILD, job], env=env, capture_output=True, text=True)
        if result.returncode:
            raise SystemExit(f"tile {tile} failed:\n{result.stderr}")
        for row in json.loads(result.stdout.splitlines()[-1]):
            print(f"tile {tile:>2}  {args.shape}, {args.tokens} tokens, {args.threads} threads, density "
                  f"{row['density']:>5}: fwd {row['fwd_ms']:7.1f} ms  bwd {row['bwd_ms']:7.1f} ms  total "
                  f"{row['total_ms']:7.1f} ms")


if __name__ == "__main__":
    main()
