"""The Sudoku task: generator, solver, tokens, and the shipped model solving puzzles through the real loading path."""

import json
import random

import pytest
import torch

from dgemma import DiffusionGemma, Pipeline
from dgemma.cli import main
from dgemma.errors import DgemmaError
from dgemma.model.tokenizer import Tokenizer
from dgemma.sudoku import board
from dgemma.sudoku.solve import MODELS, shipped, solve
from dgemma.sudoku.train import SudokuRecipe

# The shipped models' exact-solve rates on 1,000 held-out puzzles, seed 0 (README): by step budget, and the
# autoregressive baseline's. `floor`: 4-7 binomial standard deviations below at the 200 puzzles the test runs.
MEASURED = {4: {1: 0.107, 16: 0.992, "ar": 0.807, "floor": 0.05}, 6: {1: 0.001, 16: 0.795, "ar": 0.234, "floor": 0.12}}
EASY = [  # unique solutions: board.held_out(4, 8, seed=7, blanks=(6, 8)) and held_out(6, 4, seed=7, blanks=(10, 12))
    "0234032001033010", "0243342020040030", "4002324023100420", "0320010034020034",
    "0421024320004032", "0302003140003210", "2004100042013102", "4021104301343000",
    "023410541236034002206143015604062051", "043651651034426005000400104520560143",
    "253010061253030104142035516342024500", "001400462035245613013042020361106254",
]  # fmt: skip
SHIPPED = tuple(MEASURED)

PUZZLE_9X9 = "530070000600195000098000060800060003400803001700020006060000280000419005000080079"  # Wikipedia's
SOLVED_9X9 = "534678912672195348198342567859761423426853791713924856961537284287419635345286179"


