"""`dgemma sudoku`, `dgemma eval sudoku` and `dgemma train sudoku` (options in dgemma/cli.py): the embedded Sudoku
model on the command line."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from functools import partial

import torch
from rich.console import Console
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..errors import DgemmaError
from ..model.checkpoint import LOAD_DTYPES
from ..model.model import DiffusionGemma
from ..runtime.pipeline import Draft, Pipeline
from . import board
from .solve import score, shipped, solve, solve_greedy

LEGEND = "[bold]bold[/] clue  [green]green[/] accepted  [black on yellow]yellow[/] changed  [dim]dim[/] redrawn"


def render(cells: list[int], n: int, styles: list[str]) -> Text:
    br, bc = board.BOXES[n]
    text = Text()
    for r in range(n):
        if r and r % br == 0:
            text.append("┼─".join("─" * (2 * bc) for _ in range(n // bc)) + "\n", style="dim")
        for c in range(n):
            if c and c % bc == 0:
                text.append("│ ", style="dim")
            d = cells[r * n + c]
            text.append(str(d) if d else "·", style=styles[r * n + c])
            text.append(" ")
        text.append("\n")
    text.rstrip()
    return text


def draft_styles(puzzle: list[int], cells: list[int], d: Draft) -> list[str]:
    styles = []
    for i, (p, c) in enumerate(zip(puzzle, cells, strict=True)):
        style = "black on yellow" if d.changed[0, i] else "green" if d.accepted[0, i] else "dim"
        styles.append(style + (" bold" if p == c else " bold red" if p else ""))
    return styles


def solve_one(args, console: Console) -> None:
    torch.set_num_threads(args.threads)
    if args.puzzle:
        puzzle = board.parse(args.puzzle)
        n = board.size_of(len(puzzle))
        if args.size not in (None, n):
            raise DgemmaError(f"--size {args.size} but the puzzle is {n}x{n}")
    else:
        n = args.size or 4
        puzzle = board.held_out(n, 1, seed=args.seed)[0][0]
    if not board.solutions(puzzle, limit=1):
        raise DgemmaError(f"{board.fmt(puzzle)} has no solution")
    pipe = Pipeline.from_pretrained(args.model or shipped(n), dtype=LOAD_DTYPES[args.dtype])
    budget = args.max_denoising_steps or pipe.sampling_config().max_denoising_steps
    console.print(f"puzzle {board.fmt(puzzle)}: {puzzle.count(0)} blanks, up to {budget} steps", highlight=False)
    console.print(LEGEND)
    live = Live(console=console, auto_refresh=False) if console.is_terminal else None

    def on_draft(d: Draft):
        cells = board.cells_of(d.argmax[0].tolist(), n)
        accepted, changed = int(d.accepted[0, : n * n].sum()), int(d.changed[0, : n * n].sum())
        title = f"step {d.step + 1}: accepted {accepted}, changed {changed}"
        frame = Panel(render(cells, n, draft_styles(puzzle, cells, d)), title=title, expand=False)
        if live is None:
            console.print(frame)
        else:
            live.update(frame, refresh=True)
            time.sleep(args.delay)

    start = time.perf_counter()
    if live is not None:
        live.start()
    try:
        control = dict(pin_givens=args.pin_givens, digits=args.digits)
        (grid,), (steps,) = solve(
            pipe, [puzzle], seed=args.seed, on_draft=on_draft, max_denoising_steps=budget, **control
        )
    finally:
        if live is not None:
            live.stop()
    seconds = time.perf_counter() - start
    valid, clues = board.is_valid(grid), board.keeps_clues(grid, puzzle)
    styles = ["bold" if p else "green" if valid else "red" for p in puzzle]
    console.print(Panel(render(grid, n, styles), title=f"answer after {steps} of {budget} steps", expand=False))
    yes = {True: "[green]yes[/]", False: "[red]no[/]"}
    console.print(f"valid: {yes[valid]}  keeps every clue: {yes[clues]}  steps: {steps}  ({seconds:.2f} s)")
    console.print(f"answer {board.fmt(grid)}", highlight=False)


def evaluate(args, console: Console) -> None:
    torch.set_num_threads(args.threads)
    if args.puzzles:
        pairs = [(p, board.solutions(p)) for p in board.read_puzzles(args.puzzles)]
        if skipped := sum(len(s) != 1 for _, s in pairs):
            console.print(f"skipping {skipped} puzzles without a unique solution")
        pairs = [(p, s[0]) for p, s in pairs if len(s) == 1]
        if not pairs or len({len(p) for p, _ in pairs}) != 1:
            raise DgemmaError(f"{args.puzzles} needs puzzles of one size with unique solutions")
    else:
        blanks = tuple(args.blanks) if args.blanks else None
        pairs = board.held_out(args.size, args.count, seed=args.seed, blanks=blanks)
    puzzles, solutions = [p for p, _ in pairs], [s for _, s in pairs]
    n = board.size_of(len(puzzles[0]))
    pipe = Pipeline.from_pretrained(args.model or shipped(n), dtype=LOAD_DTYPES[args.dtype])
    control = dict(pin_givens=args.pin_givens, digits=args.digits)
    rows = []
    for steps in args.steps or [pipe.sampling_config().max_denoising_steps]:
        start = time.perf_counter()
        grids, passes = solve(pipe, puzzles, seed=args.seed, max_denoising_steps=steps, **control)
        result = score(puzzles, solutions, grids, passes).row()
        model = "diffusion" + "".join(f", {k.replace('_', ' ')}" for k, on in control.items() if on)
        rows.append({"model": model, "max_steps": steps, **result, "seconds": time.perf_counter() - start})
    if args.baseline:
        path = shipped(n, baseline=True) if args.baseline == "shipped" else args.baseline
        start = time.perf_counter()
        grids = solve_greedy(DiffusionGemma.from_pretrained(path, dtype=LOAD_DTYPES[args.dtype]), puzzles)
        result = score(puzzles, solutions, grids).row()
        rows.append({"model": "autoregressive", "max_steps": None, **result, "seconds": time.perf_counter() - start})
    if args.json:
        print(json.dumps(rows))
        return
    blanks = sum(p.count(0) for p in puzzles) / len(puzzles)
    table = Table(title=f"{len(puzzles)} {n}x{n} puzzles with unique solutions, {blanks:.1f} blanks on average")
    for column in ("model", "max steps", "solved", "cell accuracy", "steps/canvas", "seconds"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in rows:
        steps = "-" if r["steps"] is None else f"{r['steps']:.1f}"
        table.add_row(r["model"], str(r["max_steps"] or "greedy"), f"{r['solved']:.1%}", f"{r['cells']:.1%}", steps,
                      f"{r['seconds']:.1f}")  # fmt: skip
    console.print(table)


def train(args, console: Console) -> None:
    from ..training.trainer import train as run
    from .train import SudokuRecipe

    torch.set_num_threads(args.threads)
    blanks = tuple(args.blanks) if args.blanks else None
    recipe = SudokuRecipe(
        size=args.size, blanks=blanks, objective=args.objective, lm_weight=args.lm_weight, steps=args.steps,
        batch=args.batch, lr=args.lr, hidden=args.hidden, layers=args.layers, experts=args.experts, top_k=args.top_k,
        seed=args.seed, denoising_steps=args.denoising_steps, vocab=args.vocab,
    )  # fmt: skip
    print(json.dumps(asdict(recipe)), flush=True)
    log = partial(print, flush=True)
    _, loss = run(
        recipe, args.out, resume=args.resume, save_every=args.save_every, log=log, device=args.device,
        time_budget_s=args.time_budget,
    )  # fmt: skip
    console.print(f"final loss {loss:.4f}; checkpoint in {args.out}")


COMMANDS = {"sudoku": solve_one, "eval": evaluate, "train": train}
