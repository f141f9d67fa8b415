"""The text-model config: one dataclass with the Hugging Face field names, read from a checkpoint's config.json.

Also the names of the choices a model is built with (layer types, window modes, backends, load dtypes), here
because this module imports nothing heavy: the command line builds its options from them without importing torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import DgemmaError

SLIDING, FULL = "sliding_attention", "full_attention"
WINDOW_MODES = ("shared", "per_token")  # the decoder's sliding window over the committed prefix (cache.py)
BACKENDS = ("torch", "triton")  # triton: the fused kernels of dgemma.kernels (a CUDA device, or TRITON_INTERPRET=1)
ENGINE_BACKENDS = ("onnxruntime", "tensorrt")  # exported graphs run by runtime/engine.py
DTYPES = ("bf16", "fp32")  # what a checkpoint loads in
MODEL_TYPES = ("diffusion_gemma", "diffusion_gemma_text")  # config.json's model_type, top level and text_config
TOKEN_FIELDS = ("pad_token_id", "eos_token_id", "bos_token_id")  # ids in [0, vocab_size), eos also a list
INT_LIMIT = 2**30  # sizes and positions stay below the kernels' int32 arithmetic (cache.UNBOUNDED)


def _default_rope() -> dict:
    return {
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    }


@dataclass
class Config:
    vocab_size: int = 262_144
    hidden_size: int = 2816
    intermediate_size: int = 2112  # dense GeGLU width, also the self-conditioning MLP width
    moe_intermediate_size: int = 704  # per-expert width
    num_hidden_layers: int = 30
    layer_types: list[str] = field(default_factory=lambda: ([SLIDING] * 5 + [FULL]) * 5)
    num_attention_heads: int = 16  # every layer
    num_key_value_heads: int = 8  # sliding layers
    head_dim: int = 256  # sliding layers; never hidden_size // heads
    global_head_dim: int = 512  # full layers
    num_global_key_value_heads: int = 2  # full layers, whose V is the raw K projection
    num_experts: int = 128
    top_k_experts: int = 8
    sliding_window: int = 1024  # keys a causal query sees, itself included
    max_position_embeddings: int = 262_144
    rope_parameters: dict = field(default_factory=_default_rope)
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float = 30.0
    hidden_activation: str = "gelu_pytorch_tanh"
    pad_token_id: int = 0
    eos_token_id: int | list[int] = 1
    bos_token_id: int = 2
    canvas_length: int = 256  # top-level field of config.json: the block length of block diffusion

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and f.name not in TOKEN_FIELDS and not (is_int(value) and 0 < value < INT_LIMIT):
                raise DgemmaError(f"{f.name} must be a positive integer below 2**30, not {value!r}")
        for name in ("rms_norm_eps", "final_logit_softcapping"):
            if not is_number(value := getattr(self, name)) or not 0 < value < math.inf:
                raise DgemmaError(f"{name} must be a positive finite number, not {value!r}")
        for name in TOKEN_FIELDS:
            ids = value if isinstance(value := getattr(self, name), list) else [value]
            if not ids or not all(is_int(i) and 0 <= i < self.vocab_size for i in ids):
                raise DgemmaError(f"{name} must be token ids in [0, vocab_size {self.vocab_size}), not {ids!r}")
        if not isinstance(self.layer_types, list) or not all(isinstance(t, str) for t in self.layer_types):
            raise DgemmaError(f"layer_types must be a list of layer type names, not {self.layer_types!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise DgemmaError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        if unknown := set(self.layer_types) - {SLIDING, FULL}:
            raise DgemmaError(f"unknown layer types {sorted(unknown)}")
        if self.layer_types[-1] != FULL:
            raise DgemmaError("the last layer must be full_attention (transformers silently forces it)")
        if self.hidden_activation != "gelu_pytorch_tanh":
            raise DgemmaError(f"hidden_activation {self.hidden_activation!r} is not supported (gelu_pytorch_tanh)")
        if self.top_k_experts > self.num_experts:
            raise DgemmaError(f"top_k_experts {self.top_k_experts} exceeds num_experts {self.num_experts}")
        if self.canvas_length > self.max_position_embeddings:
            raise DgemmaError(
                f"canvas_length {self.canvas_length} exceeds max_position_embeddings {self.max_position_embeddings}"
            )
        if not isinstance(self.rope_parameters, dict):
            raise DgemmaError(f"rope_parameters must be an object per layer type, not {self.rope_parameters!r}")
        for kind in set(self.layer_types):
            self._check_rope(kind)
            if self.head_dim_of(kind) % 2:
                raise DgemmaError(f"the {kind} head dim {self.head_dim_of(kind)} must be even (split-half RoPE)")
            if self.num_attention_heads % self.num_kv_heads(kind):
                raise DgemmaError(f"{self.num_attention_heads} query heads do not group over {kind} KV heads")

    def _check_rope(self, kind: str) -> None:
        rope = self.rope_parameters.get(kind)
        if not isinstance(rope, dict):
            raise DgemmaError(f"rope_parameters has no object for {kind}")
        if rope.get("rope_type") not in ("default", "proportional"):
            raise DgemmaError(
                f"rope_type {rope.get('rope_type')!r} for {kind} is not supported (default, proportional)"
            )
        for name, default, upper in (("rope_theta", None, math.inf), ("factor", 1.0, math.inf)):
            value = rope.get(name, default)
            if not is_number(value) or not 0 < value < upper:
                raise DgemmaError(f"rope_parameters.{kind}.{name} must be a positive finite number, not {value!r}")
        factor = rope.get("partial_rotary_factor", 1.0)
        if not is_number(factor) or not 0 < factor <= 1:
            raise DgemmaError(f"rope_parameters.{kind}.partial_rotary_factor must be in (0, 1], not {factor!r}")

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def head_dim_of(self, kind: str) -> int:
        return self.head_dim if kind == SLIDING else self.global_head_dim

    def num_kv_heads(self, kind: str) -> int:
        return self.num_key_value_heads if kind == SLIDING else self.num_global_key_value_heads

    @classmethod
    def diffusiongemma_26b_a4b(cls) -> Config:
        """google/diffusiongemma-26B-A4B-it (the defaults are its values)."""
        return cls()

    @classmethod
    def tiny(cls, **overrides) -> Config:
        """A few-kB model for tests: two sliding and two full layers, a window shorter than a prompt."""
        values = dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=4,
            layer_types=[SLIDING, FULL, SLIDING, FULL],
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            global_head_dim=32,
            num_global_key_value_heads=1,
            num_experts=4,
            top_k_experts=2,
            sliding_window=8,
            max_position_embeddings=512,
            canvas_length=8,
        )
        return cls(**(values | overrides))

    @classmethod
    def from_dict(cls, raw: dict) -> Config:
        """Accepts the top-level config.json (text_config inside) or a bare text config; raises DgemmaError naming
        the field for anything that cannot describe this model."""
        if not isinstance(raw, dict):
            raise DgemmaError(f"a config is a JSON object, not {type(raw).__name__}")
        if not isinstance(text := raw.get("text_config", raw), dict):
            raise DgemmaError(f"text_config is a JSON object, not {type(text).__name__}")
        text = dict(text)
        for where in (raw, text):
            if where.get("model_type", MODEL_TYPES[0]) not in MODEL_TYPES:
                raise DgemmaError(
                    f"model_type {where['model_type']!r} is not DiffusionGemma's ({', '.join(MODEL_TYPES)})"
                )
        canvas_length = raw.get("canvas_length", 256)
        if text.get("use_bidirectional_attention") == "all":
            raise DgemmaError("use_bidirectional_attention='all' (a bidirectional encoder) is not DiffusionGemma's")
        missing = {"vocab_size", "hidden_size", "num_hidden_layers", "layer_types", "head_dim"} - set(text)
        if missing:
            raise DgemmaError(f"config is missing {sorted(missing)}")
        if not isinstance(types := text["layer_types"], list) or not all(isinstance(t, str) for t in types):
            raise DgemmaError(f"layer_types must be a list of layer type names, not {types!r}")
        # Transformers re-saves the two global-layer fields as per-layer overrides of the full layers.
        if per_layer := text.pop("per_layer_config", None):
            override = _per_layer_override(per_layer, text["layer_types"])
            text["global_head_dim"] = override.get("head_dim", text.get("head_dim"))
            text["num_global_key_value_heads"] = override.get("num_key_value_heads", text.get("num_key_value_heads"))
        elif text.get("num_global_key_value_heads") is None:
            text["num_global_key_value_heads"] = text.get("num_key_value_heads", cls.num_key_value_heads)
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in text.items() if k in known}, canvas_length=canvas_length)

    @classmethod
    def from_json(cls, path: str | Path) -> Config:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def hf_text_config(self) -> dict:
        """The text_config kwargs of transformers' DiffusionGemmaConfig (official schema)."""
        values = asdict(self)
        values.pop("canvas_length")
        return values | {"use_bidirectional_attention": "vision", "tie_word_embeddings": True}


def is_int(value) -> bool:
    """An int that is not a bool (JSON's true would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _per_layer_override(per_layer, layer_types) -> dict:
    """The one override transformers' per_layer_config applies to every full layer, and to nothing else."""
    if not isinstance(per_layer, dict) or not all(isinstance(v, dict) for v in per_layer.values()):
        raise DgemmaError(f"per_layer_config must map layer indices to objects, not {per_layer!r}")
    if not all(str(i).isdecimal() for i in per_layer):
        raise DgemmaError(f"per_layer_config must override exactly the full layers, uniformly: {per_layer}")
    overrides = {json.dumps(v, sort_keys=True) for v in per_layer.values()}
    full = {i for i, kind in enumerate(layer_types) if kind == FULL}
    if len(overrides) != 1 or {int(i) for i in per_layer} != full:
        raise DgemmaError(f"per_layer_config must override exactly the full layers, uniformly: {per_layer}")
    return next(iter(per_layer.values()))
