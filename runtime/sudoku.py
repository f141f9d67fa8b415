"""Sudoku as a DiffusionGemma task: grids, puzzles, a solution counter, and the token layout the model reads.

Grids are flat lists of n*n ints (0 a blank), n in {4, 6, 9} with 2x2, 2x3 and 3x3 boxes. Complete grids come from
randomized backtracking and are multiplied by the symmetries that keep a grid valid (digit relabelling, row and
column permutations within bands and stacks, band and stack permutations, and the transpose where boxes are square).

Token layout: prompt = <bos> puzzle <sep>, canvas = solution <eos>, so a whole answer is one canvas of n*n + 1.
"""

from __future__ import annotations

import random
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

BOXES = {4: (2, 2), 6: (2, 3), 9: (3, 3)}  # (rows, cols) of a box
BLANKS = {4: (8, 12), 6: (14, 22), 9: (36, 51)}  # default blank counts; 9x9: 30-45 givens, the target
SPECIALS = ("<pad>", "<eos>", "<bos>", "<sep>")  # ids 0-3: Config's pad, eos and bos defaults
PAD, EOS, BOS, SEP = range(4)
DIGIT0 = len(SPECIALS)  # token id of "0" (a blank); "d" is DIGIT0 + d
VOCAB_SIZE = DIGIT0 + 10


def size_of(cells: int) -> int:
    n = round(cells**0.5)
    if n * n != cells or n not in BOXES:
        raise ValueError(f"a puzzle has 16, 36 or 81 cells (4x4, 6x6, 9x9), not {cells}")
    return n


def parse(text: str) -> list[int]:
    """An n*n-character puzzle, 0 or . for a blank (spaces ignored) -> cells."""
    text = "".join(text.split()).replace(".", "0")
    n = size_of(len(text))
    if not text.isdigit() or max(map(int, text)) > n:
        raise ValueError(f"a {n}x{n} puzzle holds the digits 1-{n} and 0 or . for blanks: {text!r}")
    return [int(c) for c in text]


def fmt(cells: list[int]) -> str:
    return "".join(map(str, cells))


