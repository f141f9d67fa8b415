"""Fused attention for DiffusionGemma's two modes (encoder: causal; decoder: bidirectional canvas) and two layer types
(sliding window; global), reading the model's ring KV cache in place.

- `norm_rope`, the prologue: one program per ROWS (token, head) vectors: RMSNorm (times the q/k norm weight, or
  weightless for V), then split-half RoPE with cos/sin computed in-kernel from the layer's inv_freq, so default RoPE
  (sliding) and proportional RoPE (global: zero frequencies past the first quarter) are the same code. Writes q for
  the attention and k/v straight into their cache slots; global layers call it twice on the one raw k_proj output.
- `attention`: a flash-attention forward over the active cache slots. The mask is never materialized: every mask the
  model uses is a band in absolute positions (`KVCache.band`), so a query at position i sees the slot holding j iff
  a*i + lo <= j <= b*i + hi, the slot holds a committed or staged token (0 <= j < n + T), and its row is not padding.
  The G query heads that share a KV head are packed into the query tile (rows are (token, head) pairs), so one K/V
  load serves G heads; the slots are split between programs (flash-decoding) so that 256 queries fill the SMs even on
  the 2-KV-head global layers, and `_combine_kernel` merges the splits by their log-sum-exp. Head dim 512 may split
  the value dims between programs (BLOCK_DV) to bound the accumulator; each such program recomputes the scores.

Scores use scale 1.0 and no softcap; the softmax is in fp32 (base 2), and P is cast to the value dtype for P @ V, as
in the reference. Masked scores get a large finite negative (NEG) instead of -inf, so a row with no visible key (a
padded query) averages values instead of producing NaN that would leak through the cache.
Limits: the head dim must be even (RoPE pairs its halves); tiles are chosen from ptxas's sm_90a resource report, not
by timing (benchmarks/bench_attention.py --sweep times the alternatives). Runs under Triton 3.6 and 3.9 (and its
interpreter, TRITON_INTERPRET=1, where bf16 dots are wrong: CPU tests use fp32 and fp16).

Reference: `dgemma.model.model.attention` over `KVCache.mask`, and `rms_norm` then `apply_rope` for the prologue
(tests/test_attention.py).

Legend: B batch, T chunk tokens, H query heads, Hkv KV heads, G = H / Hkv, d head dim, R cache slots, S active slots.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .common import NEG, REAL, STAGES, WARPS, Launch, Shapes, launch, named, precision, recording, split, target

# ----- reference: dgemma.model.model.attention over KVCache.mask; rms_norm, then apply_rope, for norm_rope
# (model/, which the kernels do not import)

# ----- kernels

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _norm_rope_kernel(
    x_ptr, w_ptr, inv_freq_ptr, out_ptr,
    T, H, vectors, pos0, slot0, ring, eps,
    stride_xb, stride_xt, stride_xh,
    stride_ob, stride_os, stride_oh,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, ROWS: tl.constexpr, HAS_WEIGHT: tl.constexpr, ROPE: tl.constexpr,
):  # fmt: skip
    # ROWS (batch, token, head) vectors per program, flattened in that order
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    b, t, head = r // (T * H), (r // H) % T, r % H
    offs = tl.arange(0, BLOCK_HALF)
    ok = (r < vectors)[:, None] & (offs < HALF)[None, :]
    x = (x_ptr + b * stride_xb + t * stride_xt + head * stride_xh)[:, None] + offs[None, :]
    x1 = tl.load(x, mask=ok, other=0.0).to(tl.float32)  # the two halves RoPE pairs up
    x2 = tl.load(x + HALF, mask=ok, other=0.0).to(tl.float32)
    # ----- RMSNorm in fp32, rounded to the activation dtype as the reference's norm output is
    rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)
    y1, y2 = x1 * rstd[:, None], x2 * rstd[:, None]
    if HAS_WEIGHT:
        y1 *= tl.load(w_ptr + offs, mask=offs < HALF, other=0.0).to(tl.float32)[None, :]
        y2 *= tl.load(w_ptr + HALF + offs, mask=offs < HALF, other=0.0).to(tl.float32)[None, :]
    dtype = out_ptr.dtype.element_ty
    y1, y2 = y1.to(dtype).to(tl.float32), y2.to(dtype).to(tl.float32)
    # ----- RoPE: angles in fp32 from the absolute position, cos/sin rounded to the activation dtype (as transformers)
    if ROPE:
        inv_freq = tl.load(inv_freq_ptr + offs, mask=offs < HALF, other=0.0)
        angle = (pos0 + t).to(tl.float32)[:, None] * inv_freq[None, :]
        cos, sin = tl.cos(angle).to(dtype).to(tl.float32), tl.sin(angle).to(dtype).to(tl.float32)
        y1, y2 = y1 * cos - y2 * sin, y2 * cos + y1 * sin
    out = (out_ptr + b * stride_ob + ((slot0 + t) % ring) * stride_os + head * stride_oh)[:, None] + offs[None, :]
    tl.store(out, y1, mask=ok)
    tl.store(out + HALF, y2, mask=ok)


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, valid_ptr,
    T, S, n, G, Hkv, band_a, band_lo, band_b, band_hi, split_len,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_validb,
    stride_os, stride_ob, stride_ot,
    stride_ls, stride_lb,
    o_ptr, lse_ptr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, pid_bh, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NUM_DV: tl.constexpr = BLOCK_D // BLOCK_DV
    split, dv = pid_s // NUM_DV, pid_s % NUM_DV
    b, kh = (pid_bh // Hkv).to(tl.int64), pid_bh % Hkv
    # ----- the query tile: rows r = g * T + t of KV head kh, contiguous in the (B, H, T, d) layout of q
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t = rows % T
    row_ok = rows < G * T
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    q_tile = q_ptr + b * stride_qb + kh * G * stride_qh + rows[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_tile, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    qpos = n + t
    lo, hi = band_a * qpos + band_lo, band_b * qpos + band_hi  # the visible key positions of each row
    # ----- online softmax over this program's share of the slots
    m_i = tl.full([BLOCK_M], NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    start = split * split_len
    end = tl.minimum(start + split_len, S)
    k_base = k_ptr + b * stride_kb + kh * stride_kh
    v_base = v_ptr + b * stride_vb + kh * stride_vh
    for s0 in range(start, end, BLOCK_N):
        offs_n = s0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        offs_n = tl.minimum(offs_n, end - 1)  # clamped instead of masked: unmasked loads keep registers free
        k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :], mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * LOG2E  # (BLOCK_M, BLOCK_N)
        kpos = tl.load(pos_ptr + offs_n)
        held = n_ok & (kpos >= 0) & (kpos < n + T) & (tl.load(valid_ptr + b * stride_validb + offs_n) != 0)
        visible = held[None, :] & (kpos[None, :] >= lo[:, None]) & (kpos[None, :] <= hi[:, None])
        scores = tl.where(visible, scores, NEG)
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + offs_n[:, None] * stride_vs + offs_dv[None, :], mask=offs_dv[None, :] < HEAD_DIM, other=0.0
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    # ----- normalized partial output and its log-sum-exp (base 2), for `combine`
    # head-major like q: rows stay one contiguous block (a (token, head) gather here cost 230 B of sm_90a spills)
    o_rows = o_ptr + split * stride_os + b * stride_ob + (kh * G * T + rows) * stride_ot
    o_ok = row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM)
    tl.store(o_rows[:, None] + offs_dv[None, :], acc / l_i[:, None], mask=o_ok)
    if dv == 0:
        lse_rows = lse_ptr + split * stride_ls + b * stride_lb + kh * G * T + rows
        tl.store(lse_rows, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _combine_kernel(
    o_ptr, lse_ptr, splits, rows, out_ptr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # flattened (b, t, h); partials are (splits, rows, HEAD_DIM) contiguous
    offs_s = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < splits
    lse = tl.load(lse_ptr + offs_s * rows + row, mask=s_ok, other=-float("inf"))
    w = tl.exp2(lse - tl.max(lse, 0))
    w = w / tl.sum(w, 0)
    o = tl.load(
        o_ptr + (offs_s[:, None] * rows + row) * HEAD_DIM + offs_d[None, :],
        mask=s_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    tl.store(out_ptr + row * HEAD_DIM + offs_d, tl.sum(w[:, None] * o, 0), mask=offs_d < HEAD_DIM)


# ----- tiles


class NormRopeTile(NamedTuple):
    ROWS: int  # vectors per program
    num_warps: int = WARPS
    num_stages: int = STAGES


class AttentionTile(NamedTuple):
    BLOCK_M: int  # query rows ((token, head) pairs) per program
    BLOCK_N: int  # keys per step
    BLOCK_DV: int  # value dims per program (below the head dim, programs share the dims and recompute the scores)
    num_warps: int = WARPS
    num_stages: int = STAGES


class Tiles(NamedTuple):
    norm_rope: NormRopeTile
    attention: AttentionTile


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def tile_config(device, dtype: torch.dtype, *, head_dim: int) -> Tiles:
    """The tiles for one head dim. norm_rope: about 2048 elements a program (16 rows of 512 needed 255 registers and
    552 B of stack on sm_90a, 4 rows need 95 and 32 B). attention: the smallest legal tiles under the interpreter; on
    a GPU, the configs with the fewest register spills in the sm_90a report (python -m dgemma.kernels.aot)."""
    rows = NormRopeTile(ROWS=triton.next_power_of_2(max(1, 2048 // head_dim)))
    block_d = _block_d(head_dim)
    if not target(device).gpu:
        return Tiles(rows, AttentionTile(BLOCK_M=16, BLOCK_N=16, BLOCK_DV=block_d, num_warps=4, num_stages=1))
    if dtype == torch.float32:
        return Tiles(rows, AttentionTile(BLOCK_M=32, BLOCK_N=32, BLOCK_DV=min(block_d, 128), num_warps=4, num_stages=1))
    if block_d <= 128:
        return Tiles(rows, AttentionTile(BLOCK_M=128, BLOCK_N=64, BLOCK_DV=block_d, num_warps=8, num_stages=2))
    block_n = 64 if block_d <= 256 else 32
    return Tiles(rows, AttentionTile(BLOCK_M=64, BLOCK_N=block_n, BLOCK_DV=block_d, num_warps=8, num_stages=2))


# ----- launchers


def norm_rope(x, weight, inv_freq, eps: float, *, pos0: int, out=None, slot0: int = 0):
    """x (B, T, H, d) raw projection -> RoPE(rms(x) * weight) (no RoPE when inv_freq is None, no weight when None).

    Token t (position pos0 + t) goes to out[:, (slot0 + t) % R] with out (B, R, H, d); a (B, H, R, d) cache ring
    is passed as its transposed view. Without `out`, returns a new head-major (B, H, T, d) tensor, the layout
    `attention` takes its queries in.
    """
    B, T, H, d = x.shape
    if d % 2:
        raise ValueError(f"RoPE needs an even head dim, not {d}")
    if out is None:
        head_major = torch.empty(B, H, T, d, device=x.device, dtype=x.dtype)
        norm_rope(x, weight, inv_freq, eps, pos0=pos0, out=head_major.transpose(1, 2))
        return head_major
    if out.shape[0] != B or out.shape[2:] != (H, d) or out.stride(-1) != 1 or x.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} does not hold the vectors of x {tuple(x.shape)} contiguously")
    half = d // 2
    tile = tile_config(x.device, x.dtype, head_dim=d).norm_rope
    launch(
        _norm_rope_kernel, (triton.cdiv(B * T * H, tile.ROWS),),
        x, weight if weight is not None else x, inv_freq if inv_freq is not None else x, out,
        T, H, B * T * H, pos0, slot0, out.shape[1], eps,
        x.stride(0), x.stride(1), x.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half), HAS_WEIGHT=weight is not None, ROPE=inv_freq is not None,
        **tile._asdict(),
    )  # fmt: skip
    return out


def attention(q, k_cache, v_cache, pos, valid, n: int, band, *, splits: int | None = None, config: Tiles | None = None):
    """q (B, H, T, d) contiguous, normed and rotated, at positions n..n+T-1 (head-major, so the G query heads of a
    KV head are one block of rows); k_cache, v_cache (B, Hkv, R, d) rings whose slot s holds position pos[s] (-1 when
    empty) for the rows valid[:, s]; band (a, lo, b, hi) from KVCache.band.
    Returns o (B, H, T, d), head-major like q. Reads the first min(R, n + T) slots, as the reference does."""
    B, H, T, d = q.shape
    _, Hkv, R, _ = k_cache.shape
    if H % Hkv or k_cache.shape != (B, Hkv, R, d) or v_cache.shape != k_cache.shape:
        raise ValueError(f"q {tuple(q.shape)} does not match the cache {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if pos.shape != (R,) or valid.shape != (B, R):
        raise ValueError(f"pos {tuple(pos.shape)} and valid {tuple(valid.shape)} must be ({R},) and ({B}, {R})")
    if not q.is_contiguous() or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q must be contiguous (B, H, T, d), and the caches need a contiguous head dim")
    S, G = min(R, n + T), H // Hkv
    tile = (config or tile_config(q.device, q.dtype, head_dim=d)).attention
    block_d = _block_d(d)
    num_dv = block_d // tile.BLOCK_DV
    m_blocks = triton.cdiv(G * T, tile.BLOCK_M)
    # every split at least 4 key blocks long
    splits, split_len = split(S, tile.BLOCK_N, m_blocks * B * Hkv * num_dv, q.device, min_blocks=4, splits=splits)
    out = torch.empty_like(q)
    o = out.unsqueeze(0) if splits == 1 else torch.empty(splits, B, H, T, d, device=q.device, dtype=torch.float32)
    lse = torch.empty(splits, B, H, T, device=q.device, dtype=torch.float32)
    a, lo, b, hi = band
    launch(
        _attention_kernel, (m_blocks, B * Hkv, splits * num_dv),
        q, k_cache, v_cache, pos, valid.view(torch.uint8),
        T, S, n, G, Hkv, a, lo, b, hi, split_len,
        q.stride(0), q.stride(2), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        valid.stride(0),
        o.stride(0), o.stride(1), o.stride(3),
        lse.stride(0), lse.stride(1),
        o, lse,
        HEAD_DIM=d, BLOCK_D=block_d, PRECISION=precision(q.dtype), **tile._asdict(),
    )  # fmt: skip
    if splits > 1:
        launch(
            _combine_kernel, (B * T * H,),
            o, lse, splits, B * T * H, out,
            HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_SPLITS=triton.next_power_of_2(splits),
        )  # fmt: skip
    return out


def sm90_launches(shapes: Shapes = REAL) -> list[Launch]:
    """Every attention launch of the model on an H100 in bf16, per layer type: norm_rope for q/k and for V, attention
    over `shapes.context` committed keys split between programs (fp32 partials, then combine) and in one split (the
    output itself). The launchers called on meta tensors, as model/fused.py calls them."""
    T, H, n, out = shapes.canvas_length, shapes.num_attention_heads, shapes.context, []
    sliding = (shapes.head_dim, shapes.num_key_value_heads, shapes.sliding_window - 1 + T)  # KVCache.slots_of
    full = (shapes.global_head_dim, shapes.num_global_key_value_heads, n + T)
    for d, Hkv, R in (sliding, full):
        meta = lambda *shape, dtype=torch.bfloat16: torch.empty(shape, dtype=dtype, device="meta")  # noqa: E731
        q, keys, values = meta(1, H, T, d), meta(1, Hkv, R, d), meta(1, Hkv, R, d)
        pos, valid, band = meta(R, dtype=torch.int64), meta(1, R, dtype=torch.bool), (0, 0, 1, 0)
        weight, inv_freq = meta(d), meta(d // 2, dtype=torch.float32)
        with recording() as qk:  # q into a new tensor, k into its cache ring: one compiled kernel
            norm_rope(meta(1, T, H, d), weight, inv_freq, 1e-6, pos0=n)
            norm_rope(meta(1, T, Hkv, d), weight, inv_freq, 1e-6, pos0=n, out=keys.transpose(1, 2), slot0=n)
        with recording() as v:
            norm_rope(meta(1, T, Hkv, d), None, None, 1e-6, pos0=n, out=values.transpose(1, 2), slot0=n)
        with recording() as split_keys:
            attention(q, keys, values, pos, valid, n, band)
        with recording() as one_split:
            attention(q, keys, values, pos, valid, n, band, splits=1)
        partials, combine = named(split_keys, f"attention.attention d{d} o=fp32", f"attention.combine d{d}")
        out += [partials, *named(one_split, f"attention.attention d{d} o=bf16"), combine]
        out += named(qk, f"attention.norm_rope d{d} q/k") + named(v, f"attention.norm_rope d{d} v")
    return out
