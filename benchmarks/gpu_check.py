"""Everything a lent GPU should measure, in one command of at most 6 minutes on an H100 or H200.

Parts, in this order, each a child process with its own time limit inside a budget for the whole run, so one bug or
hang costs that part only: the environment (GPU, driver, clocks, torch, Triton, transformers); bench_generate.py
(end-to-end tokens/s, bf16 and fp8 experts, batch 1); `pytest -m gpu` (the kernels at the real shapes, bf16 and
fp8); bench_moe.py, bench_attention.py and bench_vocab.py at their default shapes. Every benchmark row goes to the
output folder's results.csv (and, on a GPU, is appended to benchmarks/results/results.csv); summary.md sets each of
the README's targets beside its measured value; log.txt holds every part's output. Any failed part makes the exit
status 1, after the other parts have run.

    python3 benchmarks/gpu_check.py --out "$OUT"            # on the GPU machine: what `make gpu-check` runs
    python benchmarks/gpu_check.py --dry --out build/gpu-check-dry   # the same parts on the CPU at tiny shapes
    python benchmarks/gpu_check.py --merge FETCHED/results.csv       # here: append a window's rows to results.csv

On the GPU machine the repository is a copy without .git or an install: the parts import dgemma through a link
(gpu_env.py), transformers 5.23.0 from the wheels in .whl/ (`make gpu-wheels`), and `--commit` names the checkout
the rows come from. `--dry` runs every part on the CPU in Triton's interpreter with each benchmark's --smoke shapes,
two parts at a time, and writes nowhere but --out.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import gpu_env

ROOT, BENCH = gpu_env.ROOT, gpu_env.ROOT / "benchmarks"
RESULTS = BENCH / "results" / "results.csv"
FIELDS = [
    "date", "commit", "gpu", "op", "provider", "shape", "dtype",
    "p50_ms", "p20_ms", "p80_ms", "unit", "value", "ceiling", "pct_of_ceiling", "note",
]  # fmt: skip  # harness.FIELDS, which imports torch
BUDGET = {False: 345.0, True: 900.0}  # seconds for the whole run: on a GPU (6 minutes less the start), dry
VLLM = {"H100": 1008, "H200": 1288}  # tok/s, FP8, batch 1, 16 steps, prompt 4096, prefill excluded (vLLM's blog)
OUT_FILES = ("summary.md", "results.csv", "log.txt")


@dataclass
class Part:
    name: str
    command: list[str]
    limit: float  # seconds, at most; less when the budget has less left


@dataclass
class Outcome:
    name: str
    status: str  # "ok", "failed (exit N)", "timed out after N s", "skipped: ..."
    seconds: float
    output: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def parts(dry: bool, rows: Path) -> list[Part]:
    """The parts in priority order, the headline number first; each benchmark writes its rows to `rows`/PART.csv."""
    py, out = sys.executable, lambda name: ["--out", str(rows / f"{name}.csv")]  # noqa: E731
    smoke = ["--smoke", "--device", "cpu"] if dry else []
    gpu_tests = sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in p.read_text()
    )
    generate = smoke if dry else ["--batch", "1", "--experts", "full", "fp8", "--runs", "2"]
    return [
        Part("env", [py, __file__, "--env"], 60),
        Part("generate", [py, str(BENCH / "bench_generate.py"), *generate, *out("generate")], 210),
        Part("pytest", [py, "-m", "pytest", "-m", "gpu", "-q", "-rfE", "-p", "no:cacheprovider", *gpu_tests], 120),
        Part("moe", [py, str(BENCH / "bench_moe.py"), *smoke, *out("moe")], 90),
        Part("attention", [py, str(BENCH / "bench_attention.py"), *smoke, *out("attention")], 90),
        Part("vocab", [py, str(BENCH / "bench_vocab.py"), *smoke, *out("vocab")], 120),
    ]


# ---------------------------------------------------------------------------------------------------------------
# Running the parts


def run_part(part: Part, deadline: float, echo: bool) -> Outcome:
    """Runs one part in its own process group, killed with everything it started when its limit passes."""
    left = deadline - time.monotonic()
    if left < min(part.limit, 15):  # a part cut below 15 s could not even import torch and Triton
        return Outcome(part.name, f"skipped: {max(0.0, left):.0f} s of the budget left", 0.0, "")
    limit = min(part.limit, left)
    if echo:
        print(f"\n==== {part.name} (at most {limit:.0f} s): {' '.join(part.command)}", flush=True)
    start = time.monotonic()
    proc = subprocess.Popen(
        part.command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
        start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []

    def read():
        for line in proc.stdout:
            lines.append(line)
            if echo:
                print(line, end="", flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=limit)
        status = "ok" if code == 0 else f"failed (exit {code})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        status = f"timed out after {limit:.0f} s"
    reader.join(timeout=10)
    return Outcome(part.name, status, time.monotonic() - start, "".join(lines))


def run_all(selected: list[Part], budget: float, jobs: int, log) -> list[Outcome]:
    """Every part, `jobs` at a time, each within the budget's remainder; their outputs go to `log` as they end."""
    deadline = time.monotonic() + budget
    lock = threading.Lock()

    def one(part: Part) -> Outcome:
        outcome = run_part(part, deadline, echo=jobs == 1)
        with lock:
            header = f"==== {outcome.name}: {outcome.status} ({outcome.seconds:.1f} s)\n"
            log.write(header + outcome.output + ("" if outcome.output.endswith("\n") else "\n"))
            log.flush()
            if jobs > 1:
                print("\n" + header + outcome.output, end="", flush=True)
            if not outcome.ok:
                print(f"FAILED part {outcome.name}: {outcome.status}", file=sys.stderr, flush=True)
        return outcome

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, selected))


