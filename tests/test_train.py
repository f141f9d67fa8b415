"""The training objective and loop (dgemma.training), on a tiny Sudoku model."""

import json
import random
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from safetensors import safe_open

from dgemma import DiffusionGemma
from dgemma.model.config import FULL, SLIDING, Config
from dgemma.model.load import load_model
from dgemma.sudoku import board
from dgemma.sudoku.train import Puzzles, SudokuRecipe
from dgemma.training.objective import corrupt, losses
from dgemma.training.recipe import Recipe
from dgemma.training.trainer import init_weights, train

TINY = dict(size=4, batch=16, hidden=32, warmup=5, lr=3e-3)  # about 20 ms a step


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_corruption_redraws_a_fraction_t_uniformly_over_the_vocabulary():
    V, C = 14, 50_000
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    canvas = torch.randint(0, V, (len(t), C))
    noisy, redrawn = corrupt(canvas, t, V, torch.Generator().manual_seed(0))
    assert torch.equal(noisy[~redrawn], canvas[~redrawn])  # untouched positions keep the clean token
    torch.testing.assert_close(redrawn.float().mean(-1), t, atol=0.01, rtol=0)  # 4.5 sd at t = 0.5
    # A redraw lands on the clean token 1/V of the time, so the visible change rate is t (1 - 1/V).
    torch.testing.assert_close((noisy != canvas).float().mean(-1), t * (1 - 1 / V), atol=0.01, rtol=0)
    counts = torch.bincount(noisy[redrawn], minlength=V).float()  # redraws are uniform, specials included
    expected = redrawn.sum() / V
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert len(counts) == V and chi2 < 40  # 13 degrees of freedom: p < 1e-3 above 35


def test_gradients_reach_the_prompt_through_the_cache():
    """The diffusion loss alone trains the encoder: its prompt K/V carry gradients back to the prompt embeddings."""
    recipe = SudokuRecipe(**TINY)
    model = init_weights(DiffusionGemma(recipe.model_config()), seed=0)
    prompt, canvas = Puzzles(recipe).batch(4, random.Random(0))
    embedded, embed = [], model.embed

    def capture(ids):
        embedded.append(embed(ids))
        if embedded[-1].requires_grad:  # not in the first, gradient-free self-conditioning pass
            embedded[-1].retain_grad()
        return embedded[-1]

    model.embed = capture
    parts = losses(model, prompt, canvas, recipe, torch.Generator().manual_seed(0))
    assert set(parts) == {"diffusion"}
    parts["diffusion"].backward()
    assert embedded[0].shape[1] == recipe.model_config().canvas_length  # the prompt's first chunk
    assert embedded[0].grad.abs().sum(-1).gt(0).all()  # every prompt position of every row
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_ar_objective_is_the_encoders_next_token_loss():
    recipe = SudokuRecipe(objective="ar", **TINY)
    model = init_weights(DiffusionGemma(recipe.model_config()), seed=0)
    prompt, canvas = Puzzles(recipe).batch(3, random.Random(0))
    parts = losses(model, prompt, canvas, recipe, torch.Generator())
    with torch.no_grad():  # the same loss from the inference path: encode prompt + answer, read the logits
        h = model.encode(torch.cat([prompt, canvas], 1), model.new_cache(3, prompt.shape[1] + canvas.shape[1]))
        logits = model.logits(h[:, prompt.shape[1] - 1 : -1])
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), canvas.flatten())
    assert set(parts) == {"lm"}
    torch.testing.assert_close(parts["lm"], expected)


@pytest.mark.parametrize("objective", ["diffusion", "ar"])
def test_a_few_steps_reduce_the_loss(objective, tmp_path):
    recipe = SudokuRecipe(objective=objective, steps=60, **TINY)
    fixed = Puzzles(SudokuRecipe(**(TINY | {"seed": 99}))).batch(64, random.Random(99))

    def loss(model):
        with torch.no_grad():
            return sum(losses(model, *fixed, recipe, torch.Generator().manual_seed(0)).values()).item()

    before = loss(init_weights(DiffusionGemma(recipe.model_config()), seed=0))
    model, _ = train(recipe, tmp_path, log=lambda _: None)
    assert loss(model) < 0.8 * before


def test_resuming_continues_the_same_run(tmp_path):
    straight, _ = train(SudokuRecipe(steps=12, **TINY), tmp_path / "straight", log=lambda _: None)
    train(SudokuRecipe(steps=6, **TINY), tmp_path / "split", save_every=6, log=lambda _: None)
    resumed, _ = train(
        SudokuRecipe(steps=12, **TINY), tmp_path / "split2", resume=tmp_path / "split", log=lambda _: None
    )
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_checkpoint_round_trips_through_the_loader(tmp_path):
    recipe = SudokuRecipe(**TINY)
    model = init_weights(DiffusionGemma(recipe.model_config()), seed=3)
    recipe.save_checkpoint(model, tmp_path)
    loaded = load_model(tmp_path, dtype=torch.float32)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with safe_open(tmp_path / "model.safetensors", "pt") as f:  # official names, as in the released checkpoint
        assert "model.decoder.embed_tokens.weight" in f.keys()
        assert "model.encoder.language_model.layers.0.layer_scalar" in f.keys()
    prompt = torch.tensor([board.prompt_ids([0] * 16)])
    cache = loaded.new_cache(1, 40)
    loaded.encode(prompt, cache)
    assert loaded.denoise(torch.zeros(1, 17, dtype=torch.long), cache).shape == (1, 17, board.VOCAB_SIZE)


@dataclass
class Copy(Recipe):
    """A task that is not Sudoku: the canvas repeats the prompt."""

    length: int = 8

    def model_config(self) -> Config:
        return Config.tiny(num_hidden_layers=2, layer_types=[SLIDING, FULL], canvas_length=self.length)

    def batches(self):
        def batch(B: int, rng: random.Random):
            ids = torch.tensor([[rng.randrange(4, 256) for _ in range(self.length)] for _ in range(B)])
            return ids, ids

        return batch


def test_the_trainer_runs_and_resumes_any_recipe(tmp_path):
    copy = dict(batch=4, warmup=1)
    straight, _ = train(Copy(steps=4, **copy), tmp_path / "straight", log=lambda _: None)
    train(Copy(steps=2, **copy), tmp_path / "split", log=lambda _: None)
    resumed, _ = train(Copy(steps=4, **copy), tmp_path / "split2", resume=tmp_path / "split", log=lambda _: None)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    files = {p.name for p in (tmp_path / "split2").iterdir()}
    assert files == {"config.json", "model.safetensors", "trainer_state.json", "trainer_state.safetensors"}
    assert json.loads((tmp_path / "split2" / "trainer_state.json").read_text())["recipe"]["length"] == 8


def test_the_trainer_imports_neither_a_task_nor_the_runtime():
    """training/ stands on the model alone: dgemma.sudoku builds on it, never the other way round."""
    probe = "import json, sys, dgemma.training.trainer; print(json.dumps([m for m in sys.modules if 'dgemma.' in m]))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    loaded = json.loads(done.stdout)
    assert "dgemma.training.objective" in loaded
    assert [m for m in loaded if m.startswith(("dgemma.sudoku", "dgemma.runtime", "dgemma.export"))] == []
