"""fp8 expert storage: the expert banks in float8_e4m3fn with one fp32 scale per output channel (amax / 448), chosen
at load time by `expert_dtype="fp8"`. The reference `Fp8Experts` computes on the dequantized banks; the fused MoE
kernel (kernels/moe.py) reads the fp8 weights and applies the scales in its epilogue.

Legend: E experts, N output channels, R reduced dim.
"""

from __future__ import annotations

import torch

from .model import Experts, moe

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3's largest finite value


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, N, R) bank -> float8_e4m3fn bank and fp32 scales (E, N): one per output channel, its amax / 448."""
    amax = w.detach().abs().amax(-1).float()
    scale = torch.where(amax > 0, amax / FP8_MAX, 1.0)  # a zero row keeps scale 1
    return (w.float() / scale[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale[..., None]).to(dtype)


class Fp8Experts(Experts):
    """Experts whose banks are fp8 with fp32 per-channel scales (non-persistent buffers: the checkpoint holds the
    full-precision banks)."""

    def forward(self, x, weights, idx):
        gate_up = dequantize(self.gate_up_proj, self.gate_up_scale, x.dtype)
        return moe(x, weights, idx, gate_up, dequantize(self.down_proj, self.down_scale, x.dtype))


def store_fp8(experts: Experts, gate_up_scale: torch.Tensor, down_scale: torch.Tensor) -> None:
    """Makes `experts`, whose banks already hold fp8 values, an Fp8Experts with these scales (E, 2I) and (E, D)."""
    experts.__class__ = Fp8Experts
    experts.register_buffer("gate_up_scale", gate_up_scale, persistent=False)
    experts.register_buffer("down_scale", down_scale, persistent=False)
