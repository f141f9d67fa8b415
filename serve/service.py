"""The engine behind the HTTP layer: one thread owns the model and its RowEngine (runtime/rows.py); requests enter
through a bounded queue and get their events back on their own asyncio queue.

`Service.prepare` turns a validated OpenAI body into a generation request (the field mapping the README documents),
`Job` runs one request: its row in the engine, the drafts and committed canvases the engine thread posts back, and
the text so far (cut at max_tokens tokens, the first stop id and the first stop string).
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import secrets
import threading
import time
from dataclasses import dataclass

import torch

from ..errors import DgemmaError
from ..model.tokenizer import CONTROL
from ..runtime.pipeline import Draft, Pipeline
from ..runtime.rows import Row, RowEngine
from ..runtime.sampler import SamplingConfig
from .metrics import Metrics
from .protocol import MAX_STOPS, ChatRequest, Common, CompletionRequest, refusals

log = logging.getLogger("dgemma.serve")

SAMPLING = ("max_denoising_steps", "entropy_bound", "t_min", "t_max", "confidence_threshold", "stability_threshold")


class ApiError(Exception):
    """A request the server refuses or cannot complete, as an HTTP status and an OpenAI error object."""

    def __init__(self, status: int, message: str, *, kind="invalid_request_error", param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(message: str, param=None, code=None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class Prepared:
    """A checked generation request."""

    chat: bool
    prompt: list[int]
    cfg: SamplingConfig
    seed: int
    max_tokens: int
    stops: list[str]
    warm_start: list[int] | None
    pinned: list[int] | None
    allowed: dict[int, list[int]] | None
    stream: bool
    usage: bool  # stream_options.include_usage
    drafts: bool  # stream_options.include_drafts
    token_ids: bool  # return_token_ids


class Service:
    """A Pipeline served by one engine thread, at most `max_batch` rows per decoder pass and `max_queue` requests
    waiting for a row."""

    def __init__(self, pipe: Pipeline, name: str, *, max_batch: int = 8, max_queue: int = 64, threads: int = 1):
        if pipe.tokenizer is None:
            raise DgemmaError("serving needs the checkpoint's tokenizer.json")
        self.pipe, self.name, self.threads = pipe, name, threads
        self.engine = RowEngine(pipe.model, max_batch)
        self.metrics = Metrics(max_batch)
        self.pending: queue.Queue[Row] = queue.Queue(max_queue)
        self.chat = has_chat_format(pipe)
        self.defaults = pipe.sampling_config()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="dgemma-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops the engine thread; requests still running or queued end with an error."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        error = DgemmaError("the server is shutting down")
        self.engine.abort(error)
        while True:
            try:
                self.engine.abort(error, [self.pending.get_nowait()])
            except queue.Empty:
                break

    def submit(self, row: Row) -> None:
        try:
            self.pending.put_nowait(row)
        except queue.Full:
            raise ApiError(
                429, f"{self.pending.maxsize} requests are waiting already (--max-queue): retry shortly",
                kind="rate_limit_error", code="queue_full", headers={"Retry-After": "1"},
            ) from None  # fmt: skip
        self.metrics.queued.set(self.pending.qsize())

    def _run(self) -> None:
        """The engine loop: rows join from the queue while there is room, then one step of every active row."""
        torch.set_num_threads(self.threads)
        engine, m = self.engine, self.metrics
        while not self._stop.is_set():
            while engine.free > 0:
                try:
                    engine.add(self.pending.get(timeout=0.1) if engine.idle else self.pending.get_nowait())
                except queue.Empty:
                    break
            m.queued.set(self.pending.qsize())
            if engine.idle:
                continue
            passes, rows, encoder = engine.decoder_passes, engine.decoder_rows, engine.encoder_passes
            try:
                engine.step()
            except Exception as e:  # a bug in the engine itself: its rows fail, the server keeps serving
                log.exception("engine step failed")
                engine.abort(e)
            m.decoder_passes.inc(engine.decoder_passes - passes)
            m.decoder_rows.inc(engine.decoder_rows - rows)
            m.encoder_passes.inc(engine.encoder_passes - encoder)
            if engine.decoder_rows > rows:
                m.batch_rows.observe(engine.decoder_rows - rows)
            m.running.set(len(engine.running))

    def prepare(self, body: Common) -> Prepared:
        """The generation an OpenAI body asks for, or a 400 naming the field."""
        chat = isinstance(body, ChatRequest)
        if body.model != self.name:
            raise ApiError(400, f"model {body.model!r} is not served here; this server serves {self.name!r} "
                           "(GET /v1/models)", param="model", code="model_not_found")  # fmt: skip
        if refused := refusals(body):
            raise bad(refused[1], refused[0], "unsupported_parameter")
        prompt = self._prompt(body) if chat else self._completion_prompt(body)
        max_tokens = body.max_tokens
        if chat and body.max_completion_tokens is not None:
            if max_tokens is not None and max_tokens != body.max_completion_tokens:
                raise bad("max_tokens and max_completion_tokens differ: set one", "max_completion_tokens")
            max_tokens = body.max_completion_tokens
        max_tokens = max_tokens or self.defaults.max_new_tokens
        C, positions = self.pipe.model.config.canvas_length, self.pipe.model.config.max_position_embeddings
        if (need := len(prompt) + math.ceil(max_tokens / C) * C) > positions:
            raise bad(
                f"a prompt of {len(prompt)} tokens and max_tokens={max_tokens} (rounded up to whole canvases of {C}) "
                f"need {need} positions; the model has {positions}", "max_tokens", "context_length_exceeded",
            )  # fmt: skip
        overrides = {name: getattr(body, name) for name in SAMPLING}
        if body.temperature is not None:
            if body.t_min is not None or body.t_max is not None:
                raise bad("set temperature or t_min/t_max, not both: temperature scales the schedule", "temperature")
            if body.temperature <= 0:
                why = "it scales the checkpoint's temperature schedule (t_min, t_max); the sampler has no greedy mode"
                raise bad(f"temperature must be positive, not {body.temperature}: {why}", "temperature")
            overrides["t_min"] = self.defaults.t_min * body.temperature
            overrides["t_max"] = self.defaults.t_max * body.temperature
        try:
            cfg = self.pipe.sampling_config(max_new_tokens=max_tokens, **overrides)
        except DgemmaError as e:
            raise bad(str(e), next((n for n in SAMPLING if n in str(e)), None)) from None
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > MAX_STOPS or not all(stops):
            raise bad(f"stop is at most {MAX_STOPS} non-empty strings, not {body.stop!r}", "stop")
        options = body.stream_options
        if options is not None and not body.stream:
            raise bad("stream_options is only for stream=true", "stream_options")
        return Prepared(
            chat, prompt, cfg, secrets.randbelow(2**63) if body.seed is None else body.seed, max_tokens, stops,
            body.warm_start, body.pinned, body.allowed, bool(body.stream), bool(options and options.include_usage),
            bool(options and options.include_drafts), bool(body.return_token_ids),
        )  # fmt: skip

    def _prompt(self, body: ChatRequest) -> list[int]:
        if not self.chat:
            raise bad(f"{self.name}'s tokenizer has no chat format: send the raw prompt to /v1/completions", "messages")
        roles = {"developer": "system"}  # OpenAI's newer name for the system role
        messages = [{"role": roles.get(m.role, m.role), "content": m.text()} for m in body.messages]
        try:
            return self.pipe.prompt_ids(messages, chat=True, thinking=bool(body.thinking))[0]
        except DgemmaError as e:
            raise bad(str(e), "messages") from None

    def _completion_prompt(self, body: CompletionRequest) -> list[int]:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise bad(f"one prompt per request, not {len(prompt)}: send several requests", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, list):
            if not prompt:
                raise bad("empty prompt", "prompt")
            return prompt  # token ids, checked against the vocabulary by the engine
        try:
            return self.pipe.prompt_ids(prompt, chat=False)[0]
        except DgemmaError as e:
            raise bad(str(e), "prompt") from None


def has_chat_format(pipe: Pipeline) -> bool:
    """Whether the tokenizer has the chat format's control tokens (a task model such as the Sudoku one has not)."""
    try:
        return all(pipe.tokenizer.encode(t) == [pipe.tokenizer.token_id(t)] for t in CONTROL)
    except DgemmaError:
        return False


