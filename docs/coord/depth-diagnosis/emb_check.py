"""The Llama check across depth of docs/COORD_CHECK.md with a larger embedding init σ_input: sparsemup's own
measurement (``evaluate_depth``) on the cases ``hf_depth_cases`` builds, each with ``role_init_std={"input": σ}``
(the CLI has no option for it). Writes coord.json and depth.png as ``sparsemup coord-check`` does.

    PYTHONPATH=src python docs/coord/depth-diagnosis/emb_check.py 1 docs/coord/llama-supar-depth-one-emb-0.2 0.2 1

Arguments: depth_alpha (or none), the output folder, σ_input, the number of seeds.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

from sparsemup.coord import depth as D
from sparsemup.coord.reference import CheckSettings, write_check


def main() -> None:
    alpha = None if sys.argv[1] == "none" else float(sys.argv[1])
    out, sigma, seeds = Path(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    s = CheckSettings.resolve("hf:llama", "supar", widths=[256], densities=[1.0, 0.25], seeds=seeds, base_width=256,
                              depths=[2, 4, 8, 16], depth_alpha=alpha, base_depth=2)
    cases = []
    for c in D.hf_depth_cases("llama", s.scheme, s.widths, s.densities, s.depths, s.seeds, s.base_width, alpha,
                              s.base_depth, s.batch_size, s.head_dim):
        build = c.build.args[0]  # partial(_measurable, partial(hf.build, ...))
        wider = partial(build.func, *build.args, **{**build.keywords, "role_init_std": {"input": sigma}})
        cases.append(D.DepthCase(c.width, c.density, c.depth, c.seed, partial(D._measurable, wider), c.inputs,
                                 c.targets, c.loss_fn, c.base))
    found = D.evaluate_depth(cases, s.lr, s.steps)
    settings = {**s.describe(), "role_init_std": {"input": sigma}}
    write_check({"scheme": s.scheme, "settings": settings, **found}, out)
    print(found["verdict"], found["seconds"])


if __name__ == "__main__":
    main()
