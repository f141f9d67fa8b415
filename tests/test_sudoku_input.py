"""Sudoku input the user controls (puzzle text, puzzle files, puzzle lists, blank counts) fails with a DgemmaError that
names it, and generating puzzles stops on blank counts no puzzle with a unique solution can have."""

import random
import time

import pytest
import torch

from dgemma import DiffusionGemma, Pipeline
from dgemma.errors import DgemmaError
from dgemma.sudoku import board
from dgemma.sudoku.solve import shipped, solve, solve_greedy

EASY_4X4 = "0234032001033010"  # unique solution
EASY_6X6 = "023410541236034002206143015604062051"
FEWEST_4X4 = "0100000004010030"  # 4 clues, a unique solution: board.MIN_CLUES[4]
FEWEST_6X6 = "000100000003003040000600020005060000"  # 8 clues, a unique solution: board.MIN_CLUES[6]


@pytest.mark.parametrize(
    "text, words",
    [
        ("123", "16, 36 or 81 cells (4x4, 6x6, 9x9), not 3: '123'"),
        ("0" * 17, "not 17"),
        ("5" + "0" * 15, "not '5' (cell 1)"),
        ("0" * 15 + "x", "not 'x' (cell 16)"),
        ("٣" + "0" * 15, "not '٣' (cell 1)"),  # an Arabic-Indic 3: str.isdigit() accepts it
        ("１" + "0" * 15, "not '１' (cell 1)"),  # a full-width 1
        ("11" + "0" * 14, "digit 1 twice in row 1 (cells 1 and 2)"),
        ("10001000" + "0" * 8, "digit 1 twice in column 1 (cells 1 and 5)"),
        ("10000100" + "0" * 8, "digit 1 twice in box 1 (cells 1 and 6)"),
    ],
)
def test_parse_refuses_bad_puzzles_naming_them(text, words):
    with pytest.raises(DgemmaError) as e:
        board.parse(text)
    assert words in str(e.value)


def test_parse_accepts_what_it_should():
    assert "٣".isdigit()  # why parse checks against ASCII digits, not with isdigit
    assert board.fmt(board.parse(" 0234 0320\t0103 3010\n")) == EASY_4X4
    assert board.repeated(board.parse(EASY_6X6)) is None
    with pytest.raises(DgemmaError, match="not int"):
        board.parse(1234)


def test_read_puzzles_names_the_file_and_line(tmp_path):
    path = tmp_path / "puzzles.txt"
    path.write_bytes(b"\xef\xbb\xbf# a byte-order mark, a comment and a blank line\n\n" + EASY_4X4.encode() + b"\n")
    assert board.read_puzzles(path) == [board.parse(EASY_4X4)]
    cases = [
        (f"# fine\n{EASY_4X4}\n".encode() + b"\xff\xfe" + b"0" * 14, "line 3: not UTF-8 text (byte 0xff)"),
        (b"", "holds no puzzles"),
        (b"# only a comment\n\n", "holds no puzzles"),
        (f"{EASY_4X4}\n\n{EASY_4X4[:-1]}9\n".encode(), "line 3: a 4x4 puzzle holds the digits 1-4"),
        (f"{EASY_4X4}\n{'1' * 16}\n".encode(), "line 2: digit 1 twice in row 1"),
        (f"#\n{EASY_4X4}\n{EASY_6X6}\n".encode(), "line 3: a 6x6 puzzle, but line 2 is 4x4"),
    ]
    for data, words in cases:
        path.write_bytes(data)
        with pytest.raises(DgemmaError) as e:
            board.read_puzzles(path)
        assert f"{path}" in str(e.value) and words in str(e.value), data
    with pytest.raises(FileNotFoundError):
        board.read_puzzles(tmp_path / "missing.txt")


def test_solvers_refuse_empty_mixed_and_foreign_puzzle_lists():
    pipe = Pipeline.from_pretrained(shipped(4), dtype=torch.float32)
    baseline = DiffusionGemma.from_pretrained(shipped(4, baseline=True), dtype=torch.float32)
    four, six = board.parse(EASY_4X4), board.parse(EASY_6X6)
    for run in (lambda p, **kw: solve(pipe, p, **kw), lambda p, **kw: solve_greedy(baseline, p, **kw)):
        with pytest.raises(DgemmaError, match="no puzzles given"):
            run([])
        with pytest.raises(DgemmaError, match="puzzle 1 has 36 cells, puzzle 0 has 16"):
            run([four, six])
        with pytest.raises(DgemmaError, match="puzzle 1 holds a cell that is not a digit 0-4"):
            run([four, [7] + four[1:]])
        with pytest.raises(DgemmaError, match="canvas holds 17 tokens, not a 6x6 answer"):
            run([six])
        with pytest.raises(DgemmaError, match="batch 0"):
            run([four], batch=0)


@pytest.mark.parametrize(
    "n, count, blanks, words",
    [
        (4, 1, (14, 14), "blanks 14 to 14: a 4x4 puzzle has at most 12 blanks (one with a unique solution keeps"),
        (6, 1, (20, 29), "has at most 28 blanks"),
        (9, 1, (60, 65), "keeps at least 17 clues"),
        (4, 0, None, "count 0"),
        (4, -3, None, "count -3"),
        (4, 1, (9, 5), "blanks 9 to 5: the range needs 0 <= lo <= hi"),
        (4, 1, (-1, 5), "blanks -1 to 5"),
        (4, 1, (1, 2, 3), "a pair of ints"),
        (4, 1, (1.5, 3), "a pair of ints"),
        (5, 1, None, "size 5: puzzles are 4x4, 6x6 or 9x9"),
    ],
)
def test_held_out_refuses_what_it_could_never_generate(n, count, blanks, words):
    start = time.perf_counter()
    with pytest.raises(DgemmaError) as e:
        board.held_out(n, count, seed=0, blanks=blanks)
    assert words in str(e.value) and time.perf_counter() - start < 1


def test_held_out_gives_up_on_a_rare_blank_count():
    """8 clues on 6x6 occur, but about one random grid in 100 yields one: a clear error within 100 grids."""
    with pytest.raises(DgemmaError, match="only [01] of 100 random 6x6 grids .* ask for fewer blanks"):
        board.held_out(6, 1000, seed=0, blanks=(28, 28))


def test_the_fewest_clues_are_reachable():
    pairs = board.held_out(4, 2, seed=0, blanks=(12, 12))
    assert [p.count(0) for p, _ in pairs] == [12, 12] and all(board.solutions(p) == [s] for p, s in pairs)
    puzzle = board.parse(FEWEST_6X6)
    assert 36 - puzzle.count(0) == board.MIN_CLUES[6] and len(board.solutions(puzzle)) == 1
    assert 16 - board.parse(FEWEST_4X4).count(0) == board.MIN_CLUES[4]


def test_blank_refuses_impossible_counts():
    grid = board.random_grid(4, random.Random(0))
    rng = random.Random(0)
    assert board.blank(grid, 16, rng).count(0) == 16  # without uniqueness, every cell may go
    for blanks, unique, words in ((17, False, "at most 16"), (13, True, "at most 12"), (-1, False, "blanks -1")):
        with pytest.raises(DgemmaError, match=words):
            board.blank(grid, blanks, rng, unique=unique)
    with pytest.raises(DgemmaError, match="not 15"):
        board.blank(grid[:-1], 3, rng)
