"""Dynamic sparsity in a model and in the trainer: exact counts, exact zeros, optimizer resets, GMP's
schedule and LR, bitwise resume, load-time checks, identical masks on two processes, bad configs."""

import contextlib
import json
import math

import pytest
import torch

import sparsemup as smp
from helpers import (
    TINY_RTOL,
    curve,
    known,
    lm_loss,
    mask_of,
    masked_zero_violations,
    read_metrics,
    tiny_config,
    tiny_gpt,
    tiny_overrides,
    tokens,
    torchrun,
)
from sparsemup.core.masks import nonzeros_per_row
from sparsemup.core.record import dense_gradients
from sparsemup.core.rules import Family, Multipliers, Role, lr_multiplier
from sparsemup.dynamic import GMP, SET, DynamicSparsity, RigL
from sparsemup.train import ConfigError, build_model, checkpoint, evaluate_checkpoint
from sparsemup.train.trainer import Completed, Trainer, train
from sparsemup.train.validate import validate

RIGL = ("sparsity.method=rigl", "sparsity.update_every=2", "train.checkpoint_every=3")
GMP_RUN = ("sparsity.method=gmp", "sparsity.update_every=2", "train.checkpoint_every=3", "model.density=0.25")


def masks(model):
    return {name: mask_of(model, name).clone() for name, info in
            smp.get_parameterization(model).params.items() if info.masked}


def row_counts(mask):
    return mask.reshape(mask.shape[0], -1).sum(dim=1)


def rigl_step(model, dyn, opt, step, x):
    """One training step of a model under ``dyn`` outside the trainer (the documented loop)."""
    opt.zero_grad()
    with dense_gradients(model) if dyn.wants_gradients(step) else contextlib.nullcontext():
        lm_loss(model, x).backward()
    grads = dyn.take_gradients() if dyn.wants_gradients(step) else None
    opt.step()
    return dyn.update(step, opt, grads)


@pytest.mark.parametrize("method", [RigL(stop_step=7, update_every=2), SET(stop_step=7, update_every=2)])
def test_updates_keep_row_counts_and_exact_zeros_and_reset_the_changed_entries(method):
    model = tiny_gpt(width=64, base_width=32, density=0.25)
    before = masks(model)
    dyn = DynamicSparsity(model, method, seed=3)
    opt = smp.make_optimizer(model, torch.optim.AdamW, lr=1e-2)
    dyn.attach(opt)
    x = tokens(seq=17)
    rigl_step(model, dyn, opt, 1, x)
    moments = {name: {k: v.clone() for k, v in opt.state[t.param].items()} for name, t in dyn.targets.items()}
    old = masks(model)
    changed = rigl_step(model, dyn, opt, 2, x)
    new = masks(model)
    assert sum(changed.values()) > 0 and set(changed) == set(new)
    for name, t in dyn.targets.items():
        assert torch.equal(row_counts(new[name]), row_counts(before[name]))  # every neuron keeps its fan-in
        flipped = old[name] != new[name]
        assert int(flipped.sum()) == changed[name]
        grown = (new[name] != 0) & (old[name] == 0)
        assert int((t.param.detach()[grown] != 0).sum()) == 0  # regrown at zero (RigL's choice)
        for key in ("exp_avg", "exp_avg_sq"):
            state = opt.state[t.param][key]
            assert int((state[flipped] != 0).sum()) == 0
            # Kept entries went on with their moments (one more step decays them, they are not zeroed).
            kept = (old[name] != 0) & (new[name] != 0)
            assert int((state[kept] == 0).sum()) < int(kept.sum()) and moments[name][key].shape == state.shape
    assert masked_zero_violations(model) == 0
    rigl_step(model, dyn, opt, 3, x)  # a step between updates keeps masked entries at zero
    assert masked_zero_violations(model) == 0 and all(torch.equal(new[k], v) for k, v in masks(model).items())


