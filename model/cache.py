"""Preallocated KV cache shared by the encoder (which commits tokens) and the decoder (which only reads them).

Every layer owns a ring of R slots and position p lives in slot p % R. Full layers get R = max_len and never wrap.
Sliding layers get R = W - 1 + chunk: the W - 1 committed keys any later query can still see, plus room for one
chunk (a canvas, or a prompt piece of at most `chunk` tokens). A chunk at positions [n, n + T) therefore only
evicts positions <= n - W, which no query at or after n sees. The decoder stages its canvas K/V in the slots the
commit will later fill, without advancing `length`, so the committed prefix is never modified.

Masks come from two small tensors per layer type: the position held by each slot (-1 when empty) and a per-row
validity bit (False for left padding). Legend: B batch, T chunk tokens, R slots, S active slots.
"""

from __future__ import annotations

import copy

import torch

from ..errors import DgemmaError
from .config import FULL, SLIDING, WINDOW_MODES, Config, is_int

UNBOUNDED = 2**30  # a band edge that no position reaches; fits the kernels' int32 arithmetic


class KVCache:
    def __init__(self, config: Config, batch: int, max_len: int, *, dtype, device, window: str = "shared"):
        if window not in WINDOW_MODES:
            raise DgemmaError(f"window must be one of {WINDOW_MODES}, not {window!r}")
        if not is_int(batch) or batch < 1:
            raise DgemmaError(f"a cache holds at least one row, not batch={batch!r}")
        if not is_int(max_len) or not 0 < max_len <= config.max_position_embeddings:
            raise DgemmaError(
                f"a cache holds 1 to {config.max_position_embeddings} positions (max_position_embeddings), "
                f"not max_len={max_len!r}"
            )
        self.config, self.batch, self.max_len, self.window = config, batch, max_len, window
        self.chunk = config.canvas_length
        self.length = 0  # committed tokens
        W = config.sliding_window
        self.slots_of = {FULL: max_len, SLIDING: min(max_len, W - 1 + self.chunk)}
        self.k, self.v = [], []
        for kind in config.layer_types:
            shape = (batch, config.num_kv_heads(kind), self.slots_of[kind], config.head_dim_of(kind))
            self.k.append(torch.zeros(shape, dtype=dtype, device=device))
            self.v.append(torch.zeros(shape, dtype=dtype, device=device))
        self.pos = {kind: torch.full((R,), -1, device=device) for kind, R in self.slots_of.items()}
        self.valid = {kind: torch.zeros(batch, R, dtype=torch.bool, device=device) for kind, R in self.slots_of.items()}

    def stage(self, T: int, valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Claims the slots of positions [length, length + T); returns their indices per layer type."""
        if T > self.chunk:
            raise DgemmaError(f"a chunk of {T} tokens exceeds the cache's chunk size {self.chunk}")
        if self.length + T > self.max_len:
            raise DgemmaError(f"cache of {self.max_len} positions is full ({self.length} committed + {T})")
        device = self.pos[FULL].device
        positions = torch.arange(self.length, self.length + T, device=device)
        valid = torch.ones(self.batch, T, dtype=torch.bool, device=device) if valid is None else valid.bool()
        slots = {}
        for kind, R in self.slots_of.items():
            slots[kind] = positions % R
            self.pos[kind][slots[kind]] = positions
            self.valid[kind][:, slots[kind]] = valid
        return slots

    def fork(self) -> KVCache:
        """A copy with its own tensors: training writes a pass's K/V into a fork, since autograd forbids overwriting a
        tensor an earlier differentiable pass saved for its backward."""
        twin = copy.copy(self)
        twin.k, twin.v = [k.clone() for k in self.k], [v.clone() for v in self.v]
        twin.pos = {kind: p.clone() for kind, p in self.pos.items()}
        twin.valid = {kind: v.clone() for kind, v in self.valid.items()}
        return twin

    def commit(self, T: int):
        self.length += T

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, end: int):
        """Stores k, v (B, Hkv, T, d) in their slots; returns the active keys and values (B, Hkv, S, d)."""
        self.k[layer][:, :, slots] = k
        self.v[layer][:, :, slots] = v
        S = min(self.k[layer].shape[2], end)  # slots at or past `end` were never written
        return self.k[layer][:, :, :S], self.v[layer][:, :, :S]

    def band(self, kind: str, causal: bool) -> tuple[int, int, int, int]:
        """Every mask the model uses is a band: a query at position i sees key positions a*i + lo <= j <= b*i + hi.

        Returns (a, lo, b, hi); the fused attention kernel takes the band instead of a mask tensor.
        """
        W = self.config.sliding_window
        if causal:
            return (1, 1 - W, 1, 0) if kind == SLIDING else (0, -UNBOUNDED, 1, 0)
        if kind != SLIDING:
            return (0, -UNBOUNDED, 0, UNBOUNDED)
        # shared: every canvas query sees the same last W - 1 committed tokens (transformers' DynamicCache);
        # per_token: a symmetric window |i - j| < W (vLLM, FlashAttention, Google's JAX since July 2026).
        return (0, self.length - W + 1, 0, UNBOUNDED) if self.window == "shared" else (1, 1 - W, 1, W - 1)

    def mask(self, kind: str, T: int, causal: bool) -> torch.Tensor:
        """Which active slots each query of the staged chunk sees: (B, 1, T, S) bool."""
        n = self.length
        S = min(self.slots_of[kind], n + T)
        pos, valid = self.pos[kind][:S], self.valid[kind][:, :S]
        q = torch.arange(n, n + T, device=pos.device)[:, None]  # (T, 1)
        a, lo, b, hi = self.band(kind, causal)
        seen = (pos >= 0) & (pos < n + T) & (pos >= a * q + lo) & (pos <= b * q + hi)  # empty or stale slots fail
        return (seen & valid[:, None, :])[:, None]  # (B, 1, T, S)
