"""Static masks: exact counts, determinism across processes, validation."""

import hashlib
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsemup.core.masks import random_mask, stable_seed, validate_mask


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 300), st.floats(0.0, 1.0, exclude_min=True), st.integers(0, 10**6))
def test_rows_mask_has_exact_count_per_row(rows, fan_in, density, seed):
    k = int(density * fan_in + 0.5)
    if k < 1:
        with pytest.raises(ValueError, match="no weights"):
            random_mask((rows, fan_in), density, seed, "w")
        return
    mask = random_mask((rows, fan_in), density, seed, "w")
    assert mask.dtype == torch.bool
    assert (mask.sum(dim=1) == k).all()


def test_conv_shaped_mask_counts_flattened_fan_in():
    mask = random_mask((8, 4, 3, 3), 0.25, 0, "conv.weight")
    assert (mask.reshape(8, -1).sum(dim=1) == 9).all()


def test_masks_depend_on_seed_and_name():
    a = random_mask((64, 64), 0.25, 0, "a.weight")
    assert torch.equal(a, random_mask((64, 64), 0.25, 0, "a.weight"))
    assert not torch.equal(a, random_mask((64, 64), 0.25, 1, "a.weight"))
    assert not torch.equal(a, random_mask((64, 64), 0.25, 0, "b.weight"))


@pytest.mark.slow
def test_masks_identical_in_separate_processes():
    code = (
        "import hashlib, sys; from sparsemup.core.masks import random_mask;"
        "m = random_mask((128, 96), 0.1, 7, 'blocks.0.mlp.fc.weight');"
        "sys.stdout.write(hashlib.sha256(m.numpy().tobytes()).hexdigest())"
    )
    outs = []
    for hash_seed in ("1", "2"):  # different salts for Python's str hash
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        outs.append(proc.stdout)
    local = random_mask((128, 96), 0.1, 7, "blocks.0.mlp.fc.weight")
    assert outs[0] == outs[1] == hashlib.sha256(local.numpy().tobytes()).hexdigest()


def test_stable_seed_is_stable():
    assert stable_seed(0, "x") == stable_seed(0, "x")
    assert stable_seed(0, "x") != stable_seed(0, "y")
    assert 0 <= stable_seed(123, "abc") < 2**63


def test_bernoulli_mask_density_in_expectation():
    mask = random_mask((256, 256), 0.25, 0, "w", kind="bernoulli")
    assert abs(mask.float().mean().item() - 0.25) < 0.01
    assert len(set(mask.sum(dim=1).tolist())) > 1  # not exact per row
    with pytest.raises(ValueError, match="Bernoulli mask.*no weights"):
        random_mask((512, 10), 0.1, 0, "w", kind="bernoulli")


def test_mask_errors():
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        random_mask((4, 4), 0.0, 0, "w")
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        random_mask((4, 4), 1.5, 0, "w")
    with pytest.raises(ValueError, match="unknown mask kind"):
        random_mask((4, 4), 0.5, 0, "w", kind="stripes")  # type: ignore[arg-type]  # bad on purpose
    with pytest.raises(ValueError, match="at least 1/100"):
        random_mask((4, 100), 0.001, 0, "w")


def test_validate_user_mask():
    good = torch.tensor([[1, 0], [0, 1]], dtype=torch.float32)
    assert validate_mask(good, (2, 2), "w").dtype == torch.bool
    with pytest.raises(ValueError, match="shape"):
        validate_mask(good, (2, 3), "w")
    with pytest.raises(ValueError, match="only 0 and 1"):
        validate_mask(good * 2, (2, 2), "w")
    with pytest.raises(ValueError, match="1 row"):
        validate_mask(torch.tensor([[1, 0], [0, 0]]), (2, 2), "w")
