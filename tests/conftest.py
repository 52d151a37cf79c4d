"""Shared fixtures: determinism for every test, and the tiny corpus the trainer, sweep and demo tests read."""

import pytest
import torch

from helpers import write_corpus


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small deterministic pseudo-English corpus (two .txt files), written once per session."""
    return write_corpus(tmp_path_factory.mktemp("corpus"))

