"""What the kernel modules share: the masked-score constant, the math basic `tl` lacks, the dot precision by dtype,
the split heuristic, the target a launch is tuned for, and the launch wrapper that lets ahead-of-time compilation
(aot.py) read every launch off the launchers themselves.

Each kernel module (attention.py, moe.py, vocab.py, sampler.py) reads in the same order: what it computes and why it
is fast; the plain PyTorch reference it is checked against; the `@triton.jit` kernels; `Tiles`, its tile choice,
from `tile_config(device, dtype, **shape)`; the launchers, which check shapes, allocate outputs and `launch`; and
`sm90_launches(shapes)`, the launchers called on meta tensors at the model's shapes under `recording(H100)`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

NEG = tl.constexpr(-1.0e30)  # a masked score or logit, an empty running max: finite, so exp(NEG - m) is 0, never NaN
WARPS, STAGES = 4, 3  # Triton's defaults on CUDA, for the kernels no tile choice was made for


@triton.jit
def tanh(y):
    # (1 - e) / (1 + e) with e = exp(-2|y|) <= 1 (cannot overflow); below |y| = 1/8, where 1 - e cancels, the odd
    # Taylor polynomial (its next term is < 2e-9 relative there)
    a = tl.abs(y)
    e = tl.exp(-2.0 * a)
    a2 = a * a
    small = a * (1.0 + a2 * (-0.3333333333 + a2 * (0.1333333333 + a2 * -0.05396825397)))
    t = tl.where(a < 0.125, small, (1.0 - e) / (1.0 + e))
    return tl.where(y < 0, -t, t)


@triton.jit
def log1p(x):
    # log(1 + x) to full relative precision for a tiny x: divide 1 + x's rounding back out
    u = 1.0 + x
    d = u - 1.0
    return tl.where(d == 0.0, x, tl.log(u) * (x / tl.where(d == 0.0, 1.0, d)))


def precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for operands of `dtype`: true fp32 products for fp32, as the PyTorch references
    compute; 16-bit operands ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


@dataclass(frozen=True)
class Target:
    """What a launch is tuned for: a CUDA GPU with `sms` multiprocessors, or Triton's interpreter (TRITON_INTERPRET=1),
    whose cost is per program and op, so it gets few programs (sms=4) and small tiles."""

    gpu: bool
    sms: int


H100 = Target(gpu=True, sms=132)  # an H100 or H200 SXM: sm_90a, 132 multiprocessors
INTERPRETER = Target(gpu=False, sms=4)


def target(device: torch.device) -> Target:
    """The target of a launch on `device`: the recording's target while `recording`, else the device's own."""
    if _recorder is not None:
        return _recorder.target
    if torch.device(device).type == "cuda":
        return Target(gpu=True, sms=torch.cuda.get_device_properties(device).multi_processor_count)
    return INTERPRETER


PROGRAMS_PER_SM = 2  # reductions are split between programs until about this many run per multiprocessor


def split(length: int, block: int, programs: int, device, *, min_blocks: int = 1, splits: int | None = None):
    """(splits, split length) of a reduced dimension of `length` shared by `programs` programs: enough splits for
    PROGRAMS_PER_SM programs per multiprocessor, each at least `min_blocks` blocks long (or exactly `splits`, when
    given), rounded so that every split is a whole number of blocks and none is empty."""
    if splits is None:
        splits = triton.cdiv(PROGRAMS_PER_SM * target(device).sms, programs)
        splits = max(1, min(splits, triton.cdiv(length, min_blocks * block)))
    split_len = triton.cdiv(triton.cdiv(length, splits), block) * block
    return triton.cdiv(length, split_len), split_len


class Launch(NamedTuple):
    """One kernel launch, as ahead-of-time compilation needs it."""

    label: str  # "<op>.<kernel> <variant>", set by the op's sm90_launches
    kernel: object  # the @triton.jit function
    signature: dict  # every runtime argument's Triton type: "*bf16" (a pointer), "i32", "fp32"
    constexprs: dict  # every constexpr argument's value
    unaligned: tuple  # pointers into their buffer at an offset that is not 16-byte aligned
    num_warps: int
    num_stages: int


_TYPES = {
    torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
    torch.float8_e4m3fn: "fp8e4nv", torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8",
}  # fmt: skip


class _Recorder:
    def __init__(self, target: Target):
        self.target, self.launches = target, []

    def add(self, kernel, args, constexprs, num_warps, num_stages):
        names = [name for name in kernel.arg_names if name not in constexprs]
        signature, unaligned = {}, []
        for name, arg in zip(names, args, strict=True):
            if isinstance(arg, torch.Tensor):
                signature[name] = "*" + _TYPES[arg.dtype]
                if arg.storage_offset() * arg.element_size() % 16:
                    unaligned.append(name)
            else:
                signature[name] = "fp32" if isinstance(arg, float) else "i32" if -(2**31) <= arg < 2**31 else "i64"
        launch = Launch("", kernel, signature, constexprs, tuple(unaligned), num_warps, num_stages)
        if launch not in self.launches:  # the same compiled kernel launched again
            self.launches.append(launch)


_recorder: _Recorder | None = None


@contextlib.contextmanager
def recording(target: Target = H100):
    """Within it, `launch` records each distinct launch (into the list it yields) instead of running it, and tile
    choices are made for `target`: the launchers called on meta tensors give every launch they make, exactly."""
    global _recorder
    outer, _recorder = _recorder, _Recorder(target)
    try:
        yield _recorder.launches
    finally:
        _recorder = outer


def named(launches: list[Launch], *labels: str) -> list[Launch]:
    """The recorded `launches`, one label each, in order: as many labels as launches were recorded."""
    if len(launches) != len(labels):
        raise RuntimeError(f"{len(launches)} launches recorded for the labels {labels}")
    return [launch._replace(label=label) for launch, label in zip(launches, labels, strict=True)]


def launch(kernel, grid, *args, num_warps: int = WARPS, num_stages: int = STAGES, **constexprs) -> None:
    """kernel[grid](*args, **constexprs) with its warps and pipeline stages; runtime arguments positional, constexprs
    by name. While `recording`, records the launch instead."""
    if _recorder is not None:
        _recorder.add(kernel, args, constexprs, num_warps, num_stages)
        return
    kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)


@dataclass(frozen=True)
class Shapes:
    """The model dimensions the kernels launch at, named as model.config.Config names them; the defaults are
    google/diffusiongemma-26B-A4B-it's (tests/test_sm90.py checks them against Config.diffusiongemma_26b_a4b())."""

    canvas_length: int = 256
    hidden_size: int = 2816
    vocab_size: int = 262_144
    num_attention_heads: int = 16
    head_dim: int = 256  # sliding layers
    num_key_value_heads: int = 8
    sliding_window: int = 1024
    global_head_dim: int = 512  # global (full-attention) layers
    num_global_key_value_heads: int = 2
    num_experts: int = 128
    top_k_experts: int = 8
    moe_intermediate_size: int = 704
    context: int = 4096  # committed tokens in the attention launches (any context over 768 splits the keys alike)


REAL = Shapes()
