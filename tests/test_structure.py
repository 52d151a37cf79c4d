"""Reading a model's structure: roles and multipliers from shape comparison, ties, and the errors that name the fix."""


import pytest
import torch
from torch import nn

import sparsemup as smp
from helpers import TwoLayer, tiny_gpt, tiny_mlp
from sparsemup.models import MLP


def roles(model):
    return {n: i.role.value for n, i in smp.get_parameterization(model).params.items()}


def test_gpt_roles_and_ties():
    model = tiny_gpt()
    r = roles(model)
    assert r["wte.weight"] == "input"  # tied with lm_head: one entry
    assert "lm_head.weight" not in r
    info = smp.get_parameterization(model).info("lm_head.weight")
    assert info.names == ("wte.weight", "lm_head.weight")
    assert info.usage_roles == {"wte.weight": smp.Role.INPUT, "lm_head.weight": smp.Role.OUTPUT}
    assert info.forward_multipliers == {"wte.weight": 1.0, "lm_head.weight": pytest.approx(0.5)}
    assert {r[n] for n in r if ".attn.qkv" in n or ".mlp." in n or ".attn.proj" in n} == {"hidden"}
    assert {r[n] for n in r if "ln" in n} == {"vector"}


def test_mlp_roles_and_multipliers():
    model = tiny_mlp(width=128, base_width=32)
    rec = smp.get_parameterization(model)
    assert roles(model) == {
        "input.weight": "input", "input.bias": "vector", "hidden.0.weight": "hidden", "hidden.0.bias": "vector",
        "hidden.1.weight": "hidden", "hidden.1.bias": "vector", "readout.weight": "output", "readout.bias": "vector",
    }
    assert rec.params["hidden.0.weight"].multipliers == smp.rules.Multipliers(width=4, fan_out=4, density=0.25)
    assert rec.params["input.weight"].multipliers.width == 4
    assert rec.params["readout.bias"].multipliers.width == 1  # no width dim


def test_base_structure_mismatch():
    with torch.device("meta"):
        base: nn.Module = TwoLayer(16, extra=True)
    with pytest.raises(ValueError, match=r"structure does not match.*only in the base: \['more.bias', 'more.weight'\]"):
        smp.parameterize(TwoLayer(32), base)
    with torch.device("meta"):
        base = MLP(8, 32, 5, depth=3)
    with pytest.raises(ValueError, match="missing from the base: none"):
        smp.parameterize(MLP(8, 64, 5), base)


def test_unclassifiable_parameter_names_it_and_the_fix():
    class WithTable(TwoLayer):
        def __init__(self, width):
            super().__init__(width)
            self.table = nn.Linear(10, 10)

    with torch.device("meta"):
        base = WithTable(16)
    with pytest.raises(ValueError, match=r"cannot classify 'table.weight'.*roles=\{'table.weight': 'hidden'\}"):
        smp.parameterize(WithTable(32), base)
    model = WithTable(32)
    rec = smp.parameterize(model, base, roles={"table.weight": "input"})
    assert rec.params["table.weight"].role is smp.Role.INPUT


def test_unregistered_layout_names_register_layout_and_roles():
    class WithTable(TwoLayer):
        def __init__(self, width):
            super().__init__(width)
            self.table = nn.Parameter(torch.zeros(width, width))

    with torch.device("meta"):
        base = WithTable(16)
    # Both dims grow: it used to be read silently as (out, in); now its layout must be given.
    with pytest.raises(ValueError, match=r"'table' \(2-D\) belongs to a WithTable, whose weight layout sparsemup "
                                         r"does not know.*register_layout\(WithTable.*roles=\{'table': 'input'\}"):
        smp.parameterize(WithTable(32), base)
    with pytest.raises(ValueError, match="a hidden weight needs its layout"):
        smp.parameterize(WithTable(32), base, roles={"table": "hidden"})
    smp.register_layout(WithTable, fan_in=(1,), fan_out=(0,))
    rec = smp.parameterize(WithTable(32), base, density=0.5)
    assert rec.params["table"].role is smp.Role.HIDDEN and rec.params["table"].masked


def test_same_shapes_need_delta():
    with torch.device("meta"):
        base, delta = TwoLayer(16), TwoLayer(32)
    with pytest.raises(ValueError, match="pass delta="):
        smp.parameterize(TwoLayer(16), base, density=0.5)
    model = TwoLayer(16)
    rec = smp.parameterize(model, base, delta=delta, density=0.5)
    assert rec.params["mid.weight"].role is smp.Role.HIDDEN
    assert rec.params["mid.weight"].multipliers.width == 1.0
    assert rec.params["mid.weight"].multipliers.density == 0.5


def test_bare_parameter_with_one_growing_dim_needs_a_role():
    class WithPositions(TwoLayer):
        def __init__(self, width):
            super().__init__(width)
            self.pos = nn.Parameter(torch.zeros(1, 10, width))

    with torch.device("meta"):
        base = WithPositions(16)
    with pytest.raises(ValueError, match="'pos'.*layout sparsemup does not know"):
        smp.parameterize(WithPositions(32), base)
    rec = smp.parameterize(WithPositions(32), base, roles={"pos": "input"})
    assert rec.params["pos"].role is smp.Role.INPUT


def test_a_weight_with_a_given_role_need_not_fit_its_owners_layout():
    class Attention(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.emb = nn.Embedding(10, width)
            self.att = nn.MultiheadAttention(width, width // 16, add_bias_kv=True, batch_first=True)
            self.head = nn.Linear(width, 10)

    with torch.device("meta"):
        base = Attention(32)
    with pytest.raises(ValueError, match=r"'att.bias_k' has 3 dims.*roles="):
        smp.parameterize(Attention(64), base)
    rec = smp.parameterize(Attention(64), base, roles={"att.bias_*": "vector"})
    assert rec.info("att.bias_k").role is smp.Role.VECTOR
    assert rec.info("att.in_proj_weight").role is smp.Role.HIDDEN
