"""The depth rule (model.depth_alpha, model.base_depth) through the round trips a user makes: a sweep over depth and
its report, transformers' Trainer (resume, save for plain transformers), two processes, dynamic sparsity. Each is
compared against the uninterrupted (or one-process) run."""

import pytest
import torch

import sparsemup as smp
from helpers import curve, known, read_metrics, sweep_base, tiny_config, tiny_overrides, torchrun
from sparsemup.cli import main
from sparsemup.core.rules import Family, Multipliers, lr_multiplier
from sparsemup.train import checkpoint
from sparsemup.train.trainer import Trainer, train
from sparsemup.tuning.analysis import analyze
from sparsemup.tuning.store import ResultStore
from sparsemup.tuning.sweep import SweepCounts, parse_sweep, run_sweep
from tolerances import model_rtol

# Two blocks tuned at one: m_L = 2, every residual branch scaled by 1/2, hidden LRs by m_L^(α−1) = 1.
DEPTH = ("model.depth=2", "model.depth_alpha=1", "model.base_depth=1")


# ---- sweeps over depth: planned, resumed with nothing left to run, reported per depth rule ----


def test_a_sweep_over_depth_and_depth_rule_resumes_and_reports_each_rule_along_depth(corpus, tmp_path, capsys):
    base = sweep_base(corpus, steps=2)
    grid = {"model.depth_alpha,model.base_depth": [[0, 0], [1, 1]], "model.depth": [1, 2]}
    spec = parse_sweep({"base": base, "grid": grid}, "depth sweep")
    out = tmp_path / "sweep"
    logs: list[str] = []
    assert run_sweep(spec, out, log=logs.append).completed == 4
    assert run_sweep(spec, out, log=logs.append) == SweepCounts(planned=4, stored=4, completed=0, diverged=0, failed=0)
    assert "4 already stored, 0 to run" in logs[-1]
    records = list(ResultStore(out / "results.jsonl").records.values())
    assert {(r["config"]["model.depth"], r["config"]["model.depth_alpha"], r["config"]["model.base_depth"])
            for r in records} == {(1, 0.0, 0), (2, 0.0, 0), (1, 1.0, 1), (2, 1.0, 1)}
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    # One lr: losses along depth at fixed hyperparameters, one table per depth rule (never one depth's runs merged).
    for label in ("base_depth=0, depth_alpha=0", "base_depth=1, depth_alpha=1"):
        assert f"**{label}**, across depth:" in text
    assert (out / "loss-vs-depth.png").stat().st_size > 100


def depth_records():
    """LR sweeps at depths 2, 4, 8 (two seeds): without a depth rule the optimum moves by −1 per doubling of depth,
    with CompleteP (α = 1, base depth 2) it stays at −7."""
    from test_analysis import GRID

    records = []
    for alpha, base_depth, move in ((0.0, 0, -1.0), (1.0, 2, 0.0)):
        for k, depth in enumerate((2, 4, 8)):
            for log2_lr in GRID:
                for seed, noise in ((0, 0.01), (1, -0.01)):
                    overrides = {"model.depth": depth, "optim.lr": 2.0**log2_lr, "train.seed": seed,
                                 "model.depth_alpha": alpha, "model.base_depth": base_depth}
                    records.append({"id": f"{alpha}-{depth}-{log2_lr}-{seed}", "status": "completed",
                                    "final_val_loss": 2.0 - 0.05 * k + 0.1 * (log2_lr + 7 - move * k) ** 2 + noise,
                                    "overrides": overrides, "config": {**overrides, "model.width": 128}})
    return records


