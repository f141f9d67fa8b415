"""End-to-end generation speed: dgemma's Triton backend (the sync-free DeviceLoop), its torch backend, and
transformers' `DiffusionGemmaForBlockDiffusion.generate`, on the same device and the same weights.

The real 26B-A4B shape with random weights made on the device (no checkpoint), full-precision (bf16) experts, then
the same banks quantized in place to fp8; batch 1 and 4; a random prompt of 4096 tokens; two 256-token canvases of
16 fixed denoising steps each (no early stop, no stop ids). The three providers share every weight tensor (two
copies of 52 GB do not fit an H100); transformers has no fp8 expert path, so the fp8 rows time dgemma only. Runs
alternate between the providers (ABCABC...) so that drift on a shared machine hits all of them alike.

Per provider and shape: tokens/s with the prefill excluded (vLLM's convention: its 1,008 tok/s on an H100 and 1,288
on an H200 are FP8, batch 1, 16 steps, prompt 4096) and included; ms per pass (the run without its prefill over
its decoder passes and canvas commits); the bytes those passes must read (every weight, the embedding table a second
time for the soft embedding, the visible K/V) over the copy bandwidth measured in the same run, as % of that floor;
peak memory. Rows go to benchmarks/results/results.csv: ops "generate" and "generate.with_prefill" in tok/s against the
floor's tok/s, "generate.pass" in GB/s against the copy bandwidth.

    python benchmarks/bench_generate.py                               # on a GPU: real shape, bf16 + fp8, B = 1, 4
    python benchmarks/bench_generate.py --device cpu --config small   # the same comparison, scaled down, fp32
    TRITON_INTERPRET=1 python benchmarks/bench_generate.py --smoke --out /tmp/rows.csv   # plumbing only

`--config small` keeps the real canvas, layer mix (five sliding layers, one global), expert count and top-k with
smaller widths (hidden 512, 6 layers, vocabulary 32,768), a 512-token prompt and 512 new tokens in fp32: the CPU
loop of the embedded default model, against transformers' on the same weights.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib.metadata
import os
import resource
import sys
import time
import traceback
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from dgemma.errors import DgemmaError
from dgemma.model import fp8
from dgemma.model.config import FULL, SLIDING, Config
from dgemma.model.model import DiffusionGemma
from dgemma.runtime.pipeline import generate_ids
from dgemma.runtime.sampler import SamplingConfig

from harness import RESULTS, append_rows, copy_gbps, provenance, result_row

PROVIDERS = ("dgemma-triton", "dgemma-torch", "transformers")
EXPERTS = ("full", "fp8")  # the model dtype's banks (bf16 on a GPU, fp32 on the CPU), or fp8 with per-channel scales
TRANSFORMERS = "5.23.0"  # the version the parity tests pin; the GPU image's own predates DiffusionGemma
VISION = dict(
    model_type="gemma4_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=2, head_dim=16, patch_size=16, position_embedding_size=64, pooling_kernel_size=3,
)  # fmt: skip  # transformers always builds a vision tower; generation from ids never runs it


@dataclasses.dataclass
class Shape:
    config: Config
    prompt: int
    new_tokens: int
    steps: int
    dtype: torch.dtype

    @property
    def canvases(self) -> int:
        return -(-self.new_tokens // self.config.canvas_length)


def shape_of(name: str) -> Shape:
    """The real model, its scaled-down CPU twin, or the smoke test's tiny one."""
    real = Config.diffusiongemma_26b_a4b()
    if name == "real":
        return Shape(real, 4096, 512, 16, torch.bfloat16)
    if name == "small":
        small = dataclasses.replace(
            real, vocab_size=32_768, hidden_size=512, intermediate_size=384, moe_intermediate_size=128,
            num_hidden_layers=6, layer_types=[SLIDING] * 5 + [FULL], num_attention_heads=8, num_key_value_heads=4,
            head_dim=64, global_head_dim=128, num_global_key_value_heads=1, sliding_window=512,
        )  # fmt: skip  # the real head-group ratios (2 on sliding layers, 8 on global ones) and experts, narrower
        return Shape(small, 512, 512, 16, torch.float32)
    tiny = Config.tiny(
        num_hidden_layers=2, layer_types=[SLIDING, FULL], num_experts=2, top_k_experts=2, max_position_embeddings=64
    )  # both layer types, a window of 8 that the 12-token prompt wraps; small, for Triton's interpreter
    return Shape(tiny, 12, 16, 1, torch.float32)  # two canvases of 8, one step each: prefill, pass, commit, pass


