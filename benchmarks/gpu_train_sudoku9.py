"""The 9x9 Sudoku model in at most 5 minutes of an H100 or H200: train to a wall-clock budget, then measure the
exact-solve rate on 1,000 held-out puzzles with unique solutions and 30-45 givens (`dgemma eval sudoku --size 9`'s).

The recipe is sized by compute. A 1.28M-parameter masked-diffusion model solved 94 % of 9x9 puzzles exactly after
about 8e15 training FLOP. Here a 1.47M-parameter DiffusionGemma (hidden 128, 6 layers, 4
experts top-2) costs 1.49 GFLOP per training example (measured with torch's FlopCounterMode: the encoder over the
83-token prompt, the no-gradient self-conditioning pass and the decoder over the 82-token canvas, backward
included), so 8e15 FLOP is 5.4M examples: 5,200 steps of 1,024. That needs 35 TFLOP/s over the ~230 s left for
training, about 7 % of an H100's dense TF32 rate; a model this narrow is bound by memory traffic and launches, so
expect 20 to 40 TFLOP/s, 0.6x to 1.2x that compute. The step count is not guessed: a probe of PROBE_S seconds
measures this GPU's step rate, the run's cosine schedule is sized to fill the budget, and the trainer's time budget
stops it anyway. The vocabulary is padded to 256 ids no puzzle uses, so that uniform-state noise mostly draws those
and a corrupted cell is told from a clean one almost as with a mask token (`--vocab 14` for the plain vocabulary).

Writes to --out: sudoku-9x9/ (the checkpoint in the layout `dgemma eval sudoku --model` reads, with its trainer state,
so `dgemma train sudoku --resume` continues the run), eval.json (the recipe, steps, FLOP, solve rates per step budget)
and train.log.

    python3 benchmarks/gpu_train_sudoku9.py --out "$OUT"               # on the GPU machine: `make gpu-train-sudoku9`
    python3 benchmarks/gpu_train_sudoku9.py --out "$OUT" --objective ar   # the equal-budget autoregressive baseline
    python benchmarks/gpu_train_sudoku9.py --dry --out build/sudoku9-dry  # the plumbing on the CPU, in seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import gpu_env

RECIPE = dict(size=9, hidden=128, layers=6, experts=4, top_k=2, batch=1024, lr=1e-3, warmup=200, denoising_steps=16)
DRY_RECIPE = RECIPE | dict(hidden=16, layers=1, experts=2, batch=4, warmup=1)
VOCAB = 256
BUDGET = {False: 285.0, True: 10.0}  # seconds from start to results, imports aside: inside 5 minutes; dry
PROBE_S = {False: 12.0, True: 1.5}  # the step-rate probe
RESERVE = {False: 40.0, True: 4.0}  # loading the checkpoint, the evaluation, the writes
PUZZLES = {False: 1000, True: 16}
EVAL_STEPS = (1, 4, 16, 32)
TARGET = 0.80  # exact solves at the shipped 16 steps


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output folder (on the GPU machine: $OUT)")
    ap.add_argument("--dry", action="store_true", help="a tiny model on the CPU for a few seconds: the plumbing")
    ap.add_argument("--objective", choices=("diffusion", "ar"), default="diffusion")
    ap.add_argument("--vocab", type=int, default=VOCAB, help=f"vocabulary size: 14 (the Sudoku tokens) to pad; {VOCAB}")
    ap.add_argument("--budget", type=float, help="seconds from start to results (default 285; dry 10)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        ap.error(f"--out {args.out} is a file, not a folder")
    args.budget = BUDGET[args.dry] if args.budget is None else args.budget
    least = 2 * PROBE_S[args.dry] + RESERVE[args.dry]
    if not least < args.budget < math.inf:
        ap.error(f"--budget {args.budget}: more than {least:g} s (the probe, some training and the evaluation)")
    if not 14 <= args.vocab <= 2**20 or args.seed < 0:
        ap.error("--vocab takes 14 to 2**20 ids, --seed a non-negative integer")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    gpu_env.importable()
    import torch

    from dgemma.errors import DgemmaError
    from dgemma.sudoku import board
    from dgemma.sudoku.train import SudokuRecipe
    from dgemma.training.trainer import train

    if not args.dry and not torch.cuda.is_available():
        print("error: this run needs a CUDA GPU; --dry runs the plumbing on the CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry else "cuda")
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 weights, TF32 matmuls: 8x the fp32 rate on Hopper
    torch.backends.cudnn.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = (args.out / "train.log").open("w")

    def log(text: str) -> None:
        print(text, flush=True)
        log_file.write(text + "\n")
        log_file.flush()

    # The held-out puzzles take the CPU 15-30 s (a solver run per blank): another process makes them during training.
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    held_out = pool.submit(board.held_out, 9, PUZZLES[args.dry], 0)
    recipe = SudokuRecipe(
        **(DRY_RECIPE if args.dry else RECIPE), objective=args.objective, vocab=args.vocab, seed=args.seed, steps=1
    )
    name = "GPU " + torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    log(f"{name}, torch {torch.__version__}; recipe {json.dumps(dataclasses.asdict(recipe))}")
    per_example = flop_per_example(recipe, device)
    params = sum(p.numel() for p in model_of(recipe).parameters())
    log(f"{params / 1e6:.2f}M parameters, {per_example / 1e9:.3f} GFLOP per training example")

    probe_s = PROBE_S[args.dry]
    with tempfile.TemporaryDirectory() as probe:  # the step rate of this GPU, this recipe
        began = time.monotonic()
        train(dataclasses.replace(recipe, steps=10**9), probe, save_every=10**9, log=lambda _: None, device=device,
              time_budget_s=probe_s)  # fmt: skip
        setup = time.monotonic() - began - probe_s  # the puzzle pool, the model, the save: the real run pays it too
        probe_steps = json.loads((Path(probe) / "trainer_state.json").read_text())["step"]
    # At least the probe's time: a slow start shortens the run rather than skipping it.
    budget = max(probe_s, args.budget - (time.monotonic() - start) - setup - RESERVE[args.dry])
    steps = max(1, int(0.97 * probe_steps / probe_s * budget))  # 3 % slack: the schedule ends before the budget
    log(f"{time.monotonic() - start:.0f} s: probe {probe_steps} steps in {probe_s:g} s (+ {setup:.1f} s setup); "
        f"{budget:.0f} s to train: {steps} steps")  # fmt: skip

    folder = args.out / ("sudoku-9x9" if args.objective == "diffusion" else "sudoku-9x9-ar")
    recipe = dataclasses.replace(recipe, steps=steps)
    began = time.monotonic()
    try:
        _, loss = train(recipe, folder, save_every=steps, log=log, device=device, time_budget_s=budget)
    except DgemmaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.monotonic() - began
    trained = json.loads((folder / "trainer_state.json").read_text())["step"]
    flop = trained * recipe.batch * per_example
    log(f"trained {trained} steps x {recipe.batch} in {seconds:.0f} s: {flop:.2e} FLOP, {flop / seconds / 1e12:.1f} "
        "TFLOP/s")  # fmt: skip

    pairs = held_out.result()
    pool.shutdown()
    results = evaluate(folder, recipe, pairs, device, log)
    solved = next((r["solved"] for r in results if r["max_steps"] in (recipe.denoising_steps, None)), float("nan"))
    report = dict(
        device=name, torch=torch.__version__, recipe=dataclasses.asdict(recipe), parameters=params,
        steps_trained=trained, train_seconds=round(seconds, 1), final_loss=loss, flop_per_example=per_example,
        train_flop=flop, tflop_per_s=flop / seconds / 1e12, puzzles=len(pairs), results=results,
        target=f">= {TARGET:.0%} exact solves at {recipe.denoising_steps} steps", met=solved >= TARGET,
        seconds_total=round(time.monotonic() - start, 1),
    )  # fmt: skip
    (args.out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"9x9, {args.objective}: {solved:.1%} exact solves on {len(pairs)} held-out puzzles (target {TARGET:.0%}); "
        f"{report['seconds_total']:.0f} s in all; checkpoint in {folder}")  # fmt: skip
    return 0


def model_of(recipe):
    from dgemma.model.model import DiffusionGemma
    from dgemma.training.trainer import init_weights

    return init_weights(DiffusionGemma(recipe.model_config()), recipe.seed)


def flop_per_example(recipe, device) -> float:
    """Training FLOP per example, counted by torch over one step of 8 examples: both objective passes and the
    self-conditioning pass (run for the whole batch once any example uses it), forward and backward."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dgemma.sudoku import board
    from dgemma.training.objective import losses, total

    model = model_of(recipe).to(device)
    B, n = 8, recipe.size
    prompt = torch.randint(board.DIGIT0, board.VOCAB_SIZE, (B, n * n + 2), device=device)
    canvas = torch.randint(board.DIGIT0, board.VOCAB_SIZE, (B, n * n + 1), device=device)
    sc = dataclasses.replace(recipe, self_conditioning=1.0)
    with FlopCounterMode(display=False) as counter:
        total(losses(model, prompt, canvas, sc, torch.Generator(device).manual_seed(0)), sc).backward()
    return counter.get_total_flops() / B


