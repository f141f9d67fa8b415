"""`dgemma export onnx | trt | goldens` (options in dgemma/cli.py). The export modules are imported only when it
runs, so the rest of the command line works without the `export` extra."""

from __future__ import annotations

import argparse

from ..errors import ExportError


def run(args: argparse.Namespace, console) -> None:
    try:
        if args.target == "onnx":
            from .onnx import export_onnx

            out = export_onnx(
                args.model, args.out, dtype=args.dtype, max_prompt=args.max_prompt, max_batch=args.max_batch,
                output=args.output, custom_ops=args.custom_ops, window=args.window,
            )  # fmt: skip
        elif args.target == "trt":
            from .engine import build_engines

            out = build_engines(args.onnx, args.out, opt_prompt=args.opt_prompt, opt_batch=args.opt_batch)
        else:
            from .goldens import save_goldens

            out = save_goldens(args.model, args.onnx, args.out, dtype=args.dtype)
            console.print(f"on a GPU with TensorRT: sh {out}/compare.sh ENGINE_DIR")
    except ImportError as e:
        raise ExportError(f"{e}: `dgemma export` needs the export extra, pip install 'dgemma[export]'") from e
    console.print(f"wrote {out}")
