"""docs/TRAINING.md, "BPE against bytes": a tiny hf:llama trained by `sparsemup train` on Shakespeare tokenized by
`sparsemup tokenize` (byte-level BPE) beside the same model on bytes, at equal training bytes; bits per byte of both
on the whole validation split (the same text: tokenize splits as the trainer does). Prints each command as it runs
it, then the table.

    python scripts/bpe_vs_bytes.py [--out runs/bpe-vs-bytes] [--vocab 512] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

MODEL = ["model.arch=hf:llama", "model.width=128", "model.base_width=64", "model.depth=2", "model.head_dim=32",
         "train.seq_len=128", "train.batch_size=16", "optim.schedule=cosine", "train.eval_every=0",
         "train.checkpoint_every=0", "train.tensorboard=false", "train.progress=false", "train.threads=2"]


def run(*args: str) -> str:
    command = [sys.executable, "-m", "sparsemup", *args]
    print("$ sparsemup " + shlex.join(args), flush=True)
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bpe-vs-bytes"))
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--steps", type=int, default=200, help="steps of the BPE model (the byte model trains on as "
                        "many bytes: steps × bytes per token)")
    a = parser.parse_args()
    tokens = a.out / f"shakespeare-bpe{a.vocab}"
    if not (tokens / "tokens.json").is_file():
        run("tokenize", "--vocab", str(a.vocab), "--out", str(tokens))
    per_token = json.loads((tokens / "tokens.json").read_text())["bytes_per_token"]["train"]
    byte_steps = round(a.steps * per_token)
    rows = []
    for name, data, steps in (("BPE", [f"data.path={tokens}"], a.steps), ("bytes", [], byte_steps)):
        out = a.out / name.lower()
        if not (out / "result.json").is_file():
            run("train", "--out", str(out), "--set", *MODEL, *data, f"train.steps={steps}",
                f"optim.warmup_steps={steps // 10}")
        result = json.loads(run("eval", str(out), "--json"))
        trained = steps * 16 * 128 * (per_token if name == "BPE" else 1.0)
        rows.append(f"| {name} | {steps} | {trained / 1e6:.2f} M | {result['val_loss']:.4f} | "
                    f"{result['bits_per_byte']:.4f} |")
    print("| tokens | steps | training bytes | val loss (nats/token) | bits per byte |\n|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"BPE: vocabulary {a.vocab}, {per_token:.3f} bytes per training token")


if __name__ == "__main__":
    main()