def test_report_reads_the_lr_optimum_per_depth_with_intervals_for_each_depth_rule(tmp_path, capsys):
    result = analyze(depth_records())
    drifts = {d["label"]: d for d in result["drifts"]}
    assert set(drifts) == {"base_depth=0, depth_alpha=0", "base_depth=2, depth_alpha=1"}
    assert all(d["along"] == "model.depth" for d in drifts.values())
    none, completep = drifts["base_depth=0, depth_alpha=0"], drifts["base_depth=2, depth_alpha=1"]
    assert [r["model.depth"] for r in none["rows"]] == [2, 4, 8]  # the shallowest is the reference
    assert none["drift_log2"] == pytest.approx(2.0) and completep["drift_log2"] == pytest.approx(0.0, abs=1e-9)
    deepest = none["rows"][-1]
    assert deepest["regret"] == pytest.approx(0.4) and deepest["shift"] == pytest.approx(-2.0)
    lo, hi = deepest["shift_interval"]
    assert lo < -2.0 < hi and hi - lo < 1.5
    assert all(r["regret"] == pytest.approx(0.0, abs=1e-9) for r in completep["rows"])
    store = ResultStore(tmp_path / "results.jsonl")
    for record in depth_records():
        store.append(record)
    assert main(["report", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "| base_depth=0, depth_alpha=0 | depth | 0.400 [" in text  # the lead table: the worst regret
    assert "**base_depth=2, depth_alpha=1**, across depth: transferred log2 lr -7.00 (the shallowest setting's " \
           "optimum)" in text
    assert "| 8 | 0.400 [" in text and "| -2.00 [" in text


# ---- two processes (DDP, gloo): the one-process curve, and a resume from the two-process checkpoint ----


@pytest.mark.slow
def test_ddp_with_a_depth_rule_matches_one_process_and_resumes(corpus, tmp_path):
    common = ("optim.schedule=constant", "train.eval_every=4", *DEPTH)
    single = tmp_path / "single"
    train(tiny_config(corpus, *common), single)
    out = tmp_path / "ddp"
    torchrun(["-m", "sparsemup.cli", "train", "--out", str(out), "--set",
              *tiny_overrides(corpus, *common, "train.steps=4")], tmp_path)
    torchrun(["-m", "sparsemup.cli", "train", "--out", str(out), "--resume", "--set", "train.steps=8"], tmp_path)
    rows, reference = read_metrics(out), read_metrics(single)
    rtol = model_rtol(2 * 7 * 2, 176, steps=8)  # TINY_RTOL's derivation with two blocks on the path
    assert [r["step"] for r in rows] == [str(s) for s in range(1, 9)]
    for key in ("train_loss", "val_loss"):
        got = [float(r[key]) for r in rows if r[key]]
        assert len(got) == (8 if key == "train_loss" else 2)
        assert got == pytest.approx([float(r[key]) for r in reference if r[key]], rel=rtol)
    assert '"world_size":2' in (out / "result.json").read_text()


# ---- dynamic sparsity: GMP's LRs take the density and the depth factors; RigL and GMP resume exactly ----


def hidden_lrs_follow_both_rules(trainer):
    """Every GMP-updated group's LR is η_base·schedule·lr_multiplier at its mask's realised density and the model's
    m_L = 2: the density rule's multiplier times the depth factor m_L^(α−1); returns how many groups were checked."""
    record = smp.get_parameterization(trainer.inner)
    alpha, checked = known(record.options.depth_alpha), 0
    scale = trainer.cfg.optim.lr * trainer.schedule(trainer.step)
    for group in trainer.optimizer.param_groups:
        if "static_lr" not in group:
            continue
        (name,) = group["param_names"]
        info = record.info(name)
        mask = known(smp.core.get_mask(trainer.inner, name))
        m = info.multipliers
        density = float(mask.count_nonzero()) / mask.numel() / info.base_density
        mult = lr_multiplier(info.role, record.scheme, Multipliers(m.width, m.fan_out, density, m.depth), Family.ADAM,
                             alpha)
        without_depth = lr_multiplier(info.role, record.scheme, Multipliers(m.width, m.fan_out, density), Family.ADAM)
        assert m.depth == 2.0 and mult == pytest.approx(without_depth * 2.0 ** (alpha - 1), rel=1e-12)
        assert group["lr"] == pytest.approx(scale * mult, rel=1e-12)
        checked += 1
    return checked


# GMP under depth-µP (α = 1/2), whose hidden LRs take a depth factor (2^(−1/2)); RigL under CompleteP.
@pytest.mark.parametrize(("method", "alpha"), [("gmp", 0.5), ("rigl", 1.0)])
def test_dynamic_sparsity_with_a_depth_rule_resumes_exactly(corpus, tmp_path, method, alpha):
    runs = (*DEPTH, f"model.depth_alpha={alpha}", f"sparsity.method={method}", "sparsity.update_every=2",
            "train.checkpoint_every=3")
    whole = Trainer(tiny_config(corpus, *runs), tmp_path / "whole")
    while whole.step < whole.cfg.train.steps:
        assert whole.train_step()
        if method == "gmp" and whole.step in (2, 4, 6):  # right after a density change
            assert hidden_lrs_follow_both_rules(whole) == 4 * 2  # four hidden weights a block
    whole.close()
    killed = Trainer(tiny_config(corpus, *runs), tmp_path / "split")
    for _ in range(5):  # the checkpoint is at step 3, between the updates at 2 and 4; steps 4-5 lost
        assert killed.train_step()
    killed.close()
    resumed = Trainer(tiny_config(corpus, *runs), tmp_path / "split", resume=True)
    assert resumed.step == 3 and smp.get_parameterization(resumed.inner).residual_multipliers == \
        {f"blocks.{i}.{b}.proj": pytest.approx(2.0**-alpha, rel=1e-15) for i in range(2) for b in ("attn", "mlp")}
    while resumed.step < resumed.cfg.train.steps:
        assert resumed.train_step()
        if method == "gmp" and resumed.step == 4:
            assert hidden_lrs_follow_both_rules(resumed) == 8
    resumed.close()
    assert curve(read_metrics(tmp_path / "split")) == curve(read_metrics(tmp_path / "whole"))
    a, b = checkpoint.load(tmp_path / "whole"), checkpoint.load(tmp_path / "split")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    initial = build_masks(corpus, runs)
    moved = {k: not torch.equal(v, a["model"][k]) for k, v in initial.items()}
    assert all(moved.values()) if method == "gmp" else any(moved.values())


def build_masks(corpus, runs):
    from sparsemup.train import build_model

    return {k: v for k, v in build_model(tiny_config(corpus, *runs)).state_dict().items() if k.endswith("_mask")}


# ---- transformers' Trainer: resume mid-run, and save_model for plain transformers (multipliers folded) ----


def depth_llama():
    from transformers import AutoConfig

    import sparsemup.hf as hf
    from test_hf_trainer import VOCAB

    cfg = AutoConfig.for_model("llama", vocab_size=VOCAB, num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=32)
    torch.manual_seed(0)
    return hf.build(cfg, 64, 32, head_dim=16, scheme="supar", density=0.25, depth_alpha=1.0, base_depth=1, seed=0)


def test_transformers_trainer_with_a_depth_rule_resumes_and_saves_for_plain_transformers(tmp_path):
    pytest.importorskip("accelerate", reason="accelerate is not installed: pip install 'sparsemup[hf]'")
    from transformers import AutoModelForCausalLM

    import sparsemup.hf as hf
    from test_hf_trainer import Tokens, arguments

    x = Tokens().x[:2]

    def run(out, resume=None):
        model = depth_llama()
        assert smp.get_parameterization(model).residual_multipliers  # the rule is on: each branch × 1/2
        trainer = hf.Trainer(model=model, args=arguments(out, save_steps=4), train_dataset=Tokens())
        trainer.train(resume_from_checkpoint=resume)
        model.eval()
        with torch.no_grad():
            logits = model(x).logits
        return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}, logits, trainer

    whole, whole_logits, trainer = run(tmp_path / "whole")
    resumed, logits, _ = run(tmp_path / "resumed", resume=str(tmp_path / "whole" / "checkpoint-4"))
    assert sorted(resumed) == sorted(whole) == list(range(1, 9))
    assert max(abs(whole[k] - resumed[k]) for k in whole) <= 1e-5
    torch.testing.assert_close(logits, whole_logits, rtol=1.3e-6, atol=1e-5)
    trainer.save_model(str(tmp_path / "final"))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, whole_logits, rtol=1e-5, atol=1e-5)
        restored = hf.from_pretrained(tmp_path / "final").eval()
        assert smp.get_parameterization(restored).options.depth_alpha == 1.0
        torch.testing.assert_close(restored(x).logits, whole_logits, rtol=1e-5, atol=1e-5)
