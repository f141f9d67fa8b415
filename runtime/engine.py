"""Generation over exported graphs: `Pipeline.from_pretrained(checkpoint, backend="onnxruntime" | "tensorrt",
engine=FOLDER)` runs the loop of pipeline.py unchanged over an `EngineModel`.

EngineModel has the part of DiffusionGemma's interface that `generate_ids` uses (config, dtype, device, new_cache,
encode, decode, denoise, soft_embedding, logits). It keeps the same KVCache: each pass gathers the prefix K/V
in position order from the ring and builds the boolean masks from the cache's band (so both window modes and left
padding work), and the encoder's chunk K/V are written back into the ring. The sampler, the soft embedding and (for
graphs exported with output="hidden") the LM head run outside the graphs, on the model's device, with the embedding
table the graphs were traced with (the folder's embedding.safetensors, which must equal the checkpoint's): on
TensorRT in pipeline.DeviceLoop's kernels, on the same stream, with no host sync in a canvas (the vocabulary pass
reads either output); on ONNX Runtime, whose device is the host, in the PyTorch loop.

Backends: ONNX Runtime on the CPU (fp32 or fp16 exports; it has no bf16 kernels), and TensorRT engines on a CUDA
device (full TensorRT, or TensorRT-RTX on the GPUs it supports).

Token ids from the caller (encode, denoise) are checked against the vocabulary, one host sync per pass: on a GPU an
out-of-range id is a device-side assert or an engine's out-of-bounds gather. decode, the pass pipeline.DeviceLoop
runs every step without a host sync, takes the sampler's ids unchecked (runtime/interface.py).

Legend: B batch, T chunk tokens (the canvas length C), P committed keys a layer type sees.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from ..errors import DgemmaError, ExportError
from ..model import sidecar
from ..model.cache import KVCache
from ..model.config import ENGINE_BACKENDS, WINDOW_MODES
from ..model.device import resolve_device
from ..model.model import check_ids, soft_capped_logits, soft_embedding
from ..model.sidecar import GRAPHS, PACKAGES


class EngineModel:
    """The generation loop's model (runtime/interface.py) over a runner of the exported decoder and encoder graphs."""

    def __init__(self, runner, meta: dict, embedding: torch.Tensor, window: str, backend: str):
        self.runner, self.meta, self.window, self.backend = runner, meta, window, backend
        self.device_loop = backend == "tensorrt"  # ONNX Runtime runs on the host: the per-step PyTorch loop
        self.config = sidecar.config_of(meta)
        self.embed_tokens = nn.Embedding.from_pretrained(embedding, freeze=True)
        self.inputs = {graph: {e["name"] for e in meta["graphs"][graph]["inputs"]} for graph in GRAPHS}
        self._prefix = None  # (cache, committed length, decoder feeds that hold for every step of a canvas)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch, max_len, dtype=self.dtype, device=self.device, window=self.window)

    def soft_embedding(self, logits: torch.Tensor) -> torch.Tensor:
        return soft_embedding(logits, self.embed_tokens.weight)

    def logits(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return soft_capped_logits(h, self.embed_tokens.weight, self.config.final_logit_softcapping, out)

    def prefix_feeds(self, graph: str, cache: KVCache, chunk_valid: torch.Tensor, causal: bool) -> dict:
        return sidecar.prefix_feeds(self.config, self.inputs[graph], cache, chunk_valid, causal)

    @torch.no_grad()
    def encode(self, ids, cache: KVCache, attention_mask=None) -> None:
        """Commits `ids` (B, T) chunk by chunk, each right-padded to the graph's static chunk length (causal
        attention keeps the padding invisible); returns None: the graph outputs only K/V."""
        check_ids(ids, self.config.vocab_size, cache, "ids")
        ids = ids.long()
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(ids.shape):
            raise DgemmaError(
                f"attention_mask {tuple(attention_mask.shape)} must have the ids' shape {tuple(ids.shape)}"
            )
        C = cache.chunk
        for start in range(0, ids.shape[1], C):
            chunk = ids[:, start : start + C]
            B, T = chunk.shape
            valid = torch.ones_like(chunk, dtype=torch.bool)
            if attention_mask is not None:
                valid = attention_mask[:, start : start + C].bool()
            padded_valid = torch.cat([valid, valid.new_ones(B, C - T)], dim=1)
            feeds = self.prefix_feeds("encoder", cache, padded_valid, causal=True)
            feeds["ids"] = torch.cat([chunk, chunk.new_zeros(B, C - T)], dim=1)
            out = self.runner.run("encoder", feeds, set())
            slots = cache.stage(T, valid)
            for i, kind in enumerate(self.config.layer_types):
                cache.k[i][:, :, slots[kind]] = out[f"key_{i}"][:, :, :T]
                cache.v[i][:, :, slots[kind]] = out[f"value_{i}"][:, :, :T]
            cache.commit(T)

    @property
    def decoder_output(self) -> str:
        return self.meta["decoder_output"]

    def decode(self, canvas_ids, cache: KVCache, soft=None):
        """One decoder pass -> the graph's output: fp32 soft-capped logits (B, C, V) or hidden states (B, C, D)."""
        reused = self._prefix is not None and self._prefix[0] is cache and self._prefix[1] == cache.length
        if not reused:
            valid = torch.ones_like(canvas_ids, dtype=torch.bool)
            self._prefix = cache, cache.length, self.prefix_feeds("decoder", cache, valid, causal=False)
        B, C = canvas_ids.shape
        if soft is None:
            soft = torch.zeros(B, C, self.config.hidden_size, dtype=self.dtype, device=self.device)
        feeds = self._prefix[2] | {"canvas_ids": canvas_ids, "soft": soft}
        unchanged = set(self._prefix[2]) if reused else set()
        return self.runner.run("decoder", feeds, unchanged)[self.decoder_output]

    @torch.no_grad()
    def denoise(self, canvas_ids, cache: KVCache, self_conditioning=None):
        """As DiffusionGemma.denoise -> fp32 soft-capped logits (B, C, V)."""
        check_ids(canvas_ids, self.config.vocab_size, cache, "canvas_ids", self.config.canvas_length)
        canvas_ids = canvas_ids.long()
        soft = None if self_conditioning is None else self.soft_embedding(self_conditioning)
        out = self.decode(canvas_ids, cache, soft)
        return out if self.decoder_output == "logits" else self.logits(out)


class OnnxRuntimeRunner:
    """The graphs in ONNX Runtime on the CPU: the verification backend (host tensors, so no device to stay on)."""

    def __init__(self, folder: Path, meta: dict):
        try:
            import onnxruntime
        except ImportError as e:
            raise ExportError(f"the onnxruntime backend needs {e.name}: pip install 'dgemma[export]'") from e
        if meta["kind"] != "onnx":
            raise ExportError(f"{folder} holds TensorRT engines: use backend='tensorrt', or pass an ONNX export")
        if meta["dtype"] == "bf16":
            raise ExportError("ONNX Runtime's CPU provider has no bf16 kernels: export with --dtype fp32 to run it")
        options = onnxruntime.SessionOptions()
        # Idle pool threads spin-wait by default, which takes the CPU from torch's sampler between passes.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sessions = {}
        for graph in GRAPHS:  # sidecar.read checked the files and their external data
            file = folder / meta["graphs"][graph]["file"]
            try:
                self.sessions[graph] = onnxruntime.InferenceSession(
                    str(file), options, providers=["CPUExecutionProvider"]
                )
            except Exception as e:  # ONNX Runtime's own classes (Fail, InvalidGraph...): the file is unusable
                raise ExportError(f"ONNX Runtime cannot load {file}: {e}") from e

    def run(self, graph: str, feeds: dict, unchanged: set) -> dict[str, torch.Tensor]:
        session = self.sessions[graph]
        out = session.run(None, {name: t.contiguous().numpy() for name, t in feeds.items()})
        return {o.name: torch.from_numpy(a) for o, a in zip(session.get_outputs(), out, strict=True)}


def load_tensorrt(meta: dict, folder: Path):
    """The TensorRT module that built the engines, refusing an ONNX folder or another package or version."""
    if meta["kind"] != "engine":
        raise ExportError(f"{folder} holds ONNX graphs: build engines with `dgemma export trt`, or use onnxruntime")
    package, version = meta["engine"]["package"], meta["engine"]["version"]
    if package not in PACKAGES:  # the sidecar names the module imported here: sidecar.read refused others already
        raise ExportError(f"{folder}'s engines name package {package!r}, not one of {list(PACKAGES)}")
    try:
        trt = importlib.import_module(package)
    except ImportError as e:
        raise ExportError(f"the engines in {folder} were built with {package} {version}, which is not installed") from e
    if trt.__version__ != version:
        raise ExportError(
            f"the engines in {folder} were built with {package} {version} but {trt.__version__} is installed: "
            "engines do not carry across TensorRT versions; rebuild them with `dgemma export trt`"
        )
    return trt


class TensorRTRunner:
    """The engines on a CUDA device, without host syncs: every input and output has one buffer, allocated once at
    the profile's largest shape and bound by address; passes run with execute_async_v3 on a side stream; each
    decoder input shape (one per committed length) gets one CUDA graph, captured at its first step and replayed
    after. The prefix K/V and masks are copied once per canvas. Outputs are views of the buffers, valid until the
    next call."""

    def __init__(self, folder: Path, meta: dict, device: torch.device):
        trt = load_tensorrt(meta, folder)
        if device.type != "cuda":
            raise DgemmaError(f"TensorRT engines run on a CUDA device, not {str(device)!r}")
        self.device = device
        self.trt, self.stream = trt, torch.cuda.Stream(self.device)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines, self.contexts, self.buffers = {}, {}, {}
        for graph in GRAPHS:
            engine = runtime.deserialize_cuda_engine((folder / meta["engine"]["files"][graph]).read_bytes())
            if engine is None:
                raise ExportError(f"{trt.__name__} could not load {graph}.engine on this GPU (its log says why)")
            self.engines[graph], self.contexts[graph] = engine, engine.create_execution_context()
            self.buffers[graph] = self._allocate(graph)
        self.bound, self.cuda_graphs = {}, {}  # graph -> (shape key, buffer views); shape key -> CUDA graph

    def _allocate(self, graph: str) -> dict[str, torch.Tensor]:
        """One flat buffer per tensor, sized by the largest shape the profile allows."""
        engine, context = self.engines[graph], self.contexts[graph]
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT]
        for name in inputs:
            shape = tuple(engine.get_tensor_shape(name))
            context.set_input_shape(name, engine.get_tensor_profile_shape(name, 0)[2] if -1 in shape else shape)
        dtypes = {self.trt.float32: torch.float32, self.trt.float16: torch.float16, self.trt.bfloat16: torch.bfloat16}
        dtypes |= {self.trt.int64: torch.int64, self.trt.int32: torch.int32, self.trt.bool: torch.bool}
        sizes = {name: torch.Size(tuple(context.get_tensor_shape(name))).numel() for name in names}
        return {
            name: torch.empty(size, dtype=dtypes[engine.get_tensor_dtype(name)], device=self.device)
            for name, size in sizes.items()
        }

    def _bind(self, graph: str, feeds: dict) -> dict[str, torch.Tensor]:
        """Sets the input shapes and addresses (the same base address for every shape) -> output views."""
        context, buffers = self.contexts[graph], self.buffers[graph]
        for name, t in feeds.items():
            if not context.set_input_shape(name, tuple(t.shape)):
                raise ExportError(
                    f"{name} {tuple(t.shape)} is outside the {graph} engine's profile: the batch or the committed "
                    "length exceeds what the export allowed (dims in dgemma.json; --max-batch, --max-prompt)"
                )
        views = {}
        for name, buffer in buffers.items():
            shape = tuple(feeds[name].shape) if name in feeds else tuple(context.get_tensor_shape(name))
            views[name] = buffer[: torch.Size(shape).numel()].view(shape)
            context.set_tensor_address(name, views[name].data_ptr())
        return views

    def run(self, graph: str, feeds: dict, unchanged: set) -> dict[str, torch.Tensor]:
        """`unchanged` names feeds whose values the last call of this graph already copied (a canvas's prefix)."""
        context, stream = self.contexts[graph], self.stream
        key = (graph, tuple((name, tuple(t.shape)) for name, t in sorted(feeds.items())))
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            if self.bound.get(graph, (None,))[0] != key:
                self.bound[graph], unchanged = (key, self._bind(graph, feeds)), set()
            views = self.bound[graph][1]
            for name in feeds.keys() - unchanged:
                views[name].copy_(feeds[name], non_blocking=True)
            if graph == "decoder":
                self._replay(key, context)
            else:
                context.execute_async_v3(stream.cuda_stream)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        return {name: v for name, v in views.items() if name not in feeds}

    def _replay(self, key, context):
        if not context.is_stream_capturable(self.stream.cuda_stream):  # e.g. an RTX engine built without
            context.execute_async_v3(self.stream.cuda_stream)  # REQUIRE_USER_ALLOCATION
            return
        if key not in self.cuda_graphs:
            context.execute_async_v3(self.stream.cuda_stream)  # warm-up: lazy allocations, RTX's JIT kernels
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                context.execute_async_v3(self.stream.cuda_stream)
            self.cuda_graphs[key] = graph
        self.cuda_graphs[key].replay()


