"""`dgemma export onnx`: the decoder pass (one refinement step) and the encoder pass (a causal chunk that writes K/V)
as two opset-23 ONNX graphs traced by torch.onnx's dynamo exporter from graphs.py, weights in external data.

Graph inputs (B batch, C canvas length, Pf / Ps the committed keys full / sliding layers see, D hidden):
    decoder  canvas_ids (B, C) int64, soft (B, C, D), positions (C,) int64,
             mask_full (B, 1, C, Pf + C) bool, mask_sliding (B, 1, C, Ps + C) bool,
             past_key_{i}, past_value_{i} (B, Hkv, Pf or Ps, d) for every layer i, in position order
             -> logits (B, C, V) fp32 soft-capped, or hidden (B, C, D) with output="hidden"
    encoder  ids (B, C) int64 (a chunk right-padded to C), positions, masks and past K/V as above
             -> key_{i}, value_{i} (B, Hkv, C, d): the chunk's K/V of every layer
B, Pf and Ps are dynamic; the masks carry the window mode and left padding (runtime/engine.py builds them).
Beside them, embedding.safetensors holds the embedding table the graphs were traced with (sidecar.py says why).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import asdict
from pathlib import Path

import onnx
import torch
from torch.export import Dim

from ..errors import ExportError
from ..model import sidecar
from ..model.cache import WINDOW_MODES
from ..model.checkpoint import read_config
from ..model.config import FULL, SLIDING
from ..model.model import DiffusionGemma
from ..model.sidecar import DTYPES, MAX_BATCH, OUTPUTS, SHORT, count
from . import staging
from .custom_ops import MoENodeExperts, attach, moe_function
from .graphs import DecoderGraph, DenseExperts, EncoderGraph
from .weights import share_weights

OPSET = 23


def dims(config, max_prompt: int, max_batch: int) -> dict[str, dict[str, int]]:
    """The dynamic dimensions and their ranges. Every prefix is at least one key: the runtime feeds one masked
    slot where nothing is committed yet, so no engine needs an empty tensor."""
    out = {"batch": {"min": 1, "max": max_batch}, "past_full": {"min": 1, "max": max_prompt}}
    if SLIDING in config.layer_types:  # both window modes see at most W - 1 committed keys
        out["past_sliding"] = {"min": 1, "max": min(max_prompt, max(config.sliding_window - 1, 1))}
    return out


def example(model: DiffusionGemma, decoder: bool) -> tuple[tuple, tuple, list[str], list]:
    """Inputs to trace with (sizes >= 2 and distinct, so nothing specializes), their dynamic shapes, their names, and
    the dynamic shape of each named input ({axis: Dim} or None)."""
    config, dtype, g = model.config, model.dtype, torch.Generator().manual_seed(0)
    C, B = config.canvas_length, 2
    attending = config.layer_types if decoder else config.layer_types[:-1]  # the encoder's last layer stops at K/V
    kinds = sorted(set(attending))  # a mask input per layer type the graph attends with
    P = {FULL: C + 3, SLIDING: 2}
    dim = {"batch": Dim("batch"), FULL: Dim("past_full"), SLIDING: Dim("past_sliding")}
    ids = torch.randint(0, config.vocab_size, (B, C), generator=g)
    masks = {kind: torch.ones(B, 1, C, P[kind] + C, dtype=torch.bool) for kind in kinds}
    mask_dims = {kind: {0: dim["batch"], 3: dim[kind] + C} for kind in kinds}
    past, past_dims, past_names = [], [], []
    for i, kind in enumerate(attending):
        shape = (B, config.num_kv_heads(kind), P[kind], config.head_dim_of(kind))
        past += [torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)]
        past_dims += [{0: dim["batch"], 2: dim[kind]}] * 2
        past_names += [f"past_key_{i}", f"past_value_{i}"]
    positions = torch.arange(P[FULL], P[FULL] + C)
    head = [ids] + ([torch.randn(B, C, config.hidden_size, generator=g).to(dtype)] if decoder else [])
    names = ["canvas_ids", "soft"] if decoder else ["ids"]
    args = (*head, positions, masks, past)
    shapes = (*[{0: dim["batch"]}] * len(head), None, mask_dims, past_dims)
    specs = [*shapes[: len(head)], None, *(mask_dims[k] for k in kinds), *past_dims]
    return args, shapes, names + ["positions"] + [f"mask_{SHORT[k]}" for k in kinds] + past_names, specs


def moe_example(model: DiffusionGemma) -> tuple[torch.Tensor, ...]:
    """Inputs to trace the dgemma::MoE function body with: three tokens, the first layer's expert banks."""
    config, experts, g = model.config, model.layers[0].experts, torch.Generator().manual_seed(0)
    T, K = 3, config.top_k_experts
    x = torch.randn(T, config.hidden_size, generator=g).to(model.dtype)
    idx = torch.stack([torch.randperm(config.num_experts, generator=g)[:K] for _ in range(T)])
    return x, torch.rand(T, K, generator=g), idx, experts.gate_up_proj.detach(), experts.down_proj.detach()


def trace(graph, path: Path, decoder: bool) -> None:
    args, shapes, names, specs = example(graph.model, decoder)
    n = graph.model.config.num_hidden_layers
    outputs = [graph.output] if decoder else [f"{kv}_{i}" for i in range(n) for kv in ("key", "value")]
    with warnings.catch_warnings():  # the exporter warns about every dimension name it reuses, and about meta values
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(
            graph.eval(), args, path, dynamo=True, opset_version=OPSET, input_names=names, output_names=outputs,
            dynamic_shapes=shapes, external_data=True, optimize=True, verbose=False,
        )  # fmt: skip
    name_dims(path, names, specs)


