"""The 9x9 GPU recipe's pieces on the CPU: the trainer's wall-clock budget, the padded vocabulary, the batched puzzle
draws, and `gpu_train_sudoku9.py --dry` end to end (a checkpoint that `dgemma eval sudoku` reads, and its numbers).
No 9x9 model is trained here: that takes a GPU (README, "GPU check")."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dgemma import Pipeline
from dgemma.cli import main
from dgemma.errors import DgemmaError
from dgemma.model.tokenizer import Tokenizer
from dgemma.sudoku import board
from dgemma.sudoku.solve import shipped
from dgemma.sudoku.train import Puzzles, SudokuRecipe
from dgemma.training.trainer import train

ROOT = Path(__file__).parent.parent
TINY = dict(size=4, hidden=16, layers=1, experts=2, top_k=1, batch=4, warmup=1)


def quiet(_):
    pass


def state(folder: Path) -> dict:
    return json.loads((folder / "trainer_state.json").read_text())


def test_a_time_budget_stops_saves_and_resumes(tmp_path):
    lines = []
    recipe = SudokuRecipe(**TINY, steps=100_000)
    train(recipe, tmp_path, log=lines.append, time_budget_s=0.5)
    stopped = state(tmp_path)["step"]
    assert 0 < stopped < 100_000 and state(tmp_path)["recipe"]["steps"] == 100_000
    assert lines[-1] == f"time budget of 0.5 s reached at step {stopped}/100000: saved, resumable"
    train(SudokuRecipe(**TINY, steps=stopped + 3), tmp_path, resume=tmp_path, log=quiet, time_budget_s=60)
    assert state(tmp_path)["step"] == stopped + 3  # the budget is a bound, not a target: the run ends at its steps


@pytest.mark.parametrize("budget", [0, -1.0, float("inf"), float("nan"), True, "60"])
def test_a_bad_time_budget_is_refused_before_anything_is_written(tmp_path, budget):
    with pytest.raises(DgemmaError, match="time_budget_s"):
        train(SudokuRecipe(**TINY, steps=1), tmp_path / "out", log=quiet, time_budget_s=budget)
    assert not (tmp_path / "out").exists()


def test_a_padded_vocabulary_reaches_the_model_and_the_tokenizer(tmp_path):
    recipe = SudokuRecipe(**TINY, steps=2, vocab=40)
    model, _ = train(recipe, tmp_path, log=quiet)
    assert model.config.vocab_size == 40
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.vocab_size == 40 and tok.decode([board.DIGIT0 + 3, 39, board.DIGIT0 + 1]) == "31"  # unused ids skip
    pipe = Pipeline.from_pretrained(tmp_path, dtype=torch.float32)
    assert pipe.model.config.vocab_size == 40


def test_the_default_vocabulary_writes_the_shipped_tokenizer(tmp_path):
    board.build_tokenizer(tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (shipped(4) / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("vocab", [13, 2**20 + 1, 14.0, True])
def test_a_vocabulary_without_room_for_the_sudoku_tokens_is_refused(vocab):
    with pytest.raises(DgemmaError, match="SudokuRecipe.vocab"):
        SudokuRecipe(**TINY, vocab=vocab)


@pytest.mark.parametrize("n", [4, 6, 9])
def test_batched_puzzles_are_valid_blanked_in_range_and_reproducible(n):
    recipe = SudokuRecipe(size=n)
    puzzles = Puzzles(recipe)
    prompts, canvases = puzzles.batch(300, random.Random(1))
    assert prompts.shape == (300, n * n + 2) and canvases.shape == (300, n * n + 1)
    assert (prompts[:, 0] == board.BOS).all() and (prompts[:, -1] == board.SEP).all()
    assert (canvases[:, -1] == board.EOS).all()
    lo, hi = board.BLANKS[n]
    solutions = (canvases[:, :-1] - board.DIGIT0).tolist()
    for puzzle, solution in zip((prompts[:, 1:-1] - board.DIGIT0).tolist(), solutions, strict=True):
        assert board.is_valid(solution) and board.keeps_clues(solution, puzzle)
        assert lo <= puzzle.count(0) <= hi
    assert len({tuple(s) for s in solutions}) > (150 if n == 4 else 290)  # 4x4 has 288 grids: ~186 expected
    blanks = [p.count(0) for p in (prompts[:, 1:-1] - board.DIGIT0).tolist()]
    assert min(blanks) == lo and max(blanks) == hi  # both ends of the range are drawn
    again = puzzles.batch(300, random.Random(1))
    assert torch.equal(again[0], prompts) and torch.equal(again[1], canvases)
    rng = random.Random(1)
    assert not torch.equal(puzzles.batch(300, rng)[1], puzzles.batch(300, rng)[1])


def test_batched_puzzles_relabel_the_digits():
    """From a pool of one grid, the first cell takes every digit: the relabelling symmetry is drawn."""
    puzzles = Puzzles(SudokuRecipe(size=9))
    puzzles.pool = puzzles.pool[:1]
    _, canvases = puzzles.batch(500, random.Random(0))
    assert set((canvases[:, 0] - board.DIGIT0).tolist()) == set(range(1, 10))


def test_cli_train_takes_a_time_budget_and_a_vocabulary(tmp_path, capsys):
    out, bad = tmp_path / "run", tmp_path / "bad"
    args = ["train", "sudoku", "--size", "4", "--steps", "100000", "--batch", "4", "--hidden", "16", "--layers", "1"]
    assert main([*args, "--vocab", "32", "--time-budget", "0.5", "--out", str(out)]) == 0
    assert "time budget of 0.5 s reached" in capsys.readouterr().out
    assert state(out)["recipe"]["vocab"] == 32 and state(out)["step"] < 100_000
    for value in ("0", "nan", "-5"):
        with pytest.raises(SystemExit) as exit:
            main([*args, "--time-budget", value, "--out", str(bad)])
        assert exit.value.code == 2 and "--time-budget: must be a positive number" in capsys.readouterr().err
    assert main([*args, "--vocab", "13", "--out", str(bad)]) == 2
    assert "SudokuRecipe.vocab 13" in capsys.readouterr().err
    assert not bad.exists()


def gpu_train(*args, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_train_sudoku9.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def test_the_dry_run_writes_a_checkpoint_that_eval_reads_and_its_numbers(tmp_path, capsys):
    run = gpu_train("--dry", "--out", tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    folder = tmp_path / "sudoku-9x9"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "sudoku-9x9", "train.log"]
    assert len(list(folder.iterdir())) == 6  # with eval.json and train.log: the 8 files $OUT brings back
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["recipe"]["size"] == 9 and report["recipe"]["vocab"] == 256
    assert report["steps_trained"] == state(folder)["step"] >= 1 and report["flop_per_example"] > 0
    assert [r["max_steps"] for r in report["results"]] == [1, 4, 16, 32]
    assert all(r["puzzles"] == 16 and 0 <= r["solved"] <= 1 for r in report["results"])
    assert report["met"] is False  # a few seconds of a tiny model solve nothing
    assert "exact solves on 16 held-out puzzles (target 80%)" in (tmp_path / "train.log").read_text()
    assert (
        main(["eval", "sudoku", "--model", str(folder), "--size", "9", "--count", "3", "--steps", "2", "--json"]) == 0
    )
    (result,) = json.loads(capsys.readouterr().out)
    assert result["puzzles"] == 3 and result["max_steps"] == 2


@pytest.mark.parametrize(
    "args, words",
    [
        (["--out", "FILE"], "is a file, not a folder"),
        (["--out", "DIR", "--vocab", "13"], "--vocab takes 14"),
        (["--out", "DIR", "--budget", "10"], "--budget 10.0: more than"),
        (["--out", "DIR", "--dry", "--budget", "inf"], "--budget inf"),
        (["--out", "DIR", "--seed", "-1"], "--seed"),
        (["--out", "DIR", "--objective", "mlm"], "invalid choice"),
    ],
)
def test_gpu_train_refuses_bad_input_with_status_2(tmp_path, args, words):
    (tmp_path / "file").write_text("")
    paths = {"FILE": tmp_path / "file", "DIR": tmp_path / "out"}
    run = gpu_train(*(paths.get(a, a) for a in args), timeout=60)
    assert run.returncode == 2 and words in run.stderr, run.stderr
    assert not (tmp_path / "out").exists()
