"""The sidecar JSON (`dgemma.json`) beside every export and engine folder, the embedding table beside it, and the
checks made against both.

The sidecar records what a runtime must know without opening a graph: each graph's file, inputs and outputs (dtype
and shape, dynamic dimensions by name), the range of each dynamic dimension, the dtype, the decoder's output, the
window mode the runtime builds its masks for, the config the graphs were traced from, and the versions that wrote
it. An engine folder's sidecar adds an `engine` section: the TensorRT package and version that built it, the
optimization profile and the engine files.

The sidecar is data, not code: `read` validates every field a reader uses, accepts only the known TensorRT packages
(the runtime imports the one named), and only file names that stay inside the folder, so an edited or damaged
sidecar is one ExportError naming the file and the field. Nothing in it decides which weights run: the runtime's
embedding table (the sampler's soft embedding and, for hidden-state graphs, the LM head) is `embedding.safetensors`,
the very table the graphs were traced with, and `check_checkpoint` compares it with the checkpoint's.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import CheckpointError, ExportError
from .cache import KVCache
from .checkpoint import checkpoint_name, read_config, read_json, weight_files
from .config import FULL, SLIDING, WINDOW_MODES, Config, is_int

NAME = "dgemma.json"
EMBEDDING, EMBEDDING_KEY = "embedding.safetensors", "embed_tokens.weight"
FORMAT = 2  # bumped when the schema changes incompatibly
KINDS = ("onnx", "engine")
GRAPHS = ("decoder", "encoder")
OUTPUTS = ("logits", "hidden")  # what the decoder graph returns: soft-capped fp32 logits, or the final hidden states
PACKAGES = ("tensorrt", "tensorrt_rtx")  # the TensorRT modules that build engines, in order of preference
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SHORT = {FULL: "full", SLIDING: "sliding"}  # layer type -> the suffix of its mask input and prefix dimension
# TensorRT allocates every input at its profile's largest shape, so a batch beyond this is a typo, not a plan.
MAX_BATCH = 1024
# onnx.TensorProto element types -> the sidecar's dtype names (other types never appear in an export's inputs)
ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 9: "bool"}
ROWS = 1 << 13  # embedding rows compared at a time: 92 MB in fp32 at the real width


def count(value, name: str, lo: int, hi: int) -> int:
    """An integer argument in [lo, hi], or an ExportError naming it."""
    if not is_int(value) or not lo <= value <= hi:
        raise ExportError(f"{name} must be an integer from {lo} to {hi}, not {value!r}")
    return value


def folder_arg(value, name: str) -> Path:
    """A folder argument as a Path; anything that is not a path is an ExportError naming the argument."""
    if not isinstance(value, (str, os.PathLike)) or not isinstance(os.fspath(value), str) or not os.fspath(value):
        raise ExportError(f"{name} must be a folder path, not {value!r}")
    return Path(value)


def member(folder: Path, name, field: str, where: Path) -> Path:
    """`folder / name` for a file name read from `where`, refused unless it is a plain file directly in `folder`: no
    absolute path, no `..`, no separator, no symlink out of the folder."""
    plain = isinstance(name, str) and name not in ("", ".", "..") and os.path.basename(name) == name
    if not plain or "\\" in name or "\0" in name:
        raise ExportError(f"{where}: {field} must be the name of a file in {folder}, not {name!r}")
    path = folder / name
    if not path.resolve().is_relative_to(folder.resolve()):
        raise ExportError(f"{where}: {field} {name!r} is a link that leads out of {folder}")
    if not path.is_file():
        raise ExportError(f"{where}: {field} names {path}, which is not a file")
    return path


def read(folder) -> dict:
    """The validated sidecar of an export or engine folder; for an ONNX export, its graphs are checked too."""
    folder = folder_arg(folder, "the export folder")
    path = folder / NAME
    if not path.is_file():
        raise ExportError(f"{folder} holds no {NAME}: not a folder written by `dgemma export`")
    try:
        meta = read_json(path, ExportError)
    except OSError as e:
        raise ExportError(f"{path} is not readable: {e.strerror}") from e
    validate(meta, folder, path)
    if meta["kind"] == "onnx":
        for graph in GRAPHS:
            check_graph(folder, meta, graph, path)
    return meta


def validate(meta, folder: Path, path: Path) -> None:
    """Checks every field a reader of the sidecar at `path` uses, before any of them is used."""

    def check(value, name: str, want: str, ok):
        if not ok(value):
            raise ExportError(f"{path}: {name} must be {want}, not {json.dumps(value)[:80]}")
        return value

    def field(obj: dict, key: str, name: str, want: str, ok):
        if key not in obj:
            raise ExportError(f"{path} has no {name}")
        return check(obj[key], name, want, ok)

    def one_of(options):
        return f"one of {list(options)}", lambda v: isinstance(v, str) and v in options

    def mapping(value) -> bool:
        return isinstance(value, dict)

    def positive(value) -> bool:
        return is_int(value) and value > 0

    if not mapping(meta):
        raise ExportError(f"{path} holds a JSON {type(meta).__name__}, not an object: not a `dgemma export` sidecar")
    if meta.get("format") != FORMAT:
        raise ExportError(f"{path} has format {meta.get('format')!r}, this dgemma reads format {FORMAT}: re-export")
    kind = field(meta, "kind", "kind", *one_of(KINDS))
    field(meta, "dtype", "dtype", *one_of(DTYPES))
    field(meta, "decoder_output", "decoder_output", *one_of(OUTPUTS))
    field(meta, "window", "window", *one_of(WINDOW_MODES))
    field(meta, "opset", "opset", "an integer", is_int)
    field(meta, "custom_ops", "custom_ops", "true or false", lambda v: isinstance(v, bool))
    field(meta, "config", "config", "an object", mapping)
    config = config_of(meta, path)

    dims = field(meta, "dims", "dims", "an object", mapping)
    wanted = {"batch", "past_full"} | ({"past_sliding"} if SLIDING in config.layer_types else set())
    if set(dims) != wanted:
        raise ExportError(f"{path}: dims must name {sorted(wanted)} (from the config), not {sorted(dims)}")
    levels = ("min", "opt", "max") if kind == "engine" else ("min", "max")
    for name, d in dims.items():
        field(dims, name, f"dims.{name}", "an object", mapping)
        sizes = [field(d, level, f"dims.{name}.{level}", "a positive integer", positive) for level in levels]
        if sizes != sorted(sizes):
            raise ExportError(f"{path}: dims.{name} must have {' <= '.join(levels)}, not {sizes}")
    if dims["past_full"]["max"] > config.max_position_embeddings:
        raise ExportError(f"{path}: dims.past_full.max exceeds the config's max_position_embeddings")

    graphs = field(meta, "graphs", "graphs", "an object", mapping)
    if set(graphs) != set(GRAPHS):
        raise ExportError(f"{path}: graphs must describe {list(GRAPHS)}, not {sorted(graphs)}")
    for graph, entry in graphs.items():
        field(graphs, graph, f"graphs.{graph}", "an object", mapping)
        field(entry, "file", f"graphs.{graph}.file", "a file name", lambda v: isinstance(v, str))
        for side in ("inputs", "outputs"):
            values = field(entry, side, f"graphs.{graph}.{side}", "a list", lambda v: isinstance(v, list))
            for i, value in enumerate(values):
                name = f"graphs.{graph}.{side}[{i}]"
                check(value, name, "an object", mapping)
                field(value, "name", f"{name}.name", "a string", lambda v: isinstance(v, str))
                field(value, "dtype", f"{name}.dtype", *one_of(ONNX_DTYPES.values()))
                shape = field(value, "shape", f"{name}.shape", "a list", lambda v: isinstance(v, list))
                for d in shape:
                    if not (is_int(d) and d >= 0) and not (isinstance(d, str) and resolvable(d, dims)):
                        raise ExportError(f"{path}: {name}.shape holds {d!r}, not a size or a dimension of dims")
    outputs = [e["name"] for e in graphs["decoder"]["outputs"]]
    if outputs != [meta["decoder_output"]]:
        raise ExportError(
            f"{path}: the decoder's outputs {outputs} must be its decoder_output {meta['decoder_output']}"
        )

    if kind == "engine":
        engine = field(meta, "engine", "engine", "an object", mapping)
        # The runtime imports this module: only the TensorRT packages are accepted, before anything is imported.
        field(engine, "package", "engine.package", *one_of(PACKAGES))
        field(engine, "version", "engine.version", "a string", lambda v: isinstance(v, str))
        field(engine, "profiles", "engine.profiles", "an object", mapping)
        files = field(engine, "files", "engine.files", "an object", mapping)
        if set(files) != set(GRAPHS):
            raise ExportError(f"{path}: engine.files must name {list(GRAPHS)}, not {sorted(files)}")
        for graph in GRAPHS:
            member(folder, files[graph], f"engine.files.{graph}", path)
    else:
        for graph in GRAPHS:
            member(folder, graphs[graph]["file"], f"graphs.{graph}.file", path)


def prefix_feeds(config: Config, inputs: set[str], cache: KVCache, chunk_valid: torch.Tensor, causal: bool) -> dict:
    """A graph's inputs besides its tokens for a chunk at the cache's committed length: positions (T,), a boolean mask
    (B, 1, T, P + T) per layer type over the committed keys and the chunk, and each layer's past K/V (B, Hkv, P, d)
    in position order, gathered from the cache's rings. `inputs` are the graph's input names; chunk_valid (B, T)."""
    n, (B, T), W = cache.length, chunk_valid.shape, config.sliding_window
    device = chunk_valid.device
    q = torch.arange(n, n + T, device=device)[:, None]
    feeds, slots = {"positions": q[:, 0]}, {}
    for kind in sorted(set(config.layer_types)):
        P = n if kind == FULL else min(n, W - 1)
        positions = torch.arange(n - P, n, device=device)
        slots[kind] = positions % cache.slots_of[kind]
        valid = cache.valid[kind][:, slots[kind]]
        if P == 0:  # nothing committed yet: one masked slot, so no graph input is ever empty
            positions, valid = positions.new_full((1,), -1), valid.new_zeros(B, 1)
        keys, key_valid = torch.cat([positions, q[:, 0]]), torch.cat([valid, chunk_valid], dim=1)
        a, lo, b, hi = cache.band(kind, causal)
        seen = (keys >= a * q + lo) & (keys <= b * q + hi) & key_valid[:, None, :]  # (B, T, P + T)
        # A padding query sees itself, so no row is all masked: engines differ there (ONNX Runtime returns zeros,
        # model.py a uniform average, a -inf softmax NaN). Its output is never read: its keys stay masked.
        if f"mask_{SHORT[kind]}" in inputs:  # an encoder whose attending layers are all one type has one mask
            feeds[f"mask_{SHORT[kind]}"] = (seen | (keys == q))[:, None]
    for i, kind in enumerate(config.layer_types):
        if f"past_key_{i}" not in inputs:  # the encoder's last layer takes no prefix
            continue
        for name, ring in (("key", cache.k[i]), ("value", cache.v[i])):
            empty = ring.new_zeros(*ring.shape[:2], 1, ring.shape[3])  # the masked slot
            feeds[f"past_{name}_{i}"] = ring[:, :, slots[kind]] if len(slots[kind]) else empty
    return feeds


def resolvable(dim: str, dims: dict) -> bool:
    try:
        resolve(dim, dict.fromkeys(dims, 1))
    except (KeyError, ValueError):
        return False
    return True


def resolve(dim, sizes: dict[str, int]) -> int:
    """A shape entry of the sidecar -> a size: an int, a dimension name, or `name + k` (the masks' key axis)."""
    if isinstance(dim, int):
        return dim
    name, _, extra = dim.partition("+")
    return sizes[name.strip()] + (int(extra) if extra else 0)


def describe(path: Path, graph) -> dict:
    """A graph's entry in the sidecar: its file, and its inputs and outputs (name, dtype, shape: ints, dimension
    names, `name + k`)."""

    def entry(v):
        t = v.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in t.shape.dim]
        return {"name": v.name, "dtype": ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), "shape": shape}

    return {"file": path.name, "inputs": [entry(v) for v in graph.input], "outputs": [entry(v) for v in graph.output]}