def load(checkpoint, engine, *, backend: str, device="cpu", window: str | None = None) -> EngineModel:
    """An EngineModel over the export or engine folder `engine`, checked against `checkpoint`; window None takes the
    export's."""
    if backend not in ENGINE_BACKENDS:
        raise DgemmaError(f"engine backend must be one of {ENGINE_BACKENDS}, not {backend!r}")
    if engine is None:
        raise DgemmaError(f"backend={backend!r} needs engine=FOLDER, written by `dgemma export onnx` or `export trt`")
    if window is not None and window not in WINDOW_MODES:
        raise DgemmaError(f"window must be one of {WINDOW_MODES}, not {window!r}")
    device = resolve_device(device)
    folder = sidecar.folder_arg(engine, "engine")
    meta = sidecar.read(folder)
    embedding = sidecar.read_embedding(folder, meta)
    sidecar.check_checkpoint(meta, embedding, checkpoint)
    if backend == "onnxruntime":
        if device.type != "cpu":
            raise DgemmaError("the onnxruntime backend runs on the CPU; on a GPU use backend='tensorrt'")
        runner = OnnxRuntimeRunner(folder, meta)
    else:
        runner = TensorRTRunner(folder, meta, device)
    return EngineModel(runner, meta, embedding.to(device), window or meta["window"], backend)
