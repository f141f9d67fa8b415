"""What every kernel benchmark shares: timing, the ceilings measured in the same run, and the results CSV.

Rows go to benchmarks/results/results.csv (one file for every op), each with its provenance: date, commit, GPU, the
op's shape and dtype, p50/p20/p80 time, the achieved rate in a roofline unit and that rate as a percentage of the
matching ceiling measured in the same process (a bf16 matmul for TFLOP/s, a device-to-device copy for GB/s).
The op column is the op's name, as in kernels/<op>.py, tests/test_<op>.py and bench_<op>.py (attention, moe, vocab),
or <op>.<launcher> for a part of it timed on its own (attention.norm_rope, moe.route+align); the case (layer type,
mode) goes in the shape column.
"""

from __future__ import annotations

import csv
import datetime
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "results.csv"
FIELDS = [
    "date", "commit", "gpu", "op", "provider", "shape", "dtype",
    "p50_ms", "p20_ms", "p80_ms", "unit", "value", "ceiling", "pct_of_ceiling", "note",
]  # fmt: skip


def timed(fn, device: torch.device, warmup_ms: float = 25, rep_ms: float = 100) -> tuple[float, float, float]:
    """(p50, p20, p80) milliseconds: CUDA events through triton's do_bench on a GPU, a host clock on the CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return tuple(do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8]))
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[1], times[0], times[2]


def matmul_tflops(device: torch.device, n: int = 8192) -> float:
    """The bf16 matmul ceiling: an n x n x n product through torch (cuBLAS), in TFLOP/s."""
    n = n if device.type == "cuda" else 256
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return 2 * n**3 / timed(lambda: a @ b, device)[0] / 1e9


def copy_gbps(device: torch.device, gib: float = 1.0) -> float:
    """The memory ceiling: a device-to-device copy, counting bytes read plus bytes written, in GB/s."""
    n = int(gib * 2**30) if device.type == "cuda" else 2**24
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * n / timed(lambda: dst.copy_(src), device)[0] / 1e6


def provenance(device: torch.device) -> dict:
    root = Path(__file__).parent.parent
    run = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True).stdout.strip()  # noqa: E731
    commit = run("rev-parse", "--short", "HEAD") or "unknown"
    if run("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"date": datetime.date.today().isoformat(), "commit": commit, "gpu": gpu}


def result_row(meta: dict, *, op, provider, shape, dtype, times, unit, value, ceiling, note="") -> dict:
    """One results row (FIELDS): times (p50, p20, p80) in ms, value in `unit` and its percentage of `ceiling`."""
    p50, p20, p80 = times
    return dict(
        meta, op=op, provider=provider, shape=shape, dtype=dtype,
        p50_ms=f"{p50:.4f}", p20_ms=f"{p20:.4f}", p80_ms=f"{p80:.4f}", unit=unit, value=f"{value:.4g}",
        ceiling=f"{ceiling:.4g}", pct_of_ceiling=f"{100 * value / ceiling:.1f}", note=note,
    )  # fmt: skip


def append_rows(rows: list[dict], path: Path, table, console) -> None:
    """Appends rows (FIELDS keys) to the results CSV, writing the header for a new file, then prints the run's table
    and where the rows went."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    console.print(table)
    console.print(f"{len(rows)} rows appended to {path}")
