"""The two exported passes as torch modules over a loaded DiffusionGemma's own weights and functions, in the ONNX
formulation of ../shared/docs/export.md section 9 (opset 23; it parses and builds in TensorRT and TensorRT-RTX).

Each difference from model.py is an equivalent formulation, checked against it by tests/test_export.py:
- the prefix K/V of every layer arrive as inputs in position order and are concatenated explicitly, instead of the
  ring cache; the encoder returns its chunk's K/V and the runtime appends them;
- masks are boolean inputs, one per layer type, over (prefix + chunk) keys, so the window mode and left padding are
  the runtime's choice (runtime/engine.py builds them from the cache's band);
- attention is F.scaled_dot_product_attention(scale=1, enable_gqa): a single-output ONNX `Attention`;
- norms are F.rms_norm in fp32 (`RMSNormalization`; the weight is used as is, not 1 + w);
- the MoE runs every expert as two dense GEMMs, the routing weights spread to (T, E) with zeros for choices not taken
  (the router itself, with its fp32 TopK, is model.py's);
- RoPE is ONNX's split-half RotaryEmbedding, its caches built from a positions input.

Legend: B batch, T chunk tokens (the canvas length C), P prefix (committed) keys, D hidden, E experts, I expert width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.onnx.ops import rotary_embedding

from ..model.model import Attention, DiffusionGemma, GatedMLP, Layer, gelu_tanh

OUTPUTS = ("logits", "hidden")  # what the decoder graph returns: soft-capped fp32 logits, or the final hidden states


def rms(x, weight, eps: float):
    """model.rms_norm as one RMSNormalization: fp32 statistics, times w (not 1 + w), cast back."""
    return F.rms_norm(x.float(), (x.shape[-1],), None if weight is None else weight.float(), eps).to(x.dtype)


def dense_moe(x, weights, idx, gate_up_proj, down_proj):
    """model.moe as two GEMMs over all E experts. x (T, D); weights (T, K) fp32; idx (T, K) -> (T, D).

    At a 256-token canvas every expert is hit anyway, so this reads the same weights as the sparse form.
    """
    E, I2, D = gate_up_proj.shape
    dense = ((idx[..., None] == torch.arange(E, device=idx.device)) * weights[..., None]).sum(1)  # (T, E) fp32
    gate, up = F.linear(x, gate_up_proj.reshape(E * I2, D)).view(-1, E, I2).chunk(2, dim=-1)  # (T, E, I) each
    act = ((gelu_tanh(gate) * up).float() * dense[..., None]).to(x.dtype)
    return F.linear(act.flatten(1), down_proj.permute(1, 0, 2).reshape(D, -1))  # (T, E*I) x (E*I, D)


class Graph(nn.Module):
    """Shared by both passes: a model's layers, with prefix K/V, masks and positions as inputs."""

    def __init__(self, model: DiffusionGemma, moe=dense_moe):
        super().__init__()
        if model.backend != "torch":
            raise ValueError("export traces the torch backend's math; load the model with backend='torch'")
        self.model, self.moe, self.eps = model, moe, model.config.rms_norm_eps
        self.kinds = sorted(set(model.config.layer_types))  # mask inputs, in this order

    def rope(self, positions, batch: int, dtype):
        """The RotaryEmbedding caches (B, T, d/2) per layer type: fp32 angles, then cast (DiffusionGemma._cos_sin)."""
        out = {}
        for kind in self.kinds:
            angles = (positions[:, None].float() * getattr(self.model, f"inv_freq_{kind}")).expand(batch, -1, -1)
            out[kind] = angles.cos().to(dtype), angles.sin().to(dtype)
        return out

    def project(self, attn: Attention, h, cos, sin):
        """Steps 2-4: q, k, v (B, heads, T, d), normed and rotated; full layers' V is the raw K projection."""
        B, T, _ = h.shape
        shape = (B, T, -1, attn.head_dim)
        q_raw, k_raw = attn.q_proj(h).view(shape), attn.k_proj(h).view(shape)
        v_raw = attn.v_proj(h).view(shape) if attn.v_proj is not None else k_raw
        q = rotary_embedding(rms(q_raw, attn.q_norm.weight, self.eps).transpose(1, 2), cos, sin)
        k = rotary_embedding(rms(k_raw, attn.k_norm.weight, self.eps).transpose(1, 2), cos, sin)
        return q, k, rms(v_raw, None, self.eps).transpose(1, 2)

    def layer(self, layer: Layer, x, rope, past_k, past_v, mask, decoder: bool):
        """One layer (architecture.md steps 2-16) -> the new residual and this chunk's K/V (B, Hkv, T, d)."""
        B, T, _ = x.shape
        q, k, v = self.project(layer.self_attn, rms(x, layer.input_layernorm.weight, self.eps), *rope[layer.kind])
        keys, values = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        gqa = q.shape[1] != keys.shape[1]  # the exporter refuses enable_gqa with one query head per KV head
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=1.0, enable_gqa=gqa)
        o = layer.self_attn.o_proj(o.transpose(1, 2).reshape(B, T, -1))
        x = x + rms(o, layer.post_attention_layernorm.weight, self.eps)
        x = x + self.feed_forward(layer, x)
        return x * (layer.decoder_scalar if decoder else layer.encoder_scalar), k, v

    def feed_forward(self, layer: Layer, x):
        """Steps 11-15: the dense GeGLU and the MoE, both from the residual x (B, T, D)."""
        dense = layer.mlp(rms(x, layer.pre_feedforward_layernorm.weight, self.eps))
        dense = rms(dense, layer.post_feedforward_layernorm_1.weight, self.eps)
        flat = x.reshape(-1, x.shape[-1])
        weights, idx = layer.router(flat)  # model.py's router: fp32 softmax and TopK
        xe = rms(flat, layer.pre_feedforward_layernorm_2.weight, self.eps)
        experts = self.moe(xe, weights, idx, layer.experts.gate_up_proj, layer.experts.down_proj).view_as(x)
        experts = rms(experts, layer.post_feedforward_layernorm_2.weight, self.eps)
        return rms(dense + experts, layer.post_feedforward_layernorm.weight, self.eps)


