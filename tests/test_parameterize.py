"""Applying a scheme to a model: roles, init, multipliers, attention, and input errors."""

import copy
import dataclasses
import inspect
import math

import pytest
import torch
from torch import nn

import sparsemup as smp
from helpers import known, mask_of, tiny_gpt, tiny_mlp, tokens
from sparsemup.models import GPT, MLP, GPTConfig, build_gpt


def test_masks_exact_and_weights_zero():
    model = tiny_gpt(width=64, density=0.25)
    for name, info in smp.get_parameterization(model).params.items():
        mask = smp.core.get_mask(model, name)
        if info.role is smp.Role.HIDDEN:
            fan_in = info.shape[1]
            assert (known(mask).sum(dim=1) == round(0.25 * fan_in)).all()
            weight = model.get_parameter(name)
            assert (weight[mask == 0] == 0).all()
            assert info.density == round(0.25 * fan_in) / fan_in
        else:
            assert mask is None


def test_init_std_matches_rule_empirically():
    model = tiny_mlp(width=512, base_width=32, density=0.25, init_std=0.1)
    w = model.hidden[0].weight
    nz = w[smp.core.get_mask(model, "hidden.0.weight") != 0]
    expected = 0.1 / math.sqrt(16 * 0.25)
    assert nz.std().item() == pytest.approx(expected, rel=0.02)
    assert smp.get_parameterization(model).params["hidden.0.weight"].init_std == pytest.approx(expected)
    assert model.input.weight.std().item() == pytest.approx(0.1, rel=0.05)


def test_realised_density_sets_m_rho():
    # fan-in 24 at density 0.3 keeps round(7.2) = 7 per row: m_ρ = 7/24, not 0.3.
    with torch.device("meta"):
        base, delta = MLP(4, 24, 3), MLP(4, 48, 3)
    model = MLP(4, 24, 3)
    rec = smp.parameterize(model, base, delta=delta, density=0.3)
    assert rec.params["hidden.0.weight"].multipliers.density == pytest.approx(7 / 24)


def test_sparse_base_density():
    with torch.device("meta"):
        base = MLP(4, 32, 3)
    model = MLP(4, 64, 3)
    rec = smp.parameterize(model, base, density=0.125, base_density=0.5)
    assert rec.params["hidden.0.weight"].multipliers.density == pytest.approx(0.25)


def test_per_layer_density_patterns():
    model = tiny_gpt(density={"blocks.*.mlp.*": 0.25, "blocks.0.*": 0.5})
    rec = smp.get_parameterization(model)
    assert rec.params["blocks.0.mlp.fc.weight"].density == 0.25  # first match wins
    assert rec.params["blocks.0.attn.qkv.weight"].density == 0.5
    assert rec.params["blocks.1.attn.qkv.weight"].density == 1.0
    assert smp.core.get_mask(model, "blocks.1.attn.qkv.weight") is None


def test_user_masks():
    mask = torch.zeros(64, 64)
    mask[:, :8] = 1
    model = tiny_mlp(width=64, masks={"hidden.0.weight": mask})
    assert torch.equal(mask_of(model, "hidden.0.weight"), mask)
    assert smp.get_parameterization(model).params["hidden.0.weight"].density == pytest.approx(8 / 64)


def test_forward_multipliers_apply_in_train_and_eval():
    x = tokens()
    model = tiny_gpt(input_alpha=3.0, output_alpha=2.0)
    plain = smp.export(model)
    for mode in (True, False):
        model.train(mode)
        plain.train(mode)
        assert torch.allclose(model(x), plain(x), atol=1e-5)
    # And the multiplier really is there: the readout input is scaled by α_output/m_d = 2/2.
    seen: dict[str, torch.Tensor] = {}
    model.lm_head.register_forward_hook(lambda m, a, o: seen.setdefault("in", a[0]))
    model.ln_f.register_forward_hook(lambda m, a, o: seen.setdefault("ln", o))
    model(x)
    assert torch.allclose(seen["in"], seen["ln"] * 1.0)
    model2 = tiny_gpt(input_alpha=3.0, output_alpha=4.0)
    seen.clear()
    model2.lm_head.register_forward_hook(lambda m, a, o: seen.setdefault("in", a[0]))
    model2.ln_f.register_forward_hook(lambda m, a, o: seen.setdefault("ln", o))
    model2(x)
    assert torch.allclose(seen["in"], seen["ln"] * 2.0)


