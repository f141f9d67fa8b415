"""The trainer: the loop, AdamW with warmup and a cosine schedule, weight init, and runs saved and resumed exactly.

It trains whatever a Recipe describes (recipe.py): the task gives the model's config, the batches and the files a
checkpoint holds beside the weights; the loss is objective.py's. A run folder is a checkpoint in the Hugging Face layout
DiffusionGemma.from_pretrained reads, plus the trainer state (step, optimizer and random states), so `resume` continues
a run exactly where it stopped. The trainer state is trainer_state.safetensors (the optimizer's tensors and the torch
generator's state) and trainer_state.json (the recipe, the step, the data RNG's state and the optimizer's
hyperparameters): no pickle, so resuming from a folder someone else wrote cannot run code, and every field is checked
before it is used.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import DgemmaError
from ..model.device import resolve_device
from ..model.model import DiffusionGemma
from .objective import losses, total
from .recipe import Recipe

STATE_JSON, STATE_TENSORS = "trainer_state.json", "trainer_state.safetensors"
PICKLED_STATE = "trainer_state.pt"  # the trainer state of earlier versions: a pickle, never opened


def init_weights(model: DiffusionGemma, seed: int, std: float = 0.02) -> DiffusionGemma:
    """transformers' Gemma init: N(0, 0.02) for every matrix and the embedding, ones for norms and scales."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def learning_rate(step: int, recipe: Recipe) -> float:
    """Linear warmup, then cosine to a tenth of the peak (Google's Sudoku schedule)."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


# ---------------------------------------------------------------------------------------------------------------
# The trainer state: safetensors and JSON, checked field by field on load


def make_optimizer(model: DiffusionGemma, recipe: Recipe) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)


def hyperparameters(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's one parameter group without its parameters, in JSON's types (tuples as lists)."""
    (group,) = optimizer.param_groups
    return {k: list(v) if isinstance(v, tuple) else v for k, v in group.items() if k != "params"}


def save_run(folder: Path, model: DiffusionGemma, recipe: Recipe, step: int, optimizer, data_rng, generator) -> None:
    """The checkpoint and the trainer state, written to a scratch folder inside `folder`, then moved in file by file,
    trainer_state.json last and only once the old one is gone. An interrupted save leaves every file whole, and either
    the previous step's trainer state or none (which resume refuses), never a trainer state beside newer weights."""
    folder.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".saving-", dir=folder))
    try:
        recipe.save_checkpoint(model, scratch)
        state = optimizer.state_dict()["state"]
        tensors = {f"optimizer.{i}.{k}": t.detach().cpu().contiguous() for i, s in state.items() for k, t in s.items()}
        tensors["generator"] = generator.get_state()
        save_file(tensors, scratch / STATE_TENSORS, metadata={"step": str(step)})
        version, words, gauss = data_rng.getstate()
        doc = {"recipe": asdict(recipe), "step": step, "data_rng": [version, list(words), gauss]}
        (scratch / STATE_JSON).write_text(json.dumps(doc | {"param_groups": [hyperparameters(optimizer)]}) + "\n")
        for name in (STATE_JSON, PICKLED_STATE):  # a trainer_state.pt left by an earlier version would be stale
            (folder / name).unlink(missing_ok=True)
        for file in sorted(scratch.iterdir(), key=lambda f: f.name == STATE_JSON):
            os.replace(file, folder / file.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _not_finite(name: str):
    raise ValueError(f"{name} is not a finite number")


def read_state_json(folder: Path, kind: type[Recipe]) -> tuple[Recipe, int, tuple, dict]:
    """trainer_state.json, checked -> (its recipe, as a `kind`; the step; the data RNG's state; the optimizer's
    hyperparameters)."""
    path = folder / STATE_JSON
    if (folder / PICKLED_STATE).exists():
        raise DgemmaError(
            f"{folder / PICKLED_STATE}: a trainer state in the old pickle format, which can run code when loaded, so "
            f"it is not read; delete it and resume from a folder this version wrote (or train again)"
        )
    if not path.is_file():
        if not folder.is_dir():
            raise DgemmaError(f"resume folder {folder} does not exist")
        raise DgemmaError(f"{path} does not exist: not a folder train wrote, or its last save was interrupted")
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_not_finite)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DgemmaError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise DgemmaError(f"{path}: a JSON object, not {type(doc).__name__}")
    fields = ("recipe", "step", "data_rng", "param_groups")
    if unknown := sorted(set(doc) - set(fields)):
        raise DgemmaError(f"{path}: unknown fields {unknown}")
    if missing := [f for f in fields if f not in doc]:
        raise DgemmaError(f"{path}: no field {missing[0]}")

    stored = doc["recipe"]
    names = [f.name for f in dataclasses.fields(kind)]
    if not isinstance(stored, dict):
        raise DgemmaError(f"{path}: field recipe is a JSON object, not {type(stored).__name__}")
    if unknown := sorted(set(stored) - set(names)):
        raise DgemmaError(f"{path}: unknown recipe fields {unknown}")
    if missing := [name for name in names if name not in stored]:
        raise DgemmaError(f"{path}: no recipe field {missing[0]}")
    try:
        recipe = kind(**stored)
    except DgemmaError as e:
        raise DgemmaError(f"{path}: field recipe: {e}") from None

    step = doc["step"]
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= recipe.steps:
        raise DgemmaError(f"{path}: field step {step!r}: an integer from 0 to the recipe's steps ({recipe.steps})")

    rng = doc["data_rng"]  # random.Random.getstate(): (3, 624 words and an index, gauss_next)
    if not (
        isinstance(rng, list)
        and len(rng) == 3
        and rng[0] == 3
        and isinstance(rng[1], list)
        and len(rng[1]) == 625
        and all(type(w) is int and 0 <= w < 2**32 for w in rng[1])
        and rng[1][-1] <= 624
        and (rng[2] is None or type(rng[2]) is float)
    ):
        raise DgemmaError(f"{path}: field data_rng is not a random.Random state ([3, 625 words, null or a float])")

    groups = doc["param_groups"]
    if not (isinstance(groups, list) and len(groups) == 1 and isinstance(groups[0], dict)):
        raise DgemmaError(f"{path}: field param_groups is a list of one JSON object (the optimizer's hyperparameters)")
    return recipe, step, (3, tuple(rng[1]), rng[2]), groups[0]


