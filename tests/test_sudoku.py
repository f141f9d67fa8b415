"""The Sudoku task: generator, solver, tokens, and the shipped model solving puzzles through the real loading path."""

import json
import random
import subprocess
import sys
import zipfile

import pytest
import torch

from dgemma import DiffusionGemma, Pipeline
from dgemma.model.tokenizer import Tokenizer
from dgemma.runtime import sudoku
from dgemma.runtime.cli import main
from dgemma.runtime.solve import MODELS, shipped, solve
from dgemma.runtime.train import Recipe

# The shipped 4x4 model's measured rates (README): 1,000 held-out puzzles, seed 0.
MEASURED = {1: 0.107, 16: 0.952}  # max denoising steps -> exact-solve rate (the AR baseline: 0.807)
EASY = [  # 4x4 puzzles with 6 blanks and unique solutions, from sudoku.held_out(4, 8, seed=7, blanks=(6, 6))
    "0234032021033010",
    "0243342020040032",
    "4002324023100420",
    "4320010030120234",
    "0324041340003041",
    "0342003141203010",
    "2004102042013102",
    "4021104301343000",
]

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
    grids = [sudoku.random_grid(n, rng) for _ in range(30)]
    assert all(sudoku.is_valid(g) for g in grids)
    assert len({tuple(g) for g in grids}) >= 25  # 4x4 has only 288 grids, so a few repeats are expected


@pytest.mark.parametrize("n", [4, 6, 9])
def test_symmetries_keep_grids_valid_and_reach_many(n):
    rng = random.Random(1)
    grid = sudoku.solutions([0] * (n * n), limit=1)[0]  # the lexicographically first grid
    images = [sudoku.shuffle(grid, rng) for _ in range(200)]
    assert all(sudoku.is_valid(g) for g in images)
    assert len({tuple(g) for g in images}) > (50 if n == 4 else 150)  # 4x4 has only 288 grids


def test_is_valid_rejects_each_broken_unit():
    grid = [int(c) for c in SOLVED_9X9]
    rows = [grid[9 * r : 9 * r + 9] for r in range(9)]
    assert sudoku.is_valid(grid)
    assert sudoku.is_valid(sum([rows[1], rows[0], *rows[2:]], []))  # rows swapped within a band
    assert not sudoku.is_valid(sum([rows[3], *rows[1:3], rows[0], *rows[4:]], []))  # across bands: boxes break
    assert not sudoku.is_valid([grid[1], grid[0], *grid[2:]])  # two cells of a row swapped: columns break
    assert not sudoku.is_valid([*grid[:-1], 0])  # incomplete


def test_solver_counts_zero_one_and_two():
    grid = [int(c) for c in SOLVED_9X9]
    assert sudoku.solutions(sudoku.parse(PUZZLE_9X9)) == [grid]
    assert sudoku.solutions([5, 5] + [0] * 79) == []  # a repeated clue
    assert len(sudoku.solutions([0] * 16, limit=5)) == 5
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
    found = sudoku.solutions(holes, limit=3)
    assert len(found) == 2 and grid in found and all(sudoku.is_valid(g) for g in found)


@pytest.mark.parametrize("n", [4, 6, 9])
def test_held_out_puzzles_have_unique_solutions(n):
    lo, hi = sudoku.BLANKS[n]
    pairs = sudoku.held_out(n, 5, seed=3)
    assert pairs == sudoku.held_out(n, 5, seed=3) and pairs != sudoku.held_out(n, 5, seed=4)
    for puzzle, solution in pairs:
        assert lo <= puzzle.count(0) <= hi
        assert sudoku.solutions(puzzle) == [solution] and sudoku.keeps_clues(solution, puzzle)


