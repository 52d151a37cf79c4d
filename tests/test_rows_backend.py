"""The row-sparse backend: the paper's unstructured masks stored compressed, same numbers as masked dense."""

import pytest
import torch

from helpers import block_gpt, known, lm_loss, rows_gpt, tokens
from sparsemup.sparse.backend import get_backends, sparsify
from sparsemup.sparse.rowsparse import index_dtype, row_columns
from tolerances import model_rtol


def test_row_columns_reads_equal_counts_only():
    mask = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0]], dtype=torch.bool)
    columns = known(row_columns(mask))
    assert columns.tolist() == [[0, 2], [1, 2]] and columns.dtype == torch.int16
    assert row_columns(torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)) is None
    assert row_columns(torch.zeros(2, 3, dtype=torch.bool)) is None
    assert index_dtype(40000) == torch.int32


def test_a_block_sparse_checkpoint_loads_into_row_sparse_layers_and_back():
    # Block masks keep equal counts per row too: a block-sparse checkpoint loads into row-sparse layers.
    x = tokens(batch=2, seq=17, vocab=64)
    blocks, rows_of_blocks = block_gpt("blocks", seed=4), block_gpt("rows", seed=4)
    assert set(get_backends(rows_of_blocks).values()) == {"rows"}
    rows_of_blocks.load_state_dict(blocks.state_dict())
    # The two kernels sum in different orders: the chained bound of the GPT's products (see tolerances).
    torch.testing.assert_close(lm_loss(rows_of_blocks, x), lm_loss(blocks, x), rtol=model_rtol(13, 352), atol=0)
    blocks.load_state_dict(rows_of_blocks.state_dict())  # and back


def test_masks_with_unequal_rows_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="mask_kind='rows'"):
        rows_gpt("rows", mask_kind="bernoulli")
    mixed = sparsify(rows_gpt(), {"blocks.1.mlp.proj.weight": "rows"})
    assert mixed["blocks.1.mlp.proj.weight"] == "rows" and mixed["blocks.0.mlp.proj.weight"] == "masked_dense"
