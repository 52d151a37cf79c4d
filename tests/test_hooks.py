"""The run-time hooks: masks stay exact through training, copies, pickling, compilation and state_dict loads."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F

import sparsemup as smp
from helpers import lm_loss, mask_of, masked_zero_violations, tiny_gpt, tiny_mlp, tokens, train_steps
from sparsemup.core.vocab import WeightDecayMode


@pytest.mark.slow
def test_zeros_stay_exact_through_200_adamw_steps_with_decay_and_clipping():
    model = tiny_gpt(density=0.25)
    opt = smp.make_optimizer(model, torch.optim.AdamW, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    x = tokens(seq=17)
    before = lm_loss(model, x).item()
    train_steps(model, opt, 200, x, clip=1.0)
    assert lm_loss(model, x).item() < before - 0.5  # it did train
    assert masked_zero_violations(model) == 0


@pytest.mark.parametrize("opt_cls, kw", [(torch.optim.SGD, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
                                          (torch.optim.Adam, {"weight_decay": 0.1, "amsgrad": True}),
                                          (torch.optim.RMSprop, {"momentum": 0.5})])
def test_zeros_stay_exact_with_other_optimizers(opt_cls, kw):
    model = tiny_gpt(density=0.25)
    wd = kw.pop("weight_decay", 0.0)
    # Adam's L2 decay has no lr·wd rule
    mode: WeightDecayMode = "independent" if opt_cls is torch.optim.SGD else "coupled"
    opt = smp.make_optimizer(model, opt_cls, lr=1e-3, weight_decay=wd, weight_decay_mode=mode, **kw)
    train_steps(model, opt, 20, tokens(seq=17))
    assert masked_zero_violations(model) == 0


def test_state_dict_round_trip_into_fresh_model_is_bit_identical():
    model = tiny_gpt(density=0.25, seed=5)
    train_steps(model, smp.make_optimizer(model, torch.optim.AdamW, lr=1e-2), 3, tokens(seq=17))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    assert any(k.endswith("qkv.weight_mask") for k in model.state_dict())
    fresh = tiny_gpt(density=0.25, seed=99)  # other seed: other masks and init until loaded
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    x = tokens(seq=16)
    assert torch.equal(model(x), fresh(x))
    # The loaded masks govern training too.
    train_steps(fresh, smp.make_optimizer(fresh, torch.optim.AdamW, lr=1e-2), 3, tokens(seq=17))
    assert masked_zero_violations(fresh) == 0


def test_loading_other_parameterization_density_or_dense_weights_is_refused_unchanged():
    sparse = tiny_gpt(density=0.25)
    other = tiny_gpt(density=0.5)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="parameterized differently"):
        other.load_state_dict(sparse.state_dict())
    state = sparse.state_dict()
    del state["_sparsemup_signature"]  # the documented way to load across parameterizations
    with pytest.raises(ValueError, match="mask has .* nonzeros .* with the checkpoint's density"):
        other.load_state_dict(state)
    for k, v in other.state_dict().items():  # refused before anything was copied
        assert torch.equal(v, before[k]), k
    state = sparse.state_dict()
    state["blocks.0.attn.qkv.weight"] = torch.randn_like(state["blocks.0.attn.qkv.weight"])
    with pytest.raises(ValueError, match="nonzero entries outside its mask"):
        tiny_gpt(density=0.25).load_state_dict(state)


def test_loading_other_scheme_or_alpha_is_refused():
    supar = tiny_gpt(density=0.25, scheme="supar")
    for other in (tiny_gpt(density=0.25, scheme="mup"), tiny_gpt(density=0.25, output_alpha=4.0),
                  tiny_gpt(density=0.25, base_width=16)):
        with pytest.raises(ValueError, match="parameterized differently"):
            other.load_state_dict(supar.state_dict())
    mup = tiny_gpt(density=0.25, scheme="mup")
    state = supar.state_dict()
    del state["_sparsemup_signature"]
    mup.load_state_dict(state)  # weights and masks load on purpose; mup keeps its own signature
    assert not torch.equal(mup.state_dict()["_sparsemup_signature"], supar.state_dict()["_sparsemup_signature"])


def _behaves_like(a, b):
    x = tokens(seq=17)
    assert torch.equal(a(x[:, :-1]), b(x[:, :-1]))
    assert smp.get_parameterization(b).params.keys() == smp.get_parameterization(a).params.keys()
    # the copy still masks its gradients and keeps zeros through training
    opt = smp.make_optimizer(b, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    train_steps(b, opt, 5, x)
    assert masked_zero_violations(b) == 0
    for name, info in smp.get_parameterization(b).params.items():
        if info.masked:
            g = b.get_parameter(name).grad
            assert (g[smp.core.get_mask(b, name) == 0] == 0).all()


def test_deepcopy_keeps_behaviour():
    model = tiny_gpt(density=0.25, input_alpha=2.0)
    _behaves_like(model, copy.deepcopy(model))


def test_pickle_and_torch_save_whole_model():
    model = tiny_gpt(density=0.25, input_alpha=2.0)
    _behaves_like(model, pickle.loads(pickle.dumps(model)))
    buf = io.BytesIO()
    torch.save(model, buf)
    _behaves_like(model, torch.load(io.BytesIO(buf.getvalue()), weights_only=False))


def test_to_dtype_moves_masks():
    model = tiny_mlp(density=0.25).to(torch.float64)
    assert mask_of(model, "hidden.0.weight").dtype == torch.float64
    x = torch.randn(4, 8, dtype=torch.float64)
    model(x).sum().backward()
    assert (model.hidden[0].weight.grad[smp.core.get_mask(model, "hidden.0.weight") == 0] == 0).all()






def test_bf16_autocast_training():
    model = tiny_gpt(density=0.25)
    opt = smp.make_optimizer(model, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    x = tokens(seq=17)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = lm_loss(model, x).item()
    loss = train_steps(model, opt, 30, x, autocast="cpu")
    assert loss.item() < first
    assert masked_zero_violations(model) == 0


def test_apply_masks_rezeroes_after_direct_writes():
    model = tiny_mlp(density=0.25)
    with torch.no_grad():
        model.hidden[0].weight.add_(1.0)
    assert masked_zero_violations(model) > 0
    smp.core.apply_masks(model)
    assert masked_zero_violations(model) == 0


def test_torch_compile_keeps_multipliers_and_masks():
    model = tiny_gpt(density=0.25, input_alpha=2.0)
    compiled = torch.compile(model, backend="aot_eager")
    opt = smp.make_optimizer(compiled, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)  # type: ignore[arg-type]  # a Module
    x = tokens(seq=17)
    train_steps(compiled, opt, 3, x)
    assert masked_zero_violations(model) == 0
    assert torch.allclose(compiled(x[:, :-1]), model(x[:, :-1]), atol=1e-5)


class MHANet(torch.nn.Module):
    """Uses nn.MultiheadAttention, whose out_proj module is never called (its weight is read directly)."""

    def __init__(self, width):
        super().__init__()
        self.emb = torch.nn.Embedding(20, width)
        self.attn = torch.nn.MultiheadAttention(width, width // 16, batch_first=True)
        self.head = torch.nn.Linear(width, 20)

    def forward(self, idx):
        x = self.emb(idx)
        return self.head(self.attn(x, x, x, need_weights=False)[0])


def test_masks_enforced_after_deepcopy_when_owner_is_never_called():
    with torch.device("meta"):
        base = MHANet(32)
    model = MHANet(64)
    smp.parameterize(model, base, density=0.25)
    assert smp.core.get_mask(model, "attn.out_proj.weight") is not None
    assert smp.core.get_mask(model, "attn.in_proj_weight") is not None
    for copy_of in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        opt = smp.make_optimizer(copy_of, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
        x = torch.randint(20, (4, 9))
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(copy_of(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
            opt.step()
        assert masked_zero_violations(copy_of) == 0
