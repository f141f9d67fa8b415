import pytest
import torch

from dgemma.model.config import Config

from oracle import build_checkpoint


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(42)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random checkpoint folder written by transformers (config, weights, generation config, tokenizer)."""
    path = tmp_path_factory.mktemp("tiny")
    build_checkpoint(path, Config.tiny(), seed=1)
    return path
