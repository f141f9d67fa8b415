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

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import CheckpointError, ExportError
from ..model.cache import WINDOW_MODES
from ..model.checkpoint import checkpoint_name, read_config, weight_files
from ..model.config import FULL, SLIDING, Config
from .graphs import OUTPUTS

NAME = "dgemma.json"
EMBEDDING, EMBEDDING_KEY = "embedding.safetensors", "embed_tokens.weight"
FORMAT = 2  # bumped when the schema changes incompatibly
KINDS = ("onnx", "engine")
GRAPHS = ("decoder", "encoder")
PACKAGES = ("tensorrt", "tensorrt_rtx")  # the TensorRT modules that build engines, in order of preference
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SHORT = {FULL: "full", SLIDING: "sliding"}  # layer type -> the suffix of its mask input and prefix dimension
# TensorRT allocates every input at its profile's largest shape, so a batch beyond this is a typo, not a plan.
MAX_BATCH = 1024
# onnx.TensorProto element types -> the sidecar's dtype names (other types never appear in an export's inputs)
ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 9: "bool"}
ROWS = 1 << 13  # embedding rows compared at a time: 92 MB in fp32 at the real width


def is_int(value) -> bool:
    """An int that is not a bool (JSON's true would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


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
        meta = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ExportError(f"{path} is not readable: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ExportError(f"{path} is not UTF-8 text: {e}") from e
    except (ValueError, RecursionError) as e:
        raise ExportError(f"{path} is not valid JSON: {e}") from e
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

    from .weights import check_locations

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


def versions(*modules: str) -> dict[str, str]:
    from importlib.metadata import version

    return {"dgemma": version("dgemma"), "torch": torch.__version__} | {m: version(m) for m in modules}


def output_folder(out, *, reading=(), within=()) -> Path:
    """`out` as a Path, refused with an ExportError naming it unless a new folder can be written there: not a path,
    empty, an existing file or non-empty folder, a folder the export reads (`reading`) or one inside an export it
    reads (`within`), below a file, or in a folder this user cannot write. Checked before any work starts."""
    if not isinstance(out, (str, os.PathLike)) or not isinstance(os.fspath(out), str):
        raise ExportError(f"the output folder must be a path, not {out!r}")
    if not os.fspath(out):
        raise ExportError("the output folder is an empty path: name a new folder (--out)")
    path = Path(out)
    resolved = path.resolve()
    for source in reading:
        if resolved == Path(source).resolve():
            raise ExportError(f"{out} is the folder the export reads: choose another --out")
    for source in within:
        if resolved == Path(source).resolve() or Path(source).resolve() in resolved.parents:
            raise ExportError(f"{out} is inside {source}, which the export reads: choose another --out")
    try:
        taken = path.exists() and (not path.is_dir() or any(path.iterdir()))
    except OSError as e:
        raise ExportError(f"cannot use {out} as the output folder: {e.strerror}") from e
    if taken:
        raise ExportError(f"{out} already exists and is not empty: remove it or choose another --out")
    ancestor = next(p for p in resolved.parents if p.exists())
    if not ancestor.is_dir():
        raise ExportError(f"cannot write {out}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {out}: {ancestor} is not writable")
    return path


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep(out: Path) -> None:
    """Removes the staging folders beside `out` of runs killed before their cleanup could run (SIGKILL, a power
    cut): those whose pid, in their name, no longer runs."""
    stale = re.compile(rf"\.{re.escape(out.name)}\.(\d+)\.\w+")  # staging's prefix, then mkdtemp's suffix
    for path in out.parent.iterdir():
        match = stale.fullmatch(path.name)
        if match and int(match[1]) > 0 and not running(int(match[1])) and not path.is_symlink() and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def sigterm_exits():
    """While the block runs, SIGTERM raises SystemExit(143) (the status a shell reports for it), as SIGINT raises
    KeyboardInterrupt: the cleanup of `staging` then runs before the process ends. Only the main thread can set
    handlers, and a handler someone else installed (or SIG_IGN) is theirs to keep."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def staging(out, **sources):
    """Yields a temporary folder beside `out` that becomes `out` only if the block succeeds, so a failed or
    interrupted (SIGINT, SIGTERM) export leaves no half-written folder, nor the parents it created. `out` is checked
    by output_folder (`sources` are its keywords); an existing empty folder is replaced. The temporary folder is
    named `.{out name}.{pid}.{random}`, so that a run killed outright leaves one that the next run on `out` removes."""
    out = output_folder(out, **sources)
    created = [p for p in reversed(out.absolute().parents) if not p.exists()]
    tmp = None
    with sigterm_exits():
        try:
            try:
                for parent in created:
                    parent.mkdir()
                sweep(out)
                tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", dir=out.parent))
                umask = os.umask(0)
                os.umask(umask)
                tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
            except OSError as e:
                raise ExportError(f"cannot write {out}: {e.strerror} ({e.filename})") from e
            yield tmp
            try:
                if out.exists():
                    out.rmdir()
                tmp.rename(out)
            except OSError as e:
                raise ExportError(f"cannot move the finished export to {out}: {e.strerror}") from e
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if not out.exists():
                for parent in reversed(created):
                    with contextlib.suppress(OSError):
                        parent.rmdir()
