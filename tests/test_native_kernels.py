"""The native sparse kernels (rows and blocks) against fp64 masked dense: forward, dX and dW on any shape, fp32 and
bf16, any thread count; named errors; the build's fallback and status."""

import os
import time
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsemup.sparse import kernels, native
from sparsemup.sparse.blocksparse import block_sparse_linear, to_blocks, to_dense


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
    weight = kernels.rows_dense(values.double(), index, x.shape[1])
    x64, g64 = x.double(), grad_y.double()
    return x64 @ weight.t(), g64 @ weight, (g64.t() @ x64).gather(1, index.long())


def _close(got, want, rtol):
    scale = want.abs().max().clamp_min(1e-30)
    assert float((got.double() - want).abs().max() / scale) <= rtol


def _assert_kernels_equal(forward, backward, case, want, rtol):
    """Forward, fused dX + dW, dX only and dW only of one kernel pair against fp64 references ``want``."""
    x, values, index, grad_y = case
    y, dx_want, dw_want = want
    dx, dw = backward(grad_y, x, values, index, True, True)
    for got, expected in ((forward(x, values, index), y), (dx, dx_want), (dw, dw_want)):
        assert got.dtype == x.dtype
        _close(got, expected, rtol)
    dx_only, no_dw = backward(grad_y, x, values, index, True, False)
    no_dx, dw_only = backward(grad_y, x, values, index, False, True)
    assert torch.equal(dx_only, dx) and torch.equal(dw_only, dw) and no_dw.numel() == no_dx.numel() == 0


def _assert_thread_count_free(forward, backward, case):
    """One thread owns each token tile, so y and dx are bitwise equal; dW sums per-thread partials in another
    order (fp32 rounding only)."""
    x, values, index, grad_y = case
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append((forward(x, values, index), *backward(grad_y, x, values, index, True, True)))
    finally:
        torch.set_num_threads(before)
    (y1, dx1, dw1), (y2, dx2, dw2) = outs
    assert torch.equal(y1, y2) and torch.equal(dx1, dx2)
    _close(dw2, dw1.double(), 1e-6)


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(1, 70), fan_in=st.integers(1, 150), fan_out=st.integers(1, 40), k_frac=st.floats(0, 1),
       seed=st.integers(0, 2**16))
def test_fp32_kernels_equal_masked_dense_on_any_shape(built, tokens, fan_in, fan_out, k_frac, seed):
    k = max(1, round(k_frac * fan_in))  # k = 1 and k = fan_in (dense rows) included
    case = _case(tokens, fan_in, fan_out, k, seed)
    _assert_kernels_equal(built.rows_forward, built.rows_backward, case, _reference(*case), 1e-5)


def test_bf16_storage_accumulates_in_fp32(built):
    # bf16 inputs and outputs (8 mantissa bits: one rounding of each result, 2⁻⁸ relative) with fp32 sums inside.
    case = _case(300, 257, 129, 17, seed=3, dtype=torch.bfloat16)
    _assert_kernels_equal(built.rows_forward, built.rows_backward, case, _reference(*case), 2**-7)


def test_results_do_not_depend_on_the_thread_count(built):
    _assert_thread_count_free(built.rows_forward, built.rows_backward, _case(1000, 384, 96, 24, seed=5))


def _assert_bad_inputs_named(forward, backward, case, bad, limit):
    """An out-of-range index, an int64 index and a wrong-shaped grad_y each raise a message naming the problem."""
    x, values, index, grad_y = case
    with pytest.raises(RuntimeError, match=rf"index out of range \[0, {limit}\)"):
        forward(x, values, bad)
    with pytest.raises(RuntimeError, match="index must be int32"):
        forward(x, values, index.long())
    with pytest.raises(RuntimeError, match="values dtype"):
        forward(x, values.bfloat16(), index)
    with pytest.raises(RuntimeError, match="grad_y must be"):
        backward(grad_y[:, :2].contiguous(), x, values, index, True, True)


def test_bad_inputs_are_named(built):
    case = _case(8, 16, 4, 3, seed=0)
    bad = case[2].clone()
    bad[1, 2] = 16
    _assert_bad_inputs_named(built.rows_forward, built.rows_backward, case, bad, 16)


# ---- block kernels ------------------------------------------------------------------------------------


def _block_case(tokens, rows, cols, k, block, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(cols, generator=gen)[:k].sort().values for _ in range(rows)]).int()
    x = torch.randn(tokens, cols * block, generator=gen).to(dtype)
    values = torch.randn(rows, k, block, block, generator=gen).to(dtype)
    grad_y = torch.randn(tokens, rows * block, generator=gen).to(dtype)
    return x, values, index, grad_y


def _block_reference(x, values, index, grad_y):
    """fp64 masked dense: y = x Wᵀ, dx = g W, dW = (gᵀ x) on the kept blocks."""
    weight = to_dense(values.double(), index.long(), x.shape[1])
    x64, g64 = x.double(), grad_y.double()
    return x64 @ weight.t(), g64 @ weight, to_blocks(g64.t() @ x64, index.long(), values.shape[2])


@settings(max_examples=30, deadline=None)
@given(tokens=st.integers(1, 150), rows=st.integers(1, 4), cols=st.integers(1, 6), k_frac=st.floats(0, 1),
       block=st.sampled_from([1, 2, 3, 4, 8, 16, 24, 32, 48, 64]), seed=st.integers(0, 2**16))
def test_block_kernels_equal_masked_dense_on_any_shape(built, tokens, rows, cols, k_frac, block, seed):
    # Odd block sizes and token counts exercise every vector width and the token tails; k = 1 and dense block-rows.
    k = max(1, round(k_frac * cols))
    case = _block_case(tokens, rows, cols, k, block, seed)
    _assert_kernels_equal(built.blocks_forward, built.blocks_backward, case, _block_reference(*case), 1e-5)


