"""A training run's recipe: the hyperparameters every task shares, and what a task adds to them.

A task subclasses `Recipe` (a dataclass): its own fields (the model's size, the data's knobs), checked in its
`__post_init__` after the shared ones, and the hooks the trainer calls: `model_config` (the model it trains),
`batches` (where its (prompt, canvas) pairs come from) and `save_checkpoint` (what a checkpoint folder holds beside
the weights). The trainer saves the whole recipe in trainer_state.json and rebuilds it, with the class it was given,
to resume a run, so every field is a JSON value and is checked again when read back.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DgemmaError
from ..model.checkpoint import save_model
from ..model.config import Config, is_int, is_number
from ..model.model import DiffusionGemma

OBJECTIVES = ("diffusion", "ar")  # the block-diffusion objective, or the autoregressive baseline

# (batch size, the data RNG) -> prompts (B, P) and clean canvases (B, C) as token ids. The trainer owns the RNG and
# saves its state with the run, so a resumed run draws the batches the uninterrupted one would have drawn.
Batches = Callable[[int, random.Random], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Recipe(ABC):
    objective: str = "diffusion"  # or "ar": the autoregressive baseline
    lm_weight: float = 0.0  # weight of the encoder's causal LM loss beside the diffusion loss
    self_conditioning: float = 0.5  # probability per example of feeding the first pass's logits to the second
    eps: float = 1e-3  # t ~ U(eps, 1)
    steps: int = 4000
    batch: int = 128
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    seed: int = 0

    def __post_init__(self):
        """Checks every field (types too: a resumed run's recipe comes from a file), so a bad value stops here, named,
        instead of deep in the model or hours into a run."""
        if not isinstance(self.objective, str) or self.objective not in OBJECTIVES:
            raise DgemmaError(f"{self._name}.objective {self.objective!r}: 'diffusion' or 'ar'")
        self.check_ints(("steps", 1, None), ("batch", 1, None), ("warmup", 0, None), ("seed", 0, 2**63 - 1))
        self.check_numbers(
            ("lm_weight", 0.0, math.inf, False), ("self_conditioning", 0.0, 1.0, False), ("eps", 0.0, 1.0, True),
            ("lr", 0.0, math.inf, False), ("weight_decay", 0.0, math.inf, False),
        )  # fmt: skip
        if self.lr == 0:
            raise DgemmaError(f"{self._name}.lr 0.0: a learning rate above 0")

    @property
    def _name(self) -> str:
        return type(self).__name__

    def check_ints(self, *fields: tuple[str, int, int | None]) -> None:
        """Each (name, lowest, highest or None) field is an int (not a bool) in its range."""
        for name, lo, hi in fields:
            value = getattr(self, name)
            if not is_int(value):
                raise DgemmaError(f"{self._name}.{name} {value!r}: an integer")
            if value < lo or (hi is not None and value > hi):
                bounds = f" to {hi}" if hi is not None else " up"
                raise DgemmaError(f"{self._name}.{name} {value}: from {lo}{bounds}")

    def check_numbers(self, *fields: tuple[str, float, float, bool]) -> None:
        """Each (name, lowest, highest, whether the highest is excluded) field is a finite number in its range; an int
        becomes a float."""
        for name, lo, hi, below in fields:
            value = getattr(self, name)
            if not is_number(value):
                raise DgemmaError(f"{self._name}.{name} {value!r}: a number")
            if not math.isfinite(value) or value < lo or value > hi or (below and value == hi):
                bounds = f"below {hi}" if below else "finite" if hi == math.inf else f"at most {hi}"
                raise DgemmaError(f"{self._name}.{name} {value}: at least {lo} and {bounds}")
            setattr(self, name, float(value))

    @abstractmethod
    def model_config(self) -> Config:
        """The model a fresh run initializes, and that a resumed run's config.json must match."""

    @abstractmethod
    def batches(self) -> Batches:
        """The training data: called once per run, before anything is written, so it may check its knobs here."""

    def save_checkpoint(self, model: DiffusionGemma, folder: str | Path) -> Path:
        """A checkpoint folder DiffusionGemma.from_pretrained reads: config.json and model.safetensors. A task adds
        what its checkpoints carry beside the weights (special token ids, generation_config.json, tokenizer.json)."""
        return save_model(model, folder)
