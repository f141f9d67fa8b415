"""The public API (`from dgemma import DiffusionGemma, Pipeline`) and the `dgemma` command line."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dgemma import Pipeline
from dgemma.cli import main
from dgemma.model.load import load_model
from dgemma.runtime.sampler import SamplingConfig, SeededDraws


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return Pipeline.from_pretrained(tiny_checkpoint, dtype=torch.float32)


def test_defaults_come_from_generation_config(pipe):
    cfg = pipe.sampling_config()
    assert cfg == SamplingConfig()  # the tiny checkpoint ships the official generation_config.json values
    assert pipe.sampling_config(max_denoising_steps=3, t_max=0.9).max_denoising_steps == 3


def test_chat_prompt_generates_whole_canvases(pipe):
    drafts, commits = [], []
    out = pipe.generate(
        "Why is the sky blue?", max_new_tokens=20, max_denoising_steps=3, stop_ids=[],
        on_draft=drafts.append, on_commit=lambda k, c: commits.append((k, c)),
    )  # fmt: skip
    C = pipe.model.config.canvas_length
    prompt = pipe.tokenizer.chat([{"role": "user", "content": "Why is the sky blue?"}])
    assert out.sequences.shape == (1, len(prompt) + 3 * C)  # 20 tokens -> 3 canvases of 8, not truncated
    assert out.sequences[0, : len(prompt)].tolist() == prompt
    assert [k for k, _ in commits] == [0, 1, 2] and all(c.shape == (1, C) for _, c in commits)
    assert len(drafts) == sum(out.stats.steps_per_canvas) == 9
    assert drafts[-1].argmax.tolist() == commits[-1][1].tolist()  # the committed canvas is the last argmax
    assert out.tokens[0] == out.sequences[0, len(prompt) :].tolist()
    assert out.stats.encoder_passes == 3 and out.stats.decoder_passes == [9]
    assert out.stats.tokens_per_forward[0] == pytest.approx(out.stats.new_tokens / 9)
    assert out.text == pipe.decode(out.tokens[0])  # stop_ids=[]: every generated token is text


def test_seeded_draws_reproduce_and_differ(pipe):
    a = pipe.generate([5, 6, 7], max_new_tokens=8, max_denoising_steps=4, seed=1)
    b = pipe.generate([5, 6, 7], max_new_tokens=8, max_denoising_steps=4, seed=1)
    c = pipe.generate([5, 6, 7], max_new_tokens=8, max_denoising_steps=4, seed=2)
    assert torch.equal(a.sequences, b.sequences) and not torch.equal(a.sequences, c.sequences)


def test_batch_rows_equal_single_rows(pipe):
    """Left padding is invisible: with no randomness left (one step, accepted or not), each row of a batch equals
    the same prompt run alone."""
    rows = [[5, 6, 7, 8, 9], [40, 41, 42]]
    batch = pipe.generate(rows, max_new_tokens=8, max_denoising_steps=1, seed=0, stop_ids=[])
    P = max(map(len, rows))
    first = SeededDraws(0, "cpu").canvas(2, 8, 256, "cpu")  # the batch's starting canvas
    for i, row in enumerate(rows):
        alone = pipe.model.new_cache(1, len(row) + 8)
        pipe.model.encode(torch.tensor([row]), alone)
        logits = pipe.model.denoise(first[i : i + 1], alone)
        assert batch.sequences[i, P:].tolist() == logits.argmax(-1)[0].tolist()


def test_stop_ids_end_generation(pipe):
    free = pipe.generate([5, 6, 7], max_new_tokens=24, max_denoising_steps=2, seed=3, stop_ids=[])
    stop = free.sequences[0, 3 + 4].item()  # a token the model emits in the first canvas
    out = pipe.generate([5, 6, 7], max_new_tokens=24, max_denoising_steps=2, seed=3, stop_ids=[stop])
    assert len(out.stats.steps_per_canvas) == 1  # no second canvas once every row has stopped
    assert out.tokens[0][-1] == stop and stop not in out.tokens[0][:-1]
    tail = out.sequences[0, 3 + len(out.tokens[0]) :]
    assert (tail == 0).all()  # padded after the stop id


def test_warm_start_is_the_first_canvas(pipe):
    warm = torch.arange(100, 108)[None]
    seen = []
    pipe.generate([5, 6, 7], warm_start=warm, max_new_tokens=8, max_denoising_steps=1, on_draft=seen.append)
    cache = pipe.model.new_cache(1, 11)
    pipe.model.encode(torch.tensor([[5, 6, 7]]), cache)
    assert seen[0].argmax.tolist() == pipe.model.denoise(warm, cache).argmax(-1).tolist()


@pytest.mark.parametrize(
    "prompt, error",
    [
        ([], "empty prompt"),  # nothing to condition on
        ([5, 300], "token ids"),  # outside the tiny vocabulary of 256
    ],
)
def test_bad_prompts_are_refused(pipe, prompt, error):
    with pytest.raises(ValueError, match=error):
        pipe.generate(prompt, max_new_tokens=8)


def test_model_api(tiny_checkpoint):
    model = load_model(tiny_checkpoint, dtype=torch.float32)
    cache = model.new_cache(2, 32)
    h = model.encode(torch.randint(3, 256, (2, 11)), cache)
    assert h.shape == (2, 11, 64) and cache.length == 11
    logits = model.denoise(torch.randint(0, 256, (2, 8)), cache)
    assert logits.shape == (2, 8, 256) and logits.dtype == torch.float32 and logits.abs().max() <= 30
    assert cache.length == 11
    with pytest.raises(ValueError, match="backend"):
        load_model(tiny_checkpoint, backend="cuda-magic")
    with pytest.raises(ValueError, match="full"):
        model.encode(torch.randint(3, 256, (2, 30)), cache)


def test_cli_generate(tiny_checkpoint, capsys):
    args = ["generate", "--model", str(tiny_checkpoint), "--max-new-tokens", "8", "--steps", "3", "Hello", "there"]
    assert main(args) == 0
    out = capsys.readouterr().out
    same = Pipeline.from_pretrained(tiny_checkpoint).generate("Hello there", max_new_tokens=8, max_denoising_steps=3)
    assert "answer ─" in out and same.text.strip() and same.text.strip() in out  # the CLI's seed 0, bf16
    assert "tokens/s" in out and "steps per canvas [3]" in out and "1 thread(s)" in out


def test_cli_console_script_reports_bad_checkpoint(tmp_path):
    script = Path(sys.executable).parent / "dgemma"
    done = subprocess.run([script, "generate", "--model", str(tmp_path), "hi"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("error:") and "config.json" in done.stderr and len(done.stderr.splitlines()) == 1


def test_help_does_not_import_torch():
    """`dgemma --help` and a command's help answer from the torch-free parser."""
    probe = (
        "import sys; from dgemma.cli import main\n"
        "for argv in (['--help'], ['generate', '--help'], ['export', 'onnx', '--help']):\n"
        "    try: main(argv)\n"
        "    except SystemExit as e: assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "generate" in done.stdout and "--max-prompt" in done.stdout
