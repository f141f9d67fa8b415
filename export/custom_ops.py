"""The MoE as one custom-domain node, `dgemma::MoE`, that carries its reference ONNX function body.

kernels/moe.py has a Triton grouped-GEMM MoE that reads only the chosen experts; the dense ONNX form runs all of
them (about 16x the ideal FLOPs at top-8 of 128). With `custom_ops=True` the export emits the MoE as one node in the
`dgemma` domain with the attributes full TensorRT (10.9+) needs to bind a Triton AOT plugin registered under that
name (`plugin_namespace`, `plugin_version`, `aot=1`), and attaches a FunctionProto of the same domain and name whose
body is the dense formulation, exported from the same torch function (graphs.dense_moe). ONNX Runtime and
TensorRT-RTX, which have no such plugin, inline the body; full TensorRT prefers a registered plugin over the body.
The plugin itself is not part of this repository.

Node: dgemma::MoE(x (T, D), weights (T, K) fp32, idx (T, K) int64, gate_up_proj (E, 2I, D), down_proj (E, D, I))
-> (T, D), in x's dtype.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from ..model.model import Experts
from .graphs import dense_moe

DOMAIN, MOE, VERSION = "dgemma", "MoE", 1
PLUGIN_ATTRS = {"plugin_namespace": DOMAIN, "plugin_version": str(VERSION), "aot": 1}
MOE_INPUTS = ("x", "weights", "idx", "gate_up_proj", "down_proj")


def moe_node(x, weights, idx, gate_up_proj, down_proj):
    """graphs.dense_moe in eager mode; one dgemma::MoE node under torch.onnx.export."""
    if not torch.onnx.is_in_onnx_export():
        return dense_moe(x, weights, idx, gate_up_proj, down_proj)
    inputs = (x, weights, idx, gate_up_proj, down_proj)
    return torch.onnx.ops.symbolic(
        f"{DOMAIN}::{MOE}", inputs, PLUGIN_ATTRS, dtype=x.dtype, shape=x.shape, version=VERSION
    )


class MoENodeExperts(Experts):
    """The experts as one dgemma::MoE node (graphs.Graph's `experts`)."""

    def forward(self, x, weights, idx):
        return moe_node(x, weights, idx, self.gate_up_proj, self.down_proj)


class _DenseMoE(nn.Module):
    def forward(self, x, weights, idx, gate_up_proj, down_proj):
        return dense_moe(x, weights, idx, gate_up_proj, down_proj)


def moe_function(example: tuple[torch.Tensor, ...], opset: int) -> onnx.FunctionProto:
    """The body of dgemma::MoE: dense_moe exported on its own (tokens dynamic), its constants made Constant nodes."""
    tokens = torch.export.Dim("tokens")
    dynamic = ({0: tokens}, {0: tokens}, {0: tokens}, None, None)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "moe.onnx"
        with warnings.catch_warnings():  # as onnx.trace: the exporter's notes on dimension names
            warnings.simplefilter("ignore", UserWarning)
            torch.onnx.export(
                _DenseMoE(), example, path, dynamo=True, opset_version=opset, input_names=list(MOE_INPUTS),
                output_names=["y"], dynamic_shapes=dynamic, external_data=False, verbose=False,
            )  # fmt: skip
        graph = onnx.load(path).graph
    constants = [onnx.helper.make_node("Constant", [], [t.name], value=t) for t in graph.initializer]
    return onnx.helper.make_function(
        DOMAIN, MOE, list(MOE_INPUTS), ["y"], constants + list(graph.node),
        [onnx.helper.make_opsetid("", opset)],
    )  # fmt: skip


def attach(path: Path, function: onnx.FunctionProto) -> None:
    """Adds the function body and the domain's opset import to an exported model, leaving its external data as is."""
    model = onnx.load(path, load_external_data=False)
    model.functions.append(function)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, VERSION))
    onnx.save(model, path)