def _units(n: int) -> list[tuple[int, int, int]]:
    """(row, column, box) of every cell."""
    br, bc = BOXES[n]
    return [(i // n, i % n, (i // n) // br * (n // bc) + (i % n) // bc) for i in range(n * n)]


def solutions(cells: list[int], limit: int = 2, rng: random.Random | None = None) -> list[list[int]]:
    """Up to `limit` solutions by backtracking on bitmasks, most constrained cell first; `rng` shuffles the digits."""
    n = size_of(len(cells))
    units, full = _units(n), (1 << n) - 1
    rows, cols, boxes = [0] * n, [0] * n, [0] * n
    grid = list(cells)
    for i, d in enumerate(grid):
        if d:
            r, c, b = units[i]
            bit = 1 << (d - 1)
            if (rows[r] | cols[c] | boxes[b]) & bit:
                return []  # a clue repeats in a unit
            rows[r], cols[c], boxes[b] = rows[r] | bit, cols[c] | bit, boxes[b] | bit
    found: list[list[int]] = []

    def search():
        best, best_free, best_count = -1, 0, n + 1
        for i, d in enumerate(grid):
            if d == 0:
                r, c, b = units[i]
                free = full & ~(rows[r] | cols[c] | boxes[b])
                count = free.bit_count()
                if count < best_count:
                    best, best_free, best_count = i, free, count
                    if count <= 1:
                        break
        if best < 0:
            found.append(list(grid))
            return
        digits = [d for d in range(1, n + 1) if best_free >> (d - 1) & 1]
        if rng is not None:
            rng.shuffle(digits)
        r, c, b = units[best]
        for d in digits:
            bit = 1 << (d - 1)
            grid[best] = d
            rows[r], cols[c], boxes[b] = rows[r] | bit, cols[c] | bit, boxes[b] | bit
            search()
            rows[r], cols[c], boxes[b] = rows[r] ^ bit, cols[c] ^ bit, boxes[b] ^ bit
            grid[best] = 0
            if len(found) >= limit:
                return

    search()
    return found


def is_valid(grid: list[int]) -> bool:
    """Complete, and every row, column and box holds 1..n once."""
    n = size_of(len(grid))
    seen = set()
    for d, (r, c, b) in zip(grid, _units(n), strict=True):
        if not 1 <= d <= n or {("r", r, d), ("c", c, d), ("b", b, d)} & seen:
            return False
        seen |= {("r", r, d), ("c", c, d), ("b", b, d)}
    return True


def keeps_clues(grid: list[int], puzzle: list[int]) -> bool:
    return all(p == 0 or p == g for p, g in zip(puzzle, grid, strict=True))


def shuffle(grid: list[int], rng: random.Random) -> list[int]:
    """A random grid equivalent under the validity-preserving symmetries."""
    n = size_of(len(grid))
    br, bc = BOXES[n]
    rows = [band * br + r for band in rng.sample(range(n // br), n // br) for r in rng.sample(range(br), br)]
    cols = [stack * bc + c for stack in rng.sample(range(n // bc), n // bc) for c in rng.sample(range(bc), bc)]
    order = [r * n + c for r in rows for c in cols]
    if br == bc and rng.random() < 0.5:  # the transpose maps a 2x3 box to a 3x2 one, so only for square boxes
        order = [order[c * n + r] for r in range(n) for c in range(n)]
    digits = [0, *rng.sample(range(1, n + 1), n)]
    return [digits[grid[i]] for i in order]


def random_grid(n: int, rng: random.Random) -> list[int]:
    return shuffle(solutions([0] * (n * n), limit=1, rng=rng)[0], rng)


def blank(solution: list[int], blanks: int, rng: random.Random, unique: bool = False) -> list[int] | None:
    """Blanks `blanks` random cells; with `unique`, skips any cell whose removal admits a second solution and
    returns None if the grid cannot lose that many cells."""
    puzzle = list(solution)
    order = rng.sample(range(len(puzzle)), len(puzzle))
    if not unique:
        for i in order[:blanks]:
            puzzle[i] = 0
        return puzzle
    removed = 0
    for i in order:
        if removed == blanks:
            break
        puzzle[i] = 0
        if len(solutions(puzzle)) > 1:
            puzzle[i] = solution[i]
        else:
            removed += 1
    return puzzle if removed == blanks else None


def held_out(n: int, count: int, seed: int, blanks: tuple[int, int] | None = None) -> list[tuple[list, list]]:
    """`count` (puzzle, solution) pairs with unique solutions, from fresh backtracked grids."""
    rng = random.Random(f"held-out {n} {seed}")  # a string seed: a stream no training seed (an int) reproduces
    lo, hi = blanks or BLANKS[n]
    out = []
    while len(out) < count:
        solution = random_grid(n, rng)
        puzzle = blank(solution, rng.randint(lo, hi), rng, unique=True)
        if puzzle is not None:
            out.append((puzzle, solution))
    return out


def read_puzzles(path: str | Path) -> list[list[int]]:
    """One puzzle per line (blank lines and #-comments skipped)."""
    lines = Path(path).read_text().splitlines()
    return [parse(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]


# ---------------------------------------------------------------------------------------------------------------
# Tokens


def build_tokenizer(path: str | Path) -> Path:
    """Writes a tokenizer.json: the four specials, then the digits 0-9, one character per token ("." reads as 0)."""
    vocab = {t: i for i, t in enumerate(SPECIALS)} | {str(d): DIGIT0 + d for d in range(10)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(".", "0"), normalizers.Replace(" ", "")])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # "1234", not "1 2 3 4"
    tok.add_special_tokens(list(SPECIALS))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path / "tokenizer.json"


def prompt_ids(puzzle: list[int]) -> list[int]:
    return [BOS, *(DIGIT0 + d for d in puzzle), SEP]


def canvas_ids(solution: list[int]) -> list[int]:
    return [*(DIGIT0 + d for d in solution), EOS]


def cells_of(canvas: list[int], n: int) -> list[int]:
    """The first n*n canvas tokens as digits; a token that is not a digit 1-n reads as 0 (unsolved)."""
    return [t - DIGIT0 if 1 <= t - DIGIT0 <= n else 0 for t in canvas[: n * n]]
