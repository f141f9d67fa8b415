"""The GPU window's plumbing, proven on the CPU: `gpu_check.py --dry` end to end (every part in Triton's interpreter at
tiny shapes), the driver keeping going past a failed or hung part, the summary's targets on real-shape rows, the
bad-input refusals, and bench_generate's floor against the bytes the performance notes derive."""

import csv
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent.parent
BENCH = ROOT / "benchmarks"
PARTS = ["env", "generate", "pytest", "moe", "attention", "vocab"]


@pytest.fixture(autouse=True)
def benchmarks_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))


def script(name: str, *args, env=None, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, str(BENCH / name), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    """One dry run of the whole check; the committed results file must come out of it untouched."""
    out = tmp_path_factory.mktemp("gpu-check")
    results = BENCH / "results" / "results.csv"
    before = digest(results)
    run = script("gpu_check.py", "--dry", "--out", out)
    assert digest(results) == before, "a dry run wrote to benchmarks/results/results.csv"
    return run, out


def test_dry_run_passes_every_part_and_writes_three_files(dry):
    run, out = dry
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "results.csv", "summary.md"]  # $OUT keeps <= 8 files
    log = (out / "log.txt").read_text()
    for part in PARTS:
        assert f"==== {part}: ok" in log


def test_dry_run_rows_come_from_every_benchmark_with_the_harness_columns(dry):
    from harness import FIELDS

    _, out = dry
    with (out / "results.csv").open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == FIELDS
    assert all(row[k] for row in rows for k in FIELDS if k != "note")
    ops = {row["op"] for row in rows}
    assert {"generate", "generate.with_prefill", "generate.pass", "moe", "moe.route+align", "vocab", "attention"} <= ops
    generate = [row for row in rows if row["op"] == "generate"]
    assert {row["provider"] for row in generate} == {"dgemma-triton", "dgemma-torch", "transformers"}
    assert {row["dtype"] for row in generate} == {"float32", "float32, fp8 experts"}  # transformers: full banks only
    assert all(row["unit"] == "tok/s" and float(row["p50_ms"]) > 0 for row in generate)
    transformers = [row for row in rows if row["provider"] == "transformers"]
    assert all("transformers 5.23.0" in row["note"] for row in transformers)
    # The shared weights are wired right: from the same seed, in fp32, transformers draws dgemma's tokens.
    assert all("reference-mode tokens equal dgemma-torch's: yes" in row["note"] for row in transformers)


def test_dry_run_summary_sets_each_target_beside_a_measurement(dry):
    run, out = dry
    summary = (out / "summary.md").read_text()
    assert summary in run.stdout
    for label in (
        "dgemma fp8, B1, tok/s, prefill excluded | > vLLM's 1,008 tok/s (H100), 1,288 (H200) |",
        "dgemma / transformers, bf16, B1 | > 1 |",
        "attention, global decoder, P=32768, % of the matmul rate | >= 50 % |",
        "attention, every decoder shape, x the best SDPA backend | >= 1.5x |",
        "MoE, bf16 banks, T=256, % of the copy bandwidth | >= 85 % |",
        "MoE, fp8 banks, T=256, % of the copy bandwidth | >= 80 % |",
        "router + alignment, T=256, % of the GEMM time | < 10 % |",
        "vocabulary pass, R=256, time over its floor | - |",
        "pytest -m gpu | all pass | ",
    ):
        line = next(line for line in summary.splitlines() if label in line)
        assert "not measured" not in line, line
    assert "- torch: " in summary and "- transformers: 5.23.0" in summary
    for part in PARTS:
        assert f"| {part} | ok |" in summary


def test_the_driver_keeps_going_past_a_failed_and_a_hung_part(tmp_path):
    import gpu_check

    py = sys.executable
    parts = [
        gpu_check.Part("boom", [py, "-c", "print('before the crash'); raise SystemExit(3)"], 30),
        gpu_check.Part("hang", [py, "-c", "import time; print('started', flush=True); time.sleep(60)"], 2),
        gpu_check.Part("fine", [py, "-c", "print('fine')"], 30),
        gpu_check.Part("late", [py, "-c", "print('never')"], 30),
    ]
    with (tmp_path / "log.txt").open("w") as log:
        outcomes = gpu_check.run_all(parts[:3], budget=60, jobs=1, log=log)
        outcomes += gpu_check.run_all(parts[3:], budget=5, jobs=1, log=log)  # less than the part's 15 s minimum
    status = {o.name: o.status for o in outcomes}
    assert status == {
        "boom": "failed (exit 3)",
        "hang": "timed out after 2 s",
        "fine": "ok",
        "late": "skipped: 5 s of the budget left",
    }
    hang = next(o for o in outcomes if o.name == "hang")
    assert hang.output == "started\n" and hang.seconds < 10
    log = (tmp_path / "log.txt").read_text()
    assert "==== boom: failed (exit 3)" in log and "before the crash" in log and "==== fine: ok" in log


