"""Block-diffusion generation: prefill the prompt, denoise one 256-token canvas at a time, commit it, repeat.

`generate_ids` is the loop of ../shared/docs/sampler.md section 3.10 over a model with the `encode`/`denoise` API;
`Pipeline` adds the tokenizer, the chat format, batching with left padding and the checkpoint's generation defaults.
With `reference=True` the loop draws its random numbers exactly as transformers' `generate` does (same calls, same
shapes, same order on the global RNG), so the same `torch.manual_seed` gives the same tokens.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..model.checkpoint import read_generation_config
from ..model.model import DiffusionGemma
from ..model.tokenizer import Tokenizer
from .sampler import (
    SamplingConfig,
    SeededDraws,
    TorchDraws,
    entropy,
    entropy_bound_accept,
    finalize_canvas,
    stable,
    temperature,
)


@dataclass
class Draft:
    """One denoising step, for callbacks: the argmax canvas and what the sampler did (CPU tensors, (B, C))."""

    canvas: int
    step: int
    argmax: torch.Tensor
    accepted: torch.Tensor
    changed: torch.Tensor  # argmax differs from the previous step's
    done: torch.Tensor  # (B,) rows whose canvas has stopped


@dataclass
class Stats:
    steps_per_canvas: list[int] = field(default_factory=list)  # decoder passes the batch ran per canvas
    accepted_per_step: list[float] = field(default_factory=list)  # mean accepted positions per row
    decoder_passes: list[int] = field(default_factory=list)  # per row, only while that row was denoising
    tokens_per_forward: list[float] = field(default_factory=list)  # per row: non-pad new tokens / its passes
    encoder_passes: int = 0
    seconds: float = 0.0
    new_tokens: int = 0  # non-pad generated tokens over the batch

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


@torch.no_grad()
def generate_ids(
    model: DiffusionGemma,
    prompt: torch.Tensor,
    cfg: SamplingConfig,
    *,
    attention_mask: torch.Tensor | None = None,
    reference: bool = False,
    seed: int = 0,
    warm_start: torch.Tensor | None = None,
    on_draft: Callable[[Draft], None] | None = None,
    on_commit: Callable[[int, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, Stats]:
    """prompt (B, P) left-padded ids -> (B, P + k*C) ids with the committed canvases appended, and statistics."""
    start = time.perf_counter()
    B, P = prompt.shape
    C, V, device = model.config.canvas_length, model.config.vocab_size, prompt.device
    canvases = math.ceil(cfg.max_new_tokens / C)
    draws = TorchDraws() if reference else SeededDraws(seed, device)
    cache = model.new_cache(B, P + canvases * C)
    stats = Stats()
    model.encode(prompt, cache, attention_mask)
    stats.encoder_passes += 1
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    passes = torch.zeros(B, dtype=torch.long, device=device)
    out = [prompt]
    for k in range(canvases):
        if k > 0:
            model.encode(out[-1], cache)  # commit the previous canvas at the positions it was denoised at
            stats.encoder_passes += 1
        canvas = draws.canvas(B, C, V, device)  # drawn even under a warm start, as transformers does
        if k == 0 and warm_start is not None:
            canvas = warm_start.to(device)
        argmax, logits_sc = canvas, None
        history = torch.full((cfg.stability_threshold, B, C), -1, device=device)
        # Transformers keeps denoising rows that already ended (and pads them afterwards); otherwise skip them.
        done = torch.zeros_like(finished) if reference else finished.clone()
        for step, remaining in enumerate(range(cfg.max_denoising_steps, 0, -1)):
            passes += ~(done | finished)
            z = model.denoise(canvas, cache, logits_sc) / temperature(remaining, cfg)  # (B, C, V) fp32
            sample = draws.sample(z.softmax(-1, dtype=torch.float32))
            new_argmax = z.argmax(-1)
            H = entropy(z)
            accepted = entropy_bound_accept(H, cfg.entropy_bound)
            new_canvas = torch.where(accepted, sample, draws.canvas(B, C, V, device))
            if logits_sc is not None:  # stopped rows stay frozen
                new_argmax = torch.where(done[:, None], argmax, new_argmax)
                new_canvas = torch.where(done[:, None], canvas, new_canvas)
                z = torch.where(done[:, None, None], logits_sc, z)
            done = done | (stable(history, new_argmax) & (H.mean(-1) < cfg.confidence_threshold))
            if on_draft is not None:
                on_draft(Draft(k, step, new_argmax.cpu(), accepted.cpu(), (new_argmax != argmax).cpu(), done.cpu()))
            stats.accepted_per_step.append(accepted.sum(-1).float().mean().item())
            canvas, argmax, logits_sc = new_canvas, new_argmax, z.to(model.dtype)
            if done.all():
                break
        stats.steps_per_canvas.append(step + 1)
        committed, finished = finalize_canvas(argmax, finished, cfg)
        out.append(committed)
        if on_commit is not None:
            on_commit(k, committed.cpu())
        if finished.all():
            break
    sequences = torch.cat(out, dim=1)
    valid = (sequences[:, P:] != cfg.pad_id).sum(-1)
    stats.decoder_passes = passes.tolist()
    stats.tokens_per_forward = (valid / passes.clamp(min=1)).tolist()
    stats.new_tokens = int(valid.sum())
    stats.seconds = time.perf_counter() - start
    return sequences, stats


@dataclass
class Generation:
    sequences: torch.Tensor  # (B, P + k*C): prompt, then the committed canvases (pad after a stop id)
    tokens: list[list[int]]  # per row: generated ids up to and including the first stop id
    texts: list[str]  # per row: decoded generated text, without the stop id
    stats: Stats

    @property
    def text(self) -> str:
        return self.texts[0]


class Pipeline:
    """Tokenizer + model + the checkpoint's generation defaults: `Pipeline.from_pretrained(path).generate(prompt)`."""

    def __init__(self, model: DiffusionGemma, tokenizer: Tokenizer | None = None, generation: dict | None = None):
        self.model, self.tokenizer, self.generation = model, tokenizer, generation or {}

    @classmethod
    def from_pretrained(cls, path, *, dtype=torch.bfloat16, device="cpu", backend="torch", window="shared"):
        model = DiffusionGemma.from_pretrained(path, dtype=dtype, device=device, backend=backend, window=window)
        tokenizer = Tokenizer.from_pretrained(path) if (Path(path) / "tokenizer.json").exists() else None
        return cls(model, tokenizer, read_generation_config(path))

    def sampling_config(self, **overrides) -> SamplingConfig:
        return SamplingConfig.from_generation_config(self.generation, **overrides)

    def prompt_ids(self, prompt, *, chat: bool = True, thinking: bool = False) -> list[list[int]]:
        """str, chat messages, a list of either (a batch), or token ids -> one id list per row."""
        if isinstance(prompt, torch.Tensor):
            return prompt.view(-1, prompt.shape[-1]).tolist()
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)):
            prompt = [prompt]
        if not prompt:
            raise ValueError("empty prompt")
        if all(isinstance(t, int) for t in prompt):
            return [list(prompt)]
        rows = []
        for item in prompt:
            if isinstance(item, list) and all(isinstance(t, int) for t in item):
                rows.append(list(item))
                continue
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer.json: pass token ids")
            messages = [{"role": "user", "content": item}] if isinstance(item, str) else item
            rows.append(self.tokenizer.chat(messages, thinking=thinking) if chat else self.tokenizer.encode(item))
        if any(not row for row in rows):
            raise ValueError("empty prompt")
        return rows

    def generate(
        self,
        prompt,
        *,
        chat: bool = True,
        thinking: bool = False,
        reference: bool = False,
        seed: int = 0,
        warm_start=None,
        on_draft=None,
        on_commit=None,
        **sampling,
    ) -> Generation:
        """`sampling` overrides SamplingConfig fields (max_new_tokens, max_denoising_steps, t_min, ...)."""
        cfg = self.sampling_config(**sampling)
        rows = self.prompt_ids(prompt, chat=chat, thinking=thinking)
        P, device = max(map(len, rows)), self.model.device
        if any(t < 0 or t >= self.model.config.vocab_size for row in rows for t in row):
            raise ValueError(f"token ids must lie in [0, {self.model.config.vocab_size})")
        ids = torch.tensor([[cfg.pad_id] * (P - len(r)) + r for r in rows], device=device)  # left padding
        mask = torch.tensor([[False] * (P - len(r)) + [True] * len(r) for r in rows], device=device)
        if warm_start is not None:
            warm_start = torch.as_tensor(warm_start, device=device).view(len(rows), self.model.config.canvas_length)
        sequences, stats = generate_ids(
            self.model,
            ids,
            cfg,
            attention_mask=None if mask.all() else mask,
            reference=reference,
            seed=seed,
            warm_start=warm_start,
            on_draft=on_draft,
            on_commit=on_commit,
        )
        tokens = []
        for row in sequences[:, P:].tolist():
            stop = next((i for i, t in enumerate(row) if t in cfg.stop_ids), None)
            tokens.append(row if stop is None else row[: stop + 1])
        texts = [self.decode([t for t in row if t not in cfg.stop_ids]) for row in tokens]
        return Generation(sequences, tokens, texts, stats)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else " ".join(map(str, ids))
