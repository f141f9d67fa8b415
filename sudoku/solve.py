"""Solving Sudoku with a trained checkpoint: the diffusion sampler, the greedy autoregressive baseline, the scores.

The shipped models live in sudoku/models/ as package data, in the same Hugging Face layout as any checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DgemmaError
from ..model.model import DiffusionGemma
from ..runtime.pipeline import Pipeline
from . import board

MODELS = Path(__file__).parent / "models"


def shipped(n: int, baseline: bool = False) -> Path:
    """The checkpoint folder shipped for n x n puzzles (the diffusion model, or its autoregressive baseline)."""
    path = MODELS / f"sudoku-{n}x{n}{'-ar' if baseline else ''}"
    if not (path / "config.json").exists():
        kinds = sorted(p.name for p in MODELS.glob("sudoku-*"))
        raise DgemmaError(f"no shipped model for {n}x{n} puzzles (shipped: {kinds}); pass --model DIR")
    return path


def check_size(model: DiffusionGemma, n: int) -> None:
    if model.config.canvas_length != n * n + 1:
        raise DgemmaError(f"the model's canvas holds {model.config.canvas_length} tokens, not a {n}x{n} answer + <eos>")


def check_puzzles(model: DiffusionGemma, puzzles: list[list[int]], batch: int) -> int:
    """The puzzles' common size n, checked against the model's canvas, and a usable batch size."""
    n = board.size_of_all(puzzles)
    check_size(model, n)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise DgemmaError(f"batch {batch!r}: solve at least one puzzle at a time")
    return n


def solve(
    pipe: Pipeline, puzzles: list[list[int]], *, seed: int = 0, batch: int = 500, on_draft=None,
    pin_givens: bool = False, digits: bool = False, **sampling,
):  # fmt: skip
    """Diffusion: one canvas per puzzle -> (grids, decoder passes per puzzle); `sampling` overrides the checkpoint's
    generation_config (max_denoising_steps, t_min, ...). `pin_givens` pins each clue's cell to its digit, `digits`
    restricts every blank cell to the digits 1-n (runtime/canvas.py): the sampler never changes a given and never
    puts a non-digit in a cell."""
    n = check_puzzles(pipe.model, puzzles, batch)
    grids, passes = [], []
    for i in range(0, len(puzzles), batch):
        chunk = puzzles[i : i + batch]
        rows = [board.prompt_ids(p) for p in chunk]
        pinned = [[board.DIGIT0 + d if d else -1 for d in p] for p in chunk] if pin_givens else None
        cells = list(range(board.DIGIT0 + 1, board.DIGIT0 + n + 1))
        allowed = [{j: cells for j, d in enumerate(p) if not d} for p in chunk] if digits else None
        out = pipe.generate(rows, seed=seed + i, on_draft=on_draft, pinned=pinned, allowed=allowed, **sampling)
        P = len(rows[0])
        grids += [board.cells_of(row, n) for row in out.sequences[:, P:].tolist()]
        passes += out.stats.decoder_passes
    return grids, passes


@torch.no_grad()
def solve_greedy(model: DiffusionGemma, puzzles: list[list[int]], *, batch: int = 500) -> list[list[int]]:
    """The autoregressive baseline: the encoder as a causal LM, decoded greedily one cell at a time."""
    n = check_puzzles(model, puzzles, batch)
    grids = []
    for i in range(0, len(puzzles), batch):
        prompt = torch.tensor([board.prompt_ids(p) for p in puzzles[i : i + batch]], device=model.device)
        cache = model.new_cache(prompt.shape[0], prompt.shape[1] + n * n)
        h = model.encode(prompt, cache)
        cells = []
        for _ in range(n * n):
            cells.append(model.logits(h[:, -1]).argmax(-1))
            h = model.encode(cells[-1][:, None], cache)
        grids += [board.cells_of(row, n) for row in torch.stack(cells, dim=1).tolist()]
    return grids


@dataclass
class Score:
    puzzles: int
    solved: float  # exact-solve rate: a valid grid that keeps every clue (the unique solution, for unique puzzles)
    cells: float  # accuracy over the blank cells, against the reference solution
    steps: float | None = None  # mean decoder passes per canvas (diffusion only)

    def row(self) -> dict:
        return {"puzzles": self.puzzles, "solved": self.solved, "cells": self.cells, "steps": self.steps}


def score(puzzles, solutions, grids, passes=None) -> Score:
    solved = sum(board.is_valid(g) and board.keeps_clues(g, p) for p, g in zip(puzzles, grids, strict=True))
    blanks = [
        (s[i], g[i]) for p, s, g in zip(puzzles, solutions, grids, strict=True) for i, c in enumerate(p) if c == 0
    ]
    steps = sum(passes) / len(passes) if passes else None
    return Score(len(puzzles), solved / len(puzzles), sum(a == b for a, b in blanks) / max(1, len(blanks)), steps)