# ---------------------------------------------------------------------------------------------------------------
# The summary: the README's targets beside the rows


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def number(row: dict, key: str) -> float:
    try:
        return float(row[key])
    except (KeyError, TypeError, ValueError):
        return math.nan


def size(row: dict, letter: str) -> int:
    """The value of a shape field such as T256 or P32768 in the row's shape text (-1 when absent)."""
    m = re.search(rf"\b{letter}(\d+)\b", row.get("shape", ""))
    return int(m[1]) if m else -1


def closest(rows: list[dict], letter: str, want: int) -> list[dict]:
    """The rows whose shape field `letter` is nearest `want` (the smoke shapes differ from the real ones)."""
    if not rows:
        return []
    best = min(abs(size(r, letter) - want) for r in rows)
    return [r for r in rows if abs(size(r, letter) - want) == best]


Line = tuple[str, str, str, str]  # check, target, measured, met (yes / no / -)


def line(label: str, target: str, value: float | None, text: str = "", goal=None) -> Line:
    """A summary line; `value` None when no row measured it, `goal(value)` whether it meets the target."""
    if value is None:
        return label, target, "not measured (no row)", "-"
    met = "-" if goal is None or math.isnan(value) else ("yes" if goal(value) else "no")
    return label, target, text, met


def fmt(value: float) -> str:
    """Large values with thousands separators, small ones (the dry run's) with three significant digits."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def first(rows: list[dict], **where) -> dict | None:
    return next((r for r in rows if all(r[k] == v for k, v in where.items())), None)


def batch_one(rows: list[dict], op: str, provider: str, fp8: bool) -> dict | None:
    """bench_generate's batch-1 row of `op` for a provider and an expert dtype."""
    fits = lambda r: (r["op"], r["provider"], "fp8" in r["dtype"], size(r, "B")) == (op, provider, fp8, 1)  # noqa: E731
    return next(filter(fits, rows), None)


def generate_lines(rows: list[dict]) -> list[Line]:
    """End to end, batch 1: fp8 against vLLM's published number for this GPU, bf16, and against transformers."""
    gpu = rows[0]["gpu"] if rows else ""
    vllm = next((v for k, v in VLLM.items() if k in gpu), None)
    target = f"> vLLM's {vllm:,} tok/s" if vllm else "> vLLM's 1,008 tok/s (H100), 1,288 (H200)"
    out = []
    for label, provider, fp8, goal in (
        ("dgemma fp8, B1, tok/s, prefill excluded", "dgemma-triton", True, target),
        ("dgemma bf16, B1, tok/s, prefill excluded", "dgemma-triton", False, "-"),
        ("transformers bf16, B1, tok/s, prefill excluded", "transformers", False, "-"),
    ):
        r = batch_one(rows, "generate", provider, fp8)
        text = r and f"{fmt(number(r, 'value'))} tok/s ({fmt(number(r, 'pct_of_ceiling'))} % of the floor)"
        meets = (lambda v: v > vllm) if goal != "-" and vllm else None
        out.append(line(label, goal, r and number(r, "value"), text, meets))
    ours, theirs = (batch_one(rows, "generate", p, False) for p in ("dgemma-triton", "transformers"))
    ratio = number(ours, "value") / number(theirs, "value") if ours and theirs else None
    out.append(line("dgemma / transformers, bf16, B1", "> 1", ratio, ratio and f"{ratio:.2f}x", lambda v: v > 1))
    p = batch_one(rows, "generate.pass", "dgemma-triton", True)
    text = p and f"{fmt(number(p, 'pct_of_ceiling'))} % ({fmt(number(p, 'p50_ms'))} ms per pass)"
    out.append(line("dgemma fp8 pass, B1, % of the copy-bandwidth floor", "-", p and number(p, "pct_of_ceiling"), text))
    return out


