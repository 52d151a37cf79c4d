"""Block masks, the block-sparse layer and backend: same numbers as masked dense, ρ of the memory."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparsemup as smp
from helpers import block_gpt, known, lm_loss, tokens
from sparsemup.core.masks import block_columns, random_mask
from sparsemup.models import GPTConfig, build_gpt
from sparsemup.sparse.backend import get_backends, sparsify
from sparsemup.sparse.blocksparse import BlockSparseLinear, block_sparse_linear, to_blocks, to_dense
from tolerances import matmul_atol

# ---- block masks -------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 12), block=st.sampled_from([1, 2, 4, 8]),
       density=st.floats(0.05, 1.0), seed=st.integers(0, 3))
def test_block_mask_rows_have_equal_fan_in_in_whole_blocks(rows, cols, block, density, seed):
    shape = (rows * block, cols * block)
    k = math.floor(density * cols + 0.5)  # round half up, as for rows masks
    if k < 1:
        with pytest.raises(ValueError, match="block size of at most"):
            random_mask(shape, density, seed, "w", "blocks", block)
        return
    mask = random_mask(shape, density, seed, "w", "blocks", block)
    assert torch.equal(mask, random_mask(shape, density, seed, "w", "blocks", block))  # deterministic
    assert (mask.sum(dim=1) == k * block).all()  # every neuron: the same fan-in
    kept = block_columns(mask, block)
    assert kept is not None and kept.shape == (rows, k)
    assert torch.equal(to_dense(torch.ones(rows, k, block, block), kept, shape[1]).bool(), mask)


def test_block_mask_errors_name_the_fix():
    with pytest.raises(ValueError, match="dividing both dims"):
        random_mask((48, 40), 0.5, 0, "w", "blocks", 16)
    with pytest.raises(ValueError, match="2-D weight"):
        random_mask((16, 16, 3), 0.5, 0, "w", "blocks", 16)
    with pytest.raises(ValueError, match="block size of at most"):
        random_mask((64, 64), 1 / 16, 0, "w", "blocks", 16)


def test_block_columns_rejects_other_masks():
    assert block_columns(random_mask((64, 64), 0.25, 0, "w", "rows"), 16) is None
    uneven = torch.zeros(32, 32, dtype=torch.bool)
    uneven[:16, :16] = True
    uneven[16:, :] = True
    assert block_columns(uneven, 16) is None


def test_parameterize_records_block_density_and_effective_fan_in():
    model = block_gpt(density=0.25, block=16)
    record = smp.get_parameterization(model)
    assert record.mask_kind == "blocks" and record.block_size == 16
    info = record.params["blocks.0.attn.qkv.weight"]
    assert info.density == 0.25 and info.multipliers.density == 0.25
    assert (known(smp.core.get_mask(model, "blocks.0.attn.qkv.weight")).sum(dim=1) == 32).all()  # d·ρ = 128·1/4


# ---- the layer -------------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(out_blocks=st.integers(1, 5), in_blocks=st.integers(1, 7), block=st.sampled_from([1, 4, 8, 16]),
       keep=st.integers(1, 7), lead=st.sampled_from([(3,), (2, 5), (1,)]), bias=st.booleans(), seed=st.integers(0, 9))
def test_layer_matches_masked_dense_fp32(out_blocks, in_blocks, block, keep, lead, bias, seed):
    keep = min(keep, in_blocks)
    shape = (out_blocks * block, in_blocks * block)
    mask = random_mask(shape, keep / in_blocks, seed, "w", "blocks", block)
    torch.manual_seed(seed)
    linear = nn.Linear(shape[1], shape[0], bias=bias)
    with torch.no_grad():
        linear.weight.mul_(mask)
    sparse = BlockSparseLinear.from_linear(linear, known(block_columns(mask, block)), block)
    x = torch.randn(*lead, shape[1], requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = linear(x), sparse(x2)
    # Two summation orders of the same products differ by at most 2·γ_k·(|x| @ |W|ᵀ) entrywise (tolerances).
    flat_x = x.detach().reshape(-1, shape[1])
    bound = matmul_atol(flat_x, linear.weight.detach(), linear.bias.detach() if bias else None).reshape(y.shape)
    assert ((y2 - y).double().abs() <= bound).all()
    grad = torch.randn_like(y)
    y.backward(grad)
    y2.backward(grad)
    flat_g = grad.reshape(-1, shape[0])
    dx_bound = matmul_atol(flat_g, linear.weight.detach().t()).reshape(x.shape)
    assert ((known(x2.grad) - known(x.grad)).double().abs() <= dx_bound).all()
    dw_bound = matmul_atol(flat_g.t(), flat_x.t())  # dW = gradᵀ x sums over the tokens
    dw = to_dense(known(sparse.weight.grad), sparse.weight_index, shape[1])
    assert ((dw - known(linear.weight.grad) * mask).double().abs() <= dw_bound).all()
    if bias:
        torch.testing.assert_close(known(sparse.bias).grad, known(linear.bias).grad)


@pytest.mark.parametrize("autocast", [False, True])
def test_layer_bf16_within_stated_tolerance(autocast):
    # bf16 keeps 8 mantissa bits: outputs and gradients within 2% of the fp32 result's scale.
    shape, block = (96, 128), 16
    mask = random_mask(shape, 0.25, 0, "w", "blocks", block)
    index = known(block_columns(mask, block))
    weight = torch.randn(shape) * mask / 8
    x = torch.randn(4, 7, shape[1])
    values = to_blocks(weight, index, block).requires_grad_()
    ref = block_sparse_linear(x, values, index)
    ref.sum().backward()
    ref_grad = known(values.grad).clone()
    values.grad = None
    if autocast:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block_sparse_linear(x, values, index)
        assert out.dtype == torch.bfloat16
        out.float().sum().backward()
        grad: torch.Tensor = known(values.grad)  # flows back to the fp32 weights
    else:
        v16 = values.detach().bfloat16().requires_grad_()
        out = block_sparse_linear(x.bfloat16(), v16, index)
        out.float().sum().backward()
        grad = known(v16.grad).float()
    assert (out.float() - ref).abs().max() <= 0.02 * ref.abs().max()
    assert (grad - ref_grad).abs().max() <= 0.02 * ref_grad.abs().max()


def test_layer_dtype_mismatch_is_an_error():
    index = torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(TypeError, match="dtype"):
        block_sparse_linear(torch.randn(2, 4, dtype=torch.float64), torch.randn(1, 1, 4, 4), index)


# ---- the backend on a whole model -----------------------------------------------------------------


def test_sparsify_errors_and_choices():
    with pytest.raises(ValueError, match="mask_kind='blocks'"):
        cfg = GPTConfig(vocab_size=64, width=128, depth=1, head_dim=32, context=16)
        sparsify(build_gpt(cfg, 64, density=0.25)[0], "blocks")
    model = block_gpt()
    with pytest.raises(ValueError, match="unknown backend"):
        sparsify(model, "fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown backends"):
        sparsify(model, {"blocks.0.attn.qkv.weight": "csr"})  # type: ignore[dict-item]
    assert sparsify(model, "masked_dense") == {} and get_backends(model) == {}  # a recorded no-op
    with pytest.raises(ValueError, match="already sparsified"):
        sparsify(model, "blocks")
    with pytest.raises(ValueError, match="before wrapping"):
        sparsify(torch.compile(block_gpt()), "blocks")  # type: ignore[arg-type]
    # A replayed choice per weight, e.g. from a checkpoint.
    mixed = sparsify(block_gpt(), {"blocks.1.mlp.proj.weight": "blocks"})
    assert mixed["blocks.1.mlp.proj.weight"] == "blocks" and mixed["blocks.0.mlp.proj.weight"] == "masked_dense"


def test_bench_quick_writes_the_documented_rows(tmp_path, capsys):
    from sparsemup.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--threads", "1", "--json", str(out)]) == 0
    result = __import__("json").loads(out.read_text())
    keys = {"shape", "tokens", "density", "dtype", "backend", "fwd_ms", "bwd_ms", "total_ms", "peak_mem_mb"}
    assert all(keys <= set(row) for row in result["layers"])
    assert {r["backend"] for r in result["layers"]} == {"masked_dense", "torch_csr", "rows", "blocks"}
    timed = [r for r in result["layers"] if r["total_ms"] is not None]
    assert all(r["total_ms"] > 0 and r["speedup_vs_masked_dense"] > 0 for r in timed)
    # torch's CSR kernels lack bf16 on the CPU: recorded as unsupported, not as a number.
    assert all(r["error"] for r in result["layers"] if r["total_ms"] is None)
    blocks = [r for r in timed if r["backend"] in ("blocks", "rows")]
    dense = {(r["dtype"], r["density"]): r for r in timed if r["backend"] == "masked_dense"}
    assert all(r["state_mb"] < dense[(r["dtype"], r["density"])]["state_mb"] * 2 * r["density"] for r in blocks)
    assert {r["backend"] for r in result["gpt_step"]} == {"masked_dense", "blocks", "rows"}
    assert "GPT step" in capsys.readouterr().out
    # Each row names its mask; masked dense stands beside both kinds; the file names the CPU.
    assert {(r["mask"], r["backend"]) for r in result["layers"]} == {
        ("rows", "masked_dense"), ("rows", "torch_csr"), ("rows", "rows"), ("blocks", "masked_dense"),
        ("blocks", "blocks")}
    assert result["cpu"]["model"] and isinstance(result["cpu"]["flags"], list) and result["cpu"]["cores"] >= 1


def test_bench_filters_measure_only_the_rows_asked_for_and_skip_the_gpt_step(tmp_path, capsys):
    from sparsemup.cli import main

    out = tmp_path / "bench.json"
    args = ["bench", "--shapes", "64x128", "--tokens", "32", "--densities", "1/4,1/8", "--dtypes", "fp32",
            "--masks", "rows", "--threads", "1", "--json", str(out)]
    assert main(args) == 0
    result = __import__("json").loads(out.read_text())
    rows = result["layers"]
    assert {(tuple(r["shape"]), r["tokens"], r["dtype"], r["mask"]) for r in rows} == {((64, 128), 32, "fp32", "rows")}
    assert sorted({r["density"] for r in rows}) == [1 / 8, 1 / 4]
    assert {r["backend"] for r in rows} == {"masked_dense", "torch_csr", "rows"}
    assert result["gpt_step"] == [] and "GPT step" not in capsys.readouterr().out
    assert result["grid"]["masks"] == ["rows"] and result["grid"]["gpt_step"] is False


@pytest.mark.parametrize("bad", [["--shapes", "64by64"], ["--densities", "0"], ["--densities", "1/0"],
                                 ["--masks", "rows,csr"], ["--dtypes", "fp16"], ["--tokens", "0"]])
def test_bench_rejects_bad_filters(bad, capsys):
    from sparsemup.cli import main

    with pytest.raises(SystemExit):
        main(["bench", *bad])
    err = capsys.readouterr().err
    assert f"argument {bad[0]}:" in err and ("expected" in err or "must be" in err)


def test_swapped_layers_and_models_are_freed():
    import gc
    import weakref

    model = block_gpt()
    old = weakref.ref(model.blocks[0].mlp.fc.weight)
    sparsify(model, "blocks")
    gc.collect()
    assert old() is None  # the dense weight and mask do not linger behind the block-sparse layer
    whole = weakref.ref(model)
    del model
    gc.collect()
    assert whole() is None  # gradient-mask hooks do not keep a model alive


def test_layer_guards_and_module_state():
    linear = nn.Linear(64, 32)
    mask = random_mask((32, 64), 0.5, 0, "w", "blocks", 16)
    linear.weight.requires_grad_(False)
    linear.eval()
    sparse = BlockSparseLinear.from_linear(linear, known(block_columns(mask, 16)), 16)
    assert not sparse.weight.requires_grad and known(sparse.bias).requires_grad and not sparse.training
    with pytest.raises(ValueError, match="input has 128 features, the layer takes 64"):
        sparse(torch.randn(3, 128))
    values = sparse.weight.detach().clone().requires_grad_()
    x = torch.randn(5, 64, requires_grad=True)
    (grad,) = torch.autograd.grad(block_sparse_linear(x, values, sparse.weight_index).pow(2).sum(), values,
                                  create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|differentiable"):
        grad.pow(2).sum().backward()


def test_user_hooks_move_with_the_layer_and_export_gives_plain_linears():
    model = block_gpt()
    fc = model.get_submodule("blocks.0.mlp.fc")
    calls = []
    kw = fc.register_forward_pre_hook(lambda m, args, kwargs: calls.append("pre"), with_kwargs=True)
    fc.register_full_backward_hook(lambda m, gi, go: calls.append("backward"))
    sparsify(model, "blocks")
    x = tokens(batch=2, seq=17, vocab=64)
    lm_loss(model, x).backward()
    assert calls == ["pre", "backward"]
    kw.remove()  # the user's handle still works
    calls.clear()
    lm_loss(model, x).backward()
    assert calls == ["backward"]
    plain = smp.export(model)
    assert type(plain.get_submodule("blocks.0.mlp.fc")) is nn.Linear and not hasattr(plain, "_sparsemup_backends")
    torch.testing.assert_close(lm_loss(plain, x), lm_loss(model, x))


def test_a_block_checkpoint_of_another_pattern_is_refused():
    mine, theirs = block_gpt("blocks", seed=1), block_gpt("blocks", seed=2)
    with pytest.raises(ValueError, match="blocks sit elsewhere"):
        mine.load_state_dict(theirs.state_dict())


@pytest.mark.parametrize("strategy", ["native", "loop", "gather"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_every_strategy_matches_masked_dense(strategy, dtype, tol, monkeypatch):
    # The CPU runs the native kernels; without them per-block GEMMs or batched GEMMs on gathered blocks (by dtype and
    # tokens), as every other device does: all exact.
    from sparsemup.sparse import kernels, native

    if strategy == "native":
        if native.load() is None:
            pytest.skip(f"native kernels unavailable here: {native.status()['reason']}")
        monkeypatch.setattr(kernels, "_use_loop", lambda x, values: pytest.fail("the plain-torch path ran"))
    else:
        monkeypatch.setattr(native, "kernels_for", lambda *tensors: None)
        monkeypatch.setattr(kernels, "_use_loop", lambda x, values: strategy == "loop")
    shape, block = (96, 160), 16
    mask = random_mask(shape, 0.4, 3, "w", "blocks", block)
    index = known(block_columns(mask, block))
    weight = (torch.randn(shape) * mask / 8).to(dtype)
    x = torch.randn(37, shape[1], dtype=dtype, requires_grad=True)
    dense_w = weight.clone().requires_grad_()
    values = to_blocks(weight, index, block).requires_grad_()
    grad = torch.randn(37, shape[0], dtype=dtype)
    ref = F.linear(x, dense_w)
    ref.backward(grad)
    ref_dx = known(x.grad).clone()
    x.grad = None
    out = block_sparse_linear(x, values, index)
    out.backward(grad)
    scale = lambda t: t.float().abs().max()  # noqa: E731
    assert (out.float() - ref.float()).abs().max() <= tol * scale(ref)
    assert (known(x.grad).float() - ref_dx.float()).abs().max() <= tol * scale(ref_dx)
    masked_grad = (known(dense_w.grad) * mask).float()
    assert (to_dense(known(values.grad), index, shape[1]).float() - masked_grad).abs().max() <= tol * scale(masked_grad)
