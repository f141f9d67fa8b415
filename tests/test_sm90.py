"""Every kernel launch compiles for Hopper (sm_90a) at the model's shapes, on any machine, within its spill budget.

The interpreter accepts code that compiled Triton rejects (a plain global, an unsupported op). This compiles every
launch the launchers make (python -m dgemma.kernels.aot: each op's sm90_launches, the launchers on meta tensors)
through Triton's real pipeline and the bundled ptxas, in a subprocess without TRITON_INTERPRET, and checks the
resources: stack (register spills) within each launch's budget, shared memory within an H100 block's, and Hopper's
warpgroup MMA (wgmma) exactly where it is expected.
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import triton

from dgemma.kernels import attention, moe, sampler, vocab
from dgemma.kernels.aot import SMEM_LIMIT
from dgemma.kernels.common import REAL, Shapes
from dgemma.model.config import Config

OPS = {"attention": attention, "moe": moe, "vocab": vocab, "sampler": sampler}

# Stack bytes (register spills) per launch in the report of Triton 3.9's ptxas (the version the tests pin); a launch
# may exceed its figure by 10% (rounded up to 8 B), and one that spills nothing may not start to.
STACK = {
    "attention.attention d256 o=fp32": 0,
    "attention.attention d256 o=bf16": 40,
    "attention.combine d256": 0,
    "attention.norm_rope d256 q/k": 32,
    "attention.norm_rope d256 v": 0,
    "attention.attention d512 o=fp32": 64,
    "attention.attention d512 o=bf16": 200,
    "attention.combine d512": 0,
    "attention.norm_rope d512 q/k": 32,
    "attention.norm_rope d512 v": 0,
    "moe.route": 0,
    "moe.count": 0,
    "moe.place": 0,
    "moe.gate_up bf16": 0,
    "moe.down bf16": 0,
    "moe.gate_up fp8": 0,
    "moe.down fp8": 0,
    "moe.sum": 0,
    "vocab.stats hidden stash": 24,
    "vocab.combine stash": 0,
    "vocab.soft hidden stash": 1184,
    "vocab.soft_reduce": 0,
    "vocab.stats hidden recompute": 0,
    "vocab.combine recompute": 0,
    "vocab.soft hidden recompute": 432,
    "vocab.stats logits stash": 3544,
    "vocab.soft logits stash": 1184,
    "vocab.stats logits recompute": 3224,
    "vocab.soft logits recompute": 1168,
    "vocab.stats hidden stash allow": 8,
    "sampler.step": 0,
    "sampler.finish": 0,
    "sampler.step allow": 0,
}
# Both of attention's dots, and the vocabulary pass's dots over E, on the warpgroup tensor-core path. The MoE GEMMs'
# 32-row expert blocks and the stats kernel over fp32 logits (no dot) do not use it.
WGMMA = {label for label in STACK if label.startswith(("attention.attention", "vocab.soft ", "vocab.stats hidden"))}


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "dgemma.kernels.aot", "--json"], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(run.stdout)
    for row in rows:
        print(row)  # the resource report, for the log
    return rows


def test_every_launch_compiles_for_hopper(report):
    assert [row["label"] for row in report] == list(STACK)  # every launch of every op, each with a budget
    for row in report:
        assert row["shared"] <= SMEM_LIMIT, row
        assert row["wgmma"] == (row["label"] in WGMMA), row
    kernels = {f"{op}.{name}" for op, module in OPS.items() for name in vars(module) if name.endswith("_kernel")}
    assert {row["kernel"] for row in report} == kernels  # every kernel is launched and compiled


@pytest.mark.skipif(not triton.__version__.startswith("3.9."), reason="the budgets are Triton 3.9's ptxas's")
def test_spills_within_budget(report):
    over = {}
    for row in report:
        budget = -(-STACK[row["label"]] * 11 // 80) * 8  # +10%, rounded up to 8 B
        if row["stack"] > budget:
            over[row["label"]] = (row["stack"], budget)
    assert not over, f"stack bytes (spills) over budget: {over}"


def test_launch_shapes_are_the_models():
    """The shapes the launches are compiled at (kernels.common.REAL) are the model's config."""
    config = Config.diffusiongemma_26b_a4b()
    for field in dataclasses.fields(Shapes):
        if field.name != "context":  # not a config field: the committed tokens of the attention launches
            assert getattr(REAL, field.name) == getattr(config, field.name), field.name
