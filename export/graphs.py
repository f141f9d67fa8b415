"""The two exported passes as torch modules that run a loaded DiffusionGemma's own layers (model.py), in an ONNX
formulation (opset 23) that parses and builds in TensorRT and TensorRT-RTX.

The layers, norms, router and LM head are model.py's; what differs is where K/V live and three equivalent
formulations, each checked against the model by tests/test_export.py:
- `GraphPass` (a model.Pass): the prefix K/V of every layer arrive as inputs in position order and are concatenated
  explicitly, instead of the ring cache; the chunk's K/V are graph outputs (the encoder's) that the runtime appends;
- masks are boolean inputs, one per layer type, over (prefix + chunk) keys, so the window mode and left padding are
  the runtime's choice (model/sidecar.py's prefix_feeds builds them from the cache's band);
- attention is F.scaled_dot_product_attention(scale=1, enable_gqa): a single-output ONNX `Attention`; RoPE is
  ONNX's split-half RotaryEmbedding, its caches built from a positions input;
- the MoE runs every expert as two dense GEMMs (`DenseExperts`), the routing weights spread to (T, E) with zeros for
  choices not taken (the router, with its fp32 TopK, is model.py's).
The model's norms are F.rms_norm, which exports as one `RMSNormalization`.

Legend: B batch, T chunk tokens (the canvas length C), P prefix (committed) keys, D hidden, E experts, I expert width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.onnx.ops import rotary_embedding

from ..errors import ExportError
from ..model.model import DiffusionGemma, Experts, Pass, gelu_tanh
from ..model.sidecar import OUTPUTS


def dense_moe(x, weights, idx, gate_up_proj, down_proj):
    """model.moe as two GEMMs over all E experts. x (T, D); weights (T, K) fp32; idx (T, K) -> (T, D).

    At a 256-token canvas every expert is hit anyway, so this reads the same weights as the sparse form.
    """
    E, I2, D = gate_up_proj.shape
    dense = ((idx[..., None] == torch.arange(E, device=idx.device)) * weights[..., None]).sum(1)  # (T, E) fp32
    gate, up = F.linear(x, gate_up_proj.reshape(E * I2, D)).view(-1, E, I2).chunk(2, dim=-1)  # (T, E, I) each
    act = ((gelu_tanh(gate) * up).float() * dense[..., None]).to(x.dtype)
    return F.linear(act.flatten(1), down_proj.permute(1, 0, 2).reshape(D, -1))  # (T, E*I) x (E*I, D)


class DenseExperts(Experts):
    def forward(self, x, weights, idx):
        return dense_moe(x, weights, idx, self.gate_up_proj, self.down_proj)


class GraphPass(Pass):
    """K/V as graph inputs and outputs: `past` holds each attending layer's prefix K and V (B, Hkv, P, d), `masks`
    the (B, 1, T, P + T) mask per layer type; `kv` collects each layer's chunk K and V (B, Hkv, T, d)."""

    def __init__(self, model: DiffusionGemma, positions, masks: dict, past: list, batch: int, dtype):
        self.masks, self.past, self.kv = masks, past, []
        self.rope = {}  # the RotaryEmbedding caches (B, T, d/2) per layer type: fp32 angles, then cast (CachePass)
        for kind in set(model.config.layer_types):  # the encoder's last layer rotates K without attending
            angles = (positions[:, None].float() * model.inv_freq(kind)).expand(batch, -1, -1)
            self.rope[kind] = angles.cos().to(dtype), angles.sin().to(dtype)

    def rotate(self, kind: str, x):
        return rotary_embedding(x.transpose(1, 2), *self.rope[kind]).transpose(1, 2)  # it takes (B, heads, T, d)

    def attend(self, layer: int, kind: str, q, k, v):
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, d)
        self.kv += [k, v]
        keys, values = torch.cat([self.past[2 * layer], k], dim=2), torch.cat([self.past[2 * layer + 1], v], dim=2)
        gqa = q.shape[1] != keys.shape[1]  # the exporter refuses enable_gqa with one query head per KV head
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=self.masks[kind], scale=1.0, enable_gqa=gqa)
        return o.transpose(1, 2)  # (B, T, H, d)


class Graph(nn.Module):
    """Shared by both passes: takes over a reference model (its experts become `experts`, a dense formulation)."""

    def __init__(self, model: DiffusionGemma, experts: type[Experts] = DenseExperts):
        super().__init__()
        if model.backend != "torch":
            raise ExportError("export traces the reference layers; load the model without the Triton backend")
        for layer in model.layers:
            layer.experts.__class__ = experts
        self.model = model
        self.kinds = sorted(set(model.config.layer_types))  # mask inputs, in this order


class DecoderGraph(Graph):
    """One refinement step: (canvas ids, soft embedding, positions, masks, prefix K/V) -> logits or hidden states."""

    def __init__(self, model: DiffusionGemma, output: str = "logits", experts: type[Experts] = DenseExperts):
        super().__init__(model, experts)
        if output not in OUTPUTS:
            raise ExportError(f"output must be one of {OUTPUTS}, not {output!r}")
        self.output = output

    def forward(self, canvas_ids, soft, positions, masks: dict, past: list):
        m = self.model
        x = m.self_conditioning(m.embed(canvas_ids), soft)
        h = m(x, GraphPass(m, positions, masks, past, x.shape[0], x.dtype), decoder=True)
        return m.logits(h) if self.output == "logits" else h


class EncoderGraph(Graph):
    """One causal chunk: (ids, positions, masks, prefix K/V) -> the chunk's K/V of every layer, in layer order.

    The last layer stops at its K/V: nothing after them is needed to commit tokens.
    """

    def forward(self, ids, positions, masks: dict, past: list):
        m = self.model
        x = m.embed(ids)
        p = GraphPass(m, positions, masks, past, x.shape[0], x.dtype)
        for layer in m.layers[:-1]:
            x = layer(x, p, decoder=False)
        last = m.layers[-1].self_attn
        _, k_raw, v_raw = last.project(m.layers[-1].input_layernorm(x))
        p.kv += [t.transpose(1, 2) for t in last.key_value(k_raw, v_raw, p)]
        return tuple(p.kv)
