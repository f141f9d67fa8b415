"""Serving throughput and latency: `dgemma serve` under 1, 2, 4, 8 and 16 concurrent clients (the openai client on
loopback), each client sending its next request as soon as the last one has answered.

    python benchmarks/bench_serve.py                          # starts `dgemma serve` (the shipped Sudoku model)
    python benchmarks/bench_serve.py --model DIR --max-batch 16 --threads 1
    python benchmarks/bench_serve.py --url http://127.0.0.1:8000 --api-key KEY   # a server that is running
    python benchmarks/bench_serve.py --smoke --out /tmp/rows.csv                  # plumbing only
    python benchmarks/bench_serve.py --memory                 # what one more concurrent request costs

A checkpoint without the chat format (the Sudoku models) gets held-out puzzles on /v1/completions; one with it gets
chat questions of one canvas each. Rows (op "serve", one per concurrency) go to benchmarks/results/results.csv:
latency p50/p20/p80 in ms; the value in requests/s; the ceiling is the concurrency times the one-client rate of the
same run (linear scaling), so pct_of_ceiling is the scaling efficiency; the note has p99, completion tokens/s, the
mean rows per decoder pass (from /metrics), the errors (0 unless the server refused or failed something) and the
machine's load.

--memory prints what one more concurrent request costs at the real vocabulary (262,144) and canvas (256): its KV
cache at the real config, computed from the cache's own allocation (a KVCache on the meta device), and, measured, the
engine's shared sampler buffers and the resident memory each further row adds to a row engine that has the real
vocabulary and canvas but a 64-wide, two-layer model.
"""

from __future__ import annotations

import argparse
import http.client
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import openai
import torch
from rich.console import Console
from rich.table import Table

from dgemma.model.cache import KVCache
from dgemma.model.config import FULL, SLIDING, Config
from dgemma.model.model import DiffusionGemma
from dgemma.runtime.rows import RowEngine
from dgemma.runtime.sampler import SamplingConfig
from dgemma.sudoku import board

from harness import RESULTS, append_rows, provenance, result_row

CONCURRENCY = (1, 2, 4, 8, 16)
QUESTIONS = ["Why is the sky blue?", "Name three prime numbers.", "What is a canvas?", "Say hello in French."]


def start_server(args) -> tuple[subprocess.Popen, str]:
    """`dgemma serve` on a free loopback port -> (process, base URL), once /health answers."""
    cmd = [sys.executable, "-m", "dgemma", "serve", "--port", "0", "--max-batch", str(args.max_batch),
           "--threads", str(args.threads)] + (["--model", args.model] if args.model else [])  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    while "serving" not in line:
        if not line:
            raise RuntimeError(f"dgemma serve exited with status {proc.wait()}")
        line = proc.stdout.readline()
    url = line.split(" on ")[1].split("/v1")[0]
    for _ in range(600):
        try:
            if health(url):
                return proc, url
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url}/health did not answer")


def health(url: str) -> bool:
    conn = http.client.HTTPConnection(urlsplit(url).hostname, urlsplit(url).port, timeout=5)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    finally:
        conn.close()


def pass_counters(url: str, key: str | None) -> tuple[float, float]:
    """(decoder passes, rows over them) from the server's /metrics."""
    conn = http.client.HTTPConnection(urlsplit(url).hostname, urlsplit(url).port, timeout=30)
    conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {key}"} if key else {})
    values = {}
    for line in conn.getresponse().read().decode().splitlines():
        name, _, value = line.partition(" ")
        values[name] = value
    conn.close()
    return float(values["dgemma_decoder_passes_total"]), float(values["dgemma_decoder_rows_total"])


def workload(client: openai.OpenAI, card: dict, count: int, seed: int):
    """`count` request functions (each -> its completion tokens) for the served model."""
    name, chat = card["id"], card["chat"]
    if chat:
        prompts = [QUESTIONS[i % len(QUESTIONS)] for i in range(count)]
    else:  # held-out puzzles; a Sudoku canvas holds n*n cells and <eos>
        n = math.isqrt(card["canvas_length"] - 1)
        prompts = [f"<bos>{board.fmt(p)}<sep>" for p, _ in board.held_out(n, count, seed)]

    def request(i: int) -> int:
        if chat:
            messages, C = [{"role": "user", "content": prompts[i]}], card["canvas_length"]
            out = client.chat.completions.create(model=name, messages=messages, seed=i, max_tokens=C)
        else:
            out = client.completions.create(model=name, prompt=prompts[i], seed=i)
        return out.usage.completion_tokens

    return [lambda i=i: request(i) for i in range(count)]


def level(requests, concurrency: int) -> dict:
    """The requests run by `concurrency` clients -> latencies (s), wall time, tokens, errors."""

    def timed(request):
        start = time.perf_counter()
        try:
            tokens, error = request(), None
        except openai.OpenAIError as e:  # counted, not fatal: the row reports the errors
            tokens, error = 0, e
        return time.perf_counter() - start, tokens, error

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(timed, requests))
    wall = time.perf_counter() - start
    latencies = sorted(t for t, _, e in results if e is None)
    return {
        "wall": wall, "latencies": latencies, "tokens": sum(n for _, n, _ in results),
        "errors": sum(e is not None for _, _, e in results), "count": len(results),
    }  # fmt: skip


def quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))] if sorted_values else math.nan


def rss() -> int:
    """Resident bytes of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory(console: Console) -> None:
    real = Config.diffusiongemma_26b_a4b()
    C, V, D, MB = real.canvas_length, real.vocab_size, real.hidden_size, 1e6
    table = Table("what", "how", "MB", title=f"one more concurrent request, real config (C={C}, V={V}, D={D}, bf16)")
    for prompt in (1024, 4096, 32768):
        cache = KVCache(real, 1, prompt + C, dtype=torch.bfloat16, device="meta")
        size = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
        table.add_row(f"KV cache, prompt {prompt} + one canvas", "computed", f"{size / MB:.1f}")
    state = C * D * 2 + 3 * C * 8  # the soft embedding (C, D) bf16; canvas, argmax, history (C,) int64
    table.add_row("row state: soft embedding, canvas, argmax, history", "computed", f"{state / MB:.2f}")
    table.add_row("vLLM's per-request sampler state, C x V fp32", "computed", f"{C * V * 4 / MB:.1f}")
    config = Config.tiny(
        vocab_size=V, canvas_length=C, max_position_embeddings=2 * C + 64, num_hidden_layers=2,
        layer_types=[SLIDING, FULL],
    )  # fmt: skip
    torch.manual_seed(0)
    model = DiffusionGemma(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    cfg = SamplingConfig(max_new_tokens=C, max_denoising_steps=8, confidence_threshold=0.0)
    engine = RowEngine(model, max_batch=8)
    shared = sum(t.numel() * t.element_size() for t in (engine.scores.logp, engine.scores.probs, engine.logits))
    table.add_row("engine's sampler buffers, 3 x C x V fp32, shared by all rows", "measured", f"{shared / MB:.1f}")
    rows = [engine.row(list(range(10, 74)), cfg, seed=i) for i in range(8)]
    engine.add(rows[0])
    engine.step()  # every buffer touched
    one = rss()
    for row in rows[1:]:
        engine.add(row)
    engine.step()
    per_row = (rss() - one) / 7
    table.add_row("resident memory per further row (tiny model, real V and C)", "measured", f"{per_row / MB:.1f}")
    console.print(table)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (default: start `dgemma serve` on a free port)")
    ap.add_argument("--api-key", default=os.environ.get("DGEMMA_API_KEY"))
    ap.add_argument("--model", help="checkpoint folder for the server this script starts (default: shipped Sudoku)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    ap.add_argument("--requests", type=int, help="requests per concurrency (default: max(32, 4 x concurrency))")
    ap.add_argument("--device", default="cpu", help="where the server runs, for the rows' provenance")
    ap.add_argument("--smoke", action="store_true", help="concurrency 1 and 2, four requests each: the plumbing")
    ap.add_argument("--memory", action="store_true", help="print the memory one more request costs, then exit")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.memory:
        memory(Console())
        return 0
    if args.smoke:
        args.concurrency, args.requests = [1, 2], 4
    console = Console()
    proc, url = start_server(args) if args.url is None else (None, args.url.rstrip("/"))
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key=args.api_key or "unused", max_retries=0, timeout=600)
        card = client.models.list().data[0].model_dump()
        meta = provenance(torch.device(args.device))
        table = Table("clients", "requests", "req/s", "tok/s", "p50 ms", "p99 ms", "rows/pass", "errors")
        rows, single = [], None
        for c in args.concurrency:
            count = args.requests or max(32, 4 * c)
            before = pass_counters(url, args.api_key)
            got = level(workload(client, card, count, seed=c), c)
            after = pass_counters(url, args.api_key)
            passes, row_passes = after[0] - before[0], after[1] - before[1]
            rate = (got["count"] - got["errors"]) / got["wall"]
            single = single or rate / c
            lat = got["latencies"]
            times = tuple(1e3 * quantile(lat, q) for q in (0.5, 0.2, 0.8))
            occupancy = row_passes / passes if passes else math.nan
            note = (
                f"{count} requests; p99 {1e3 * quantile(lat, 0.99):.1f} ms; {got['tokens'] / got['wall']:.1f} "
                f"completion tok/s; {occupancy:.2f} rows per decoder pass; {got['errors']} errors; "
                f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
            )
            rows.append(result_row(
                meta, op="serve", provider=f"dgemma serve max_batch={args.max_batch} threads={args.threads}",
                shape=f"clients={c} model={card['id']} C={card['canvas_length']}", dtype=card["dtype"], times=times,
                unit="req/s", value=rate, ceiling=single * c, note=note,
            ))  # fmt: skip
            table.add_row(str(c), str(count), f"{rate:.1f}", f"{got['tokens'] / got['wall']:.1f}", f"{times[0]:.0f}",
                          f"{1e3 * quantile(lat, 0.99):.0f}", f"{occupancy:.2f}", str(got["errors"]))  # fmt: skip
        append_rows(rows, args.out, table, console)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
