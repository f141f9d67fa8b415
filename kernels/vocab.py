"""The vocabulary pass of a denoising step, fused: final hidden states in, everything the sampler needs out, reading
the embedding table E twice and never writing the scaled logits in fp32.

Per position (row) of h: the scaled logits z = softcap(h E^T) / T, their argmax, a sample from softmax(z), the max
probability and the entropy of softmax(z), and the next step's self-conditioning input softmax(bf16(z)) @ E * sqrt(D).

- `_stats_kernel`, one program per (row tile, vocabulary split), streams its split of E once: each tile of logits is
  accumulated in fp32, rounded to the activation dtype (as the reference's F.linear output is), soft-capped
  30 tanh(x / 30) and divided by the row's temperature, in that order, as `DiffusionGemma.logits` and the sampler do.
  Per row it keeps online: the max and its first index; l - 1 with l = sum exp(z - max) (the max's own term kept out,
  so a near-deterministic row keeps the leading term of its entropy); sum exp(z - max) (z - max) for the entropy
  H = log l - that / l; the Gumbel-max key and index, z + g with g = -log(-log u) from Philox (`tl.rand`, key =
  seed, counter = ((tick * R + row) * (V + 1) + v): reproducible, and independent of the tiling); and the normalizer
  of softmax over the rounded logits, which is what self-conditioning takes. It stashes bf16(z), the reference's own
  self-conditioning logits (`z.to(model.dtype)`).
- `_combine_kernel`, one program per (block of rows, vocabulary chunk), merges the rows' splits, writes their outputs
  and turns the stash into the probabilities softmax_fp32(bf16(z)) cast to bf16, in place: exactly the reference's
  `probs` operand.
- `_soft_kernel` (split-K over the vocabulary) and `_soft_reduce_kernel`: probs @ E, rounded to the activation dtype,
  times sqrt(D) rounded to it, as `DiffusionGemma.soft_embedding`; rows whose canvas has stopped keep their old value.

Stash or recompute: the soft embedding needs every logit again after the row's normalizer is known. Stashing bf16(z)
costs 134 MB per 256 positions (written once, normalized in place, read once from HBM: ~0.54 GB of traffic, ~0.16 ms
on an H100). Recomputing needs no buffer, but the soft-embedding GEMM is tiled over D (its output, 256 x 2816 fp32,
cannot live in one program), so every D tile would redo the LM head's 0.38 TFLOP over all of D: 11 times at
BLOCK_N = 256, ~4 TFLOP, ~5 ms at the bf16 peak, half a decoder step. So the stash is the default;
`vocab_pass(stash=False)` runs the recompute variant (RECOMPUTE in `_soft_kernel`) for a memory-starved batch.
With `logits`, the pass reads an exported decoder graph's fp32 soft-capped logits where it would compute them.

Limits: the tiles are chosen from the sm_90a report and byte counts, not by timing; `_soft_kernel` and the logits
variant of `_stats_kernel` spill on sm_90a (tile_config). Runs under Triton 3.6 and 3.9 (and its interpreter,
TRITON_INTERPRET=1, where bf16 dots are wrong: CPU tests use fp32 and fp16).

Reference: `vocab_ref` below, the model's and the sampler's own ops unfused (tests/test_vocab.py).

Legend: R rows (B batch rows of C canvas positions), V vocabulary, D hidden, S splits of the reduced dimension.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .common import (
    NEG,
    REAL,
    STAGES,
    WARPS,
    Launch,
    Shapes,
    launch,
    log1p,
    named,
    precision,
    recording,
    split,
    tanh,
    target,
)

# ----- reference


def vocab_ref(h, weight, temperature, cap: float, scale: float):
    """h (R, D), weight (V, D), temperature (B,) for R = B*C rows -> scaled logits (R, V) fp32, then argmax, max
    probability, entropy (R,) and soft embedding (R, D): `DiffusionGemma.logits`, the sampler's temperature and
    `entropy` (runtime/sampler.py) and `DiffusionGemma.soft_embedding`, unfused."""
    T = temperature.repeat_interleave(h.shape[0] // temperature.numel())[:, None]
    z = cap * torch.tanh(F.linear(h, weight).float() / cap) / T  # read E, write R*V fp32; then 3 read+write passes
    probs = z.to(weight.dtype).softmax(-1, dtype=torch.float32).to(weight.dtype)  # read R*V fp32 twice, write bf16
    soft = (probs @ weight) * torch.tensor(scale, dtype=weight.dtype)  # read R*V bf16 and E again
    logp = z - z.logsumexp(-1, keepdim=True)  # the entropy as torch.distributions.Categorical computes it
    entropy = -(logp.clamp(min=torch.finfo(logp.dtype).min) * logp.softmax(-1)).sum(-1)
    return z, z.argmax(-1), z.softmax(-1).amax(-1), entropy, soft  # 4 more passes over R*V fp32


# ----- kernels

MIN_EXP = tl.constexpr(5.9604645e-08)  # 2^-24: the least -log(u) for u < 1 in fp32; floors an approximate log
G_MAX = tl.constexpr(17.0)  # > -log(MIN_EXP) = 16.64: no Gumbel draw exceeds it


@triton.jit
def _scaled_logits(
    h_ptr, w_ptr, rows, cols, D, stride_hr, stride_wv, cap, temp,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """(BLOCK_M, BLOCK_V) fp32 tile of softcap(h @ E^T) / T, for in-bounds (clamped) int64 rows and vocabulary ids."""
    acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    h_rows = h_ptr + rows[:, None] * stride_hr
    w_rows = w_ptr + cols[:, None] * stride_wv
    for d0 in range(0, D, BLOCK_D):
        d_ok = (d0 + offs_d < D)[None, :]
        h = tl.load(h_rows + d0 + offs_d[None, :], mask=d_ok, other=0.0)
        w = tl.load(w_rows + d0 + offs_d[None, :], mask=d_ok, other=0.0)
        acc += tl.dot(h, tl.trans(w), input_precision=PRECISION)
    x = acc.to(h_ptr.dtype.element_ty).to(tl.float32)  # F.linear's output is in the activation dtype
    return cap * tanh(x / cap) / temp[:, None]


@triton.jit
def _tile(
    h_ptr, w_ptr, allow_index_ptr, allow_bits_ptr, rows, cols, D, words, stride_hr, stride_wv, cap, temp,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, LOGITS: tl.constexpr,
    ALLOW: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """The scaled logits of (rows, cols): computed from the hidden states, or read from a graph's soft-capped
    fp32 logits (h_ptr (R, V) with LOGITS) and divided by the temperature, as the PyTorch sampler does. With ALLOW,
    a restricted row's logits outside its allowed ids (bits of allow_bits, row allow_index[row], -1 for none) are
    masked, as runtime/canvas.py's Restriction.mask_ does."""
    if LOGITS:  # a constexpr if/else: only the taken branch compiles (an early return would compile both)
        z = tl.load(h_ptr + rows[:, None] * stride_hr + cols[None, :]) / temp[:, None]
    else:
        z = _scaled_logits(
            h_ptr, w_ptr, rows, cols, D, stride_hr, stride_wv, cap, temp, BLOCK_M, BLOCK_V, BLOCK_D, PRECISION
        )
    if ALLOW:
        slot = tl.load(allow_index_ptr + rows)  # (BLOCK_M,)
        bits = allow_bits_ptr + tl.maximum(slot, 0).to(tl.int64)[:, None] * words + (cols // 32)[None, :]
        allowed = (tl.load(bits) >> (cols % 32).to(tl.int32)[None, :]) & 1
        z = tl.where((slot < 0)[:, None] | (allowed != 0), z, NEG)
    return z


@triton.jit(do_not_specialize=["seed"])
def _stats_kernel(
    h_ptr, w_ptr, temp_ptr, tick_ptr, allow_index_ptr, allow_bits_ptr,
    R, V, D, C, seed, split_len, cap, words,
    stride_hr, stride_wv, stride_zr,
    z_ptr, part_f_ptr, part_i_ptr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, STASH: tl.constexpr,
    LOGITS: tl.constexpr, ALLOW: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, split = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    rows = tl.minimum(rows, R - 1).to(tl.int64)  # clamped: loads unmasked, stores masked
    temp = tl.load(temp_ptr + rows // C)
    draw = (tl.load(tick_ptr) * R + rows) * (V + 1)  # + v: the Philox counter of (tick, row, v)
    dtype = w_ptr.dtype.element_ty
    m_i = tl.full([BLOCK_M], NEG, tl.float32)
    arg_i = tl.zeros([BLOCK_M], tl.int32)
    lm_i = tl.full([BLOCK_M], -1.0, tl.float32)  # l - 1, -1 while empty
    s_i = tl.zeros([BLOCK_M], tl.float32)  # sum exp(z - m) (z - m)
    lb_i = tl.zeros([BLOCK_M], tl.float32)  # sum exp(rounded z - rounded m)
    g_i = tl.full([BLOCK_M], NEG, tl.float32)  # best Gumbel key
    garg_i = tl.zeros([BLOCK_M], tl.int32)
    start = split * split_len
    end = tl.minimum(start + split_len, V)
    for v0 in range(start, end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < end
        z = _tile(
            h_ptr, w_ptr, allow_index_ptr, allow_bits_ptr, rows, tl.minimum(cols, V - 1).to(tl.int64), D, words,
            stride_hr, stride_wv, cap, temp, BLOCK_M, BLOCK_V, BLOCK_D, LOGITS, ALLOW, PRECISION,
        )  # fmt: skip
        if STASH:
            stash = z_ptr + rows[:, None] * stride_zr + cols[None, :]
            tl.store(stash, z.to(z_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
        z = tl.where(col_ok[None, :], z, NEG)
        # ----- max, first argmax, l - 1 and the entropy sum, rescaled when the max moves
        tile_max, tile_arg = tl.max(z, 1, return_indices=True, return_indices_tie_break_left=True)
        moved = tile_max > m_i  # strictly: a tie keeps the earlier index, as torch.argmax does
        m_new = tl.maximum(m_i, tile_max)
        arg_i = tl.where(moved, v0 + tile_arg, arg_i)
        alpha = tl.exp(m_i - m_new)
        d = z - m_new[:, None]
        e = tl.exp(d)
        rest = tl.sum(tl.where(cols[None, :] == arg_i[:, None], 0.0, e), 1)  # the new max's own 1 left out
        s_i = alpha * (s_i + (m_i - m_new) * (lm_i + 1.0)) + tl.sum(e * d, 1)
        lm_i = alpha * lm_i + tl.where(moved, alpha, 0.0) + rest
        # ----- softmax normalizer over the rounded logits: max(round(z)) = round(max z), rounding being monotone
        # (masked logits and the empty max are kept out of the cast: -1e30 overflows fp16)
        mb_new = m_new.to(dtype).to(tl.float32)
        zb = tl.where(col_ok[None, :], z, m_new[:, None]).to(dtype).to(tl.float32)
        eb = tl.where(col_ok[None, :], tl.exp(zb - mb_new[:, None]), 0.0)
        lb_i = lb_i * tl.exp(tl.where(lb_i > 0, m_i, m_new).to(dtype).to(tl.float32) - mb_new) + tl.sum(eb, 1)
        m_i = m_new
        # ----- Gumbel-max sample; a tile none of whose keys can beat its rows' best so far skips its draws (exact)
        if tl.max(tl.where(row_ok, tile_max + G_MAX - g_i, -1.0), 0) > 0:
            u = tl.rand(seed, draw[:, None] + cols[None, :])
            key = tl.where(col_ok[None, :], z - tl.log(tl.maximum(-tl.log(u), MIN_EXP)), NEG)
            k_max, k_arg = tl.max(key, 1, return_indices=True, return_indices_tie_break_left=True)
            better = k_max > g_i
            g_i = tl.where(better, k_max, g_i)
            garg_i = tl.where(better, v0 + k_arg, garg_i)
    # ----- this split's partial state, (field, split, row) planes
    plane = tl.num_programs(1) * R
    at = split * R + rows
    tl.store(part_f_ptr + at, m_i, mask=row_ok)
    tl.store(part_f_ptr + plane + at, lm_i, mask=row_ok)
    tl.store(part_f_ptr + 2 * plane + at, s_i, mask=row_ok)
    tl.store(part_f_ptr + 3 * plane + at, lb_i, mask=row_ok)
    tl.store(part_f_ptr + 4 * plane + at, g_i, mask=row_ok)
    tl.store(part_i_ptr + at, arg_i, mask=row_ok)
    tl.store(part_i_ptr + plane + at, garg_i, mask=row_ok)


@triton.jit
def _combine_kernel(
    part_f_ptr, part_i_ptr,
    R, V, S, chunk,
    stride_zr,
    z_ptr, argmax_ptr, sample_ptr, max_prob_ptr, entropy_ptr, norm_ptr,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_V: tl.constexpr, STASH: tl.constexpr,
):  # fmt: skip
    # grid (row blocks, vocabulary chunks): every program merges its rows' splits (a few loads); the chunks share
    # the normalization of the stash, the first one writes the rows' outputs
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    rows = tl.minimum(rows, R - 1).to(tl.int64)
    offs = tl.arange(0, BLOCK_S)
    ok = (offs < S)[None, :]
    plane = S * R
    at = offs[None, :] * R + rows[:, None]  # (BLOCK_R, BLOCK_S)
    m = tl.load(part_f_ptr + at, mask=ok, other=NEG)
    lm = tl.load(part_f_ptr + plane + at, mask=ok, other=-1.0)
    s = tl.load(part_f_ptr + 2 * plane + at, mask=ok, other=0.0)
    lb = tl.load(part_f_ptr + 3 * plane + at, mask=ok, other=0.0)
    g = tl.load(part_f_ptr + 4 * plane + at, mask=ok, other=NEG)
    # ----- the first split holding the max owns the argmax and the max's own 1; the others add l times their scale
    m_max, first = tl.max(m, 1, return_indices=True, return_indices_tie_break_left=True)
    w = tl.exp(m - m_max[:, None])
    is_first = offs[None, :] == first[:, None]
    lm_all = tl.sum(tl.where(is_first, lm, w * (lm + 1.0)), 1)
    s_all = tl.sum(w * (s + (m - m_max[:, None]) * (lm + 1.0)), 1)
    l_all = 1.0 + lm_all
    _, g_first = tl.max(g, 1, return_indices=True, return_indices_tie_break_left=True)
    # ----- softmax over the rounded logits: its max and sum
    dtype = z_ptr.dtype.element_ty
    mb = m_max.to(dtype).to(tl.float32)
    lb_all = tl.sum(tl.exp(tl.where(ok, m, m_max[:, None]).to(dtype).to(tl.float32) - mb[:, None]) * lb, 1)
    if tl.program_id(1) == 0:
        arg = tl.sum(tl.where(is_first, tl.load(part_i_ptr + at, mask=ok, other=0), 0), 1)
        garg = tl.sum(tl.where(offs[None, :] == g_first[:, None], tl.load(part_i_ptr + plane + at, mask=ok), 0), 1)
        tl.store(argmax_ptr + rows, arg.to(tl.int64), mask=row_ok)
        tl.store(sample_ptr + rows, garg.to(tl.int64), mask=row_ok)
        tl.store(max_prob_ptr + rows, 1.0 / l_all, mask=row_ok)
        tl.store(entropy_ptr + rows, log1p(lm_all) - s_all / l_all, mask=row_ok)
        tl.store(norm_ptr + 2 * rows, mb, mask=row_ok)
        tl.store(norm_ptr + 2 * rows + 1, lb_all, mask=row_ok)
    # ----- the stash becomes the bf16 probabilities, in place
    if STASH:
        start = tl.program_id(1) * chunk
        end = tl.minimum(start + chunk, V)
        for v0 in range(start, end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            c_ok = (cols < end)[None, :]
            tile = z_ptr + rows[:, None] * stride_zr + cols[None, :]
            x = tl.load(tile, mask=c_ok, other=0.0).to(tl.float32)
            tl.store(tile, (tl.exp(x - mb[:, None]) / lb_all[:, None]).to(dtype), mask=row_ok[:, None] & c_ok)


@triton.jit
def _soft_kernel(
    p_ptr, h_ptr, w_ptr, temp_ptr, norm_ptr, allow_index_ptr, allow_bits_ptr,
    R, V, D, C, split_len, cap, words,
    stride_pr, stride_hr, stride_wv,
    part_ptr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    RECOMPUTE: tl.constexpr, LOGITS: tl.constexpr, ALLOW: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # grid (row tiles, D tiles, vocabulary splits), row tiles fastest: the programs sharing an E tile run together
    pid_m, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    rows = tl.minimum(rows, R - 1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < D
    dtype = w_ptr.dtype.element_ty
    if RECOMPUTE:
        temp = tl.load(temp_ptr + rows // C)
        mb, lb = tl.load(norm_ptr + 2 * rows), tl.load(norm_ptr + 2 * rows + 1)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    start = split * split_len
    end = tl.minimum(start + split_len, V)
    for k0 in range(start, end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < end
        if RECOMPUTE:
            z = _tile(
                h_ptr, w_ptr, allow_index_ptr, allow_bits_ptr, rows, tl.minimum(offs_k, V - 1).to(tl.int64), D,
                words, stride_hr, stride_wv, cap, temp, BLOCK_M, BLOCK_K, BLOCK_D, LOGITS, ALLOW, PRECISION,
            )  # fmt: skip
            p = tl.exp(z.to(dtype).to(tl.float32) - mb[:, None]) / lb[:, None]
            p = tl.where(k_ok[None, :], p, 0.0).to(dtype)
        else:
            p = tl.load(p_ptr + rows[:, None] * stride_pr + offs_k[None, :], mask=k_ok[None, :], other=0.0)
        w_tile = w_ptr + offs_k.to(tl.int64)[:, None] * stride_wv + offs_n[None, :]
        w = tl.load(w_tile, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(p, w, input_precision=PRECISION)
    out = part_ptr + (split * R + rows)[:, None] * D + offs_n[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _soft_reduce_kernel(
    part_ptr, keep_ptr,
    R, D, C, S, scale,
    stride_or,
    out_ptr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    update = (rows < R) & (tl.load(keep_ptr + tl.minimum(rows, R - 1) // C) == 0)  # kept rows are not written
    ok = update[:, None] & (offs < D)[None, :]
    at = rows.to(tl.int64)[:, None] * D + offs[None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    for s in range(0, S):  # a fixed order: the same sum on every run
        acc += tl.load(part_ptr + s * R * D + at, mask=ok, other=0.0)
    dtype = out_ptr.dtype.element_ty
    soft = (acc.to(dtype).to(tl.float32) * scale).to(dtype)  # the matmul's output, then the scale, each rounded
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_or + offs[None, :], soft, mask=ok)


# ----- tiles


class StatsTile(NamedTuple):
    BLOCK_M: int  # rows per program
    BLOCK_V: int  # vocabulary ids per step
    BLOCK_D: int  # hidden dims per step of the logits' dot (and of the recomputed logits in `_soft_kernel`)
    num_warps: int = WARPS
    num_stages: int = STAGES


class CombineTile(NamedTuple):
    BLOCK_R: int  # rows per program
    BLOCK_V: int  # vocabulary ids per step of the stash's normalization
    num_warps: int = WARPS
    num_stages: int = STAGES


class SoftTile(NamedTuple):
    BLOCK_M: int  # rows per program
    BLOCK_N: int  # output (hidden) dims per program
    BLOCK_K: int  # vocabulary ids per step
    BLOCK_D: int  # hidden dims per step of the recomputed logits' dot
    num_warps: int = WARPS
    num_stages: int = STAGES


class ReduceTile(NamedTuple):
    BLOCK_R: int  # rows per program
    BLOCK_N: int  # hidden dims per program
    num_warps: int = WARPS
    num_stages: int = STAGES


class Tiles(NamedTuple):
    stats: StatsTile
    combine: CombineTile
    soft: SoftTile
    reduce: ReduceTile


def tile_config(device, dtype: torch.dtype) -> Tiles:
    """Per-kernel tiles (the same for every dtype and shape): small ones under the interpreter (its cost is per op,
    so not the smallest legal); on a GPU, large tiles for sm_90a. In the sm_90a report (Triton 3.9's ptxas) stats
    over hidden states needs 255 registers and 24 B of stack, over fp32 logits 3.5 kB (none under Triton 3.6); soft
    1.2 kB (200 B under 3.6). soft at BLOCK_N = 128 spills nothing but reads the probability stash 22 times instead
    of 11 (2.9 GB against 1.5 GB per 256 positions)."""
    if not target(device).gpu:
        return Tiles(
            stats=StatsTile(BLOCK_M=16, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=1),
            combine=CombineTile(BLOCK_R=16, BLOCK_V=128),
            soft=SoftTile(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, BLOCK_D=32, num_warps=4, num_stages=1),
            reduce=ReduceTile(BLOCK_R=16, BLOCK_N=64),
        )
    return Tiles(
        stats=StatsTile(BLOCK_M=128, BLOCK_V=64, BLOCK_D=64, num_warps=8, num_stages=3),
        combine=CombineTile(BLOCK_R=4, BLOCK_V=1024, num_warps=4),
        soft=SoftTile(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, BLOCK_D=64, num_warps=8, num_stages=3),
        reduce=ReduceTile(BLOCK_R=8, BLOCK_N=256, num_warps=4),
    )


# ----- launcher


class VocabOut(NamedTuple):
    argmax: torch.Tensor  # (R,) int64: first index of the max scaled logit
    sample: torch.Tensor  # (R,) int64: a draw from softmax(scaled logits)
    max_prob: torch.Tensor  # (R,) fp32: max of softmax(scaled logits)
    entropy: torch.Tensor  # (R,) fp32: entropy (nats) of softmax(scaled logits)
    soft: torch.Tensor  # (R, D) activation dtype: softmax_fp32(bf16(scaled logits)) in bf16 @ E * sqrt(D)


def vocab_pass(
    h, weight, temperature, tick, *, seed: int, cap: float, scale: float, soft=None, keep=None, stash: bool = True,
    logits: bool = False, allow=None, splits: int | None = None, config: Tiles | None = None,
) -> VocabOut:  # fmt: skip
    """h (R, D) final hidden states, weight (V, D) the tied embedding table, temperature (B,) fp32 for R = B*C rows
    (row r has temperature[r // C]), tick (1,) int64 the step's random-number counter, on the device.

    With `logits`, h is instead the (R, V) fp32 soft-capped logits of an exported decoder graph (runtime/engine.py);
    the rest is the same pass, reading them where it would compute them.
    Writes the soft embedding into `soft` (R, D) when given, except for the rows of batch rows with keep (B,) set.
    `allow` (index (R,) int32, -1 where unrestricted; bits (N, ceil(V / 32)) int32) restricts rows to token ids:
    runtime/canvas.py's Restriction.bitset.
    """
    (V, D), B, R = weight.shape, temperature.numel(), h.shape[0]
    want = (R, V, torch.float32) if logits else (R, D, weight.dtype)
    if (*h.shape, h.dtype) != want or R % B:
        raise ValueError(f"h {tuple(h.shape)} {h.dtype} (want {want}), weight {tuple(weight.shape)}, B={B}")
    if h.stride(-1) != 1 or weight.stride(-1) != 1 or temperature.dtype != torch.float32:
        raise ValueError("h and weight need a contiguous last dim, temperature must be fp32")
    if tick.shape != (1,) or tick.dtype != torch.int64:
        raise ValueError(f"tick must be a (1,) int64 tensor, not {tuple(tick.shape)} {tick.dtype}")
    if soft is None:
        soft = torch.empty(R, D, device=h.device, dtype=weight.dtype)
    if soft.shape != (R, D) or soft.dtype != weight.dtype or soft.stride(-1) != 1:
        raise ValueError(f"soft must be ({R}, {D}) {weight.dtype} with a contiguous last dim")
    keep = torch.zeros(B, dtype=torch.bool, device=h.device) if keep is None else keep
    if keep.shape != (B,) or keep.dtype != torch.bool:
        raise ValueError(f"keep must be ({B},) bool")
    if allow is not None:
        index, bits = allow
        if index.shape != (R,) or index.dtype != torch.int32 or bits.dtype != torch.int32 or bits.dim() != 2:
            raise ValueError(f"allow must be an ({R},) int32 index and (N, words) int32 bits")
        if bits.shape[1] * 32 < V or not bits.is_contiguous():
            raise ValueError(f"allow's bits {tuple(bits.shape)} must cover the {V} ids contiguously")
    unread = tick.view(torch.int32)  # without ALLOW: an int32 pointer, so a launch compiles the same either way
    index, bits = allow if allow is not None else (unread, unread)
    words = bits.shape[1] if allow is not None else 0
    tiles = config or tile_config(h.device, weight.dtype)
    dot_precision = precision(weight.dtype)
    C = R // B
    st = tiles.stats
    row_tiles = triton.cdiv(R, st.BLOCK_M)
    S, split_len = split(V, st.BLOCK_V, row_tiles, h.device, splits=splits)
    # the stash, then the probabilities; without it only its dtype is read: the activation dtype, the combine rounds to
    z = torch.empty(R, V, device=h.device, dtype=weight.dtype) if stash else weight
    part_f = torch.empty(5, S, R, device=h.device, dtype=torch.float32)
    part_i = torch.empty(2, S, R, device=h.device, dtype=torch.int32)
    launch(
        _stats_kernel, (row_tiles, S),
        h, weight, temperature, tick, index, bits,
        R, V, D, C, seed, split_len, cap, words,
        h.stride(0), weight.stride(0), z.stride(0),
        z, part_f, part_i,
        STASH=stash, LOGITS=logits, ALLOW=allow is not None, PRECISION=dot_precision, **st._asdict(),
    )  # fmt: skip
    out = [torch.empty(R, device=h.device, dtype=dt) for dt in (torch.int64, torch.int64, torch.float32, torch.float32)]
    norm = torch.empty(R, 2, device=h.device, dtype=torch.float32)
    cb = tiles.combine
    row_blocks = triton.cdiv(R, cb.BLOCK_R)
    chunks, chunk = split(V, cb.BLOCK_V, row_blocks, h.device, splits=None if stash else 1)
    launch(
        _combine_kernel, (row_blocks, chunks),
        part_f, part_i,
        R, V, S, chunk,
        z.stride(0),
        z, *out, norm,
        BLOCK_S=triton.next_power_of_2(S), STASH=stash, **cb._asdict(),
    )  # fmt: skip
    sk = tiles.soft
    soft_tiles = triton.cdiv(R, sk.BLOCK_M) * triton.cdiv(D, sk.BLOCK_N)
    S, split_len = split(V, sk.BLOCK_K, soft_tiles, h.device)
    part = torch.empty(S, R, D, device=h.device, dtype=torch.float32)
    launch(
        _soft_kernel, (triton.cdiv(R, sk.BLOCK_M), triton.cdiv(D, sk.BLOCK_N), S),
        z, h, weight, temperature, norm, index, bits,
        R, V, D, C, split_len, cap, words,
        z.stride(0), h.stride(0), weight.stride(0),
        part,
        RECOMPUTE=not stash, LOGITS=logits, ALLOW=allow is not None and not stash,  # the stash is already masked
        PRECISION=dot_precision, **sk._asdict(),
    )  # fmt: skip
    rd = tiles.reduce
    launch(
        _soft_reduce_kernel, (triton.cdiv(R, rd.BLOCK_R), triton.cdiv(D, rd.BLOCK_N)),
        part, keep.view(torch.uint8), R, D, C, S, scale, soft.stride(0), soft, **rd._asdict(),
    )  # fmt: skip
    return VocabOut(*out, soft)


def sm90_launches(shapes: Shapes = REAL) -> list[Launch]:
    """Every vocabulary-pass launch for one canvas (B = 1) on an H100 in bf16: from hidden states (the model) and
    from fp32 logits (an exported graph), stashing and recomputing. The launcher called on meta tensors, as
    runtime/pipeline.py's DeviceLoop calls it."""
    R, V, D = shapes.canvas_length, shapes.vocab_size, shapes.hidden_size
    meta = lambda *shape, dtype=torch.bfloat16: torch.empty(shape, dtype=dtype, device="meta")  # noqa: E731
    weight, temperature, tick = meta(V, D), meta(1, dtype=torch.float32), meta(1, dtype=torch.int64)
    with recording() as launches:  # in launch order, each distinct launch once
        for logits in (False, True):
            for stash in (True, False):
                h = meta(R, V, dtype=torch.float32) if logits else meta(R, D)
                vocab_pass(h, weight, temperature, tick, seed=0, cap=30.0, scale=D**0.5, stash=stash, logits=logits)
        allow = meta(R, dtype=torch.int32), meta(R, (V + 31) // 32, dtype=torch.int32)  # pinned / allowed positions
        vocab_pass(meta(R, D), weight, temperature, tick, seed=0, cap=30.0, scale=D**0.5, allow=allow)
    return named(
        launches,
        "vocab.stats hidden stash", "vocab.combine stash", "vocab.soft hidden stash", "vocab.soft_reduce",
        "vocab.stats hidden recompute", "vocab.combine recompute", "vocab.soft hidden recompute",
        "vocab.stats logits stash", "vocab.soft logits stash",
        "vocab.stats logits recompute", "vocab.soft logits recompute", "vocab.stats hidden stash allow",
    )  # fmt: skip
