"""Block-diffusion generation: prefill the prompt, denoise one 256-token canvas at a time, commit it, repeat.

`generate_ids` is the loop of transformers' `DiffusionGemmaForBlockDiffusion.generate`, over any model of the
`interface.Model` protocol; `Pipeline` adds the tokenizer, the chat format, batching with left padding and the
checkpoint's generation defaults. With `reference=True` the loop draws its random numbers exactly as transformers'
`generate` does (same calls, same shapes, same order on the global RNG), so the same `torch.manual_seed` gives the
same tokens.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError, DgemmaError
from ..model.checkpoint import read_generation_config
from ..model.config import BACKENDS, ENGINE_BACKENDS, is_int
from ..model.load import load_model
from ..model.model import check_ids, expected_embedding
from ..model.tokenizer import Tokenizer
from .canvas import CanvasControl
from .engine import load as load_engine
from .interface import Model
from .sampler import (
    FastScores,
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
    tokens: torch.Tensor  # the canvas the next step reads: the accepted samples, the rest renoised


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
    model: Model,
    prompt: torch.Tensor,
    cfg: SamplingConfig,
    *,
    attention_mask: torch.Tensor | None = None,
    reference: bool = False,
    seed: int = 0,
    warm_start: torch.Tensor | None = None,
    on_draft: Callable[[Draft], None] | None = None,
    on_commit: Callable[[int, torch.Tensor], None] | None = None,
    device_loop: bool | None = None,
    control: CanvasControl | None = None,
) -> tuple[torch.Tensor, Stats]:
    """prompt (B, P) left-padded ids -> (B, P + k*C) ids with the committed canvases appended, and statistics.

    `control` pins and constrains canvas positions (runtime/canvas.py; `CanvasControl.build`).

    `device_loop` denoises each canvas in `DeviceLoop` (Triton kernels), without a host sync until the commit; None
    takes the model's own `device_loop` (true for the kernel-backed layers and TensorRT engines; the torch reference
    and ONNX Runtime, whose device is the host, take the per-step PyTorch loop; True there runs the kernels under
    TRITON_INTERPRET=1: tests do).
    """
    if device_loop is None:
        device_loop = not reference and model.device_loop
    if device_loop and reference:
        raise DgemmaError("reference=True draws as transformers does, in the PyTorch loop: it takes no device_loop")
    if not is_int(seed) or not 0 <= seed < 2**63:
        raise DgemmaError(f"seed must be an integer in [0, 2**63), not {seed!r}")
    start = time.perf_counter()
    C, V, positions = model.config.canvas_length, model.config.vocab_size, model.config.max_position_embeddings
    cfg.check_vocabulary(V)
    B, P = check_prompt(prompt, attention_mask, V)
    canvases = math.ceil(cfg.max_new_tokens / C)
    if P + canvases * C > positions:  # before anything is allocated: a huge max_new_tokens is an error, not an OOM
        raise DgemmaError(
            f"a prompt of {P} tokens and {canvases} canvas(es) of {C} for max_new_tokens={cfg.max_new_tokens} need "
            f"{P + canvases * C} positions; the model has {positions} (max_position_embeddings)"
        )
    device = prompt.device
    if warm_start is not None and (not isinstance(warm_start, torch.Tensor) or warm_start.shape != (B, C)):
        found = tuple(warm_start.shape) if isinstance(warm_start, torch.Tensor) else type(warm_start).__name__
        raise DgemmaError(f"warm_start must be a tensor of {B} row(s) of {C} token ids (the canvas), not {found}")
    draws = TorchDraws() if reference else SeededDraws(seed, device)
    cache = model.new_cache(B, P + canvases * C)
    if warm_start is not None:
        check_ids(warm_start, V, cache, "warm_start")
    stats = Stats()
    model.encode(prompt, cache, attention_mask)
    stats.encoder_passes += 1
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    passes = torch.zeros(B, dtype=torch.long, device=device)
    loop = DeviceLoop(model, B, cfg, seed) if device_loop else None
    out = [prompt]
    for k in range(canvases):
        if k > 0:
            model.encode(out[-1], cache)  # commit the previous canvas at the positions it was denoised at
            stats.encoder_passes += 1
        canvas = draws.canvas(B, C, V, device)  # drawn even under a warm start, as transformers does
        if k == 0 and warm_start is not None:
            canvas = warm_start.to(device)
        restriction = control.at(k) if control is not None else None
        if restriction is not None:
            restriction.project_(canvas)
        if loop is not None:
            argmax = loop.denoise(canvas, cache, finished, passes, stats, k, on_draft, restriction)
        else:
            argmax = _denoise(
                model, canvas, cache, cfg, draws, finished, passes, stats, k, reference, on_draft, restriction
            )
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


def check_prompt(prompt, attention_mask, vocab_size: int) -> tuple[int, int]:
    """A (B, P) integer prompt of in-vocabulary ids, each row with at least one real token -> (B, P)."""
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.dtype not in (torch.int64, torch.int32):
        found = f"{prompt.dtype} {tuple(prompt.shape)}" if isinstance(prompt, torch.Tensor) else type(prompt).__name__
        raise DgemmaError(f"the prompt must be an integer tensor (batch, tokens), not {found}")
    B, P = prompt.shape
    if B == 0 or P == 0:
        raise DgemmaError(f"the prompt {B, P} is empty")
    if (low := int(prompt.min())) < 0 or (high := int(prompt.max())) >= vocab_size:
        raise DgemmaError(f"the prompt holds token ids outside [0, {vocab_size}): {low} to {high}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != prompt.shape:
            raise DgemmaError(f"attention_mask must be a tensor of the prompt's shape {B, P}")
        if not attention_mask.bool().any(-1).all():
            raise DgemmaError("every prompt row needs at least one token the attention mask keeps")
    return B, P


@dataclass
class StepOut:
    """What one denoising step decides for a canvas (B, C): the next canvas, the argmax, what was accepted, the
    entropies, the next soft embedding (B, C, D), and whether each row's stop test passed (B,)."""

    canvas: torch.Tensor
    argmax: torch.Tensor
    accepted: torch.Tensor
    entropy: torch.Tensor
    soft: torch.Tensor
    confident: torch.Tensor