def row(op, provider, shape, dtype="bfloat16", gpu="NVIDIA H100 80GB HBM3", **values):
    """A results row as the benchmarks write it; `values` overrides fields (value, pct_of_ceiling, p50_ms, note)."""
    base = dict(date="2027-01-01", commit="abc1234", gpu=gpu, op=op, provider=provider, shape=shape, dtype=dtype)
    numbers = dict(p50_ms=1.0, p20_ms=1.0, p80_ms=1.0, unit="", value=0, ceiling=1, pct_of_ceiling=0, note="")
    return base | {k: str(v) for k, v in (numbers | values).items()}


def test_summary_judges_real_shape_rows_against_the_readme_targets():
    import gpu_check

    rows = [
        row(
            "generate",
            "dgemma-triton",
            "real B1 P4096 C256x2 N16",
            "bfloat16, fp8 experts",
            value=1100,
            pct_of_ceiling=70,
        ),
        row("generate", "dgemma-triton", "real B4 P4096 C256x2 N16", "bfloat16, fp8 experts", value=900),
        row("generate", "dgemma-triton", "real B1 P4096 C256x2 N16", value=700, pct_of_ceiling=80),
        row("generate", "transformers", "real B1 P4096 C256x2 N16", value=100),
        row("attention", "ours", "decoder full_attention B1 T256 P32768 H16 Hkv2 d512", pct_of_ceiling=55, p50_ms=2),
        row("attention", "ours", "decoder full_attention B1 T256 P512 H16 Hkv2 d512", pct_of_ceiling=5, p50_ms=1),
        row("attention", "sdpa-math", "decoder full_attention B1 T256 P512 H16 Hkv2 d512", p50_ms=1.2),
        row("attention", "sdpa-math", "decoder full_attention B1 T256 P32768 H16 Hkv2 d512", p50_ms=4),
        row("attention", "ours", "encoder full_attention B1 T256 P512 H16 Hkv2 d512", pct_of_ceiling=5, p50_ms=9),
        row("attention", "sdpa-math", "encoder full_attention B1 T256 P512 H16 Hkv2 d512", p50_ms=1),
        row("moe", "ours", "T256 E128 K8 D2816 I704", "bfloat16 banks, bfloat16 activations", pct_of_ceiling=86),
        row("moe", "ours", "T1024 E128 K8 D2816 I704", "bfloat16 banks, bfloat16 activations", pct_of_ceiling=20),
        row("moe", "ours", "T256 E128 K8 D2816 I704", "float8_e4m3fn banks, bfloat16 activations", pct_of_ceiling=70),
        row("moe.route+align", "ours", "T256 E128 K8 D2816 I704", "bfloat16 banks, bfloat16 activations", value=12),
        row("vocab", "ours", "R256 V262144 D2816", p50_ms=2, note="peak extra 0 MB; floor 1.0000 ms = 2 reads of E"),
        row("vocab", "torch.compile", "R256 V262144 D2816", p50_ms=5),
    ]
    pytest_run = gpu_check.Outcome("pytest", "ok", 50, "....\n9 passed in 40.1s\n")
    lines = {
        label: (target, measured, met) for label, target, measured, met in gpu_check.summary_lines(rows, [pytest_run])
    }
    assert lines["dgemma fp8, B1, tok/s, prefill excluded"] == (
        "> vLLM's 1,008 tok/s",
        "1,100 tok/s (70 % of the floor)",
        "yes",
    )
    assert lines["dgemma / transformers, bf16, B1"][1:] == ("7.00x", "yes")
    assert lines["attention, global decoder, P=32768, % of the matmul rate"][1:] == ("55 % (P=32768)", "yes")
    assert lines["attention, every decoder shape, x the best SDPA backend"][1:] == (
        "1.20x at the slowest (decoder full_attention P512)", "no",
    )  # fmt: skip
    assert lines["MoE, bf16 banks, T=256, % of the copy bandwidth"][1:] == ("86 % (T=256)", "yes")
    assert lines["MoE, fp8 banks, T=256, % of the copy bandwidth"][2] == "no"
    assert lines["router + alignment, T=256, % of the GEMM time"][1:] == ("12.0 % (T=256)", "no")
    assert lines["vocabulary pass, R=256, time over its floor"][1] == "2x the floor, 2.5x faster than torch.compile"
    assert lines["pytest -m gpu"][1:] == ("9 passed in 40.1s", "yes")
    h200 = [dict(r, gpu="NVIDIA H200") for r in rows]
    assert gpu_check.summary_lines(h200, [])[0][1:] == ("> vLLM's 1,288 tok/s", "1,100 tok/s (70 % of the floor)", "no")
    assert all(measured == "not measured (no row)" for _, _, measured, _ in gpu_check.summary_lines([], []))