# ---------------------------------------------------------------------------------------------------------------
# One set of weights, three providers


def random_model(config: Config, dtype: torch.dtype, device: torch.device, seed: int = 0) -> DiffusionGemma:
    """A DiffusionGemma with random weights made on `device` in `dtype`: matrices N(0, 1/fan_in), so activations keep
    their scale through 30 layers; norm weights and scales in [0.5, 1.5), as trained ones are, not all ones."""
    with torch.device("meta"):
        model = DiffusionGemma(config)
    g = torch.Generator(device).manual_seed(seed)
    state = {}
    for name, t in model.state_dict().items():
        if t.ndim >= 2:
            w = torch.randn(t.shape, dtype=dtype, device=device, generator=g)
            state[name] = w.mul_(t.shape[-1] ** -0.5)
        else:
            state[name] = (0.5 + torch.rand(t.shape, device=device, generator=g)).to(dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval()


def quantize_experts(model: DiffusionGemma) -> None:
    """Replaces every expert bank by its fp8 quantization, one bank at a time (as load_model does with
    expert_dtype="fp8"), so the full-precision banks are freed as the fp8 ones are made."""
    for layer in model.layers:
        experts, scales = layer.experts, []
        for name in ("gate_up_proj", "down_proj"):
            q, scale = fp8.quantize(getattr(experts, name))
            setattr(experts, name, nn.Parameter(q, requires_grad=False))
            scales.append(scale)
        fp8.store_fp8(experts, *scales)


def triton_twin(model: DiffusionGemma) -> DiffusionGemma:
    """The same model on backend="triton": new module objects (whose classes use_kernels swaps) over the very same
    parameter and buffer tensors."""
    from dgemma.model.fused import use_kernels

    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return use_kernels(copy.deepcopy(model, memo=shared))


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside create their parameters on the meta device (their buffers for real), so a transformers
    model of the real size costs nothing until it is given our tensors."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def transformers_twin(model: DiffusionGemma):
    """transformers' DiffusionGemmaForBlockDiffusion over the same tensors: its decoder and encoder parameters are our
    parameters (the checkpoint's name map: `model.decoder.<name>` and `model.encoder.language_model.<name>` are both
    `<name>`), its layer scalars copies of ours; only the vision tower, which ids never reach, is its own."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    config = model.config
    hf_config = DiffusionGemmaConfig(
        text_config=config.hf_text_config(), vision_config=VISION, canvas_length=config.canvas_length,
        eos_token_id=None, pad_token_id=config.pad_token_id,
    )  # fmt: skip
    with parameters_on_meta():
        hf = DiffusionGemmaForBlockDiffusion(hf_config)
    ours = dict(model.named_parameters())
    used = set()
    for name, _ in list(hf.named_parameters(remove_duplicate=False)):
        owner, leaf = name.rsplit(".", 1)
        module = hf.get_submodule(owner)
        for prefix in ("model.decoder.", "model.encoder.language_model.", "lm_head."):
            if name.startswith(prefix):
                key = "embed_tokens.weight" if prefix == "lm_head." else name.removeprefix(prefix)
                if key not in ours or ours[key].shape != module._parameters[leaf].shape:
                    raise DgemmaError(f"transformers' {name} has no counterpart of its shape in dgemma's model")
                module._parameters[leaf] = ours[key]
                used.add(key)
                break
        else:  # the vision tower
            fresh = torch.randn(module._parameters[leaf].shape, dtype=model.dtype, device=model.device)
            module._parameters[leaf] = nn.Parameter(fresh * 0.02, requires_grad=False)
    if missing := sorted(set(ours) - used):
        raise DgemmaError(f"dgemma parameters transformers does not use: {missing[:4]}")
    for i, layer in enumerate(model.layers):
        hf.model.decoder.layers[i].layer_scalar.copy_(layer.decoder_scalar)
        hf.model.encoder.language_model.layers[i].layer_scalar.copy_(layer.encoder_scalar)
    return hf.to(model.device).eval()


# ---------------------------------------------------------------------------------------------------------------
# Timing one generation, its prefill apart


class Prefill:
    """Times the first encoder call of a generation, the prompt's prefill, with the device synchronized around it
    (two syncs per run, outside the canvas loop)."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self._start = device, None, None

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self, *_):
        if self._start is None:
            self.sync()
            self._start = time.perf_counter()

    def stop(self, *_):
        if self.seconds is None:
            self.sync()
            self.seconds = time.perf_counter() - self._start