def denoise_step(model, out, t, cfg, draws, *, scores=None, buffer=None, restriction=None) -> StepOut:
    """The sampler's step on a decoder pass's output (hidden states, or an engine's logits) at temperature t: the
    scaled logits (masked where `restriction` says), then transformers' ops in transformers' order (`scores` None, the
    reference) or `FastScores` (whose probabilities give the next soft embedding), entropy-bound acceptance, renoise,
    and the confidence half of the stop test. The PyTorch loop and runtime/rows.py's RowEngine both step through it."""
    z = out / t if model.decoder_output == "logits" else model.logits(out, out=buffer).div_(t)  # (B, C, V) fp32
    if restriction is not None:
        restriction.mask_(z)
    if scores is None:
        sample, argmax, H = draws.sample(z.softmax(-1, dtype=torch.float32)), z.argmax(-1), entropy(z)
        soft = model.soft_embedding(z.to(model.dtype))
    else:
        sample, argmax, H, probs = scores(z, draws)
        soft = expected_embedding(probs, model.embed_tokens.weight)
    accepted = entropy_bound_accept(H, cfg.entropy_bound)
    renoise = draws.canvas(*argmax.shape, model.config.vocab_size, z.device)
    canvas = torch.where(accepted, sample, renoise if restriction is None else restriction.project_(renoise))
    # the mean entropy over the positions not pinned: a pinned position's is 0
    B, C = argmax.shape
    mean_entropy = H.mean(-1) if restriction is None else H.sum(-1) / restriction.free(B, C)
    return StepOut(canvas, argmax, accepted, H, soft, mean_entropy < cfg.confidence_threshold)


