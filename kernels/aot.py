"""Ahead-of-time compilation of every kernel launch for Hopper (sm_90a) on any machine, GPU or not.

Each kernel module's `sm90_launches` calls its launchers on meta tensors at the model's shapes (`common.REAL`) while
`common.recording`, so what compiles here is what the launchers launch: the same tiles, constexprs, argument types,
warps and stages. Triton lowers each launch to PTX and assembles it with the ptxas its wheel bundles; `cuobjdump
--dump-resource-usage` on the cubin then gives the resource report: registers, stack (register spills) and shared
memory. That catches code the interpreter accepts but compiled Triton rejects, and shows spills without a GPU.

    python -m dgemma.kernels.aot          # one line per launch
    python -m dgemma.kernels.aot --json   # the same, machine-readable (tests/test_sm90.py)

What a real launch would specialize on its values, this assumes: every pointer not recorded as unaligned is 16-byte
aligned and every stride a multiple of 16 (the model's head dims, hidden sizes and canvas are), and integers are
int32 scalars. Must run with TRITON_INTERPRET unset: under the interpreter `@triton.jit` makes functions that cannot
be compiled.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import attention, moe, sampler, vocab
from .common import REAL, Launch, Shapes

OPS = (attention, moe, vocab, sampler)
HOPPER = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 227 * 1024  # the most shared memory one H100 block may use


def compile_sm90(launch: Launch) -> dict:
    """Compiles one launch for sm_90a; returns its resource report."""
    kernel = launch.kernel
    signature = {name: launch.signature.get(name, "constexpr") for name in kernel.arg_names}
    # A real launch marks 16-byte-aligned pointers and multiple-of-16 integers divisible by 16; without those hints
    # Triton neither vectorizes nor pipelines the loads, and the report would show a kernel no launch compiles.
    hinted = [
        i for i, name in enumerate(kernel.arg_names)
        if (signature[name].startswith("*") and name not in launch.unaligned) or name.startswith("stride")
    ]  # fmt: skip
    attrs = {(i,): [["tt.divisibility", 16]] for i in hinted}
    source = ASTSource(fn=kernel, signature=signature, constexprs=launch.constexprs, attrs=attrs)
    options = dict(num_warps=launch.num_warps, num_stages=launch.num_stages)
    compiled = triton.compile(source, target=HOPPER, options=options)
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


def launches(shapes: Shapes = REAL) -> list[Launch]:
    """Every launch of every kernel module, in OPS order."""
    return [launch for op in OPS for launch in op.sm90_launches(shapes)]


def report(shapes: Shapes = REAL) -> list[dict]:
    rows = []
    for launch in launches(shapes):
        fn = launch.kernel.fn
        tiles = {k: v for k, v in launch.constexprs.items() if k.startswith("BLOCK_") or k == "ROWS"}
        row = {"label": launch.label, "kernel": f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}", "tiles": tiles}
        row |= {"num_warps": launch.num_warps, "num_stages": launch.num_stages}
        rows.append(row | compile_sm90(launch))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description="Compile every kernel launch for sm_90a and print its resources.")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = report()
    if args.json:
        print(json.dumps(rows))
        return
    for row in rows:
        tiles = " ".join(f"{k}={v}" for k, v in row["tiles"].items())
        print(
            f"{row['label']:<36} {tiles:<52} warps {row['num_warps']} stages {row['num_stages']}: "
            f"{row['registers']} registers, {row['stack']} B stack, {row['shared']} B shared"
            f"{', wgmma' if row['wgmma'] else ''}"
        )


if __name__ == "__main__":
    main()
