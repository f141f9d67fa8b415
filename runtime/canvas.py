"""Pinned and constrained canvas positions: infill, forms, a Sudoku's givens.

A generated position (0 = the first token after the prompt) may be restricted to a set of token ids; a pinned
position is one restricted to a single id. The sampler then works as usual over the rest, and at a restricted
position: its logits outside the set are masked before the softmax (so its argmax, sample, entropy and the soft
embedding fed back as self-conditioning come from the set alone: a pinned position has entropy 0 and the one-hot
embedding of its token, and the confidence stop test averages the entropy over the positions not pinned), and every
uniform draw of a canvas (the first canvas, each renoise) is mapped into the set
as set[draw % len(set)], which keeps the draws' count and order (and the reference's transformers order) unchanged
and is uniform over the set up to V mod len(set) of V (a few in 262,144). So a restricted position only ever holds
an allowed id, and a pinned one its token, at every step.

Legend: B batch, C canvas, V vocabulary, N restricted positions of a canvas, M the largest set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import DgemmaError
from ..model.config import is_int

MASKED = -1.0e30  # a masked logit: exp(MASKED - max) is 0, and it stays finite (no 0 * inf in the entropy)


@dataclass
class Restriction:
    """The restricted positions of one canvas: rows (N,), cols (N,), ids (N, M) padded with each set's first id,
    counts (N,)."""

    rows: torch.Tensor
    cols: torch.Tensor
    ids: torch.Tensor
    counts: torch.Tensor

    def free(self, B: int, C: int) -> torch.Tensor:
        """(B,) the positions of each row not pinned: the confidence test's mean entropy is over these (a pinned
        position's entropy is 0, which would stop a canvas early)."""
        pinned = torch.bincount(self.rows[self.counts == 1], minlength=B)
        return (C - pinned).clamp(min=1)

    def mask_(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, C, V): every logit of a restricted position outside its set becomes MASKED, in place."""
        kept = z[self.rows, self.cols].gather(-1, self.ids)  # (N, M)
        z[self.rows, self.cols] = MASKED
        z[self.rows[:, None], self.cols[:, None], self.ids] = kept
        return z

    def project_(self, canvas: torch.Tensor) -> torch.Tensor:
        """canvas (B, C) of uniform draws: each restricted position takes set[draw % len(set)], in place."""
        draw = canvas[self.rows, self.cols]
        canvas[self.rows, self.cols] = self.ids.gather(1, (draw % self.counts)[:, None]).squeeze(1)
        return canvas

    def bitset(self, B: int, C: int, V: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For the fused vocabulary pass: a row index (B*C,) int32 into the bits, -1 where unrestricted, and the
        allowed ids as bits (N, ceil(V / 32)) int32 (8 MB for a whole 256-position canvas at V = 262,144)."""
        device = self.ids.device
        index = torch.full((B * C,), -1, dtype=torch.int32, device=device)
        index[self.rows * C + self.cols] = torch.arange(len(self.rows), dtype=torch.int32, device=device)
        words = torch.zeros(len(self.rows), math.ceil(V / 32), dtype=torch.int64, device=device)
        real = torch.arange(self.ids.shape[1], device=device) < self.counts[:, None]  # not the padding repeats
        words.scatter_add_(1, self.ids // 32, torch.where(real, 1 << (self.ids % 32), 0))  # distinct bits: a sum is OR
        return index, torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # bit 31 as int32's sign


class CanvasControl:
    """Restricted positions of a generation, by canvas: built from `pinned` and `allowed` (see `build`)."""

    def __init__(self, by_canvas: dict[int, Restriction]):
        self.by_canvas = by_canvas

    def at(self, k: int) -> Restriction | None:
        return self.by_canvas.get(k)

    @classmethod
    def build(cls, pinned, allowed, *, rows: int, C: int, canvases: int, V: int, device) -> CanvasControl | None:
        """`pinned`: token ids of the generated positions, -1 where free: one list for every row, or one per row.
        `allowed`: {position: [token ids]}: one dict for every row, or one per row. Positions count from the first
        generated token and may reach into later canvases, up to the canvases generated. Returns None when neither
        restricts anything; refuses (DgemmaError) a template past the canvases, ids outside the vocabulary, an empty
        set, and a pinned token its position's allowed set excludes."""
        length = canvases * C
        sets: list[dict[int, list[int]]] = [{} for _ in range(rows)]
        for r, template in enumerate(_per_row(pinned, rows, "pinned", list)):
            if template is None:
                continue
            if len(template) > length:
                raise DgemmaError(f"pinned holds {len(template)} positions; {canvases} canvas(es) of {C} hold {length}")
            for position, token in enumerate(template):
                if not is_int(token) or not -1 <= token < V:
                    raise DgemmaError(f"pinned[{position}] must be a token id in [0, {V}) or -1 (free), not {token!r}")
                if token >= 0:
                    sets[r][position] = [token]
        for r, spec in enumerate(_per_row(allowed, rows, "allowed", dict)):
            for position, ids in (spec or {}).items():
                if not is_int(position) or not 0 <= position < length:
                    raise DgemmaError(f"allowed position {position!r} is not one of the {length} generated positions")
                if not isinstance(ids, (list, tuple)) or not ids:
                    raise DgemmaError(f"allowed[{position}] must be a non-empty list of token ids, not {ids!r}")
                if not all(is_int(i) and 0 <= i < V for i in ids):
                    raise DgemmaError(f"allowed[{position}] holds ids outside the vocabulary [0, {V}): {ids}")
                ids = sorted(set(ids))
                if position in sets[r] and sets[r][position][0] not in ids:
                    token = sets[r][position][0]
                    raise DgemmaError(f"position {position} is pinned to {token}, which its allowed set excludes")
                sets[r].setdefault(position, ids)
        by_canvas = {}
        for k in sorted({p // C for row in sets for p in row}):  # only canvases with restricted positions
            entries = [(r, p - k * C, ids) for r in range(rows) for p, ids in sorted(sets[r].items()) if p // C == k]
            width = max(len(ids) for _, _, ids in entries)
            by_canvas[k] = Restriction(
                rows=torch.tensor([r for r, _, _ in entries], device=device),
                cols=torch.tensor([c for _, c, _ in entries], device=device),
                ids=torch.tensor([ids + [ids[0]] * (width - len(ids)) for _, _, ids in entries], device=device),
                counts=torch.tensor([len(ids) for _, _, ids in entries], device=device),
            )
        return cls(by_canvas) if by_canvas else None


def _per_row(value, rows: int, name: str, kind: type) -> list:
    """One value for every row, or a list of one per row (None: nothing)."""
    if value is None:
        return [None] * rows
    if isinstance(value, kind) and not (kind is list and value and isinstance(value[0], list)):
        return [value] * rows
    if isinstance(value, list) and len(value) == rows and all(v is None or isinstance(v, kind) for v in value):
        return value
    want = "a list of token ids" if kind is list else "a {position: [token ids]} dict"
    raise DgemmaError(f"{name} must be {want}, or a list of {rows} of them (one per row), not {value!r}")
