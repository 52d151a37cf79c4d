"""What the row- and block-sparse backends share: the same numbers as masked dense, ρ of the memory, state dicts
in both directions, copies and exports. Tolerances come from ``tolerances`` (the arithmetic), not from one CPU."""

import copy
import io
import json
import pickle
from collections.abc import Callable

import pytest
import torch
from torch import nn

import sparsemup as smp
from helpers import assert_state_dicts_convert_both_ways, block_gpt, lm_loss, rows_gpt, tokens, train_steps
from sparsemup.sparse import BlockSparseLinear, RowSparseLinear, get_backends
from sparsemup.sparse.blocksparse import to_dense
from tolerances import model_rtol

BUILD: dict[str, Callable[..., nn.Module]] = {"rows": rows_gpt, "blocks": block_gpt}
LAYER = {"rows": RowSparseLinear, "blocks": BlockSparseLinear}


def dense_weight(model, name):
    """The (out, in) weight a sparse layer computes with, zeros where masked."""
    layer = model.get_submodule(name.rpartition(".")[0])
    if isinstance(layer, RowSparseLinear):
        return layer.dense_weight()
    return to_dense(layer.weight.detach(), layer.weight_index, layer.in_features)


def path_length(model):
    """(products on the longest forward path, their largest inner dimension) of the test GPTs: per block
    qkv, q·k, attention·v, proj, fc, proj, then the head."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear | RowSparseLinear | BlockSparseLinear)]
    depth = len(model.blocks)
    return 6 * depth + 1, max(m.in_features for m in linears)


def rms(t):
    return float(t.double().pow(2).mean().sqrt())


@pytest.mark.parametrize("kind", ["rows", "blocks"])
def test_sparsify_trains_like_masked_dense_with_rho_memory(kind):
    build = BUILD[kind]
    dense, sparse = build(), build(kind)
    assert set(get_backends(sparse).values()) == {kind}
    assert all(isinstance(sparse.get_submodule(n.rpartition(".")[0]), LAYER[kind]) for n in get_backends(sparse))
    matmuls, k = path_length(dense)
    x = tokens(batch=3, seq=17, vocab=64)
    # One forward: the loss within the chained bound of its products (λ = 6: a miss is below one in 10⁶).
    torch.testing.assert_close(lm_loss(sparse, x), lm_loss(dense, x), rtol=model_rtol(matmuls, k), atol=0)
    opts = [smp.make_optimizer(m, torch.optim.AdamW, lr=1e-2, weight_decay=0.1) for m in (dense, sparse)]
    assert [g["lr"] for g in opts[0].param_groups] == [g["lr"] for g in opts[1].param_groups]
    start = {name: dense.get_parameter(name).detach().clone() for name in get_backends(sparse)}
    steps = 4
    for model, opt in zip((dense, sparse), opts):
        train_steps(model, opt, steps, x, clip=1.0)
    # Each step's gradient runs the path forward and back (2 × the products); Adam passes its relative
    # error into the update at most unchanged, so the weights' drift apart is bounded relative to how far
    # they moved, in RMS. Single entries have no such bound: where a gradient cancels to near Adam's ε its
    # relative error, and so the update's, can be large; the RMS over a layer is the claim.
    rtol = model_rtol(2 * matmuls, k, steps)
    torch.testing.assert_close(lm_loss(sparse, x), lm_loss(dense, x), rtol=rtol, atol=0)
    for name in get_backends(sparse):
        want = dense.get_parameter(name).detach()
        drift = rms(dense_weight(sparse, name) - want)
        assert drift <= rtol * rms(want - start[name]), (name, drift, rms(want - start[name]))
    # Weights + AdamW state + index: ≤ 1.25 ρ of a dense fp32 weight with its two moments (12 bytes an entry).
    for name in get_backends(sparse):
        layer = sparse.get_submodule(name.rpartition(".")[0])
        assert isinstance(layer, (BlockSparseLinear, RowSparseLinear))
        state = opts[1].state[layer.weight]
        stored = sum(t.numel() * t.element_size() for t in (layer.weight, state["exp_avg"], state["exp_avg_sq"],
                                                              layer.weight_index))
        density = smp.get_parameterization(sparse).info(name).density
        assert stored <= 1.25 * density * 12 * layer.in_features * layer.out_features


@pytest.mark.parametrize("kind", ["rows", "blocks"])
def test_state_dicts_convert_both_ways(kind):
    assert_state_dicts_convert_both_ways(lambda backend, seed: BUILD[kind](backend and kind, seed=seed))


@pytest.mark.parametrize("kind, message", [("rows", "mask is not this layer's"), ("blocks", "block pattern")])
def test_another_pattern_is_refused_before_any_copy(kind, message):
    build = BUILD[kind]
    sparse = build(kind, seed=1)
    before = {k: v.clone() for k, v in sparse.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        sparse.load_state_dict(build(seed=2).state_dict())  # masked dense, other masks
    with pytest.raises(ValueError, match="sit elsewhere"):
        sparse.load_state_dict(build(kind, seed=2).state_dict())  # the same storage, other pattern
    assert all(torch.equal(before[k], v) for k, v in sparse.state_dict().items())


@pytest.mark.parametrize("kind", ["rows", "blocks"])
def test_copies_saves_exports_and_bf16_autocast(kind):
    sparse = BUILD[kind](kind)
    x = tokens(batch=2, seq=17, vocab=64)
    want = lm_loss(sparse, x).detach()
    buffer = io.BytesIO()
    torch.save(sparse, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(sparse), pickle.loads(pickle.dumps(sparse)), torch.load(buffer, weights_only=False)):
        torch.testing.assert_close(lm_loss(clone, x), want, rtol=0, atol=0)  # the same arithmetic: bitwise
    plain = smp.export(sparse)
    assert not any(isinstance(m, LAYER[kind]) for m in plain.modules())
    matmuls, k = path_length(sparse)
    torch.testing.assert_close(lm_loss(plain, x), want, rtol=model_rtol(matmuls, k), atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = lm_loss(sparse, x).detach()
    # bf16 rounds activations and weights (relative 2⁻⁸ each) before fp32 accumulation: a few percent at most
    # through the chain; 5% of the loss is far below what a wrong layer costs.
    assert abs(float(low) - float(want)) < 0.05 * float(want)


@pytest.mark.parametrize("kind", ["rows", "blocks"])
def test_coordinate_check_on_the_backend_measures_what_masked_dense_does(kind, tmp_path):
    from sparsemup.cli import main

    masks = ["--blocks", "8"] if kind == "blocks" else []
    steps = 2
    found = {}
    for backend in (kind, "masked_dense"):
        out = tmp_path / backend
        args = ["coord-check", "--model", "mlp", "--widths", "64,128", "--densities", "0.25", "--seeds", "1",
                "--base-width", "32", "--steps", str(steps), *masks, "--backend", backend, "--out", str(out)]
        assert main(args) == 0
        found[backend] = json.loads((out / "coord.json").read_text())
    assert found[kind]["settings"]["backend"] == kind and found[kind]["settings"]["masks"].startswith(kind)
    assert len(found[kind]["measurements"]) == len(found["masked_dense"]["measurements"]) > 0
    # The reference MLP: 4 products on its path (input, two hidden, output), inner dimension ≤ 128.
    rtol = model_rtol(2 * 4, 128, steps)
    for a, b in zip(found[kind]["measurements"], found["masked_dense"]["measurements"]):
        assert {key: v for key, v in a.items() if key != "rms"} == {key: v for key, v in b.items() if key != "rms"}
        assert a["rms"] == pytest.approx(b["rms"], rel=rtol, abs=1e-12)
    hidden = {(m["width"], m["step"]): m["rms"] for m in found[kind]["measurements"]
              if m["layer"] == "hidden.1" and m["quantity"] == "act"}
    # SµPar keeps hidden activations Θ(1) across the width change on this backend too.
    assert 0.5 < hidden[(128, steps)] / hidden[(64, steps)] < 2


def test_the_backend_rule_is_one_check_worded_for_each_caller(corpus, tmp_path, capsys):
    from helpers import tiny_config
    from sparsemup.cli import main
    from sparsemup.sparse import check_backend
    from sparsemup.train import ConfigError
    from sparsemup.train.validate import validate

    with pytest.raises(ValueError, match="blocks backend runs block masks only.*mask_kind='blocks'"):
        check_backend("blocks", "rows")
    with pytest.raises(ValueError, match=r"dynamic sparsity \(rigl\) updates masked-dense weights only"):
        check_backend("rows", "rows", "rigl")
    with pytest.raises(ValueError, match="drops and regrows single weights, not blocks"):
        check_backend("masked_dense", "blocks", "set")
    check_backend("auto", "blocks")  # auto picks per layer what can run
    # sparsify: the Python words.
    with pytest.raises(ValueError, match="parameterize with mask_kind='blocks'"):
        smp.sparsify(rows_gpt(), "blocks")
    # The trainer's validation: config keys.
    with pytest.raises(ConfigError, match="set model.mask_kind = 'blocks'"):
        validate(tiny_config(corpus, "model.backend=blocks"))
    with pytest.raises(ConfigError, match="set model.backend = 'masked_dense'"):
        validate(tiny_config(corpus, "model.backend=rows", "sparsity.method=rigl"))
    # The coordinate check: its flags.
    assert main(["coord-check", "--model", "mlp", "--backend", "blocks", "--out", str(tmp_path / "x")]) == 2
    assert "add --blocks B, or use --backend rows" in capsys.readouterr().err
    assert main(["coord-check", "--model", "mlp", "--sparsity-method", "rigl", "--blocks", "8", "--backend",
                 "masked_dense", "--out", str(tmp_path / "y")]) == 2
    assert "drop --blocks" in capsys.readouterr().err


def test_masked_dense_is_a_recorded_no_op():
    model = rows_gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert smp.sparsify(model, "masked_dense") == {} and get_backends(model) == {}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="already sparsified"):
        smp.sparsify(model, "rows")


def test_the_old_dynamic_sparsity_names_still_work_with_a_warning():
    import sparsemup.dynamic
    import sparsemup.sparse

    for name in ("GMP", "SET", "RigL", "DynamicSparsity"):
        with pytest.warns(DeprecationWarning, match=f"sparsemup.sparse.{name} moved to sparsemup.dynamic.{name}"):
            assert getattr(sparsemup.sparse, name) is getattr(sparsemup.dynamic, name)
    with pytest.raises(AttributeError):
        sparsemup.sparse.NotAName  # noqa: B018
