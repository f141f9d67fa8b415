"""One copy of the weights on disk for both graphs.

torch.onnx writes each graph's large tensors to its own external-data file, so the decoder and the encoder would each
store nearly all of the model (the embedding and every layer's weights; the encoder lacks only its last layer's
feed-forward): about 95 GB at the real size instead of 50 (benchmarks/bench_export.py measures 3.3 GB per layer for
the two files). `share_weights` points every encoder tensor whose bytes decoder.onnx.data already holds at that file,
and rewrites encoder.onnx.data with the rest. Tensors are matched by their bytes, the same name only tried first:
the exporter names folded constants per graph (`val_261` in one need not be `val_261` in the other). The ONNX
external-data format allows any file and offset per tensor, and ONNX Runtime and the TensorRT parsers read it so.

It also lets a graph name any file: model/sidecar.py's `check_locations` holds a graph to its own folder before
anything reads it.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx.external_data_helper import uses_external_data

from ..errors import ExportError
from ..model.sidecar import location

CHUNK = 1 << 26  # bytes read at a time: a real expert bank is 1 GB


def point(tensor: onnx.TensorProto, file: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", file), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def chunks(path: Path, offset: int, length: int):
    with path.open("rb") as f:
        f.seek(offset)
        while length > 0:
            block = f.read(min(CHUNK, length))
            if not block:
                raise ExportError(f"{path} ends before offset {offset} + {length}")
            length -= len(block)
            yield block


def same(a: tuple[Path, int], b: tuple[Path, int], length: int) -> bool:
    """Whether two stored byte ranges are equal: a first page, then the whole of them."""
    head = min(length, 4096)
    if next(chunks(*a, head)) != next(chunks(*b, head)):
        return False
    return all(x == y for x, y in zip(chunks(*a, length), chunks(*b, length), strict=True))


def find(stored: dict, name: str, place: tuple[Path, int], length: int, folder: Path) -> tuple[str, int] | None:
    """Where the owner holds these bytes: the same name tried first (the weights), then any tensor of that size (a
    constant folded under another name)."""
    for _, (file, offset, n) in sorted(stored.items(), key=lambda item: item[0] != name):
        if n == length and same((folder / file, offset), place, length):
            return file, offset
    return None


def share_weights(folder: Path, owner: str = "decoder", sharer: str = "encoder") -> None:
    """Rewrites `sharer`.onnx and its data file so that the tensors `owner`.onnx.data holds are read from there."""
    stored = {}  # the owner's external tensors: name -> (file, offset, length)
    for tensor in onnx.load(folder / f"{owner}.onnx", load_external_data=False).graph.initializer:
        if uses_external_data(tensor):
            stored[tensor.name] = location(tensor)
    path = folder / f"{sharer}.onnx"
    model = onnx.load(path, load_external_data=False)
    own, kept = f"{sharer}.onnx.data", folder / f"{sharer}.onnx.data.kept"
    with kept.open("wb") as out:
        for tensor in model.graph.initializer:
            if not uses_external_data(tensor):
                continue
            file, offset, length = location(tensor)
            match = find(stored, tensor.name, (folder / file, offset), length, folder)
            if match is not None:
                point(tensor, *match, length)
                continue
            out.seek(-out.tell() % 64, 1)  # 64-byte aligned, as mapped readers prefer
            start = out.tell()
            for block in chunks(folder / file, offset, length):
                out.write(block)
            point(tensor, own, start, length)
    if kept.stat().st_size:
        kept.replace(folder / own)
    else:  # every tensor is the owner's
        kept.unlink()
        (folder / own).unlink()
    onnx.save(model, path)