@pytest.fixture(autouse=True, scope="module")
def restore_threads():
    """`dgemma sudoku` and `dgemma eval` set torch's thread count (--threads); leave other modules theirs."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("n", [4, 6, 9])
def test_random_grids_are_valid_and_varied(n):
    rng = random.Random(0)
    grids = [board.random_grid(n, rng) for _ in range(30)]
    assert all(board.is_valid(g) for g in grids)
    assert len({tuple(g) for g in grids}) >= 25  # 4x4 has only 288 grids, so a few repeats are expected


@pytest.mark.parametrize("n", [4, 6, 9])
def test_symmetries_keep_grids_valid_and_reach_many(n):
    rng = random.Random(1)
    grid = board.solutions([0] * (n * n), limit=1)[0]  # the lexicographically first grid
    images = [board.shuffle(grid, rng) for _ in range(200)]
    assert all(board.is_valid(g) for g in images)
    assert len({tuple(g) for g in images}) > (50 if n == 4 else 150)  # 4x4 has only 288 grids


def test_is_valid_rejects_each_broken_unit():
    grid = [int(c) for c in SOLVED_9X9]
    rows = [grid[9 * r : 9 * r + 9] for r in range(9)]
    assert board.is_valid(grid)
    assert board.is_valid(sum([rows[1], rows[0], *rows[2:]], []))  # rows swapped within a band
    assert not board.is_valid(sum([rows[3], *rows[1:3], rows[0], *rows[4:]], []))  # across bands: boxes break
    assert not board.is_valid([grid[1], grid[0], *grid[2:]])  # two cells of a row swapped: columns break
    assert not board.is_valid([*grid[:-1], 0])  # incomplete


def test_solver_counts_zero_one_and_two():
    grid = [int(c) for c in SOLVED_9X9]
    assert board.solutions(board.parse(PUZZLE_9X9)) == [grid]
    assert board.solutions([5, 5] + [0] * 79) == []  # a repeated clue
    assert len(board.solutions([0] * 16, limit=5)) == 5
    # A "deadly rectangle": two rows of one band, two columns of different stacks, digits a b / b a: two solutions.
    corners = next(
        [(r, c1), (r, c2), (r + 1, c1), (r + 1, c2)]
        for r in (0, 3, 6)
        for c1 in range(9)
        for c2 in range(c1 // 3 * 3 + 3, 9)
        if grid[r * 9 + c1] == grid[(r + 1) * 9 + c2] and grid[r * 9 + c2] == grid[(r + 1) * 9 + c1]
    )
    holes = list(grid)
    for r, c in corners:
        holes[r * 9 + c] = 0
    found = board.solutions(holes, limit=3)
    assert len(found) == 2 and grid in found and all(board.is_valid(g) for g in found)


@pytest.mark.parametrize("n", [4, 6, 9])
def test_held_out_puzzles_have_unique_solutions(n):
    lo, hi = board.BLANKS[n]
    pairs = board.held_out(n, 5, seed=3)
    assert pairs == board.held_out(n, 5, seed=3) and pairs != board.held_out(n, 5, seed=4)
    for puzzle, solution in pairs:
        assert lo <= puzzle.count(0) <= hi
        assert board.solutions(puzzle) == [solution] and board.keeps_clues(solution, puzzle)


def test_parse_and_tokenizer_round_trip(tmp_path):
    tok = Tokenizer.from_pretrained(board.build_tokenizer(tmp_path))
    assert tok.vocab_size == board.VOCAB_SIZE
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (board.PAD, board.EOS, board.BOS)
    puzzle = board.parse("1.3. ..41 0000 4312")
    assert board.fmt(puzzle) == "1030004100004312"
    assert tok.encode("1.3...410000 4312") == board.prompt_ids(puzzle)[1:-1]
    solution = [1, 4, 3, 2, 3, 2, 4, 1, 2, 1, 3, 4, 4, 3, 1, 2]
    canvas = board.canvas_ids(solution)
    assert tok.decode(canvas) == board.fmt(solution)  # <eos> skipped
    assert board.cells_of(canvas, 4) == solution
    assert board.cells_of([board.EOS, board.DIGIT0 + 9] + canvas[2:], 4)[:2] == [0, 0]  # not a 4x4 digit
    for bad in ("123", "5" + "0" * 15, "x" * 16):
        with pytest.raises(ValueError):
            board.parse(bad)


# ---------------------------------------------------------------------------------------------------------------
# The shipped model


@pytest.mark.parametrize("n", SHIPPED)
def test_shipped_checkpoints_load_through_the_loader(n):
    for path, objective in ((shipped(n), "diffusion"), (shipped(n, baseline=True), "ar")):
        files = {p.name for p in path.iterdir()}
        assert files == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"}
        model = DiffusionGemma.from_pretrained(path, dtype=torch.float32)
        assert model.config == SudokuRecipe(size=n, objective=objective).model_config()
        assert Tokenizer.from_pretrained(path).vocab_size == model.config.vocab_size
        cfg = Pipeline.from_pretrained(path, dtype=torch.float32).sampling_config()
        assert cfg.max_new_tokens == model.config.canvas_length and cfg.stop_ids == (board.EOS,)
    assert sum(p.stat().st_size for p in MODELS.rglob("*") if p.is_file()) < 5e6
    with pytest.raises(DgemmaError, match="no shipped model for 9x9"):
        shipped(9)


@pytest.mark.parametrize("n", SHIPPED)
def test_shipped_models_solve_easy_puzzles(n):
    pipe = Pipeline.from_pretrained(shipped(n), dtype=torch.float32)
    puzzles = [board.parse(p) for p in EASY if len(p) == n * n]
    grids, passes = solve(pipe, puzzles, seed=0)
    solved = [board.is_valid(g) and board.keeps_clues(g, p) for p, g in zip(puzzles, grids, strict=True)]
    assert len(puzzles) >= 4 and all(solved)
    assert all(1 <= s <= pipe.sampling_config().max_denoising_steps for s in passes)


@pytest.mark.parametrize("n", SHIPPED)
def test_eval_cli_beats_the_floor_and_the_baseline(n, capsys):
    argv = ["eval", "sudoku", "--size", str(n), "--count", "200", "--seed", "1", "--steps", "1", "16", "--baseline"]
    assert main([*argv, "--json"]) == 0
    one, sixteen, ar = json.loads(capsys.readouterr().out)
    measured = MEASURED[n]
    assert one["puzzles"] == sixteen["puzzles"] == ar["puzzles"] == 200
    assert sixteen["solved"] >= measured[16] - measured["floor"]
    assert one["solved"] <= measured[1] + 0.1
    assert sixteen["solved"] > one["solved"] + 0.5  # refinement, not one-shot prediction, solves them
    assert sixteen["solved"] > ar["solved"] + (measured[16] - measured["ar"]) / 2  # the equal-budget AR baseline
    assert sixteen["cells"] >= sixteen["solved"] and 1 <= sixteen["steps"] <= 16


def test_sudoku_cli_shows_steps_and_checks_the_answer(capsys, tmp_path):
    assert main(["sudoku", EASY[0], "--delay", "0"]) == 0
    out = capsys.readouterr().out
    assert "step 1:" in out and "valid: yes" in out and "keeps every clue: yes" in out
    assert main(["sudoku", EASY[0], "--size", "9"]) == 2
    assert main(["sudoku", "1" * 81]) == 2  # no solution: a clean error
    assert main(["sudoku", EASY[-1], "--delay", "0"]) == 0  # 6x6, with its shipped model
    assert "valid: yes" in capsys.readouterr().out
    assert main(["sudoku", "--size", "9"]) == 2  # no shipped 9x9 model
    puzzles = tmp_path / "puzzles.txt"
    puzzles.write_text("# two puzzles, one ambiguous\n" + EASY[0] + "\n" + "0" * 16 + "\n")
    assert main(["eval", "sudoku", "--puzzles", str(puzzles), "--json"]) == 0
    out = capsys.readouterr().out
    assert "skipping 1 puzzles" in out and json.loads(out.splitlines()[-1])[0]["puzzles"] == 1