def test_merge_appends_a_windows_rows_once(tmp_path):
    import gpu_check

    fetched, results = tmp_path / "fetched.csv", tmp_path / "results.csv"
    rows = [row("moe", "ours", "T256"), row("vocab", "ours", "R256")]
    gpu_check.write_rows(fetched, rows, "w")
    gpu_check.write_rows(results, rows[:1], "w")
    assert gpu_check.merge(fetched, into=results) == 1
    assert gpu_check.merge(fetched, into=results) == 0
    assert [r["op"] for r in gpu_check.read_rows(results)] == ["moe", "vocab"]
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a results file"):
        gpu_check.merge(tmp_path / "other.csv", into=results)


@pytest.mark.parametrize(
    "args, env, words",
    [
        (["--out", "DIR"], {}, "torch sees no CUDA GPU here"),
        (["--dry", "--out", "FILE"], {}, "is a file, not a folder"),
        (["--out", "DIR", "--jobs", "2"], {}, "with --dry only"),
        (["--dry", "--out", "DIR", "--parts", "env", "bogus"], {}, "unknown parts ['bogus']"),
        (["--dry", "--out", "DIR", "--budget", "0"], {}, "--budget 0.0"),
        (["--dry"], {"GPU_CHECK_OUT": " "}, "GPU_CHECK_OUT is set but empty"),
        (["--dry"], {}, "pass --out DIR"),
        (["--out", "DIR", "--commit", "main; rm -rf /"], {}, "a hexadecimal commit id"),
        (["--out", "DIR", "--wheels", "DIR"], {}, "no .whl files there"),
        (["--merge", "MISSING"], {}, "no such file"),
        (["--merge", "FILE"], {}, "is not a results file"),
    ],
)
@pytest.mark.skipif(torch.cuda.is_available(), reason="one case needs a machine without a CUDA GPU")
def test_gpu_check_refuses_bad_input_with_status_2(tmp_path, args, env, words):
    (tmp_path / "file").write_text("not,a,results\nfile,,\n")
    paths = {"FILE": tmp_path / "file", "DIR": tmp_path / "out", "MISSING": tmp_path / "missing"}
    base = {k: v for k, v in os.environ.items() if k != "GPU_CHECK_OUT"}
    run = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py"), *(str(paths.get(a, a)) for a in args)],
        capture_output=True, text=True, env=base | env, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert words in run.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--device", "cpu", "--config", "real"], "about 100 GB"),
        (["--device", "cpu", "--providers", "dgemma-triton"], "needs a GPU"),
        (["--smoke", "--out", str(BENCH / "results" / "results.csv")], "--smoke rows mean nothing"),
        (["--device", "tpu"], "--device"),
        (["--device", "cpu", "--batch", "0"], "positive integers"),
        (["--device", "cpu", "--out", str(BENCH)], "is a folder"),
    ],
)
def test_bench_generate_refuses_bad_input_with_status_2(monkeypatch, capsys, args, words):
    import bench_generate

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit) as exit:
        bench_generate.parse_args(args)
    assert exit.value.code == 2 and words in capsys.readouterr().err


def test_the_floor_matches_the_bytes_the_performance_notes_derive():
    """At the real shape on the meta device: 52.2 GB per bf16 pass (performance.md: 52.23 GB at P = 4096); fp8 banks
    save 22.8 GB of it (the experts' bf16 half, less their scales)."""
    import bench_generate

    from dgemma.model.model import DiffusionGemma

    shape = bench_generate.shape_of("real")
    with torch.device("meta"):
        model = DiffusionGemma(shape.config).to(torch.bfloat16)
    moved, passes = bench_generate.floor_bytes(model, shape, batch=1)
    assert passes == 2 * 16 + 1 and moved / passes == pytest.approx(52.24e9, rel=1e-3)
    bench_generate.quantize_experts(model)
    fp8, _ = bench_generate.floor_bytes(model, shape, batch=1)
    assert (moved - fp8) / passes == pytest.approx(22.77e9, rel=1e-3)