class DecoderGraph(Graph):
    """One refinement step: (canvas ids, soft embedding, positions, masks, prefix K/V) -> logits or hidden states."""

    def __init__(self, model: DiffusionGemma, output: str = "logits", moe=dense_moe):
        super().__init__(model, moe)
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, not {output!r}")
        self.output = output

    def forward(self, canvas_ids, soft, positions, masks: dict, past: list):
        m, sc = self.model, self.model.self_conditioning
        embedded = m.embed(canvas_ids)
        x = rms(embedded + GatedMLP.forward(sc, rms(soft, sc.pre_norm.weight, self.eps)), None, self.eps)
        rope = self.rope(positions, x.shape[0], x.dtype)
        for i, layer in enumerate(m.layers):
            x, _, _ = self.layer(layer, x, rope, past[2 * i], past[2 * i + 1], masks[layer.kind], decoder=True)
        h = rms(x, m.norm.weight, self.eps)
        return m.logits(h) if self.output == "logits" else h


class EncoderGraph(Graph):
    """One causal chunk: (ids, positions, masks, prefix K/V) -> the chunk's K/V of every layer, in layer order.

    The last layer stops at its K/V: nothing after it is needed to commit tokens (architecture.md section 5.3).
    """

    def forward(self, ids, positions, masks: dict, past: list):
        m = self.model
        x = m.embed(ids)
        rope = self.rope(positions, x.shape[0], x.dtype)
        out = []
        for i, layer in enumerate(m.layers[:-1]):
            x, k, v = self.layer(layer, x, rope, past[2 * i], past[2 * i + 1], masks[layer.kind], decoder=False)
            out += [k, v]
        last = m.layers[-1]
        _, k, v = self.project(last.self_attn, rms(x, last.input_layernorm.weight, self.eps), *rope[last.kind])
        return (*out, k, v)