def read_state_tensors(folder: Path, model: DiffusionGemma, step: int) -> tuple[dict, torch.Tensor]:
    """trainer_state.safetensors, checked against the model's parameters -> (AdamW's per-parameter state by index,
    the generator state)."""
    path = folder / STATE_TENSORS
    if not path.is_file():
        raise DgemmaError(f"{path} does not exist: not a folder train wrote, or its last save was interrupted")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as e:
        raise DgemmaError(f"{path}: not a readable safetensors file ({e})") from None
    if metadata.get("step") != str(step):
        raise DgemmaError(f"{path}: saved at step {metadata.get('step')}, {STATE_JSON} at {step} (two saves mixed)")
    generator = tensors.pop("generator", None)
    if generator is None:
        raise DgemmaError(f"{path}: no tensor generator (the torch generator's state)")
    params = list(model.named_parameters())
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = re.fullmatch(r"optimizer\.(0|[1-9][0-9]*)\.(step|exp_avg|exp_avg_sq)", key)
        if not m or int(m[1]) >= len(params):
            raise DgemmaError(f"{path}: unexpected tensor {key} (the model has {len(params)} parameters)")
        i, kind = int(m[1]), m[2]
        name, p = params[i]
        shape, dtype = (torch.Size(), torch.float32) if kind == "step" else (p.shape, p.dtype)
        if tensor.shape != shape or tensor.dtype != dtype:
            raise DgemmaError(
                f"{path}: {key} is {tensor.dtype} {list(tensor.shape)}, parameter {i} ({name}) needs "
                f"{dtype} {list(shape)}"
            )
        state.setdefault(i, {})[kind] = tensor
    for i, kinds in state.items():  # a parameter that never had a gradient has no state at all
        if len(kinds) != 3:
            raise DgemmaError(f"{path}: parameter {i} ({params[i][0]}) has optimizer state {sorted(kinds)}, not all 3")
    return state, generator