def check_graph(folder: Path, meta: dict, graph: str, where: Path) -> None:
    """Before ONNX Runtime or a TensorRT parser opens a graph: its external data stays inside the folder (weights.py),
    and it has the inputs and outputs the sidecar at `where` describes."""
    import onnx
    from google.protobuf.message import DecodeError

    path = folder / meta["graphs"][graph]["file"]
    try:
        model = onnx.load(path, load_external_data=False)
    except (OSError, DecodeError) as e:
        raise ExportError(f"{path} is not a readable ONNX graph: {e}") from e
    check_locations(model, folder, path)
    if describe(path, model.graph) != meta["graphs"][graph]:
        raise ExportError(f"{where}: graphs.{graph} does not describe {path.name}'s inputs and outputs: re-export")


def write(folder: Path, sidecar: dict) -> None:
    (folder / NAME).write_text(json.dumps(sidecar, indent=2) + "\n")


def config_of(sidecar: dict, where: str | Path = NAME) -> Config:
    try:
        return Config(**sidecar["config"])
    except (TypeError, ValueError, KeyError, AttributeError, ArithmeticError) as e:
        raise ExportError(f"{where}: config is not a valid model config: {e}") from e


def write_embedding(folder: Path, weight: torch.Tensor) -> None:
    """The embedding table the graphs hold, in their dtype, for the runtime (see the module docstring)."""
    from safetensors.torch import save_file

    save_file({EMBEDDING_KEY: weight.detach().contiguous()}, folder / EMBEDDING)


