"""Benchmark of the moe op (kernels/moe.py): the fused kernels against transformers' grouped_mm experts and the plain
reference.

Shapes are the real model's: T tokens (16 to 1024; a canvas is 256), E=128 experts, top-8, D=2816 -> I=704, bf16
activations, bf16 or fp8 (e4m3, per-output-channel scales) expert banks. Routing comes from the fused router on a
random residual. GB/s counts the expert bytes that must be read, the same numerator for every provider: both banks of
every expert that received at least one token, at the bank's dtype, plus the fp8 scales; the ceiling is a
device-to-device copy timed in the same run. Router + alignment are timed on their own and reported as a percentage
of the GEMM time (the fused `moe` minus its alignment). transformers and the reference have no fp8 weight-only path,
so the fp8 rows time ours only. Rows: op "moe" and "moe.route+align".

    python benchmarks/bench_moe.py                 # full table, rows appended to benchmarks/results/results.csv
    python benchmarks/bench_moe.py --sweep --tokens 256   # also time candidate tiles (for kernels.moe.tile_config)
    TRITON_INTERPRET=1 python benchmarks/bench_moe.py --smoke --device cpu --out /tmp/rows.csv   # plumbing only
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from dgemma.kernels.moe import GemmTile, align, moe, route, tile_config
from dgemma.model import fp8
from dgemma.model.config import Config
from dgemma.model.model import moe as moe_ref

from harness import RESULTS, append_rows, copy_gbps, provenance, result_row, timed


def transformers_experts(gate_up, down, config: Config):
    """transformers 5.23's Gemma-4 experts module dispatched to its grouped_mm implementation, on our banks."""
    from transformers import Gemma4TextConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts

    hf = Gemma4TextConfig(
        hidden_size=config.hidden_size,
        moe_intermediate_size=config.moe_intermediate_size,
        num_experts=config.num_experts,
        top_k_experts=config.top_k_experts,
        hidden_activation="gelu_pytorch_tanh",
    )
    hf._experts_implementation = "grouped_mm"
    with torch.device("meta"):
        experts = Gemma4TextExperts(hf)
    experts.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
    experts.down_proj = nn.Parameter(down, requires_grad=False)
    return experts


def setup(config: Config, T: int, quantize: bool, dtype, device):
    """One row's inputs: routing by the fused router on a random residual, random expert input and banks in the
    activation dtype (or quantized to fp8), the fp32 truth on the banks' values. Returns (router call, moe args,
    truth)."""
    E, K, D, I = config.num_experts, config.top_k_experts, config.hidden_size, config.moe_intermediate_size
    r = (3 * torch.randn(T, D, device=device)).to(dtype)
    proj = torch.randn(E, D, device=device).to(dtype)
    scale = (1 + 0.1 * torch.randn(D, device=device)).to(dtype)
    expert_scale = (1 + 0.1 * torch.randn(E, device=device)).to(dtype)
    router = lambda: route(r, scale, proj, expert_scale, K, config.rms_norm_eps)  # noqa: E731
    weights, idx = router()
    x = torch.randn(T, D, device=device).to(dtype)
    gate_up = (torch.randn(E, 2 * I, D, device=device) / D**0.5).to(dtype)
    down = (torch.randn(E, D, I, device=device) / I**0.5).to(dtype)
    banks, scales = (gate_up, down), (None, None)
    if quantize:
        (gu_q, gu_s), (dn_q, dn_s) = fp8.quantize(gate_up), fp8.quantize(down)
        banks, scales = (gu_q, dn_q), (gu_s, dn_s)
        gate_up, down = (fp8.dequantize(q, s, torch.float32) for q, s in ((gu_q, gu_s), (dn_q, dn_s)))
    truth = moe_ref(x.float(), weights, idx.long(), gate_up.float(), down.float())
    return router, (x, weights, idx, *banks, *scales), truth


def providers(config: Config, args: tuple, sweep: bool):
    """name -> zero-argument callable computing the MoE output; transformers and the reference for bf16 banks only."""
    x, weights, idx, gate_up, down, gate_up_scale, down_scale = args
    fns = {"ours": lambda: moe(*args)}
    tiles = tile_config(x.device, x.dtype, tokens=x.shape[0], top_k=idx.shape[1], experts=gate_up.shape[0])
    if gate_up_scale is None:
        experts = transformers_experts(gate_up, down, config)
        fns["transformers-grouped_mm"] = lambda: experts(x, idx.long(), weights)
        fns["reference"] = lambda: moe_ref(x, weights, idx.long(), gate_up, down)
    if sweep:
        for tile in candidate_tiles():
            swept = tiles._replace(gemm=tile)
            fns["ours" + str(sorted(tile._asdict().items()))] = lambda t=swept: moe(*args, config=t)
    return fns


