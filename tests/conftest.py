import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton decides at decoration time whether to compile or interpret, so this must precede any kernel import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

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


@pytest.fixture(scope="session")
def device():
    """Where kernel tests run: the GPU when there is one, else the CPU through Triton's interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