def resume_run(folder: Path, kind: type[Recipe], steps: int, device: torch.device):
    """The run saved in `folder` with a recipe of class `kind`, checked before anything is trained, set to go on to
    `steps` -> (recipe, step, model, optimizer, data RNG, generator) as they were when it was saved."""
    recipe, step, rng_state, hyper = read_state_json(folder, kind)
    path = folder / STATE_JSON
    if steps <= step:
        raise DgemmaError(f"steps {steps}: the run in {folder} is at step {step} already; ask for more steps")
    recipe = dataclasses.replace(recipe, steps=steps)
    model = DiffusionGemma.from_pretrained(folder, dtype=torch.float32, device=device)
    if model.config != recipe.model_config():
        raise DgemmaError(f"{folder}: the model's config.json does not match the recipe in {path}")
    optimizer = make_optimizer(model, recipe)
    built = hyperparameters(optimizer)
    if set(hyper) != set(built):
        raise DgemmaError(f"{path}: param_groups holds {sorted(hyper)}, this torch's AdamW {sorted(built)}")
    for key, value in built.items():  # all but the learning rate, which each step sets from the schedule
        if key != "lr" and hyper[key] != value:
            raise DgemmaError(f"{path}: param_groups {key} {hyper[key]!r}, but the recipe builds {value!r}")
    lr = hyper["lr"]
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 <= lr < math.inf:
        raise DgemmaError(f"{path}: param_groups lr {lr!r}: a finite number from 0")
    state, generator_state = read_state_tensors(folder, model, step)
    saved = optimizer.state_dict()
    saved["state"], saved["param_groups"][0]["lr"] = state, lr
    optimizer.load_state_dict(saved)
    data_rng, generator = random.Random(), torch.Generator(device)
    fresh = generator.get_state()
    try:
        if generator_state.dtype != torch.uint8 or generator_state.shape != fresh.shape:
            raise ValueError(f"{generator_state.dtype} {list(generator_state.shape)}, not uint8 {list(fresh.shape)}")
        generator.set_state(generator_state)
        data_rng.setstate(rng_state)
    except (RuntimeError, ValueError, TypeError, OverflowError) as e:
        raise DgemmaError(f"{folder}: the saved random states do not fit {device.type} generators ({e})") from None
    return recipe, step, model, optimizer, data_rng, generator


# ---------------------------------------------------------------------------------------------------------------
# The loop


def train(recipe: Recipe, out, *, resume=None, save_every: int = 500, log=print, device="cpu", time_budget_s=None):
    """Trains the model `recipe` describes to `recipe.steps`, saving the run in `out` every `save_every` steps and
    at the end -> the model and its last loss. `resume` is a run folder to continue: its recipe, of the class of
    `recipe`, is kept but for `steps`.

    `time_budget_s` bounds the training loop's wall-clock time: the first step to end past it is the last, and the run
    is saved there, resumable to `recipe.steps` (the learning-rate schedule stays the one for `recipe.steps`).

    Every argument, the whole resumed state and the recipe's batches are checked before `out` is created or
    anything is trained."""
    device = resolve_device(device)
    recipe = dataclasses.replace(recipe)  # checks the fields again: they can be set after the Recipe is made
    if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 1:
        raise DgemmaError(f"save_every {save_every!r}: save every 1 or more steps")
    if time_budget_s is not None and (
        isinstance(time_budget_s, bool)
        or not isinstance(time_budget_s, int | float)
        or not 0 < time_budget_s < math.inf
    ):
        raise DgemmaError(f"time_budget_s {time_budget_s!r}: a positive, finite number of seconds")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DgemmaError(f"out {out} is a file, not a folder")
    if resume is not None:
        recipe, step, model, optimizer, data_rng, generator = resume_run(
            Path(resume), type(recipe), recipe.steps, device
        )
    else:
        model, step = init_weights(DiffusionGemma(recipe.model_config()), recipe.seed).to(device), 0
        optimizer = make_optimizer(model, recipe)
        data_rng, generator = random.Random(recipe.seed), torch.Generator(device).manual_seed(recipe.seed)
    batches = recipe.batches()
    out.mkdir(parents=True, exist_ok=True)  # fails now, not at the first save, if `out` cannot be written
    model.train()
    start, window = time.perf_counter(), []
    loss = float("nan")
    while step < recipe.steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, recipe)
        prompt, canvas = (x.to(device) for x in batches(recipe.batch, data_rng))
        with torch.enable_grad():
            parts = losses(model, prompt, canvas, recipe, generator)
            objective = total(parts, recipe)
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        # .item() waits for the device, so the budget below counts finished steps, not queued ones
        window.append({k: v.item() for k, v in parts.items()} | {"loss": objective.item()})
        over = time_budget_s is not None and time.perf_counter() - start >= time_budget_s
        if step % 50 == 0 or step == recipe.steps or over:
            means = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
            loss = means["loss"]
            parts_text = " ".join(f"{k} {v:.4f}" for k, v in means.items())
            log(f"step {step}/{recipe.steps}  {parts_text}  lr {learning_rate(step - 1, recipe):.2e}  "
                f"{time.perf_counter() - start:.0f} s")  # fmt: skip
            window = []
        if step % save_every == 0 or step == recipe.steps or over:
            save_run(out, model, recipe, step, optimizer, data_rng, generator)
        if over and step < recipe.steps:
            log(f"time budget of {time_budget_s:g} s reached at step {step}/{recipe.steps}: saved, resumable")
            break
    return model.eval(), loss
