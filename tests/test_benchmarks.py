"""The benchmark scripts' plumbing, run in their --smoke mode on the CPU (tiny shapes, Triton's interpreter).

The numbers mean nothing here; what is checked is that every op and provider produces a complete results row and
that the providers' outputs agree (each bench records its max error against an fp32 truth in the row's note).
"""

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def smoke(script: str, out: Path) -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--device", "cpu", "--out", str(out)]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=600)
    with out.open() as f:
        return list(csv.DictReader(f))


def test_bench_attention_smoke(tmp_path):
    from harness import FIELDS

    rows = smoke("bench_attention.py", tmp_path / "rows.csv")
    assert rows and all(set(row) == set(FIELDS) and all(row[k] for k in FIELDS if k != "note") for row in rows)
    ops = {row["op"] for row in rows}
    assert {"attention-decoder-sliding_attention", "attention-decoder-full_attention"} <= ops
    assert {"attention-encoder-sliding_attention", "attention-encoder-full_attention"} <= ops
    assert {"norm_rope-sliding_attention", "norm_rope-full_attention"} <= ops
    for row in rows:
        if row["op"].startswith("attention"):
            err = float(re.search(r"max abs err vs fp32 (\S+?);?(\s|$)", row["note"]).group(1))
            assert err < 1e-4, row
    assert {row["provider"] for row in rows} >= {"ours", "reference"}


def test_bench_moe_smoke(tmp_path):
    from harness import FIELDS

    rows = smoke("bench_moe.py", tmp_path / "rows.csv")
    assert rows and all(set(row) == set(FIELDS) and all(row[k] for k in FIELDS if k != "note") for row in rows)
    assert {row["op"] for row in rows} == {"moe", "moe-route+align"}
    assert {row["provider"] for row in rows if row["op"] == "moe"} == {"ours", "transformers-grouped_mm", "reference"}
    assert {row["dtype"].split()[0] for row in rows} == {"float32", "float8_e4m3fn"}  # fp32 banks on the CPU, and fp8
    for row in rows:
        if row["op"] == "moe":
            err = float(re.search(r"max abs err vs fp32 (\S+?);", row["note"]).group(1))
            assert err < 1e-4, row


def test_bench_export_smoke(tmp_path):
    """Two cut-down tiny checkpoints exported (and built, where TensorRT-RTX is installed) in their own processes."""
    from harness import FIELDS

    rows = smoke("bench_export.py", tmp_path / "rows.csv")
    assert rows and all(set(row) == set(FIELDS) and all(row[k] for k in FIELDS) for row in rows)
    assert {row["shape"].split()[0] for row in rows} == {"layers=1", "layers=2"}
    for row in rows:
        assert row["unit"] == "GB peak RSS" and 0 < float(row["value"]) < float(row["ceiling"])
        assert float(row["p50_ms"]) > 0 and "params" in row["note"]


@pytest.fixture(autouse=True)
def benchmarks_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))


def test_bench_vocab_smoke(tmp_path):
    from harness import FIELDS

    rows = smoke("bench_vocab.py", tmp_path / "rows.csv")
    assert rows and all(set(row) == set(FIELDS) and all(row[k] for k in FIELDS if k != "note") for row in rows)
    assert {row["op"] for row in rows} == {"vocab"}
    assert {row["provider"] for row in rows} == {"ours", "ours-recompute", "reference", "torch.compile"}
    for row in rows:  # every provider computes the same entropies and soft embeddings
        err = re.search(r"entropy (\S+); max abs err soft (\S+)$", row["note"])
        assert float(err.group(1)) < 1e-4 and float(err.group(2)) < 1e-4, row
