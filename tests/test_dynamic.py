"""Dynamic-sparsity rules (GMP, SET, RigL) as pure functions: schedules, exact per-row counts, which
entries are dropped and regrown, determinism."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsemup.core.masks import random_mask
from sparsemup.dynamic.methods import drop_and_grow, gmp_density, prune_to_density, random_scores, update_fraction


def test_gmp_follows_the_cubic_schedule():
    assert gmp_density(0, 10, 110, 1.0, 0.25) == 1.0
    assert gmp_density(110, 10, 110, 1.0, 0.25) == 0.25 == gmp_density(500, 10, 110, 1.0, 0.25)
    assert gmp_density(60, 10, 110, 1.0, 0.25) == pytest.approx(0.25 + 0.75 * 0.5**3)
    values = [gmp_density(t, 10, 110, 1.0, 0.25) for t in range(0, 120)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="final density"):
        gmp_density(0, 0, 10, 0.25, 0.5)
    with pytest.raises(ValueError, match="end step"):
        gmp_density(0, 10, 10, 1.0, 0.5)


def test_rigl_fraction_decays_by_cosine_and_set_keeps_it():
    assert update_fraction(0, 100, 0.3) == pytest.approx(0.3)
    assert update_fraction(50, 100, 0.3) == pytest.approx(0.15)
    assert update_fraction(100, 100, 0.3) == 0.0 == update_fraction(150, 100, 0.3, decay=False)
    assert update_fraction(99, 100, 0.3, decay=False) == 0.3
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        update_fraction(0, 100, 1.5)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 8), fan_in=st.integers(2, 40), density=st.floats(0.05, 1.0),
       fraction=st.floats(0.0, 1.0), seed=st.integers(0, 10))
def test_drop_and_grow_keeps_exact_per_row_counts(rows, fan_in, density, fraction, seed):
    density = max(density, 1 / fan_in)  # at least one weight per row
    mask = random_mask((rows, fan_in), density, seed, "w")
    gen = torch.Generator().manual_seed(seed)
    weight, grad = torch.randn(rows, fan_in, generator=gen) * mask, torch.randn(rows, fan_in, generator=gen)
    new = drop_and_grow(mask, weight, grad.abs(), fraction)
    assert torch.equal(new.sum(dim=1), mask.sum(dim=1))
    n = torch.floor(fraction * mask.sum(dim=1).double() + 0.5).long()
    for r in range(rows):
        kept = mask[r].nonzero().flatten()
        by_size = kept[torch.sort(weight[r, kept].abs(), descending=True, stable=True).indices]
        survivors = set(by_size[: len(kept) - int(n[r])].tolist())
        assert survivors <= set(new[r].nonzero().flatten().tolist())  # the largest kept weights survive
        grown = set(new[r].nonzero().flatten().tolist()) - survivors
        others = [i for i in range(fan_in) if i not in survivors and i not in grown]
        if grown and others:  # regrown where the score is highest among the rest
            assert min(grad[r, sorted(grown)].abs()) >= max(grad[r, others].abs())
    flat = drop_and_grow(mask, weight, grad.abs(), fraction, constant_fan_in=False)
    assert int(flat.sum()) == int(mask.sum())


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 8), fan_in=st.integers(2, 40), density=st.floats(0.05, 1.0), seed=st.integers(0, 10))
def test_pruning_keeps_the_largest_weights_at_an_exact_count(rows, fan_in, density, seed):
    mask = torch.ones(rows, fan_in, dtype=torch.bool)
    weight = torch.randn(rows, fan_in, generator=torch.Generator().manual_seed(seed))
    pruned = prune_to_density(mask, weight, density)
    keep = max(1, math.floor(density * fan_in + 0.5))
    assert (pruned.sum(dim=1) == keep).all()
    for r in range(rows):
        dropped = weight[r][~pruned[r]].abs()
        assert dropped.numel() == 0 or weight[r][pruned[r]].abs().min() >= dropped.max()
    again = prune_to_density(pruned, weight, density)
    assert torch.equal(again, pruned)  # the same density again drops nothing
    layer = prune_to_density(mask, weight, density, constant_fan_in=False)
    assert int(layer.sum()) >= min(keep * rows, rows * fan_in) and (layer.sum(dim=1) >= 1).all()


def test_random_regrowth_is_a_function_of_seed_name_and_step():
    a = random_scores((4, 8), 0, "blocks.0.fc.weight", 10)
    assert torch.equal(a, random_scores((4, 8), 0, "blocks.0.fc.weight", 10))
    assert not torch.equal(a, random_scores((4, 8), 0, "blocks.0.fc.weight", 20))
    assert not torch.equal(a, random_scores((4, 8), 1, "blocks.0.fc.weight", 10))