def evaluate(folder: Path, recipe, pairs, device, log) -> list[dict]:
    """Exact solves and cell accuracy per step budget (the AR baseline: greedy decoding)."""
    import torch

    from dgemma import DiffusionGemma, Pipeline
    from dgemma.sudoku.solve import score, solve, solve_greedy

    puzzles, solutions = [p for p, _ in pairs], [s for _, s in pairs]
    results = []
    if recipe.objective == "ar":
        began = time.monotonic()
        grids = solve_greedy(DiffusionGemma.from_pretrained(folder, dtype=torch.float32, device=device), puzzles)
        row = score(puzzles, solutions, grids).row()
        results.append({"max_steps": None, **row, "seconds": round(time.monotonic() - began, 1)})
    else:
        pipe = Pipeline.from_pretrained(folder, dtype=torch.float32, device=device)
        for steps in EVAL_STEPS:
            began = time.monotonic()
            grids, passes = solve(pipe, puzzles, seed=0, max_denoising_steps=steps)
            row = score(puzzles, solutions, grids, passes).row()
            results.append({"max_steps": steps, **row, "seconds": round(time.monotonic() - began, 1)})
    for r in results:
        budget = "greedy" if r["max_steps"] is None else f"{r['max_steps']} steps"
        mean = "" if r["steps"] is None else f", {r['steps']:.1f} steps per canvas"
        log(f"{budget}: {r['solved']:.1%} solved, {r['cells']:.1%} of blank cells right{mean}")
    return results


if __name__ == "__main__":
    sys.exit(main())
