"""The text-model config: one dataclass with the Hugging Face field names, read from a checkpoint's config.json."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

SLIDING, FULL = "sliding_attention", "full_attention"


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
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        if unknown := set(self.layer_types) - {SLIDING, FULL}:
            raise ValueError(f"unknown layer types {sorted(unknown)}")
        if self.layer_types[-1] != FULL:
            raise ValueError("the last layer must be full_attention (transformers silently forces it)")
        if self.hidden_activation != "gelu_pytorch_tanh":
            raise ValueError(f"hidden_activation {self.hidden_activation!r} is not supported (gelu_pytorch_tanh)")
        for kind in set(self.layer_types):
            rope_type = self.rope_parameters[kind]["rope_type"]
            if rope_type not in ("default", "proportional"):
                raise ValueError(f"rope_type {rope_type!r} for {kind} is not supported")
            if self.num_attention_heads % self.num_kv_heads(kind):
                raise ValueError(f"{self.num_attention_heads} query heads do not group over {kind} KV heads")

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
        """Accepts the top-level config.json (text_config inside) or a bare text config."""
        text = dict(raw.get("text_config", raw))
        canvas_length = raw.get("canvas_length", 256)
        if text.get("use_bidirectional_attention") == "all":
            raise ValueError("use_bidirectional_attention='all' (a bidirectional encoder) is not DiffusionGemma's")
        # Transformers re-saves the two global-layer fields as per-layer overrides of the full layers.
        if per_layer := text.pop("per_layer_config", None):
            overrides = {json.dumps(v, sort_keys=True) for v in per_layer.values()}
            layers = {int(i) for i in per_layer}
            full = {i for i, kind in enumerate(text["layer_types"]) if kind == FULL}
            if len(overrides) != 1 or layers != full:
                raise ValueError(f"per_layer_config must override exactly the full layers, uniformly: {per_layer}")
            override = next(iter(per_layer.values()))
            text["global_head_dim"] = override.get("head_dim", text.get("head_dim"))
            text["num_global_key_value_heads"] = override.get("num_key_value_heads", text["num_key_value_heads"])
        elif text.get("num_global_key_value_heads") is None:
            text["num_global_key_value_heads"] = text["num_key_value_heads"]
        known = set(cls.__dataclass_fields__)
        missing = {"vocab_size", "hidden_size", "num_hidden_layers", "layer_types", "head_dim"} - set(text)
        if missing:
            raise ValueError(f"config is missing {sorted(missing)}")
        return cls(**{k: v for k, v in text.items() if k in known}, canvas_length=canvas_length)

    @classmethod
    def from_json(cls, path: str | Path) -> Config:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def hf_text_config(self) -> dict:
        """The text_config kwargs of transformers' DiffusionGemmaConfig (official schema)."""
        values = asdict(self)
        values.pop("canvas_length")
        return values | {"use_bidirectional_attention": "vision", "tie_word_embeddings": True}
