"""Fused Triton kernels behind `backend="triton"`, one module per op: `attention` (norm_rope and attention over the
KV cache), `moe` (route, align and the expert GEMMs), `vocab` (vocab_pass: the LM head, sampling statistics and soft
embedding of a denoising step) and `sampler` (sampler_step: the step's acceptance, renoise and stop test). Each is
tested in tests/test_<op>.py (the sampler's in tests/test_sampler_kernel.py) and timed by benchmarks/bench_<op>.py;
common.py holds what they share, aot.py compiles every launch for sm_90a."""

from __future__ import annotations

import os

import torch


def require_triton(device) -> None:
    """Raises a clear error when the Triton backend cannot run on `device`."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise RuntimeError("the triton backend needs the triton package: pip install 'dgemma[triton]'") from e
    interpret = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")
    if torch.device(device).type != "cuda" and not interpret:
        raise RuntimeError(
            f"the triton backend runs on a CUDA device, not {device!r}; to run its kernels on the CPU (slowly, for "
            "testing) set TRITON_INTERPRET=1 in the environment before Python starts"
        )
