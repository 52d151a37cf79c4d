"""Parameter groups: the optimizer contract."""

import copy
import warnings

import pytest
import torch

import sparsemup as smp
from helpers import tiny_gpt, tiny_mlp
from sparsemup.core import hooks


def by_name(groups):
    return {n: g for g in groups for n in g["param_names"]}


def test_adam_groups_follow_rules():
    model = tiny_mlp(width=128, base_width=32, density=0.25)
    groups = by_name(smp.param_groups(model, torch.optim.AdamW, lr=0.01, weight_decay=0.1))
    assert groups["hidden.0.weight"]["lr"] == pytest.approx(0.01 / (4 * 0.25))
    assert groups["hidden.0.weight"]["weight_decay"] == pytest.approx(0.1 * 4 * 0.25)  # lr·wd = 0.001
    assert groups["input.weight"]["lr"] == 0.01
    assert groups["readout.weight"]["lr"] == 0.01
    assert groups["hidden.0.bias"]["weight_decay"] == 0.0
    coupled = by_name(smp.param_groups(model, torch.optim.AdamW, lr=0.01, weight_decay=0.1,
                                       weight_decay_mode="coupled"))
    assert coupled["hidden.0.weight"]["weight_decay"] == 0.1
    vec = by_name(smp.param_groups(model, torch.optim.AdamW, lr=0.01, weight_decay=0.1, decay_vectors=True))
    assert vec["hidden.0.bias"]["weight_decay"] == pytest.approx(0.1)


def test_sgd_groups_follow_rules():
    model = tiny_mlp(width=128, base_width=32, density=0.25)
    groups = by_name(smp.param_groups(model, torch.optim.SGD, lr=0.1))
    assert groups["hidden.0.weight"]["lr"] == pytest.approx(0.1 / 0.25)
    assert groups["input.weight"]["lr"] == pytest.approx(0.4)
    assert groups["readout.weight"]["lr"] == pytest.approx(0.4)
    assert groups["hidden.0.bias"]["lr"] == pytest.approx(0.4)
    assert groups["readout.bias"]["lr"] == pytest.approx(0.1)  # no width dimension


def test_every_trainable_parameter_once():
    model = tiny_gpt()
    model.ln_f.weight.requires_grad_(False)
    groups = smp.param_groups(model, torch.optim.AdamW, lr=1e-3)
    ids = [id(p) for g in groups for p in g["params"]]
    expected = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(ids) == sorted(expected)


def test_family_detection_and_unknown_optimizer():
    assert smp.core.optim.optimizer_family(torch.optim.NAdam) is smp.rules.Family.ADAM
    assert smp.core.optim.optimizer_family("SGD") is smp.rules.Family.SGD

    class MyAdam(torch.optim.Adam):
        pass

    assert smp.core.optim.optimizer_family(MyAdam) is smp.rules.Family.ADAM
    with pytest.raises(ValueError, match="no parameterization rule is known for optimizer.*LBFGS.*register_optimizer"):
        smp.param_groups(tiny_mlp(), torch.optim.LBFGS, lr=1.0)
    with pytest.raises(ValueError, match="unknown optimizer family 'lion'"):
        smp.core.optim.optimizer_family("lion")
    with pytest.raises(ValueError, match="weight_decay_mode"):
        smp.param_groups(tiny_mlp(), torch.optim.AdamW, lr=1.0, weight_decay_mode="decoupled")  # type: ignore[arg-type]  # bad on purpose


def test_param_groups_take_an_optimizer_class_only():
    # A family name would let SGD-rule groups feed an AdamW (or the reverse): refused.
    for wrong in ("adam", "sgd", smp.rules.Family.ADAM, torch.optim.AdamW([torch.zeros(1, requires_grad=True)])):
        with pytest.raises(ValueError, match="takes the optimizer class"):
            smp.param_groups(tiny_mlp(), wrong, lr=1.0)  # type: ignore[arg-type]  # bad on purpose


def test_decay_rule_comes_from_the_most_specific_registered_class():
    class MyAdam(torch.optim.Adam):
        pass

    class MyAdamW(torch.optim.AdamW):  # AdamW subclasses Adam in torch; its own rule must win
        pass

    model = tiny_mlp()
    with pytest.raises(ValueError, match="MyAdam applies weight decay as an L2 term"):
        smp.param_groups(model, MyAdam, lr=1e-3, weight_decay=0.1)
    assert smp.param_groups(model, MyAdamW, lr=1e-3, weight_decay=0.1)
    assert smp.param_groups(model, torch.optim.AdamW, lr=1e-3, weight_decay=0.1)


