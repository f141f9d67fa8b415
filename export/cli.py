"""`dgemma export onnx | trt | goldens`: the subcommand runtime/cli.py adds. The export modules are imported only
when it runs, so the rest of the command line works without the `export` extra."""

from __future__ import annotations

import argparse

from ..model.cache import WINDOW_MODES
from .sidecar import DTYPES, ExportError


def add_parser(sub) -> None:
    e = sub.add_parser("export", help="export to ONNX, build TensorRT engines, save polygraphy goldens")
    targets = e.add_subparsers(dest="target", required=True)
    o = targets.add_parser("onnx", help="write the decoder and encoder graphs (ONNX, weights in external data)")
    o.add_argument("--model", required=True, help="checkpoint folder")
    o.add_argument("--out", required=True, help="new folder for decoder.onnx, encoder.onnx and dgemma.json")
    o.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="fp32 for ONNX Runtime on the CPU")
    o.add_argument("--max-prompt", type=int, help="longest committed prefix the engines take (default 4096)")
    o.add_argument("--max-batch", type=int, default=1, help="largest batch the engines take")
    o.add_argument("--output", choices=("logits", "hidden"), default="logits", help="what the decoder returns")
    o.add_argument("--custom-ops", action="store_true", help="the MoE as a function-bodied dgemma::MoE node")
    o.add_argument("--window", choices=WINDOW_MODES, default="shared", help="the runtime's default window mode")
    t = targets.add_parser("trt", help="build TensorRT engines (TensorRT-RTX when full TensorRT is not installed)")
    t.add_argument("--onnx", required=True, help="a folder written by `dgemma export onnx` (bf16 for the GPU)")
    t.add_argument("--out", required=True, help="new folder for decoder.engine, encoder.engine and dgemma.json")
    t.add_argument("--opt-prompt", type=int, help="committed length the profile is tuned for (default: max / 2)")
    t.add_argument("--opt-batch", type=int, default=1)
    g = targets.add_parser("goldens", help="ONNX Runtime golden outputs for polygraphy's TensorRT comparison")
    g.add_argument("--model", required=True, help="checkpoint folder")
    g.add_argument("--onnx", required=True, help="an fp32 folder written by `dgemma export onnx`")
    g.add_argument("--out", required=True, help="new folder for inputs.json, golden.json and compare.sh")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="the engine's dtype")


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