def run_dgemma(model: DiffusionGemma, prompt, cfg: SamplingConfig, seed: int, prefill: Prefill, reference=False):
    """One generate_ids call -> (sequences, decoder passes per canvas); `model.encode` is wrapped for the call."""
    encode = model.encode

    def timed_encode(*args, **kwargs):
        prefill.start()
        out = encode(*args, **kwargs)
        prefill.stop()
        return out

    model.encode = timed_encode
    try:
        sequences, stats = generate_ids(model, prompt, cfg, seed=seed, reference=reference)
    finally:
        del model.encode
    return sequences, stats.steps_per_canvas


def run_transformers(hf, prompt, cfg: SamplingConfig, seed: int, prefill: Prefill):
    """One transformers generate call with dgemma's sampling settings and no stopping rule (neither the stable-and-
    confident early stop nor EOS) -> (sequences, decoder passes per canvas, which are then all fixed)."""
    encoder = hf.model.encoder
    hooks = encoder.register_forward_pre_hook(prefill.start), encoder.register_forward_hook(prefill.stop)
    torch.manual_seed(seed)  # transformers draws on the global RNG
    try:
        with torch.no_grad():
            out = hf.generate(
                prompt, max_new_tokens=cfg.max_new_tokens, max_denoising_steps=cfg.max_denoising_steps,
                t_min=cfg.t_min, t_max=cfg.t_max, stability_threshold=None, confidence_threshold=None,
                eos_token_id=None, pad_token_id=cfg.pad_id,
            )  # fmt: skip
    finally:
        for hook in hooks:
            hook.remove()
    canvases = (out.sequences.shape[1] - prompt.shape[1]) // hf.config.canvas_length
    return out.sequences, [cfg.max_denoising_steps] * canvases


@dataclasses.dataclass
class Timing:
    total: list[float] = dataclasses.field(default_factory=list)  # seconds per run, prefill included
    prefill: list[float] = dataclasses.field(default_factory=list)
    peak: float = 0.0  # bytes


