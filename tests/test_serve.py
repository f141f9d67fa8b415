"""`dgemma serve` with the shipped Sudoku model (what it serves without --model), driven by the openai client: the
completions endpoint, streams and drafts, seeded output equal to `Pipeline.generate` alone, concurrent requests
sharing passes, every refusal with its status and error object, the queue limit, disconnects, a failing request
among others, a bounded load test, and the command line."""

import csv
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch

from dgemma.cli import main, parser
from dgemma.runtime.rows import RowEngine
from dgemma.serve.cli import load_service
from dgemma.sudoku import board

from serving import LiveServer, events

ROOT = Path(__file__).resolve().parents[1]
NAME = "sudoku-4x4"
PUZZLES = ["0024000000020300", "1000000200030004", "0000000000000000", "1200340000000000", "0300000100040020"]


def text_prompt(puzzle: str) -> str:
    return f"<bos>{puzzle}<sep>"  # the Sudoku tokenizer maps its specials: the ids of board.prompt_ids


def serve_args(*options):
    return parser().parse_args(["serve", *options])


@pytest.fixture(scope="module")
def server():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the references below run in this thread, with the engine's one thread
    live = LiveServer(load_service(serve_args("--max-batch", "8")))
    yield live
    live.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def alone(server, puzzle, seed, **sampling):
    return server.service.pipe.generate(text_prompt(puzzle), chat=False, seed=seed, **sampling)


def test_the_prompt_string_is_the_boards_prompt(server):
    for puzzle in PUZZLES:
        ids = server.service.pipe.prompt_ids(text_prompt(puzzle), chat=False)[0]
        assert ids == board.prompt_ids(board.parse(puzzle))


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list()] == [NAME]
    status, _, body = server.request("GET", "/health")
    assert status == 200 and body["status"] == "ok"
    status, headers, text = server.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    names = ["requests_total", "decoder_passes_total", "decoder_rows_total", "encoder_passes_total",
             "batch_rows_bucket", "queue_length", "running_rows", "time_to_first_canvas_seconds_bucket",
             "request_seconds_bucket"]  # fmt: skip
    assert all(f"dgemma_{name}" in text for name in names)


@pytest.mark.parametrize("seed", [0, 7])
def test_completion_equals_pipeline_generate(server, client, seed):
    out = client.completions.create(
        model=NAME, prompt=text_prompt(PUZZLES[0]), seed=seed, extra_body={"return_token_ids": True}
    )
    ref = alone(server, PUZZLES[0], seed)
    choice = out.choices[0]
    assert choice.text == ref.text and choice.token_ids == ref.tokens[0] and choice.finish_reason == "stop"
    assert out.usage.prompt_tokens == 18 and out.usage.completion_tokens == 17 == len(ref.tokens[0])
    grid = [int(c) for c in choice.text]
    assert board.keeps_clues(grid, board.parse(PUZZLES[0]))


def test_token_id_prompt_pinned_givens_and_warm_start(server, client):
    cells = board.parse(PUZZLES[1])
    ids = board.prompt_ids(cells)
    pinned = [board.DIGIT0 + c if c else -1 for c in cells]
    warm = [board.DIGIT0 + i % 5 for i in range(17)]
    out = client.completions.create(
        model=NAME, prompt=ids, seed=3, max_tokens=17,
        extra_body={"pinned": pinned, "warm_start": warm, "max_denoising_steps": 6, "return_token_ids": True},
    )  # fmt: skip
    ref = server.service.pipe.generate([ids], seed=3, pinned=pinned, warm_start=warm, max_denoising_steps=6)
    assert out.choices[0].token_ids == ref.tokens[0]
    assert all(out.choices[0].token_ids[i] == t for i, t in enumerate(pinned) if t >= 0)


def test_stream_chunks_drafts_and_usage(server, client):
    drafts = []
    ref = alone(server, PUZZLES[3], 5, on_draft=drafts.append)
    stream = client.completions.create(
        model=NAME, prompt=text_prompt(PUZZLES[3]), seed=5, stream=True,
        stream_options={"include_usage": True, "include_drafts": True},
    )  # fmt: skip
    got = list(stream)
    seen = [c for c in got if getattr(c, "object", None) == "dgemma.draft"]
    chunks = [c for c in got if c.object == "text_completion"]
    assert [(d.canvas, d.step, d.token_ids) for d in seen] == [(d.canvas, d.step, d.argmax[0].tolist()) for d in drafts]
    assert [d.accepted for d in seen] == [int(d.accepted.sum()) for d in drafts]
    assert seen[-1].done and seen[-1].text == ref.text  # the last draft is the committed canvas
    assert len(chunks) == 3  # one per committed canvas, the finish, the usage
    assert chunks[0].choices[0].text == ref.text and chunks[1].choices[0].finish_reason == "stop"
    assert chunks[2].choices == [] and chunks[2].usage.completion_tokens == 17


