"""`dgemma export goldens`: ONNX Runtime golden outputs of one real decoder step, saved with polygraphy for a GPU
user to compare a TensorRT engine against (ONNX Runtime runs fp32 on the CPU; the engine may be bf16, fp16 or fp32).

The step is real: a random prompt is committed to a cache by the fp32 model (which the fp32 export's encoder matches
to 1e-5, tests/test_export.py), the decoder's feeds are gathered from that cache as the runtime gathers them, and
the canvas is fed with the soft embedding of random logits, so the masks, prefix K/V and self-conditioning are what
generation feeds. Its
floating inputs are rounded to the engine's dtype first, so both sides see the same values; they are saved in that
dtype as `inputs.json`, ONNX Runtime's fp32 outputs as `golden.json` (polygraphy RunResults). The tolerance written
into `compare.sh` is twice the error of the same step run eagerly in torch in the engine's dtype (house style 12).
"""

from __future__ import annotations

import shlex
from pathlib import Path

import torch

from ..errors import ExportError
from ..model import sidecar
from ..model.sidecar import DTYPES, count
from . import staging
from .graphs import DecoderGraph
from .onnx import load as load_model


def step_inputs(checkpoint, meta: dict, prompt: int, seed: int) -> dict[str, torch.Tensor]:
    """The decoder feeds of the first step after a `prompt`-token prefill."""
    model = load_model(checkpoint, "fp32")
    C, V = model.config.canvas_length, model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    cache = model.new_cache(1, prompt + C)
    with torch.no_grad():
        model.encode(torch.randint(0, V, (1, prompt), generator=g), cache)
        canvas = torch.randint(0, V, (1, C), generator=g)
        soft = model.soft_embedding(torch.randn(1, C, V, generator=g) * 4)
    inputs = {e["name"] for e in meta["graphs"]["decoder"]["inputs"]}
    valid = torch.ones_like(canvas, dtype=torch.bool)
    return sidecar.prefix_feeds(model.config, inputs, cache, valid, causal=False) | {"canvas_ids": canvas, "soft": soft}


def save_goldens(checkpoint, onnx_dir, out_dir, *, dtype: str = "bf16", prompt: int = 13, seed: int = 0) -> Path:
    """Writes inputs.json, golden.json and compare.sh (run as `sh compare.sh ENGINE_DIR`) to `out_dir`."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator
    from polygraphy.json import save_json

    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ExportError(f"dtype (the engine's, --dtype) must be one of {list(DTYPES)}, not {dtype!r}")
    count(seed, "seed", 0, 2**63 - 1)
    onnx_dir = sidecar.folder_arg(onnx_dir, "the ONNX export (--onnx)")
    checkpoint = sidecar.folder_arg(checkpoint, "the checkpoint folder (--model)")
    meta = sidecar.read(onnx_dir)
    if meta["kind"] != "onnx" or meta["dtype"] != "fp32" or meta["decoder_output"] != "logits":
        raise ExportError(
            f"{onnx_dir} is a {meta['dtype']} {meta['kind']} export of {meta['decoder_output']}: goldens come from an "
            "fp32 ONNX export with logits output (ONNX Runtime on the CPU)"
        )
    config = sidecar.config_of(meta)  # the prompt and the canvas after it fit the export's range and the positions
    longest = min(meta["dims"]["past_full"]["max"], config.max_position_embeddings - config.canvas_length)
    count(prompt, "prompt (the committed length)", 1, longest)
    staging.output_folder(out_dir, reading=(checkpoint,), within=(onnx_dir,))
    sidecar.check_checkpoint(meta, sidecar.read_embedding(onnx_dir, meta), checkpoint)
    feeds = step_inputs(checkpoint, meta, prompt, seed)
    names = [e["name"] for e in meta["graphs"]["decoder"]["inputs"]]  # in the graph's order
    engine_feeds = {k: feeds[k].to(DTYPES[dtype]) if feeds[k].is_floating_point() else feeds[k] for k in names}
    rounded = {k: t.float() if t.is_floating_point() else t for k, t in engine_feeds.items()}
    session = SessionFromOnnx(str(Path(onnx_dir) / meta["graphs"]["decoder"]["file"]))
    results = Comparator.run([OnnxrtRunner(session)], data_loader=[{k: t.numpy() for k, t in rounded.items()}])
    golden = torch.from_numpy(results[0][1][0]["logits"])
    with torch.no_grad():  # torch's own error at the engine's dtype sets the tolerance
        graph = DecoderGraph(load_model(checkpoint, dtype))
        masks = {kind: engine_feeds[f"mask_{short}"] for kind, short in sidecar.SHORT.items() if kind in graph.kinds}
        n = graph.model.config.num_hidden_layers
        past = [engine_feeds[f"past_{kv}_{i}"] for i in range(n) for kv in ("key", "value")]
        eager = graph(engine_feeds["canvas_ids"], engine_feeds["soft"], engine_feeds["positions"], masks, past)
    atol = 2 * (eager.float() - golden).abs().max().item()
    with staging.staging(out_dir, reading=(checkpoint,), within=(onnx_dir,)) as tmp:
        save_json([engine_feeds], tmp / "inputs.json", description="decoder inputs")
        results.save(str(tmp / "golden.json"))
        (tmp / "compare.sh").write_text(command(atol))
    return Path(out_dir)


def command(atol: float) -> str:
    """A script comparing the decoder engine in folder $1 (built by `dgemma export trt`) with the goldens beside it."""
    here = '"$(dirname "$0")"'
    args = ["--model-type", "engine", "--trt", "--atol", f"{atol:.3g}", "--rtol", "0", "--check-error-stat", "max"]
    return (
        "#!/bin/sh\n# Polygraphy: the TensorRT decoder engine against ONNX Runtime's fp32 goldens. For a TensorRT-RTX\n"
        "# engine, run it with POLYGRAPHY_USE_TENSORRT_RTX=1.\nset -e\n"
        f'polygraphy run "$1/decoder.engine" {shlex.join(args)} --load-inputs {here}/inputs.json '
        f"--load-outputs {here}/golden.json\n"
    )
