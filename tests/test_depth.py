"""The depth rule (CompleteP, arXiv 2505.01618) on top of SµPar: branches checked, hooks, groups, export, refusals."""

import json
import math

import pytest
import torch

import sparsemup as smp
from helpers import known, lm_loss, tiny_config, tokens, train_steps
from sparsemup.cli import main
from sparsemup.coord import CheckSettings, across_depth, run_check
from sparsemup.core.export import export_with_folds
from sparsemup.models import GPTConfig, build_gpt
from sparsemup.rules import adam_eps_multiplier
from sparsemup.train import ConfigError, build_model
from sparsemup.train.trainer import train
from sparsemup.train.validate import validate
from tolerances import model_rtol


def gpt(depth=4, **kw):
    cfg = GPTConfig(vocab_size=50, width=64, depth=depth, head_dim=16, context=32)
    kw.setdefault("scheme", "supar")
    kw.setdefault("density", 0.5)
    return build_gpt(cfg, 32, **kw)


def test_no_depth_rule_is_todays_model_bitwise():
    """depth_alpha=None: the same weights, groups, signature and losses as without the option."""
    plain, _ = gpt()
    none, record = gpt(depth_alpha=None)
    assert record.residual_multipliers == {} and record.depth is None
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), none.state_dict().values()))
    opts = [smp.make_optimizer(m, torch.optim.AdamW, lr=1e-2, weight_decay=0.1) for m in (plain, none)]
    assert all("eps" not in g or g["eps"] == 1e-8 for g in opts[1].param_groups)
    assert [g["lr"] for g in opts[0].param_groups] == [g["lr"] for g in opts[1].param_groups]
    x = tokens(seq=17)
    # One thread: bitwise equality is a claim about the models, not about how a BLAS splits a product over threads
    # (a run under heavy load once differed in the 7th digit with 2).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        losses = [[train_steps(m, o, 1, x).item() for _ in range(2)] for m, o in zip((plain, none), opts)]
    finally:
        torch.set_num_threads(threads)
    assert losses[0] == losses[1]
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), none.parameters()))


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_depth_rule_multipliers_groups_and_init(alpha):
    model, record = gpt(depth=8, depth_alpha=alpha, base_depth=2)
    m_l = 4.0
    assert record.depth == 8
    assert set(record.residual_multipliers) == {f"blocks.{i}.{b}.proj" for i in range(8) for b in ("attn", "mlp")}
    assert all(v == pytest.approx(m_l ** -alpha, rel=1e-15) for v in record.residual_multipliers.values())
    info = record.info("blocks.3.mlp.fc.weight")
    m_rho = info.multipliers.density
    assert info.multipliers.depth == m_l and record.info("wte.weight").multipliers.depth == 1.0
    assert record.info("ln_f.weight").multipliers.depth == 1.0
    assert record.info("blocks.0.ln1.weight").multipliers.depth == m_l
    # GPT-2's 1/sqrt(2·depth) init factor held at the base depth
    assert record.info("blocks.0.attn.proj.weight").init_std == pytest.approx(
        0.02 / math.sqrt(2 * m_rho) / math.sqrt(2 * 2), rel=1e-12)
    groups = {n: g for g in smp.param_groups(model, torch.optim.AdamW, lr=1.0, eps=1e-8) for n in g["param_names"]}
    hidden, norm, emb, final = (groups[n] for n in ("blocks.3.mlp.fc.weight", "blocks.3.ln2.weight", "wte.weight",
                                                   "ln_f.weight"))
    assert hidden["lr"] == pytest.approx(1 / (2 * m_rho) * m_l ** (alpha - 1), rel=1e-12)
    assert norm["lr"] == pytest.approx(m_l ** (alpha - 1), rel=1e-12)
    assert emb["lr"] == 1.0 and final["lr"] == 1.0
    assert hidden["eps"] == pytest.approx(1e-8 / 2 * m_l ** -alpha, rel=1e-12)
    assert emb["eps"] == pytest.approx(1e-8 / 2, rel=1e-12)
    text = smp.explain(model)
    assert "m_L" in text and "eps_mult" in text and f"depth rule alpha {alpha:g}: 8 residual blocks" in text
    with pytest.raises(ValueError, match="Adam-family"):
        smp.param_groups(model, torch.optim.SGD, lr=1.0)


