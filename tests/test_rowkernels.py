"""The native row-sparse kernels against plain torch: forward, dX and dW on any shape, fp32 and bf16, any threads."""

import os
import time
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsemup.sparse import native, rowkernels


@pytest.fixture(scope="module")
def built():
    """The compiled module; the tests that compare it with plain torch skip, naming why, where it cannot be built."""
    module = native.load()
    if module is None:
        pytest.skip(f"native kernels unavailable here: {native.status()['reason']}")
    return module


def _case(tokens, fan_in, fan_out, k, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(fan_in, generator=gen)[:k].sort().values for _ in range(fan_out)]).int()
    x = torch.randn(tokens, fan_in, generator=gen).to(dtype)
    values = torch.randn(fan_out, k, generator=gen).to(dtype)
    grad_y = torch.randn(tokens, fan_out, generator=gen).to(dtype)
    return x, values, index, grad_y


def _reference(x, values, index, grad_y):
    """fp64 masked dense: y = x Wᵀ, dx = g W, dW = (gᵀ x) at the kept entries."""
    weight = rowkernels.dense_weight(values.double(), index, x.shape[1])
    x64, g64 = x.double(), grad_y.double()
    return x64 @ weight.t(), g64 @ weight, (g64.t() @ x64).gather(1, index.long())


def _close(got, want, rtol):
    scale = want.abs().max().clamp_min(1e-30)
    assert float((got.double() - want).abs().max() / scale) <= rtol


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(1, 70), fan_in=st.integers(1, 150), fan_out=st.integers(1, 40), k_frac=st.floats(0, 1),
       seed=st.integers(0, 2**16))
def test_fp32_kernels_equal_masked_dense_on_any_shape(built, tokens, fan_in, fan_out, k_frac, seed):
    k = max(1, round(k_frac * fan_in))  # k = 1 and k = fan_in (dense rows) included
    x, values, index, grad_y = _case(tokens, fan_in, fan_out, k, seed)
    y, dx_want, dw_want = _reference(x, values, index, grad_y)
    _close(built.forward(x, values, index), y, 1e-5)
    dx, dw = built.backward(grad_y, x, values, index, True, True)
    _close(dx, dx_want, 1e-5)
    _close(dw, dw_want, 1e-5)
    dx_only, no_dw = built.backward(grad_y, x, values, index, True, False)
    no_dx, dw_only = built.backward(grad_y, x, values, index, False, True)
    assert torch.equal(dx_only, dx) and torch.equal(dw_only, dw) and no_dw.numel() == no_dx.numel() == 0


def test_bf16_storage_accumulates_in_fp32(built):
    # bf16 inputs and outputs (8 mantissa bits: one rounding of each result, 2⁻⁸ relative) with fp32 sums inside.
    x, values, index, grad_y = _case(300, 257, 129, 17, seed=3, dtype=torch.bfloat16)
    y, dx_want, dw_want = _reference(x, values, index, grad_y)
    dx, dw = built.backward(grad_y, x, values, index, True, True)
    for got, want in ((built.forward(x, values, index), y), (dx, dx_want), (dw, dw_want)):
        assert got.dtype == torch.bfloat16
        _close(got, want, 2**-7)


def test_results_do_not_depend_on_the_thread_count(built):
    x, values, index, grad_y = _case(1000, 384, 96, 24, seed=5)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append((built.forward(x, values, index), *built.backward(grad_y, x, values, index, True, True)))
    finally:
        torch.set_num_threads(before)
    (y1, dx1, dw1), (y2, dx2, dw2) = outs
    assert torch.equal(y1, y2) and torch.equal(dx1, dx2)  # one thread owns each token tile
    _close(dw2, dw1.double(), 1e-6)  # per-thread dW partials, summed in another order: fp32 rounding only


def test_bad_layouts_are_named(built):
    x, values, index, grad_y = _case(8, 16, 4, 3, seed=0)
    bad = index.clone()
    bad[1, 2] = 16
    with pytest.raises(RuntimeError, match=r"index out of range \[0, 16\)"):
        built.forward(x, values, bad)
    with pytest.raises(RuntimeError, match="index must be int32"):
        built.forward(x, values, index.long())
    with pytest.raises(RuntimeError, match="values dtype"):
        built.forward(x, values.double().float().bfloat16(), index)
    with pytest.raises(RuntimeError, match="grad_y must be"):
        built.backward(grad_y[:, :2].contiguous(), x, values, index, True, True)


def test_status_names_the_active_path(built):
    status = native.status()
    assert status["active"] and status["isa"] in ("avx512f", "avx2", "default")
    assert status["reason"] in ("built", "cached") and status["build_key"] in status["cache"]


def test_a_failed_build_warns_once_and_gives_the_same_results(monkeypatch):
    x, values, index, grad_y = _case(50, 40, 12, 7, seed=9)
    expected = (rowkernels.rows_forward(x, values, index), *rowkernels.rows_backward(grad_y, x, values, index))
    for name in ("_module", "_tried", "_reason", "_cache"):  # restored after the test: the build stays loaded
        monkeypatch.setattr(native, name, getattr(native, name))
    native.reset()
    monkeypatch.setenv("SPARSEMUP_NATIVE_FORCE_FAIL", "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = (rowkernels.rows_forward(x, values, index), *rowkernels.rows_backward(grad_y, x, values, index))
        rowkernels.rows_forward(x, values, index)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "SPARSEMUP_NATIVE_FORCE_FAIL" in messages[0] and "plain-torch" in messages[0]
    status = native.status()
    assert not status["active"] and status["build_key"] == "plain-torch"
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_disabled_by_environment(monkeypatch):
    for name in ("_module", "_tried", "_reason", "_cache"):
        monkeypatch.setattr(native, name, getattr(native, name))
    native.reset()
    monkeypatch.setenv("SPARSEMUP_NATIVE", "0")
    with pytest.warns(RuntimeWarning, match="disabled by SPARSEMUP_NATIVE=0"):
        assert native.load() is None
    assert native.status()["reason"] == "disabled by SPARSEMUP_NATIVE=0"


def test_a_lock_left_by_a_killed_build_is_cleared_and_a_live_one_kept(tmp_path):
    stale, live = tmp_path / "stale" / "lock", tmp_path / "live" / "lock"
    for lock in (stale, live):
        lock.parent.mkdir()
        lock.write_text("")
    old = time.time() - native.STALE_LOCK_S - 60
    os.utime(stale, (old, old))
    with pytest.warns(RuntimeWarning, match="did not finish"):
        native._clear_stale_lock(stale)
    native._clear_stale_lock(live)  # a build in progress elsewhere: left alone, torch's loader waits for it
    native._clear_stale_lock(tmp_path / "none" / "lock")  # no lock: nothing to do
    assert not stale.exists() and live.exists()


def test_doctor_says_which_path_is_active_and_why(capsys):
    import json
    import os
    import subprocess
    import sys

    from sparsemup.cli import main

    assert main(["doctor", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["native"]["active"] == (native.load() is not None)
    assert facts["cpu"]["cores"] >= 1 and set(facts["extras"]) == {"hf", "ray", "tune"}
    off = subprocess.run([sys.executable, "-m", "sparsemup", "doctor"], capture_output=True, text=True,
                         env={**os.environ, "SPARSEMUP_NATIVE": "0"}, check=True).stdout
    assert "native rows  OFF: disabled by SPARSEMUP_NATIVE=0" in off and "Fix:" in off
