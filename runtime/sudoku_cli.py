"""`dgemma sudoku`, `dgemma eval sudoku` and `dgemma train sudoku`: the embedded Sudoku model on the command line."""

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

from ..model.checkpoint import LOAD_DTYPES
from ..model.model import DiffusionGemma
from . import sudoku
from .pipeline import Draft, Pipeline
from .solve import score, shipped, solve, solve_greedy

THREADS = "torch threads: the small models gain nothing from more, and on 2 busy cores two threads stall"
LEGEND = "[bold]bold[/] clue  [green]green[/] accepted  [black on yellow]yellow[/] changed  [dim]dim[/] redrawn"


def add_parsers(sub) -> None:
    s = sub.add_parser("sudoku", help="solve a Sudoku puzzle, showing the canvas refine step by step")
    s.add_argument("puzzle", nargs="?", help="16, 36 or 81 characters, 0 or . for a blank (default: a random one)")
    s.add_argument("--size", type=int, choices=sorted(sudoku.BOXES), help="grid size of a random puzzle (default 4)")
    s.add_argument("--model", help="checkpoint folder (default: the shipped model for the puzzle's size)")
    s.add_argument("--steps", type=int, dest="max_denoising_steps", help="maximum denoising steps")
    s.add_argument("--seed", type=int, default=0, help="sampler seed (and the random puzzle's)")
    s.add_argument("--delay", type=float, default=0.4, help="seconds per step on a terminal, to watch it")
    s.add_argument("--dtype", choices=sorted(LOAD_DTYPES), default="fp32")
    s.add_argument("--threads", type=int, default=1, help=THREADS)

    e = sub.add_parser("eval", help="measure a task's solve rate").add_subparsers(dest="task", required=True)
    e = e.add_parser("sudoku", help="exact-solve rate, cell accuracy and steps on puzzles with unique solutions")
    e.add_argument("--puzzles", help="file with one puzzle per line (default: generated held-out puzzles)")
    e.add_argument("--size", type=int, choices=sorted(sudoku.BOXES), default=4, help="size of generated puzzles")
    e.add_argument("--count", type=int, default=1000, help="generated puzzles")
    e.add_argument("--blanks", type=int, nargs=2, metavar=("LO", "HI"), help="blank cells of generated puzzles")
    e.add_argument("--model", help="diffusion checkpoint (default: the shipped one)")
    e.add_argument("--baseline", nargs="?", const="shipped", help="also decode an autoregressive checkpoint greedily")
    e.add_argument("--steps", type=int, nargs="+", help="denoising step budgets (default: generation_config's)")
    e.add_argument("--seed", type=int, default=0, help="puzzle and sampler seed")
    e.add_argument("--dtype", choices=sorted(LOAD_DTYPES), default="fp32")
    e.add_argument("--threads", type=int, default=1, help=THREADS)
    e.add_argument("--json", action="store_true", help="print the results as JSON")

    t = sub.add_parser("train", help="train a model from scratch").add_subparsers(dest="task", required=True)
    t = t.add_parser("sudoku", help="a DiffusionGemma (or its autoregressive baseline) on generated puzzles")
    t.add_argument("--out", required=True, help="checkpoint folder, rewritten every --save-every steps")
    t.add_argument("--resume", help="continue from this folder's trainer_state.pt (to --steps)")
    t.add_argument("--size", type=int, choices=sorted(sudoku.BOXES), default=4)
    t.add_argument("--objective", choices=("diffusion", "ar"), default="diffusion")
    t.add_argument("--lm-weight", type=float, default=0.0, help="weight of the encoder's causal LM loss")
    t.add_argument("--steps", type=int, default=4000)
    t.add_argument("--batch", type=int, default=128)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--blanks", type=int, nargs=2, metavar=("LO", "HI"))
    t.add_argument("--hidden", type=int, default=64)
    t.add_argument("--layers", type=int, default=2)
    t.add_argument("--experts", type=int, default=4)
    t.add_argument("--top-k", type=int, default=2)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--denoising-steps", type=int, default=16, help="max_denoising_steps of the generation_config")
    t.add_argument("--save-every", type=int, default=500)
    t.add_argument("--threads", type=int, default=1, help=THREADS)
    t.add_argument("--device", default="cpu")