def test_residual_multiplier_is_applied_to_each_branch():
    """With the hooks, each block's update is m_L^(−α) times what the same weights give without a depth rule."""
    model, record = gpt(depth=4, depth_alpha=1.0, base_depth=1)
    seen, raw = {}, {}

    def after(module, args, out):  # runs after the depth rule's hook (registered first)
        seen[module] = out.detach()

    def before(module, args):
        raw[module] = torch.nn.functional.linear(args[0], module.weight).detach()

    for branch in (model.blocks[2].attn.proj, model.blocks[2].mlp.proj):
        branch.register_forward_hook(after)
        branch.register_forward_pre_hook(before)
    with torch.no_grad():
        model(tokens(seq=8))
    assert len(seen) == 2
    for module, out in seen.items():
        torch.testing.assert_close(out, raw[module] * 0.25, rtol=0, atol=0)  # m_L = 4, α = 1: a power of two


def test_residual_branches_found_equal_the_declared_ones():
    _, found = gpt(depth=3, depth_alpha=1.0, base_depth=1, residual_branches=None)
    _, declared = gpt(depth=3, depth_alpha=1.0, base_depth=1)
    assert found.residual_multipliers == declared.residual_multipliers


@pytest.mark.parametrize(("branches", "error"), [
    (["blocks.*.attn.qkv", "blocks.*.mlp.proj"], "block 'blocks.0'.*do not sum.*residual_branches"),
    (["blocks.*.attn.proj"], "block 'blocks.0'.*do not sum.*residual_branches"),
    (["blocks.*.attn.nope"], "pattern 'blocks.\\*.attn.nope' matches no module"),
    (["ln_f"], "'ln_f' is in no numbered block"),
    (["blocks.0.attn.proj", "blocks.0.mlp.proj"], "cover 1 of the model's 2 residual blocks"),
])
def test_wrong_residual_branches_are_refused_by_name(branches, error):
    with pytest.raises(ValueError, match=error):
        gpt(depth=2, depth_alpha=1.0, base_depth=1, residual_branches=branches)


def test_an_integer_alpha_is_the_same_rule(tmp_path):
    source, _ = gpt(depth=2, depth_alpha=1.0, base_depth=1)
    model, _ = gpt(depth=2, depth_alpha=1, base_depth=1)
    model.load_state_dict(source.state_dict())


def test_explain_cli_shows_the_depth_rule(capsys):
    main(["explain", "--width", "64", "--base-width", "32", "--head-dim", "16", "--depth", "4", "--depth-alpha",
          "0.5", "--base-depth", "1"])
    out = capsys.readouterr().out
    assert "depth rule alpha 0.5: 4 residual blocks, base depth 1, m_L 4" in out
    assert "residual branch blocks.3.mlp.proj: output x 0.5 (m_L^-alpha)" in out


def test_depth_options_are_checked():
    with pytest.raises(ValueError, match="base_depth"):
        gpt(depth_alpha=1.0)
    with pytest.raises(ValueError, match="depth_alpha must be"):
        gpt(depth_alpha=2.0, base_depth=2)
    with pytest.raises(ValueError, match="set depth_alpha"):
        gpt(base_depth=2)


def test_export_folds_the_residual_multipliers():
    model, record = gpt(depth=4, depth_alpha=0.5, base_depth=1)
    x = tokens(seq=16)
    want = model(x).detach()
    plain, folds = export_with_folds(model)
    assert folds["blocks.1.mlp.proj.weight"] == pytest.approx(0.5, rel=1e-15)
    assert not any(m._forward_hooks for m in plain.modules())
    rtol = model_rtol(matmuls=2 * 4 + 2, k=176)
    torch.testing.assert_close(plain(x), want, rtol=rtol, atol=rtol * float(want.abs().max()))


def test_state_dict_from_another_depth_rule_is_refused():
    source, _ = gpt(depth=4, depth_alpha=1.0, base_depth=2)
    same, _ = gpt(depth=4, depth_alpha=1.0, base_depth=2)
    same.load_state_dict(source.state_dict())
    for other in (dict(depth_alpha=0.5, base_depth=2), dict(depth_alpha=1.0, base_depth=1), {}):
        model, _ = gpt(depth=4, **other)
        with pytest.raises(ValueError, match="parameterized differently"):
            model.load_state_dict(source.state_dict())


def test_depth_rule_trains_and_keeps_masks():
    model, _ = gpt(depth=4, depth_alpha=1.0, base_depth=2)
    opt = smp.make_optimizer(model, torch.optim.AdamW, lr=3e-3, weight_decay=0.1)
    x = tokens(seq=17)
    first = lm_loss(model, x).item()
    last = train_steps(model, opt, 5, x).item()
    assert last < first
    for name, info in smp.get_parameterization(model).params.items():
        if info.masked:
            w = model.get_parameter(name).detach()
            assert int((w[smp.core.get_mask(model, name) == 0] != 0).sum()) == 0