def measure(run, device: torch.device, timing: Timing, expected: list[int]) -> torch.Tensor:
    """One run of `run(prefill)`, timed into `timing`; every canvas must have taken the fixed step count."""
    prefill = Prefill(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prefill.sync()
    start = time.perf_counter()
    sequences, steps = run(prefill)
    prefill.sync()
    timing.total.append(time.perf_counter() - start)
    timing.prefill.append(prefill.seconds)
    if steps != expected:
        raise DgemmaError(f"decoder passes per canvas {steps}, not the fixed {expected}")
    if device.type == "cuda":
        timing.peak = max(timing.peak, torch.cuda.max_memory_allocated(device))
    else:  # the process's peak resident set: it only grows, so it is shared by every provider
        timing.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return sequences


# ---------------------------------------------------------------------------------------------------------------
# The floor: bytes each pass must read


def weight_bytes(model: DiffusionGemma) -> tuple[int, int, int]:
    """(all weights, the embedding table, the self-conditioning MLP) in bytes, fp8 scales included."""
    size = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    table = model.embed_tokens.weight
    return size([*model.parameters(), *model.buffers()]), size([table]), size(model.self_conditioning.parameters())


def kv_bytes(config: Config, committed: int, batch: int, itemsize: int) -> int:
    """K and V bytes one pass over a canvas reads at `committed` prefix tokens: each layer's visible committed keys
    (sliding layers the last W - 1, as the shared window does) and the canvas's own."""
    total = 0
    for kind in config.layer_types:
        seen = min(committed, config.sliding_window - 1) if kind == SLIDING else committed
        total += 2 * (seen + config.canvas_length) * config.num_kv_heads(kind) * config.head_dim_of(kind)
    return batch * total * itemsize


def floor_bytes(model: DiffusionGemma, shape: Shape, batch: int) -> tuple[int, int]:
    """(bytes, passes) of one generation after its prefill: every decoder pass reads every weight plus the embedding
    table again (the LM head and the soft embedding both stream it) and its K/V; every commit reads the weights but
    the table and the self-conditioning MLP, and its K/V. All experts count: 256 tokens x top-8 touch all 128."""
    weights, table, sc = weight_bytes(model)
    C, itemsize = shape.config.canvas_length, torch.finfo(model.dtype).bits // 8
    total = passes = 0
    for k in range(shape.canvases):
        committed = shape.prompt + k * C
        if k > 0:  # the previous canvas's commit
            total += weights - table - sc + kv_bytes(shape.config, committed - C, batch, itemsize)
            passes += 1
        total += shape.steps * (weights + table + kv_bytes(shape.config, committed, batch, itemsize))
        passes += shape.steps
    return total, passes


# ---------------------------------------------------------------------------------------------------------------
# The benchmark


def transformers_version() -> str | None:
    """The installed transformers' version if it has DiffusionGemma, else None (after saying why)."""
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        print("transformers is not installed: that provider is skipped", file=sys.stderr)
        return None
    try:
        from transformers import DiffusionGemmaForBlockDiffusion  # noqa: F401
    except ImportError:
        print(f"transformers {version} has no DiffusionGemma (it arrived after 5.17; the tests pin {TRANSFORMERS}): "
              "that provider is skipped", file=sys.stderr)  # fmt: skip
        return None
    if version != TRANSFORMERS:
        print(f"transformers {version}, not the pinned {TRANSFORMERS}: its rows say so", file=sys.stderr)
    return version


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", help="cuda or cpu (default: cuda when there is a GPU)")
    ap.add_argument("--config", choices=("real", "small"), help="default: real on a GPU, small on the CPU")
    ap.add_argument("--experts", choices=EXPERTS, nargs="+", default=list(EXPERTS), help="expert bank dtypes")
    ap.add_argument("--batch", type=int, nargs="+", help="batch sizes (default: 1 4 on a GPU, 1 on the CPU)")
    ap.add_argument("--providers", choices=PROVIDERS, nargs="+", help="default: all that run on the device")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per provider, after one short warm-up run")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one run: the plumbing, on a CPU")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.smoke and args.out.resolve() == RESULTS.resolve():
        ap.error("--smoke rows mean nothing: pass --out somewhere other than the real results file")
    if args.out.is_dir():
        ap.error(f"--out {args.out} is a folder; it names the results CSV")
    try:
        args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        ap.error(f"--device {args.device!r} is not a device name (cpu, cuda, cuda:N)")
    if args.device.type not in ("cpu", "cuda") or (args.device.type == "cuda" and not torch.cuda.is_available()):
        ap.error(f"--device {args.device}: this machine runs cpu{' or cuda' * torch.cuda.is_available()}")
    cpu = args.device.type == "cpu"
    args.config = "tiny" if args.smoke else args.config or ("small" if cpu else "real")
    if args.config == "real" and cpu:
        ap.error("--config real on the CPU needs about 100 GB in fp32; use --config small")
    args.batch = args.batch or ([1] if cpu else [1, 4])
    if min(args.batch) < 1 or args.runs < 1:
        ap.error("--batch and --runs take positive integers")
    interpret = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")
    runs_triton = not cpu or (args.smoke and interpret)  # the interpreter is for plumbing, not for timings
    if args.providers and "dgemma-triton" in args.providers and not runs_triton:
        ap.error("dgemma-triton needs a GPU (or --smoke with TRITON_INTERPRET=1 set before Python starts)")
    args.providers = args.providers or [p for p in PROVIDERS if p != "dgemma-triton" or runs_triton]
    if args.smoke:
        args.runs = 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device, shape = args.device, shape_of(args.config)
    config, C = shape.config, shape.config.canvas_length
    torch.manual_seed(0)
    meta = provenance(device)
    bandwidth = copy_gbps(device)
    console = Console(width=160)
    threads = f", {torch.get_num_threads()} CPU threads" if device.type == "cpu" else ""
    console.print(
        f"{meta['gpu']}{threads}: copy {bandwidth:.0f} GB/s; {args.config} config (D {config.hidden_size}, "
        f"{config.num_hidden_layers} layers, V {config.vocab_size}), prompt {shape.prompt}, {shape.canvases} canvases "
        f"of {C}, {shape.steps} fixed steps, {shape.dtype}"
    )
    version = transformers_version() if "transformers" in args.providers else None
    failed = "transformers" in args.providers and version is None
    model = random_model(config, shape.dtype, device)
    cfg = SamplingConfig(
        max_new_tokens=shape.new_tokens, max_denoising_steps=shape.steps, confidence_threshold=0.0, stop_ids=()
    )
    expected = [shape.steps] * shape.canvases
    for experts in args.experts:
        if experts == "fp8":
            quantize_experts(model)
        twins = {"dgemma-torch": model}
        if "dgemma-triton" in args.providers:
            twins["dgemma-triton"] = triton_twin(model)
        if version is not None and experts == "full":
            twins["transformers"] = transformers_twin(model)
        names = [p for p in args.providers if p in twins]
        dtype = str(shape.dtype).removeprefix("torch.") + (", fp8 experts" if experts == "fp8" else "")
        for batch in args.batch:
            failed |= bench_group(args, shape, twins, names, batch, cfg, expected, dtype, bandwidth, meta, console)
        del twins
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return int(failed)