def expert_bytes(idx, gate_up, down, gate_up_scale, down_scale) -> int:
    """Bytes of both banks (and their scales) of the experts that received at least one token."""
    per_expert = sum(
        t[0].numel() * t.element_size() for t in (gate_up, down, gate_up_scale, down_scale) if t is not None
    )
    return idx.unique().numel() * per_expert


def candidate_tiles():
    """GEMM tiles --sweep tries (54, each compiled once: sweep one --tokens value at a time); tile_config's GPU
    choices should come from the best of these."""
    for bm, bn, br, stages in itertools.product((16, 32, 64), (32, 64, 128), (64, 128, 256), (3, 4)):
        yield GemmTile(BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br, num_warps=4, num_stages=stages)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 256, 512, 1024])
    ap.add_argument("--smoke", action="store_true", help="tiny config and token counts, to check the plumbing on a CPU")
    ap.add_argument("--sweep", action="store_true", help="time candidate tile configs of the fused kernels")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.smoke and args.out == RESULTS:
        ap.error("--smoke rows mean nothing: pass --out somewhere other than the real results file")
    device = torch.device(args.device)
    config, dtype = Config.diffusiongemma_26b_a4b(), torch.bfloat16
    if args.smoke:  # the interpreter's bf16 dot is wrong: fp32 activations
        config, dtype, args.tokens = Config.tiny(num_experts=5, top_k_experts=3), torch.float32, [7]
    E, K, D, I = config.num_experts, config.top_k_experts, config.hidden_size, config.moe_intermediate_size
    meta = provenance(device)
    bandwidth = copy_gbps(device)
    console = Console(width=160)  # logs of a remote run are not a terminal: keep the columns readable
    console.print(f"{meta['gpu']}: copy {bandwidth:.0f} GB/s; E={E} top-{K} {D}->{I}, activations {dtype}")
    act = str(dtype).removeprefix("torch.")
    rows = []
    table = Table("banks", "T", "provider", "ms", "experts hit", "GB/s", "% copy", "max err", "route+align % GEMM")

    def row(op, provider, shape, banks, times, unit, value, ceiling, note):
        dtype = f"{banks} banks, {act} activations"
        rows.append(result_row(meta, op=op, provider=provider, shape=shape, dtype=dtype, times=times, unit=unit,
                               value=value, ceiling=ceiling, note=note))  # fmt: skip

    for T, quantize in itertools.product(args.tokens, (False, True)):
        router, moe_args, truth = setup(config, T, quantize, dtype, device)
        idx, bank_dtype = moe_args[2], moe_args[3].dtype
        bank = str(bank_dtype).removeprefix("torch.")
        tiles = tile_config(device, dtype, tokens=T, top_k=K, experts=E)
        hit, moved = idx.unique().numel(), expert_bytes(idx, *moe_args[3:])
        shape = f"T{T} E{E} K{K} D{D} I{I}"
        t_route = timed(router, device)
        t_align = timed(lambda idx=idx, block_m=tiles.gemm.BLOCK_M: align(idx, E, block_m), device)
        for name, fn in providers(config, moe_args, args.sweep and device.type == "cuda").items():
            try:
                err = (fn().float() - truth).abs().max().item()  # every provider computes the same thing
                times = timed(fn, device)
            except Exception as e:  # noqa: BLE001 - a sweep tile that runs out of shared memory or registers
                console.print(f"[dim]skip {name}: {type(e).__name__}")
                continue
            gbps = moved / times[0] / 1e6
            note, share = f"max abs err vs fp32 {err:.2e}; {hit} experts hit", ""
            if name == "ours":
                gemm = times[0] - t_align[0]
                share = f"{100 * (t_route[0] + t_align[0]) / gemm:.1f}"
                note += f"; tiles {tiles.gemm}"
                route_align = tuple(a + b for a, b in zip(t_route, t_align, strict=True))
                row(
                    "moe.route+align", "ours", shape, bank, route_align, "% of GEMM time", float(share), 100.0,
                    f"route {t_route[0]:.4f} ms + align {t_align[0]:.4f} ms vs GEMMs {gemm:.4f} ms (moe minus align)",
                )  # fmt: skip
            row("moe", name, shape, bank, times, "GB/s", gbps, bandwidth, note)
            if not name.startswith("ours["):
                table.add_row(
                    bank, str(T), name, f"{times[0]:.3f}", str(hit), f"{gbps:.0f}", f"{100 * gbps / bandwidth:.0f}",
                    f"{err:.1e}", share,
                )  # fmt: skip
    append_rows(rows, args.out, table, console)


if __name__ == "__main__":
    main()