def test_block_kernels_bf16_storage_accumulates_in_fp32(built):
    case = _block_case(300, 5, 9, 3, 16, seed=4, dtype=torch.bfloat16)
    _assert_kernels_equal(built.blocks_forward, built.blocks_backward, case, _block_reference(*case), 2**-7)


def test_block_kernels_do_not_depend_on_the_thread_count(built):
    _assert_thread_count_free(built.blocks_forward, built.blocks_backward, _block_case(1000, 6, 8, 3, 16, seed=6))


def test_block_kernels_name_bad_inputs(built):
    case = _block_case(8, 2, 4, 2, 4, seed=0)
    x, values, index, _ = case
    bad = index.clone()
    bad[1, 1] = 4
    _assert_bad_inputs_named(built.blocks_forward, built.blocks_backward, case, bad, 4)
    with pytest.raises(RuntimeError, match="does not divide in"):
        built.blocks_forward(x[:, :15].contiguous(), values, index)
    with pytest.raises(RuntimeError, match=r"values must be \(rows, k, b, b\)"):
        built.blocks_forward(x, values[:, :, :2].contiguous(), index)


def test_status_names_the_active_path(built):
    status = native.status()
    assert status["active"] and status["isa"] in ("avx512f", "avx2", "default")
    assert status["cache"] is not None  # active: built in (or loaded from) its cache folder
    assert status["reason"] in ("built", "cached") and status["build_key"] in status["cache"]


def test_a_failed_build_warns_once_and_gives_the_same_results(monkeypatch):
    x, values, index, grad_y = _case(50, 40, 12, 7, seed=9)
    bx, bvalues, bindex, bgrad = _block_case(50, 3, 5, 2, 8, seed=9)

    def run():
        blocks_x, blocks_values = bx.clone().requires_grad_(), bvalues.clone().requires_grad_()
        block_sparse_linear(blocks_x, blocks_values, bindex.long()).backward(bgrad)
        return (kernels.ROWS.forward(x, values, index)[0],
                *kernels.ROWS.backward((x, values, index), None, grad_y, True, True),
                blocks_x.grad, blocks_values.grad)

    expected = run()
    for name in ("_module", "_tried", "_reason", "_cache"):  # restored after the test: the build stays loaded
        monkeypatch.setattr(native, name, getattr(native, name))
    native.reset()
    monkeypatch.setenv("SPARSEMUP_NATIVE_FORCE_FAIL", "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = run()
        kernels.ROWS.forward(x, values, index)
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


def test_a_lock_turning_stale_during_the_wait_is_cleared_and_the_wait_is_bounded(tmp_path, monkeypatch):
    import socket
    import subprocess
    import sys

    monkeypatch.setattr(native, "STALE_LOCK_S", 1.0)
    monkeypatch.setattr(native, "POLL_S", 0.05)
    lock = tmp_path / native.LOCK_NAME
    lock.write_text(f"{os.getppid()} {socket.gethostname()}\n")  # fresh, its holder alive: stale only after 1 s
    start = time.monotonic()
    with pytest.warns(RuntimeWarning, match=f"removed {lock}.*untouched for"):
        native._acquire(lock)
    assert 1.0 <= time.monotonic() - start < 10 and lock.read_text().split()[0] == str(os.getpid())
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(f"{gone.stdout.strip()} {socket.gethostname()}\n")  # its holder was killed: stale at once
    with pytest.warns(RuntimeWarning, match=f"process {gone.stdout.strip()} is gone"):
        native._acquire(lock)
    monkeypatch.setattr(native, "STALE_LOCK_S", 60.0)
    monkeypatch.setattr(native, "MAX_WAIT_S", 0.3)
    lock.write_text(f"{os.getppid()} {socket.gethostname()}\n")  # a live build that takes too long
    with pytest.raises(RuntimeError, match=f"waited 0 s for the native build lock {lock}.*remove that file"):
        native._acquire(lock)


def test_build_tools_left_running_by_a_killed_build_are_ended(tmp_path):
    import subprocess

    (tmp_path / "ninja").symlink_to("/bin/sleep")
    left = subprocess.Popen(["./ninja", "60"], cwd=tmp_path)
    other = subprocess.Popen(["sleep", "60"], cwd=tmp_path)  # not a build tool: left alone
    try:
        time.sleep(0.2)
        with pytest.warns(RuntimeWarning, match=f"ended process {left.pid}"):
            native._end_leftover_builds(tmp_path)
        assert left.wait(timeout=5) != 0 and other.poll() is None
    finally:
        left.kill()
        other.kill()
        other.wait()


def test_a_truncated_build_in_the_cache_is_rebuilt_after_one_warning(built, tmp_path):
    import shutil
    import subprocess
    import sys

    status = native.status()
    assert status["cache"] is not None
    cache = tmp_path / status["build_key"]
    shutil.copytree(status["cache"], cache, ignore=shutil.ignore_patterns("*lock"))
    lib = next(cache.glob("*.so"))
    lib.with_name(lib.name + ".sha256").write_text(native._digest(lib) + "\n")
    with lib.open("r+b") as f:
        f.truncate(lib.stat().st_size // 2)
    run = subprocess.run([sys.executable, "-m", "sparsemup", "doctor", "--json"], capture_output=True, text=True,
                         env={**os.environ, "SPARSEMUP_CACHE": str(tmp_path)}, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("is damaged") == 1 and str(lib) in run.stderr
    record = lib.with_name(lib.name + ".sha256")
    assert '"active": true' in run.stdout and native._digest(lib) == record.read_text().strip()


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
    assert "native       OFF: disabled by SPARSEMUP_NATIVE=0" in off and "Fix:" in off
