"""The training objective, through the model's own forward passes (the reference layers train).

Block diffusion with uniform-state noise: each canvas token is replaced by a uniform random vocabulary token with
probability t ~ U(eps, 1) (there is no mask token), and the loss is the flat cross-entropy over every canvas position.
Self-conditioning is trained in two passes: with probability `self_conditioning` per example, a first pass without
gradients predicts the canvas and its soft embedding feeds the second, as the sampler feeds each step the previous
step's logits; otherwise the second pass sees zeros, as at a canvas's first step. Teacher forcing is block-causal:
the decoder denoises the answer's one canvas against the K/V the encoder wrote for the prompt, and the gradients
reach the encoder through that cache. The encoder's causal LM loss on the clean answer is added with weight
`lm_weight`; the objective "ar" trains it alone: the same architecture as a plain causal LM, the autoregressive
baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.cache import KVCache
from ..model.model import DiffusionGemma
from .recipe import Recipe


def corrupt(canvas: torch.Tensor, t: torch.Tensor, vocab_size: int, generator: torch.Generator):
    """Uniform-state corruption: each token of canvas (B, C) becomes a uniform random token with probability t (B,).

    Returns the noisy canvas and which positions were redrawn (a redraw may land on the clean token).
    """
    redrawn = torch.rand(canvas.shape, generator=generator, device=canvas.device) < t[:, None]
    noise = torch.randint(0, vocab_size, canvas.shape, generator=generator, device=canvas.device)
    return torch.where(redrawn, noise, canvas), redrawn


def encode(model: DiffusionGemma, ids: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
    """`model.encode` over ids (B, T), one canvas-sized chunk at a time -> (B, T, D) and the cache holding them all.

    The cache is written in place, and autograd forbids overwriting a tensor an earlier pass saved for its backward,
    so each chunk after the first, and whatever pass reads the result, writes into a fork of the cache."""
    out = []
    for start in range(0, ids.shape[1], cache.chunk):
        out.append(model.encode(ids[:, start : start + cache.chunk], cache))
        cache = cache.fork()
    return torch.cat(out, dim=1), cache


def losses(model: DiffusionGemma, prompt, canvas, recipe: Recipe, generator: torch.Generator) -> dict:
    """prompt (B, P), clean canvas (B, C) -> {"diffusion": CE over the canvas, "lm": the encoder's next-token CE},
    each present when the recipe's objective and lm_weight call for it."""
    B, P = prompt.shape
    C = canvas.shape[1]
    h_prompt, cache = encode(model, prompt, model.new_cache(B, P + C))
    out = {}
    if recipe.objective == "ar" or recipe.lm_weight > 0:
        # Teacher forcing: the encoder reads prompt + clean answer; the prompt's last position predicts the first cell.
        h_canvas, _ = encode(model, canvas, cache.fork())
        h = torch.cat([h_prompt[:, -1:], h_canvas[:, :-1]], dim=1)
        out["lm"] = F.cross_entropy(model.logits(h).flatten(0, 1), canvas.flatten())
    if recipe.objective == "diffusion":
        t = recipe.eps + (1 - recipe.eps) * torch.rand(B, generator=generator, device=canvas.device)
        noisy, _ = corrupt(canvas, t, model.config.vocab_size, generator)
        soft = None  # no self-conditioning: exactly the sampler's first step
        use = torch.rand(B, generator=generator, device=canvas.device) < recipe.self_conditioning
        if use.any():
            with torch.no_grad():  # the first pass only feeds the second
                first = model.logits(model.decode(noisy, cache.fork()))
            soft = torch.where(use[:, None, None], model.soft_embedding(first), 0.0)
        h = model.decode(noisy, cache, soft)
        out["diffusion"] = F.cross_entropy(model.logits(h).flatten(0, 1), canvas.flatten())
    return out


def total(parts: dict, recipe: Recipe) -> torch.Tensor:
    """The loss the trainer minimizes: the diffusion loss plus lm_weight times the LM loss, or the LM loss alone."""
    if recipe.objective == "ar":
        return parts["lm"]
    return parts["diffusion"] + recipe.lm_weight * parts["lm"] if "lm" in parts else parts["diffusion"]
