"""The rule table (paper Table 1; SGD: App. D.3.1; docs/THEORY.md) as exact identities."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparsemup import SCHEMES, Role, Scheme
from sparsemup.rules import (
    Family,
    Multipliers,
    attention_scale,
    forward_multiplier,
    get_scheme,
    init_std,
    lr_multiplier,
    weight_decay_multiplier,
)

mult = st.floats(min_value=1 / 64, max_value=64, allow_nan=False)
ROLES = list(Role)
FAMILIES = list(Family)


@given(st.sampled_from(ROLES), st.sampled_from(FAMILIES), st.floats(0.001, 1.0), st.floats(0.1, 10), st.floats(0.1, 10))
def test_all_schemes_coincide_at_base_shape(role, family, sigma, a_in, a_out):
    base = Multipliers()
    for scheme in ("mup", "supar"):
        assert init_std(role, scheme, base, sigma) == init_std(role, "sp", base, sigma)
        assert lr_multiplier(role, scheme, base, family) == lr_multiplier(role, "sp", base, family)
        assert forward_multiplier(role, scheme, base, a_in, a_out) == forward_multiplier(role, "sp", base, a_in, a_out)


@given(st.integers(1, 512))
def test_attention_scale_mup_equals_sp_at_base_head_dim(d):
    assert attention_scale("mup", d, d) == pytest.approx(attention_scale("sp", d, d), rel=1e-15)
    assert attention_scale("supar", d, d) == pytest.approx(1 / math.sqrt(d), rel=1e-15)


def test_attention_scale_values():
    assert attention_scale("supar", 128, 64) == pytest.approx(8 / 128)
    assert attention_scale("sp", 128, 64) == pytest.approx(1 / math.sqrt(128))
    with pytest.raises(ValueError, match="positive"):
        attention_scale("sp", 0, 64)


@given(st.sampled_from(ROLES), st.sampled_from(FAMILIES), mult, mult)
def test_supar_at_unit_density_equals_mup(role, family, m_d, m_out):
    m = Multipliers(width=m_d, fan_out=m_out, density=1.0)
    assert init_std(role, "supar", m, 0.02) == init_std(role, "mup", m, 0.02)
    assert lr_multiplier(role, "supar", m, family) == lr_multiplier(role, "mup", m, family)
    assert forward_multiplier(role, "supar", m, 2.0, 3.0) == forward_multiplier(role, "mup", m, 2.0, 3.0)


@given(mult, mult, st.floats(0.001, 1.0))
def test_supar_hidden_adam(m_d, m_rho, sigma):
    m = Multipliers(width=m_d, fan_out=m_d, density=m_rho)
    # Table 1: hidden init var σ²/(m_d·m_ρ), LR η/(m_d·m_ρ).
    assert init_std("hidden", "supar", m, sigma) ** 2 == pytest.approx(sigma**2 / (m_d * m_rho), rel=1e-12)
    assert lr_multiplier("hidden", "supar", m, "adam") == pytest.approx(1 / (m_d * m_rho), rel=1e-12)
    assert lr_multiplier("hidden", "mup", m, "adam") == pytest.approx(1 / m_d, rel=1e-12)
    assert lr_multiplier("hidden", "sp", m, "adam") == 1.0
    assert init_std("hidden", "mup", m, sigma) ** 2 == pytest.approx(sigma**2 / m_d, rel=1e-12)
    assert init_std("hidden", "sp", m, sigma) == sigma


@given(mult, mult, mult)
def test_supar_sgd_column(m_d, m_out, m_rho):
    m = Multipliers(width=m_d, fan_out=m_out, density=m_rho)
    assert lr_multiplier("hidden", "supar", m, "sgd") == pytest.approx(m_out / m_d / m_rho, rel=1e-12)
    assert lr_multiplier("hidden", "mup", m, "sgd") == pytest.approx(m_out / m_d, rel=1e-12)
    # Paper App. D.3.1: when both sides scale, SµPar's SGD hidden LR is η/m_ρ.
    square = Multipliers(width=m_d, fan_out=m_d, density=m_rho)
    assert lr_multiplier("hidden", "supar", square, "sgd") == pytest.approx(1 / m_rho, rel=1e-12)
    for role in ("input", "output", "vector"):
        assert lr_multiplier(role, "supar", m, "sgd") == pytest.approx(m_d, rel=1e-12)
        assert lr_multiplier(role, "sp", m, "sgd") == 1.0
    # SGD init follows the Adam column.
    assert init_std("hidden", "supar", m, 0.02) == pytest.approx(0.02 / math.sqrt(m_d * m_rho), rel=1e-12)


@given(mult, mult)
def test_non_hidden_adam_rules(m_d, m_rho):
    m = Multipliers(width=m_d, density=m_rho)
    for scheme in ("sp", "mup", "supar"):
        assert init_std("input", scheme, m, 0.05) == 0.05
        assert init_std("output", scheme, m, 0.05) == 0.05
        for role in ("input", "output", "vector"):
            assert lr_multiplier(role, scheme, m, "adam") == 1.0
    assert forward_multiplier("input", "supar", m, 9.17, 1.095) == 9.17
    assert forward_multiplier("output", "supar", m, 9.17, 1.095) == pytest.approx(1.095 / m_d, rel=1e-12)
    assert forward_multiplier("output", "sp", m, 9.17, 1.095) == 1.095
    assert forward_multiplier("hidden", "supar", m, 9.17, 1.095) == 1.0


def test_ablation_schemes_apply_one_correction_each():
    m = Multipliers(width=4, fan_out=4, density=0.25)
    assert init_std("hidden", "mup+density_init", m, 1.0) == init_std("hidden", "supar", m, 1.0)
    assert lr_multiplier("hidden", "mup+density_init", m, "adam") == lr_multiplier("hidden", "mup", m, "adam")
    assert init_std("hidden", "mup+density_lr", m, 1.0) == init_std("hidden", "mup", m, 1.0)
    assert lr_multiplier("hidden", "mup+density_lr", m, "adam") == lr_multiplier("hidden", "supar", m, "adam")


@given(st.sampled_from(ROLES), st.floats(1 / 4096, 4096))
def test_weight_decay_modes(role, lr_mult):
    independent = weight_decay_multiplier(role, lr_mult, "independent")
    coupled = weight_decay_multiplier(role, lr_mult, "coupled")
    if role is Role.VECTOR:
        assert independent == coupled == 0.0
        assert weight_decay_multiplier(role, lr_mult, "independent", decay_vectors=True) == pytest.approx(1 / lr_mult)
    else:
        assert lr_mult * independent == pytest.approx(1.0)  # lr·wd held at η_base·wd_base
        assert coupled == 1.0


def test_bad_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown scheme 'spar'.*sp, mup, supar"):
        get_scheme("spar")
    with pytest.raises(ValueError, match="weight-decay mode"):
        weight_decay_multiplier("hidden", 1.0, "decoupled")  # type: ignore[arg-type]  # bad on purpose
    with pytest.raises(ValueError, match="on top of µP"):
        Scheme("bad", width=False, density_init=True, density_lr=False)
    with pytest.raises(ValueError, match="positive"):
        Multipliers(width=0.0)
    assert set(SCHEMES) >= {"sp", "mup", "supar"}


# ---- depth (CompleteP, arXiv 2505.01618) combined with SµPar: hand-computed values, docs/RULES.md ----
from sparsemup.rules import adam_eps_multiplier, depth_multiplier, residual_multiplier  # noqa: E402

# SµPar at m_d = 4, m_ρ = 1/2 (ρ = 1/2 over a dense base), m_L = 16 / 4 = 4, inside a residual block.
IN_BLOCK = Multipliers(width=4.0, fan_out=4.0, density=0.5, depth=4.0)
OUTSIDE = Multipliers(width=4.0, fan_out=1.0, density=1.0)  # the embedding: m_L = 1 outside the blocks


@pytest.mark.parametrize(
    ("alpha", "residual", "hidden_lr", "vector_lr", "hidden_eps", "embedding_eps"),
    [
        # α = 1 (CompleteP): residual 1/4; LRs as without depth (4^0); ε (1/4)·(1/4).
        (1.0, 0.25, 0.5, 1.0, 1 / 16, 1 / 4),
        # α = ½ (depth-µP): residual 1/2; LRs × 4^(−½) = 1/2; ε (1/4)·(1/2).
        (0.5, 0.5, 0.25, 0.5, 1 / 8, 1 / 4),
        # None: today's rules exactly; ε untouched.
        (None, 1.0, 0.5, 1.0, 1.0, 1.0),
    ],
)
def test_depth_rules_hand_computed(alpha, residual, hidden_lr, vector_lr, hidden_eps, embedding_eps):
    m_l = depth_multiplier(16, 4)
    assert m_l == 4.0
    assert residual_multiplier(alpha, m_l) == pytest.approx(residual, rel=1e-15)
    hidden = lr_multiplier("hidden", "supar", IN_BLOCK, "adam", alpha)
    assert hidden == pytest.approx(hidden_lr, rel=1e-15)  # 1/(m_d·m_ρ) · m_L^(α−1) = 1/2 · m_L^(α−1)
    assert lr_multiplier("vector", "supar", IN_BLOCK, "adam", alpha) == pytest.approx(vector_lr, rel=1e-15)
    assert lr_multiplier("input", "supar", OUTSIDE, "adam", alpha) == 1.0
    assert lr_multiplier("vector", "supar", OUTSIDE, "adam", alpha) == 1.0  # the final norm
    assert adam_eps_multiplier("supar", IN_BLOCK, alpha) == pytest.approx(hidden_eps, rel=1e-15)
    assert adam_eps_multiplier("supar", OUTSIDE, alpha) == pytest.approx(embedding_eps, rel=1e-15)
    # independent decay keeps lr·wd at the base's, depth factor included; init does not change with depth
    assert weight_decay_multiplier("hidden", hidden) * hidden == pytest.approx(1.0, rel=1e-15)
    assert init_std("hidden", "supar", IN_BLOCK, 0.02) == init_std("hidden", "supar", Multipliers(4.0, 4.0, 0.5), 0.02)


@given(st.sampled_from(ROLES), st.sampled_from(list(SCHEMES)), mult, mult, st.floats(1 / 64, 1.0))
def test_depth_rule_none_is_todays_rule(role, scheme, m_d, m_l, m_rho):
    with_depth = Multipliers(width=m_d, fan_out=m_d, density=m_rho, depth=m_l)
    without = Multipliers(width=m_d, fan_out=m_d, density=m_rho)
    for family in FAMILIES:
        assert lr_multiplier(role, scheme, with_depth, family, None) == lr_multiplier(role, scheme, without, family)
    assert adam_eps_multiplier(scheme, with_depth, None) == 1.0
    assert residual_multiplier(None, m_l) == 1.0


@given(mult, mult, st.floats(1 / 64, 1.0), st.floats(0.5, 1.0))
def test_depth_rule_at_base_depth_changes_only_eps(m_d, m_out, m_rho, alpha):
    m = Multipliers(width=m_d, fan_out=m_out, density=m_rho, depth=1.0)
    for role in ROLES:
        assert lr_multiplier(role, "supar", m, "adam", alpha) == lr_multiplier(role, "supar", m, "adam")
    assert residual_multiplier(alpha, 1.0) == 1.0
    assert adam_eps_multiplier("supar", m, alpha) == pytest.approx(1 / m_d, rel=1e-15)


def test_depth_rule_refusals():
    with pytest.raises(ValueError, match="Adam-family"):
        lr_multiplier("hidden", "supar", IN_BLOCK, "sgd", 1.0)
    with pytest.raises(ValueError, match="depth_alpha"):
        residual_multiplier(2.0, 4.0)
    with pytest.raises(ValueError, match="positive integers"):
        depth_multiplier(0, 4)
    with pytest.raises(ValueError, match="depth"):
        Multipliers(depth=0.0)
