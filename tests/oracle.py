"""Tiny random DiffusionGemma checkpoints written by transformers itself: the oracle the parity tests compare against.

Every tensor is randomized, norms, router scales, per-expert scales and layer scalars included (at their default
of 1.0 they would hide a `1 + w` norm, a missing scale or swapped encoder/decoder scalars), and the encoder's layer
scalars differ from the decoder's.

    python tests/oracle.py OUT_DIR      # writes a tiny checkpoint folder (used by `make demo`)
"""

import json
import pathlib
import sys

import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

from dgemma.model.config import FULL, SLIDING, Config

from tiny_tokenizer import build_tiny_tokenizer

VISION = dict(
    model_type="gemma4_vision",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    patch_size=16,
    position_embedding_size=64,
    pooling_kernel_size=3,
)  # transformers always builds a vision tower; ours ignores its weights

# The checkpoint's own generation_config.json, with the official file's structure.
GENERATION = {
    "max_denoising_steps": 48,
    "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
    "t_max": 0.8,
    "t_min": 0.4,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
    "eos_token_id": [1, 106, 50],
    "pad_token_id": 0,
    "max_new_tokens": 256,
}


# Two tiny configs every parity test runs on.
CONFIGS = {
    "tiny": Config.tiny(),  # alternating sliding/full, window 8 < a 13-token prompt, GQA groups 2 and 4
    "odd": Config.tiny(  # window 5 < canvas 6; GQA groups 1 and 2; 5 experts top-3; a global layer first
        hidden_size=48,
        intermediate_size=40,
        moe_intermediate_size=24,
        num_hidden_layers=3,
        layer_types=[FULL, SLIDING, FULL],
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=8,
        global_head_dim=24,
        num_global_key_value_heads=2,
        num_experts=5,
        top_k_experts=3,
        sliding_window=5,
        canvas_length=6,
    ),
}


def hf_model(config: Config, seed: int = 0, embed_std: float = 0.5) -> DiffusionGemmaForBlockDiffusion:
    hf_config = DiffusionGemmaConfig(
        text_config=config.hf_text_config(),
        vision_config=VISION,
        canvas_length=config.canvas_length,
        eos_token_id=[1],
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(hf_config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("embed_tokens.weight"):
                p.copy_(embed_std * torch.randn(p.shape, generator=g))  # larger: sharper logits
            elif p.ndim == 1:  # norm weights, router scale, per-expert scale
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                low = 0.6 if ".encoder." in name else 1.0  # encoder and decoder scalars differ
                b.copy_(low + 0.4 * torch.rand(b.shape, generator=g))
    return model


def build_checkpoint(path, config: Config, seed: int = 0, *, embed_std=0.5, generation=GENERATION, shard_size=None):
    """Writes config.json, generation_config.json, model.safetensors (or shards) and tokenizer.json."""
    path = pathlib.Path(path)
    model = hf_model(config, seed, embed_std)
    kwargs = {} if shard_size is None else {"max_shard_size": shard_size}
    model.save_pretrained(path, **kwargs)
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2))
    build_tiny_tokenizer(path)
    return model


if __name__ == "__main__":
    build_checkpoint(sys.argv[1], Config.tiny())
    print(f"wrote a tiny random checkpoint to {sys.argv[1]}")