def runner(name: str, twin, prompt, cfg: SamplingConfig, seed: int):
    if name == "transformers":
        return lambda prefill: run_transformers(twin, prompt, cfg, seed, prefill)
    return lambda prefill: run_dgemma(twin, prompt, cfg, seed, prefill)


def bench_group(args, shape: Shape, twins, names, batch, cfg, expected, dtype, bandwidth, meta, console) -> bool:
    """One batch size: a warm-up run per provider, then alternating timed runs; appends their rows. -> whether a
    provider failed (its traceback printed; the others still run)."""
    device, C = args.device, shape.config.canvas_length
    prompt = torch.randint(0, shape.config.vocab_size, (batch, shape.prompt), device=device)
    warm = dataclasses.replace(cfg, max_denoising_steps=1)  # every kernel and shape once: prefill, pass, commit, pass
    length = shape.prompt + shape.canvases * C
    timings, failed = {}, False
    for run in range(-1, args.runs):  # run -1: the warm-up (none in the interpreter, which compiles nothing)
        for name in [n for n in names if run < 0 or n in timings]:
            try:
                if run < 0:
                    if not args.smoke:
                        runner(name, twins[name], prompt, warm, 0)(Prefill(device))
                    timings[name] = Timing()
                    continue
                sequences = measure(runner(name, twins[name], prompt, cfg, 1 + run), device, timings[name], expected)
                if sequences.shape != (batch, length):
                    raise DgemmaError(f"generated {tuple(sequences.shape)}, not the {(batch, length)} asked for")
            except Exception:  # noqa: BLE001 - one provider's failure must not cost the others' numbers
                traceback.print_exc()
                console.print(f"[red]FAILED {name} ({'warm-up' if run < 0 else f'run {run + 1}'}), {dtype}, B{batch}")
                timings.pop(name, None)
                failed = True
    parity = reference_parity(twins, prompt, cfg) if args.smoke and "transformers" in timings else None
    if parity is False:
        console.print("[red]FAILED parity: transformers' tokens differ from dgemma-torch's in reference mode")
    rows, table = report(args, shape, timings, batch, dtype, bandwidth, meta, parity, twins["dgemma-torch"], console)
    if rows:
        append_rows(rows, args.out, table, console)
    return failed or parity is False


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """(p50, p20, p80) of a few runs, each an actual run (the nearest rank)."""
    ordered = sorted(values)
    return tuple(ordered[round(q * (len(ordered) - 1))] for q in (0.5, 0.2, 0.8))