def read_embedding(folder, meta: dict) -> torch.Tensor:
    """The export's embedding table, refused unless it has the sidecar's dtype and the config's shape."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    path = member(folder, EMBEDDING, "the embedding table", folder)
    try:
        with safe_open(path, framework="pt") as f:
            table = f.get_tensor(EMBEDDING_KEY) if EMBEDDING_KEY in f.keys() else None
    except (SafetensorError, OSError) as e:
        raise ExportError(f"{path} is not a readable safetensors file: {e}") from e
    config, dtype = config_of(meta), DTYPES[meta["dtype"]]
    shape = (config.vocab_size, config.hidden_size)
    if table is None or table.dtype != dtype or tuple(table.shape) != shape:
        found = "nothing" if table is None else f"{table.dtype} {list(table.shape)}"
        raise ExportError(f"{path} must hold {EMBEDDING_KEY} as {dtype} {list(shape)}, not {found}: re-export")
    return table


def check_checkpoint(meta: dict, embedding: torch.Tensor, checkpoint) -> None:
    """Refuses a checkpoint other than the export's: another config, or an embedding table that differs from the
    export's (`embedding`, read_embedding's) once rounded to the export's dtype as the export rounded it. Every
    training or seed changes the embedding, so this refuses another model's tokenizer and generation defaults too.
    The checkpoint's table is read memory-mapped, ROWS rows at a time."""
    from safetensors import SafetensorError, safe_open

    checkpoint = folder_arg(checkpoint, "the checkpoint")
    config = read_config(checkpoint)
    if config != config_of(meta):
        diff = sorted(k for k, v in asdict(config).items() if meta["config"].get(k) != v)
        raise ExportError(f"the export was built from another config than {checkpoint}'s (differs in {diff})")
    name = checkpoint_name(EMBEDDING_KEY)
    files = weight_files(checkpoint)
    if name not in files:
        raise CheckpointError(f"{checkpoint} holds no {name}")
    try:
        with safe_open(files[name], framework="pt") as f:
            stored = f.get_slice(name)
            if tuple(stored.get_shape()) != tuple(embedding.shape):
                raise CheckpointError(f"{name} in {files[name]} is {stored.get_shape()}, not {list(embedding.shape)}")
            same = all(
                torch.equal(stored[i : i + ROWS].float().to(embedding.dtype), embedding[i : i + ROWS])  # as the export
                for i in range(0, embedding.shape[0], ROWS)
            )
    except SafetensorError as e:
        raise CheckpointError(f"{files[name]} is not a readable safetensors file holding {name}: {e}") from e
    if not same:
        raise ExportError(
            f"the export was built from other weights than {checkpoint}'s (its embedding table differs): re-export, "
            "or pass the checkpoint it was exported from"
        )


