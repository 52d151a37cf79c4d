"""The row-sparse backend: the paper's unstructured masks stored compressed, same numbers as masked dense."""

import copy
import pickle

import pytest
import torch

import sparsemup as smp
from helpers import assert_state_dicts_convert_both_ways, block_gpt, lm_loss, tokens, train_steps
from sparsemup.models import GPTConfig, build_gpt
from sparsemup.sparse.backend import get_backends, sparsify
from sparsemup.sparse.rowsparse import RowSparseLinear, index_dtype, row_layout


def rows_gpt(backend=None, density=0.25, width=128, seed=1, mask_kind="rows"):
    """A GPT with the paper's row-exact masks over a base of 64, sparsified to ``backend`` if given."""
    cfg = GPTConfig(vocab_size=64, width=width, depth=2, head_dim=32, context=16)
    model, _ = build_gpt(cfg, 64, scheme="supar", density=density, mask_kind=mask_kind, seed=seed)
    if backend:
        smp.sparsify(model, backend)
    return model


def test_row_layout_reads_equal_counts_only():
    mask = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0]], dtype=torch.bool)
    assert row_layout(mask).tolist() == [[0, 2], [1, 2]] and row_layout(mask).dtype == torch.int16
    assert row_layout(torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)) is None
    assert row_layout(torch.zeros(2, 3, dtype=torch.bool)) is None
    assert index_dtype(40000) == torch.int32


def test_sparsify_trains_like_masked_dense_with_rho_memory():
    dense, sparse = rows_gpt(), rows_gpt("rows")
    assert set(get_backends(sparse).values()) == {"rows"}
    assert all(isinstance(sparse.get_submodule(n.rpartition(".")[0]), RowSparseLinear) for n in get_backends(sparse))
    x = tokens(batch=3, seq=17, vocab=64)
    torch.testing.assert_close(lm_loss(sparse, x), lm_loss(dense, x), rtol=1e-5, atol=1e-6)
    opts = [smp.make_optimizer(m, torch.optim.AdamW, lr=1e-2, weight_decay=0.1) for m in (dense, sparse)]
    assert [g["lr"] for g in opts[0].param_groups] == [g["lr"] for g in opts[1].param_groups]
    for model, opt in zip((dense, sparse), opts):
        train_steps(model, opt, 4, x, clip=1.0)
    torch.testing.assert_close(lm_loss(sparse, x), lm_loss(dense, x), rtol=1e-4, atol=1e-5)
    for name in get_backends(sparse):
        layer = sparse.get_submodule(name.rpartition(".")[0])
        torch.testing.assert_close(layer.dense_weight(), dense.get_parameter(name).detach(), rtol=1e-3, atol=5e-5)
        # Weights + AdamW state + index: ≤ 1.25 ρ of a dense fp32 weight with its two moments (12 bytes an entry).
        state = opts[1].state[layer.weight]
        stored = sum(t.numel() * t.element_size() for t in (layer.weight, state["exp_avg"], state["exp_avg_sq"],
                                                              layer.weight_index))
        density = smp.get_parameterization(sparse).info(name).density
        assert stored <= 1.25 * density * 12 * layer.in_features * layer.out_features


def test_state_dicts_convert_both_ways_and_across_sparse_storages():
    x = assert_state_dicts_convert_both_ways(lambda backend, seed: rows_gpt(backend and "rows", seed=seed))
    # Block masks keep equal counts per row too: a block-sparse checkpoint loads into row-sparse layers.
    blocks, rows_of_blocks = block_gpt("blocks", seed=4), block_gpt("rows", seed=4)
    assert set(get_backends(rows_of_blocks).values()) == {"rows"}
    rows_of_blocks.load_state_dict(blocks.state_dict())
    torch.testing.assert_close(lm_loss(rows_of_blocks, x), lm_loss(blocks, x), rtol=1e-5, atol=1e-6)
    blocks.load_state_dict(rows_of_blocks.state_dict())  # and back


def test_another_layout_is_refused_before_any_copy():
    sparse, other = rows_gpt("rows", seed=1), rows_gpt(seed=2)
    before = {k: v.clone() for k, v in sparse.state_dict().items()}
    with pytest.raises(ValueError, match="mask is not this layer's"):
        sparse.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="sit elsewhere"):
        sparse.load_state_dict(rows_gpt("rows", seed=2).state_dict())
    assert all(torch.equal(before[k], v) for k, v in sparse.state_dict().items())


def test_masks_with_unequal_rows_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="mask_kind='rows'"):
        rows_gpt("rows", mask_kind="bernoulli")
    mixed = sparsify(rows_gpt(), {"blocks.1.mlp.proj.weight": "rows"})
    assert mixed["blocks.1.mlp.proj.weight"] == "rows" and mixed["blocks.0.mlp.proj.weight"] == "masked_dense"


def test_copies_export_and_bf16_autocast():
    sparse = rows_gpt("rows")
    x = tokens(batch=2, seq=17, vocab=64)
    want = lm_loss(sparse, x)
    for clone in (copy.deepcopy(sparse), pickle.loads(pickle.dumps(sparse))):
        torch.testing.assert_close(lm_loss(clone, x), want)
    plain = smp.export(sparse)
    assert not any(isinstance(m, RowSparseLinear) for m in plain.modules())
    torch.testing.assert_close(lm_loss(plain, x), want, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = lm_loss(sparse, x)
    assert abs(float(low) - float(want)) < 0.05 * float(want)  # bf16 storage of activations, fp32 accumulation


def test_coordinate_check_on_the_row_backend_measures_what_masked_dense_does(tmp_path, capsys):
    import json

    from sparsemup.cli import main

    found = {}
    for backend in ("rows", "masked_dense"):
        out = tmp_path / backend
        args = ["coord-check", "--model", "mlp", "--widths", "64,128", "--densities", "0.25", "--seeds", "1",
                "--base-width", "32", "--steps", "2", "--backend", backend, "--out", str(out)]
        assert main(args) == 0
        found[backend] = json.loads((out / "coord.json").read_text())
    assert found["rows"]["settings"]["backend"] == "rows" and found["rows"]["settings"]["masks"] == "rows"
    assert len(found["rows"]["measurements"]) == len(found["masked_dense"]["measurements"]) > 0
    for a, b in zip(found["rows"]["measurements"], found["masked_dense"]["measurements"]):
        assert {k: v for k, v in a.items() if k != "rms"} == {k: v for k, v in b.items() if k != "rms"}
        assert a["rms"] == pytest.approx(b["rms"], rel=1e-3, abs=1e-7)
    capsys.readouterr()
    assert main(["coord-check", "--model", "mlp", "--backend", "blocks", "--out", str(tmp_path / "x")]) == 2
    assert "--backend blocks runs block masks: add --blocks B" in capsys.readouterr().err