def test_stream_wire_format(server):
    body = {"model": NAME, "prompt": text_prompt(PUZZLES[0]), "seed": 1, "stream": True,
            "stream_options": {"include_drafts": True}}  # fmt: skip
    status, headers, text = server.request("POST", "/v1/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    sent = events(text)
    assert sent[-1] == (None, "[DONE]")
    names = [name for name, _ in sent[:-1]]
    assert names[: names.index(None)] == ["draft"] * names.index(None)  # drafts first, then the canvas's chunk
    draft = json.loads(sent[0][1])
    assert set(draft) == {"id", "object", "created", "model", "canvas", "step", "accepted", "changed", "done",
                          "text", "token_ids"}  # fmt: skip


def pass_counters(server) -> tuple[float, float]:
    """The server's decoder pass counter and its rows over those passes, from /metrics."""
    text = server.request("GET", "/metrics")[2]
    values = dict(line.split(" ") for line in text.splitlines() if line.startswith("dgemma_decoder_"))
    return float(values["dgemma_decoder_passes_total"]), float(values["dgemma_decoder_rows_total"])


def test_concurrent_streams_equal_alone_and_share_passes(server, client):
    """8 streaming clients at once, each with its own seed and sampling parameters: every one gets the tokens it
    gets alone, while the engine ran fewer decoder passes than the rows it denoised."""
    requests = [
        (
            PUZZLES[i % len(PUZZLES)],
            10 + i,
            [{}, {"t_min": 0.5, "t_max": 1.0}, {"max_denoising_steps": 5}, {"entropy_bound": 0.5}][i % 4],
        )  # fmt: skip
        for i in range(8)
    ]
    before = pass_counters(server)
    start = threading.Barrier(len(requests))

    def run(request):
        puzzle, seed, extra = request
        start.wait()
        stream = client.completions.create(
            model=NAME, prompt=text_prompt(puzzle), seed=seed, stream=True,
            extra_body={**extra, "return_token_ids": True},
        )  # fmt: skip
        return [t for chunk in stream if chunk.choices for t in getattr(chunk.choices[0], "token_ids", [])]

    with ThreadPoolExecutor(len(requests)) as pool:
        got = list(pool.map(run, requests))
    server.wait_idle()
    after = pass_counters(server)
    passes, rows = after[0] - before[0], after[1] - before[1]
    for (puzzle, seed, extra), tokens in zip(requests, got, strict=True):
        assert tokens == alone(server, puzzle, seed, **extra).tokens[0]
    assert rows >= 8 * 4 and passes < rows / 2  # the rows shared passes


BAD = [
    ("/v1/completions", {"model": "gpt-4o", "prompt": "x"}, 400, "model", "model_not_found"),
    ("/v1/completions", {"prompt": "x"}, 400, "model", "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": "<bos>0000<sep>", "max_tokens": 100}, 400, "max_tokens",
     "context_length_exceeded"),
    ("/v1/completions", {"model": NAME, "prompt": "0" * 400}, 400, "prompt", None),  # more than the 68 positions
    ("/v1/completions", {"model": NAME, "prompt": ""}, 400, "prompt", None),
    ("/v1/completions", {"model": NAME, "prompt": []}, 400, "prompt", None),
    ("/v1/completions", {"model": NAME, "prompt": ["a", "b"]}, 400, "prompt", None),
    ("/v1/completions", {"model": NAME, "prompt": [2, 99]}, 400, "prompt", None),  # outside the 14 tokens
    ("/v1/completions", {"model": NAME, "prompt": "x", "n": 2}, 400, "n", "unsupported_parameter"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "best_of": 3}, 400, "best_of", "unsupported_parameter"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "top_p": 0.9}, 400, "top_p", "unsupported_parameter"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "logprobs": 2}, 400, "logprobs", "unsupported_parameter"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "echo": True}, 400, "echo", "unsupported_parameter"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "suffix": "y"}, 400, "suffix", "unsupported_parameter"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty",
     "unsupported_parameter"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "frequency_penalty": 1}, 400, "frequency_penalty",
     "unsupported_parameter"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "logit_bias": {"5": 1}}, 400, "logit_bias",
     "unsupported_parameter"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "temperature": 0}, 400, "temperature", None),
    ("/v1/completions", {"model": NAME, "prompt": "x", "temperature": 1, "t_min": 0.1}, 400, "temperature", None),
    ("/v1/completions", {"model": NAME, "prompt": "x", "thinking": True}, 400, "thinking", "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "foo": 1}, 400, "foo", "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "seed": -1}, 400, "seed", "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "seed": 2**63}, 400, "seed", "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "stream": "yes"}, 400, "stream", "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "max_denoising_steps": 0}, 400, "max_denoising_steps",
     "invalid_value"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "max_denoising_steps": 10**6}, 400, "max_denoising_steps",
     None),
    ("/v1/completions", {"model": NAME, "prompt": "x", "entropy_bound": -1}, 400, "entropy_bound", None),
    ("/v1/completions", {"model": NAME, "prompt": "x", "t_min": 0.9, "t_max": 0.5}, 400, "t_min", None),
    ("/v1/completions", {"model": NAME, "prompt": "x", "warm_start": [1, 2]}, 400, "warm_start", None),
    ("/v1/completions", {"model": NAME, "prompt": "x", "warm_start": [99] * 17}, 400, "warm_start", None),
    ("/v1/completions", {"model": NAME, "prompt": "x", "pinned": [99]}, 400, "pinned", None),
    ("/v1/completions", {"model": NAME, "prompt": "x", "allowed": {"40": [5]}}, 400, "allowed", None),
    ("/v1/completions", {"model": NAME, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ("/v1/completions", {"model": NAME, "prompt": "x", "stop": [""]}, 400, "stop", None),
    ("/v1/completions", {"model": NAME, "prompt": "x", "stream_options": {"include_usage": True}}, 400,
     "stream_options", None),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}]}, 400, "messages",
     None),  # the Sudoku tokenizer has no chat format
    ("/v1/chat/completions", {"model": NAME, "messages": []}, 400, "messages", "invalid_value"),
    ("/v1/completions", b"{not json", 400, None, None),
]  # fmt: skip


