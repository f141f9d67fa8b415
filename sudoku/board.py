"""The Sudoku board: grids, puzzles, a solution counter, and the token layout the model reads. No torch: the command
line imports BOXES from here to build its options.

Grids are flat lists of n*n ints (0 a blank), n in {4, 6, 9} with 2x2, 2x3 and 3x3 boxes. Complete grids come from
randomized backtracking and are multiplied by the symmetries that keep a grid valid (digit relabelling, row and
column permutations within bands and stacks, band and stack permutations, and the transpose where boxes are square).

Token layout: prompt = <bos> puzzle <sep>, canvas = solution <eos>, so a whole answer is one canvas of n*n + 1.
"""

from __future__ import annotations

import random
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from ..errors import DgemmaError
from ..model.config import is_int

BOXES = {4: (2, 2), 6: (2, 3), 9: (3, 3)}  # (rows, cols) of a box
BLANKS = {4: (8, 12), 6: (14, 22), 9: (36, 51)}  # default blank counts; 9x9: 30-45 givens, the target
# The fewest clues a puzzle with a unique solution can have (9x9: McGuire et al. 2012, "There is no 16-clue Sudoku").
MIN_CLUES = {4: 4, 6: 8, 9: 17}
TRIES, RARE = 100, 50  # held_out gives up after TRIES grids if fewer than one in RARE gave a puzzle
DIGITS = "0123456789"  # only ASCII digits: str.isdigit also accepts other scripts' digits, such as '٣'
SPECIALS = ("<pad>", "<eos>", "<bos>", "<sep>")  # ids 0-3: Config's pad, eos and bos defaults
PAD, EOS, BOS, SEP = range(4)
DIGIT0 = len(SPECIALS)  # token id of "0" (a blank); "d" is DIGIT0 + d
VOCAB_SIZE = DIGIT0 + 10


def size_of(cells: int) -> int:
    n = round(cells**0.5)
    if n * n != cells or n not in BOXES:
        raise DgemmaError(f"a puzzle has 16, 36 or 81 cells (4x4, 6x6, 9x9), not {cells}")
    return n


def _quote(text: str, limit: int = 100) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def parse(text: str) -> list[int]:
    """An n*n-character puzzle, 0 or . for a blank (spaces ignored) -> cells.

    Refuses any other character and a clue that repeats in a row, column or box (such a puzzle has no solution, and
    naming the unit points at the typo)."""
    if not isinstance(text, str):
        raise DgemmaError(f"a puzzle is a string of digits, not {type(text).__name__}")
    digits = "".join(text.split()).replace(".", "0")
    try:
        n = size_of(len(digits))
    except DgemmaError as e:
        raise DgemmaError(f"{e}: {_quote(text)}") from None
    for i, c in enumerate(digits):
        if c not in DIGITS[: n + 1]:
            raise DgemmaError(
                f"a {n}x{n} puzzle holds the digits 1-{n} and 0 or . for blanks, not {c!r} (cell {i + 1}): "
                f"{_quote(text)}"
            )
    cells = [DIGITS.index(c) for c in digits]
    if clash := repeated(cells):
        raise DgemmaError(f"{clash}, so the puzzle has no solution: {_quote(text)}")
    return cells


def repeated(cells: list[int]) -> str | None:
    """Where a clue first repeats in a row, column or box ("digit 5 twice in row 1 (cells 1 and 4)"), or None."""
    n = size_of(len(cells))
    seen: dict[tuple, int] = {}
    for i, (d, unit) in enumerate(zip(cells, _units(n), strict=True)):
        if d:
            for kind, k in zip(("row", "column", "box"), unit, strict=True):
                if (kind, k, d) in seen:
                    return f"digit {d} twice in {kind} {k + 1} (cells {seen[kind, k, d] + 1} and {i + 1})"
                seen[kind, k, d] = i
    return None


def size_of_all(puzzles: list[list[int]]) -> int:
    """The size n of every puzzle in a non-empty list, each n*n cells holding 0 (blank) to n: the model's tokens cover
    only those digits, and one batch holds one size."""
    if not puzzles:
        raise DgemmaError("no puzzles given")
    n = size_of(len(puzzles[0]))
    for k, p in enumerate(puzzles):
        if len(p) != n * n:
            raise DgemmaError(f"puzzle {k} has {len(p)} cells, puzzle 0 has {n * n}: one size at a time")
        if not all(isinstance(d, int) and 0 <= d <= n for d in p):
            raise DgemmaError(f"puzzle {k} holds a cell that is not a digit 0-{n}: {p}")
    return n


