"""Bad input through the command line and the Python API: one clear error naming the input, exit status 2 with one
`error:` line on stderr and no traceback, and nothing written. Each row is a class of input, not one case; the
export, training and Sudoku classes have their own files (test_export*.py, test_train*.py, test_sudoku*.py)."""

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dgemma import DiffusionGemma, Pipeline
from dgemma.cli import main
from dgemma.errors import CheckpointError, DgemmaError
from dgemma.runtime.pipeline import generate_ids
from dgemma.runtime.sampler import MAX_DENOISING_STEPS, SamplingConfig


def snapshot(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def cli_fails(argv, capsys, *fragments) -> str:
    """Runs the command line in this process: exit status 2, one `error:` line naming the input, no traceback."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's refusals
        status = e.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("error:") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture
def checkpoint(tiny_checkpoint, tmp_path):
    """A private copy of the tiny checkpoint to corrupt."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


def edit_json(path: Path, edit) -> None:
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def set_text(**fields):
    return lambda raw: raw["text_config"].update(fields)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: checked once, at load, the file and the field named

CONFIGS = [
    ("not an object", lambda p: p.write_text("[1, 2]"), "a config is a JSON object"),
    ("not JSON", lambda p: p.write_text("{'vocab_size': 3"), "is not valid JSON"),
    ("not UTF-8", lambda p: p.write_bytes(b'{"a": "\xff"}'), "is not UTF-8"),
    ("deeply nested", lambda p: p.write_text("[" * 100_000), "is not valid JSON"),
    ("another model", lambda p: edit_json(p, lambda r: r.update(model_type="llama")), "model_type 'llama'"),
    ("zero heads", lambda p: edit_json(p, set_text(num_attention_heads=0)), "num_attention_heads"),
    ("zero window", lambda p: edit_json(p, set_text(sliding_window=0)), "sliding_window"),
    ("a string size", lambda p: edit_json(p, set_text(hidden_size="64")), "hidden_size"),
    ("a huge vocabulary", lambda p: edit_json(p, set_text(vocab_size=10**12)), "vocab_size"),
    ("NaN epsilon", lambda p: p.write_text(p.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": NaN')),
     "rms_norm_eps"),
    ("an odd head dim", lambda p: edit_json(p, set_text(head_dim=15)), "head dim 15 must be even"),
    ("top-k above the experts", lambda p: edit_json(p, set_text(top_k_experts=9)), "top_k_experts"),
    ("a layer list of numbers", lambda p: edit_json(p, set_text(layer_types=[1, 2, 3, 4])), "layer_types"),
]  # fmt: skip


@pytest.mark.parametrize("label, corrupt, fragment", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_bad_config(checkpoint, capsys, label, corrupt, fragment):
    corrupt(checkpoint / "config.json")
    before = snapshot(checkpoint)
    with pytest.raises(CheckpointError, match="config.json"):
        DiffusionGemma.from_pretrained(checkpoint)
    cli_fails(["generate", "--model", checkpoint, "hi"], capsys, "config.json", fragment)
    assert snapshot(checkpoint) == before


GENERATION = [
    ("a string step count", {"max_denoising_steps": "16"}, "max_denoising_steps"),
    ("NaN temperature", {"t_min": math.nan}, "t_min"),
    ("infinite temperature", {"t_max": math.inf}, "t_max"),
    ("a bool threshold", {"stability_threshold": True}, "stability_threshold"),
    ("negative steps", {"max_denoising_steps": -3}, "max_denoising_steps"),
    ("more steps than the cap", {"max_denoising_steps": MAX_DENOISING_STEPS + 1}, "max_denoising_steps"),
    ("eos not a list of ids", {"eos_token_id": ["<eos>"]}, "stop_ids"),
    ("a sampler_config string", {"sampler_config": "eb"}, "sampler_config"),
]


@pytest.mark.parametrize("label, fields, fragment", GENERATION, ids=[g[0] for g in GENERATION])
def test_bad_generation_config(checkpoint, capsys, label, fields, fragment):
    edit_json(checkpoint / "generation_config.json", lambda raw: raw.update(fields))
    with pytest.raises(CheckpointError, match=f"generation_config.json: .*{fragment}"):
        Pipeline.from_pretrained(checkpoint)
    cli_fails(["generate", "--model", checkpoint, "hi"], capsys, "generation_config.json", fragment)


@pytest.mark.parametrize(
    "content",
    [b"garbage", b'{"version": "1.0"}', b"[]", b"\xff\xfe"],  # not JSON; JSON of another shape; not UTF-8
)
def test_corrupt_tokenizer(checkpoint, capsys, content):
    (checkpoint / "tokenizer.json").write_bytes(content)
    cli_fails(["generate", "--model", checkpoint, "hi"], capsys, "tokenizer.json")


def test_weights_outside_the_folder_or_of_the_wrong_kind(checkpoint, capsys):
    index = {"weight_map": {"model.decoder.norm.weight": "../../etc/passwd"}}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    cli_fails(["generate", "--model", checkpoint, "hi"], capsys, "names shards outside")
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": [1]}))
    cli_fails(["generate", "--model", checkpoint, "hi"], capsys, "weight_map must map")


def test_missing_or_misplaced_checkpoint(tmp_path, capsys):
    cli_fails(["generate", "--model", tmp_path / "absent", "hi"], capsys, "is not a checkpoint folder")
    (tmp_path / "file").write_text("x")
    cli_fails(["generate", "--model", tmp_path / "file", "hi"], capsys, "is not a checkpoint folder")
    cli_fails(["generate", "--model", "", "hi"], capsys, "must be a path")


# ---------------------------------------------------------------------------------------------------------------------
# Generation


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return Pipeline.from_pretrained(tiny_checkpoint, dtype=torch.float32)


@pytest.mark.parametrize(
    "prompt, kwargs, fragment",
    [
        ([[5] * 600], {}, "positions"),  # 600 prompt tokens > 512 positions
        ([[5] * 10], {"max_new_tokens": 10**9}, "max_new_tokens=1000000000"),  # refused, not a 128 GB allocation
        ([[5, 300]], {}, "token ids"),  # outside the vocabulary of 256
        ([[5, -1]], {}, "token ids"),
        ("x" * 100_000, {}, "characters"),  # refused before tokenizing
        ("bad \udcff byte", {}, "not valid UTF-8"),  # how a non-UTF-8 argument reaches Python
        ([{"role": "user", "content": 3}], {}, "content"),
        ([{"role": "robot", "content": "hi"}], {}, "unknown role"),
        (3.5, {}, "a prompt is"),
        ([[2.0, 5.5]], {}, "token ids (integers), not [2.0, 5.5]"),  # not read as chat messages
        (torch.ones(2, 3), {}, "a prompt tensor holds token ids"),
        ("hi", {"t_min": math.nan}, "t_min"),
        ("hi", {"entropy_bound": math.inf}, "entropy_bound"),
        ("hi", {"confidence_threshold": -math.inf}, "confidence_threshold"),
        ("hi", {"max_denoising_steps": 1.5}, "max_denoising_steps"),
        ("hi", {"temperature": 0.7}, "unknown sampling parameters ['temperature']"),
        ("hi", {"warm_start": [5] * 7}, "a canvas holds 1 row(s) of 8 token ids"),
        ("hi", {"warm_start": [300] * 8}, "warm_start holds token ids outside"),
        ("hi", {"warm_start": [0.5] * 8}, "a canvas holds"),
        ("hi", {"seed": -1}, "seed"),
        ("hi", {"stop_ids": [999]}, "stop_ids"),
    ],
)
def test_bad_generate(pipe, prompt, kwargs, fragment):
    with pytest.raises(DgemmaError, match=re.escape(fragment)):
        pipe.generate(prompt, **kwargs)


def test_generate_ids_checks_before_allocating(pipe):
    model, cfg = pipe.model, SamplingConfig(max_new_tokens=10**12)
    with pytest.raises(DgemmaError, match="positions"):
        generate_ids(model, torch.ones(1, 4, dtype=torch.long), cfg)
    with pytest.raises(DgemmaError, match="attention mask"):
        generate_ids(model, torch.ones(1, 4, dtype=torch.long), SamplingConfig(), attention_mask=torch.zeros(1, 4))
    with pytest.raises(DgemmaError, match="integer tensor"):
        generate_ids(model, torch.ones(1, 4), SamplingConfig())


def test_direct_model_calls(pipe):
    model = pipe.model
    cache = model.new_cache(2, 32)
    with pytest.raises(DgemmaError, match=r"ids holds token ids outside the vocabulary \[0, 256\)"):
        model.encode(torch.tensor([[1, 2], [3, 256]]), cache)
    with pytest.raises(DgemmaError, match="2 row"):
        model.encode(torch.ones(1, 3, dtype=torch.long), cache)  # a cache of another batch
    with pytest.raises(DgemmaError, match="canvas_ids holds token ids outside"):
        model.denoise(torch.full((2, 8), -5), cache)
    with pytest.raises(DgemmaError, match=r"of 8 tokens \(the canvas\)"):
        model.denoise(torch.ones(2, 5, dtype=torch.long), cache)  # the decoder denoises whole canvases
    with pytest.raises(DgemmaError, match="max_position_embeddings"):
        model.new_cache(1, 10**9)  # more positions than the model has: refused, not allocated
    with pytest.raises(DgemmaError, match="is full"):
        model.encode(torch.ones(2, 40, dtype=torch.long), cache)  # more tokens than the cache holds
    assert cache.length == 32  # the chunks that fit were committed; the next was refused before any write


def test_cli_generate_bad_values(tiny_checkpoint, capsys):
    base = ["generate", "--model", tiny_checkpoint]
    cli_fails([*base, "--max-new-tokens", 10**9, "hi"], capsys, "positions")
    cli_fails([*base, "--steps", 0, "hi"], capsys, "--steps", "positive integer")
    cli_fails([*base, "--threads", 0, "hi"], capsys, "--threads")
    cli_fails([*base, "--device", "cuda", "hi"], capsys, "no CUDA GPU")
    cli_fails([*base, "--device", "tpu:9", "hi"], capsys, "device")
    cli_fails([*base, "--seed", -1, "hi"], capsys, "--seed")
    cli_fails([*base, "--raw", "x" * 50_000], capsys, "characters")


def test_cli_non_utf8_argument_and_console_script(tiny_checkpoint):
    """A real process: argv bytes that are not UTF-8 arrive as surrogates and are refused in one line."""
    argv = [sys.executable, "-m", "dgemma", "generate", "--model", str(tiny_checkpoint).encode(), b"caf\xe9"]
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error:") and "not valid UTF-8" in done.stderr
    assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr


def test_same_seed_and_threads_reproduce(pipe):
    """Seeded output is reproducible for a fixed thread count (another count may reorder reductions)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        runs = [pipe.generate("hi", seed=7, max_denoising_steps=4).tokens for _ in range(2)]
    finally:
        torch.set_num_threads(threads)
    assert runs[0] == runs[1]
