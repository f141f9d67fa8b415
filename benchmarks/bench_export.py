"""`dgemma export` at the real model's width: time and peak memory of the ONNX export and of the TensorRT-RTX build.

Exporting is a host job (it never touches a GPU), so it is measured on this machine. The real 26B weights cannot be
downloaded here, so each run writes a checkpoint with the real config's every width (hidden 2816, 128 experts of
704, head dims 256 and 512, the 262,144-token tied table) but only the first few layers, random weights, bf16, and
exports it as a user would (`dgemma export onnx --dtype bf16`, then `dgemma export trt`), each command in its own
process so that its peak resident memory is its own. Runs at two or more layer counts give the cost per layer, from
which the row notes extrapolate to the real 30 layers.

Row: op `export onnx` or `export trt`, provider the tool, times = the command's wall time (one run, so
p50 = p20 = p80), value = its peak RSS in GB, ceiling = this machine's RAM; the note has the files' sizes.

    python benchmarks/bench_export.py                        # 1 and 2 layers, rows to benchmarks/results/results.csv
    python benchmarks/bench_export.py --layers 1 2 3 --no-build
    python benchmarks/bench_export.py --smoke --out /tmp/rows.csv   # the tiny test config: plumbing only
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from dgemma.model.checkpoint import save_model
from dgemma.model.config import FULL, SLIDING, Config
from dgemma.model.model import DiffusionGemma
from dgemma.training.trainer import init_weights

from harness import RESULTS, append_rows, provenance, result_row

REAL_LAYERS = 30


def config_of(layers: int, smoke: bool) -> Config:
    """The real config (or the tiny one) cut to `layers` layers: sliding ones, then a global one, as the real model
    ends; a single layer is global (its head dim 512 is the harder case for the exporter and the builder)."""
    base = Config.tiny() if smoke else Config.diffusiongemma_26b_a4b()
    return dataclasses.replace(base, num_hidden_layers=layers, layer_types=[SLIDING] * (layers - 1) + [FULL])


def write_checkpoint(folder: Path, config: Config) -> int:
    """A random bf16 checkpoint of `config` in the official layout -> its parameter count."""
    with torch.device("meta"):
        model = DiffusionGemma(config)
    model = init_weights(model.to_empty(device="cpu").to(torch.bfloat16), seed=0)
    save_model(model, folder, dtype=torch.bfloat16)
    return sum(p.numel() for p in model.parameters())


def measured(command: list[str]) -> tuple[float, float]:
    """Runs `command` in a child of a fresh Python process -> (wall seconds, the child's peak RSS in GB)."""
    probe = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); subprocess.run(sys.argv[1:], check=True); "
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    done = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    seconds, kib = done.stdout.split()[-2:]
    return float(seconds), int(kib) * 1024 / 1e9


def size_gb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir()) / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--no-build", action="store_true", help="skip the TensorRT-RTX build")
    ap.add_argument("--smoke", action="store_true", help="the tiny test config (plumbing only)")
    ap.add_argument("--device", default="cpu", help="only cpu: exporting is a host job (for the common bench flags)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.device != "cpu":
        raise SystemExit("the export runs on the host: --device cpu")
    build = not args.no_build and importlib.util.find_spec("tensorrt_rtx") is not None
    meta, console = provenance(torch.device("cpu")), Console()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    cli = [sys.executable, "-m", "dgemma", "export"]
    rows, per_layer = [], {}
    table = Table("layers", "params", "step", "seconds", "peak RSS GB", "files GB")
    for layers in args.layers:
        config = config_of(layers, args.smoke)
        shape = f"layers={layers} D={config.hidden_size} E={config.num_experts} V={config.vocab_size}"
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            params = write_checkpoint(tmp / "ckpt", config)
            prompt = min(4096, config.max_position_embeddings)  # the profile the real engines are built for
            export = ["onnx", "--model", tmp / "ckpt", "--out", tmp / "onnx", "--dtype", "bf16", "--max-prompt", prompt]
            steps = [("export onnx", "torch.onnx dynamo", export)]
            if build:
                steps.append(("export trt", "tensorrt_rtx", ["trt", "--onnx", tmp / "onnx", "--out", tmp / "trt"]))
            for op, provider, command in steps:
                seconds, peak = measured([*cli, *map(str, command)])
                files = size_gb(tmp / ("onnx" if op == "export onnx" else "trt"))
                per_layer.setdefault(op, []).append((layers, seconds, peak))
                note = f"{params / 1e6:.1f}M params, bf16; files {files:.2f} GB; one run"
                rows.append(
                    result_row(
                        meta, op=op, provider=provider, shape=shape, dtype="bfloat16", times=(seconds * 1e3,) * 3,
                        unit="GB peak RSS", value=peak, ceiling=ram, note=note,
                    )
                )  # fmt: skip
                table.add_row(str(layers), f"{params / 1e6:.1f}M", op, f"{seconds:.1f}", f"{peak:.1f}", f"{files:.2f}")
    for op, runs in per_layer.items():  # the slope between the smallest and largest runs, to the real layer count
        (l0, s0, m0), (l1, s1, m1) = min(runs), max(runs)
        if l1 > l0 and not args.smoke:
            ds, dm = (s1 - s0) / (l1 - l0), (m1 - m0) / (l1 - l0)
            line = f"{op}: {ds:.1f} s and {dm:.2f} GB per layer: ~{s1 + ds * (REAL_LAYERS - l1):.0f} s, "
            console.print(line + f"~{m1 + dm * (REAL_LAYERS - l1):.0f} GB peak at {REAL_LAYERS} layers (linear)")
            for row in rows:
                if row["op"] == op and row["shape"].startswith(f"layers={l1} "):
                    row["note"] += f"; linear in layers from {l0} and {l1}: ~{m1 + dm * (REAL_LAYERS - l1):.0f} GB peak"
    append_rows(rows, args.out, table, console)


if __name__ == "__main__":
    main()