def attention_lines(rows: list[dict]) -> list[Line]:
    """The global decoder layer at the longest prefix against the matmul rate; every decoder shape against SDPA.
    bench_attention's shapes begin with the mode and the layer type ("decoder full_attention B1 T256 P32768 ...")."""
    decoder = [r for r in rows if r["op"] == "attention" and r["shape"].startswith("decoder ")]
    glob = [r for r in decoder if r["provider"] == "ours" and r["shape"].startswith("decoder full_attention ")]
    g = next(iter(closest(glob, "P", 32768)), None)
    pct = g and number(g, "pct_of_ceiling")
    text = g and f"{fmt(pct)} % (P={size(g, 'P')})"
    out = [line("attention, global decoder, P=32768, % of the matmul rate", ">= 50 %", pct, text, lambda v: v >= 50)]
    speedups = []
    for r in decoder:
        if r["provider"] == "ours":
            sdpa = [
                number(s, "p50_ms") for s in decoder if s["shape"] == r["shape"] and s["provider"].startswith("sdpa")
            ]
            if sdpa:
                where = " ".join(w for w in r["shape"].split() if not re.fullmatch(r"[A-Za-z]+\d+", w) or w[0] == "P")
                speedups.append((min(sdpa) / number(r, "p50_ms"), where))
    worst = min(speedups, default=None)
    out.append(line("attention, every decoder shape, x the best SDPA backend", ">= 1.5x", worst and worst[0],
                    worst and f"{worst[0]:.2f}x at the slowest ({worst[1]})", lambda v: v >= 1.5))  # fmt: skip
    return out


def moe_lines(rows: list[dict]) -> list[Line]:
    """The experts at T=256 against the copy bandwidth; routing and alignment against the GEMMs."""
    out = []
    for label, fp8, goal in (("bf16", False, 85), ("fp8", True, 80)):
        picked = closest([r for r in rows if r["op"] == "moe" and r["provider"] == "ours"
                          and r["dtype"].startswith("float8") == fp8], "T", 256)  # fmt: skip
        r = picked[0] if picked else None
        text = r and f"{fmt(number(r, 'pct_of_ceiling'))} % (T={size(r, 'T')})"
        out.append(line(f"MoE, {label} banks, T=256, % of the copy bandwidth", f">= {goal} %",
                        r and number(r, "pct_of_ceiling"), text, lambda v, g=goal: v >= g))  # fmt: skip
    picked = closest(
        [r for r in rows if r["op"] == "moe.route+align" and not r["dtype"].startswith("float8")], "T", 256
    )
    r = picked[0] if picked else None
    out.append(line("router + alignment, T=256, % of the GEMM time", "< 10 %", r and number(r, "value"),
                    r and f"{number(r, 'value'):.1f} % (T={size(r, 'T')})", lambda v: v < 10))  # fmt: skip
    return out


def vocab_lines(rows: list[dict]) -> list[Line]:
    """The vocabulary pass against its floor (two reads of E, in the note) and torch.compile; the README sets no
    target for it."""
    r = next(iter(closest([r for r in rows if r["op"] == "vocab" and r["provider"] == "ours"], "R", 256)), None)
    floor = r and re.search(r"floor (\S+) ms", r["note"])
    over = floor and number(r, "p50_ms") / float(floor[1])
    text = over and f"{fmt(over)}x the floor"
    compiled = r and first(rows, op="vocab", provider="torch.compile", shape=r["shape"])
    if over and compiled:
        text += f", {fmt(number(compiled, 'p50_ms') / number(r, 'p50_ms'))}x faster than torch.compile"
    return [line("vocabulary pass, R=256, time over its floor", "-", over or None, text)]


def pytest_lines(outcomes: list[Outcome]) -> list[Line]:
    for o in outcomes:
        if o.name == "pytest":
            counts = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|errors?|deselected).*?)\s*=*$", o.output, re.M)
            text = counts[-1] if counts else o.status
            return [("pytest -m gpu", "all pass", text, "yes" if o.ok and "passed" in text else "no")]
    return []


