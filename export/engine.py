"""`dgemma export trt`: TensorRT engines for the two graphs of an ONNX export, with one optimization profile over
the batch and the committed lengths.

Full TensorRT (`tensorrt`) is used when it is importable: it needs a GPU to build, and the engine runs on that GPU's
architecture (Hopper included). Otherwise TensorRT-RTX (`tensorrt_rtx`), whose builder runs on a CPU (ahead-of-time
compile; kernels are JIT-compiled on the device at first run), but whose engines run only on consumer and
workstation RTX GPUs: not on H100/H200. Engines are tied to the package and version that built
them, which the sidecar records and runtime/engine.py checks. The export's embedding table is copied beside them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import ExportError
from ..model import sidecar
from ..model.sidecar import EMBEDDING, GRAPHS, PACKAGES, count, resolve
from . import staging


def tensorrt():
    """The TensorRT module to build and run with: full TensorRT if importable, else TensorRT-RTX."""
    import importlib

    for name in PACKAGES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ExportError(
        "building engines needs TensorRT: `pip install tensorrt` (builds on a GPU) or `pip install tensorrt-rtx` "
        "(builds on a CPU, runs on RTX GPUs only), or `pip install 'dgemma[export]'`"
    )


def profile_shapes(graph: dict, dims: dict) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) shape of every input with a dynamic dimension, from the sidecar's description and ranges."""
    levels = [{name: d[level] for name, d in dims.items()} for level in ("min", "opt", "max")]
    shapes = {}
    for entry in graph["inputs"]:
        if any(isinstance(d, str) for d in entry["shape"]):
            shapes[entry["name"]] = tuple(tuple(resolve(d, sizes) for d in entry["shape"]) for sizes in levels)
    return shapes


def build(trt, onnx_path: Path, shapes: dict) -> bytes:
    """Parses one graph (its external data beside it) and builds a serialized engine with one profile."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = trt.NetworkDefinitionCreationFlag
    # Strongly typed: the ONNX dtypes are the engine's (TensorRT 11 and RTX are strongly typed only).
    network = builder.create_network(1 << int(flags.STRONGLY_TYPED) if hasattr(flags, "STRONGLY_TYPED") else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"{trt.__name__} could not parse {onnx_path}: {errors}")
    # Fused attention kernels cover some head sizes and dtypes only (none for the tiny "odd" config's 8 and 24, or
    # for fp32; the real model's 512 is unverified). Decomposable lets the builder fall back to MatMul-Softmax-MatMul
    # where it has no kernel, instead of failing the build.
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.ATTENTION_OUTPUT:
            layer.__class__ = trt.IAttentionOutputLayer  # how the Python bindings reach a layer's own API
            layer.attention.decomposable = True
    config = builder.create_builder_config()
    if trt.__name__ == "tensorrt_rtx":  # RTX lets a user capture the engine in a CUDA graph only with this flag
        config.set_flag(trt.BuilderFlag.REQUIRE_USER_ALLOCATION)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"{trt.__name__} could not build {onnx_path} (its log above says why)")
    return bytes(plan)


def build_engines(onnx_dir, out_dir, *, opt_prompt: int | None = None, opt_batch: int = 1) -> Path:
    """Writes decoder.engine, encoder.engine and dgemma.json (the export's, plus an `engine` section) to `out_dir`.

    opt_prompt: the committed length the profile is tuned for (default: half the export's max_prompt).
    """
    onnx_dir = sidecar.folder_arg(onnx_dir, "the ONNX export (--onnx)")
    meta = sidecar.read(onnx_dir)
    if meta["kind"] != "onnx":
        raise ExportError(f"{onnx_dir} holds engines, not ONNX graphs: pass the folder `dgemma export onnx` wrote")
    dims = {name: dict(d) for name, d in meta["dims"].items()}
    batch, past = dims["batch"], dims["past_full"]
    batch["opt"] = count(opt_batch, "opt_batch (--opt-batch)", batch["min"], batch["max"])
    opt_prompt = max(past["max"] // 2, 1) if opt_prompt is None else opt_prompt
    past["opt"] = count(opt_prompt, "opt_prompt (--opt-prompt)", past["min"], past["max"])
    if "past_sliding" in dims:  # sliding layers see W - 1 committed keys from then on
        dims["past_sliding"]["opt"] = dims["past_sliding"]["max"]
    staging.output_folder(out_dir, within=(onnx_dir,))
    sidecar.read_embedding(onnx_dir, meta)  # a damaged table is refused here, not by the runtime
    trt = tensorrt()
    engines, profiles = {}, {}
    with staging.staging(out_dir, within=(onnx_dir,)) as tmp:
        for graph in GRAPHS:
            profiles[graph] = profile_shapes(meta["graphs"][graph], dims)
            engines[graph] = f"{graph}.engine"
            (tmp / engines[graph]).write_bytes(build(trt, onnx_dir / meta["graphs"][graph]["file"], profiles[graph]))
        shutil.copyfile(onnx_dir / EMBEDDING, tmp / EMBEDDING)
        meta["kind"], meta["dims"] = "engine", dims
        meta["engine"] = {"package": trt.__name__, "version": trt.__version__, "files": engines, "profiles": profiles}
        sidecar.write(tmp, meta)
    return Path(out_dir)