def render(cells: list[int], n: int, styles: list[str]) -> Text:
    br, bc = sudoku.BOXES[n]
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
        puzzle = sudoku.parse(args.puzzle)
        n = sudoku.size_of(len(puzzle))
        if args.size not in (None, n):
            raise ValueError(f"--size {args.size} but the puzzle is {n}x{n}")
    else:
        n = args.size or 4
        puzzle = sudoku.held_out(n, 1, seed=args.seed)[0][0]
    if not sudoku.solutions(puzzle, limit=1):
        raise ValueError(f"{sudoku.fmt(puzzle)} has no solution")
    pipe = Pipeline.from_pretrained(args.model or shipped(n), dtype=LOAD_DTYPES[args.dtype])
    budget = args.max_denoising_steps or pipe.sampling_config().max_denoising_steps
    console.print(f"puzzle {sudoku.fmt(puzzle)}: {puzzle.count(0)} blanks, up to {budget} steps", highlight=False)
    console.print(LEGEND)
    live = Live(console=console, auto_refresh=False) if console.is_terminal else None

    def on_draft(d: Draft):
        cells = sudoku.cells_of(d.argmax[0].tolist(), n)
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
        (grid,), (steps,) = solve(pipe, [puzzle], seed=args.seed, on_draft=on_draft, max_denoising_steps=budget)
    finally:
        if live is not None:
            live.stop()
    seconds = time.perf_counter() - start
    valid, clues = sudoku.is_valid(grid), sudoku.keeps_clues(grid, puzzle)
    styles = ["bold" if p else "green" if valid else "red" for p in puzzle]
    console.print(Panel(render(grid, n, styles), title=f"answer after {steps} of {budget} steps", expand=False))
    yes = {True: "[green]yes[/]", False: "[red]no[/]"}
    console.print(f"valid: {yes[valid]}  keeps every clue: {yes[clues]}  steps: {steps}  ({seconds:.2f} s)")
    console.print(f"answer {sudoku.fmt(grid)}", highlight=False)


def evaluate(args, console: Console) -> None:
    torch.set_num_threads(args.threads)
    if args.puzzles:
        pairs = [(p, sudoku.solutions(p)) for p in sudoku.read_puzzles(args.puzzles)]
        if skipped := sum(len(s) != 1 for _, s in pairs):
            console.print(f"skipping {skipped} puzzles without a unique solution")
        pairs = [(p, s[0]) for p, s in pairs if len(s) == 1]
        if not pairs or len({len(p) for p, _ in pairs}) != 1:
            raise ValueError(f"{args.puzzles} needs puzzles of one size with unique solutions")
    else:
        blanks = tuple(args.blanks) if args.blanks else None
        pairs = sudoku.held_out(args.size, args.count, seed=args.seed, blanks=blanks)
    puzzles, solutions = [p for p, _ in pairs], [s for _, s in pairs]
    n = sudoku.size_of(len(puzzles[0]))
    pipe = Pipeline.from_pretrained(args.model or shipped(n), dtype=LOAD_DTYPES[args.dtype])
    rows = []
    for steps in args.steps or [pipe.sampling_config().max_denoising_steps]:
        start = time.perf_counter()
        grids, passes = solve(pipe, puzzles, seed=args.seed, max_denoising_steps=steps)
        result = score(puzzles, solutions, grids, passes).row()
        rows.append({"model": "diffusion", "max_steps": steps, **result, "seconds": time.perf_counter() - start})
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
    from .train import Recipe
    from .train import train as run

    torch.set_num_threads(args.threads)
    blanks = tuple(args.blanks) if args.blanks else None
    recipe = Recipe(
        size=args.size, blanks=blanks, objective=args.objective, lm_weight=args.lm_weight, steps=args.steps,
        batch=args.batch, lr=args.lr, hidden=args.hidden, layers=args.layers, experts=args.experts, top_k=args.top_k,
        seed=args.seed, denoising_steps=args.denoising_steps,
    )  # fmt: skip
    print(json.dumps(asdict(recipe)), flush=True)
    log = partial(print, flush=True)
    _, loss = run(recipe, args.out, resume=args.resume, save_every=args.save_every, log=log, device=args.device)
    console.print(f"final loss {loss:.4f}; checkpoint in {args.out}")


COMMANDS = {"sudoku": solve_one, "eval": evaluate, "train": train}
