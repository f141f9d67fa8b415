"""`dgemma generate --model DIR "prompt"`: the canvas refining in place, then the answer and its speed."""

from __future__ import annotations

import torch
from rich.console import Console
from rich.live import Live
from rich.panel import Panel
from rich.text import Text

from ..model.checkpoint import LOAD_DTYPES
from .pipeline import Draft, Pipeline


def generate(args, console: Console) -> None:
    torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = Pipeline.from_pretrained(
        args.model, dtype=LOAD_DTYPES[args.dtype], device=device, backend=args.backend, window=args.window,
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

    pinned = None
    if args.pin:  # POS=ID pairs -> a template, -1 where free
        pinned = [-1] * (max(position for position, _ in args.pin) + 1)
        for position, token in args.pin:
            pinned[position] = token
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
            pinned=pinned,
            allowed=dict(args.allow) or None,
        )
        live.update(Panel(Text(out.text), title="answer", title_align="left"), refresh=True)
    s = out.stats
    console.print()
    console.print(
        f"{s.new_tokens} tokens in {len(s.steps_per_canvas)} canvases, steps per canvas {s.steps_per_canvas}, "
        f"{s.tokens_per_forward[0]:.2f} tokens/forward, {s.tokens_per_second:.1f} tokens/s "
        f"({device}, {pipe.model.dtype}, {args.backend}, {args.threads} thread(s))"
    )