def test_rigl_regrows_where_the_dense_gradient_is_largest():
    model = tiny_gpt(width=64, base_width=32, density=0.25)
    dyn = DynamicSparsity(model, RigL(stop_step=100, update_every=1, fraction=0.5))
    opt = smp.make_optimizer(model, torch.optim.AdamW, lr=1e-2)
    dyn.attach(opt)
    old = masks(model)
    opt.zero_grad()
    with dense_gradients(model):
        lm_loss(model, tokens(seq=17)).backward()
    grads = dyn.take_gradients()
    name, t = next(iter(dyn.targets.items()))
    assert int((grads[name][old[name] == 0] != 0).sum()) > 0  # dense where the mask is off ...
    assert int((known(t.param.grad)[old[name] == 0] != 0).sum()) == 0  # ... and the gradient itself masked after
    opt.step()
    dyn.update(1, opt, grads)
    grown = (masks(model)[name] != 0) & (old[name] == 0)
    off = old[name] == 0
    # Per row, every regrown entry's |gradient| is at least that of any entry left off.
    score = grads[name].abs()
    for row in range(score.shape[0]):
        g, rest = score[row][grown[row]], score[row][off[row] & ~grown[row]]
        if len(g) and len(rest):
            assert float(g.min()) >= float(rest.max())


def test_regrow_normal_draws_the_layers_init_std():
    model = tiny_gpt(width=128, base_width=32, density=0.25)
    dyn = DynamicSparsity(model, SET(stop_step=100, update_every=1, fraction=0.5), regrow_init="normal")
    old = masks(model)
    dyn.update(1)
    name, t = next(iter(dyn.targets.items()))
    grown = (masks(model)[name] != 0) & (old[name] == 0)
    values = t.param.detach()[grown]
    assert values.numel() > 500 and float(values.std()) == pytest.approx(t.info.init_std, rel=0.1)


