"""DiffusionGemma's entropy-bound sampler (transformers' EntropyBoundSampler), as pure functions over one denoising
step.

Per step: temperature-scale the soft-capped logits (a linear schedule keyed to the steps remaining), sample every
position, accept the lowest-entropy positions whose entropies sum (less the largest) to at most the bound,
re-randomize the rest uniformly, and stop the canvas once its argmax is stable and its mean entropy is below the
confidence threshold. Random draws come from a `Draws` object, so the same math runs on transformers' draw order
(`TorchDraws`, for token-for-token parity) or on a seeded generator that never synchronizes (`SeededDraws`).

Legend: B batch, C canvas positions, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from ..errors import DgemmaError
from ..model.config import is_int, is_number

MAX_DENOISING_STEPS = 4096  # a canvas converges in tens of steps; the cap keeps a typo from running for hours


@dataclass
class SamplingConfig:
    max_new_tokens: int = 256  # rounded up to whole canvases, as transformers does
    max_denoising_steps: int = 48
    t_min: float = 0.4
    t_max: float = 0.8
    entropy_bound: float = 0.1  # nats
    stability_threshold: int = 1  # steps the argmax canvas must repeat; 0 = always stable
    confidence_threshold: float = 0.005  # mean entropy (nats) under which a stable canvas stops; 0 = never early
    stop_ids: tuple[int, ...] = (1, 106, 50)  # <eos>, <turn|>, <|tool_response>
    pad_id: int = 0

    def __post_init__(self):
        """Refuses, naming the field, any value the loop cannot run with (types, ranges, NaN and infinities)."""
        for name in ("max_new_tokens", "max_denoising_steps", "stability_threshold", "pad_id"):
            if not is_int(value := getattr(self, name)) or value < 0:
                raise DgemmaError(f"{name} must be a non-negative integer, not {value!r}")
        for name in ("t_min", "t_max", "entropy_bound", "confidence_threshold"):
            if not is_number(value := getattr(self, name)) or not math.isfinite(value):
                raise DgemmaError(f"{name} must be a finite number, not {value!r}")
        stop_ids = self.stop_ids if isinstance(self.stop_ids, (list, tuple)) else None
        if stop_ids is None or not all(is_int(i) and i >= 0 for i in stop_ids):
            raise DgemmaError(f"stop_ids must be a list of token ids, not {self.stop_ids!r}")
        self.stop_ids = tuple(stop_ids)
        if self.max_new_tokens == 0:
            raise DgemmaError("max_new_tokens must be positive")
        if not 0 < self.max_denoising_steps <= MAX_DENOISING_STEPS:
            raise DgemmaError(
                f"max_denoising_steps must be in [1, {MAX_DENOISING_STEPS}], not {self.max_denoising_steps}"
            )
        if not 0 <= self.t_min < self.t_max:
            raise DgemmaError(f"need 0 <= t_min < t_max, got t_min={self.t_min}, t_max={self.t_max}")
        if self.entropy_bound <= 0:
            raise DgemmaError(f"entropy_bound must be > 0, got {self.entropy_bound}")
        if self.confidence_threshold < 0:
            raise DgemmaError(f"confidence_threshold must be >= 0, got {self.confidence_threshold}")

    @classmethod
    def from_generation_config(cls, generation: dict, **overrides) -> SamplingConfig:
        """Precedence: explicit overrides, then the checkpoint's generation_config.json, then the defaults above."""
        if not isinstance(generation, dict):
            raise DgemmaError(f"a generation config is a JSON object, not {type(generation).__name__}")
        if unknown := sorted(set(overrides) - {f.name for f in fields(cls)}):
            raise DgemmaError(f"unknown sampling parameters {unknown}; known: {[f.name for f in fields(cls)]}")
        values = {k: generation[k] for k in (f.name for f in fields(cls)) if generation.get(k) is not None}
        if (sampler := generation.get("sampler_config")) is not None and not isinstance(sampler, dict):
            raise DgemmaError(f"sampler_config is a JSON object, not {type(sampler).__name__}")
        if sampler and sampler.get("entropy_bound") is not None:
            values["entropy_bound"] = sampler["entropy_bound"]
        if (eos := generation.get("eos_token_id")) is not None:
            values["stop_ids"] = eos if isinstance(eos, list) else [eos]
        if generation.get("pad_token_id") is not None:
            values["pad_id"] = generation["pad_token_id"]
        return cls(**(values | {k: v for k, v in overrides.items() if v is not None}))

    def check_vocabulary(self, vocab_size: int) -> None:
        """The stop and pad ids must be tokens of the model."""
        for name, ids in (("stop_ids", self.stop_ids), ("pad_id", (self.pad_id,))):
            if any(i >= vocab_size for i in ids):
                raise DgemmaError(f"{name} {ids} lie outside the vocabulary of {vocab_size} tokens")


