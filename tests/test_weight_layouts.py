"""Weight layouts: every registered layer gets exactly round(ρ·fan_in) weights per output neuron,
judged by autograd (which entries feed which output), not by sparsemup's own view of the weight."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import sparsemup as smp
from helpers import known, mask_of
from sparsemup.core.layout import from_neurons, group_count, layout_of, neurons_shape, neurons_view

CONVS = {
    (False, 1): nn.Conv1d, (False, 2): nn.Conv2d, (False, 3): nn.Conv3d,
    (True, 1): nn.ConvTranspose1d, (True, 2): nn.ConvTranspose2d, (True, 3): nn.ConvTranspose3d,
}


def connectivity(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """(out channels, weight entries) bool: which weight entries feed each output channel."""
    rows = []
    for o in range(module.out_channels):
        module.zero_grad()
        y = module(x)
        y.select(1, o).sum().backward()
        rows.append(known(module.weight.grad).reshape(-1) != 0)
    return torch.stack(rows)


@settings(max_examples=25, deadline=None)
@given(transpose=st.booleans(), dims=st.integers(1, 3), groups=st.sampled_from([1, 2, 4]),
       per_group=st.integers(1, 3), out_per_group=st.integers(1, 3), kernel=st.integers(1, 3))
def test_neurons_view_matches_autograd(transpose, dims, groups, per_group, out_per_group, kernel):
    conv = CONVS[(transpose, dims)](groups * per_group, groups * out_per_group, kernel, groups=groups, bias=False)
    layout = known(layout_of(conv))
    g = group_count(conv, layout)
    # An input big enough that every kernel tap touches the output (stride 1, no padding).
    x = torch.randn(1, conv.in_channels, *([kernel + 2] * dims))
    feeds = connectivity(conv, x)
    index = neurons_view(torch.arange(conv.weight.numel()).reshape(conv.weight.shape), layout, g)
    assert index.shape == (conv.out_channels, neurons_shape(conv.weight.shape, layout, g)[1])
    assert index.shape[1] == per_group * kernel**dims  # (C_in / g) · k^d
    for o in range(conv.out_channels):
        assert set(feeds[o].nonzero().flatten().tolist()) == set(index[o].tolist())
    assert torch.equal(from_neurons(neurons_view(conv.weight, layout, g), conv.weight.shape, layout, g), conv.weight)


class ConvNet(nn.Module):
    """Stem → hidden conv (fixed groups) → depthwise conv → readout: a conv net of one width."""

    def __init__(self, width: int, transpose: bool = False, groups: int = 2, dims: int = 2) -> None:
        super().__init__()
        self.stem = CONVS[(False, dims)](3, width, 3)
        self.mid = CONVS[(transpose, dims)](width, width, 3, groups=groups)
        self.depthwise = CONVS[(False, dims)](width, width, 3, groups=width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.depthwise(torch.relu(self.mid(torch.relu(self.stem(x)))))
        return self.head(h.flatten(2).mean(-1))


@settings(max_examples=12, deadline=None)
@given(transpose=st.booleans(), dims=st.integers(1, 2), groups=st.sampled_from([1, 2, 4]),
       density=st.sampled_from([0.1, 0.25, 0.5, 0.8]), kind=st.sampled_from(["rows", "bernoulli"]))
def test_masks_are_exact_per_output_neuron(transpose, dims, groups, density, kind):
    assume(kind == "rows" or density >= 0.5)  # sparser Bernoulli masks may empty a row of fan-in 12 (refused)
    with torch.device("meta"):
        base = ConvNet(8, transpose, groups, dims)
    model = ConvNet(16, transpose, groups, dims)
    rec = smp.parameterize(model, base, density=density, mask_kind=kind)
    info = rec.info("mid.weight")
    assert info.role is smp.Role.HIDDEN and info.masked
    fan_in = (16 // groups) * 3**dims
    assert info.multipliers.width == 2.0 and info.multipliers.fan_out == 2.0
    x = torch.randn(1, 16, *([5] * dims))
    feeds = connectivity(CONVS[(transpose, dims)](16, 16, 3, groups=groups), x)  # a fresh layer: no grad masks
    kept = mask_of(model, "mid.weight").reshape(-1).bool()
    per_neuron = (feeds & kept).sum(dim=1)
    assert (feeds.sum(dim=1) == fan_in).all()
    if kind == "rows":
        assert (per_neuron == int(density * fan_in + 0.5)).all()
        assert info.density == int(density * fan_in + 0.5) / fan_in
    else:
        assert (per_neuron > 0).all()


def test_depthwise_is_vector_like_and_a_conv_stem_takes_input_alpha():
    with torch.device("meta"):
        base = ConvNet(8)
    model = ConvNet(32)
    rec = smp.parameterize(model, base, density=0.5, input_alpha=3.0)
    assert rec.info("depthwise.weight").role is smp.Role.VECTOR
    assert rec.info("depthwise.weight").multipliers.width == 4.0
    assert not rec.info("depthwise.weight").masked
    assert rec.info("stem.weight").role is smp.Role.INPUT
    assert rec.info("stem.weight").forward_multipliers == {"stem.weight": 3.0}
    x = torch.randn(2, 3, 7, 7)
    stem = model.stem(x)
    assert torch.allclose(stem, 3.0 * torch.nn.functional.conv2d(x, model.stem.weight, model.stem.bias), atol=1e-6)
    plain = smp.export(model)
    assert torch.allclose(plain.get_submodule("stem")(x), stem, atol=1e-6)
    assert torch.allclose(plain(x), model(x), atol=1e-6)
    rows = {r["name"]: r for r in smp.core.explain_rows(model, "adam")}
    assert rows["depthwise.weight"]["lr_mult"] == 1.0 and rows["depthwise.weight"]["init_std"] is None
    assert rows["mid.weight"]["lr_mult"] == pytest.approx(1 / (4 * rec.info("mid.weight").multipliers.density))
    sgd = {r["name"]: r for r in smp.core.explain_rows(model, "sgd")}
    assert sgd["depthwise.weight"]["lr_mult"] == 4.0 and sgd["mid.weight"]["lr_mult"] == pytest.approx(
        1 / rec.info("mid.weight").multipliers.density)


def test_user_masks_are_checked_per_output_neuron_of_the_layout():
    with torch.device("meta"):
        base = ConvNet(8, transpose=True, groups=1)
    model = ConvNet(16, transpose=True, groups=1)
    mask = torch.ones(16, 16, 3, 3)
    mask[:, 5] = 0  # ConvTranspose weight is (in, out, k, k): output channel 5 loses every input
    with pytest.raises(ValueError, match="1 row"):
        smp.parameterize(model, base, masks={"mid.weight": mask})


def test_layout_errors():
    class Custom(nn.Module):
        pass

    with pytest.raises(ValueError, match=r"must cover dims 0\.\.1"):
        smp.register_layout(Custom, fan_in=(1,), fan_out=(3,))
    with pytest.raises(ValueError, match="disjoint"):
        smp.register_layout(Custom, fan_in=(0,), fan_out=(0,))
    assert layout_of(Custom()) is None  # a refused layout registers nothing
    with pytest.raises(TypeError, match="nn.Module subclass"):
        smp.register_layout(int, fan_in=(1,), fan_out=(0,))  # type: ignore[arg-type]
    with torch.device("meta"):
        base = ConvNet(8)
    with pytest.raises(ValueError, match="block masks need a 2-D weight"):
        smp.parameterize(ConvNet(16), base, density=0.5, mask_kind="blocks", block_size=2)


def _feeds(module: nn.Module, make_input, outputs: int) -> torch.Tensor:
    rows = []
    for o in range(outputs):
        module.zero_grad()
        module(*make_input()).reshape(-1, outputs)[:, o].sum().backward()
        rows.append(known(module.get_parameter("weight").grad).reshape(-1) != 0)
    return torch.stack(rows)


@settings(max_examples=10, deadline=None)
@given(n_in=st.integers(1, 6), n_out=st.integers(1, 6), n_in2=st.integers(1, 4))
def test_linear_bilinear_and_embedding_layouts_match_autograd(n_in, n_out, n_in2):
    cases = [
        (nn.Linear(n_in, n_out), lambda: (torch.randn(3, n_in),), n_out),
        (nn.Bilinear(n_in, n_in2, n_out), lambda: (torch.randn(3, n_in), torch.randn(3, n_in2)), n_out),
        # An embedding's output feature j reads column j of every row it may look up: fan-in = num_embeddings.
        (nn.Embedding(n_in, n_out), lambda: (torch.arange(n_in),), n_out),
    ]
    for module, make_input, outputs in cases:
        layout, weight = known(layout_of(module)), module.get_parameter("weight")
        index = neurons_view(torch.arange(weight.numel()).reshape(weight.shape), layout)
        feeds = _feeds(module, make_input, outputs)
        for o in range(outputs):
            assert set(feeds[o].nonzero().flatten().tolist()) == set(index[o].tolist()), type(module).__name__
