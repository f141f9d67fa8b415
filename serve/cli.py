"""`dgemma serve`: load the model, bind the address, run the application under uvicorn (or Ray Serve with --ray)."""

from __future__ import annotations

import importlib.util
import ipaddress
import logging
import os
import socket
from pathlib import Path

import torch
from rich.console import Console

from ..errors import DgemmaError
from ..model.checkpoint import LOAD_DTYPES
from ..runtime.pipeline import Pipeline
from ..sudoku.solve import shipped

API_KEY_ENV = "DGEMMA_API_KEY"
REQUIRES = ("fastapi", "uvicorn", "prometheus_client")  # the `serve` extra; --ray also needs ray
GRACE = 10  # seconds


def api_key(args) -> str | None:
    """--api-key, else $DGEMMA_API_KEY; an empty key would let anyone in, so it counts as none."""
    return args.api_key or os.environ.get(API_KEY_ENV) or None


def load_service(args):
    """The Service of the Pipeline `dgemma serve`'s options describe, served under its name."""
    from .service import Service

    torch.set_num_threads(args.threads)
    model = args.model or shipped(4)
    dtype = args.dtype or ("fp32" if args.model is None else "bf16")  # the Sudoku models are trained in fp32
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = Pipeline.from_pretrained(
        model, dtype=LOAD_DTYPES[dtype], device=device, backend=args.backend, window=args.window, engine=args.engine
    )
    name = args.name or Path(model).resolve().name
    return Service(pipe, name, max_batch=args.max_batch, max_queue=args.max_queue, threads=args.threads)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the server starts, so an address in use is one `error:` line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from e
    return sock


def run(args, console: Console) -> None:
    if missing := [m for m in REQUIRES if importlib.util.find_spec(m) is None]:
        raise DgemmaError(f"dgemma serve needs {', '.join(missing)}: pip install 'dgemma[serve]'")
    import uvicorn

    from .app import create_app

    key = api_key(args)
    if args.ray:
        from .replicas import run_ray

        run_ray(args, key, console)
        return
    sock = bind(args.host, args.port)
    service = load_service(args)
    host, port = sock.getsockname()[:2]
    model = service.pipe.model
    console.print(
        f"serving {service.name!r} ({model.backend}, {model.device}, {model.dtype}, max batch {args.max_batch}, "
        f"{args.threads} thread(s)) on http://{host}:{port}/v1" + ("" if key else " without an API key"),
        soft_wrap=True,
    )
    if key is None and not is_loopback(host):
        console.print(f"[bold red]warning:[/] {host} is reachable from other machines and no API key is set")
    logging.basicConfig(level=logging.INFO)
    app = create_app(service, api_key=key, max_body=args.max_body)
    # On Ctrl-C running requests get this long to finish; the engine stops after them.
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=GRACE)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down gracefully and raises it again; a normal stop
        pass


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
