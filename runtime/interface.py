"""The model interface the generation loop depends on: what `generate_ids`, `DeviceLoop` and `Pipeline` use, and all
they use. DiffusionGemma (model/model.py) and the engine models (runtime/engine.py) implement it; the loop reads the
capabilities a model reports (`device_loop`, `decoder_output`) instead of checking backend names or classes.

Legend: B batch, T tokens, C canvas, D hidden, V vocab.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import torch
from torch import nn

from ..model.cache import KVCache
from ..model.config import Config


@runtime_checkable
class Model(Protocol):
    config: Config
    backend: str  # a label for messages and statistics, never a switch
    device_loop: bool  # the loop's default: the sync-free DeviceLoop (kernel-backed passes) or the PyTorch loop
    decoder_output: Literal["hidden", "logits"]  # what `decode` returns
    embed_tokens: nn.Embedding  # the tied embedding table: the soft embedding and the LM head read it

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """A KV cache for `batch` rows and `max_len` positions (prompt and canvases)."""

    def encode(self, ids: torch.Tensor, cache: KVCache, attention_mask: torch.Tensor | None = None):
        """Commits ids (B, T) to the cache, causally; returns the final hidden states (B, T, D) where the model
        computes them (DiffusionGemma), or None (an engine whose encoder graph outputs only K/V)."""

    def decode(self, canvas_ids: torch.Tensor, cache: KVCache, soft: torch.Tensor | None = None) -> torch.Tensor:
        """One decoder pass over a canvas (B, C) that the loop made itself (no id check, no host sync), `soft` the
        self-conditioning soft embedding (B, C, D) or None -> final hidden states (B, C, D), or fp32 soft-capped
        logits (B, C, V) where `decoder_output` is "logits"."""

    def denoise(
        self, canvas_ids: torch.Tensor, cache: KVCache, self_conditioning: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The checked decoder pass -> fp32 soft-capped logits (B, C, V); `self_conditioning` is the previous step's
        temperature-scaled logits."""

    def logits(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (..., D) -> fp32 soft-capped logits (..., V), written into `out` where it can be."""

    def soft_embedding(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) -> the expected embedding under their softmax (..., D), in the model's dtype."""