def test_parse_and_tokenizer_round_trip(tmp_path):
    tok = Tokenizer.from_pretrained(sudoku.build_tokenizer(tmp_path))
    assert tok.vocab_size == sudoku.VOCAB_SIZE
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (sudoku.PAD, sudoku.EOS, sudoku.BOS)
    puzzle = sudoku.parse("1.3. ..41 0000 4312")
    assert sudoku.fmt(puzzle) == "1030004100004312"
    assert tok.encode("1.3...410000 4312") == sudoku.prompt_ids(puzzle)[1:-1]
    solution = [1, 4, 3, 2, 3, 2, 4, 1, 2, 1, 3, 4, 4, 3, 1, 2]
    canvas = sudoku.canvas_ids(solution)
    assert tok.decode(canvas) == sudoku.fmt(solution)  # <eos> skipped
    assert sudoku.cells_of(canvas, 4) == solution
    assert sudoku.cells_of([sudoku.EOS, sudoku.DIGIT0 + 9] + canvas[2:], 4)[:2] == [0, 0]  # not a 4x4 digit
    for bad in ("123", "5" + "0" * 15, "x" * 16):
        with pytest.raises(ValueError):
            sudoku.parse(bad)


# ---------------------------------------------------------------------------------------------------------------
# The shipped model


def test_shipped_checkpoint_loads_through_the_loader():
    path = shipped(4)
    files = {p.name for p in path.iterdir()}
    assert files == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"}
    assert sum(p.stat().st_size for p in MODELS.rglob("*") if p.is_file()) < 5e6
    model = DiffusionGemma.from_pretrained(path, dtype=torch.float32)
    assert model.config == Recipe(size=4).model_config()
    assert Tokenizer.from_pretrained(path).vocab_size == model.config.vocab_size
    pipe = Pipeline.from_pretrained(path, dtype=torch.float32)
    cfg = pipe.sampling_config()
    assert cfg.max_new_tokens == model.config.canvas_length and cfg.stop_ids == (sudoku.EOS,)
    with pytest.raises(FileNotFoundError, match="no shipped model"):
        shipped(5)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained(shipped(4), dtype=torch.float32)


def test_shipped_model_solves_easy_puzzles(pipe):
    puzzles = [sudoku.parse(p) for p in EASY]
    grids, passes = solve(pipe, puzzles, seed=0)
    solved = [sudoku.is_valid(g) and sudoku.keeps_clues(g, p) for p, g in zip(puzzles, grids, strict=True)]
    assert sum(solved) >= len(EASY) - 1
    assert all(1 <= s <= pipe.sampling_config().max_denoising_steps for s in passes)


def test_eval_cli_beats_the_floor_and_the_baseline(capsys):
    assert main(["eval", "sudoku", "--count", "200", "--seed", "1", "--steps", "1", "16", "--baseline", "--json"]) == 0
    one, sixteen, ar = json.loads(capsys.readouterr().out)
    assert one["puzzles"] == sixteen["puzzles"] == ar["puzzles"] == 200
    assert sixteen["solved"] >= MEASURED[16] - 0.08  # 200 puzzles: about 4 binomial standard deviations
    assert sixteen["solved"] > one["solved"] + 0.2  # refinement, not one-shot prediction, solves them
    assert sixteen["solved"] > ar["solved"] + 0.05  # measured: 0.952 against 0.807 on 1,000 puzzles
    assert sixteen["cells"] >= sixteen["solved"] and 1 <= sixteen["steps"] <= 16


def test_sudoku_cli_shows_steps_and_checks_the_answer(capsys, tmp_path):
    assert main(["sudoku", EASY[0], "--delay", "0"]) == 0
    out = capsys.readouterr().out
    assert "step 1:" in out and "valid: yes" in out and "keeps every clue: yes" in out
    assert main(["sudoku", EASY[0], "--size", "9"]) == 2
    assert main(["sudoku", "1" * 81]) == 2  # no shipped 9x9 model (or an invalid puzzle): a clean error
    puzzles = tmp_path / "puzzles.txt"
    puzzles.write_text("# two puzzles, one ambiguous\n" + EASY[0] + "\n" + "0" * 16 + "\n")
    assert main(["eval", "sudoku", "--puzzles", str(puzzles), "--json"]) == 0
    out = capsys.readouterr().out
    assert "skipping 1 puzzles" in out and json.loads(out.splitlines()[-1])[0]["puzzles"] == 1


def test_wheel_ships_the_model(tmp_path):
    root = MODELS.parents[1]
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path, root]
    subprocess.run(build, check=True, capture_output=True)
    (wheel,) = tmp_path.glob("dgemma-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in shipped(4).iterdir():
        assert f"dgemma/runtime/models/sudoku-4x4/{f.name}" in names