def _denoise(
    model, canvas, cache, cfg, draws, finished, passes, stats, k, reference, on_draft, restriction
) -> torch.Tensor:
    """One canvas (B, C) in PyTorch, one host sync per step -> the argmax canvas to commit."""
    B, C, V, device = *canvas.shape, model.config.vocab_size, canvas.device
    scores, buffer = (None, None) if reference else (FastScores((B, C, V), device), torch.empty(B, C, V, device=device))
    argmax, soft = canvas, None
    history = torch.full((cfg.stability_threshold, B, C), -1, device=device)
    # Transformers keeps denoising rows that already ended (and pads them afterwards); otherwise skip them.
    done = torch.zeros_like(finished) if reference else finished.clone()
    for step, remaining in enumerate(range(cfg.max_denoising_steps, 0, -1)):
        passes += ~(done | finished)
        out = model.decode(canvas, cache, soft)
        s = denoise_step(
            model, out, temperature(remaining, cfg), cfg, draws, scores=scores, buffer=buffer, restriction=restriction
        )
        new_canvas, new_argmax, new_soft = s.canvas, s.argmax, s.soft
        if soft is not None:  # stopped rows stay frozen
            new_argmax = torch.where(done[:, None], argmax, new_argmax)
            new_canvas = torch.where(done[:, None], canvas, new_canvas)
            new_soft = torch.where(done[:, None, None], soft, new_soft)
        done = done | (stable(history, new_argmax) & s.confident)
        if on_draft is not None:
            changed = new_argmax != argmax
            on_draft(Draft(k, step, *(t.cpu() for t in (new_argmax, s.accepted, changed, done, new_canvas))))
        stats.accepted_per_step.append(s.accepted.sum(-1).float().mean().item())
        canvas, argmax, soft = new_canvas, new_argmax, new_soft
        if done.all():
            break
    stats.steps_per_canvas.append(step + 1)
    return argmax


class DeviceLoop:
    """The canvas loop of the Triton and TensorRT backends: the fused vocabulary pass (kernels/vocab.py) and the
    sampler's state update (kernels/sampler.py) keep every per-canvas tensor on the device, so a canvas runs without a
    host sync until its commit; the statistics are read once per canvas. The vocabulary pass takes the final hidden
    states (the model's, or a decoder graph exported with output="hidden") or a graph's logits.

    Same semantics as `_denoise` with `SeededDraws` (same first canvas; stopped rows frozen; same statistics); only
    the per-step draws differ, Philox in-kernel instead of torch's generator.

    Stopping: the exact no-sync loop cannot know on the host when the canvas has converged. Running all N steps with
    converged rows predicated off would need no host contact at all (one CUDA graph per canvas) but would pay for
    every unneeded decoder pass: at N = 48 a canvas that converges at step 15 costs 3x. Instead each step queues a copy
    of the device's "still running" flag into pinned memory behind an event; before queueing step i the host reads
    step i-1's flag if its event has fired (a non-blocking query), else waits for step i-2's event. The device has
    step i-1 queued meanwhile, so it never idles for the host (as long as the host queues a step faster than the device
    runs one), and a converged canvas costs at most one extra decoder pass, a no-op: every row is frozen and the device
    gates the statistics and the random-number tick on that flag, so the results do not depend on the timing.
    """

    def __init__(self, model: Model, batch: int, cfg: SamplingConfig, seed: int):
        from ..kernels.sampler import SamplerState

        self.model, self.cfg, self.seed = model, cfg, seed
        self.logits = model.decoder_output == "logits"
        device, N, D = model.device, cfg.max_denoising_steps, model.config.hidden_size
        schedule = torch.stack([temperature(n, cfg) for n in range(N, 0, -1)]).to(device)  # bit-equal, built once
        self.state = SamplerState.new(
            batch, model.config.canvas_length, D, cfg.stability_threshold, schedule, model.dtype
        )
        self.scale = torch.tensor(D**0.5, dtype=model.dtype).item()  # sqrt(D) in the weight dtype, as `embed`
        self.cuda = device.type == "cuda"
        self.flags = torch.ones(N, dtype=torch.int32, pin_memory=self.cuda)  # host copies of `running`, per step
        self.events = [torch.cuda.Event() for _ in range(N)] if self.cuda else []

    def converged(self, step: int) -> bool:
        """Whether the host knows that the reference loop would not run step `step` (see the class docstring)."""
        if step >= 1 and (not self.cuda or self.events[step - 1].query()) and self.flags[step - 1] == 0:
            return True
        if step >= 2 and self.cuda:
            self.events[step - 2].synchronize()
            return bool(self.flags[step - 2] == 0)
        return False

    def denoise(self, canvas, cache, finished, passes, stats: Stats, k: int, on_draft, restriction=None):
        """One canvas (B, C) -> the argmax canvas to commit (a device tensor, overwritten by the next canvas);
        `restriction` pins and constrains its positions (runtime/canvas.py) inside the kernels."""
        from ..kernels.sampler import sampler_step
        from ..kernels.vocab import vocab_pass

        model, cfg, state = self.model, self.cfg, self.state
        (B, C), D, V = canvas.shape, model.config.hidden_size, model.config.vocab_size
        allow_vocab = allow_sampler = None
        if restriction is not None:
            index, bits = restriction.bitset(B, C, V)
            allow_vocab = (index, bits)
            allow_sampler = (index, restriction.ids, restriction.counts, restriction.free(B, C))
        state.start(canvas, finished)
        self.flags.fill_(1)
        for step in range(cfg.max_denoising_steps):
            if self.converged(step):
                break
            last = state.argmax.clone() if on_draft is not None else None
            x = model.decode(state.canvas, cache, state.soft).view(B * C, V if self.logits else D)
            out = vocab_pass(
                x, model.embed_tokens.weight, state.temperature, state.tick, seed=self.seed,
                cap=model.config.final_logit_softcapping, scale=self.scale, soft=state.soft.view(B * C, D),
                keep=state.frozen, logits=self.logits, allow=allow_vocab,
            )  # fmt: skip
            sampler_step(
                state, out.argmax.view(B, C), out.sample.view(B, C), out.entropy.view(B, C), passes,
                V=V, seed=self.seed, bound=cfg.entropy_bound, threshold=cfg.confidence_threshold, allow=allow_sampler,
            )  # fmt: skip
            self.flags[step : step + 1].copy_(state.running, non_blocking=True)
            if self.cuda:
                self.events[step].record()
            if on_draft is not None:  # the callback takes host tensors: a sync per step, only when asked for
                host = (state.argmax, state.accepted, state.argmax != last, state.done, state.canvas)
                on_draft(Draft(k, step, *(t.to("cpu", copy=True) for t in host)))
        counts = state.counts.tolist()  # the canvas's statistics, read once
        steps = counts[0]
        accepted = torch.tensor(counts[1 : 1 + steps * B], dtype=torch.int32).view(steps, B)
        stats.steps_per_canvas.append(steps)
        stats.accepted_per_step.extend(accepted.float().mean(-1).tolist())
        return state.argmax


