"""A live `dgemma serve` application on a loopback port, in a thread of the test process (so tests can read the
engine's counters), and raw HTTP requests for what the openai client will not send."""

import http.client
import json
import threading
import time

import uvicorn

from dgemma.serve.app import create_app
from dgemma.serve.cli import bind


class LiveServer:
    def __init__(self, service, **options):
        self.service = service
        sock = bind("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(service, **options), log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def request(self, method, path, body=None, headers=None, timeout=60):
        """(status, headers, parsed JSON or text); `body` a dict (sent as JSON) or bytes."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = json.dumps(body).encode() if isinstance(body, dict) else body
            conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            response = conn.getresponse()
            raw = response.read().decode()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = raw
            return response.status, dict(response.getheaders()), parsed
        finally:
            conn.close()

    def wait_idle(self, timeout=30):
        """Waits until the engine runs no row and nothing waits for one."""
        deadline = time.monotonic() + timeout
        while not (self.service.engine.idle and self.service.pending.empty()):
            if time.monotonic() > deadline:
                raise TimeoutError("the engine is still busy")
            time.sleep(0.01)


def events(text: str) -> list[tuple[str | None, str]]:
    """A Server-Sent Events body -> (event name, data) pairs."""
    out = []
    for block in text.strip().split("\n\n"):
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data.append(line[len("data: ") :])
        out.append((name, "\n".join(data)))
    return out