DEPTH = ("model.depth=2", "model.depth_alpha=1", "model.base_depth=1")


def test_trainer_resumes_with_the_depth_keys_and_refuses_another_depth_rule(corpus, tmp_path):
    cfg = tiny_config(corpus, "train.steps=4", *DEPTH)
    record = smp.get_parameterization(build_model(cfg))
    assert record.options.depth_alpha == 1.0 and record.depth == 2 and len(record.residual_multipliers) == 4
    whole = train(tiny_config(corpus, "train.steps=4", *DEPTH), tmp_path / "whole")
    out = tmp_path / "run"
    train(tiny_config(corpus, "train.steps=2", *DEPTH), out)
    with pytest.raises(ConfigError, match=r"model\.depth_alpha: checkpoint 1\.0, config 0\.5"):
        train(tiny_config(corpus, "train.steps=4", *DEPTH, "model.depth_alpha=0.5"), out, resume=True)
    with pytest.raises(ConfigError, match=r"model\.base_depth: checkpoint 1, config 2"):
        train(tiny_config(corpus, "train.steps=4", *DEPTH, "model.base_depth=2"), out, resume=True)
    resumed = train(tiny_config(corpus, "train.steps=4", *DEPTH), out, resume=True)
    assert resumed.final_val_loss == whole.final_val_loss


@pytest.mark.parametrize(("overrides", "error"), [
    (("model.depth_alpha=1",), "needs model.base_depth"),
    (("model.base_depth=2",), "model.base_depth = 2 is set but model.depth_alpha = 0"),
    (("model.depth_alpha=0.3", "model.base_depth=1"), "model.depth_alpha = 0.3"),
    (("model.depth_alpha=1", "model.base_depth=1", "optim.name=sgd"), "AdamW only"),
])
def test_trainer_depth_keys_are_validated(corpus, overrides, error):
    with pytest.raises(ConfigError, match=error):
        validate(tiny_config(corpus, *overrides))


# ---- the coordinate check across depth (docs/COORD_CHECK.md) ----


def depth_check(alpha):
    settings = CheckSettings.resolve("gpt", "supar", widths=[64], densities=[1.0, 0.25], steps=3, seeds=1,
                                     base_width=32, depths=[2, 4, 8], depth_alpha=alpha,
                                     base_depth=2 if alpha else None)
    return run_check(settings)


def test_depth_check_fails_without_a_depth_rule_and_passes_with_completep():
    without, completep = depth_check(None), depth_check(1.0)
    assert without["verdict"]["depth"]["pass"] is False and without["verdict"]["depth"]["max_abs_slope"] > 0.5
    assert completep["verdict"]["depth"]["pass"] is True
    assert {f["quantity"] for f in completep["slopes"]} == {"act", "delta", "block_delta"}
    assert {r["depth"] for r in completep["measurements"]} == {2, 4, 8}
    assert [c["depth"] for c in completep["losses"] if c["base"]] == [2]


