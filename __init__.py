"""dgemma: a compact, fast reimplementation of Google's DiffusionGemma."""

from .model.model import DiffusionGemma
from .runtime.pipeline import Pipeline

__all__ = ["DiffusionGemma", "Pipeline"]
