"""Training refuses bad input before it writes anything: recipe fields, arguments, and run folders to resume from,
including a pickled trainer state crafted to run code when loaded."""

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dgemma import DiffusionGemma
from dgemma.errors import DgemmaError
from dgemma.sudoku.train import Puzzles, SudokuRecipe
from dgemma.training.trainer import init_weights, train

TINY = dict(size=4, batch=4, hidden=16, layers=1, warmup=1)  # a few ms a step
RUN_FILES = {
    "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "trainer_state.json",
    "trainer_state.safetensors",
}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def quiet(*_):
    pass


class Payload:
    """Unpickling this calls Path.touch(marker): what a crafted trainer_state.pt could do with os.system."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("size", 5, "4, 6 or 9"),
        ("size", [4], "4, 6 or 9"),
        ("objective", "mlm", "'diffusion' or 'ar'"),
        ("steps", 0, "from 1"),
        ("steps", "5", "an integer"),
        ("steps", True, "an integer"),
        ("batch", 0, "from 1"),
        ("warmup", -1, "from 0"),
        ("denoising_steps", 0, "from 1"),
        ("layers", 0, "from 1"),
        ("top_k", 5, "to 4"),  # more than the 4 experts
        ("top_k", 0, "from 1"),
        ("experts", 0, "from 1"),
        ("seed", -1, "from 0"),
        ("hidden", 24, "multiple of 16"),
        ("hidden", 0, "from 16"),
        ("lr", 0.0, "above 0"),
        ("lr", math.nan, "finite"),
        ("lr", math.inf, "finite"),
        ("eps", 1.0, "below 1.0"),
        ("eps", -0.1, "at least 0"),
        ("weight_decay", -1.0, "at least 0"),
        ("lm_weight", math.nan, "finite"),
        ("self_conditioning", 1.5, "at most 1.0"),
        ("self_conditioning", "0.5", "a number"),
        ("blanks", (5, 3), "lo <= hi"),
        ("blanks", (-1, 3), "lo <= hi"),
        ("blanks", (0, 17), "at most 16 blanks"),
        ("blanks", (1, 2, 3), "pair"),
    ],
)
def test_recipe_refuses_each_bad_field(field, value, words):
    with pytest.raises(DgemmaError, match=f"Recipe.{field}") as e:
        SudokuRecipe(**(TINY | {field: value}))
    assert words in str(e.value)


def test_recipe_refuses_a_width_whose_heads_do_not_group():
    with pytest.raises(DgemmaError, match="Recipe.hidden 80 gives 5 heads of 16"):  # over 2 sliding KV heads
        SudokuRecipe(**(TINY | {"hidden": 80, "layers": 2}))


def test_recipe_takes_ints_for_floats_and_lists_for_blanks():
    recipe = SudokuRecipe(**TINY, lr=1, blanks=[2, 6])
    assert recipe.lr == 1.0 and type(recipe.lr) is float and recipe.blanks == (2, 6)


def test_train_refuses_bad_arguments_before_writing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DgemmaError, match="save_every 0"):
        train(SudokuRecipe(**TINY, steps=1), out, save_every=0, log=quiet)
    with pytest.raises(DgemmaError, match="'tpu'"):
        train(SudokuRecipe(**TINY, steps=1), out, device="tpu", log=quiet)
    recipe = SudokuRecipe(**TINY, steps=1)
    recipe.batch = 0  # a dataclass field can be changed after the checks ran: train checks again
    with pytest.raises(DgemmaError, match="Recipe.batch 0"):
        train(recipe, out, log=quiet)
    recipe = SudokuRecipe(**TINY, steps=1)
    recipe.blanks = (3, 20)
    with pytest.raises(DgemmaError, match="at most 16 blanks"):
        Puzzles(recipe)
    assert not out.exists()
    out.write_text("a file")
    with pytest.raises(DgemmaError, match=f"out {out} is a file"):
        train(SudokuRecipe(**TINY, steps=1), out, log=quiet)
    assert out.read_text() == "a file"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_train_on_a_missing_gpu_is_a_clean_error(tmp_path):
    with pytest.raises(DgemmaError, match="no CUDA GPU"):
        train(SudokuRecipe(**TINY, steps=1), tmp_path / "out", device="cuda", log=quiet)
    assert not (tmp_path / "out").exists()


def pickled_run(folder: pathlib.Path, marker: pathlib.Path) -> pathlib.Path:
    """A run folder as an earlier version wrote it: the checkpoint, and a trainer_state.pt that runs code."""
    recipe = SudokuRecipe(**TINY)
    recipe.save_checkpoint(init_weights(DiffusionGemma(recipe.model_config()), 0), folder)
    torch.save({"step": Payload(marker), "recipe": {}}, folder / "trainer_state.pt")
    return folder


def test_the_payload_runs_code_when_unpickled(tmp_path):
    """The crafted file is a real attack: torch.load without weights_only creates the marker."""
    marker = tmp_path / "marker"
    run = pickled_run(tmp_path / "run", marker)
    torch.load(run / "trainer_state.pt", weights_only=False)
    assert marker.exists()


def test_resume_never_unpickles_a_trainer_state_pt(tmp_path):
    marker = tmp_path / "marker"
    run = pickled_run(tmp_path / "run", marker)
    with pytest.raises(DgemmaError, match="trainer_state.pt: a trainer state in the old pickle format"):
        train(SudokuRecipe(**TINY, steps=2), tmp_path / "out", resume=run, log=quiet)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_cli_resume_from_a_pickled_state_is_one_error_line(tmp_path):
    marker = tmp_path / "marker"
    run = pickled_run(tmp_path / "run", marker)
    out = tmp_path / "out"
    argv = ["train", "sudoku", "--resume", str(run), "--out", str(out), "--steps", "1"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "dgemma", *argv], capture_output=True, text=True, env=env, timeout=120)
    lines = (done.stderr + done.stdout).splitlines()
    assert done.returncode == 2, done.stderr
    assert sum(line.startswith("error:") for line in lines) == 1 and "trainer_state.pt" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr + done.stdout
    assert not marker.exists() and not out.exists()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> pathlib.Path:
    """A real run folder, 2 steps; each test corrupts its own copy."""
    folder = tmp_path_factory.mktemp("run") / "run"
    train(SudokuRecipe(**TINY, steps=2), folder, log=quiet)
    return folder


def test_a_run_folder_holds_the_checkpoint_and_the_state_without_pickle(run, tmp_path):
    assert {p.name for p in run.iterdir()} == RUN_FILES
    state = json.loads((run / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["recipe"] == json.loads(json.dumps(asdict(SudokuRecipe(**TINY, steps=2))))
    with safe_open(run / "trainer_state.safetensors", "pt") as f:
        assert f.metadata()["step"] == "2" and f.get_tensor("generator").dtype == torch.uint8
    # Saving over a folder an earlier version wrote drops its stale trainer_state.pt.
    folder = shutil.copytree(run, tmp_path / "again")
    (folder / "trainer_state.pt").write_bytes(b"stale")
    train(SudokuRecipe(**TINY, steps=1), folder, log=quiet)
    assert {p.name for p in folder.iterdir()} == RUN_FILES


def edit_json(edit):
    def apply(folder: pathlib.Path):
        path = folder / "trainer_state.json"
        state = json.loads(path.read_text())
        path.write_bytes(json.dumps(edit(state)).encode() if callable(edit) else edit)

    return apply


def edit_tensors(edit, metadata=None):
    def apply(folder: pathlib.Path):
        path = folder / "trainer_state.safetensors"
        with safe_open(path, "pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        save_file(edit(tensors), path, metadata=meta | (metadata or {}))

    return apply


def without(key):
    def edit(d):
        del d[key]
        return d

    return edit


def removed(name):
    return lambda folder: (folder / name).unlink()


@pytest.mark.parametrize(
    "corrupt, words",
    [
        (edit_json(b"[1, 2]"), "trainer_state.json: a JSON object, not list"),
        (edit_json(b"{"), "trainer_state.json: not valid JSON"),
        (edit_json(b'{"step": "\xff"}'), "trainer_state.json: not valid JSON"),
        (edit_json(lambda s: s | {"extra": 1}), "trainer_state.json: unknown fields ['extra']"),
        (edit_json(without("data_rng")), "trainer_state.json: no field data_rng"),
        (edit_json(lambda s: s | {"recipe": s["recipe"] | {"shape": 1}}), "unknown recipe fields ['shape']"),
        (edit_json(lambda s: s | {"recipe": s["recipe"] | {"hidden": "16"}}), "Recipe.hidden '16'"),
        (edit_json(lambda s: s | {"recipe": s["recipe"] | {"size": 7}}), "Recipe.size 7"),
        (edit_json(lambda s: s | {"recipe": without("lr")(s["recipe"])}), "no recipe field lr"),
        (edit_json(lambda s: s | {"recipe": s["recipe"] | {"lr": math.nan}}), "not a finite number"),
        (edit_json(lambda s: s | {"recipe": "tiny"}), "field recipe is a JSON object"),
        (edit_json(lambda s: s | {"step": 99}), "field step 99"),
        (edit_json(lambda s: s | {"step": -1}), "field step -1"),
        (edit_json(lambda s: s | {"step": 1.5}), "field step 1.5"),
        (edit_json(lambda s: s | {"data_rng": [3, [0] * 3, None]}), "field data_rng"),
        (edit_json(lambda s: s | {"data_rng": [3, [-1] * 625, None]}), "field data_rng"),
        (edit_json(lambda s: s | {"param_groups": {}}), "field param_groups"),
        (edit_json(lambda s: s | {"param_groups": [s["param_groups"][0] | {"betas": [0, 0]}]}), "param_groups betas"),
        (edit_json(lambda s: s | {"param_groups": [s["param_groups"][0] | {"lr": -1}]}), "param_groups lr -1"),
        (edit_json(lambda s: s | {"param_groups": [s["param_groups"][0] | {"amsgrad2": 1}]}), "param_groups holds"),
        (removed("trainer_state.json"), "trainer_state.json does not exist"),
        (removed("trainer_state.safetensors"), "trainer_state.safetensors does not exist"),
        (removed("model.safetensors"), "model.safetensors"),
        (lambda f: (f / "trainer_state.safetensors").write_bytes(b"junk" * 10), "not a readable safetensors file"),
        (edit_tensors(lambda t: t | {"optimizer.0.exp_avg": torch.zeros(3, 3)}), "optimizer.0.exp_avg is"),
        (edit_tensors(lambda t: t | {"optimizer.0.step": torch.zeros(2)}), "optimizer.0.step is"),
        (edit_tensors(lambda t: t | {"optimizer.00.step": torch.zeros(())}), "unexpected tensor optimizer.00.step"),
        (edit_tensors(lambda t: t | {"optimizer.999.step": torch.zeros(())}), "unexpected tensor optimizer.999"),
        (edit_tensors(without("optimizer.1.exp_avg_sq")), "parameter 1"),
        (edit_tensors(without("generator")), "no tensor generator"),
        (edit_tensors(lambda t: t | {"generator": t["generator"][:16]}), "random states"),
        (edit_tensors(lambda t: t | {"generator": torch.full((5056,), 255, dtype=torch.uint8)}), "random states"),
        (edit_tensors(lambda t: t, metadata={"step": "1"}), "saved at step 1"),
    ],
)
def test_resume_refuses_a_bad_trainer_state(run, tmp_path, corrupt, words):
    folder = shutil.copytree(run, tmp_path / "run")
    corrupt(folder)
    out = tmp_path / "out"
    with pytest.raises(DgemmaError) as e:
        train(SudokuRecipe(**TINY, steps=4), out, resume=folder, log=quiet)
    assert words in str(e.value) and str(folder) in str(e.value)
    assert not out.exists()


def test_resume_refuses_a_missing_folder_a_finished_run_and_another_models_weights(run, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DgemmaError, match="resume folder .* does not exist"):
        train(SudokuRecipe(**TINY, steps=4), out, resume=tmp_path / "nowhere", log=quiet)
    with pytest.raises(DgemmaError, match="steps 2: the run in .* is at step 2 already"):
        train(SudokuRecipe(**TINY, steps=2), out, resume=run, log=quiet)
    folder = shutil.copytree(run, tmp_path / "run")
    wider = SudokuRecipe(**(TINY | {"hidden": 32}))
    wider.save_checkpoint(init_weights(DiffusionGemma(wider.model_config()), 0), folder)
    with pytest.raises(DgemmaError, match="config.json does not match the recipe"):
        train(SudokuRecipe(**TINY, steps=4), out, resume=folder, log=quiet)
    assert not out.exists()


def test_an_interrupted_save_leaves_no_trainer_state_beside_newer_weights(tmp_path, monkeypatch):
    """The second save dies after moving in its first file: the folder then has no trainer state, which resume
    refuses, rather than step 1's state beside step 2's config; no scratch folder is left behind."""
    replace, moves = os.replace, []

    def dying_replace(src, dst):
        moves.append(dst)
        if len(moves) == len(RUN_FILES) + 1:
            raise OSError("disk full")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        train(SudokuRecipe(**TINY, steps=2), out, save_every=1, log=quiet)
    monkeypatch.undo()
    assert {p.name for p in out.iterdir()} == RUN_FILES - {"trainer_state.json"}
    with pytest.raises(DgemmaError, match="trainer_state.json does not exist: .* interrupted"):
        train(SudokuRecipe(**TINY, steps=4), tmp_path / "again", resume=out, log=quiet)
