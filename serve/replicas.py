"""The server as a Ray Serve deployment: each replica loads the model and runs the same application (its own engine
thread and queue); Ray's proxy spreads requests over the replicas behind one address.

    dgemma serve --ray --replicas 2 [dgemma serve's options]
    serve run dgemma.serve.replicas:build_app model=DIR replicas=2 max_batch=8     # any option, as key=value

A replica reserves `--threads` CPUs (and a GPU when the device is cuda). /metrics answers for the replica that took
the request.
"""

from __future__ import annotations

import signal
import sys
import time

from rich.console import Console
from starlette.types import ASGIApp

from ..errors import DgemmaError


def application(args, key: str | None):
    """The deployment of `dgemma serve`'s parsed options, bound: a Ray Serve Application."""
    from ray import serve

    def asgi() -> ASGIApp:  # runs in each replica, which loads its own model
        from .app import create_app
        from .cli import load_service

        return create_app(load_service(args), api_key=key, max_body=args.max_body)

    gpus = 1 if (args.device or "").startswith("cuda") else 0
    deployment = serve.deployment(
        serve.ingress(asgi)(), name="dgemma", num_replicas=args.replicas,
        ray_actor_options={"num_cpus": args.threads, "num_gpus": gpus},
        max_ongoing_requests=args.max_batch + args.max_queue,  # the engine queues and refuses on its own
    )  # fmt: skip
    return deployment.bind()


def build_app(args: dict | None = None):
    """For `serve run dgemma.serve.replicas:build_app key=value ...`: the keys are `dgemma serve`'s long options
    (model, replicas, max_batch, ...), parsed and checked as the command line does; the key comes from api_key or
    $DGEMMA_API_KEY."""
    from ..cli import parser
    from .cli import api_key

    argv = ["serve"]
    for name, value in (args or {}).items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    options = parser().parse_args(argv)
    return application(options, api_key(options))


def run_ray(args, key: str | None, console: Console) -> None:
    """`dgemma serve --ray`: a local Ray instance (or the cluster RAY_ADDRESS names), Serve's proxy on --host:--port,
    until Ctrl-C or SIGTERM, which shut the deployment and the instance down."""
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise DgemmaError(f"--ray needs {e.name}: pip install 'dgemma[serve]'") from e
    ray.init(include_dashboard=False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a service manager's stop: shut Ray down as Ctrl-C does
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(application(args, key), name="dgemma", route_prefix="/")
        console.print(f"serving on http://{args.host}:{args.port}/v1 with {args.replicas} Ray Serve replica(s)")
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
