"""Benchmark of the attention op (kernels/attention.py): the fused kernel against PyTorch SDPA (each of its backends)
and the plain reference; and its norm_rope prologue against the reference's separate ops.

Shapes are the real model's: a 256-token chunk at a committed prefix P, batch 1, bf16. Decoder (bidirectional canvas)
and encoder (causal commit or prefill chunk); sliding layers (16 q / 8 KV heads, head dim 256, window 1024) and global
layers (16 q / 2 KV heads, head dim 512). TFLOP/s counts only visible (query, key) pairs, 4 * d FLOPs per pair and
head, the same numerator for every provider; the ceiling is a bf16 matmul timed in the same run. Rows: op "attention"
(shape: mode, layer type, window mode and sizes) and "attention.norm_rope" (GB/s of the bytes it must move).

    python benchmarks/bench_attention.py                 # full table, rows appended to benchmarks/results/results.csv
    python benchmarks/bench_attention.py --sweep         # also time every candidate tile config (for tile_config)
    TRITON_INTERPRET=1 python benchmarks/bench_attention.py --smoke --device cpu --out /tmp/rows.csv   # plumbing only
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch.nn.attention import SDPBackend, sdpa_kernel

from dgemma.kernels.attention import AttentionTile, Tiles, attention, norm_rope, tile_config
from dgemma.model.cache import KVCache
from dgemma.model.config import FULL, SLIDING, Config
from dgemma.model.model import apply_rope, rms_norm, rope_inv_freq
from dgemma.model.model import attention as attention_ref

from harness import RESULTS, append_rows, copy_gbps, matmul_tflops, provenance, result_row, timed

SDPA_BACKENDS = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def setup(config: Config, kind: str, P: int, window: str, dtype, device):
    """A two-layer (sliding, global) cache holding P committed tokens, the next chunk staged; random q and K/V."""
    T = config.canvas_length
    two = dataclasses.replace(config, num_hidden_layers=2, layer_types=[SLIDING, FULL])
    cache = KVCache(two, 1, P + T, dtype=dtype, device=device, window=window)
    while cache.length < P:
        chunk = min(T, P - cache.length)
        cache.stage(chunk)
        cache.commit(chunk)
    cache.stage(T)
    layer = two.layer_types.index(kind)
    cache.k, cache.v = cache.k[layer : layer + 1], cache.v[layer : layer + 1]  # the benchmarked layer is layer 0
    for ring in (cache.k[0], cache.v[0]):
        ring.copy_(torch.randn(ring.shape, device=device))
    q = torch.randn(1, config.num_attention_heads, T, config.head_dim_of(kind), device=device).to(dtype)
    return cache, q


def providers(cache: KVCache, q, kind: str, causal: bool, tiles: Tiles | None):
    """name -> zero-argument callable, each computing this chunk's attention output."""
    n, T = cache.length, q.shape[2]
    pos, valid = cache.pos[kind], cache.valid[kind]
    band = cache.band(kind, causal)
    S = min(cache.slots_of[kind], n + T)
    mask = cache.mask(kind, T, causal)  # (1, 1, T, S)
    keys, values = cache.k[0][:, :, :S], cache.v[0][:, :, :S]
    # SDPA gets its best case: only the visible keys, in position order, and a mask only where a band needs one.
    seen = mask[0, 0].any(0).nonzero().flatten()
    order = seen[pos[seen].argsort()]
    k_seen, v_seen, m_seen = keys[:, :, order], values[:, :, order], mask[..., order]
    full = bool(m_seen.all())
    sdpa = lambda: F.scaled_dot_product_attention(  # noqa: E731
        q, k_seen, v_seen, attn_mask=None if full else m_seen, scale=1.0, enable_gqa=True
    )
    out = {
        "ours": lambda: attention(q, cache.k[0], cache.v[0], pos, valid, n, band, config=tiles).transpose(1, 2),
        "reference": lambda: attention_ref(q, keys, values, mask).transpose(1, 2),
        "truth": lambda: attention_ref(q.float(), keys.float(), values.float(), mask).transpose(1, 2),
    }
    for backend in SDPA_BACKENDS:
        out[f"sdpa-{backend.name.lower()}"] = lambda b=backend: run_sdpa(b, sdpa).transpose(1, 2)
    return out, int(mask.sum())


def run_sdpa(backend: SDPBackend, fn):
    with sdpa_kernel([backend]):
        return fn()


