"""Continuous batching: concurrent generation requests as rows of one engine that share the decoder passes.

Each request is a `Row` with its own KV cache (batch 1, its prompt and canvases), its own seeded draws, its own
`SamplingConfig` and its own canvas progression (canvas index, step, stability history, done). `RowEngine.step` runs
one denoising step of every active row: rows admitted since the last step first encode their prompt (alone, as
`generate_ids` does) and draw their first canvas; then one decoder pass over the rows' canvases (B, C), where RoPE and
attention go through each row's own cache (`RowsPass`) and everything else in a layer runs on the whole batch; then
each row's LM head and sampler step, alone. A row whose canvas stops commits it (an encoder pass of its own) and
draws its next canvas, so rows join and leave at any step and keep their own canvas boundaries.

Batch invariance: a row's tokens equal `generate_ids` of its prompt alone with the same seed and config (the default
PyTorch loop, `device_loop=False`), whoever shares its passes. Per-row caches, positions and draws leave only one
kind of computation that mixes rows: the matrix products of the decoder's layers over the concatenated rows (the
MoE pads each expert's rows to 4 for the same reason, model.model.MIN_ROWS). On the CPU with one torch thread they
give every row the same bits for any batch; with more threads, or on a GPU, a GEMM library may pick another
blocking for another row count and round a row differently. The LM head and the sampler run per row on buffers the
size of one canvas, so the per-step (C, V) state exists once per engine, not once per request.

Models without the reference's layers (the exported graphs of runtime/engine.py, which take one position vector
per pass) run one decoder pass per row; the tokens are the same, only the passes are not shared.

Legend: B active rows, P prompt tokens, C canvas, D hidden, V vocab.
"""

from __future__ import annotations

import math
import time

import torch

from ..errors import DgemmaError
from ..model.config import is_int
from ..model.model import CachePass, DiffusionGemma, Pass
from .canvas import CanvasControl
from .interface import Model
from .pipeline import Draft, Stats, check_prompt, denoise_step
from .sampler import FastScores, SamplingConfig, SeededDraws, finalize_canvas, stable, temperature


class RowsPass(Pass):
    """One decoder pass over several rows, each a chunk in its own cache at its own positions: RoPE and attention
    split the batch into rows and go through each row's own pass; `rows` lists them (the kernel-backed attention of
    model/fused.py runs its kernels per row through it)."""

    def __init__(self, rows: list[Pass]):
        self.rows = rows

    def rotate(self, kind: str, x):
        return torch.cat([p.rotate(kind, xi) for p, xi in zip(self.rows, x.split(1), strict=True)])

    def attend(self, layer: int, kind: str, q, k, v):
        parts = zip(self.rows, q.split(1), k.split(1), v.split(1), strict=True)
        return torch.cat([p.attend(layer, kind, qi, ki, vi) for p, qi, ki, vi in parts])


class Row:
    """One request: its prompt, sampling config and seed, and the state of its generation. Callbacks run on the
    engine's thread: `on_draft(Draft)` after every step (tensors of one row), `on_commit(k, canvas (1, C))` after each
    committed canvas, `on_end(row)` once, when the row has finished (`sequences` set) or failed (`error` set)."""

    def __init__(
        self, prompt, cfg, seed, warm_start, control, canvases, device, on_draft=None, on_commit=None, on_end=None
    ):
        self.prompt, self.cfg, self.seed, self.warm_start, self.canvases = prompt, cfg, seed, warm_start, canvases
        self.control: CanvasControl | None = control
        self.restriction = None  # the current canvas's restricted positions
        self.on_draft, self.on_commit, self.on_end = on_draft, on_commit, on_end
        self.draws = SeededDraws(seed, device)
        self.stats = Stats()
        self.cancelled = False  # set from any thread; the engine drops the row before its next step
        self.sequences: torch.Tensor | None = None  # (1, P + k*C) once finished
        self.error: Exception | None = None
        self.cache = None  # allocated when the row is admitted
        self.out = [prompt]
        self.finished = torch.zeros(1, dtype=torch.bool, device=device)
        self.passes = torch.zeros(1, dtype=torch.long, device=device)
        self.k = self.step = 0  # canvas index, step within the canvas
        self.canvas = self.argmax = self.soft = self.history = self.done = None
        self.start = 0.0

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def prompt_length(self) -> int:
        return self.prompt.shape[1]