def summary_lines(rows: list[dict], outcomes: list[Outcome]) -> list[Line]:
    return generate_lines(rows) + attention_lines(rows) + moe_lines(rows) + vocab_lines(rows) + pytest_lines(outcomes)


def environment_lines(outcomes: list[Outcome]) -> list[str]:
    env = next((o for o in outcomes if o.name == "env"), None)
    return [line for line in (env.output.splitlines() if env else []) if line.startswith("- ")]


def write_summary(out: Path, rows: list[dict], outcomes: list[Outcome], dry: bool) -> str:
    lines = ["# GPU check" + (" (dry run: CPU, tiny shapes, numbers meaningless)" if dry else ""), ""]
    lines += [*environment_lines(outcomes), ""]
    lines += ["| check | target | measured | met |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(cells)} |" for cells in summary_lines(rows, outcomes)]
    lines += ["", "| part | status | seconds |", "|---|---|---|"]
    lines += [f"| {o.name} | {o.status} | {o.seconds:.0f} |" for o in outcomes]
    lines += ["", f"{len(rows)} rows in results.csv"]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


# ---------------------------------------------------------------------------------------------------------------
# Rows: the commit, the committed results file


def gather(folder: Path, selected: list[Part], path: Path, commit: str | None) -> list[dict]:
    """The parts' rows, in part order, written to `path`, with `commit` where provenance found no git checkout."""
    rows = [row for part in selected for row in read_rows(folder / f"{part.name}.csv")]
    for row in rows:
        if commit and row["commit"] == "unknown":
            row["commit"] = commit
    write_rows(path, rows, "w")
    return rows


def write_rows(path: Path, rows: list[dict], mode: str) -> None:
    new = mode == "w" or not path.exists()
    with path.open(mode, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def merge(path: Path, into: Path = RESULTS) -> int:
    """Appends the rows of a fetched results.csv that `into` does not hold yet. -> rows appended."""
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path} cannot be read as CSV: {e}") from None
    if reader.fieldnames != FIELDS:
        raise ValueError(f"{path} is not a results file: its columns are {reader.fieldnames}, not {FIELDS}")
    have = {tuple(r.values()) for r in read_rows(into)}
    fresh = [r for r in rows if tuple(r.values()) not in have]
    write_rows(into, fresh, "a")
    return len(fresh)


# ---------------------------------------------------------------------------------------------------------------
# The environment part