def blank_range(n: int, blanks, *, unique: bool) -> tuple[int, int]:
    """blanks (lo, hi) per n x n puzzle, checked, or BLANKS[n] for None. A puzzle has at most n*n blanks, and one with
    a unique solution keeps at least MIN_CLUES[n] clues: a generator asked for more would search forever."""
    if isinstance(n, bool) or not isinstance(n, int) or n not in BOXES:
        raise DgemmaError(f"size {n!r}: puzzles are 4x4, 6x6 or 9x9")
    if blanks is None:
        return BLANKS[n]
    if not isinstance(blanks, tuple | list) or len(blanks) != 2 or not all(is_int(b) for b in blanks):
        raise DgemmaError(f"blanks {blanks!r}: a pair of ints (lo, hi)")
    lo, hi = blanks
    most = n * n - MIN_CLUES[n] if unique else n * n
    if not 0 <= lo <= hi:
        raise DgemmaError(f"blanks {lo} to {hi}: the range needs 0 <= lo <= hi")
    if hi > most:
        why = f"one with a unique solution keeps at least {MIN_CLUES[n]} clues" if unique else "it has that many cells"
        raise DgemmaError(f"blanks {lo} to {hi}: a {n}x{n} puzzle has at most {most} blanks ({why})")
    return lo, hi


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
    blank_range(size_of(len(solution)), (blanks, blanks), unique=unique)
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
    """`count` (puzzle, solution) pairs with unique solutions, from fresh backtracked grids.

    A blank count near the most a unique puzzle allows is rare from random grids, so once TRIES grids have been
    drawn, falling below one success in RARE draws stops with an error instead of searching for hours."""
    lo, hi = blank_range(n, blanks, unique=True)
    if not isinstance(count, int) or count < 1:
        raise DgemmaError(f"count {count!r}: ask for at least one puzzle")
    rng = random.Random(f"held-out {n} {seed}")  # a string seed: a stream no training seed (an int) reproduces
    out, tries = [], 0
    while len(out) < count:
        if tries >= TRIES and len(out) * RARE < tries:
            raise DgemmaError(
                f"blanks {lo} to {hi}: only {len(out)} of {tries} random {n}x{n} grids gave a puzzle with a unique "
                f"solution and that many blanks; ask for fewer blanks"
            )
        tries += 1
        solution = random_grid(n, rng)
        puzzle = blank(solution, rng.randint(lo, hi), rng, unique=True)
        if puzzle is not None:
            out.append((puzzle, solution))
    return out


def read_puzzles(path: str | Path) -> list[list[int]]:
    """One puzzle per line (blank lines and #-comments skipped), all of one size; errors name the file and line."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")  # tolerates the byte-order mark some editors write
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DgemmaError(f"{path} line {line}: not UTF-8 text (byte {data[e.start]:#04x})") from None
    puzzles, first = [], 0
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            puzzles.append(parse(line))
        except DgemmaError as e:
            raise DgemmaError(f"{path} line {number}: {e}") from None
        if len(puzzles) == 1:
            first = number
        elif len(puzzles[-1]) != len(puzzles[0]):
            n, m = size_of(len(puzzles[-1])), size_of(len(puzzles[0]))
            raise DgemmaError(f"{path} line {number}: a {n}x{n} puzzle, but line {first} is {m}x{m}: one size per file")
    if not puzzles:
        raise DgemmaError(f"{path} holds no puzzles (one per line; blank lines and # comments are skipped)")
    return puzzles


# ---------------------------------------------------------------------------------------------------------------
# Tokens


def build_tokenizer(path: str | Path, vocab_size: int = VOCAB_SIZE) -> Path:
    """Writes a tokenizer.json: the four specials, then the digits 0-9, one character per token ("." reads as 0), then
    `<unused{i}>` up to `vocab_size` for a model whose vocabulary is padded with ids no puzzle uses."""
    unused = [f"<unused{i}>" for i in range(VOCAB_SIZE, vocab_size)]  # special, so that decoding skips them
    vocab = {t: i for i, t in enumerate(SPECIALS)} | {str(d): DIGIT0 + d for d in range(10)}
    vocab |= {t: i for i, t in enumerate(unused, VOCAB_SIZE)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(".", "0"), normalizers.Replace(" ", "")])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # "1234", not "1 2 3 4"
    tok.add_special_tokens([*SPECIALS, *unused])
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