def name_dims(path: Path, names: list[str], specs: list) -> None:
    """Gives the inputs' dynamic dimensions their Dim names, in every shape of the graph. torch.export names a symbol
    after its Dim only sometimes (a one-layer encoder, whose batch is in `ids` alone, got `s23`), and the sidecar and
    the engine profiles go by the names."""
    model = onnx.load(path, load_external_data=False)
    inputs = {v.name: v.type.tensor_type.shape.dim for v in model.graph.input}
    rename = {}
    for name, spec in zip(names, specs, strict=True):
        for axis, d in (spec or {}).items():
            symbol = inputs[name][axis].dim_param
            if not hasattr(d, "root") and symbol != d.__name__:  # a derived Dim (`past + C`) follows its root
                rename[symbol] = d.__name__
    if not rename:
        return
    for v in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for axis in v.type.tensor_type.shape.dim:
            if axis.dim_param:
                axis.dim_param = re.sub(r"\w+", lambda m: rename.get(m.group(0), m.group(0)), axis.dim_param)
    onnx.save(model, path)


def separate_masks(path: Path) -> None:
    """Gives every Attention node its own mask tensor, And(mask, True). TensorRT-RTX 1.7.1 names an internal op
    after the mask and, at a static batch, fails on the second layer that shares it ("Graph contains more than one
    op named mask_sliding.1_iota"); the exporter's common-subexpression pass merges any such copy made in torch."""
    model = onnx.load(path, load_external_data=False)
    nodes = []
    for node in model.graph.node:
        if node.op_type == "Attention":
            mask = f"{node.input[3]}_{node.output[0]}"
            nodes.append(onnx.helper.make_node("And", [node.input[3], "mask_keep"], [mask]))
            node.input[3] = mask
        nodes.append(node)
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    model.graph.initializer.append(onnx.helper.make_tensor("mask_keep", onnx.TensorProto.BOOL, [], [True]))
    onnx.save(model, path)


def describe(path: Path) -> dict:
    return sidecar.describe(path, onnx.load(path, load_external_data=False).graph)


def load(model_dir, dtype: str) -> DiffusionGemma:
    """The checkpoint's model in the export dtype `dtype` (a key of DTYPES, checked by the caller)."""
    # fp16 is rounded once from fp32; the checkpoint loader itself reads bf16 or fp32.
    stored = torch.bfloat16 if dtype == "bf16" else torch.float32
    return DiffusionGemma.from_pretrained(model_dir, dtype=stored).to(DTYPES[dtype])


def export_onnx(
    model_dir,
    out_dir,
    *,
    dtype: str = "fp32",
    max_prompt: int | None = None,
    max_batch: int = 1,
    output: str = "logits",
    custom_ops: bool = False,
    window: str = "shared",
) -> Path:
    """Writes decoder.onnx, encoder.onnx (+ .data) and dgemma.json to `out_dir`; returns it.

    max_prompt: the longest committed prefix (prompt plus committed canvases) the engines take, by default
    min(4096, max_position_embeddings); it bounds TensorRT's optimization profile. max_batch likewise.
    custom_ops: the MoE as a function-bodied dgemma::MoE node (custom_ops.py).
    """
    for name, value, options in (
        ("dtype", dtype, DTYPES),
        ("output", output, OUTPUTS),
        ("window", window, WINDOW_MODES),
    ):
        if not isinstance(value, str) or value not in options:
            raise ExportError(f"{name} must be one of {list(options)}, not {value!r}")
    if not isinstance(custom_ops, bool):
        raise ExportError(f"custom_ops must be True or False, not {custom_ops!r}")
    model_dir = sidecar.folder_arg(model_dir, "the checkpoint folder (--model)")
    config = read_config(model_dir)  # a clear error for a missing or bad checkpoint before anything is written
    positions = config.max_position_embeddings
    if max_prompt is None:
        max_prompt = min(4096, positions)
    count(max_prompt, "max_prompt (--max-prompt)", 1, positions)
    count(max_batch, "max_batch (--max-batch)", 1, MAX_BATCH)
    staging.output_folder(out_dir, reading=(model_dir,))
    model = load(model_dir, dtype)
    experts = MoENodeExperts if custom_ops else DenseExperts
    with torch.no_grad(), staging.staging(out_dir, reading=(model_dir,)) as tmp:
        graphs = {"decoder": DecoderGraph(model, output, experts), "encoder": EncoderGraph(model, experts)}
        for name, graph in graphs.items():
            trace(graph, tmp / f"{name}.onnx", decoder=name == "decoder")
            separate_masks(tmp / f"{name}.onnx")
        share_weights(tmp)
        if custom_ops:
            function = moe_function(moe_example(model), OPSET)
            for name in graphs:
                attach(tmp / f"{name}.onnx", function)
        for name in graphs:
            onnx.checker.check_model(tmp / f"{name}.onnx")
        sidecar.write_embedding(tmp, model.embed_tokens.weight)
        sidecar.write(
            tmp,
            {
                "format": sidecar.FORMAT,
                "kind": "onnx",
                "dtype": dtype,
                "opset": OPSET,
                "decoder_output": output,
                "custom_ops": custom_ops,
                "window": window,
                "dims": dims(config, max_prompt, max_batch),
                "graphs": {name: describe(tmp / f"{name}.onnx") for name in graphs},
                "config": asdict(config),
                "checkpoint": {"path": str(model_dir.resolve())},  # where it came from, for a reader
                "versions": staging.versions("onnx", "onnxscript"),
            },
        )
    return Path(out_dir)
