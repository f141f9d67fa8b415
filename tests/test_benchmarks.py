"""The benchmark scripts' plumbing, run in their --smoke mode on the CPU (tiny shapes, Triton's interpreter).

The numbers mean nothing here; what is checked is that every op and provider produces a complete results row (op
named as the kernel module, kernels/<op>.py, or <op>.<launcher> for a part) and that the providers' outputs agree
(each bench records its max error against an fp32 truth in the row's note).
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


def check_rows(rows: list[dict]) -> None:
    """Every row complete: provenance, times with p20 <= p50 <= p80, a rate, its ceiling and the percentage."""
    from harness import FIELDS

    assert rows
    for row in rows:
        assert list(row) == FIELDS and row["date"] and row["commit"] and row["gpu"] == "cpu", row
        p50, p20, p80 = (float(row[k]) for k in ("p50_ms", "p20_ms", "p80_ms"))
        assert 0 < p20 <= p50 <= p80, row
        value, ceiling, pct = (float(row[k]) for k in ("value", "ceiling", "pct_of_ceiling"))
        assert ceiling > 0 and row["unit"] and row["shape"] and row["dtype"] and row["provider"], row
        rounding = 0.05 + 5 * (1 + abs(value) / ceiling) / ceiling  # each of the three is rounded to 0.1
        assert abs(pct - 100 * value / ceiling) <= rounding, row


def test_bench_attention_smoke(tmp_path):
    rows = smoke("bench_attention.py", tmp_path / "rows.csv")
    check_rows(rows)
    assert {row["op"] for row in rows} == {"attention", "attention.norm_rope"}
    cases = {" ".join(row["shape"].split()[:2]) for row in rows if row["op"] == "attention"}
    assert cases == {
        f"{mode} {kind}" for mode in ("decoder", "encoder") for kind in ("sliding_attention", "full_attention")
    }
    assert {row["shape"].split()[0] for row in rows if row["op"] == "attention.norm_rope"} == {
        "sliding_attention",
        "full_attention",
    }
    for row in rows:
        if row["op"] == "attention":
            err = float(re.search(r"max abs err vs fp32 (\S+?);?(\s|$)", row["note"]).group(1))
            assert err < 1e-4, row
    assert {row["provider"] for row in rows} >= {"ours", "reference"}


def test_bench_moe_smoke(tmp_path):
    rows = smoke("bench_moe.py", tmp_path / "rows.csv")
    check_rows(rows)
    assert {row["op"] for row in rows} == {"moe", "moe.route+align"}
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
    rows = smoke("bench_vocab.py", tmp_path / "rows.csv")
    check_rows(rows)
    assert {row["op"] for row in rows} == {"vocab"}
    assert {row["provider"] for row in rows} == {"ours", "ours-recompute", "reference", "torch.compile"}
    for row in rows:  # every provider computes the same entropies and soft embeddings
        err = re.search(r"entropy (\S+); max abs err soft (\S+)$", row["note"])
        assert float(err.group(1)) < 1e-4 and float(err.group(2)) < 1e-4, row