def candidate_tiles(head_dim: int):
    """Attention tiles --sweep tries; tile_config's GPU choices should come from the best of these."""
    for bm, bn, dv, warps, stages in itertools.product((64, 128), (32, 64), (128, 256, 512), (4, 8), (1, 2, 3)):
        if dv <= head_dim and not (bm == 128 and dv == 512):
            yield AttentionTile(BLOCK_M=bm, BLOCK_N=bn, BLOCK_DV=dv, num_warps=warps, num_stages=stages)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prefix", type=int, nargs="+", default=[512, 4096, 32768])
    ap.add_argument("--smoke", action="store_true", help="tiny config and prefixes, to check the plumbing on a CPU")
    ap.add_argument("--sweep", action="store_true", help="time every candidate tile config of the fused kernel")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    config, dtype = Config.diffusiongemma_26b_a4b(), torch.bfloat16
    if args.smoke:
        config, dtype, args.prefix = Config.tiny(), torch.float32, [5, 40]
    meta = provenance(device)
    ceiling = matmul_tflops(device)
    bandwidth = copy_gbps(device)
    console = Console(width=160)  # logs of a remote run are not a terminal: keep the columns readable
    console.print(f"{meta['gpu']}: matmul ceiling {ceiling:.0f} TFLOP/s, copy {bandwidth:.0f} GB/s ({dtype})")
    rows = []
    table = Table("case", "P", "provider", "ms", "TFLOP/s", "% matmul", "x best SDPA")
    shapes = itertools.product(("decoder", "encoder"), (SLIDING, FULL), ("shared", "per_token"), args.prefix)
    for mode, kind, window, P in shapes:
        if kind == FULL and window == "per_token":
            continue  # the window mode only changes sliding layers
        causal = mode == "encoder"
        if causal and window == "per_token":
            continue  # the encoder's window is causal in both modes
        cache, q = setup(config, kind, P, window, dtype, device)
        H, T, d = q.shape[1], q.shape[2], q.shape[3]
        case = f"{mode} {kind}" + (" per_token" if window == "per_token" else "")
        shape = f"{case} B1 T{T} P{P} H{H} Hkv{config.num_kv_heads(kind)} d{d}"
        tiles = tile_config(device, dtype, head_dim=d)
        fns, pairs = providers(cache, q, kind, causal, None)
        flops = 4 * pairs * H * d
        truth = fns["truth"]()
        times, errors = {}, {}
        for name, fn in fns.items():
            if name == "truth":
                continue
            try:
                errors[name] = (fn().float() - truth).abs().max().item()  # every provider computes the same thing
                times[name] = timed(fn, device)
            except RuntimeError:  # an SDPA backend that does not take this shape, dtype or mask
                continue
        if args.sweep and device.type == "cuda":
            for tile in candidate_tiles(d):
                fn, _ = providers(cache, q, kind, causal, tiles._replace(attention=tile))
                try:
                    name = "ours" + str(sorted(tile._asdict().items()))
                    errors[name] = (fn["ours"]().float() - truth).abs().max().item()
                    times[name] = timed(fn["ours"], device)
                except Exception as e:  # noqa: BLE001 - out of shared memory or registers for this tile
                    console.print(f"[dim]skip {tile}: {type(e).__name__}")
        sdpa_best = min((t[0] for name, t in times.items() if name.startswith("sdpa")), default=float("nan"))
        for name, timing in times.items():
            p50 = timing[0]
            tflops = flops / p50 / 1e9
            note = f"max abs err vs fp32 {errors.get(name, float('nan')):.2e}"
            if name == "ours":
                note += f"; tiles {tiles.attention}"
            rows.append(
                result_row(
                    meta, op="attention", provider=name, shape=shape, dtype=str(dtype).removeprefix("torch."),
                    times=timing, unit="TFLOP/s", value=tflops, ceiling=ceiling, note=note,
                )
            )  # fmt: skip
            if not name.startswith("ours["):
                speedup = f"{sdpa_best / p50:.2f}" if name == "ours" else ""
                pct = f"{100 * tflops / ceiling:.0f}"
                table.add_row(case, str(P), name, f"{p50:.3f}", f"{tflops:.0f}", pct, speedup)
    prologue_rows(config, dtype, device, bandwidth, meta, rows, table)
    append_rows(rows, args.out, table, console)


def prologue_rows(config, dtype, device, bandwidth, meta, rows, table):
    """norm_rope (q/k norm + RoPE, V's norm) against the reference's separate ops, as GB/s of the bytes it must move."""
    T = config.canvas_length
    for kind in (SLIDING, FULL):
        H, Hkv, d = config.num_attention_heads, config.num_kv_heads(kind), config.head_dim_of(kind)
        x = torch.randn(1, T, H + 2 * Hkv, d, device=device).to(dtype)  # q, k, v projections side by side
        w = torch.randn(d, device=device).to(dtype)
        inv_freq = rope_inv_freq(config, kind).to(device)
        angles = torch.arange(T, device=device)[:, None].float() * inv_freq
        cos, sin = torch.cat([angles, angles], -1).cos().to(dtype), torch.cat([angles, angles], -1).sin().to(dtype)
        q, k, v = x[:, :, :H], x[:, :, H : H + Hkv], x[:, :, H + Hkv :]

        def ours(q=q, k=k, v=v, w=w, inv_freq=inv_freq):
            norm_rope(q, w, inv_freq, 1e-6, pos0=0)
            norm_rope(k, w, inv_freq, 1e-6, pos0=0)
            norm_rope(v, None, None, 1e-6, pos0=0)

        def reference(q=q, k=k, v=v, w=w, cos=cos, sin=sin):
            apply_rope(rms_norm(q, w, 1e-6), cos, sin)
            apply_rope(rms_norm(k, w, 1e-6), cos, sin)
            rms_norm(v, None, 1e-6)

        moved = 2 * x.numel() * x.element_size()  # read every raw vector once, write it once
        for name, fn in (("ours", ours), ("reference", reference)):
            times = timed(fn, device)
            gbps = moved / times[0] / 1e6
            rows.append(
                result_row(
                    meta, op="attention.norm_rope", provider=name, shape=f"{kind} B1 T{T} H{H}+2x{Hkv} d{d}",
                    dtype=str(dtype).removeprefix("torch."), times=times, unit="GB/s", value=gbps, ceiling=bandwidth,
                )
            )  # fmt: skip
            table.add_row(f"norm_rope {kind}", "-", name, f"{times[0]:.3f}", f"{gbps:.0f} GB/s", "", "")


if __name__ == "__main__":
    main()
