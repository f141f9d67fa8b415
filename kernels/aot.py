"""Ahead-of-time compilation of the Triton kernels for Hopper (sm_90a) on any machine, GPU or not.

Triton lowers a kernel to PTX and assembles it with the ptxas its wheel bundles; `cuobjdump --dump-resource-usage`
on the cubin then gives the resource report: registers, stack (register spills) and shared memory. That catches code
the interpreter accepts but compiled Triton rejects, and shows spills before any GPU time is spent.

    python -m dgemma.kernels.aot          # one line per kernel at the tile configs the model uses on an H100
    python -m dgemma.kernels.aot --json   # the same, machine-readable (tests/test_sm90.py)

Must run with TRITON_INTERPRET unset: under the interpreter `@triton.jit` makes functions that cannot be compiled.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ..model.config import FULL, SLIDING, Config
from . import attention, moe, sampler, vocab

HOPPER = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 227 * 1024  # the most shared memory one H100 block may use
H100_SMS = 132  # an H100 SXM's multiprocessors, which set the split counts


def compile_sm90(
    kernel, pointers: dict, constexprs: dict, *, floats=(), unaligned=(), num_warps: int, num_stages: int
) -> dict:  # fmt: skip
    """Compiles `kernel` for sm_90a; every argument not in `pointers` (name -> "*bf16"...), `constexprs` or `floats`
    is an int32 scalar; pointers in `unaligned` (views at an offset) get no alignment hint. Returns the resource
    report."""
    signature = {
        name: "constexpr" if name in constexprs else pointers.get(name, "fp32" if name in floats else "i32")
        for name in kernel.arg_names
    }
    # A real launch marks 16-byte-aligned pointers and multiple-of-16 integers divisible by 16; without those hints
    # Triton neither vectorizes nor pipelines the loads, and the report would show a kernel no launch compiles.
    # Every pointer and stride here is one (the model's head dims, hidden sizes and canvas are multiples of 16).
    hinted = [
        i for i, name in enumerate(kernel.arg_names)
        if (name in pointers and name not in unaligned) or name.startswith("stride")
    ]  # fmt: skip
    attrs = {(i,): [["tt.divisibility", 16]] for i in hinted}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=HOPPER, options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        usage = subprocess.run([tool, "--dump-resource-usage", cubin], capture_output=True, text=True, check=True)
    found = dict(re.findall(r"(REG|STACK):(\d+)", usage.stdout))
    return {
        "shared": compiled.metadata.shared,
        "registers": int(found["REG"]),
        "stack": int(found["STACK"]),
        "wgmma": "wgmma" in compiled.asm["ptx"],
    }


def production() -> list[tuple[str, object, dict, dict, tuple, tuple, int, int]]:
    """(label, kernel, pointers, constexprs, floats, unaligned, num_warps, num_stages) for every kernel launch the
    real model makes on an H100 in bf16."""
    config, cuda, out = Config.diffusiongemma_26b_a4b(), torch.device("cuda"), []
    for kind in (SLIDING, FULL):
        d = config.head_dim_of(kind)
        tiles = attention.tile_config(d, torch.bfloat16, cuda)
        warps, stages = tiles.pop("num_warps"), tiles.pop("num_stages")
        pointers = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", pos_ptr="*i64", valid_ptr="*u8", lse_ptr="*fp32")
        for o in ("*fp32", "*bf16"):  # split partials, or the output itself when there is one split
            constexprs = dict(HEAD_DIM=d, BLOCK_D=d, PRECISION="tf32", **tiles)
            label = f"attention d{d} o={o[1:]} " + " ".join(f"{k}={v}" for k, v in tiles.items())
            out.append(
                (label, attention._attention_kernel, {**pointers, "o_ptr": o}, constexprs, (), (), warps, stages)
            )
        constexprs = dict(HEAD_DIM=d, BLOCK_D=d, BLOCK_SPLITS=8)
        pointers = dict(o_ptr="*fp32", lse_ptr="*fp32", out_ptr="*bf16")
        out.append((f"combine d{d}", attention._combine_kernel, pointers, constexprs, (), (), 4, 1))
        for weighted in (True, False):  # q/k norm with RoPE; V's weightless norm
            constexprs = dict(
                HALF=d // 2, BLOCK_HALF=d // 2, ROWS=attention.rows_per_program(d), HAS_WEIGHT=weighted, ROPE=weighted
            )
            pointers = dict(x_ptr="*bf16", w_ptr="*bf16", inv_freq_ptr="*fp32", out_ptr="*bf16")
            label = f"norm_rope d{d} {'q/k' if weighted else 'v'}"
            out.append((label, attention._norm_rope_kernel, pointers, constexprs, ("eps",), (), 4, 1))
    T, K, E = config.canvas_length, config.top_k_experts, config.num_experts
    D, I = config.hidden_size, config.moe_intermediate_size
    router = dict(r_ptr="*bf16", scale_ptr="*bf16", proj_ptr="*bf16", expert_scale_ptr="*bf16")
    router.update(weights_ptr="*fp32", idx_ptr="*i32")
    constexprs = dict(K=K, BLOCK_T=16, BLOCK_D=64, BLOCK_E=E, BLOCK_K=K, PRECISION="tf32")
    out.append(("moe router", moe._router_kernel, router, constexprs, ("eps", "root"), (), 4, 1))
    ids = dict(idx_ptr="*i32", counts_ptr="*i32", pair_ptr="*i32", block_expert_ptr="*i32")
    out.append(("moe count", moe._count_kernel, ids, dict(BLOCK_P=1024), (), (), 4, 1))
    out.append(("moe place", moe._place_kernel, ids, dict(BLOCK_M=32, BLOCK_P=1024, BLOCK_E=E), (), (), 4, 1))
    for bank in ("bf16", "fp8e4nv"):
        tiles = moe.tile_config(T, K, E, cuda)
        warps, stages = tiles.pop("num_warps"), tiles.pop("num_stages")
        scaled = bank != "bf16"
        pointers = dict(w_ptr=f"*{bank}", scale_ptr="*fp32" if scaled else f"*{bank}", pair_ptr="*i32")
        pointers.update(block_expert_ptr="*i32", x_ptr="*bf16", h_ptr="*bf16", y_ptr="*bf16")
        label = " ".join(f"{k}={v}" for k, v in tiles.items())
        for name, kernel, reduced in (("gate_up", moe._gate_up_kernel, D), ("down", moe._down_kernel, I)):
            constexprs = dict(SCALED=scaled, PRECISION="tf32", EVEN_R=reduced % tiles["BLOCK_R"] == 0, **tiles)
            out.append((f"moe {name} {bank} {label}", kernel, pointers, constexprs, (), (), warps, stages))
    sums = dict(y_ptr="*bf16", weights_ptr="*fp32", out_ptr="*bf16")
    out.append(("moe sum", moe._sum_kernel, sums, dict(BLOCK_T=16, BLOCK_D=256), (), (), 4, 1))
    return out + vocab_and_sampler(config)


def vocab_and_sampler(config: Config) -> list:
    """The vocabulary pass over one canvas (both inputs: hidden states, an exported graph's fp32 logits; stash and
    recompute) and the sampler's two kernels, as production() lists them."""
    tiles, out = vocab.tile_config(torch.device("cuda")), []
    R, V = config.canvas_length, config.vocab_size
    for logits in (False, True):
        for stash in (True, False):
            h = "*fp32" if logits else "*bf16"
            st = dict(tiles["stats"])
            warps, stages = st.pop("num_warps"), st.pop("num_stages")
            pointers = dict(h_ptr=h, w_ptr="*bf16", temp_ptr="*fp32", tick_ptr="*i64", z_ptr="*bf16")
            pointers.update(part_f_ptr="*fp32", part_i_ptr="*i32")
            constexprs = dict(STASH=stash, LOGITS=logits, PRECISION="tf32", **st)
            label = f"vocab stats {'logits' if logits else 'hidden'} {'stash' if stash else 'recompute'}"
            out.append((label, vocab._stats_kernel, pointers, constexprs, ("cap",), (), warps, stages))
            sk = dict(tiles["soft"])
            warps, stages = sk.pop("num_warps"), sk.pop("num_stages")
            pointers = dict(p_ptr="*bf16", h_ptr=h, w_ptr="*bf16", temp_ptr="*fp32", norm_ptr="*fp32", part_ptr="*fp32")
            constexprs = dict(RECOMPUTE=not stash, LOGITS=logits, PRECISION="tf32", **sk)
            label = label.replace("stats", "soft")
            out.append((label, vocab._soft_kernel, pointers, constexprs, ("cap",), (), warps, stages))
    splits = min(triton.cdiv(2 * H100_SMS, triton.cdiv(R, tiles["stats"]["BLOCK_M"])), V)
    cb = dict(tiles["combine"])
    warps = cb.pop("num_warps")
    pointers = dict(part_f_ptr="*fp32", part_i_ptr="*i32", z_ptr="*bf16", argmax_ptr="*i64", sample_ptr="*i64")
    pointers.update(max_prob_ptr="*fp32", entropy_ptr="*fp32", norm_ptr="*fp32")
    for stash in (True, False):
        constexprs = dict(BLOCK_S=triton.next_power_of_2(splits), STASH=stash, **cb)
        out.append((f"vocab combine stash={stash}", vocab._combine_kernel, pointers, constexprs, (), (), warps, 1))
    rd = dict(tiles["reduce"])
    warps = rd.pop("num_warps")
    pointers = dict(part_ptr="*fp32", keep_ptr="*u8", out_ptr="*bf16")
    out.append(("vocab soft_reduce", vocab._soft_reduce_kernel, pointers, rd, ("scale",), (), warps, 1))
    C = config.canvas_length
    pointers = dict(entropy_ptr="*fp32", sample_ptr="*i64", argmax_ptr="*i64", tick_ptr="*i64", step_ptr="*i64")
    pointers.update(running_ptr="*i32", canvas_ptr="*i64", last_ptr="*i64", history_ptr="*i64", done_ptr="*i1")
    pointers.update(frozen_ptr="*i1", accepted_ptr="*i1", counts_ptr="*i32", passes_ptr="*i64")
    constexprs = dict(BLOCK_C=triton.next_power_of_2(C), BLOCK_J=16)
    floats, unaligned = ("bound", "threshold"), ("counts_ptr",)  # counts[1:]: 4 bytes into its buffer
    out.append(("sampler step", sampler._step_kernel, pointers, constexprs, floats, unaligned, 4, 1))
    pointers = dict(schedule_ptr="*fp32", done_ptr="*i1", frozen_ptr="*i1", temperature_ptr="*fp32")
    pointers.update(step_ptr="*i64", tick_ptr="*i64", running_ptr="*i32", steps_ptr="*i32")
    out.append(("sampler finish", sampler._finish_kernel, pointers, dict(BLOCK_B=1), (), (), 4, 1))
    return out


def report() -> list[dict]:
    rows = []
    for label, kernel, pointers, constexprs, floats, unaligned, warps, stages in production():
        usage = compile_sm90(
            kernel, pointers, constexprs, floats=floats, unaligned=unaligned, num_warps=warps, num_stages=stages
        )
        rows.append({"label": label, "num_warps": warps, "num_stages": stages, **usage})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description="Compile every production kernel for sm_90a and print its resources.")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = report()
    if args.json:
        print(json.dumps(rows))
        return
    for row in rows:
        print(
            f"{row['label']:<70} warps {row['num_warps']} stages {row['num_stages']}: {row['registers']} registers, "
            f"{row['stack']} B stack, {row['shared']} B shared{', wgmma' if row['wgmma'] else ''}"
        )


if __name__ == "__main__":
    main()
