import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton decides at decoration time whether to compile or interpret, so this must precede any kernel import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dgemma.model.cache import KVCache
from dgemma.model.config import FULL, Config

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


@pytest.fixture(scope="session")
def real_config():
    """google/diffusiongemma-26B-A4B-it's config: the shapes of the GPU tests."""
    return Config.diffusiongemma_26b_a4b()


@pytest.fixture(scope="session")
def cache_at():
    """A KVCache factory: cache_at(config, batch, n, T, *, pad=0, extra=0, dtype, device, window) commits n tokens
    in chunks of at most the cache's chunk, then stages a chunk of T (the next canvas or prompt piece); every row
    after the first is left-padded by `pad` positions (not valid); the cache holds `extra` positions beyond n + T."""

    def make(config, batch, n, T, *, pad=0, extra=0, **kwargs):
        cache = KVCache(config, batch, n + T + extra, **kwargs)

        def stage(c):
            device = cache.pos[FULL].device
            valid = (torch.arange(cache.length, cache.length + c, device=device) >= pad).expand(batch, c).clone()
            valid[0] = True
            cache.stage(c, valid)

        while cache.length < n:
            c = min(cache.chunk, n - cache.length)
            stage(c)
            cache.commit(c)
        stage(T)
        return cache

    return make


@pytest.fixture
def one_thread():
    """Tiny steps: a second OpenMP thread only adds synchronization, and stalls when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
