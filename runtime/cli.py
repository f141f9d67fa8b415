"""The `dgemma` command line: `dgemma generate --model DIR "prompt"` shows the canvas refining in place.

`dgemma sudoku`, `dgemma eval sudoku` and `dgemma train sudoku` run the embedded Sudoku model (sudoku_cli.py).
"""

from __future__ import annotations

import argparse
import sys

import torch
from rich.console import Console
from rich.live import Live
from rich.panel import Panel
from rich.text import Text

from ..export import cli as export_cli
from ..model.cache import WINDOW_MODES
from ..model.checkpoint import LOAD_DTYPES, CheckpointError
from ..model.model import BACKENDS
from . import sudoku_cli
from .engine import ENGINE_BACKENDS
from .pipeline import Draft, Pipeline


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dgemma", description="DiffusionGemma: block-diffusion text generation.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text from a prompt, showing each denoising step")
    g.add_argument("prompt", nargs="+", help="the user message (several words are joined with spaces)")
    g.add_argument("--model", required=True, help="checkpoint folder (config.json, *.safetensors, tokenizer.json)")
    g.add_argument("--system", help="a system message")
    g.add_argument("--thinking", action="store_true", help="switch the model's thinking on")
    g.add_argument("--raw", action="store_true", help="feed the prompt as plain text, without the chat format")
    g.add_argument("--max-new-tokens", type=int, help="rounded up to whole canvases (default: generation_config)")
    g.add_argument("--steps", type=int, dest="max_denoising_steps", help="maximum denoising steps per canvas")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--reference", action="store_true", help="draw random numbers as transformers does")
    g.add_argument("--dtype", choices=sorted(LOAD_DTYPES), default="bf16")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--backend", choices=BACKENDS + ENGINE_BACKENDS, default="torch")
    g.add_argument("--engine", help="onnxruntime, tensorrt: the folder `dgemma export` wrote")
    g.add_argument("--window", choices=WINDOW_MODES, default="shared", help="decoder sliding window")
    sudoku_cli.add_parsers(sub)
    export_cli.add_parser(sub)
    return p


def generate(args, console: Console) -> None:
    pipe = Pipeline.from_pretrained(
        args.model, dtype=LOAD_DTYPES[args.dtype], device=args.device, backend=args.backend, window=args.window,
        engine=args.engine,
    )  # fmt: skip
    text = " ".join(args.prompt)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": text}
    ]
    committed: list[int] = []
    live = Live(console=console, auto_refresh=False, transient=False)

    def show(draft_ids, status: str):
        body = Text(pipe.decode(committed), style="bold")
        body.append(pipe.decode(draft_ids), style="dim")
        live.update(Panel(body, title=status, title_align="left"), refresh=True)

    def on_draft(d: Draft):
        C = d.argmax.shape[1]
        status = (
            f"canvas {d.canvas + 1} step {d.step + 1}: accepted {int(d.accepted[0].sum())}/{C}, "
            f"changed {int(d.changed[0].sum())}"
        )
        show(d.argmax[0].tolist(), status)

    def on_commit(k: int, canvas: torch.Tensor):
        committed.extend(canvas[0].tolist())
        show([], f"canvas {k + 1} committed")

    with live:
        out = pipe.generate(
            text if args.raw else messages,
            chat=not args.raw,
            thinking=args.thinking,
            reference=args.reference,
            seed=args.seed,
            on_draft=on_draft,
            on_commit=on_commit,
            max_new_tokens=args.max_new_tokens,
            max_denoising_steps=args.max_denoising_steps,
        )
        live.update(Panel(Text(out.text), title="answer", title_align="left"), refresh=True)
    s = out.stats
    console.print()
    console.print(
        f"{s.new_tokens} tokens in {len(s.steps_per_canvas)} canvases, steps per canvas {s.steps_per_canvas}, "
        f"{s.tokens_per_forward[0]:.2f} tokens/forward, {s.tokens_per_second:.1f} tokens/s "
        f"({args.device}, {pipe.model.dtype}, {args.backend})"
    )


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    console = Console()
    try:
        ({"generate": generate, "export": export_cli.run} | sudoku_cli.COMMANDS)[args.command](args, console)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