def print_environment() -> None:
    """The machine, as `- name: value` lines (summary.md copies them). Versions come from the packages' metadata, so
    that nothing but torch is imported."""
    import importlib.metadata
    import importlib.util
    import platform

    show = lambda name, value: print(f"- {name}: {value}", flush=True)  # noqa: E731
    show("python", f"{platform.python_version()} ({sys.executable})")
    smi = ["nvidia-smi", "--format=csv,noheader", "--query-gpu=name,driver_version,pstate,clocks.sm,clocks.mem,"
           "clocks.max.sm,clocks.max.mem,temperature.gpu,power.draw,power.limit,memory.used,memory.total"]  # fmt: skip
    try:
        show("nvidia-smi", subprocess.run(smi, capture_output=True, text=True, timeout=30).stdout.strip() or "-")
    except (OSError, subprocess.TimeoutExpired) as e:
        show("nvidia-smi", f"not available ({type(e).__name__})")
    import torch

    show("torch", f"{torch.__version__} (CUDA {torch.version.cuda})")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        show("GPU", f"{p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
    for name in ("triton", "transformers", "numpy", "safetensors", "tokenizers"):
        try:
            show(name, importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            show(name, "not installed")
    found = (
        importlib.util.find_spec("transformers.models.diffusion_gemma")
        if importlib.util.find_spec("transformers")
        else None
    )
    show("transformers has DiffusionGemma", "yes" if found else "no: carry the 5.23.0 wheel (make gpu-wheels)")
    show("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "-"))
    show("dgemma", importlib.util.find_spec("dgemma").submodule_search_locations[0])


# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [p.name for p in parts(False, Path("x"))]
    ap.add_argument("--out", type=Path, help="output folder (default: $GPU_CHECK_OUT)")
    ap.add_argument("--dry", action="store_true", help="every part on the CPU at tiny shapes (Triton's interpreter)")
    ap.add_argument("--parts", nargs="+", metavar="PART", help=f"a subset, in this order: {' '.join(names)}")
    ap.add_argument("--budget", type=float, help="seconds for the whole run (default 345; dry 900)")
    ap.add_argument("--jobs", type=int, help="parts at a time (default 1; dry 2): timings need the GPU alone")
    ap.add_argument("--commit", default=os.environ.get("DGEMMA_COMMIT"), help="the checkout's commit, for the rows")
    ap.add_argument("--wheels", type=Path, help="wheels to install first (default: .whl/ when it exists, not dry)")
    ap.add_argument("--merge", type=Path, metavar="CSV", help="append a fetched results.csv to the results file")
    ap.add_argument("--env", action="store_true", help=argparse.SUPPRESS)  # the env part itself
    args = ap.parse_args(argv)
    if args.env or args.merge:
        if args.merge and not args.merge.is_file():
            ap.error(f"--merge {args.merge}: no such file")
        return args
    if args.out is None:
        value = os.environ.get("GPU_CHECK_OUT")
        if value is not None and not value.strip():
            ap.error("GPU_CHECK_OUT is set but empty: give it a folder, or pass --out")
        if value is None:
            ap.error('pass --out DIR (on the GPU machine: --out "$OUT") or set GPU_CHECK_OUT')
        args.out = Path(value)
    if args.out.exists() and not args.out.is_dir():
        ap.error(f"--out {args.out} is a file, not a folder")
    if args.out.resolve() in (ROOT, RESULTS.parent.resolve()):
        ap.error(f"--out {args.out}: give the run a folder of its own")
    if args.parts and (unknown := sorted(set(args.parts) - set(names))):
        ap.error(f"unknown parts {unknown}; the parts are {' '.join(names)}")
    args.budget = BUDGET[args.dry] if args.budget is None else args.budget
    if not 0 < args.budget < math.inf:
        ap.error(f"--budget {args.budget}: a positive number of seconds")
    args.jobs = (2 if args.dry else 1) if args.jobs is None else args.jobs
    if args.jobs < 1 or (args.jobs > 1 and not args.dry):
        ap.error(f"--jobs {args.jobs}: 1, or more with --dry only (parts timed together disturb each other)")
    if args.wheels is not None and not sorted(args.wheels.glob("*.whl")):
        ap.error(f"--wheels {args.wheels}: no .whl files there")
    if args.commit is not None and not re.fullmatch(r"[0-9a-f]{4,40}(-dirty)?", args.commit):
        ap.error(f"--commit {args.commit!r}: a hexadecimal commit id, optionally with -dirty")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.env:
        print_environment()
        return 0
    if args.merge:
        try:
            print(f"{merge(args.merge)} rows appended to {RESULTS}")
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    gpu = "import torch, sys; sys.exit(not torch.cuda.is_available())"
    if not args.dry and subprocess.run([sys.executable, "-c", gpu]).returncode != 0:
        print("error: torch sees no CUDA GPU here; --dry runs the same parts on the CPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for name in OUT_FILES:  # a rerun into the same folder starts clean
        (args.out / name).unlink(missing_ok=True)
    gpu_env.importable()
    gpu_env.answering_git()
    if args.dry:
        os.environ["TRITON_INTERPRET"] = "1"  # before any child imports a kernel
    else:
        wheels = args.wheels or (gpu_env.WHEELS if gpu_env.WHEELS.is_dir() else None)
        if wheels is not None:
            try:
                print(f"installed {', '.join(gpu_env.install_wheels(wheels))}", flush=True)
            except subprocess.CalledProcessError as e:
                print(f"FAILED to install the wheels in {wheels} ({e}): parts needing them will fail", file=sys.stderr)
    os.environ["PYTHONUNBUFFERED"] = "1"
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-rows-"))  # one file per part: dry parts run side by side
    selected = [p for p in parts(args.dry, scratch) if args.parts is None or p.name in args.parts]
    with (args.out / "log.txt").open("w") as log:
        outcomes = run_all(selected, args.budget, args.jobs, log)
    rows = gather(scratch, selected, args.out / "results.csv", args.commit)
    shutil.rmtree(scratch, ignore_errors=True)
    if rows and not args.dry:
        write_rows(RESULTS, rows, "a")
        print(f"{len(rows)} rows appended to {RESULTS}")
    print("\n" + write_summary(args.out, rows, outcomes, args.dry), flush=True)
    failed = [o.name for o in outcomes if not o.ok]
    if failed:
        print(f"FAILED: {' '.join(failed)} (their output is in {args.out / 'log.txt'})", file=sys.stderr)
    return int(bool(failed))


if __name__ == "__main__":
    sys.exit(main())
