"""Checks a device name before anything is placed on it, so a missing GPU is one clear error, not a CUDA assert."""

from __future__ import annotations

import torch

from ..errors import DgemmaError


def resolve_device(device) -> torch.device:
    """A torch.device for `device` ("cpu", "cuda", "cuda:1", a torch.device) that this machine has."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DgemmaError(f"device {device!r} is not a device name (cpu, cuda, cuda:N)") from e
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DgemmaError(f"device {device!r}: this machine has no CUDA GPU (or torch was built without CUDA)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise DgemmaError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif resolved.type != "cpu":
        raise DgemmaError(f"device {device!r}: dgemma runs on cpu or cuda")
    return resolved
