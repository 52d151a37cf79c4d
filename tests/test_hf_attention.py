"""Attention scales of transformers models whose head dim grows with width: µP's sqrt(d_base)/d_head through each
attention module's own ``scaling``, kept by ``export`` and ``hf.save_pretrained`` for plain transformers."""

import math

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed: pip install 'sparsemup[hf]'")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

import sparsemup as smp  # noqa: E402
import sparsemup.hf as hf  # noqa: E402

HEADS, BASE, WIDTH = 2, 32, 64  # head dim 16 in the base, 32 in the model: c = sqrt(16 / 32)

CONFIGS = {  # tiny configs with the heads fixed, so that the head dim grows with width
    "llama": lambda w: dict(hidden_size=w, num_attention_heads=HEADS, num_key_value_heads=1, head_dim=w // HEADS,
                            intermediate_size=2 * w),
    "qwen2": lambda w: dict(hidden_size=w, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                            intermediate_size=2 * w),
    "gpt2": lambda w: dict(n_embd=w, n_head=HEADS, n_positions=32, bos_token_id=0, eos_token_id=0),
    "gpt_neox": lambda w: dict(hidden_size=w, num_attention_heads=HEADS, intermediate_size=2 * w),
}


def config(kind, width):
    layers = {"gpt2": "n_layer"}.get(kind, "num_hidden_layers")
    return AutoConfig.for_model(kind, vocab_size=64, max_position_embeddings=32, **{layers: 2},
                                **CONFIGS[kind](width))


def build(kind, scheme="mup"):
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config(kind, BASE))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(kind, WIDTH))
    smp.parameterize(model, base, scheme=scheme)
    return model.eval()


def tokens():
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


def by_hand(kind, model):
    """The plain model with the parameterized weights, every attention scale set to sqrt(16)/32 and the readout
    multiplier α_output/m_d = 1/2 applied to the logits (the readouts have no bias)."""
    plain = AutoModelForCausalLM.from_config(config(kind, WIDTH)).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k in plain.state_dict()}, strict=False)
    if plain.get_output_embeddings().weight is not plain.get_input_embeddings().weight:
        plain.get_output_embeddings().weight.data.copy_(model.get_output_embeddings().weight)
    scaled = 0
    for module in plain.modules():
        if hasattr(module, "scaling"):
            module.scaling = math.sqrt(16) / 32
            scaled += 1
    assert scaled == 2  # one attention module per layer
    return lambda ids: plain(ids).logits / 2


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_head_dim_growing_with_width_gets_the_mup_attention_scale(kind, tmp_path):
    model = build(kind)
    record = smp.get_parameterization(model)
    assert len(record.attention_factors) == 2
    assert all(c == pytest.approx(math.sqrt(16 / 32)) for c in record.attention_factors.values())
    ids = tokens()
    with torch.no_grad():
        logits = model(ids).logits
        expected = by_hand(kind, model)(ids)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        exported = smp.export(model)
        assert all(m.scaling == pytest.approx(32**-0.5) for m in exported.modules() if hasattr(m, "scaling"))
        torch.testing.assert_close(exported(ids).logits, expected, rtol=1e-5, atol=1e-5)
        hf.save_pretrained(model, tmp_path / "saved", base_config=config(kind, BASE))
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
        torch.testing.assert_close(plain(ids).logits, expected, rtol=1e-5, atol=1e-5)
        restored = hf.from_pretrained(tmp_path / "saved").eval()
        torch.testing.assert_close(restored(ids).logits, expected, rtol=1e-5, atol=1e-5)
    for name, param in model.named_parameters():  # the restored weights are the parameterized ones, unfolded
        torch.testing.assert_close(restored.get_parameter(name), param, rtol=1e-6, atol=1e-7)


def test_sp_and_an_unchanged_head_dim_leave_the_scale_alone():
    sp = build("llama", scheme="sp")
    assert smp.get_parameterization(sp).attention_factors == {}
    assert all(m.scaling == 32**-0.5 for m in sp.modules() if hasattr(m, "scaling"))
    fixed = hf.build(config("llama", BASE), WIDTH, BASE, head_dim=16, scheme="mup")  # heads grow instead
    assert smp.get_parameterization(fixed).attention_factors == {}


def test_a_fold_that_cannot_reproduce_the_outputs_is_refused():
    model = build("llama")
    attention = model.model.layers[0].self_attn

    class Normed(torch.nn.Module):  # a norm on q (as Qwen3 and OLMo2 have): no scaling of q_proj moves the logits
        def __init__(self, proj):
            super().__init__()
            self.proj = proj

        def forward(self, x):
            y = self.proj(x)
            return y / y.norm(dim=-1, keepdim=True)

    attention.q_proj, attention.k_proj = Normed(attention.q_proj), Normed(attention.k_proj)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn: no scaling of its projections .* reproduces"):
        smp.export(model)


def test_an_attention_scale_without_a_head_dim_is_refused():
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config("llama", BASE))
    fresh = AutoModelForCausalLM.from_config(config("llama", WIDTH))
    for m in (fresh.model.layers[0].self_attn, base.model.layers[0].self_attn):
        del m.head_dim
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn: a LlamaAttention with an attention scale "
                                         r"'scaling' but no head dim"):
        smp.parameterize(fresh, base, scheme="mup")
    assert not smp.core.is_parameterized(fresh)