def location(tensor) -> tuple[str, int, int]:
    """(file, offset, length) of an external tensor."""
    info = {kv.key: kv.value for kv in tensor.external_data}
    return info["location"], int(info.get("offset", 0)), int(info["length"])


def tensors(message):
    """Every TensorProto in a protobuf message: initializers, attribute and sparse tensors, in subgraphs and functions
    too (any of them can name external data)."""
    import onnx
    from google.protobuf.message import Message

    if isinstance(message, onnx.TensorProto):
        yield message
        return
    for field, value in message.ListFields():
        if field.message_type is not None:  # a message, or a repeated one
            for item in [value] if isinstance(value, Message) else value:
                yield from tensors(item)


def check_locations(model, folder: Path, path: Path) -> None:
    """Refuses a graph (read from `path` without its data) whose external data is not a byte range of a file directly
    in `folder`: ONNX Runtime 1.32 refuses an absolute, `..` or symlinked location itself, a TensorRT parser need not,
    and either would read any file on the machine an edited graph names."""
    from onnx.external_data_helper import uses_external_data

    for tensor in tensors(model):
        if not uses_external_data(tensor):
            continue
        try:
            file, offset, length = location(tensor)
        except (KeyError, ValueError) as e:
            raise ExportError(
                f"{path}: tensor {tensor.name!r} has no valid external data location, offset and length"
            ) from e
        data = member(folder, file, f"the external data of tensor {tensor.name!r}", path)
        if offset < 0 or length < 0 or offset + length > data.stat().st_size:
            raise ExportError(f"{path}: tensor {tensor.name!r} reads past the end of {file}")