def test_gmp_prunes_along_its_schedule_with_the_lr_following_the_density():
    model = tiny_gpt(width=64, base_width=32, density=1.0, mask_dense=True)
    method = GMP(final_density=0.25, stop_step=8, start_density=1.0, update_every=2, constant_fan_in=False)
    dyn = DynamicSparsity(model, method)
    opt = smp.make_optimizer(model, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    dyn.attach(opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    x = tokens(seq=17)
    for step in range(1, 10):
        opt.zero_grad()
        lm_loss(model, x).backward()
        opt.step()
        sched.step()
        dyn.update(step, opt, scheduler=sched)
        expected = dyn.nonzeros(step)
        for name, mask in masks(model).items():
            assert int(mask.count_nonzero()) == expected[name]
            rows, fan_in = mask.shape[0], mask[0].numel()
            assert expected[name] == rows * nonzeros_per_row(method.density(step), fan_in) or step < 2
            assert int(row_counts(mask).min()) >= 1  # per-layer counts, but no neuron left without inputs
        assert masked_zero_violations(model) == 0
        for group, base in zip(opt.param_groups, sched.base_lrs):
            if "static_lr" in group:  # SµPar's hidden LR at the current density: 1/(m_d·m_ρ(t))
                t = dyn.targets[group["param_names"][0]]
                density = expected[t.info.name] / t.mask.numel()
                mult = lr_multiplier(Role.HIDDEN, "supar", Multipliers(t.info.multipliers.width, 1.0, density),
                                     Family.ADAM)
                assert group["lr"] == pytest.approx(1e-2 * mult) and base == pytest.approx(1e-2 * mult)
                assert group["weight_decay"] * group["lr"] == pytest.approx(0.1 * 1e-2)  # lr·wd kept
    assert {round(float(m.count_nonzero()) / m.numel(), 2) for m in masks(model).values()} == {0.25}


@pytest.mark.parametrize("constant_fan_in", [True, False])
def test_a_mid_schedule_state_dict_loads_only_into_a_model_expecting_it(constant_fan_in):
    # Bernoulli masks at 0.6: rows start with different counts, which the expected counts must follow.
    def build():
        return tiny_gpt(width=64, base_width=32, density=0.6, mask_kind="bernoulli")

    method = GMP(0.25, stop_step=8, start_density=0.6, update_every=2, constant_fan_in=constant_fan_in)
    model = build()
    dyn = DynamicSparsity(model, method)
    dyn.update(2)
    dyn.update(4)
    assert {name: int(m.count_nonzero()) for name, m in masks(model).items()} == dyn.nonzeros(4)
    state = model.state_dict()
    fresh = build()
    with pytest.raises(ValueError, match="nonzeros"):
        fresh.load_state_dict(state)
    DynamicSparsity(fresh, method).expect_step(4)
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(masks(fresh).values(), masks(model).values()))


def test_attach_and_update_refuse_what_would_lose_the_density_lr():
    model = tiny_gpt(width=64, base_width=32, density=1.0, mask_dense=True)
    dyn = DynamicSparsity(model, GMP(0.25, stop_step=8, update_every=2))
    opt = smp.make_optimizer(model, torch.optim.AdamW, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(ValueError, match="before an LR scheduler"):
        dyn.attach(opt)
    opt = smp.make_optimizer(model, torch.optim.AdamW, lr=1e-2, weight_decay=0.1, weight_decay_mode="coupled")
    with pytest.raises(ValueError, match="weight_decay_mode"):
        dyn.attach(opt)
    opt = smp.make_optimizer(model, torch.optim.AdamW, lr=1e-2)
    dyn.attach(opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(ValueError, match="scheduler="):
        dyn.update(2, opt)
    dyn.update(2, opt, scheduler=sched)


def test_a_rigl_run_resumed_after_a_kill_is_the_uninterrupted_run_bitwise(corpus, tmp_path):
    whole = train(tiny_config(corpus, *RIGL), tmp_path / "whole")
    killed = Trainer(tiny_config(corpus, *RIGL), tmp_path / "split")
    for _ in range(5):  # checkpoint at step 3 (between updates at 2 and 4); steps 4-5 lost with the "kill"
        assert killed.train_step()
    killed.close()
    resumed = train(tiny_config(corpus, *RIGL), tmp_path / "split", resume=True)
    assert isinstance(whole, Completed) and isinstance(resumed, Completed)
    assert curve(read_metrics(tmp_path / "split")) == curve(read_metrics(tmp_path / "whole"))
    a, b = checkpoint.load(tmp_path / "whole"), checkpoint.load(tmp_path / "split")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert resumed.mask_sha256 == whole.mask_sha256
    initial = masks(build_model(tiny_config(corpus, *RIGL)))
    final = {k[: -len("_mask")]: v for k, v in a["model"].items() if k.endswith("_mask")}
    assert any(not torch.equal(initial[k], final[k]) for k in initial)  # the masks moved
    assert all(torch.equal(row_counts(initial[k]), row_counts(final[k])) for k in initial)
    kept = whole.kept_weights
    assert set(kept) == set(initial) and all(v["density"] == pytest.approx(0.25) for v in kept.values())
    # The ratio's reference is the init std each layer got: residual projections carry GPT-2's 1/√(2·depth), and
    # the ratio has a key of its own, so records that left the factor out (rms_over_supar_std) cannot mix with it.
    depth = tiny_config(corpus, *RIGL).model.depth
    first = {k.split(".", 2)[2]: v for k, v in kept.items() if k.startswith("blocks.0.")}
    assert first["attn.proj.weight"]["layer_supar_std"] == pytest.approx(
        first["attn.qkv.weight"]["layer_supar_std"] / math.sqrt(2 * depth))
    assert all(v["rms_over_layer_supar_std"] == pytest.approx(v["rms"] / v["layer_supar_std"])
               and "rms_over_supar_std" not in v for v in kept.values())


@pytest.mark.parametrize("every", [3, 2])  # a checkpoint between updates (3) or right after one (2, 4)
def test_a_mid_gmp_checkpoint_resumes_bitwise_and_another_schedule_is_refused(corpus, tmp_path, every):
    runs = (*GMP_RUN, f"train.checkpoint_every={every}")
    train(tiny_config(corpus, *runs), tmp_path / "whole")
    killed = Trainer(tiny_config(corpus, *runs), tmp_path / "split")
    for _ in range(5):  # killed after step 5: the checkpoint is at step 3 or 4, mid-schedule (updates at 2, 4, 6)
        assert killed.train_step()
    killed.close()
    # sparsemup eval reads the mid-schedule checkpoint (its masks are the schedule's at that step).
    assert evaluate_checkpoint(tmp_path / "split").step == (3 if every == 3 else 4)
    for other, key in ((("sparsity.update_every=3",), "sparsity.update_every"),
                       (("train.steps=10",), "train.steps"), (("sparsity.method=rigl",), "sparsity.method")):
        with pytest.raises(ConfigError, match=key):
            Trainer(tiny_config(corpus, *runs, *other), tmp_path / "split", resume=True)
    train(tiny_config(corpus, *runs), tmp_path / "split", resume=True)
    assert curve(read_metrics(tmp_path / "split")) == curve(read_metrics(tmp_path / "whole"))
    state = checkpoint.load(tmp_path / "split")
    final = [v for k, v in state["model"].items() if k.endswith("_mask")]
    assert {round(float(m.count_nonzero()) / m.numel(), 3) for m in final} == {0.25}


@pytest.mark.parametrize("overrides, message", [
    (("sparsity.method=rigl", "model.density=1"), "density below 1"),
    (("sparsity.method=gmp", "model.mask_kind=blocks", "model.backend=blocks", "model.block_size=8"),
     "masked_dense"),
    (("sparsity.method=set", "model.mask_kind=blocks", "model.block_size=8"), "mask_kind"),
    (("sparsity.method=rigl", "dist.fsdp=true"), "FSDP"),
    (("sparsity.update_fraction=0",), "update_fraction"),
    (("sparsity.update_fraction=1.5",), "update_fraction"),
    (("sparsity.stop_fraction=0",), "stop_fraction"),
    (("sparsity.method=rigl", "sparsity.update_every=6"), "no mask update before the stop step"),
    (("sparsity.method=gmp", "sparsity.update_every=7"), "no mask update before the stop step"),
    (("sparsity.method=gmp", "sparsity.update_every=2", "sparsity.start_density=0.25"), "start_density"),
    (("sparsity.method=magnitude",), "sparsity.method"),
])
def test_bad_sparsity_configs_are_refused_before_any_work(corpus, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(tiny_config(corpus, *overrides))


def test_a_sparse_by_storage_model_is_refused():
    from helpers import block_gpt

    with pytest.raises(ValueError, match="masked_dense"):
        DynamicSparsity(block_gpt("blocks"), RigL(stop_step=20))


@pytest.mark.slow
def test_rigl_on_two_processes_takes_the_single_process_masks(corpus, tmp_path):
    items = tiny_overrides(corpus, *RIGL, "optim.schedule=constant")
    single = train(tiny_config(corpus, *RIGL, "optim.schedule=constant"), tmp_path / "one")
    assert isinstance(single, Completed)
    torchrun(["-m", "sparsemup.cli", "train", "--out", str(tmp_path / "two"), "--set", *items], tmp_path)
    result = json.loads((tmp_path / "two" / "result.json").read_text())
    # Each rank checked after every update that both hold the same masks; they are the one-process masks.
    assert result["world_size"] == 2 and result["mask_sha256"] == single.mask_sha256
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [float(r["train_loss"]) for r in two] == pytest.approx([float(r["train_loss"]) for r in one],
                                                                   rel=TINY_RTOL)


def test_coord_check_with_rigl_updates_inside_the_check(tmp_path, capsys):
    from sparsemup.cli import main

    args = ["coord-check", "--model", "mlp", "--widths", "64,128", "--densities", "1,0.25", "--seeds", "1"]
    assert main([*args, "--sparsity-method", "rigl", "--out", str(tmp_path / "rigl")]) == 0
    assert main([*args, "--steps", "20", "--out", str(tmp_path / "static")]) == 0
    rigl = json.loads((tmp_path / "rigl" / "coord.json").read_text())
    static = json.loads((tmp_path / "static" / "coord.json").read_text())
    assert rigl["settings"]["steps"] == 20 and rigl["settings"]["sparsity"] == {
        "method": "rigl", "update_every": 5, "stop_step": 15, "update_fraction": 0.3}
    by_case = {(c["width"], c["density"]): c["losses"] for c in static["losses"] if not c["base"]}
    for case in rigl["losses"]:
        same = case["losses"] == by_case.get((case["width"], case["density"]), case["losses"])
        # Dense cases train as before; sparse ones match until the first update (after step 5) changes the masks.
        if case["density"] == 1.0:
            assert same
        else:
            assert case["losses"][:5] == by_case[(case["width"], case["density"])][:5] and not same
    capsys.readouterr()
    assert main([*args, "--sparsity-method", "gmp", "--out", str(tmp_path / "gmp")]) == 2
    assert "gmp changes the density during the check" in capsys.readouterr().err
    assert main([*args, "--sparsity-method", "rigl", "--steps", "5", "--out", str(tmp_path / "short")]) == 2
    assert "no mask update" in capsys.readouterr().err
    assert not (tmp_path / "gmp").exists() and not (tmp_path / "short").exists()  # refused before writing