def temperature(remaining: int, cfg: SamplingConfig) -> torch.Tensor:
    """Linear in the steps remaining (N at the first step, 1 at the last): t_max first, never quite t_min.

    Computed in fp32 from an int32 step count, as transformers does: a float64 schedule is 1 ulp off at 12 of 48 steps.
    """
    step = torch.tensor(remaining, dtype=torch.int32)
    return cfg.t_min + (cfg.t_max - cfg.t_min) * (step / cfg.max_denoising_steps)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) per position, computed as torch.distributions.Categorical does."""
    logp = logits - logits.logsumexp(-1, keepdim=True)
    return -(logp.clamp(min=torch.finfo(logp.dtype).min) * logp.softmax(-1)).sum(-1)


def entropy_bound_accept(H: torch.Tensor, bound: float) -> torch.Tensor:
    """EB-sampler: accept the k lowest-entropy positions while the sum of their entropies less the largest <= bound."""
    sorted_H, order = H.sort(dim=-1)
    keep = sorted_H.cumsum(-1) - sorted_H <= bound  # the lowest-entropy position is always accepted
    return torch.zeros_like(keep).scatter(-1, order, keep)


def stable(history: torch.Tensor, argmax: torch.Tensor) -> torch.Tensor:
    """history (s, B, C) of earlier argmax canvases, -1 filled at a canvas start; rolls `argmax` in, returns (B,)."""
    if history.shape[0] == 0:
        return torch.ones(argmax.shape[0], dtype=torch.bool, device=argmax.device)
    same = (history == argmax[None]).all(-1).all(0)
    history.copy_(torch.cat([history[1:], argmax[None]]))
    return same


def finalize_canvas(canvas: torch.Tensor, finished: torch.Tensor, cfg: SamplingConfig):
    """Rows already finished become all pad; a stop id anywhere ends its row, the stop kept and the tail padded.

    Returns the committed canvas (B, C) and the updated finished flags (B,).
    """
    canvas = canvas.masked_fill(finished[:, None], cfg.pad_id)
    is_stop = torch.isin(canvas, torch.tensor(cfg.stop_ids, device=canvas.device))
    seen = is_stop.cumsum(-1)
    after_stop = (seen > 0) & ~((seen == 1) & is_stop)
    return canvas.masked_fill(after_stop, cfg.pad_id), finished | is_stop.any(-1)


class TorchDraws:
    """transformers' draws on the global RNG, in its order: randint canvas, then per step multinomial and randint."""

    def canvas(self, B: int, C: int, V: int, device) -> torch.Tensor:
        return torch.randint(0, V, (B, C), device=device)

    def sample(self, probs: torch.Tensor) -> torch.Tensor:
        B, C, V = probs.shape
        return torch.multinomial(probs.view(-1, V), num_samples=1).view(B, C)


class SeededDraws:
    """Draws from a private generator, with no host sync. Sampling inverts the CDF: one uniform draw per position,
    where an exponential race (argmax p / Exp(1)) needs V of them, which cost more than the rest of a CPU step's
    sampler math together."""

    def __init__(self, seed: int, device):
        self.generator = torch.Generator(device).manual_seed(seed)

    def canvas(self, B: int, C: int, V: int, device) -> torch.Tensor:
        return torch.randint(0, V, (B, C), device=device, generator=self.generator)

    def sample(self, probs: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """probs (B, C, V), rows summing to about 1 -> ids (B, C); `out` a V-sized buffer the CDF may overwrite."""
        cdf = torch.cumsum(probs, -1, out=out)  # the CPU kernel accumulates in float64
        total = cdf[..., -1:]
        u = torch.rand(total.shape, generator=self.generator, device=probs.device, dtype=cdf.dtype)
        # Strictly below the total, so the search never runs past the last token with mass; right=True skips the
        # tokens of zero probability, whose CDF does not rise.
        x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
        return torch.searchsorted(cdf, x, right=True).squeeze(-1)


class FastScores:
    """The default mode's per-step math over temperature-scaled finite logits (B, C, V): samples, argmax, entropy and
    probabilities, the same quantities as the reference's softmax, argmax and `entropy`, in two V-sized writes
    (log-softmax, its exponential; the CDF reuses the log-softmax's buffer) instead of seven. The buffers are
    allocated once: a fresh (B, C, V) tensor per op costs the CPU its page faults, about as much as the op."""

    def __init__(self, shape: tuple[int, int, int], device):
        self.logp = torch.empty(shape, device=device)
        self.probs = torch.empty(shape, device=device)

    def __call__(self, z: torch.Tensor, draws: SeededDraws):
        argmax = z.max(-1).indices  # the first maximum, as argmax, in half argmax's time on the CPU
        logp = torch.log_softmax(z, -1, out=self.logp)
        probs = torch.exp(logp, out=self.probs)
        H = -torch.einsum("bcv,bcv->bc", probs, logp)
        return draws.sample(probs, out=self.logp), argmax, H, probs
