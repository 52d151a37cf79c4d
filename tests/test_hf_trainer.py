"""sparsemup.hf.Trainer: transformers' Trainer with sparsemup's optimizer, saves and exact resume (also RigL)."""

import warnings

import pytest
import torch

pytest.importorskip("accelerate", reason="accelerate is not installed: pip install 'sparsemup[hf]'")

from transformers import AutoConfig, AutoModelForCausalLM, TrainingArguments  # noqa: E402

import sparsemup.hf as hf  # noqa: E402
from helpers import mask_of  # noqa: E402
from sparsemup.dynamic import GMP, DynamicSparsity, RigL  # noqa: E402

VOCAB = 64


def tiny_model():
    cfg = AutoConfig.for_model("llama", vocab_size=VOCAB, num_hidden_layers=1, hidden_size=64, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=32)
    torch.manual_seed(0)
    return hf.build(cfg, 64, 32, head_dim=16, scheme="supar", density=0.25, output_alpha=2.0, input_alpha=2.0, seed=0)


class Tokens(torch.utils.data.Dataset):
    def __init__(self):
        self.x = torch.randint(0, VOCAB, (32, 16), generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def arguments(out, save_steps=0, max_steps=8, **extra):
    return TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4,
                             learning_rate=1e-2,
                             logging_steps=1, save_strategy="steps" if save_steps else "no",
                             save_steps=save_steps or 100, report_to=[], use_cpu=True, lr_scheduler_type="cosine",
                             warmup_steps=2, seed=0, disable_tqdm=True, gradient_accumulation_steps=2, **extra)


METHODS = {"static": None, "rigl": lambda: RigL(stop_step=6, update_every=2),
           # GMP prunes 1/4 → 1/10: SµPar's LRs follow each weight's density, set on the optimizer accelerate wraps
           "gmp": lambda: GMP(final_density=0.1, stop_step=6, start_density=0.25, update_every=2)}


def run(out, method, resume=None, save_steps=0):
    model = tiny_model()
    make = METHODS[method]
    dynamic = DynamicSparsity(model, make()) if make else None
    trainer = hf.Trainer(model=model, args=arguments(out, save_steps), train_dataset=Tokens(), dynamic=dynamic)
    trainer.train(resume_from_checkpoint=resume)
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    model.eval()
    with torch.no_grad():
        logits = model(Tokens().x[:2]).logits
    return losses, logits, trainer


@pytest.mark.parametrize("method", list(METHODS))
def test_resume_continues_the_uninterrupted_run(tmp_path, method):
    whole, whole_logits, trainer = run(tmp_path / "whole", method)
    run(tmp_path / "cut", method, save_steps=4)
    resumed, logits, resumed_trainer = run(tmp_path / "cut", method, resume=str(tmp_path / "cut" / "checkpoint-4"))
    assert sorted(resumed) == sorted(whole) == list(range(1, 9))
    assert max(abs(whole[k] - resumed[k]) for k in whole) <= 1e-5
    torch.testing.assert_close(logits, whole_logits, rtol=1.3e-6, atol=1e-5)
    masks = [(mask_of(t.model, "model.layers.0.mlp.up_proj.weight") != 0) for t in (trainer, resumed_trainer)]
    assert torch.equal(*masks)
    if method != "static":  # the masks moved, and the checkpoint carried them
        assert not torch.equal(masks[0], mask_of(tiny_model(), "model.layers.0.mlp.up_proj.weight") != 0)
    if method == "gmp":  # pruned to 1/10, and the hidden weights' LR multipliers rose with it (SµPar: η ∝ 1/(m_d·m_ρ))
        assert abs(float(masks[0].float().mean()) - 0.1) < 0.01
        hidden = [g for g in resumed_trainer.optimizer.param_groups if "static_lr" in g]
        assert hidden and all(2.2 < g["initial_lr"] / g["static_lr"] < 2.8 for g in hidden)  # 0.25 / 0.1 = 2.5
    # what the checkpoint holds is what sparsemup.hf.save_pretrained writes, next to the trainer's state
    files = {p.name for p in (tmp_path / "cut" / "checkpoint-4").iterdir()}
    assert {"sparsemup.json", "sparsemup_masks.safetensors", "model.safetensors", "optimizer.pt"} <= files


def test_save_model_loads_in_plain_transformers(tmp_path):
    model = tiny_model()
    args = arguments(tmp_path, optim="adamw_torch", max_grad_norm=0.5)
    trainer = hf.Trainer(model=model, args=args, train_dataset=Tokens())
    trainer.train()
    optimizer = trainer.optimizer
    assert optimizer is not None  # train() made it
    assert all("lr_mult" in group for group in optimizer.param_groups)
    lrs = {group["lr_mult"] for group in optimizer.param_groups}
    assert len(lrs) > 1  # the scheme's per-layer LRs, not Trainer's one
    trainer.save_model(str(tmp_path / "final"))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    x = Tokens().x[:2]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)
    restored = hf.from_pretrained(tmp_path / "final")
    with torch.no_grad():
        torch.testing.assert_close(restored(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


def test_optimizer_choices_and_plain_trainer_caught(tmp_path):
    with pytest.raises(ValueError, match="optim = 'adafactor'.*adamw_torch, adamw_torch_fused, sgd"):
        hf.Trainer(model=tiny_model(), args=arguments(tmp_path, optim="adafactor"), train_dataset=Tokens()).train()
    with pytest.raises(ValueError, match="do not pass optimizers="):
        hf.Trainer(model=tiny_model(), args=arguments(tmp_path), optimizers=(torch.optim.SGD([torch.zeros(1)]), None))
    import transformers

    plain = transformers.Trainer(model=tiny_model(), args=arguments(tmp_path, max_steps=1), train_dataset=Tokens())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain.train()
    assert any("sparsemup.hf.Trainer" in str(w.message) for w in caught)