def test_attention_scale_set_from_base_head_dim():
    cfg = GPTConfig(vocab_size=50, width=64, depth=1, head_dim=32, context=16)
    model, rec = build_gpt(cfg, base_width=32, base_head_dim=16, scheme="mup")
    assert model.get_submodule("blocks.0.attn.core").scale == pytest.approx(math.sqrt(16) / 32)
    assert rec.attention_scales == {"blocks.0.attn.core": pytest.approx(4 / 32)}
    model_sp, _ = build_gpt(cfg, base_width=32, base_head_dim=16, scheme="sp")
    assert model_sp.get_submodule("blocks.0.attn.core").scale == pytest.approx(1 / math.sqrt(32))


def test_mup_at_base_shape_equals_sp():
    x = tokens()
    cfg = GPTConfig(vocab_size=50, width=32, depth=2, head_dim=16, context=32)
    sp, _ = build_gpt(cfg, base_width=32, scheme="sp", seed=3, input_alpha=2.0, output_alpha=0.5)
    mup, _ = build_gpt(cfg, base_width=32, scheme="mup", seed=3, input_alpha=2.0, output_alpha=0.5)
    for (n, a), (_, b) in zip(sp.state_dict().items(), mup.state_dict().items()):
        if n == "_sparsemup_signature":  # records the scheme's name, so it differs
            assert not torch.equal(a, b)
            continue
        assert torch.equal(a, b), n
    assert torch.equal(sp(x), mup(x))
    for fam in (torch.optim.AdamW, torch.optim.SGD):
        lrs = [[g["lr"] for g in smp.param_groups(m, fam, lr=0.01)] for m in (sp, mup)]
        assert lrs[0] == lrs[1]


def test_supar_at_unit_density_equals_mup():
    x = tokens()
    a = tiny_gpt(scheme="mup", density=1.0, seed=1)
    b = tiny_gpt(scheme="supar", density=1.0, seed=1)
    assert torch.equal(a(x), b(x))
    adamw = torch.optim.AdamW
    assert [g["lr"] for g in smp.param_groups(a, adamw, 0.01)] == [g["lr"] for g in smp.param_groups(b, adamw, 0.01)]


def test_explain_lists_every_parameter():
    model = tiny_gpt()
    text = smp.explain(model)
    for name in smp.get_parameterization(model).params:
        assert name.split(" ")[0] in text
    assert "attention blocks.0.attn.core" in text
    rows = smp.core.explain_rows(model, "sgd")
    qkv = next(r for r in rows if r["name"] == "blocks.0.attn.qkv.weight")
    assert qkv["lr_mult"] == pytest.approx(1 / qkv["m_rho"])  # SGD: m_out/m_d = 1
    assert qkv["density"] == 0.25


# ---- bad input: a clear error naming the fix, and the model left untouched ----

