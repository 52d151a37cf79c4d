"""docs/MODELS.md, "With transformers' Trainer": a tiny Llama trained on Shakespeare's bytes by sparsemup.hf.Trainer,
once straight through and once cut at a checkpoint and resumed (static masks, RigL, GMP); prints the largest loss and
logit differences, and checks that save_model's directory loads in plain transformers to the same logits.

    python scripts/hf_trainer_resume.py [--steps 40] [--out /tmp/hf-trainer]
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, TrainingArguments

import sparsemup.hf as hf
from sparsemup.dynamic import GMP, DynamicSparsity, RigL
from sparsemup.train.data import load_corpus

SEQ = 64


class Windows(torch.utils.data.Dataset):
    """Non-overlapping windows of byte tokens, each its own labels (the model shifts them)."""

    def __init__(self, data: torch.Tensor) -> None:
        self.x = data[: len(data) // SEQ * SEQ].long().view(-1, SEQ)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def model() -> torch.nn.Module:
    template = AutoConfig.for_model("llama", vocab_size=256, num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=16, intermediate_size=172,
                                    max_position_embeddings=SEQ)
    torch.manual_seed(0)
    return hf.build(template, 128, 64, head_dim=16, scheme="supar", density=0.25, seed=0)


def method(name: str, steps: int) -> RigL | GMP | None:
    """The mask method of one row: static (None), RigL, or GMP pruning the model's 1/4 down to 1/16."""
    stop = steps * 3 // 4
    return {"static": None, "rigl": RigL(stop_step=stop, update_every=5),
            "gmp": GMP(final_density=1 / 16, stop_step=stop, start_density=0.25, update_every=5)}[name]


def run(out: Path, data: Windows, steps: int, name: str, save_steps: int = 0,
        resume: str | None = None) -> tuple[dict[int, float], torch.Tensor, hf.Trainer]:
    m = model()
    found = method(name, steps)
    dynamic = DynamicSparsity(m, found) if found else None
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=8, learning_rate=2**-7,
                             weight_decay=0.1, lr_scheduler_type="cosine", warmup_steps=steps // 10, logging_steps=1,
                             save_strategy="steps" if save_steps else "no", save_steps=save_steps or steps,
                             report_to=[], use_cpu=True, seed=0, disable_tqdm=True, optim="adamw_torch")
    trainer = hf.Trainer(model=m, args=args, train_dataset=data, dynamic=dynamic)
    trainer.train(resume_from_checkpoint=resume)
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    m.eval()
    with torch.no_grad():
        logits = m(data.x[:4]).logits
    return losses, logits, trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None)
    a = parser.parse_args()
    out = a.out or Path(tempfile.mkdtemp(prefix="hf-trainer-"))
    data = Windows(load_corpus("", 0.1, SEQ).train)
    cut = a.steps // 2
    for name in ("static", "rigl", "gmp"):
        whole, whole_logits, trainer = run(out / f"{name}-whole", data, a.steps, name)
        run(out / f"{name}-cut", data, a.steps, name, save_steps=cut)
        resumed, logits, _ = run(out / f"{name}-cut", data, a.steps, name,
                                 resume=str(out / f"{name}-cut" / f"checkpoint-{cut}"))
        dloss = max(abs(whole[k] - resumed[k]) for k in whole)
        print(f"{name}: final train loss {whole[a.steps]:.4f} nats/byte ({whole[a.steps] / math.log(2):.3f} bits), "
              f"resumed at step {cut}: max |Δloss| over {len(whole)} logged steps {dloss:.2e}, "
              f"max |Δlogits| {float((logits - whole_logits).abs().max()):.2e}")
    trainer.save_model(str(out / "final"))
    plain = AutoModelForCausalLM.from_pretrained(out / "final")
    with torch.no_grad():
        diff = float((plain(data.x[:4]).logits - whole_logits).abs().max())
    print(f"save_model of the GMP run -> plain transformers from_pretrained: max |Δlogits| {diff:.2e} "
          f"({out / 'final'})")


if __name__ == "__main__":
    main()