class RowEngine:
    """Rows of concurrent requests denoised together, at most `max_batch` per decoder pass; not thread-safe: one
    thread owns the engine and calls `add`, `step` and reads the counters (`row` may run on any thread)."""

    def __init__(self, model: Model, max_batch: int = 8):
        if not is_int(max_batch) or max_batch < 1:
            raise DgemmaError(f"max_batch must be a positive integer, not {max_batch!r}")
        self.model, self.max_batch = model, max_batch
        config, device = model.config, model.device
        self.C, self.V, self.D = config.canvas_length, config.vocab_size, config.hidden_size
        # One decoder pass for all rows needs the model's own layers; exported graphs take one position per pass.
        self.shared = isinstance(model, DiffusionGemma)
        self.scores = FastScores((1, self.C, self.V), device)  # the sampler's buffers, reused by every row
        self.logits = torch.empty(1, self.C, self.V, device=device)
        self.zeros = torch.zeros(1, self.C, self.D, dtype=model.dtype, device=device)  # the first step's soft input
        self.waiting: list[Row] = []
        self.running: list[Row] = []
        self.decoder_passes = 0  # forward passes of the decoder (shared by the rows in them)
        self.decoder_rows = 0  # rows over those passes: decoder_rows / decoder_passes is the mean occupancy
        self.encoder_passes = 0  # prompts and committed canvases

    def row(
        self, prompt, cfg: SamplingConfig, *, seed: int = 0, warm_start=None, pinned=None, allowed=None, **callbacks
    ) -> Row:
        """A checked row for `add`: prompt (P,) or (1, P) token ids, `warm_start` the first canvas's C ids or None,
        `pinned` and `allowed` as `Pipeline.generate` takes them for one row (runtime/canvas.py); refuses what
        `generate_ids` refuses, before anything is allocated. Reads only the model's config and device."""
        if not isinstance(cfg, SamplingConfig):
            raise DgemmaError(f"cfg must be a SamplingConfig, not {type(cfg).__name__}")
        if not is_int(seed) or not 0 <= seed < 2**63:
            raise DgemmaError(f"seed must be an integer in [0, 2**63), not {seed!r}")
        device, positions = self.model.device, self.model.config.max_position_embeddings
        cfg.check_vocabulary(self.V)
        prompt = ids_tensor(prompt, "the prompt", device)
        if prompt.numel() == 0:
            raise DgemmaError("empty prompt")
        prompt = prompt[None] if prompt.dim() == 1 else prompt
        B, P = check_prompt(prompt, None, self.V)
        if B != 1:
            raise DgemmaError(f"a row holds one prompt, not {B}")
        canvases = math.ceil(cfg.max_new_tokens / self.C)
        if P + canvases * self.C > positions:
            raise DgemmaError(
                f"a prompt of {P} tokens and {canvases} canvas(es) of {self.C} for max_new_tokens={cfg.max_new_tokens} "
                f"need {P + canvases * self.C} positions; the model has {positions} (max_position_embeddings)"
            )
        if warm_start is not None:
            warm_start = ids_tensor(warm_start, "warm_start", device)
            if warm_start.is_floating_point() or warm_start.dtype == torch.bool or warm_start.numel() != self.C:
                found = f"{warm_start.dtype} {tuple(warm_start.shape)}"
                raise DgemmaError(f"warm_start holds the first canvas's {self.C} token ids, not {found}")
            warm_start = warm_start.long().view(1, self.C)
            if (low := int(warm_start.min())) < 0 or (high := int(warm_start.max())) >= self.V:
                raise DgemmaError(f"warm_start holds token ids outside [0, {self.V}): {low} to {high}")
        control = CanvasControl.build(pinned, allowed, rows=1, C=self.C, canvases=canvases, V=self.V, device=device)
        return Row(prompt.long(), cfg, seed, warm_start, control, canvases, device, **callbacks)

    def add(self, row: Row) -> None:
        """Queues a row; it starts at the next step with a free place."""
        self.waiting.append(row)

    @property
    def free(self) -> int:
        """Rows that can still join without waiting."""
        return self.max_batch - len(self.running) - len(self.waiting)

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    @torch.no_grad()
    def step(self) -> list[Row]:
        """Admits waiting rows, drops cancelled ones, runs one step of every active row -> the rows that ended in it
        (finished or failed; each has had its `on_end`)."""
        ended = []
        self.waiting = [r for r in self.waiting if not r.cancelled]
        self.running = [r for r in self.running if not r.cancelled]
        while self.waiting and len(self.running) < self.max_batch:
            row = self.waiting.pop(0)
            if self._guard(row, self._admit, row):
                self.running.append(row)
            else:
                ended.append(row)
        rows = self.running
        if not rows:
            return ended
        outputs = self._decode(rows)
        for row, out in zip(rows, outputs, strict=True):
            if out is None or not self._guard(row, self._advance, row, out):
                ended.append(row)
            elif row.sequences is not None:
                ended.append(row)
        self.running = [r for r in rows if r.sequences is None and r.error is None]
        return ended

    def abort(self, error: Exception, rows: list[Row] | None = None) -> None:
        """Fails `rows` (default: every waiting and running row) with `error`: the engine's owner is stopping, or a
        step broke outside any one row's work."""
        for row in self.waiting + self.running if rows is None else rows:
            self._fail(row, error)
        self.waiting = [r for r in self.waiting if r.error is None]
        self.running = [r for r in self.running if r.error is None]

    def _guard(self, row: Row, fn, *args) -> bool:
        """Runs fn(*args) for one row; an exception fails that row alone (its `on_end` sees `error`)."""
        try:
            fn(*args)
            return True
        except Exception as e:  # any failure of one request must leave the others running
            self._fail(row, e)
            return False

    def _fail(self, row: Row, error: Exception) -> None:
        row.error, row.cache = error, None
        if row.on_end is not None:
            try:
                row.on_end(row)
            except Exception:  # the row has failed already; its listener's failure changes nothing
                pass

    def _admit(self, row: Row) -> None:
        """The prompt's encoder pass and the first canvas, as `generate_ids` starts."""
        row.start = time.perf_counter()
        row.cache = self.model.new_cache(1, row.prompt_length + row.canvases * self.C)
        self.model.encode(row.prompt, row.cache)
        row.stats.encoder_passes += 1
        self.encoder_passes += 1
        self._start_canvas(row)

    def _start_canvas(self, row: Row) -> None:
        if row.k > 0:  # commit the previous canvas at the positions it was denoised at
            self.model.encode(row.out[-1], row.cache)
            row.stats.encoder_passes += 1
            self.encoder_passes += 1
        canvas = row.draws.canvas(1, self.C, self.V, self.model.device)  # drawn even under a warm start
        if row.k == 0 and row.warm_start is not None:
            canvas = row.warm_start.clone()
        row.restriction = row.control.at(row.k) if row.control is not None else None
        if row.restriction is not None:
            row.restriction.project_(canvas)
        row.canvas = row.argmax = canvas
        row.soft, row.step = None, 0
        row.history = torch.full((row.cfg.stability_threshold, 1, self.C), -1, device=canvas.device)
        row.done = torch.zeros(1, dtype=torch.bool, device=canvas.device)

    def _decode(self, rows: list[Row]) -> list[torch.Tensor | None]:
        """The decoder pass of every row -> its output (1, C, D or V), or None for a row whose pass failed (failed).

        A shared pass that raises is run again row by row, so only the rows whose own pass fails are failed."""
        self.decoder_rows += len(rows)
        if self.shared and len(rows) > 1:
            self.decoder_passes += 1
            try:
                return list(self._decode_rows(rows).split(1))
            except Exception:  # which row's input broke the batch is unknown: retry each alone (below)
                self.decoder_passes -= 1
        outputs = []
        for row in rows:
            self.decoder_passes += 1
            try:
                outputs.append(self.model.decode(row.canvas, row.cache, row.soft))
            except Exception as e:
                self._fail(row, e)
                outputs.append(None)
        return outputs

    def _decode_rows(self, rows: list[Row]) -> torch.Tensor:
        """DiffusionGemma.decode over the rows' canvases, each at its own cache's committed length -> (B, C, D)."""
        model = self.model
        canvas = torch.cat([r.canvas for r in rows])
        soft = torch.cat([self.zeros if r.soft is None else r.soft for r in rows])
        x = model.self_conditioning(model.embed(canvas), soft)
        passes = RowsPass([CachePass(model, r.cache, self.C, None, causal=False) for r in rows])
        return model(x, passes, True)

    def _advance(self, row: Row, out: torch.Tensor) -> None:
        """One step of `pipeline._denoise` for this row (B = 1, default mode), then its commit if the canvas stops."""
        cfg = row.cfg
        row.passes += 1
        t = temperature(cfg.max_denoising_steps - row.step, cfg)
        s = denoise_step(
            self.model, out, t, cfg, row.draws, scores=self.scores, buffer=self.logits, restriction=row.restriction
        )
        row.done = row.done | (stable(row.history, s.argmax) & s.confident)
        if row.on_draft is not None:
            changed = s.argmax != row.argmax
            host = (s.argmax, s.accepted, changed, row.done, s.canvas)
            row.on_draft(Draft(row.k, row.step, *(t.cpu() for t in host)))
        row.stats.accepted_per_step.append(s.accepted.sum(-1).float().mean().item())
        row.canvas, row.argmax, row.soft = s.canvas, s.argmax, s.soft
        row.step += 1
        if bool(row.done.all()) or row.step == cfg.max_denoising_steps:
            self._commit(row)

    def _commit(self, row: Row) -> None:
        """The canvas stopped: finalize it, then start the next canvas or finish the row, as `generate_ids` does."""
        row.stats.steps_per_canvas.append(row.step)
        committed, row.finished = finalize_canvas(row.argmax, row.finished, row.cfg)
        row.out.append(committed)
        if row.on_commit is not None:
            row.on_commit(row.k, committed.cpu())
        if bool(row.finished.all()) or row.k + 1 == row.canvases:
            self._finish(row)
        else:
            row.k += 1
            self._start_canvas(row)

    def _finish(self, row: Row) -> None:
        sequences = torch.cat(row.out, dim=1)
        valid = (sequences[:, row.prompt_length :] != row.cfg.pad_id).sum(-1)
        row.stats.decoder_passes = row.passes.tolist()
        row.stats.tokens_per_forward = (valid / row.passes.clamp(min=1)).tolist()
        row.stats.new_tokens = int(valid.sum())
        row.stats.seconds = time.perf_counter() - row.start
        row.sequences, row.cache = sequences, None  # the cache's memory goes back at once
        if row.on_end is not None:
            row.on_end(row)


def ids_tensor(ids, what: str, device) -> torch.Tensor:
    """Token ids as given (a list or tensor) -> a tensor; what cannot be one is a DgemmaError naming `what`."""
    try:
        return torch.as_tensor(ids, device=device)
    except (TypeError, ValueError, RuntimeError) as e:
        raise DgemmaError(f"{what} must be token ids (a list or tensor of integers): {e}") from e


def generate_rows(model: Model, requests: list[dict], *, max_batch: int = 8, arrivals=None) -> list[Row]:
    """Runs requests (keyword arguments of `RowEngine.row`: prompt, cfg, seed, warm_start) to the end, together ->
    their rows (`sequences`, `stats`). `arrivals[i]` is the step before which request i joins (default: all at 0),
    for tests and benchmarks of rows that arrive while others run."""
    engine = RowEngine(model, max_batch)
    rows = [engine.row(**r) for r in requests]
    arrivals = [0] * len(rows) if arrivals is None else list(arrivals)
    step = 0
    while step <= max(arrivals) or not engine.idle:
        for row, at in zip(rows, arrivals, strict=True):
            if at == step:
                engine.add(row)
        engine.step()
        step += 1
    for row in rows:
        if row.error is not None:
            raise row.error
    return rows
