"""Loads an official DiffusionGemma checkpoint folder unchanged, memory-mapped, onto a model built on the meta device.

The folder holds config.json, generation_config.json (optional), tokenizer.json, and the weights as one
model.safetensors or shards listed in model.safetensors.index.json. The text weights are stored once, under
`model.decoder.*`; the encoder shares them and only adds its own layer scalars. The name map:

    ours                              checkpoint
    <name>                            model.decoder.<name>    (embed_tokens is also the tied LM head)
    layers.{i}.decoder_scalar         model.decoder.layers.{i}.layer_scalar
    layers.{i}.encoder_scalar         model.encoder.language_model.layers.{i}.layer_scalar
    (not loaded)                      model.encoder.vision_tower.*, model.encoder.embed_vision.*

Any missing, unexpected or mis-shaped tensor, an unreadable or truncated file holding text weights, or a config that
does not match the tensors raises CheckpointError before any weight is copied.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError, DgemmaError
from .config import DTYPES, Config
from .device import resolve_device

IGNORED_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
LOAD_DTYPES = dict(zip(DTYPES, (torch.bfloat16, torch.float32), strict=True))  # the dtypes a model loads in
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")  # safetensors dtypes a weight may be stored in
JSON_LIMIT = 64 << 20  # bytes: a config is kB, the real tokenizer.json 30 MB


def checkpoint_name(name: str) -> str:
    if m := re.fullmatch(r"layers\.(\d+)\.encoder_scalar", name):
        return f"model.encoder.language_model.layers.{m[1]}.layer_scalar"
    if m := re.fullmatch(r"layers\.(\d+)\.decoder_scalar", name):
        return f"model.decoder.layers.{m[1]}.layer_scalar"
    return f"model.decoder.{name}"


def read_json(path: Path, error: type[DgemmaError] = CheckpointError, limit: int = JSON_LIMIT):
    """The value of a JSON file; a file that is too large, not UTF-8, not JSON or nested too deeply raises `error`
    naming it. Operating-system errors (a missing file, no permission) pass through: they name the path."""
    if (size := path.stat().st_size) > limit:
        raise error(f"{path} is {size} bytes; a JSON file here is at most {limit}")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{path} is not UTF-8 text: {e}") from e
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise error(f"{path} is not valid JSON: {e}") from e


def weight_files(folder: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file that holds it (a file inside `folder`)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        raw = read_json(index)
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
        if escaping := sorted({v for v in weight_map.values() if Path(v).name != v or v in ("", ".", "..")}):
            raise CheckpointError(f"{index} names shards outside {folder}: {escaping[:4]}")
        files = {name: folder / shard for name, shard in weight_map.items()}
        if absent := sorted({str(p) for p in files.values() if not p.is_file()}):
            raise CheckpointError(f"{index} lists shards that do not exist: {absent}")
        return files
    single = folder / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")
    with _open(single) as f:
        return dict.fromkeys(f.keys(), single)


def _open(path: Path):
    try:
        return safe_open(path, framework="pt", device="cpu")  # memory-mapped
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e


def _shape(handle, name: str, path: Path) -> tuple[int, ...]:
    try:
        found = handle.get_slice(name)
        shape, dtype = tuple(found.get_shape()), found.get_dtype()
    except SafetensorError as e:
        raise CheckpointError(f"{path} does not hold {name}, which the index assigns to it") from e
    if dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{name} in {path} is stored as {dtype}, not a floating-point type ({FLOAT_DTYPES})")
    return shape


def read_config(folder: str | Path) -> Config:
    """config.json, checked: every field that cannot describe this model is a CheckpointError naming it."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    raw = read_json(path)
    try:
        return Config.from_dict(raw)
    except DgemmaError as e:
        raise CheckpointError(f"{path}: {e}") from e


def read_generation_config(folder: str | Path) -> dict:
    """generation_config.json as a dict ({} without one); runtime.SamplingConfig checks its values."""
    path = Path(folder) / "generation_config.json"
    if not path.exists():
        return {}
    if not isinstance(raw := read_json(path), dict):
        raise CheckpointError(f"{path} holds a JSON {type(raw).__name__}, not an object")
    return raw


def read_weights(folder: Path, shapes: dict, *, dtype, device, transform=None) -> dict[str, torch.Tensor]:
    """Our tensor name -> the checkpoint's tensor in `dtype` on `device`, for every name in `shapes` (our name ->
    shape). Every missing, unexpected, mis-shaped or non-float tensor is refused before one is read; `transform(name,
    tensor)` may convert each as it loads (fp8 storage quantizes the expert banks one at a time this way)."""
    wanted = {checkpoint_name(name): (name, tuple(shape)) for name, shape in shapes.items()}
    files = weight_files(folder)
    stored = {name for name in files if not name.startswith(IGNORED_PREFIXES)}
    missing, unexpected = sorted(set(wanted) - stored), sorted(stored - set(wanted))
    if missing or unexpected:
        raise CheckpointError(
            f"{folder} does not match config.json: missing {missing[:8]}{'...' * (len(missing) > 8)}"
            f", unexpected {unexpected[:8]}{'...' * (len(unexpected) > 8)}"
        )
    handles = {p: _open(p) for p in sorted(set(files[name] for name in wanted))}
    for name, (_, shape) in wanted.items():
        found = _shape(handles[files[name]], name, files[name])
        if found != shape:
            raise CheckpointError(f"{name} is {list(found)} in the checkpoint but config.json implies {list(shape)}")
    state = {}
    for name, (ours, _) in wanted.items():
        tensor = handles[files[name]].get_tensor(name).to(device=device, dtype=dtype)
        state[ours] = tensor if transform is None else transform(ours, tensor)
    return state


def checkpoint_folder(path, dtype, device) -> tuple[Path, torch.device]:
    """The folder and device of a load, refused with a clear error before anything is read."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a checkpoint folder")
    if dtype not in LOAD_DTYPES.values():
        raise DgemmaError(f"dtype must be torch.bfloat16 or torch.float32, not {dtype}")
    return folder, resolve_device(device)


def save_model(model, path: str | Path, *, dtype: torch.dtype = torch.float32, **config) -> Path:
    """model.safetensors (in `dtype`) and config.json in the official layout DiffusionGemma.from_pretrained reads;
    `config` adds top-level config.json entries (eos_token_id, pad_token_id...)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {checkpoint_name(k): v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    hf = {
        "architectures": ["DiffusionGemmaForBlockDiffusion"],
        "model_type": "diffusion_gemma",
        "canvas_length": model.config.canvas_length,
        "text_config": model.config.hf_text_config() | {"model_type": "diffusion_gemma_text"},
        "tie_word_embeddings": True,
    }
    (path / "config.json").write_text(json.dumps(hf | config, indent=2) + "\n")
    return path
