"""Benchmark of the vocab op (kernels/vocab.py: vocab_pass): the fused pass against the runtime's sampler math in
eager PyTorch and under torch.compile. Rows: op "vocab".

One denoising step's work after the decoder: final hidden states h (R = 256 positions per canvas, D = 2816) and the
bf16 table E (V = 262,144) in; per position the argmax, a sample, the max probability and the entropy of
softmax(softcap(h E^T) / T), and the soft embedding softmax(bf16(z)) @ E * sqrt(D) out. Random inputs (rows' logit
scales spread so entropies span ~0 to ~ln V). The floor is two reads of E at the device-to-device copy bandwidth
measured in the same run (reads plus writes, as harness.copy_gbps counts them); the GB/s column is those 2|E| bytes
over the time, the same numerator for every provider, so pct_of_ceiling is the floor as a share of the time. Each
row's note: peak memory beyond the inputs (torch.cuda.max_memory_allocated), bytes read (ours: by its design; eager:
every op's inputs, counted; compiled: not observable), and the largest errors against a float64 truth.

    python benchmarks/bench_vocab.py                  # R = 256, rows appended to benchmarks/results/results.csv
    python benchmarks/bench_vocab.py --rows 256 1024  # also a batch of 4 canvases
    TRITON_INTERPRET=1 python benchmarks/bench_vocab.py --smoke --device cpu --out /tmp/rows.csv   # plumbing only
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch.utils._python_dispatch import TorchDispatchMode

from dgemma.kernels.vocab import vocab_pass, vocab_ref
from dgemma.model.config import Config
from dgemma.runtime.sampler import SamplingConfig, SeededDraws, entropy, temperature

from harness import RESULTS, append_rows, copy_gbps, provenance, result_row, timed


def reference_step(h, weight, T, cap: float, scale: float, draws: SeededDraws):
    """The runtime's default (SeededDraws) step on one canvas's h (R, D): the model's LM head and soft embedding and
    the sampler's functions, as runtime/pipeline.py calls them."""
    z = cap * torch.tanh(F.linear(h, weight).float() / cap) / T  # DiffusionGemma.logits, then the temperature
    probs = z.softmax(-1, dtype=torch.float32)
    sample = draws.sample(probs[None])[0]
    soft = (z.to(weight.dtype).softmax(-1, dtype=torch.float32).to(weight.dtype) @ weight) * scale
    return z.argmax(-1), sample, probs.amax(-1), entropy(z), soft


class ReadCounter(TorchDispatchMode):
    """Bytes of every tensor argument of every aten op: what eager PyTorch reads from memory, once per kernel."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for a in [*args, *(kwargs or {}).values()]:
            if isinstance(a, torch.Tensor):
                self.bytes += a.numel() * a.element_size()
        return func(*args, **(kwargs or {}))


def providers(h, weight, T, cap: float, scale: float, compiled) -> dict:
    """name -> zero-argument callable returning (argmax, sample, max_prob, entropy, soft) for one canvas."""
    tick, draws = torch.zeros(1, dtype=torch.int64, device=h.device), SeededDraws(0, h.device)
    return {
        "ours": lambda: vocab_pass(h, weight, T[None], tick, seed=0, cap=cap, scale=scale),
        "ours-recompute": lambda: vocab_pass(h, weight, T[None], tick, seed=0, cap=cap, scale=scale, stash=False),
        "reference": lambda: reference_step(h, weight, T, cap, scale, draws),
        "torch.compile": lambda: compiled(h, weight, T, cap, scale, draws),
    }


def peak_extra_mb(fn, device: torch.device) -> float:
    """Memory allocated beyond what was live before one call, at its peak (MB); nan on the CPU."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def our_bytes_read(R: int, V: int, D: int, itemsize: int, stash: bool) -> int:
    """By design: E twice from HBM (its second row tile from L2), h, and the stash, read by the normalization and by
    the GEMM (the recompute variant has none, but re-reads E from L2 once per output tile)."""
    return 2 * V * D * itemsize + R * D * itemsize + 2 * R * V * itemsize * stash


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rows", type=int, nargs="+", default=[256])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in fp32, to check the plumbing on a CPU")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    config = Config.diffusiongemma_26b_a4b()
    V, D, dtype, backend = config.vocab_size, config.hidden_size, torch.bfloat16, "inductor"
    if args.smoke:  # V not a multiple of a tile; inductor's CPU compile takes ~30 s, aot_eager runs the same plumbing
        V, D, dtype, backend, args.rows = 300, 40, torch.float32, "aot_eager", [16]
    cap = config.final_logit_softcapping
    scale = torch.tensor(D**0.5, dtype=dtype).item()
    meta = provenance(device)
    bandwidth = copy_gbps(device)
    console = Console(width=160)
    console.print(f"{meta['gpu']}: copy {bandwidth:.0f} GB/s; floor = 2 reads of E ({dtype}), torch.compile {backend}")
    torch.manual_seed(0)
    weight = (torch.randn(V, D, device=device) / D**0.5).to(dtype)
    floor_bytes = 2 * weight.numel() * weight.element_size()
    floor_ms = floor_bytes / bandwidth / 1e6
    compiled = torch.compile(reference_step, backend=backend)
    rows, table = [], Table("R", "provider", "ms", "x floor", "peak extra MB", "GB read", "max err H / soft")
    for R in args.rows:
        h = (torch.randn(R, D, device=device) * 10 ** (torch.rand(R, 1, device=device) * 3 - 1.5)).to(dtype)
        T = temperature(SamplingConfig().max_denoising_steps, SamplingConfig()).to(device)
        _, _, _, H_true, soft_true = vocab_ref(h.double(), weight.double(), T.double()[None], cap, D**0.5)
        fns = providers(h, weight, T, cap, scale, compiled)
        for name, fn in fns.items():
            out = fn()  # also the compile, before any timing
            errors = [
                ((out[3].double() - H_true).abs() / H_true.abs().clamp(min=1e-6)).max().item(),
                (out[4].double() - soft_true).abs().max().item(),
            ]
            peak = peak_extra_mb(fn, device)
            times = timed(fn, device)
            p50 = times[0]
            if name.startswith("ours"):
                read, how = our_bytes_read(R, V, D, weight.element_size(), name == "ours"), "by design"
            elif name == "reference":
                with ReadCounter() as counter:
                    fn()
                read, how = counter.bytes, "every op's inputs"
            else:
                read, how = float("nan"), "not observable"
            gbps = floor_bytes / p50 / 1e6
            note = (
                f"peak extra {peak:.0f} MB; read {read / 1e9:.4g} GB ({how}); floor {floor_ms:.4f} ms = 2 reads of E; "
                f"max rel err vs fp64 entropy {errors[0]:.2e}; max abs err soft {errors[1]:.2e}"
            )
            rows.append(
                result_row(
                    meta, op="vocab", provider=name, shape=f"R{R} V{V} D{D}", dtype=str(dtype).removeprefix("torch."),
                    times=times, unit="GB/s", value=gbps, ceiling=bandwidth, note=note,
                )
            )  # fmt: skip
            table.add_row(
                str(R), name, f"{p50:.3f}", f"{p50 / floor_ms:.2f}", f"{peak:.0f}", f"{read / 1e9:.4g}",
                f"{errors[0]:.1e} / {errors[1]:.1e}",
            )  # fmt: skip
    append_rows(rows, args.out, table, console)


if __name__ == "__main__":
    main()