def report(args, shape: Shape, timings, batch, dtype, bandwidth, meta, parity, model, console):
    """-> the rows and the printed table of one batch size's timings."""
    moved, passes = floor_bytes(model, shape, batch)
    C, tokens = shape.config.canvas_length, batch * shape.canvases * shape.config.canvas_length
    floor_tps = tokens / (moved / bandwidth / 1e9)
    shape_text = f"{args.config} B{batch} P{shape.prompt} C{C}x{shape.canvases} N{shape.steps}"
    table = Table("provider", "experts", "B", "tok/s", "tok/s with prefill", "prefill ms", "ms/pass", "GB/s",
                  "% floor", "peak GB")  # fmt: skip
    rows, rates = [], {}
    for name, t in timings.items():
        decode = quantiles([total - pre for total, pre in zip(t.total, t.prefill, strict=True)])  # seconds
        whole = quantiles(t.total)
        prefill_ms = 1e3 * quantiles(t.prefill)[0]
        ms_pass = 1e3 * decode[0] / passes
        gbps = moved / passes / ms_pass / 1e6
        rates[name] = tokens / decode[0]
        peak, memory = t.peak / 1e9, "GPU memory" if args.device.type == "cuda" else "RSS"
        note = (
            f"{passes} passes ({shape.steps} per canvas + commits) after a {prefill_ms:.1f} ms prefill; "
            f"{moved / passes / 1e9:.3f} GB per pass at the floor; peak {memory} {peak:.2f} GB; {len(t.total)} runs"
        )
        if args.device.type == "cpu":
            note += f"; {torch.get_num_threads()} threads"
        if name == "transformers":
            note += f"; transformers {importlib.metadata.version('transformers')}"
        if parity is not None:
            note += f"; reference-mode tokens equal dgemma-torch's: {'yes' if parity else 'no'}"
        common = dict(provider=name, shape=shape_text, dtype=dtype, note=note)
        ms = lambda seconds: tuple(1e3 * x for x in seconds)  # noqa: E731
        rows += [
            result_row(meta, op="generate", times=ms(decode), unit="tok/s", value=rates[name], ceiling=floor_tps,
                       **common),
            result_row(meta, op="generate.with_prefill", times=ms(whole), unit="tok/s", value=tokens / whole[0],
                       ceiling=floor_tps, **common),
            result_row(meta, op="generate.pass", times=tuple(x / passes for x in ms(decode)), unit="GB/s", value=gbps,
                       ceiling=bandwidth, **common),
        ]  # fmt: skip
        table.add_row(
            name, dtype, str(batch), f"{rates[name]:.1f}", f"{tokens / whole[0]:.1f}", f"{prefill_ms:.1f}",
            f"{ms_pass:.2f}", f"{gbps:.0f}", f"{100 * gbps / bandwidth:.1f}", f"{peak:.2f}",
        )  # fmt: skip
    if "transformers" in rates:
        for name in sorted(rates.keys() - {"transformers"}):
            console.print(f"{name} / transformers, prefill excluded: {rates[name] / rates['transformers']:.2f}x")
    return rows, table


def reference_parity(twins, prompt, cfg: SamplingConfig) -> bool:
    """Whether dgemma-torch, drawing as transformers does (reference=True), generates transformers' tokens from the
    same seed: on the smoke test's fp32 CPU run this proves the weight sharing wires every tensor where it belongs."""
    torch.manual_seed(7)
    ours, _ = run_dgemma(twins["dgemma-torch"], prompt, cfg, 0, Prefill(prompt.device), reference=True)
    theirs, _ = run_transformers(twins["transformers"], prompt, cfg, 7, Prefill(prompt.device))
    return torch.equal(ours.cpu(), theirs.cpu())


if __name__ == "__main__":
    sys.exit(main())
