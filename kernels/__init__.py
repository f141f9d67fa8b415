"""Fused Triton kernels behind the model's `backend="triton"`: attention (attention.py), the router and experts
(moe.py); the vocabulary pass arrives with its issue."""

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