@pytest.mark.parametrize("path, body, status, param, code", BAD)
def test_bad_requests_are_refused_with_an_error_object(server, path, body, status, param, code):
    got, _, answer = server.request("POST", path, body)
    assert got == status, answer
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["message"]
    assert answer["error"]["param"] == param and answer["error"]["code"] == code
    assert "Traceback" not in json.dumps(answer)


def test_routes_methods_and_body_limit(server):
    assert server.request("GET", "/nowhere")[0] == 404
    status, _, answer = server.request("GET", "/v1/completions")
    assert status == 405 and answer["error"]["code"] == "method_not_allowed"
    big = {"model": NAME, "prompt": "0" * (1 << 20)}
    status, _, answer = server.request("POST", "/v1/completions", big)
    assert status == 413 and answer["error"]["code"] == "request_too_large"
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)  # chunked: no Content-Length to check
    conn.request("POST", "/v1/completions", body=iter([b"x" * 65536] * 20), encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
    conn.close()


def slow(puzzle=PUZZLES[2], steps=400):
    """A request that runs `steps` denoising steps (it never counts as confident)."""
    return {"model": NAME, "prompt": text_prompt(puzzle), "stream": True, "max_denoising_steps": steps,
            "confidence_threshold": 0.0, "stream_options": {"include_drafts": True}}  # fmt: skip


def open_stream(port, body):
    """A streaming request whose response has started (its row is running or queued); the caller closes it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    return conn, response


def wait_for(condition, timeout=10):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_disconnect_frees_the_row(server):
    engine = server.service.engine
    conn, response = open_stream(server.port, slow())
    response.readline()  # the first draft: the row is running
    row = engine.running[0]
    conn.close()
    wait_for(lambda: engine.idle)
    assert row.cancelled and int(row.passes) < 200  # dropped long before its 400 steps

    body = dict(slow(), stream=False, stream_options=None)  # a plain request: its closed connection is noticed too
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    wait_for(lambda: engine.running)
    row = engine.running[0]
    conn.close()
    wait_for(lambda: engine.idle)
    assert row.cancelled and int(row.passes) < 200


def test_full_queue_answers_429():
    live = LiveServer(load_service(serve_args("--max-batch", "1", "--max-queue", "1")))
    try:
        running = open_stream(live.port, slow())
        running[1].readline()
        queued = open_stream(live.port, slow(PUZZLES[0]))
        status, headers, answer = live.request("POST", "/v1/completions", {"model": NAME, "prompt": "x"})
        assert status == 429 and headers["retry-after"] == "1"
        assert answer["error"]["type"] == "rate_limit_error" and answer["error"]["code"] == "queue_full"
        for conn, _ in (running, queued):
            conn.close()
        live.wait_idle()
        status, _, answer = live.request("POST", "/v1/completions", {"model": NAME, "prompt": "x", "seed": 0})
        assert status == 200
    finally:
        live.close()


def test_a_failing_request_leaves_the_others_running(server, client, monkeypatch):
    advance = RowEngine._advance

    def failing(self, row, out):
        if row.seed == 13:
            raise RuntimeError("injected failure")
        return advance(self, row, out)

    monkeypatch.setattr(RowEngine, "_advance", failing)
    seeds = [11, 13, 12]
    with ThreadPoolExecutor(3) as pool:
        answers = list(
            pool.map(
                lambda s: server.request(
                    "POST", "/v1/completions", {"model": NAME, "prompt": text_prompt(PUZZLES[0]), "seed": s}
                ),  # fmt: skip
                seeds,
            )
        )
    status, _, failed = answers[1]
    assert status == 500 and failed["error"]["code"] == "internal_error"
    assert "injected" not in json.dumps(failed) and "Traceback" not in json.dumps(failed)
    for seed, (status, _, answer) in zip(seeds, answers, strict=True):
        if seed != 13:
            assert status == 200 and answer["choices"][0]["text"] == alone(server, PUZZLES[0], seed).text
    stream = slow(steps=4) | {"seed": 13}
    status, _, text = server.request("POST", "/v1/completions", stream)
    sent = events(text)
    assert json.loads(sent[-2][1])["error"]["code"] == "internal_error" and sent[-1] == (None, "[DONE]")


def test_load_200_requests_from_16_clients(server, client):
    """No errors and nothing lost under a bounded load; the numbers go to the README (benchmarks/bench_serve.py
    measures them)."""
    before = server.service.metrics.prompt_tokens._value.get()

    def one(i):
        start = time.perf_counter()
        out = client.completions.create(model=NAME, prompt=text_prompt(PUZZLES[i % len(PUZZLES)]), seed=i)
        return time.perf_counter() - start, out.choices[0]

    start = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(200)))
    elapsed = time.perf_counter() - start
    assert elapsed < 120
    assert all(len(c.text) == 16 and c.finish_reason == "stop" for _, c in results)
    assert server.service.metrics.prompt_tokens._value.get() - before == 200 * 18
    latency = sorted(t for t, _ in results)
    print(f"200 requests: {200 / elapsed:.1f} req/s, p50 {latency[99]:.3f} s, p99 {latency[197]:.3f} s")


def test_cli_refusals(capsys):
    for argv, fragment in (
        (["serve", "--port", "70000"], "port number"),
        (["serve", "--max-batch", "0"], "positive integer"),
        (["serve", "--backend", "cuda-magic"], "invalid choice"),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and fragment in capsys.readouterr().err
    with LiveServerPort() as port:  # an address in use: one error line, status 2
        assert main(["serve", "--port", str(port)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: cannot listen on 127.0.0.1:") and len(err.splitlines()) == 1


class LiveServerPort:
    """A port something already listens on."""

    def __enter__(self):
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        return self.sock.getsockname()[1]

    def __exit__(self, *exc):
        self.sock.close()


def test_cli_serves_until_interrupted(tmp_path):
    """`dgemma serve` in its own process, on a free port: curl's request, then Ctrl-C stops it cleanly."""
    env = dict(os.environ, DGEMMA_API_KEY="secret", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dgemma", "serve", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=env,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        while "serving" not in line:
            assert line, "the server exited"
            line = proc.stdout.readline()
        port = int(line.split("127.0.0.1:")[1].split("/")[0])
        for _ in range(300):
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                assert conn.getresponse().status == 200
                break
            except ConnectionRefusedError:
                time.sleep(0.1)
        key = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="secret", max_retries=0)
        assert len(key.completions.create(model=NAME, prompt=text_prompt(PUZZLES[0]), seed=0).choices[0].text) == 16
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


def test_bench_serve_smoke(server, tmp_path):
    """benchmarks/bench_serve.py --smoke against this server: a complete results row per concurrency."""
    out = tmp_path / "rows.csv"
    cmd = [sys.executable, ROOT / "benchmarks" / "bench_serve.py", "--smoke", "--url", server.url, "--out", out]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert [row["shape"] for row in rows] == [f"clients={c} model={NAME} C=17" for c in (1, 2)]
    for row in rows:
        assert row["op"] == "serve" and row["unit"] == "req/s" and float(row["value"]) > 0 and row["dtype"] == "float32"
        assert 0 < float(row["p20_ms"]) <= float(row["p50_ms"]) <= float(row["p80_ms"])
        assert "4 requests" in row["note"] and "; 0 errors;" in row["note"]
