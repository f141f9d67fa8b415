"""The `dgemma` command line: every command's options, and the one place errors become exit statuses.

Building the parser imports nothing heavy (no torch), so `dgemma --help` answers at once; a command imports its
implementation when it runs. Bad input (the project's own DgemmaError) and the operating system's file errors print
one `error:` line on stderr and exit with status 2, as do options argparse refuses; any other exception is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys

from .errors import DgemmaError
from .model.config import BACKENDS, DTYPES, ENGINE_BACKENDS, WINDOW_MODES
from .sudoku.board import BOXES, VOCAB_SIZE

EXPORT_DTYPES = ("bf16", "fp16", "fp32")  # export.sidecar.DTYPES, whose values are torch dtypes
THREADS = (
    "torch CPU threads (default 1): on a busy machine more threads than idle cores stall PyTorch 10-50x, and seeded "
    "output is reproducible for a fixed thread count"
)

# command -> "module:function" run with (args, console); imported only when the command runs
COMMANDS = {
    "generate": "dgemma.runtime.cli:generate",
    "sudoku": "dgemma.sudoku.cli:solve_one",
    "eval": "dgemma.sudoku.cli:evaluate",
    "train": "dgemma.sudoku.cli:train",
    "export": "dgemma.export.cli:run",
    "serve": "dgemma.serve.cli:run",
}


class Parser(argparse.ArgumentParser):
    """argparse, with its refusals as the one `error:` line every other error gets (argparse prints usage first)."""

    def error(self, message):
        sys.stderr.write(f"error: {self.prog}: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def number(
    text: str, kind: type = int, low: float = -math.inf, what: str = "a number", *, high: float = math.inf,
    above: bool = False,
):  # fmt: skip
    """An option's value as `kind`, finite, from `low` (or `above` it) to `high`; argparse turns the refusal into its
    error line."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < low or value > high or (above and value == low):
        raise argparse.ArgumentTypeError(f"must be {what}, not {text!r}")
    return value


