"""The kernel-backed layers of `backend="triton"`: the attention, router and experts of model.py with their math
replaced by the fused Triton kernels of dgemma.kernels, swapped in by `use_kernels` when a checkpoint loads. They keep
the reference layers' parameters and names, so the same checkpoint loads into either; every kernel is checked against
the reference layer it replaces (tests/test_attention.py, test_moe.py)."""

from __future__ import annotations

import torch

from ..kernels.attention import attention, norm_rope
from ..kernels.moe import moe, route
from .model import Attention, CachePass, DiffusionGemma, Experts, Router


class FusedAttention(Attention):
    """Steps 2-9 with the norms and RoPE in one prologue kernel that writes K/V straight into the cache, and a flash
    attention over the cache's band (no mask tensor, no cos/sin tables). A pass over several rows, each in its own
    cache (runtime/rows.py), runs the kernels row by row."""

    def forward(self, x, p: CachePass):
        if rows := getattr(p, "rows", None):  # runtime/rows.RowsPass: each row at its own position in its own cache
            return torch.cat([self.forward(xi, row) for xi, row in zip(x.split(1), rows, strict=True)])
        B, T, _ = x.shape
        q_raw, k_raw, v_raw = self.project(x)
        cache, n, inv_freq = p.cache, p.start, p.model.inv_freq(self.kind)
        keys, values = cache.k[self.layer], cache.v[self.layer]
        q = norm_rope(q_raw, self.q_norm.weight, inv_freq, self.eps, pos0=n)
        norm_rope(k_raw, self.k_norm.weight, inv_freq, self.eps, pos0=n, out=keys.transpose(1, 2), slot0=n)
        norm_rope(v_raw, None, None, self.eps, pos0=n, out=values.transpose(1, 2), slot0=n)
        band = cache.band(self.kind, p.causal)
        o = attention(q, keys, values, cache.pos[self.kind], cache.valid[self.kind], n, band)  # (B, H, T, d)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


class FusedRouter(Router):
    def forward(self, r):
        return route(r, self.scale, self.proj.weight, self.per_expert_scale, self.top_k, self.eps)


class FusedExperts(Experts):
    """The grouped-GEMM MoE; it reads fp8 banks and their scales as they are (fp8.store_fp8 set them)."""

    def forward(self, x, weights, idx):
        scales = getattr(self, "gate_up_scale", None), getattr(self, "down_scale", None)
        return moe(x, weights, idx, self.gate_up_proj, self.down_proj, *scales)


def use_kernels(model: DiffusionGemma) -> DiffusionGemma:
    """Swaps every layer's attention, router and experts for its kernel-backed twin, in place (parameters kept)."""
    for layer in model.layers:
        layer.self_attn.__class__ = FusedAttention
        layer.router.__class__ = FusedRouter
        layer.experts.__class__ = FusedExperts
    model.backend, model.device_loop = "triton", True
    return model