def fresh_pair(width=64):
    with torch.device("meta"):
        base = MLP(8, 32, 5)
    return MLP(8, width, 5), base


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"density": 0.0}, r"density must be a number in \(0, 1\]"),
        ({"density": 1.5}, r"density must be a number in \(0, 1\]"),
        ({"density": -0.1}, r"density must be a number in \(0, 1\]"),
        ({"density": {"hidden.*": 2.0}}, r"density\['hidden.\*'\] must be"),
        ({"density": {"nothing.*": 0.5}}, "pattern 'nothing.*' matches no parameter"),
        ({"base_density": 0.0}, r"base_density must be a number in \(0, 1\]"),
        ({"density": 0.001}, "leaves every row of fan-in 64 with no weights"),
        ({"scheme": "spar"}, "unknown scheme 'spar'"),
        ({"roles": {"input.weight": "embedding"}}, "is not a role"),
        ({"mask_kind": "block"}, "unknown mask_kind"),
        ({"masks": {"input.weight": torch.ones(64, 8)}}, "only hidden weights can be masked"),
        ({"zero_readout": True, "density": 0.001}, "no weights"),
    ],
)
def test_bad_input_is_rejected_before_any_change(kwargs, message):
    model, base = fresh_pair()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        smp.parameterize(model, base, **kwargs)
    assert not smp.core.is_parameterized(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert not model.hidden[0]._forward_pre_hooks


def test_base_density_leaving_empty_rows():
    model, base = fresh_pair()
    with pytest.raises(ValueError, match="in the base model.*no weights"):
        smp.parameterize(model, base, base_density=0.001)








def test_base_wider_than_model_is_refused_naming_the_swap():
    model, base = fresh_pair(width=16)  # the base has width 32
    with pytest.raises(ValueError, match=r"narrower in the model than in the base .*width multiplier 0.5.*swapped"):
        smp.parameterize(model, base)
    assert not smp.core.is_parameterized(model)
    with pytest.raises(ValueError, match="swapped"):
        build_gpt(GPTConfig(width=32, depth=1, head_dim=16, context=8), 64)


def test_applying_twice_raises():
    model, base = fresh_pair()
    smp.parameterize(model, base, density=0.5)
    w = model.hidden[0].weight.detach().clone()
    with pytest.raises(ValueError, match="already parameterized"):
        smp.parameterize(model, base, density=0.5)
    assert torch.equal(model.hidden[0].weight, w)


def test_model_on_meta_and_same_object_errors():
    _, base = fresh_pair()
    with pytest.raises(ValueError, match="meta device"):
        smp.parameterize(copy.deepcopy(base), base)
    model, _ = fresh_pair()
    with pytest.raises(ValueError, match="same object"):
        smp.parameterize(model, model)


def test_zero_readout_untied_and_tied():
    model = tiny_mlp(zero_readout=True)
    assert (model.readout.weight == 0).all()
    with pytest.raises(ValueError, match="tied to the embedding"):
        tiny_gpt(zero_readout=True)


def test_custom_owner_needs_manual_multipliers():
    class FunctionalHead(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.emb = nn.Embedding(10, width)
            self.mid = nn.Linear(width, width)
            self.out_weight = nn.Parameter(torch.zeros(10, width))

        def forward(self, idx):
            return self.mid(self.emb(idx)) @ self.out_weight.T

    with torch.device("meta"):
        base = FunctionalHead(16)
    with pytest.raises(ValueError, match=r"layout sparsemup does not know.*roles=\{'out_weight': 'input'\}"):
        smp.parameterize(FunctionalHead(32), base)
    with pytest.raises(ValueError, match="forward_multipliers='manual'"):
        smp.parameterize(FunctionalHead(32), base, roles={"out_weight": "output"})
    model = FunctionalHead(32)
    rec = smp.parameterize(model, base, roles={"out_weight": "output"}, forward_multipliers="manual")
    assert rec.info("out_weight").forward_multipliers == {"out_weight": 0.5}
    assert "out_weight:0.5" in smp.explain(model)




def test_multihead_attention_with_growing_head_dim_is_refused():
    class MHA(nn.Module):
        def __init__(self, width, heads):
            super().__init__()
            self.emb = nn.Embedding(10, width)
            self.attn = nn.MultiheadAttention(width, heads, batch_first=True)

    with torch.device("meta"):
        base = MHA(32, 2)
    with pytest.raises(ValueError, match=r"fixes its logit scale.*sqrt\(16\)/32"):
        smp.parameterize(MHA(64, 2), base)
    smp.parameterize(MHA(64, 2), base, scheme="sp")  # SP's own scale is 1/sqrt(head_dim)
    smp.parameterize(MHA(64, 4), base)  # heads added, head_dim fixed: the scales agree


def test_unparameterized_model_errors():
    with pytest.raises(ValueError, match="not parameterized"):
        smp.get_parameterization(GPT(GPTConfig(vocab_size=10, width=32, head_dim=16, context=8)))


def test_role_init_std_overrides_one_role():
    model = tiny_mlp(width=64, base_width=64, density=1.0, scheme="sp", init_std=0.1, role_init_std={"output": 0.0})
    assert (model.readout.weight == 0).all()
    assert smp.get_parameterization(model).params["hidden.0.weight"].init_std == 0.1
    with pytest.raises(ValueError, match="role_init_std"):
        tiny_mlp(role_init_std={"vector": 0.1})


def test_parameterize_takes_the_fields_of_options_as_keywords():
    # The options are declared once (core.options.Options): parameterize's signature, help and record follow them.
    from sparsemup.core.options import Options

    fields = [f.name for f in dataclasses.fields(Options)]
    params = inspect.signature(smp.parameterize).parameters
    assert list(params) == ["model", "base", *fields]
    assert all(params[name].kind is inspect.Parameter.KEYWORD_ONLY for name in fields)
    doc = smp.parameterize.__doc__
    assert doc is not None and "mask_kind:" in doc and "Returns the ``Parameterization``" in doc
    with torch.device("meta"):
        base = MLP(8, 16, 4, depth=1)
    with pytest.raises(TypeError, match=r"parameterize\(\): .*unexpected keyword argument 'sed'"):
        smp.parameterize(MLP(8, 64, 4, depth=1), base, sed=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"parameterize\(\) takes the model and the base by position"):
        smp.parameterize(MLP(8, 64, 4, depth=1), base, "supar")  # type: ignore[call-arg]
    record = smp.parameterize(MLP(8, 64, 4, depth=1), base, density=0.5, seed=3, init_std=0.05)
    assert record.options == Options(density=0.5, seed=3, init_std=0.05)
