"""dgemma: a compact, fast reimplementation of Google's DiffusionGemma.

`DiffusionGemma`, `load_model` and `Pipeline` are imported on first use, so the command line's `dgemma --help` and
the torch-free modules (`dgemma.errors`, `dgemma.model.config`) load without torch.
"""

import importlib

__all__ = ["DiffusionGemma", "Pipeline", "load_model"]
_HOMES = {"DiffusionGemma": ".model.model", "Pipeline": ".runtime.pipeline", "load_model": ".model.load"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
