"""Fused mixture-of-experts for DiffusionGemma: the Gemma-4 router, token-to-expert alignment and two grouped GEMMs
that read only the chosen experts' weights, each weight tile once per expert block.

- `route`: one kernel, BLOCK_T tokens per program. Weightless RMSNorm of the residual, * router.scale * D^-1/2 (each
  product rounded to the activation dtype, as in the reference), the E-way projection, fp32 softmax, top-K by
  repeated argmax (ties go to the lower expert id), renormalization over the K, * per_expert_scale.
- `align`: sorts the P = T*K (token, choice) pairs by expert into BLOCK_M-padded blocks on the device, with no host
  sync (the idea of vLLM's moe_align_block_size, written anew). `_count_kernel` counts each expert's pairs;
  `_place_kernel`, one program per expert, gives the expert a run of whole blocks after the runs of the lower experts,
  writes its pair ids there in (token, choice) order and marks its padding rows with the sentinel P. The buffers are
  sized for the worst case, P + min(E, P) * (BLOCK_M - 1) rows; the blocks past the used ones get expert -1, and the
  GEMM programs that own them return at once.
- `moe`: `_gate_up_kernel` gives each program one (expert block, N tile): it gathers its rows of x and streams that
  expert's gate and up weight tiles once, accumulating both, so gelu_tanh(gate) * up is formed in registers.
  `_down_kernel` streams the down tiles over those products and writes each pair's output row. Both grids run the
  blocks fastest, so the two blocks of a busy expert read the same weight tile at about the same time (the second
  read is an L2 hit). `_sum_kernel` adds each token's K rows times their fp32 routing weights, in fp32, in a fixed
  order. The K-sum trade-off: fp32 atomics into a (T, D) output would skip the (P, D) intermediate (11.5 MB in bf16
  at T=256, written and read: 1.5% of the bytes of the bf16 expert bank, 3% of the fp8 one) but need a zeroed fp32
  output and a cast pass, and the sums would change from run to run. The intermediate is deterministic and holds
  exactly what the reference rounds (F.linear's output, in the activation dtype), so the weighted sum is the
  reference's up to the order of the K fp32 additions.
- fp8: expert banks in float8_e4m3fn with one fp32 scale per output channel (model/fp8.py, applied at load time by
  `from_pretrained(..., expert_dtype="fp8")`). Weight-only: activations stay bf16 (fp16 / fp32 in tests), the kernels
  upcast each fp8 weight tile in registers and apply the channel scale in the epilogue, where it commutes with the
  reduction. fp8 activations with dynamic per-token scales on the fp8 tensor cores would save nothing on the weight
  stream that bounds this kernel, and double an MMA rate that ~16 rows per expert (T=256) do not need.

Limits: the GEMM tiles are chosen from ptxas's sm_90a resource report, not by timing (benchmarks/bench_moe.py --sweep
times the alternatives). Runs under Triton 3.6 and 3.9 (and its interpreter, TRITON_INTERPRET=1, where fp8 loads
work but bf16 dots do not: CPU tests use fp32 and fp16).

Reference: `dgemma.model.model.Router` for `route`, `dgemma.model.model.moe` for `moe` (tests/test_moe.py).

Legend: T tokens, K choices (experts) per token, P = T*K pairs, E experts, D hidden, I expert width. Tiles: BLOCK_M
rows (pairs), BLOCK_N output columns, BLOCK_R the reduced dim.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .common import REAL, STAGES, WARPS, Launch, Shapes, launch, named, precision, recording, target

FP8 = torch.float8_e4m3fn

# ----- reference: dgemma.model.model.Router for route, dgemma.model.model.moe for moe (model/, which the kernels do
# not import)

# ----- kernels


@triton.jit
def _route_kernel(
    r_ptr, scale_ptr, proj_ptr, expert_scale_ptr,
    T, D, E, eps, root,
    stride_rt, stride_pe,
    weights_ptr, idx_ptr,
    K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    rows = r_ptr + offs_t.to(tl.int64)[:, None] * stride_rt
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    dtype = r_ptr.dtype.element_ty
    # ----- the RMS of each residual row, in fp32
    ss = tl.zeros([BLOCK_T], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(rows + offs_d[None, :], mask=t_ok[:, None] & (offs_d < D)[None, :], other=0.0).to(tl.float32)
        ss += tl.sum(x * x, 1)
    rstd = 1.0 / tl.sqrt(ss / D + eps)
    # ----- logits = (rms(r) * scale * D^-1/2) @ proj^T, rounding where the reference's bf16 ops round
    logits = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        x = tl.load(rows + offs_d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        s = tl.load(scale_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        z = (x * rstd[:, None]).to(dtype).to(tl.float32)
        z = (z * s[None, :]).to(dtype).to(tl.float32)
        z = (z * root).to(dtype)
        w = tl.load(
            proj_ptr + offs_e[:, None] * stride_pe + offs_d[None, :], mask=e_ok[:, None] & d_ok[None, :], other=0.0
        )
        logits = tl.dot(z, tl.trans(w), logits, input_precision=PRECISION)
    # ----- softmax in fp32 over the logits as the reference's linear returns them (in the activation dtype)
    logits = tl.where(e_ok[None, :], logits.to(dtype).to(tl.float32), -float("inf"))
    p = tl.exp(logits - tl.max(logits, 1)[:, None])
    p = p / tl.sum(p, 1)[:, None]
    # ----- top-K: K rounds of argmax, each removing its winner (probabilities are >= 0, removed ones -1)
    offs_k = tl.arange(0, BLOCK_K)
    top_p = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
    top_i = tl.zeros([BLOCK_T, BLOCK_K], tl.int32)
    work = tl.where(e_ok[None, :], p, -1.0)
    for k in range(K):
        best = tl.argmax(work, 1)
        top_p = tl.where(offs_k[None, :] == k, tl.max(work, 1)[:, None], top_p)
        top_i = tl.where(offs_k[None, :] == k, best[:, None], top_i)
        work = tl.where(offs_e[None, :] == best[:, None], -1.0, work)
    k_ok = t_ok[:, None] & (offs_k < K)[None, :]
    top_w = top_p / tl.sum(top_p, 1)[:, None] * tl.load(expert_scale_ptr + top_i, mask=k_ok, other=0.0).to(tl.float32)
    out = offs_t.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(weights_ptr + out, top_w, mask=k_ok)
    tl.store(idx_ptr + out, top_i, mask=k_ok)


@triton.jit
def _count_kernel(idx_ptr, pairs, counts_ptr, BLOCK_P: tl.constexpr):
    e = tl.program_id(0)
    n = tl.zeros([BLOCK_P], tl.int32)
    for p0 in range(0, pairs, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        n += (tl.load(idx_ptr + offs, mask=offs < pairs, other=-1) == e).to(tl.int32)
    tl.store(counts_ptr + e, tl.sum(n, 0))


@triton.jit
def _place_kernel(
    idx_ptr, counts_ptr,
    pairs, E, num_blocks,
    pair_ptr, block_expert_ptr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    e = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    padded = tl.cdiv(tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0), BLOCK_M) * BLOCK_M
    start = tl.sum(tl.where(offs_e < e, padded, 0), 0)  # this expert's run follows the runs of the lower experts
    count = tl.load(counts_ptr + e)
    end = start + tl.cdiv(count, BLOCK_M) * BLOCK_M
    # ----- this expert's pair ids in (token, choice) order: rank = matches before it
    seen = count * 0
    for p0 in range(0, pairs, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        mine = (tl.load(idx_ptr + offs, mask=offs < pairs, other=-1) == e).to(tl.int32)
        tl.store(pair_ptr + start + seen + tl.cumsum(mine, 0) - 1, offs, mask=mine != 0)
        seen += tl.sum(mine, 0)
    offs_m = tl.arange(0, BLOCK_M)
    tl.store(pair_ptr + start + count + offs_m, pairs, mask=start + count + offs_m < end)  # padding rows
    for b0 in range(start // BLOCK_M, end // BLOCK_M, BLOCK_E):
        offs_b = b0 + offs_e
        tl.store(block_expert_ptr + offs_b, e, mask=offs_b < end // BLOCK_M)
    if e == 0:  # the blocks past every run (the buffers are sized for the worst case) belong to no expert
        for b0 in range(tl.sum(padded, 0) // BLOCK_M, num_blocks, BLOCK_E):
            offs_b = b0 + offs_e
            tl.store(block_expert_ptr + offs_b, -1, mask=offs_b < num_blocks)


@triton.jit
def _gelu_tanh(x):
    # 0.5 x (1 + tanh(u)) = x * sigmoid(2u), with sigmoid from exp(-2|u|) <= 1: no tanh in basic tl, no overflow
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    e = tl.exp(-2.0 * tl.abs(u))
    return x * tl.where(u >= 0, 1.0, e) / (1.0 + e)


@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, scale_ptr, pair_ptr, block_expert_ptr,
    pairs, top_k, D, I,
    stride_xt,
    stride_we, stride_wn,
    stride_se,
    stride_hm,
    h_ptr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, EVEN_R: tl.constexpr,
    SCALED: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pair_ptr + rows)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    # Clamped rows and columns instead of masks (padding rows read the last token, spare columns the last channel;
    # neither is stored): with unmasked (BLOCK_R, BLOCK_N) weight loads sm_90a spills 8 B here, masked 400 B.
    tokens = tl.minimum(pair // top_k, pairs // top_k - 1)
    x_rows = x_ptr + tokens.to(tl.int64)[:, None] * stride_xt
    w_gate = w_ptr + expert * stride_we + tl.minimum(offs_n, I - 1)[None, :] * stride_wn  # gate rows n, up I + n
    w_up = w_gate + I * stride_wn
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for r0 in range(0, D, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        if EVEN_R:
            x = tl.load(x_rows + offs_r[None, :])
            wg = tl.load(w_gate + offs_r[:, None]).to(x.dtype)  # fp8 upcast in registers
            wu = tl.load(w_up + offs_r[:, None]).to(x.dtype)
        else:
            r_ok = offs_r < D
            x = tl.load(x_rows + offs_r[None, :], mask=r_ok[None, :], other=0.0)
            wg = tl.load(w_gate + offs_r[:, None], mask=r_ok[:, None], other=0.0).to(x.dtype)
            wu = tl.load(w_up + offs_r[:, None], mask=r_ok[:, None], other=0.0).to(x.dtype)
        acc_gate = tl.dot(x, wg, acc_gate, input_precision=PRECISION)
        acc_up = tl.dot(x, wu, acc_up, input_precision=PRECISION)
    if SCALED:  # fp8: one scale per output channel
        scales = scale_ptr + expert * stride_se + offs_n
        acc_gate *= tl.load(scales, mask=n_ok, other=0.0)[None, :]
        acc_up *= tl.load(scales + I, mask=n_ok, other=0.0)[None, :]
    # ----- the reference rounds the projection, the activation and the product to the activation dtype
    dtype = h_ptr.dtype.element_ty
    gate, up = acc_gate.to(dtype).to(tl.float32), acc_up.to(dtype).to(tl.float32)
    h = _gelu_tanh(gate).to(dtype).to(tl.float32) * up
    tl.store(h_ptr + rows.to(tl.int64)[:, None] * stride_hm + offs_n[None, :], h.to(dtype), mask=n_ok[None, :])


@triton.jit
def _down_kernel(
    h_ptr, w_ptr, scale_ptr, pair_ptr, block_expert_ptr,
    pairs, I, D,
    stride_hm,
    stride_we, stride_wn,
    stride_se,
    stride_yp,
    y_ptr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, EVEN_R: tl.constexpr,
    SCALED: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pair_ptr + rows)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < D
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_hm
    w_cols = w_ptr + expert * stride_we + tl.minimum(offs_n, D - 1)[None, :] * stride_wn  # clamped, as in gate_up
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for r0 in range(0, I, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        if EVEN_R:
            h = tl.load(h_rows + offs_r[None, :])
            w = tl.load(w_cols + offs_r[:, None]).to(h.dtype)
        else:
            r_ok = offs_r < I
            h = tl.load(h_rows + offs_r[None, :], mask=r_ok[None, :], other=0.0)
            w = tl.load(w_cols + offs_r[:, None], mask=r_ok[:, None], other=0.0).to(h.dtype)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
    if SCALED:
        acc *= tl.load(scale_ptr + expert * stride_se + offs_n, mask=n_ok, other=0.0)[None, :]
    # ----- each pair's own row, in the activation dtype as F.linear returns it; `_sum_kernel` weights and adds them
    y = y_ptr + pair.to(tl.int64)[:, None] * stride_yp + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(pair < pairs)[:, None] & n_ok[None, :])


@triton.jit
def _sum_kernel(
    y_ptr, weights_ptr,
    T, D, top_k,
    stride_yp, stride_ot,
    out_ptr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = offs_t < T
    ok = t_ok[:, None] & (offs_d < D)[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for k in range(top_k):
        pair = offs_t * top_k + k
        w = tl.load(weights_ptr + pair, mask=t_ok, other=0.0)
        y = tl.load(y_ptr + pair[:, None] * stride_yp + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
        acc += w[:, None] * y
    tl.store(out_ptr + offs_t[:, None] * stride_ot + offs_d[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)


# ----- tiles


class TokenTile(NamedTuple):
    BLOCK_T: int  # tokens per program
    BLOCK_D: int  # hidden dims: per step (route), per program (the K-sum)
    num_warps: int = WARPS
    num_stages: int = STAGES


class AlignTile(NamedTuple):
    BLOCK_P: int  # pairs per step
    num_warps: int = WARPS
    num_stages: int = STAGES


class GemmTile(NamedTuple):
    BLOCK_M: int  # pairs per expert block: align's padding unit and the GEMMs' rows
    BLOCK_N: int  # output columns per program
    BLOCK_R: int  # reduced dims per step
    num_warps: int = WARPS
    num_stages: int = STAGES


class Tiles(NamedTuple):
    route: TokenTile
    align: AlignTile
    gemm: GemmTile
    sum: TokenTile


def tile_config(device, dtype: torch.dtype, *, tokens: int, top_k: int, experts: int) -> Tiles:
    """The tiles for T tokens routed to K of E experts (the same for every activation dtype). Under the interpreter
    the smallest legal ones. On a GPU: the router's 16 tokens are the smallest tl.dot tile (it reads proj, 0.7 MB,
    once per program, from L2 after the first); BLOCK_M grows with the mean rows per expert T*K/E, so that at T=256
    (16 per expert) most experts fit one block and each weight tile is streamed once; BLOCK_R 64 for fp8 banks too:
    at 128 their gate_up needs 197 registers on sm_90a (an earlier ptxas spilled 1480 B), at 64 128 (python -m
    dgemma.kernels.aot)."""
    if not target(device).gpu:
        gemm = GemmTile(BLOCK_M=16, BLOCK_N=16, BLOCK_R=16, num_warps=4, num_stages=1)
        return Tiles(TokenTile(BLOCK_T=16, BLOCK_D=16), AlignTile(BLOCK_P=256), gemm, TokenTile(BLOCK_T=16, BLOCK_D=64))
    rows = tokens * top_k / experts
    block_m = 16 if rows <= 8 else 32 if rows <= 24 else 64
    gemm = GemmTile(BLOCK_M=block_m, BLOCK_N=64, BLOCK_R=64, num_warps=4, num_stages=4)
    return Tiles(TokenTile(BLOCK_T=16, BLOCK_D=64), AlignTile(BLOCK_P=1024), gemm, TokenTile(BLOCK_T=16, BLOCK_D=256))


# ----- launchers


def route(r, scale, proj, per_expert_scale, top_k: int, eps: float):
    """r (T, D) un-normalized residual; scale (D,); proj (E, D); per_expert_scale (E,) -> weights (T, K) fp32 and
    expert ids idx (T, K) int32, in descending order of probability."""
    T, D = r.shape
    E = proj.shape[0]
    if proj.shape != (E, D) or scale.shape != (D,) or per_expert_scale.shape != (E,):
        raise ValueError(
            f"router shapes do not match r {tuple(r.shape)}: proj {tuple(proj.shape)}, scale {tuple(scale.shape)}, "
            f"per_expert_scale {tuple(per_expert_scale.shape)}"
        )
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in 1..{E}, not {top_k}")
    if r.stride(-1) != 1 or proj.stride(-1) != 1 or proj.dtype != r.dtype:
        raise ValueError("r and proj need a contiguous last dim and the same dtype")
    weights = torch.empty(T, top_k, device=r.device, dtype=torch.float32)
    idx = torch.empty(T, top_k, device=r.device, dtype=torch.int32)
    tile = tile_config(r.device, r.dtype, tokens=T, top_k=top_k, experts=E).route
    launch(
        _route_kernel, (triton.cdiv(T, tile.BLOCK_T),),
        r, scale, proj, per_expert_scale,
        T, D, E, eps, D**-0.5,
        r.stride(0), proj.stride(0),
        weights, idx,
        K=top_k, BLOCK_E=max(16, triton.next_power_of_2(E)), BLOCK_K=triton.next_power_of_2(top_k),
        PRECISION=precision(r.dtype), **tile._asdict(),
    )  # fmt: skip
    return weights, idx


def align(idx, num_experts: int, block_m: int):
    """idx (T, K) expert ids in [0, E) -> pair (R,) int32 and block_expert (R // block_m,) int32.

    Row m of the sorted order holds pair id pair[m] = t * K + k, or the sentinel T * K on a padding row; block b
    (rows b * block_m ...) belongs to expert block_expert[b], or to none (-1) past the used blocks. Experts' runs are
    in expert order and each run lists its pairs in increasing order. R is the worst case for any routing."""
    P = idx.numel()
    E = num_experts
    blocks = (P + min(E, P) * (block_m - 1)) // block_m
    flat = idx.reshape(-1).to(torch.int32)
    counts = torch.empty(E, device=idx.device, dtype=torch.int32)
    pair = torch.empty(blocks * block_m, device=idx.device, dtype=torch.int32)
    block_expert = torch.empty(blocks, device=idx.device, dtype=torch.int32)
    tile = tile_config(idx.device, idx.dtype, tokens=idx.shape[0], top_k=idx.shape[-1], experts=E).align
    launch(_count_kernel, (E,), flat, P, counts, **tile._asdict())
    launch(
        _place_kernel, (E,),
        flat, counts,
        P, E, blocks,
        pair, block_expert,
        BLOCK_M=block_m, BLOCK_E=max(16, triton.next_power_of_2(E)), **tile._asdict(),
    )  # fmt: skip
    return pair, block_expert


def moe(x, weights, idx, gate_up_proj, down_proj, gate_up_scale=None, down_scale=None, *, config: Tiles | None = None):
    """x (T, D); weights (T, K) fp32 and idx (T, K) from `route`; gate_up_proj (E, 2I, D) rows [gate; up] and
    down_proj (E, D, I), in x's dtype, or float8_e4m3fn with fp32 per-output-channel scales gate_up_scale (E, 2I) and
    down_scale (E, D). Returns sum_k weights[t, k] * expert_{idx[t, k]}(x[t]), (T, D) in x's dtype."""
    T, D = x.shape
    K = idx.shape[1]
    E, I2, _ = gate_up_proj.shape
    I = I2 // 2
    if gate_up_proj.shape != (E, 2 * I, D) or down_proj.shape != (E, D, I):
        raise ValueError(
            f"expert banks {tuple(gate_up_proj.shape)}, {tuple(down_proj.shape)} do not match x {tuple(x.shape)}: "
            f"need (E, 2I, {D}) and (E, {D}, I)"
        )
    if idx.shape != (T, K) or weights.shape != (T, K):
        raise ValueError(f"weights {tuple(weights.shape)} and idx {tuple(idx.shape)} must both be ({T}, K)")
    scaled = gate_up_proj.dtype == FP8
    if down_proj.dtype != gate_up_proj.dtype or (not scaled and gate_up_proj.dtype != x.dtype):
        raise ValueError(f"expert banks must be float8_e4m3fn or x's dtype {x.dtype}, not {gate_up_proj.dtype}")
    if scaled and (gate_up_scale is None or down_scale is None):
        raise ValueError("float8 expert banks need gate_up_scale (E, 2I) and down_scale (E, D)")
    if scaled and (gate_up_scale.shape != (E, 2 * I) or down_scale.shape != (E, D)):
        raise ValueError(
            f"scales {tuple(gate_up_scale.shape)}, {tuple(down_scale.shape)} must be ({E}, {2 * I}), ({E}, {D})"
        )
    if x.stride(-1) != 1 or gate_up_proj.stride(-1) != 1 or down_proj.stride(-1) != 1:
        raise ValueError("x and the expert banks need a contiguous last dim")
    tiles = config or tile_config(x.device, x.dtype, tokens=T, top_k=K, experts=E)
    gemm = tiles.gemm
    pair, block_expert = align(idx, E, gemm.BLOCK_M)
    blocks = block_expert.numel()
    weights = weights.float().contiguous()
    gate_up_scale = gate_up_scale.float().contiguous() if scaled else gate_up_proj
    down_scale = down_scale.float().contiguous() if scaled else down_proj
    h = torch.empty(blocks * gemm.BLOCK_M, I, device=x.device, dtype=x.dtype)  # gelu(gate) * up, sorted, padded rows
    launch(
        _gate_up_kernel, (blocks, triton.cdiv(I, gemm.BLOCK_N)),
        x, gate_up_proj, gate_up_scale, pair, block_expert,
        T * K, K, D, I,
        x.stride(0),
        gate_up_proj.stride(0), gate_up_proj.stride(1),
        gate_up_scale.stride(0),
        h.stride(0),
        h,
        EVEN_R=D % gemm.BLOCK_R == 0, SCALED=scaled, PRECISION=precision(x.dtype), **gemm._asdict(),
    )  # fmt: skip
    y = torch.empty(T * K, D, device=x.device, dtype=x.dtype)  # each pair's expert output, (token, choice) order
    launch(
        _down_kernel, (blocks, triton.cdiv(D, gemm.BLOCK_N)),
        h, down_proj, down_scale, pair, block_expert,
        T * K, I, D,
        h.stride(0),
        down_proj.stride(0), down_proj.stride(1),
        down_scale.stride(0),
        y.stride(0),
        y,
        EVEN_R=I % gemm.BLOCK_R == 0, SCALED=scaled, PRECISION=precision(x.dtype), **gemm._asdict(),
    )  # fmt: skip
    out = torch.empty(T, D, device=x.device, dtype=x.dtype)
    tile = tiles.sum
    launch(
        _sum_kernel, (triton.cdiv(T, tile.BLOCK_T), triton.cdiv(D, tile.BLOCK_D)),
        y, weights,
        T, D, K,
        y.stride(0), out.stride(0),
        out,
        **tile._asdict(),
    )  # fmt: skip
    return out


def sm90_launches(shapes: Shapes = REAL) -> list[Launch]:
    """Every MoE launch of the model on an H100 for one canvas: route, then align and the GEMMs over bf16 and over
    fp8 expert banks. The launchers called on meta tensors, as model/fused.py calls them."""
    T, K, E = shapes.canvas_length, shapes.top_k_experts, shapes.num_experts
    D, I = shapes.hidden_size, shapes.moe_intermediate_size
    meta = lambda *shape, dtype=torch.bfloat16: torch.empty(shape, dtype=dtype, device="meta")  # noqa: E731
    with recording() as router:
        weights, idx = route(meta(T, D), meta(D), meta(E, D), meta(E), K, 1e-6)
    with recording() as bf16:
        moe(meta(T, D), weights, idx, meta(E, 2 * I, D), meta(E, D, I))
    with recording() as fp8:
        scales = meta(E, 2 * I, dtype=torch.float32), meta(E, D, dtype=torch.float32)
        moe(meta(T, D), weights, idx, meta(E, 2 * I, D, dtype=FP8), meta(E, D, I, dtype=FP8), *scales)
    labels = "moe.count", "moe.place", "moe.gate_up bf16", "moe.down bf16", "moe.sum"
    count, place, gate_up, down, ksum = named(bf16, *labels)
    fp8 = named([launch for launch in fp8 if launch not in bf16], "moe.gate_up fp8", "moe.down fp8")  # align, sum: same
    return [*named(router, "moe.route"), count, place, gate_up, down, *fp8, ksum]
