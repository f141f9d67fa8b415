"""Training DiffusionGemma from scratch on Sudoku, with the model's own forward (the reference backend trains).

The objective is ../shared/docs/sampler.md section 5: uniform-state corruption of the canvas (each token replaced
by a uniform random vocabulary token with probability t ~ U(eps, 1), no mask token), flat cross-entropy over every
canvas position, self-conditioning in two passes with probability 0.5 (the first without gradients), and the
encoder's causal LM loss on the clean answer with weight `lm_weight`. Teacher forcing is block-causal: the decoder
denoises the answer's one canvas against the K/V the encoder wrote for the prompt. `--objective ar` trains the same
architecture as a plain causal LM through the encoder: the autoregressive baseline.

Checkpoints are written in the Hugging Face layout `load_model` reads, plus trainer_state.pt (step, optimizer and
random states), so `--resume DIR` continues a run exactly where it stopped.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..model.cache import KVCache
from ..model.checkpoint import load_model, save_model
from ..model.config import FULL, SLIDING, Config
from ..model.model import DiffusionGemma
from . import sudoku


@dataclass
class Recipe:
    size: int = 4
    blanks: tuple[int, int] | None = None  # per puzzle, uniform in [lo, hi]; None: sudoku.BLANKS[size]
    objective: str = "diffusion"  # or "ar": the autoregressive baseline
    lm_weight: float = 0.0  # encoder LM loss weight; 1 cut a 0.2M model's 4x4 solve rate from 52-83% to 21% (sudoku.md)
    self_conditioning: float = 0.5  # probability per example of feeding the first pass's logits to the second
    eps: float = 1e-3  # t ~ U(eps, 1)
    steps: int = 4000
    batch: int = 128
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    hidden: int = 64
    layers: int = 2
    experts: int = 4
    top_k: int = 2
    seed: int = 0
    denoising_steps: int = 16  # max_denoising_steps of the generation_config.json the checkpoint ships

    def model_config(self) -> Config:
        """Config.tiny's proportions scaled to width `hidden` (at 64 exactly Config.tiny's shapes): 16-wide heads;
        the sliding window covers the whole prompt and canvas, so only the RoPE differs between the layer types."""
        n, C, H = self.size, self.size**2 + 1, self.hidden // 16
        return Config.tiny(
            vocab_size=sudoku.VOCAB_SIZE,
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
            confidence_threshold=0.005, max_new_tokens=self.size**2 + 1, eos_token_id=[sudoku.EOS],
            pad_token_id=sudoku.PAD,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# The objective


def corrupt(canvas: torch.Tensor, t: torch.Tensor, vocab_size: int, generator: torch.Generator):
    """Uniform-state corruption: each token of canvas (B, C) becomes a uniform random token with probability t (B,).

    Returns the noisy canvas and which positions were redrawn (a redraw may land on the clean token).
    """
    redrawn = torch.rand(canvas.shape, generator=generator, device=canvas.device) < t[:, None]
    noise = torch.randint(0, vocab_size, canvas.shape, generator=generator, device=canvas.device)
    return torch.where(redrawn, noise, canvas), redrawn


def fork(cache: KVCache) -> KVCache:
    """A copy with its own K/V tensors. The cache is written in place, and autograd forbids writing to a tensor an
    earlier pass saved for its backward, so each pass that writes after a differentiable pass writes to a fork."""
    twin = copy.copy(cache)
    twin.k, twin.v = [k.clone() for k in cache.k], [v.clone() for v in cache.v]
    twin.pos = {kind: p.clone() for kind, p in cache.pos.items()}
    twin.valid = {kind: v.clone() for kind, v in cache.valid.items()}
    return twin


def encode(model: DiffusionGemma, ids: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
    """`model.encode` with gradients: causal passes over ids (B, T) in canvas-sized chunks -> (B, T, D), new cache."""
    out = []
    for start in range(0, ids.shape[1], cache.chunk):
        chunk = ids[:, start : start + cache.chunk]
        out.append(model._layers(model.embed(chunk), cache, None, decoder=False))
        cache.commit(chunk.shape[1])
        cache = fork(cache)
    return torch.cat(out, dim=1), cache


def losses(model: DiffusionGemma, prompt, canvas, recipe: Recipe, generator: torch.Generator) -> dict:
    """prompt (B, P), clean canvas (B, C) -> {"diffusion": CE over the canvas, "lm": the encoder's next-token CE}."""
    B, P = prompt.shape
    C = canvas.shape[1]
    h_prompt, cache = encode(model, prompt, model.new_cache(B, P + C))
    out = {}
    if recipe.objective == "ar" or recipe.lm_weight > 0:
        # Teacher forcing: the encoder reads prompt + clean answer; the prompt's last position predicts the first cell.
        h_canvas, _ = encode(model, canvas, fork(cache))
        h = torch.cat([h_prompt[:, -1:], h_canvas[:, :-1]], dim=1)
        out["lm"] = F.cross_entropy(model.logits(h).flatten(0, 1), canvas.flatten())
    if recipe.objective == "diffusion":
        t = recipe.eps + (1 - recipe.eps) * torch.rand(B, generator=generator, device=canvas.device)
        noisy, _ = corrupt(canvas, t, model.config.vocab_size, generator)
        embedded = model.embed(noisy)
        soft = torch.zeros_like(embedded)  # no self-conditioning: exactly the sampler's first step
        use = torch.rand(B, generator=generator, device=canvas.device) < recipe.self_conditioning
        if use.any():
            first = model.denoise(noisy, fork(cache))  # no_grad: the first pass only feeds the second
            soft = torch.where(use[:, None, None], model.soft_embedding(first), soft)
        h = model._layers(model.self_conditioning(embedded, soft), cache, None, decoder=True)
        out["diffusion"] = F.cross_entropy(model.logits(h).flatten(0, 1), canvas.flatten())
    return out


def total(parts: dict, recipe: Recipe) -> torch.Tensor:
    if recipe.objective == "ar":
        return parts["lm"]
    return parts["diffusion"] + recipe.lm_weight * parts["lm"] if "lm" in parts else parts["diffusion"]


# ---------------------------------------------------------------------------------------------------------------
# Data, initialization, checkpoints


class Puzzles:
    """Training batches: each puzzle is a random symmetry of a grid from a pool built by backtracking, blanked at
    random (no uniqueness needed: the target is the grid the puzzle came from)."""

    POOL = 512  # the symmetries multiply each grid by up to 2 * 9! * 6^8; the pool only saves backtracking time

    def __init__(self, recipe: Recipe):
        self.n, self.blanks = recipe.size, recipe.blanks or sudoku.BLANKS[recipe.size]
        self.rng = random.Random(recipe.seed)
        pool_rng = random.Random(f"pool {recipe.seed}")
        self.pool = [sudoku.random_grid(self.n, pool_rng) for _ in range(self.POOL)]

    def batch(self, B: int) -> tuple[torch.Tensor, torch.Tensor]:
        prompts, canvases = [], []
        for _ in range(B):
            solution = sudoku.shuffle(self.rng.choice(self.pool), self.rng)
            puzzle = sudoku.blank(solution, self.rng.randint(*self.blanks), self.rng)
            prompts.append(sudoku.prompt_ids(puzzle))
            canvases.append(sudoku.canvas_ids(solution))
        return torch.tensor(prompts), torch.tensor(canvases)


def init_weights(model: DiffusionGemma, seed: int, std: float = 0.02) -> DiffusionGemma:
    """transformers' Gemma init: N(0, 0.02) for every matrix and the embedding, ones for norms and scales."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def save_checkpoint(model: DiffusionGemma, path: str | Path, generation: dict) -> Path:
    """config.json, generation_config.json, model.safetensors and tokenizer.json, as load_model reads them."""
    path = save_model(model, path, eos_token_id=[sudoku.EOS], pad_token_id=sudoku.PAD)
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    sudoku.build_tokenizer(path)
    return path


def learning_rate(step: int, recipe: Recipe) -> float:
    """Linear warmup, then cosine to a tenth of the peak (Google's Sudoku schedule)."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


# ---------------------------------------------------------------------------------------------------------------
# The loop


def train(recipe: Recipe, out, *, resume=None, save_every: int = 500, log=print, device="cpu"):
    """Trains to `recipe.steps` (a resumed run keeps its recipe but for `steps`) -> the model and its last loss."""
    out = Path(out)
    data = Puzzles(recipe)
    generator = torch.Generator(device).manual_seed(recipe.seed)
    if resume is not None:
        state = torch.load(Path(resume) / "trainer_state.pt", weights_only=False)
        recipe = Recipe(**(state["recipe"] | {"steps": recipe.steps}))
        model = load_model(resume, dtype=torch.float32, device=device)
        step = state["step"]
        data.rng.setstate(state["data_rng"])
        generator.set_state(state["generator"])
    else:
        model, step = init_weights(DiffusionGemma(recipe.model_config()), recipe.seed).to(device), 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    if resume is not None:
        optimizer.load_state_dict(state["optimizer"])
    model.train()
    start, window = time.perf_counter(), []
    loss = float("nan")
    while step < recipe.steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, recipe)
        prompt, canvas = (x.to(device) for x in data.batch(recipe.batch))
        with torch.enable_grad():
            parts = losses(model, prompt, canvas, recipe, generator)
            objective = total(parts, recipe)
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        window.append({k: v.item() for k, v in parts.items()} | {"loss": objective.item()})
        if step % 50 == 0 or step == recipe.steps:
            means = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
            loss = means["loss"]
            parts_text = " ".join(f"{k} {v:.4f}" for k, v in means.items())
            log(f"step {step}/{recipe.steps}  {parts_text}  lr {learning_rate(step - 1, recipe):.2e}  "
                f"{time.perf_counter() - start:.0f} s")  # fmt: skip
            window = []
        if step % save_every == 0 or step == recipe.steps:
            save_checkpoint(model, out, recipe.generation_config())
            state = {"recipe": asdict(recipe), "step": step, "optimizer": optimizer.state_dict()}
            state |= {"data_rng": data.rng.getstate(), "generator": generator.get_state()}
            torch.save(state, out / "trainer_state.pt")
    return model.eval(), loss
