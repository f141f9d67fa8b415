"""The entropy-bound sampler's per-step state update on the device, so that a whole canvas runs without a host sync.

After the vocabulary pass (vocab.py) has produced each position's argmax, sample and entropy, one step of the
runtime's denoising loop:

- `_step_kernel`, one program per batch row: entropy-bound acceptance (position j is accepted iff the entropies of
  the positions sorted before it, by (entropy, index), sum to at most the bound: `entropy_bound_accept` without a
  sort, as C x C comparisons in chunks of BLOCK_J rows), uniform renoise of the rest (Philox, the counter after the
  vocabulary pass's (tick, row, v) draws), argmax stability against the s previous argmax canvases (rolled), the
  mean-entropy confidence test and the sticky `done` flag. A row that had stopped before this step keeps its canvas
  and argmax, as the runtime's default loop freezes it.
- `_finish_kernel`, one program: what needs every row. The runtime's loop would run the next step iff some row has
  not stopped; that flag gates the statistics (steps run, accepted counts, decoder passes) and the random-number
  tick, so steps the host queues after convergence change nothing at all. It also advances the step and loads the
  next step's temperature from the schedule (`runtime.sampler.temperature` at every step, computed once on the host,
  so bit-equal to transformers').

Limits: the renoise draws a uint32 modulo V, exactly uniform only for V a power of 2 (the bias is below V / 2^32).
The draws differ from the PyTorch loop's (Philox in-kernel, not torch's generator); the decisions do not.

Reference: runtime/sampler.py's `entropy_bound_accept`, `stable` and `temperature`, and runtime/pipeline.py's
per-step loop with `SeededDraws` (tests/test_sampler_kernel.py).

Legend: B batch rows, C canvas positions, V vocabulary, N max denoising steps, s stability threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .common import REAL, STAGES, WARPS, Launch, Shapes, launch, named, recording

# ----- reference: runtime/sampler.py's entropy_bound_accept, stable and temperature in runtime/pipeline.py's per-step
# loop (runtime/, which the kernels do not import)

# ----- kernels


@triton.jit(do_not_specialize=["seed"])
def _step_kernel(
    entropy_ptr, sample_ptr, argmax_ptr, tick_ptr, step_ptr, running_ptr, allow_index_ptr, allow_ids_ptr,
    allow_counts_ptr, free_ptr,
    B, C, V, s, seed, bound, threshold, M,
    canvas_ptr, last_ptr, history_ptr, done_ptr, frozen_ptr, accepted_ptr, counts_ptr, passes_ptr,
    BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr, ALLOW: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    row0 = b.to(tl.int64) * C
    offs = tl.arange(0, BLOCK_C)
    ok = offs < C
    H = tl.load(entropy_ptr + row0 + offs, mask=ok, other=0.0)
    done = tl.load(done_ptr + b).to(tl.int32)  # scalars stay ints: Triton 3.9's interpreter cannot & a scalar bool
    frozen = tl.load(frozen_ptr + b).to(tl.int32)
    running = tl.load(running_ptr)
    # ----- argmax (a stopped row keeps its own), stable iff equal to each of the s previous ones, which roll
    a = tl.load(argmax_ptr + row0 + offs, mask=ok, other=0)
    a = tl.where(offs < C * (1 - frozen), a, tl.load(last_ptr + row0 + offs, mask=ok, other=0))
    mismatches = 0
    for i in range(0, s):
        hist = history_ptr + (i * B + b).to(tl.int64) * C + offs
        mismatches += tl.sum((ok & (tl.load(hist, mask=ok, other=0) != a)).to(tl.int32), 0)
        shift = offs < tl.where(i + 1 < s, C, 0)
        tl.store(hist, tl.where(shift, tl.load(hist + B * C, mask=shift, other=0), a), mask=ok)  # history[i + 1, b]
    tl.store(last_ptr + row0 + offs, a, mask=ok)
    if ALLOW:  # the mean over the positions not pinned (a pinned one's entropy is 0)
        confident = tl.sum(H, 0) / tl.load(free_ptr + b).to(tl.float32) < threshold
    else:
        confident = tl.sum(H, 0) / C < threshold  # the mean entropy over every position
    stop = (mismatches == 0).to(tl.int32) * confident.to(tl.int32)
    tl.store(done_ptr + b, tl.maximum(stop, done).to(tl.uint8))
    tl.store(passes_ptr + b, tl.load(passes_ptr + b) + running * (1 - done))
    # ----- entropy-bound acceptance and renoise, BLOCK_J positions j at a time against all C positions k
    accepted = 0
    draw0 = (tl.load(tick_ptr) * B * C + row0) * (V + 1) + V  # after the row's V vocabulary-pass draws
    for j0 in range(0, C, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        j_ok = offs_j < C
        Hj = tl.load(entropy_ptr + row0 + offs_j, mask=j_ok, other=0.0)
        before = (H[None, :] < Hj[:, None]) | ((H[None, :] == Hj[:, None]) & (offs[None, :] < offs_j[:, None]))
        prefix = tl.sum(tl.where(before & ok[None, :], H[None, :], 0.0), 1)
        take = (prefix <= bound) & j_ok
        accepted += tl.sum(take.to(tl.int32), 0)
        noise = tl.randint(seed, draw0 + offs_j * (V + 1)).to(tl.int64) % V  # uint32 -> [0, V): exact for V = 2^k
        if ALLOW:  # a restricted position draws from its allowed ids, set[draw % len(set)] (runtime/canvas.py)
            slot = tl.load(allow_index_ptr + row0 + offs_j, mask=j_ok, other=-1)
            at = tl.maximum(slot, 0).to(tl.int64)
            pick = noise % tl.load(allow_counts_ptr + at)
            noise = tl.where(slot >= 0, tl.load(allow_ids_ptr + at * M + pick), noise)
        new = tl.where(take, tl.load(sample_ptr + row0 + offs_j, mask=j_ok, other=0), noise)
        old = tl.load(canvas_ptr + row0 + offs_j, mask=j_ok, other=0)
        tl.store(canvas_ptr + row0 + offs_j, tl.where(offs_j < C * (1 - frozen), new, old), mask=j_ok)
        tl.store(accepted_ptr + row0 + offs_j, take.to(tl.uint8), mask=j_ok)
    tl.store(counts_ptr + tl.load(step_ptr) * B + b, accepted, mask=running != 0)


@triton.jit
def _finish_kernel(
    schedule_ptr,
    B, N,
    done_ptr, frozen_ptr, temperature_ptr, step_ptr, tick_ptr, running_ptr, steps_ptr,
    BLOCK_B: tl.constexpr,
):  # fmt: skip
    offs = tl.arange(0, BLOCK_B)
    ok = offs < B
    done = tl.load(done_ptr + offs, mask=ok, other=1).to(tl.int32)
    running = tl.load(running_ptr)
    tl.store(steps_ptr, tl.load(steps_ptr) + running)
    tl.store(tick_ptr, tl.load(tick_ptr) + running)
    tl.store(running_ptr, running * (1 - tl.min(done, 0)))
    step = tl.load(step_ptr) + 1
    tl.store(step_ptr, step)
    tl.store(frozen_ptr + offs, done.to(tl.uint8), mask=ok)  # from the second step on, a stopped row is frozen
    temperature = tl.load(schedule_ptr + tl.minimum(step, N - 1)) + tl.zeros([BLOCK_B], tl.float32)
    tl.store(temperature_ptr + offs, temperature, mask=ok)


# ----- tiles


class StepTile(NamedTuple):
    BLOCK_J: int  # positions compared against all C per step of the acceptance
    num_warps: int = WARPS
    num_stages: int = STAGES


class Tiles(NamedTuple):
    step: StepTile


def tile_config(device, dtype: torch.dtype, *, canvas: int) -> Tiles:
    """16 positions at a time: a (16, C) comparison, 4k elements at C = 256 (the same everywhere)."""
    return Tiles(StepTile(BLOCK_J=min(16, triton.next_power_of_2(canvas))))


# ----- state and launcher


@dataclass
class SamplerState:
    """Every per-canvas tensor of the no-sync denoising loop, on the device."""

    canvas: torch.Tensor  # (B, C) int64: the next decoder input
    argmax: torch.Tensor  # (B, C) int64: the last step's argmax, which the canvas commits
    soft: torch.Tensor  # (B, C, D): the next decoder call's self-conditioning input, zero at a canvas start
    history: torch.Tensor  # (s, B, C) int64: earlier argmax canvases, -1 at a canvas start
    accepted: torch.Tensor  # (B, C) bool: the last step's acceptance
    done: torch.Tensor  # (B,) bool: the row has stopped (or had finished before this canvas)
    frozen: torch.Tensor  # (B,) bool: the step keeps the row's state (done, from the second step on)
    temperature: torch.Tensor  # (B,) fp32: this step's
    schedule: torch.Tensor  # (N,) fp32: the temperature at each step
    step: torch.Tensor  # (1,) int64: steps queued in this canvas
    tick: torch.Tensor  # (1,) int64: random-number counter, advanced by every step the reference loop would run
    running: torch.Tensor  # (1,) int32: 1 while the reference loop would run the next step
    counts: torch.Tensor  # (1 + N*B,) int32: steps run, then the accepted positions per (step, row)

    @classmethod
    def new(cls, B: int, C: int, D: int, s: int, schedule: torch.Tensor, dtype: torch.dtype) -> SamplerState:
        device, N = schedule.device, schedule.numel()
        ids = lambda *shape: torch.zeros(shape, dtype=torch.int64, device=device)  # noqa: E731
        flags = lambda *shape: torch.zeros(shape, dtype=torch.bool, device=device)  # noqa: E731
        return cls(
            ids(B, C), ids(B, C), torch.zeros(B, C, D, dtype=dtype, device=device), ids(s, B, C), flags(B, C),
            flags(B), flags(B), torch.empty(B, device=device, dtype=torch.float32), schedule, ids(1), ids(1),
            torch.zeros(1, dtype=torch.int32, device=device), torch.zeros(1 + N * B, dtype=torch.int32, device=device),
        )  # fmt: skip

    def start(self, canvas: torch.Tensor, finished: torch.Tensor) -> None:
        """A new canvas: resets the per-canvas state with device copies and fills only (the tick runs on)."""
        self.canvas.copy_(canvas)
        self.argmax.copy_(canvas)
        self.soft.zero_()
        self.history.fill_(-1)
        self.done.copy_(finished)  # rows finished in earlier canvases do not denoise
        self.frozen.zero_()
        self.temperature.copy_(self.schedule[:1].expand_as(self.temperature))
        self.step.zero_()
        self.running.fill_(1)
        self.counts.zero_()


def sampler_step(
    state: SamplerState, argmax, sample, entropy, passes, *, V: int, seed: int, bound: float, threshold: float,
    allow=None,
) -> None:  # fmt: skip
    """One step's acceptance, renoise, stop test and next temperature, in place on `state`: argmax, sample and
    entropy (B, C) from the vocabulary pass of a V-token vocabulary; passes (B,) int64, each row's decoder passes
    while it denoised, advanced in place. `allow` (index (B*C,) int32, -1 where unrestricted; ids (N, M) int64;
    counts (N,) int64; free (B,) int64, the positions not pinned) renoises restricted positions within their allowed
    ids and averages the stop test's entropy over the free positions: runtime/canvas.py's Restriction."""
    B, C = state.canvas.shape
    if argmax.shape != (B, C) or sample.shape != (B, C) or entropy.shape != (B, C) or passes.shape != (B,):
        raise ValueError(f"argmax, sample, entropy must be ({B}, {C}) and passes ({B},)")
    s = state.history.shape[0]
    history = state.history if s else state.canvas  # never read when s = 0, but a pointer must be valid
    flags = [t.view(torch.uint8) for t in (state.done, state.frozen, state.accepted)]
    tile = tile_config(state.canvas.device, entropy.dtype, canvas=C).step
    if allow is not None and (allow[0].shape != (B * C,) or allow[1].dim() != 2 or not allow[1].is_contiguous()):
        raise ValueError(f"allow must be a ({B * C},) index, (N, M) contiguous ids, (N,) counts and ({B},) free")
    unread = state.tick  # without ALLOW: int64 like the ids and counts (the index too: it is never read)
    index, ids, counts, free = allow if allow is not None else (unread, unread, unread, unread)
    launch(
        _step_kernel, (B,),
        entropy, sample, argmax, state.tick, state.step, state.running, index, ids, counts, free,
        B, C, V, s, seed, bound, threshold, ids.shape[1] if allow is not None else 0,
        state.canvas, state.argmax, history, *flags, state.counts[1:], passes,
        BLOCK_C=triton.next_power_of_2(C), ALLOW=allow is not None, **tile._asdict(),
    )  # fmt: skip
    launch(
        _finish_kernel, (1,),
        state.schedule,
        B, state.schedule.numel(),
        flags[0], flags[1], state.temperature, state.step, state.tick, state.running, state.counts,
        BLOCK_B=triton.next_power_of_2(B),
    )  # fmt: skip


def sm90_launches(shapes: Shapes = REAL) -> list[Launch]:
    """The sampler's launches for one canvas (B = 1) on an H100: the launcher called on meta tensors, as
    runtime/pipeline.py's DeviceLoop calls it."""
    C, D, N = shapes.canvas_length, shapes.hidden_size, 48  # any step count N compiles the same
    meta = lambda *shape, dtype: torch.empty(shape, dtype=dtype, device="meta")  # noqa: E731
    state = SamplerState.new(1, C, D, 1, meta(N, dtype=torch.float32), torch.bfloat16)
    argmax, sample = meta(1, C, dtype=torch.int64), meta(1, C, dtype=torch.int64)
    index, ids, counts, free = (meta(*shape, dtype=dtype) for shape, dtype in (
        ((C,), torch.int32), ((C, 16), torch.int64), ((C,), torch.int64), ((1,), torch.int64)
    ))  # fmt: skip
    allow = index, ids, counts, free
    with recording() as launches:
        for restricted in (None, allow):  # free canvases; pinned / allowed positions
            sampler_step(
                state, argmax, sample, meta(1, C, dtype=torch.float32), meta(1, dtype=torch.int64),
                V=shapes.vocab_size, seed=0, bound=0.1, threshold=0.05, allow=restricted,
            )  # fmt: skip
    return named(launches, "sampler.step", "sampler.finish", "sampler.step allow")