class Text:
    """A request's output so far: tokens up to and including the first stop id, at most max_tokens; the text of
    those tokens (stop ids left out) cut at the first stop string. `add` returns the new text, holding back what
    could still be the start of a stop string or of a character split across canvases."""

    def __init__(self, pipe: Pipeline, prep: Prepared):
        self.decode, self.stop_ids = pipe.decode, prep.cfg.stop_ids
        self.max_tokens, self.stops = prep.max_tokens, prep.stops
        self.hold = max(map(len, self.stops), default=1) - 1
        self.tokens: list[int] = []
        self.text = ""  # sent so far
        self.reason: str | None = None  # "stop" or "length" once the output is complete

    def add(self, ids: list[int], last: bool = False) -> str:
        for t in ids:
            if self.reason is not None:
                break
            self.tokens.append(t)
            if t in self.stop_ids:
                self.reason = "stop"
            elif len(self.tokens) == self.max_tokens:
                self.reason = "length"
        text = self.decode([t for t in self.tokens if t not in self.stop_ids])
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            text, self.reason = text[: min(cuts)], "stop"
        if last and self.reason is None:
            self.reason = "length"
        if self.reason is None:  # more may follow: hold back a possible stop string's start or a split character
            text = text[: max(len(self.text), len(text) - self.hold)].rstrip("\ufffd")
        delta, self.text = text[len(self.text) :], text
        return delta