def test_depth_check_cli_writes_its_result_and_figure(tmp_path, capsys):
    main(["coord-check", "--model", "gpt", "--widths", "64", "--base-width", "32", "--densities", "1", "--depths",
          "2,4", "--depth-alpha", "1", "--steps", "2", "--seeds", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "coordinate check across depth" in out and "depth    verdict:" in out
    assert (tmp_path / "depth.png").exists()
    assert json.loads((tmp_path / "coord.json").read_text())["settings"]["depths"] == [2, 4]


@pytest.mark.parametrize(("kwargs", "error"), [
    (dict(depth_alpha=1.0), "add --depths"),
    (dict(depths=[2, 4], model="mlp"), "the MLP has no residual blocks"),
    (dict(depths=[2, 4], model="hf:llama", depth=3), "drop --depth"),
    (dict(depths=[4]), "at least two different depths"),
    (dict(depths=[2, 4], depth_alpha=3.0), "depth_alpha must be"),
])
def test_depth_check_settings_are_checked(kwargs, error):
    model = kwargs.pop("model", "gpt")
    with pytest.raises(ValueError, match=error):
        CheckSettings.resolve(model, "supar", **kwargs)


# ---- transformers models: branches found and checked, saved for plain transformers with the multipliers folded ----


@pytest.mark.parametrize(("model_type", "branches"), [
    ("llama", {"model.layers.{}.self_attn.o_proj", "model.layers.{}.mlp.down_proj"}),
    ("gpt2", {"transformer.h.{}.attn.c_proj", "transformer.h.{}.mlp.c_proj"}),
    ("qwen2", {"model.layers.{}.self_attn.o_proj", "model.layers.{}.mlp.down_proj"}),
])
def test_transformers_residual_branches_are_found(model_type, branches):
    hf = pytest.importorskip("sparsemup.hf")
    template = hf.small_config(model_type, 256, 3, 32)
    model = hf.build(template, 128, 64, head_dim=32, density=0.5, depth_alpha=1.0, base_depth=1)
    record = smp.get_parameterization(model)
    assert set(record.residual_multipliers) == {b.format(i) for b in branches for i in range(3)}
    assert record.depth == 3
    wrong = [b.format("*").replace("o_proj", "q_proj").replace("attn.c_proj", "attn.c_attn") for b in branches]
    with pytest.raises(ValueError, match="do not sum to its output minus its input.*residual_branches"):
        hf.build(template, 128, 64, head_dim=32, density=0.5, depth_alpha=1.0, base_depth=1, residual_branches=wrong)


def test_transformers_save_folds_the_residual_multipliers_and_restores_them(tmp_path):
    hf = pytest.importorskip("sparsemup.hf")
    from transformers import AutoModelForCausalLM

    template = hf.small_config("llama", 256, 3, 32)
    model = hf.build(template, 128, 64, head_dim=32, density=0.5, depth_alpha=0.5, base_depth=1)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    model.eval()
    want = model(x, use_cache=False).logits.detach()
    hf.save_pretrained(model, tmp_path / "saved")
    rtol = model_rtol(matmuls=2 * 3 + 2, k=344)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    torch.testing.assert_close(plain(x, use_cache=False).logits, want, rtol=rtol, atol=rtol * float(want.abs().max()))
    back = hf.from_pretrained(tmp_path / "saved").eval()
    record = smp.get_parameterization(back)
    assert (record.options.depth_alpha, record.options.base_depth, record.depth) == (0.5, 1, 3)
    assert record.residual_multipliers == smp.get_parameterization(model).residual_multipliers
    torch.testing.assert_close(back(x, use_cache=False).logits, want, rtol=rtol, atol=rtol * float(want.abs().max()))


# ---- ε's factors from how hidden-weight gradients scale (docs/RULES.md): measured, not only derived ----


def gradient_and_eps(width, density, depth, alpha, seed):
    """Geometric mean over hidden weights of the RMS of their gradient's kept entries (one backward at init), and
    the ε multiplier the rule gives a hidden weight."""
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=64, width=width, depth=depth, head_dim=16, context=32)
    model, record = build_gpt(cfg, 32, density=density, seed=seed, depth_alpha=alpha, base_depth=2)
    lm_loss(model, tokens(batch=4, seq=33, vocab=64, seed=seed)).backward()
    logs = []
    for name, info in record.params.items():
        if info.role.value == "hidden":
            mask = smp.core.get_mask(model, name)
            grad = model.get_parameter(name).grad
            kept = known(grad)[mask != 0] if mask is not None else known(grad).flatten()
            logs.append(math.log(float(kept.pow(2).mean().sqrt())))
    eps = adam_eps_multiplier(record.scheme, record.info("blocks.0.mlp.fc.weight").multipliers, alpha)
    return math.exp(sum(logs) / len(logs)), eps


@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize(("axis", "a", "b"), [
    ("density", (64, 1.0, 2), (64, 0.25, 2)),
    ("depth", (64, 0.25, 2), (64, 0.25, 8)),
    ("width", (64, 0.25, 2), (128, 0.25, 2)),
])
def test_eps_scales_as_hidden_gradients_do(alpha, axis, a, b):
    """Against density, depth and width, the log-log slope of the rule's ε multiplier matches that of the measured
    hidden-weight gradient entries (0, −α, −1) within the coordinate check's threshold: a missing or extra factor
    (an m_ρ, the wrong α) is off by at least 1/2."""
    index = ("width", "density", "depth").index(axis)
    ends = []
    for point in (a, b):
        width, density, depth = point
        grads, eps = zip(*(gradient_and_eps(width, density, depth, alpha, seed) for seed in range(2)))
        ends.append((sum(grads) / 2, eps[0]))
    span = math.log(b[index] / a[index])
    grad_slope = math.log(ends[1][0] / ends[0][0]) / span
    eps_slope = math.log(ends[1][1] / ends[0][1]) / span
    assert abs(grad_slope - eps_slope) <= 0.25, (grad_slope, eps_slope)


@pytest.mark.slow
def test_fsdp2_with_a_depth_rule_matches_one_process(corpus, tmp_path):
    """Hooks on the branch modules inside FSDP's block units: two processes train the single-process curve."""
    from helpers import read_metrics, tiny_overrides, torchrun

    common = ("optim.schedule=constant", "train.eval_every=4", *DEPTH)
    train(tiny_config(corpus, *common), tmp_path / "single")
    out = tmp_path / "fsdp"
    torchrun(["-m", "sparsemup.cli", "train", "--out", str(out), "--fsdp", "--set",
              *tiny_overrides(corpus, *common)], tmp_path)
    rtol = model_rtol(2 * 7 * 2, 176, steps=8)  # the tiny model's tolerance, two blocks
    single, fsdp = ([float(r["train_loss"]) for r in read_metrics(d)] for d in (tmp_path / "single", out))
    assert len(fsdp) == 8 and fsdp == pytest.approx(single, rel=rtol)
    assert smp.get_parameterization(build_model(tiny_config(corpus, *common))).depth == 2


def test_depth_check_runs_on_a_transformers_model():
    pytest.importorskip("sparsemup.hf")
    settings = CheckSettings.resolve("hf:llama", "supar", widths=[128], densities=[1.0], steps=2, seeds=1,
                                     base_width=128, depths=[2, 4], depth_alpha=1.0)
    result = run_check(settings)
    assert across_depth(result)
    assert {r["depth"] for r in result["measurements"]} == {2, 4}
    fitted = {(f["quantity"], f["step"]) for f in result["slopes"]}
    assert fitted == {("act", 0), ("act", 1), ("act", 2), ("delta", 1), ("delta", 2), ("block_delta", 1),
                      ("block_delta", 2)}
    assert result["settings"]["head_dim"] == 64 and "depth" not in result["settings"]


def test_depth_check_measures_training_not_dropout():
    """GPT-2's config drops 10% of the stream: with dropout on, each step's new masks would change the last block's
    output at any learning rate. At a learning rate too small to move a weight the measured change must be 0."""
    pytest.importorskip("sparsemup.hf")
    from sparsemup.coord.depth import hf_depth_cases, measure_depth
    from sparsemup.core.optim import make_optimizer

    case = next(c for c in hf_depth_cases("gpt2", "supar", [128], [1.0], [2, 3], 1, 128, 1.0, 2) if not c.base)
    model = case.build()
    assert getattr(model.config, "resid_pdrop", 0) > 0  # the template does drop: the check must turn it off
    rows = measure_depth(model, case.inputs, case.targets, case.loss_fn,
                         make_optimizer(model, torch.optim.Adam, lr=1e-30), 1, [])
    assert [r["rms"] for r in rows if r["quantity"] in ("delta", "block_delta")] == [0.0, 0.0]


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["none", "half", "one"])
def test_the_documented_gpt_depth_verdicts_are_unchanged(rule, tmp_path):
    """docs/COORD_CHECK.md's depth verdicts (docs/coord/gpt-supar-depth-*/coord.json), rerun with their settings."""
    from pathlib import Path

    documented = json.loads(Path(f"docs/coord/gpt-supar-depth-{rule}/coord.json").read_text())
    s = documented["settings"]
    args = ["coord-check", "--model", "gpt", "--scheme", s["scheme"], "--widths", ",".join(map(str, s["widths"])),
            "--base-width", str(s["base_width"]), "--densities", ",".join(map(str, s["densities"])), "--depths",
            ",".join(map(str, s["depths"])), "--base-depth", str(s["base_depth"]), "--out", str(tmp_path)]
    if s["depth_alpha"] is not None:
        args += ["--depth-alpha", str(s["depth_alpha"])]
    assert main(args) == 0
    found = json.loads((tmp_path / "coord.json").read_text())["verdict"]["depth"]
    assert found["pass"] is documented["verdict"]["depth"]["pass"]
    # Another CPU sums in another order: each RMS may move by the model's rounding bound, a slope by twice that
    # over the log-depth span (the deepest model: 7 products per block, FFN fan-in 688 at width 256, 5 steps).
    rtol = model_rtol(matmuls=7 * max(s["depths"]), k=688, steps=s["steps"])
    slope_tol = 2 * rtol / math.log(max(s["depths"]) / min(s["depths"]))
    assert found["max_abs_slope"] == pytest.approx(documented["verdict"]["depth"]["max_abs_slope"], abs=slope_tol)
