"""A checkpoint as the model to run: the reference DiffusionGemma, with fp8 expert storage (fp8.py) and the fused
Triton layers (fused.py) swapped in as asked. Everything that loads a model to run it comes through `load_model`."""

from __future__ import annotations

import torch

from ..errors import DgemmaError
from . import fp8
from .config import BACKENDS
from .device import resolve_device
from .model import DiffusionGemma

EXPERT_BANKS = ("experts.gate_up_proj", "experts.down_proj")  # what expert_dtype="fp8" quantizes


def load_model(
    path, *, dtype=torch.bfloat16, device="cpu", window="shared", backend="torch", expert_dtype=None
) -> DiffusionGemma:
    """The checkpoint folder `path` as a DiffusionGemma in `dtype` on `device`.

    backend "triton" swaps in the fused kernels' layers (fused.use_kernels). expert_dtype None keeps the expert banks
    in `dtype`; "fp8" quantizes each bank on `device` as it loads (fp8.quantize), so the full-precision banks never
    all sit in memory at once."""
    if expert_dtype not in (None, "fp8"):
        raise DgemmaError(f"expert_dtype must be None or 'fp8', not {expert_dtype!r}")
    if backend not in BACKENDS:
        raise DgemmaError(f"backend must be one of {BACKENDS}, not {backend!r}")
    if backend == "triton":
        from ..kernels import require_triton

        require_triton(resolve_device(device))
    scales = {}

    def quantize(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if not name.endswith(EXPERT_BANKS):
            return tensor
        tensor, scales[name] = fp8.quantize(tensor)
        return tensor

    model = DiffusionGemma.from_pretrained(
        path, dtype=dtype, device=device, window=window, transform=quantize if expert_dtype == "fp8" else None
    )
    if expert_dtype == "fp8":
        for i, layer in enumerate(model.layers):
            fp8.store_fp8(layer.experts, *(scales[f"layers.{i}.{bank}"] for bank in EXPERT_BANKS))
    if backend == "triton":
        from .fused import use_kernels  # imports Triton, which a CPU-only install may not have

        use_kernels(model)
    return model