class Job:
    """One request's generation, started on the engine; `events` yields ("draft", dict), ("text", delta) per committed
    canvas and ("end", finish_reason), or raises ApiError when the row failed. Must be made on the event loop."""

    def __init__(self, service: Service, prep: Prepared):
        self.service, self.prep, self.start = service, prep, time.perf_counter()
        self.id = f"{'chatcmpl' if prep.chat else 'cmpl'}-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.queue: asyncio.Queue = asyncio.Queue()
        self.text = Text(service.pipe, prep)
        loop = asyncio.get_running_loop()

        def post(*event):
            loop.call_soon_threadsafe(self.queue.put_nowait, event)

        try:
            self.row = service.engine.row(
                prep.prompt, prep.cfg, seed=prep.seed, warm_start=prep.warm_start, pinned=prep.pinned,
                allowed=prep.allowed,
                on_draft=(lambda d: post("draft", d)) if prep.drafts else None,
                on_commit=lambda k, canvas: post("commit", canvas), on_end=lambda row: post("end", row),
            )  # fmt: skip
        except DgemmaError as e:
            param = next((p for p in ("warm_start", "pinned", "allowed") if p in str(e)), "prompt")
            raise bad(str(e), param) from None
        service.submit(self.row)

    async def events(self):
        m, first = self.service.metrics, True
        try:
            while True:
                kind, payload = await self.queue.get()
                if kind == "draft":
                    yield "draft", self._draft(payload)
                elif kind == "commit":
                    if first:
                        m.first_canvas.observe(time.perf_counter() - self.start)
                        first = False
                    yield "text", self.text.add(payload[0].tolist())
                    if self.text.reason is not None:
                        break
                elif payload.error is not None:
                    raise failure(payload.error)
                else:  # the last canvas set the reason already (max_tokens fits the canvases); flush if not
                    if delta := self.text.add([], last=True):
                        yield "text", delta
                    break
            yield "end", self.text.reason or "length"
        finally:
            self.row.cancel()  # a no-op for a finished row; frees the row of a stopped or abandoned request
            m.latency.observe(time.perf_counter() - self.start)

    def _draft(self, d: Draft) -> dict:
        ids = d.argmax[0].tolist()
        return {
            "id": self.id, "object": "dgemma.draft", "created": self.created, "model": self.service.name,
            "canvas": d.canvas, "step": d.step, "accepted": int(d.accepted.sum()), "changed": int(d.changed.sum()),
            "done": bool(d.done[0]), "text": self.service.pipe.decode(ids), "token_ids": ids,
        }  # fmt: skip

    def usage(self) -> dict:
        prompt, completion = len(self.prep.prompt), len(self.text.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def count(self) -> None:
        self.service.metrics.prompt_tokens.inc(len(self.prep.prompt))
        self.service.metrics.completion_tokens.inc(len(self.text.tokens))


def failure(error: Exception) -> ApiError:
    """A failed row as the 500 its client sees: bad input found late names itself; anything else is logged with its
    traceback and reported without it."""
    if isinstance(error, DgemmaError):
        return ApiError(500, f"the generation failed: {error}", kind="server_error", code="generation_failed")
    log.error("a request failed", exc_info=error)
    return ApiError(500, "the generation failed: internal error (the server's log has the details)",
                    kind="server_error", code="internal_error")  # fmt: skip
