"""Export: a plain module with the multipliers folded in, no hooks or masks, the same function."""


import torch

import sparsemup as smp
from helpers import tiny_gpt, tiny_mlp, tokens


def test_export_is_plain_and_equivalent():
    model = tiny_gpt(density=0.25, input_alpha=3.0, output_alpha=2.0)
    plain = smp.export(model)
    x = tokens()
    assert torch.allclose(model(x), plain(x), atol=1e-5)
    assert not smp.core.is_parameterized(plain)
    assert not any(k.endswith("_mask") for k in plain.state_dict())
    for m in plain.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._load_state_dict_post_hooks
    # untied: different folded factors
    assert plain.get_parameter("lm_head.weight") is not plain.get_parameter("wte.weight")
    assert (plain.get_parameter("blocks.0.attn.qkv.weight") == 0).float().mean() > 0.7
    # the original is untouched
    assert smp.core.is_parameterized(model) and model.lm_head.weight is model.wte.weight


def test_export_folds_bias_of_input_layer():
    model = tiny_mlp(input_alpha=3.0, output_alpha=2.0)
    plain = smp.export(model)
    x = torch.randn(4, 8)
    assert torch.allclose(model(x), plain(x), atol=1e-6)