def test_register_optimizer_declares_an_unknown_class():
    class Sign(torch.optim.Optimizer):  # a stand-in for e.g. Lion: not a torch.optim class sparsemup knows
        def __init__(self, params, lr=1e-3, weight_decay=0.0):
            super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    model = tiny_mlp(width=128, base_width=32, density=0.25)
    with pytest.raises(ValueError, match="no parameterization rule"):
        smp.param_groups(model, Sign, lr=0.01)
    smp.core.register_optimizer(Sign, "sgd", lr_wd_decay=False)
    groups = by_name(smp.param_groups(model, Sign, lr=0.1))
    assert groups["hidden.0.weight"]["lr"] == pytest.approx(0.1 / 0.25)  # the SGD rule
    with pytest.raises(ValueError, match="L2 term"):
        smp.param_groups(model, Sign, lr=0.1, weight_decay=0.1)


def test_schedulers_keep_ratios():
    model = tiny_mlp(width=128, base_width=32, density=0.25)
    opt = smp.make_optimizer(model, torch.optim.AdamW, lr=0.01, weight_decay=0.1)
    ratios = [g["lr"] / 0.01 for g in opt.param_groups]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    for _ in range(3):
        opt.step()
        sched.step()
    for g, r in zip(opt.param_groups, ratios):
        assert g["lr"] == pytest.approx(0.01 * r * 0.125)


def test_groups_are_deterministic_and_optimizer_state_round_trips():
    model = tiny_gpt()
    opt = smp.make_optimizer(model, torch.optim.AdamW, lr=0.01)
    model(torch.zeros(2, 4, dtype=torch.long)).sum().backward()
    opt.step()
    fresh = tiny_gpt()
    opt2 = smp.make_optimizer(fresh, torch.optim.AdamW, lr=0.01)
    keys = ("param_names", "lr", "lr_mult", "wd_mult", "weight_decay")
    assert [{k: g[k] for k in keys} for g in opt2.param_groups] == [{k: g[k] for k in keys} for g in opt.param_groups]
    opt2.load_state_dict(opt.state_dict())
    name = "blocks.0.attn.qkv.weight"
    state = opt2.state[fresh.get_parameter(name)]
    assert torch.equal(state["exp_avg"], opt.state[model.get_parameter(name)]["exp_avg"])


def test_l2_decay_optimizers_refuse_independent_decay():
    model = tiny_mlp()
    with pytest.raises(ValueError, match="L2 term.*AdamW.*coupled"):
        smp.param_groups(model, torch.optim.Adam, lr=1e-3, weight_decay=0.1)
    groups = smp.param_groups(model, torch.optim.Adam, lr=1e-3, weight_decay=0.1, weight_decay_mode="coupled")
    assert {g["weight_decay"] for g in groups} == {0.1, 0.0}
    assert smp.param_groups(model, torch.optim.Adam, lr=1e-3)  # no decay: nothing to refuse


def test_param_groups_of_wrapped_model():
    model = tiny_gpt()
    wrapped = torch.nn.DataParallel(model)
    names = sorted(n for g in smp.param_groups(wrapped, torch.optim.AdamW, lr=1e-3) for n in g["param_names"])
    assert names == sorted(smp.get_parameterization(model).params)


# ---- the guard: an optimizer that bypasses the groups is caught at its first step ----

def _step(optimizer, model):
    optimizer.zero_grad()
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()


def test_plain_optimizer_over_a_parameterized_model_warns_once():
    model = tiny_mlp(width=128, base_width=32, density=0.25)
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.warns(UserWarning, match=r"AdamW holds \d+ parameter\(s\) of a parameterized model.*make_optimizer"):
        _step(plain, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(plain, model)  # once per optimizer


def test_a_deep_copy_is_watched_too():
    model = copy.deepcopy(tiny_mlp(width=128, base_width=32, density=0.25))
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.warns(UserWarning, match=r"AdamW holds \d+ parameter\(s\) of a parameterized model"):
        _step(plain, model)
    assert not any(isinstance(h, hooks.WatchCopies) for h in smp.export(model)._forward_pre_hooks.values())


@pytest.mark.parametrize("scheme, build", [
    ("supar", lambda m: smp.make_optimizer(m, torch.optim.AdamW, lr=1e-3)),
    ("supar", lambda m: torch.optim.SGD(smp.param_groups(m, torch.optim.SGD, lr=1e-3), lr=1e-3)),
    ("sp", lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3)),
])
def test_no_warning_for_sparsemup_groups_or_sp(scheme, build):
    model = tiny_mlp(width=128, base_width=32, density=0.25, scheme=scheme)
    optimizer = build(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(optimizer, model)


def test_strict_guard_refuses_every_step():
    model = tiny_mlp(width=128, base_width=32)
    plain = torch.optim.SGD(model.parameters(), lr=1e-3)
    smp.set_optimizer_guard("error")
    try:
        for _ in range(2):
            with pytest.raises(RuntimeError, match="per-layer learning rates"):
                _step(plain, model)
    finally:
        smp.set_optimizer_guard("warn")
    with pytest.raises(ValueError, match="unknown optimizer guard mode"):
        smp.set_optimizer_guard("strict")  # type: ignore[arg-type]  # bad on purpose