def positive_int(text: str) -> int:
    return number(text, int, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return number(text, int, 0, "a non-negative integer")


def finite_float(text: str) -> float:
    return number(text, float, what="a finite number")


def non_negative_float(text: str) -> float:
    return number(text, float, 0, "a non-negative number")


def positive_float(text: str) -> float:
    return number(text, float, 0, "a positive number", above=True)


def position_ids(text: str) -> tuple[int, list[int]]:
    """POS=ID[,ID...] -> (POS, [IDs]): a generated position and token ids."""
    pos, sep, ids = text.partition("=")
    try:
        position, tokens = int(pos), [int(i) for i in ids.split(",")]
    except ValueError:
        position = tokens = None
    if not sep or position is None or position < 0 or min(tokens) < 0:
        raise argparse.ArgumentTypeError(f"must be POS=ID[,ID...] with non-negative integers, not {text!r}")
    return position, tokens


def pin(text: str) -> tuple[int, int]:
    position, tokens = position_ids(text)
    if len(tokens) != 1:
        raise argparse.ArgumentTypeError(f"pins one token: POS=ID, not {text!r}")
    return position, tokens[0]


def allow(text: str) -> tuple[int, list[int]]:
    return position_ids(text)


def path(text: str) -> str:
    """A file or folder name; an empty one would silently mean the current folder or a default."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must be a path, not an empty string")
    return text


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="dgemma", description="DiffusionGemma: block-diffusion text generation.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_generate(sub)
    add_sudoku(sub)
    add_export(sub)
    add_serve(sub)
    return p


def add_generate(sub) -> None:
    g = sub.add_parser("generate", help="generate text from a prompt, showing each denoising step")
    g.add_argument("prompt", nargs="+", help="the user message (several words are joined with spaces)")
    g.add_argument("--model", type=path, required=True, help="checkpoint folder (config.json, *.safetensors, ...)")
    g.add_argument("--system", help="a system message")
    g.add_argument("--thinking", action="store_true", help="switch the model's thinking on")
    g.add_argument("--raw", action="store_true", help="feed the prompt as plain text, without the chat format")
    g.add_argument("--max-new-tokens", type=positive_int, help="rounded up to whole canvases (default: checkpoint)")
    g.add_argument("--steps", type=positive_int, dest="max_denoising_steps", help="maximum denoising steps per canvas")
    g.add_argument("--seed", type=non_negative_int, default=0)
    g.add_argument("--reference", action="store_true", help="draw random numbers as transformers does")
    g.add_argument("--dtype", choices=DTYPES, default="bf16")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is a GPU)")
    g.add_argument("--backend", choices=BACKENDS + ENGINE_BACKENDS, default="torch")
    g.add_argument("--engine", type=path, help="onnxruntime, tensorrt: the folder `dgemma export` wrote")
    g.add_argument("--window", choices=WINDOW_MODES, default="shared", help="decoder sliding window")
    g.add_argument("--threads", type=positive_int, default=1, help=THREADS)
    g.add_argument(
        "--pin",
        type=pin,
        action="append",
        default=[],
        metavar="POS=ID",
        help="pin generated position POS (0 = the first new token) to token id ID; repeatable",
    )
    g.add_argument("--allow", type=allow, action="append", default=[], metavar="POS=ID,ID,...",
                   help="restrict generated position POS to these token ids; repeatable")  # fmt: skip


def add_sudoku(sub) -> None:
    sizes = sorted(BOXES)
    s = sub.add_parser("sudoku", help="solve a Sudoku puzzle, showing the canvas refine step by step")
    s.add_argument("puzzle", nargs="?", help="16, 36 or 81 characters, 0 or . for a blank (default: a random one)")
    s.add_argument("--size", type=int, choices=sizes, help="grid size of a random puzzle (default 4)")
    s.add_argument("--model", type=path, help="checkpoint folder (default: the shipped model for the puzzle's size)")
    s.add_argument("--steps", type=positive_int, dest="max_denoising_steps", help="maximum denoising steps")
    s.add_argument("--pin-givens", action="store_true", help="pin every clue's cell to its digit")
    s.add_argument("--digits", action="store_true", help="restrict every blank cell to the digits 1-n")
    s.add_argument("--seed", type=non_negative_int, default=0, help="sampler seed (and the random puzzle's)")
    s.add_argument("--delay", type=non_negative_float, default=0.4, help="seconds per step on a terminal")
    s.add_argument("--dtype", choices=DTYPES, default="fp32")
    s.add_argument("--threads", type=positive_int, default=1, help=THREADS)

    e = sub.add_parser("eval", help="measure a task's solve rate").add_subparsers(dest="task", required=True)
    e = e.add_parser("sudoku", help="exact-solve rate, cell accuracy and steps on puzzles with unique solutions")
    e.add_argument("--puzzles", type=path, help="file with one puzzle per line (default: generated held-out puzzles)")
    e.add_argument("--size", type=int, choices=sizes, default=4, help="size of generated puzzles")
    e.add_argument("--count", type=positive_int, default=1000, help="generated puzzles")
    e.add_argument("--blanks", type=non_negative_int, nargs=2, metavar=("LO", "HI"), help="blanks of generated puzzles")
    e.add_argument("--model", type=path, help="diffusion checkpoint (default: the shipped one)")
    e.add_argument("--baseline", type=path, nargs="?", const="shipped", help="also decode an AR checkpoint greedily")
    e.add_argument("--steps", type=positive_int, nargs="+", help="denoising step budgets (default: the checkpoint's)")
    e.add_argument("--pin-givens", action="store_true", help="pin every clue's cell to its digit")
    e.add_argument("--digits", action="store_true", help="restrict every blank cell to the digits 1-n")
    e.add_argument("--seed", type=non_negative_int, default=0, help="puzzle and sampler seed")
    e.add_argument("--dtype", choices=DTYPES, default="fp32")
    e.add_argument("--threads", type=positive_int, default=1, help=THREADS)
    e.add_argument("--json", action="store_true", help="print the results as JSON")

    t = sub.add_parser("train", help="train a model from scratch").add_subparsers(dest="task", required=True)
    t = t.add_parser("sudoku", help="a DiffusionGemma (or its autoregressive baseline) on generated puzzles")
    t.add_argument("--out", type=path, required=True, help="checkpoint folder, rewritten every --save-every steps")
    t.add_argument("--resume", type=path, help="continue from this folder's trainer state (to --steps)")
    t.add_argument("--size", type=int, choices=sizes, default=4)
    t.add_argument("--objective", choices=("diffusion", "ar"), default="diffusion")
    t.add_argument("--lm-weight", type=non_negative_float, default=0.0, help="weight of the encoder's causal LM loss")
    t.add_argument("--steps", type=positive_int, default=4000)
    t.add_argument("--batch", type=positive_int, default=128)
    t.add_argument("--lr", type=finite_float, default=1e-3)
    t.add_argument("--blanks", type=non_negative_int, nargs=2, metavar=("LO", "HI"))
    t.add_argument("--hidden", type=positive_int, default=64, help="a multiple of 16 (16-wide heads)")
    t.add_argument("--layers", type=positive_int, default=2)
    t.add_argument("--experts", type=positive_int, default=4)
    t.add_argument("--top-k", type=positive_int, default=2)
    t.add_argument("--seed", type=non_negative_int, default=0)
    t.add_argument("--denoising-steps", type=positive_int, default=16, help="max_denoising_steps it ships with")
    t.add_argument("--vocab", type=positive_int, default=VOCAB_SIZE, help="vocabulary size: the Sudoku tokens' or more")
    t.add_argument("--time-budget", type=positive_float, metavar="SECONDS", help="stop (saved, resumable) after this")
    t.add_argument("--save-every", type=positive_int, default=500)
    t.add_argument("--threads", type=positive_int, default=1, help=THREADS)
    t.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")


def add_export(sub) -> None:
    e = sub.add_parser("export", help="export to ONNX, build TensorRT engines, save polygraphy goldens")
    targets = e.add_subparsers(dest="target", required=True)
    o = targets.add_parser("onnx", help="write the decoder and encoder graphs (ONNX, weights in external data)")
    o.add_argument("--model", type=path, required=True, help="checkpoint folder")
    o.add_argument("--out", type=path, required=True, help="new folder for decoder.onnx, encoder.onnx, dgemma.json")
    o.add_argument("--dtype", choices=EXPORT_DTYPES, default="bf16", help="fp32 for ONNX Runtime on the CPU")
    o.add_argument("--max-prompt", type=positive_int, help="longest committed prefix the engines take (default 4096)")
    o.add_argument("--max-batch", type=positive_int, default=1, help="largest batch the engines take")
    o.add_argument("--output", choices=("logits", "hidden"), default="logits", help="what the decoder returns")
    o.add_argument("--custom-ops", action="store_true", help="the MoE as a function-bodied dgemma::MoE node")
    o.add_argument("--window", choices=WINDOW_MODES, default="shared", help="the runtime's default window mode")
    t = targets.add_parser("trt", help="build TensorRT engines (TensorRT-RTX when full TensorRT is not installed)")
    t.add_argument("--onnx", type=path, required=True, help="a folder written by `dgemma export onnx`")
    t.add_argument("--out", type=path, required=True, help="new folder for decoder.engine, encoder.engine, dgemma.json")
    t.add_argument("--opt-prompt", type=positive_int, help="committed length the profile is tuned for (default: max/2)")
    t.add_argument("--opt-batch", type=positive_int, default=1)
    g = targets.add_parser("goldens", help="ONNX Runtime golden outputs for polygraphy's TensorRT comparison")
    g.add_argument("--model", type=path, required=True, help="checkpoint folder")
    g.add_argument("--onnx", type=path, required=True, help="an fp32 folder written by `dgemma export onnx`")
    g.add_argument("--out", type=path, required=True, help="new folder for inputs.json, golden.json and compare.sh")
    g.add_argument("--dtype", choices=EXPORT_DTYPES, default="bf16", help="the engine's dtype")


def add_serve(sub) -> None:
    def port(text: str) -> int:
        return number(text, int, 0, "a port number from 0 to 65535", high=65535)

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (README: Serving)")
    s.add_argument("--model", type=path, help="checkpoint folder (default: the shipped 4x4 Sudoku model)")
    s.add_argument("--name", help="the model name clients send (default: the checkpoint folder's name)")
    s.add_argument("--backend", choices=BACKENDS + ENGINE_BACKENDS, default="torch")
    s.add_argument("--engine", type=path, help="onnxruntime, tensorrt: the folder `dgemma export` wrote")
    s.add_argument("--dtype", choices=DTYPES, help="default: fp32 for the shipped Sudoku model, else bf16")
    s.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is a GPU)")
    s.add_argument("--window", choices=WINDOW_MODES, default="shared", help="decoder sliding window")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    s.add_argument("--port", type=port, default=8000, help="0: any free port (the server prints it)")
    s.add_argument("--max-batch", type=positive_int, default=8, help="requests denoised together per decoder pass")
    s.add_argument("--max-queue", type=positive_int, default=64, help="requests waiting for a row; beyond: 429")
    s.add_argument("--max-body", type=positive_int, default=1 << 20, help="largest request body in bytes")
    s.add_argument("--api-key", help="clients must send 'Authorization: Bearer KEY' (default: $DGEMMA_API_KEY)")
    s.add_argument("--threads", type=positive_int, default=1, help=THREADS)
    s.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment (pip install 'dgemma[serve]')")
    s.add_argument("--replicas", type=positive_int, default=1, help="--ray: model replicas behind one address")


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    module, function = COMMANDS[args.command].split(":")
    try:
        command = getattr(importlib.import_module(module), function)
        from rich.console import Console

        command(args, Console())
    except (DgemmaError, OSError) as e:  # OSError: a missing file, no permission, a folder where a file belongs
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever the message holds
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
