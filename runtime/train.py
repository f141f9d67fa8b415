"""Training DiffusionGemma from scratch on Sudoku, with the model's own forward (the reference backend trains).

The objective is ../shared/docs/sampler.md section 5: uniform-state corruption of the canvas (each token replaced
by a uniform random vocabulary token with probability t ~ U(eps, 1), no mask token), flat cross-entropy over every
canvas position, self-conditioning in two passes with probability 0.5 (the first without gradients), and the
encoder's causal LM loss on the clean answer with weight `lm_weight`. Teacher forcing is block-causal: the decoder
denoises the answer's one canvas against the K/V the encoder wrote for the prompt. `--objective ar` trains the same
architecture as a plain causal LM through the encoder: the autoregressive baseline.

Checkpoints are written in the Hugging Face layout `load_model` reads, plus the trainer state (step, optimizer and
random states), so `--resume DIR` continues a run exactly where it stopped. The trainer state is
trainer_state.safetensors (the optimizer's tensors and the torch generator's state) and trainer_state.json (the
recipe, the step, the data RNG's state and the optimizer's hyperparameters): no pickle, so resuming from a folder
someone else wrote cannot run code, and every field is checked before it is used.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import DgemmaError
from ..model.cache import KVCache
from ..model.checkpoint import load_model, save_model
from ..model.config import FULL, SLIDING, Config
from ..model.device import resolve_device
from ..model.model import DiffusionGemma
from . import sudoku

STATE_JSON, STATE_TENSORS = "trainer_state.json", "trainer_state.safetensors"
PICKLED_STATE = "trainer_state.pt"  # the trainer state of earlier versions: a pickle, never opened


@dataclass
class Recipe:
    size: int = 4
    blanks: tuple[int, int] | None = None  # per puzzle, uniform in [lo, hi]; None: sudoku.BLANKS[size]
    objective: str = "diffusion"  # or "ar": the autoregressive baseline
    lm_weight: float = 0.0  # encoder LM loss weight; 1 cut a 0.2M model's 4x4 solve rate from 52-83% to 21% (sudoku.md)
    self_conditioning: float = 0.5  # probability per example of feeding the first pass's logits to the second
    eps: float = 1e-3  # t ~ U(eps, 1)
    steps: int = 4000
    batch: int = 128
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    hidden: int = 64
    layers: int = 2
    experts: int = 4
    top_k: int = 2
    seed: int = 0
    denoising_steps: int = 16  # max_denoising_steps of the generation_config.json the checkpoint ships

    def __post_init__(self):
        """Checks every field (types too: a resumed run's recipe comes from a file), so a bad value stops here, named,
        instead of deep in the model or hours into a run."""
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size not in sudoku.BOXES:
            raise DgemmaError(f"Recipe.size {self.size!r}: puzzles are 4x4, 6x6 or 9x9 (4, 6 or 9)")
        if not isinstance(self.objective, str) or self.objective not in ("diffusion", "ar"):
            raise DgemmaError(f"Recipe.objective {self.objective!r}: 'diffusion' or 'ar'")
        if self.blanks is not None:
            try:
                self.blanks = sudoku.blank_range(self.size, self.blanks, unique=False)
            except DgemmaError as e:
                raise DgemmaError(f"Recipe.{e}") from None
        for name, lo, hi in (
            ("steps", 1, None), ("batch", 1, None), ("warmup", 0, None), ("hidden", 16, None), ("layers", 1, None),
            ("experts", 1, None), ("top_k", 1, self.experts), ("seed", 0, 2**63 - 1), ("denoising_steps", 1, None),
        ):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise DgemmaError(f"Recipe.{name} {value!r}: an integer")
            if value < lo or (hi is not None and value > hi):
                raise DgemmaError(f"Recipe.{name} {value}: from {lo}" + (f" to {hi}" if hi is not None else " up"))
        # name, lowest, highest, whether the highest is excluded
        for name, lo, hi, below in (
            ("lm_weight", 0.0, math.inf, False), ("self_conditioning", 0.0, 1.0, False), ("eps", 0.0, 1.0, True),
            ("lr", 0.0, math.inf, False), ("weight_decay", 0.0, math.inf, False),
        ):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise DgemmaError(f"Recipe.{name} {value!r}: a number")
            if not math.isfinite(value) or value < lo or value > hi or (below and value == hi):
                bounds = f"below {hi}" if below else "finite" if hi == math.inf else f"at most {hi}"
                raise DgemmaError(f"Recipe.{name} {value}: at least {lo} and {bounds}")
            setattr(self, name, float(value))
        if self.lr == 0:
            raise DgemmaError("Recipe.lr 0.0: a learning rate above 0")
        if self.hidden % 16:
            raise DgemmaError(f"Recipe.hidden {self.hidden}: a multiple of 16 (the model's heads are 16 wide)")
        try:
            self.model_config()
        except ValueError as e:  # the query heads must group over the KV heads: 16, 32, 48, 64, 96, 128 work
            raise DgemmaError(f"Recipe.hidden {self.hidden} gives {self.hidden // 16} heads of 16: {e}") from None

    def model_config(self) -> Config:
        """Config.tiny's proportions scaled to width `hidden` (at 64 exactly Config.tiny's shapes): 16-wide heads;
        the sliding window covers the whole prompt and canvas, so only the RoPE differs between the layer types."""
        n, C, H = self.size, self.size**2 + 1, self.hidden // 16
        return Config.tiny(
            vocab_size=sudoku.VOCAB_SIZE,
            hidden_size=self.hidden,
            intermediate_size=self.hidden * 3 // 2,
            moe_intermediate_size=self.hidden // 2,
            num_hidden_layers=self.layers,
            layer_types=[SLIDING] * (self.layers - 1) + [FULL],
            num_attention_heads=H,
            num_key_value_heads=max(1, H // 2),
            num_global_key_value_heads=max(1, H // 4),
            num_experts=self.experts,
            top_k_experts=self.top_k,
            sliding_window=2 * C + 1,
            max_position_embeddings=4 * C,
            canvas_length=n * n + 1,
        )

    def generation_config(self) -> dict:
        """The sampler the checkpoint ships with. Hotter than the chat model's 0.4-0.8: on 1,000 4x4 puzzles at 16
        steps, 0.4-0.8 solved 95.2%, 0.6-1.0 97.7%, 0.8-1.2 99.2% (8.2 steps), 1.0-1.5 99.6% but never stopped early;
        uniform-state renoising needs the stochasticity."""
        return dict(
            max_denoising_steps=self.denoising_steps, t_min=0.8, t_max=1.2, stability_threshold=1,
            confidence_threshold=0.005, max_new_tokens=self.size**2 + 1, eos_token_id=[sudoku.EOS],
            pad_token_id=sudoku.PAD,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# The objective


def corrupt(canvas: torch.Tensor, t: torch.Tensor, vocab_size: int, generator: torch.Generator):
    """Uniform-state corruption: each token of canvas (B, C) becomes a uniform random token with probability t (B,).

    Returns the noisy canvas and which positions were redrawn (a redraw may land on the clean token).
    """
    redrawn = torch.rand(canvas.shape, generator=generator, device=canvas.device) < t[:, None]
    noise = torch.randint(0, vocab_size, canvas.shape, generator=generator, device=canvas.device)
    return torch.where(redrawn, noise, canvas), redrawn


def fork(cache: KVCache) -> KVCache:
    """A copy with its own K/V tensors. The cache is written in place, and autograd forbids writing to a tensor an
    earlier pass saved for its backward, so each pass that writes after a differentiable pass writes to a fork."""
    twin = copy.copy(cache)
    twin.k, twin.v = [k.clone() for k in cache.k], [v.clone() for v in cache.v]
    twin.pos = {kind: p.clone() for kind, p in cache.pos.items()}
    twin.valid = {kind: v.clone() for kind, v in cache.valid.items()}
    return twin


def encode(model: DiffusionGemma, ids: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
    """`model.encode` with gradients: causal passes over ids (B, T) in canvas-sized chunks -> (B, T, D), new cache."""
    out = []
    for start in range(0, ids.shape[1], cache.chunk):
        chunk = ids[:, start : start + cache.chunk]
        out.append(model._layers(model.embed(chunk), cache, None, decoder=False))
        cache.commit(chunk.shape[1])
        cache = fork(cache)
    return torch.cat(out, dim=1), cache


def losses(model: DiffusionGemma, prompt, canvas, recipe: Recipe, generator: torch.Generator) -> dict:
    """prompt (B, P), clean canvas (B, C) -> {"diffusion": CE over the canvas, "lm": the encoder's next-token CE}."""
    B, P = prompt.shape
    C = canvas.shape[1]
    h_prompt, cache = encode(model, prompt, model.new_cache(B, P + C))
    out = {}
    if recipe.objective == "ar" or recipe.lm_weight > 0:
        # Teacher forcing: the encoder reads prompt + clean answer; the prompt's last position predicts the first cell.
        h_canvas, _ = encode(model, canvas, fork(cache))
        h = torch.cat([h_prompt[:, -1:], h_canvas[:, :-1]], dim=1)
        out["lm"] = F.cross_entropy(model.logits(h).flatten(0, 1), canvas.flatten())
    if recipe.objective == "diffusion":
        t = recipe.eps + (1 - recipe.eps) * torch.rand(B, generator=generator, device=canvas.device)
        noisy, _ = corrupt(canvas, t, model.config.vocab_size, generator)
        embedded = model.embed(noisy)
        soft = torch.zeros_like(embedded)  # no self-conditioning: exactly the sampler's first step
        use = torch.rand(B, generator=generator, device=canvas.device) < recipe.self_conditioning
        if use.any():
            first = model.denoise(noisy, fork(cache))  # no_grad: the first pass only feeds the second
            soft = torch.where(use[:, None, None], model.soft_embedding(first), soft)
        h = model._layers(model.self_conditioning(embedded, soft), cache, None, decoder=True)
        out["diffusion"] = F.cross_entropy(model.logits(h).flatten(0, 1), canvas.flatten())
    return out


def total(parts: dict, recipe: Recipe) -> torch.Tensor:
    if recipe.objective == "ar":
        return parts["lm"]
    return parts["diffusion"] + recipe.lm_weight * parts["lm"] if "lm" in parts else parts["diffusion"]


# ---------------------------------------------------------------------------------------------------------------
# Data, initialization, checkpoints


class Puzzles:
    """Training batches: each puzzle is a random symmetry of a grid from a pool built by backtracking, blanked at
    random (no uniqueness needed: the target is the grid the puzzle came from)."""

    POOL = 512  # the symmetries multiply each grid by up to 2 * 9! * 6^8; the pool only saves backtracking time

    def __init__(self, recipe: Recipe):
        self.n, self.blanks = recipe.size, sudoku.blank_range(recipe.size, recipe.blanks, unique=False)
        self.rng = random.Random(recipe.seed)
        pool_rng = random.Random(f"pool {recipe.seed}")
        self.pool = [sudoku.random_grid(self.n, pool_rng) for _ in range(self.POOL)]

    def batch(self, B: int) -> tuple[torch.Tensor, torch.Tensor]:
        prompts, canvases = [], []
        for _ in range(B):
            solution = sudoku.shuffle(self.rng.choice(self.pool), self.rng)
            puzzle = sudoku.blank(solution, self.rng.randint(*self.blanks), self.rng)
            prompts.append(sudoku.prompt_ids(puzzle))
            canvases.append(sudoku.canvas_ids(solution))
        return torch.tensor(prompts), torch.tensor(canvases)


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


def save_checkpoint(model: DiffusionGemma, path: str | Path, generation: dict) -> Path:
    """config.json, generation_config.json, model.safetensors and tokenizer.json, as load_model reads them."""
    path = save_model(model, path, eos_token_id=[sudoku.EOS], pad_token_id=sudoku.PAD)
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    sudoku.build_tokenizer(path)
    return path


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
        save_checkpoint(model, scratch, recipe.generation_config())
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


def read_state_json(folder: Path) -> tuple[Recipe, int, tuple, dict]:
    """trainer_state.json, checked -> (recipe, step, the data RNG's state, the optimizer's hyperparameters)."""
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
    names = [f.name for f in dataclasses.fields(Recipe)]
    if not isinstance(stored, dict):
        raise DgemmaError(f"{path}: field recipe is a JSON object, not {type(stored).__name__}")
    if unknown := sorted(set(stored) - set(names)):
        raise DgemmaError(f"{path}: unknown recipe fields {unknown}")
    if missing := [name for name in names if name not in stored]:
        raise DgemmaError(f"{path}: no recipe field {missing[0]}")
    try:
        recipe = Recipe(**stored)
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


def resume_run(folder: Path, steps: int, device: torch.device):
    """The run saved in `folder`, checked before anything is trained, set to go on to `steps` ->
    (recipe, step, model, optimizer, data, generator) as they were when it was saved."""
    recipe, step, rng_state, hyper = read_state_json(folder)
    path = folder / STATE_JSON
    if steps <= step:
        raise DgemmaError(f"steps {steps}: the run in {folder} is at step {step} already; ask for more steps")
    recipe = dataclasses.replace(recipe, steps=steps)
    model = load_model(folder, dtype=torch.float32, device=device)
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
    data = Puzzles(recipe)
    generator = torch.Generator(device)
    fresh = generator.get_state()
    try:
        if generator_state.dtype != torch.uint8 or generator_state.shape != fresh.shape:
            raise ValueError(f"{generator_state.dtype} {list(generator_state.shape)}, not uint8 {list(fresh.shape)}")
        generator.set_state(generator_state)
        data.rng.setstate(rng_state)
    except (RuntimeError, ValueError, TypeError, OverflowError) as e:
        raise DgemmaError(f"{folder}: the saved random states do not fit {device.type} generators ({e})") from None
    return recipe, step, model, optimizer, data, generator


# ---------------------------------------------------------------------------------------------------------------
# The loop


def train(recipe: Recipe, out, *, resume=None, save_every: int = 500, log=print, device="cpu"):
    """Trains to `recipe.steps` (a resumed run keeps its recipe but for `steps`) -> the model and its last loss.

    Every argument and the whole resumed state are checked before `out` is created or anything is trained."""
    device = resolve_device(device)
    recipe = dataclasses.replace(recipe)  # checks the fields again: they can be set after the Recipe is made
    if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 1:
        raise DgemmaError(f"save_every {save_every!r}: save every 1 or more steps")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DgemmaError(f"out {out} is a file, not a folder")
    if resume is not None:
        recipe, step, model, optimizer, data, generator = resume_run(Path(resume), recipe.steps, device)
    else:
        model, step = init_weights(DiffusionGemma(recipe.model_config()), recipe.seed).to(device), 0
        optimizer = make_optimizer(model, recipe)
        data, generator = Puzzles(recipe), torch.Generator(device).manual_seed(recipe.seed)
    out.mkdir(parents=True, exist_ok=True)  # fails now, not at the first save, if `out` cannot be written
    model.train()
    start, window = time.perf_counter(), []
    loss = float("nan")
    while step < recipe.steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, recipe)
        prompt, canvas = (x.to(device) for x in data.batch(recipe.batch))
        with torch.enable_grad():
            parts = losses(model, prompt, canvas, recipe, generator)
            objective = total(parts, recipe)
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        window.append({k: v.item() for k, v in parts.items()} | {"loss": objective.item()})
        if step % 50 == 0 or step == recipe.steps:
            means = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
            loss = means["loss"]
            parts_text = " ".join(f"{k} {v:.4f}" for k, v in means.items())
            log(f"step {step}/{recipe.steps}  {parts_text}  lr {learning_rate(step - 1, recipe):.2e}  "
                f"{time.perf_counter() - start:.0f} s")  # fmt: skip
            window = []
        if step % save_every == 0 or step == recipe.steps:
            save_run(out, model, recipe, step, optimizer, data.rng, generator)
    return model.eval(), loss
