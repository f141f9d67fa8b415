"""The sidecar JSON (`dgemma.json`) beside every export and engine folder, and the checks made against it.

It records what a runtime must know without opening a graph: each graph's file, inputs and outputs (dtype and
shape, dynamic dimensions by name), the range of each dynamic dimension, the dtype, the decoder's output, the
window mode the runtime builds its masks for, the config the graphs were traced from, a fingerprint of the
checkpoint's weights, and the versions that wrote it. An engine folder's sidecar adds an `engine` section: the
TensorRT package and version that built it, the optimization profile and the engine files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import ExportError
from ..model.checkpoint import IGNORED_PREFIXES, read_config, weight_files
from ..model.config import FULL, SLIDING, Config

NAME = "dgemma.json"
FORMAT = 1  # bumped when the schema changes incompatibly
GRAPHS = ("decoder", "encoder")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SHORT = {FULL: "full", SLIDING: "sliding"}  # layer type -> the suffix of its mask input and prefix dimension


def fingerprint(folder: str | Path) -> str:
    """sha256 of the checkpoint's text config and every tensor of at most one dimension (norm weights, router and
    layer scalars: about 1.4 MB of the real model's 50 GB, read memory-mapped), so two trainings or seeds differ."""
    from safetensors import safe_open

    folder = Path(folder)
    digest = hashlib.sha256(json.dumps(asdict(read_config(folder)), sort_keys=True).encode())
    files = weight_files(folder)
    handles = {path: safe_open(path, framework="pt") for path in set(files.values())}
    for name in sorted(n for n in files if not n.startswith(IGNORED_PREFIXES)):
        f = handles[files[name]]
        if len(f.get_slice(name).get_shape()) <= 1:
            t = f.get_tensor(name)
            digest.update(f"{name}:{t.dtype}:{list(t.shape)}".encode() + t.float().numpy().tobytes())
    return digest.hexdigest()


def read(folder: str | Path) -> dict:
    path = Path(folder) / NAME
    if not path.exists():
        raise ExportError(f"{folder} holds no {NAME}: not a folder written by `dgemma export`")
    sidecar = json.loads(path.read_text())
    if sidecar.get("format") != FORMAT:
        raise ExportError(f"{path} has format {sidecar.get('format')}, this dgemma reads format {FORMAT}: re-export")
    return sidecar


def write(folder: Path, sidecar: dict) -> None:
    (folder / NAME).write_text(json.dumps(sidecar, indent=2) + "\n")


def config_of(sidecar: dict) -> Config:
    return Config(**sidecar["config"])


def check_checkpoint(sidecar: dict, checkpoint: str | Path) -> None:
    """Refuses graphs traced from another config or other weights than `checkpoint`'s."""
    config = read_config(checkpoint)
    if config != config_of(sidecar):
        diff = sorted(k for k, v in asdict(config).items() if sidecar["config"].get(k) != v)
        raise ExportError(f"the export was built from another config than {checkpoint}'s (differs in {diff})")
    if fingerprint(checkpoint) != sidecar["checkpoint"]["fingerprint"]:
        raise ExportError(
            f"the export was built from other weights ({sidecar['checkpoint']['path']}) than {checkpoint}'s: re-export"
        )


def resolve(dim, sizes: dict[str, int]) -> int:
    """A shape entry of the sidecar -> a size: an int, a dimension name, or `name + k` (the masks' key axis)."""
    if isinstance(dim, int):
        return dim
    name, _, extra = dim.partition("+")
    return sizes[name.strip()] + (int(extra) if extra else 0)


def versions(*modules: str) -> dict[str, str]:
    from importlib.metadata import version

    return {"dgemma": version("dgemma"), "torch": torch.__version__} | {m: version(m) for m in modules}


@contextlib.contextmanager
def staging(out: str | Path):
    """Yields a temporary folder beside `out` that becomes `out` only if the block succeeds, so a failed export
    leaves no half-written folder. An existing non-empty `out` is refused rather than overwritten."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not empty: remove it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