def as_canvas(ids, rows: int, C: int, device) -> torch.Tensor:
    """Token ids for a canvas per row: (C,) or (rows, C), a tensor or nested lists -> (rows, C) int64."""
    try:
        ids = torch.as_tensor(ids, device=device)
    except (TypeError, ValueError, RuntimeError) as e:
        raise DgemmaError(f"a canvas is a list or tensor of token ids: {e}") from e
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or ids.numel() != rows * C:
        raise DgemmaError(f"a canvas holds {rows} row(s) of {C} token ids, not {ids.dtype} {tuple(ids.shape)}")
    return ids.long().view(rows, C)


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

    def __init__(self, model: Model, tokenizer: Tokenizer | None = None, generation: dict | None = None):
        self.model, self.tokenizer, self.generation = model, tokenizer, generation or {}

    @classmethod
    def from_pretrained(
        cls, path, *, dtype=torch.bfloat16, device="cpu", backend="torch", window="shared", engine=None
    ):
        """backend "onnxruntime" or "tensorrt" runs the graphs in `engine`, a folder written by `dgemma export`, checked
        against this checkpoint (runtime/engine.py); their dtype is the export's, not `dtype`."""
        if backend not in BACKENDS + ENGINE_BACKENDS:
            raise DgemmaError(f"backend must be one of {BACKENDS + ENGINE_BACKENDS}, not {backend!r}")
        if engine is not None and backend not in ENGINE_BACKENDS:
            raise DgemmaError(f"engine={engine!r} is for backend 'onnxruntime' or 'tensorrt', not {backend!r}")
        generation = read_generation_config(path)
        try:  # checked once, here, so a bad file names itself instead of failing in the first generate
            SamplingConfig.from_generation_config(generation)
        except DgemmaError as e:
            raise CheckpointError(f"{Path(path) / 'generation_config.json'}: {e}") from e
        if backend in ENGINE_BACKENDS:
            model = load_engine(path, engine, backend=backend, device=device, window=window)
        else:
            model = load_model(path, dtype=dtype, device=device, backend=backend, window=window)
        tokenizer = Tokenizer.from_pretrained(path) if (Path(path) / "tokenizer.json").exists() else None
        return cls(model, tokenizer, generation)

    def sampling_config(self, **overrides) -> SamplingConfig:
        return SamplingConfig.from_generation_config(self.generation, **overrides)

    def prompt_ids(self, prompt, *, chat: bool = True, thinking: bool = False) -> list[list[int]]:
        """str, chat messages, a list of either (a batch), or token ids -> one id list per row."""
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() not in (1, 2) or prompt.numel() == 0 or prompt.is_floating_point() or prompt.is_complex():
                raise DgemmaError(f"a prompt tensor holds token ids (tokens) or (batch, tokens), not {prompt.dtype} "
                                  f"{tuple(prompt.shape)}")  # fmt: skip
            return prompt.view(-1, prompt.shape[-1]).tolist()
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)):
            prompt = [prompt]
        if not isinstance(prompt, list):
            raise DgemmaError(f"a prompt is a str, chat messages, token ids or a list of them, not {prompt!r}")
        if not prompt:
            raise DgemmaError("empty prompt")
        if all(is_int(t) for t in prompt):
            return [list(prompt)]
        rows = []
        for item in prompt:
            if isinstance(item, list) and item and all(is_int(t) for t in item):
                rows.append(list(item))
                continue
            messages = isinstance(item, list) and all(isinstance(m, dict) for m in item)
            if not isinstance(item, str) and not messages:
                shown = repr(item) if len(repr(item)) < 80 else type(item).__name__
                raise DgemmaError(f"a prompt row is a str, chat messages or token ids (integers), not {shown}")
            if self.tokenizer is None:
                raise DgemmaError("this checkpoint has no tokenizer.json: pass token ids")
            self.check_length(item)
            messages = [{"role": "user", "content": item}] if isinstance(item, str) else item
            rows.append(self.tokenizer.chat(messages, thinking=thinking) if chat else self.tokenizer.encode(item))
        if any(not row for row in rows):
            raise DgemmaError("empty prompt")
        return rows

    def check_length(self, item) -> None:
        """Refuses text that cannot fit the model's positions before tokenizing it (which alone could take minutes):
        no token covers more characters than the tokenizer's longest one."""
        messages = [] if isinstance(item, str) else [m for m in item if isinstance(m, dict)]
        chars = len(item) if isinstance(item, str) else sum(len(str(m.get("content", ""))) for m in messages)
        limit = self.model.config.max_position_embeddings * self.tokenizer.max_token_chars
        if chars > limit:
            raise DgemmaError(
                f"the prompt has {chars} characters, more than {self.model.config.max_position_embeddings} tokens "
                f"(max_position_embeddings) can hold ({limit} at most)"
            )

    def generate(
        self,
        prompt,
        *,
        chat: bool = True,
        thinking: bool = False,
        reference: bool = False,
        seed: int = 0,
        warm_start=None,
        pinned=None,
        allowed=None,
        on_draft=None,
        on_commit=None,
        device_loop=None,
        **sampling,
    ) -> Generation:
        """`sampling` overrides SamplingConfig fields (max_new_tokens, max_denoising_steps, t_min, ...); device_loop as
        in `generate_ids`; `pinned` and `allowed` pin and constrain generated positions (CanvasControl.build)."""
        cfg = self.sampling_config(**sampling)
        rows = self.prompt_ids(prompt, chat=chat, thinking=thinking)
        P, device = max(map(len, rows)), self.model.device
        if any(t < 0 or t >= self.model.config.vocab_size for row in rows for t in row):
            raise DgemmaError(f"token ids must lie in [0, {self.model.config.vocab_size})")
        ids = torch.tensor([[cfg.pad_id] * (P - len(r)) + r for r in rows], device=device)  # left padding
        mask = torch.tensor([[False] * (P - len(r)) + [True] * len(r) for r in rows], device=device)
        if warm_start is not None:
            warm_start = as_canvas(warm_start, len(rows), self.model.config.canvas_length, device)
        C, V = self.model.config.canvas_length, self.model.config.vocab_size
        canvases = math.ceil(cfg.max_new_tokens / C)
        control = CanvasControl.build(pinned, allowed, rows=len(rows), C=C, canvases=canvases, V=V, device=device)
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
            device_loop=device_loop,
            control=control,
        )
        tokens = []
        for row in sequences[:, P:].tolist():
            stop = next((i for i, t in enumerate(row) if t in cfg.stop_ids), None)
            tokens.append(row if stop is None else row[: stop + 1])
        texts = [self.decode([t for t in row if t not in cfg.stop_ids]) for row in tokens]
        return Generation(sequences, tokens, texts, stats)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else " ".join(map(str, ids))
