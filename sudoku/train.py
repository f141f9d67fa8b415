"""Training a DiffusionGemma from scratch on Sudoku: the recipe the trainer (dgemma.training) runs for this task.

A SudokuRecipe adds to the shared hyperparameters the grid size, the blanks per puzzle, the model's width and its
vocabulary; it builds the model config from the grid size, the batches of generated puzzles, and checkpoints that
carry the Sudoku tokenizer and the sampler settings the shipped models use.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DgemmaError
from ..model.checkpoint import save_model
from ..model.config import FULL, SLIDING, Config
from ..model.model import DiffusionGemma
from ..training.recipe import Batches, Recipe
from . import board


@dataclass
class SudokuRecipe(Recipe):
    """The shared hyperparameters and the Sudoku run's own: the puzzles and the model's shape. lm_weight keeps its
    default 0 here: at 1 it cut a 0.2M model's 4x4 solve rate from 52-83% to 21%."""

    size: int = 4
    blanks: tuple[int, int] | None = None  # per puzzle, uniform in [lo, hi]; None: board.BLANKS[size]
    hidden: int = 64
    layers: int = 2
    experts: int = 4
    top_k: int = 2
    denoising_steps: int = 16  # max_denoising_steps of the generation_config.json the checkpoint ships
    # The model's vocabulary: the 14 Sudoku tokens, or more, padded with ids no puzzle uses. Uniform-state noise then
    # mostly draws those ids, so a corrupted cell is told from a clean one almost as with a mask token (at 14, 10
    # of the 14 draws are digits). Padded, the shipped 4x4/6x6 size copied the 9x9 givens within 200 steps.
    vocab: int = board.VOCAB_SIZE

    def __post_init__(self):
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size not in board.BOXES:
            raise DgemmaError(f"{self._name}.size {self.size!r}: puzzles are 4x4, 6x6 or 9x9 (4, 6 or 9)")
        super().__post_init__()
        if self.blanks is not None:
            try:
                self.blanks = board.blank_range(self.size, self.blanks, unique=False)
            except DgemmaError as e:
                raise DgemmaError(f"{self._name}.{e}") from None
        self.check_ints(
            ("hidden", 16, None), ("layers", 1, None), ("experts", 1, None), ("top_k", 1, self.experts),
            ("denoising_steps", 1, None), ("vocab", board.VOCAB_SIZE, 2**20),
        )  # fmt: skip
        if self.hidden % 16:
            raise DgemmaError(f"{self._name}.hidden {self.hidden}: a multiple of 16 (the model's heads are 16 wide)")
        try:
            self.model_config()
        except ValueError as e:  # the query heads must group over the KV heads: 16, 32, 48, 64, 96, 128 work
            raise DgemmaError(f"{self._name}.hidden {self.hidden} gives {self.hidden // 16} heads of 16: {e}") from None

    def model_config(self) -> Config:
        """Config.tiny's proportions scaled to width `hidden` (at 64 exactly Config.tiny's shapes): 16-wide heads;
        the sliding window covers the whole prompt and canvas, so only the RoPE differs between the layer types."""
        n, C, H = self.size, self.size**2 + 1, self.hidden // 16
        return Config.tiny(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.hidden * 3 // 2,
            moe_intermediate_size=self.hidden // 2,
            num_hidden_layers=self.layers,
            layer_types=[SLIDING] * (self.layers - 1) + [FULL],
            num_attention_heads=H,
            num_key_value_heads=max(1, H // 2),
            num_global_key_value_heads=max(1, H // 4),
            num_experts=self.experts,
            top_k_experts=self.top_k,
            sliding_window=2 * C + 1,
            max_position_embeddings=4 * C,
            canvas_length=n * n + 1,
        )

    def generation_config(self) -> dict:
        """The sampler the checkpoint ships with. Hotter than the chat model's 0.4-0.8: on 1,000 4x4 puzzles at 16
        steps, 0.4-0.8 solved 95.2%, 0.6-1.0 97.7%, 0.8-1.2 99.2% (8.2 steps), 1.0-1.5 99.6% but never stopped early;
        uniform-state renoising needs the stochasticity."""
        return dict(
            max_denoising_steps=self.denoising_steps, t_min=0.8, t_max=1.2, stability_threshold=1,
            confidence_threshold=0.005, max_new_tokens=self.size**2 + 1, eos_token_id=[board.EOS],
            pad_token_id=board.PAD,
        )  # fmt: skip

    def batches(self) -> Batches:
        return Puzzles(self).batch

    def save_checkpoint(self, model: DiffusionGemma, folder: str | Path) -> Path:
        """config.json (with the Sudoku special tokens), generation_config.json, model.safetensors and
        tokenizer.json, as load_model and the Pipeline read them."""
        folder = save_model(model, folder, eos_token_id=[board.EOS], pad_token_id=board.PAD)
        (folder / "generation_config.json").write_text(json.dumps(self.generation_config(), indent=2) + "\n")
        board.build_tokenizer(folder, self.vocab)
        return folder


class Puzzles:
    """Training batches: each puzzle is a random symmetry of a grid from a pool built by backtracking, blanked at
    random (no uniqueness needed: the target is the grid the puzzle came from). The pool depends only on the seed;
    which grids, symmetries and blanks a batch gets comes from the RNG the caller passes.

    A batch is drawn as tensors, all B puzzles at once, from a torch generator seeded by that RNG: the symmetries
    (board.shuffle's: bands and the rows within each, stacks and the columns within each, the transpose where boxes
    are square, a digit relabelling) become one gather, the blanks a random rank per cell. Puzzle by puzzle in
    Python, a batch of 512 9x9 puzzles took 0.3 s, longer than a GPU's training step."""

    POOL = 512  # the symmetries multiply each grid by up to 2 * 9! * 6^8; the pool only saves backtracking time

    def __init__(self, recipe: SudokuRecipe):
        self.n, self.blanks = recipe.size, board.blank_range(recipe.size, recipe.blanks, unique=False)
        pool_rng = random.Random(f"pool {recipe.seed}")
        self.pool = torch.tensor([board.random_grid(self.n, pool_rng) for _ in range(self.POOL)])  # (POOL, n*n)

    def batch(self, B: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        """B puzzles -> prompts (B, n*n + 2) and solution canvases (B, n*n + 1) as token ids."""
        n, (br, bc) = self.n, board.BOXES[self.n]
        g = torch.Generator().manual_seed(rng.getrandbits(63))
        perm = lambda *shape: torch.rand(shape, generator=g).argsort(-1)  # noqa: E731  # uniform permutations
        rows = (perm(B, n // br)[..., None] * br + perm(B, n // br, br)).view(B, n)  # bands, then rows in each
        cols = (perm(B, n // bc)[..., None] * bc + perm(B, n // bc, bc)).view(B, n)
        order = rows[:, :, None] * n + cols[:, None, :]  # (B, n, n): source cell of each cell
        if br == bc:  # the transpose maps a 2x3 box to a 3x2 one, so only for square boxes
            flip = torch.rand(B, generator=g) < 0.5
            order = torch.where(flip[:, None, None], order.transpose(1, 2), order)
        digits = torch.cat([torch.zeros(B, 1, dtype=torch.long), perm(B, n) + 1], dim=1)  # 0 stays 0
        grids = self.pool[torch.randint(len(self.pool), (B,), generator=g)]
        solution = digits.gather(1, grids.gather(1, order.reshape(B, n * n)))
        lo, hi = self.blanks
        count = torch.randint(lo, hi + 1, (B, 1), generator=g)
        puzzle = solution.masked_fill(perm(B, n * n).argsort(-1) < count, 0)  # each cell's rank in a random order
        specials = lambda token: torch.full((B, 1), token, dtype=torch.long)  # noqa: E731
        prompts = torch.cat([specials(board.BOS), board.DIGIT0 + puzzle, specials(board.SEP)], dim=1)
        return prompts, torch.cat([board.DIGIT0 + solution, specials(board.EOS)], dim=1)
