"""Checkpoint loading and config parsing, against tiny checkpoints written by transformers itself (tests/oracle.py).

The loader is read-only and strict: every failure names its problem and leaves the folder byte-identical. The real
26B-A4B model is checked on the meta device against the official config.json and the checkpoint's tensor names and
shapes.
"""

import json
import os
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DiffusionGemmaConfig, DiffusionGemmaTextConfig

from dgemma.model.checkpoint import CheckpointError, checkpoint_name, read_config, read_generation_config
from dgemma.model.config import FULL, SLIDING, Config
from dgemma.model.load import load_model
from dgemma.model.model import DiffusionGemma, rope_inv_freq

from oracle import VISION, build_checkpoint

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def snapshot(folder) -> dict[str, bytes]:
    """Every file in the folder, byte for byte."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def fails(folder, match, error=CheckpointError, **kwargs):
    """Loading `folder` raises `error` matching `match` and changes nothing on disk."""
    before = snapshot(folder)
    with pytest.raises(error, match=match):
        load_model(folder, device="cpu", **kwargs)
    assert snapshot(folder) == before


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """(folder, transformers model) for one tiny checkpoint in one model.safetensors; tests only read it."""
    folder = tmp_path_factory.mktemp("single")
    return folder, build_checkpoint(folder, Config.tiny())


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The same weights (same seed) split into many shards plus an index."""
    folder = tmp_path_factory.mktemp("sharded")
    build_checkpoint(folder, Config.tiny(), shard_size="100KB")
    return folder


@pytest.fixture
def single_copy(single, tmp_path):
    return shutil.copytree(single[0], tmp_path / "ckpt")


@pytest.fixture
def sharded_copy(sharded, tmp_path):
    return shutil.copytree(sharded, tmp_path / "ckpt")


def rewrite(folder, edit):
    """Applies `edit` to the tensors of model.safetensors and writes them back."""
    tensors = load_file(folder / SINGLE)
    edit(tensors)
    save_file(tensors, folder / SINGLE, metadata={"format": "pt"})


def edit_config(folder, **text_fields):
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    raw["text_config"] |= text_fields
    path.write_text(json.dumps(raw, indent=2))


# ---------------------------------------------------------------------------------------------------------------------
# 1. Loading


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # fp32: bit-exact copy; bf16: the serving dtype
def test_every_tensor_equals_transformers(single, dtype):
    folder, hf = single
    before = snapshot(folder)
    model = load_model(folder, dtype=dtype, device="cpu")
    theirs = hf.state_dict()
    ours = model.state_dict()
    assert len(ours) == 96  # the tiny checkpoint's non-vision tensors
    for name, t in ours.items():
        assert t.dtype == dtype, name
        assert torch.equal(t, theirs[checkpoint_name(name)].to(dtype)), name
    assert snapshot(folder) == before


def test_spot_checks_and_both_scalar_sets(single):
    folder, hf = single
    model = load_model(folder, dtype=torch.float32, device="cpu")
    theirs = hf.state_dict()
    pairs = {
        model.embed_tokens.weight: "model.decoder.embed_tokens.weight",
        model.layers[1].self_attn.q_proj.weight: "model.decoder.layers.1.self_attn.q_proj.weight",
        model.layers[2].experts.gate_up_proj: "model.decoder.layers.2.experts.gate_up_proj",
        model.layers[3].router.per_expert_scale: "model.decoder.layers.3.router.per_expert_scale",
        model.self_conditioning.down_proj.weight: "model.decoder.self_conditioning.down_proj.weight",
    }
    for ours, name in pairs.items():
        assert torch.equal(ours, theirs[name]), name
    assert model.layers[1].self_attn.q_proj.weight.shape == (128, 64)  # full layer: 4 heads x 32
    assert model.layers[1].self_attn.v_proj is None  # full layers: V is the raw K projection
    for i, layer in enumerate(model.layers):
        enc = theirs[f"model.encoder.language_model.layers.{i}.layer_scalar"]
        dec = theirs[f"model.decoder.layers.{i}.layer_scalar"]
        assert torch.equal(layer.encoder_scalar, enc), i
        assert torch.equal(layer.decoder_scalar, dec), i
        assert not torch.equal(layer.encoder_scalar, layer.decoder_scalar), i  # swapped sets would go unnoticed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # both load paths assign every tensor
def test_no_meta_tensors_left(single, dtype):
    model = load_model(single[0], dtype=dtype, device="cpu")
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert len(tensors) == 96 + 2  # persistent tensors + one non-persistent rope buffer per layer type
    for name, t in tensors.items():
        assert not t.is_meta, name
        assert t.device.type == "cpu", name
    for kind in (SLIDING, FULL):  # non-persistent: not in the checkpoint, so they must be computed, in fp32
        assert torch.equal(getattr(model, f"inv_freq_{kind}"), rope_inv_freq(Config.tiny(), kind))
    assert not model.training


def test_sharded_equals_single(single, sharded):
    files = sorted(p.name for p in sharded.iterdir())
    shards = [f for f in files if f.startswith("model-") and f.endswith(".safetensors")]
    assert len(shards) > 3 and INDEX in files and SINGLE not in files
    before = snapshot(sharded)
    a = load_model(single[0], dtype=torch.float32, device="cpu").state_dict()
    b = load_model(sharded, dtype=torch.float32, device="cpu").state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert snapshot(sharded) == before


def test_vision_tensors_are_ignored(single):
    folder, hf = single
    stored = load_file(folder / SINGLE).keys()
    vision = {k for k in stored if k.startswith(("model.encoder.vision_tower.", "model.encoder.embed_vision."))}
    assert len(stored) == 112 and len(vision) == 16  # 112 tensors, 96 of them text
    model = load_model(folder, dtype=torch.float32, device="cpu")
    assert {checkpoint_name(n) for n in model.state_dict()} == set(stored) - vision


def test_editing_a_loaded_model_never_writes_the_checkpoint(single_copy):
    before = snapshot(single_copy)
    model = load_model(single_copy, dtype=torch.float32, device="cpu")  # fp32: may share mmap
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    del model
    assert snapshot(single_copy) == before


def test_read_generation_config(single, tmp_path):
    assert read_generation_config(single[0])["max_denoising_steps"] == 48
    assert read_generation_config(tmp_path) == {}  # optional file


# ---------------------------------------------------------------------------------------------------------------------
# 2. Failures


@pytest.mark.parametrize(
    "key",
    [
        "model.decoder.layers.2.self_attn.v_proj.weight",  # an ordinary weight of a sliding layer
        "model.encoder.language_model.layers.3.layer_scalar",  # the encoder's only own tensor: must not default to 1
    ],
)
def test_missing_tensor(single_copy, key):
    rewrite(single_copy, lambda t: t.pop(key))
    fails(single_copy, f"missing \\['{key}'\\]")


@pytest.mark.parametrize(
    "key",
    [
        "model.decoder.layers.0.bogus.weight",  # a name nothing maps to
        "model.encoder.language_model.layers.0.self_attn.q_proj.weight",  # an untied encoder copy: never dropped
    ],
)
def test_unexpected_tensor(single_copy, key):
    rewrite(single_copy, lambda t: t.__setitem__(key, torch.zeros(2, 3)))
    fails(single_copy, f"unexpected \\['{key}'\\]")


@pytest.mark.parametrize(
    "key, shape, expected",
    [
        ("model.decoder.layers.1.self_attn.k_proj.weight", (64, 64), (32, 64)),  # a full layer given 2 KV heads
        ("model.decoder.layers.0.layer_scalar", (), (1,)),  # a 0-d scalar broadcasts the same, still wrong
    ],
)
def test_misshaped_tensor(single_copy, key, shape, expected):
    rewrite(single_copy, lambda t: t.__setitem__(key, torch.ones(shape)))
    found, implied = (", ".join(map(str, s)) for s in (shape, expected))
    fails(single_copy, rf"{key} is \[{found}\] in the checkpoint but config.json implies \[{implied}\]")


@pytest.mark.parametrize("keep", [-100, 4])  # -100: the last tensor's data is short; 4: the header length is cut
def test_truncated_file(single_copy, keep):
    path = single_copy / SINGLE
    os.truncate(path, keep if keep > 0 else path.stat().st_size + keep)
    fails(single_copy, "not a readable safetensors file")


def test_truncated_shard(sharded_copy):
    weight_map = json.loads((sharded_copy / INDEX).read_text())["weight_map"]
    shard = sharded_copy / weight_map["model.decoder.layers.2.experts.gate_up_proj"]  # not a vision-only shard
    os.truncate(shard, shard.stat().st_size // 2)
    fails(sharded_copy, f"{shard.name} is not a readable safetensors file")


@pytest.mark.parametrize(
    "content",
    [
        b"this is not a safetensors file" * 100,  # text: a huge header length
        b"",  # an empty download
    ],
)
def test_garbage_file(single_copy, content):
    (single_copy / SINGLE).write_bytes(content)
    fails(single_copy, "not a readable safetensors file")


def test_index_lists_a_missing_shard(sharded_copy):
    shard = sorted(sharded_copy.glob("model-*.safetensors"))[-1]
    shard.unlink()  # a partial download
    fails(sharded_copy, f"lists shards that do not exist: .*{shard.name}")


def test_index_assigns_tensor_to_wrong_shard(sharded_copy):
    path = sharded_copy / INDEX
    index = json.loads(path.read_text())
    key = "model.decoder.norm.weight"
    index["weight_map"][key] = next(s for s in index["weight_map"].values() if s != index["weight_map"][key])
    path.write_text(json.dumps(index))
    fails(sharded_copy, f"does not hold {key}, which the index assigns to it")


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("hidden_size", 128, r"in the checkpoint but config.json implies \[.*128"),  # every shape changes
        ("num_experts", 8, r"layers.0.router.* is \[4.*\] in the checkpoint but config.json implies \[8"),  # one dim
        ("num_hidden_layers", 2, "unexpected"),  # fewer layers: the checkpoint's extra layers are unexpected
    ],
)
def test_config_does_not_match_tensors(single_copy, field, value, match):
    fields = {field: value}
    if field == "num_hidden_layers":
        raw = json.loads((single_copy / "config.json").read_text())["text_config"]
        fields |= {"layer_types": raw["layer_types"][:2], "per_layer_config": {"1": raw["per_layer_config"]["1"]}}
    edit_config(single_copy, **fields)
    fails(single_copy, match)


def test_missing_config(single_copy):
    (single_copy / "config.json").unlink()
    fails(single_copy, "config.json does not exist")
    with pytest.raises(CheckpointError, match="config.json does not exist"):
        read_config(single_copy)


@pytest.mark.parametrize("what", ["file", "absent"])  # a weights file passed for the folder; a typo'd path
def test_path_is_not_a_folder(single, tmp_path, what):
    path = single[0] / SINGLE if what == "file" else tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match="is not a checkpoint folder"):
        load_model(path, device="cpu")


def test_no_weights_file(single_copy):
    (single_copy / SINGLE).unlink()
    fails(single_copy, "has neither model.safetensors nor model.safetensors.index.json")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])  # fp16 overflows Gemma's activations; fp64 no kernels
def test_bad_dtype(single, dtype):
    fails(single[0], "dtype must be torch.bfloat16 or torch.float32", error=ValueError, dtype=dtype)


def test_unknown_backend(single):
    fails(single[0], "backend must be one of", error=ValueError, backend="triton-typo")


def test_unknown_window(single):
    fails(single[0], "window must be one of", error=ValueError, window="bogus")


# ---------------------------------------------------------------------------------------------------------------------
# 3. Config

# The official config.json of google/diffusiongemma-26B-A4B-it: global_head_dim and
# num_global_key_value_heads are top-level text_config fields, canvas_length sits at the top level.
OFFICIAL = {
    "architectures": ["DiffusionGemmaForBlockDiffusion"],
    "model_type": "diffusion_gemma",
    "canvas_length": 256,
    "image_token_id": 258880,
    "boi_token_id": 255999,
    "eoi_token_id": 258882,
    "eos_token_id": [1, 106],
    "vision_soft_tokens_per_image": 280,
    "dtype": "bfloat16",
    "tie_word_embeddings": True,
    "text_config": {
        "model_type": "diffusion_gemma_text",
        "vocab_size": 262144,
        "hidden_size": 2816,
        "intermediate_size": 2112,
        "moe_intermediate_size": 704,
        "num_experts": 128,
        "top_k_experts": 8,
        "num_hidden_layers": 30,
        "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 5,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 256,
        "global_head_dim": 512,
        "num_global_key_value_heads": 2,
        "sliding_window": 1024,
        "use_bidirectional_attention": "vision",
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
        },
        "max_position_embeddings": 262144,
        "rms_norm_eps": 1e-06,
        "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": 30.0,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
    },
    "vision_config": {
        "model_type": "gemma4_vision",
        "hidden_size": 1152,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "head_dim": 72,
        "intermediate_size": 4304,
        "patch_size": 16,
        "pooling_kernel_size": 3,
        "position_embedding_size": 10240,
        "standardize": True,
    },
}


def tiny_text(**overrides) -> dict:
    """The tiny checkpoint's text_config in the re-saved schema (per_layer_config on layers 1 and 3)."""
    text = Config.tiny().hf_text_config()
    del text["global_head_dim"], text["num_global_key_value_heads"]
    per_layer = {"1": {"head_dim": 32, "num_key_value_heads": 1}, "3": {"head_dim": 32, "num_key_value_heads": 1}}
    return text | {"per_layer_config": per_layer} | overrides


def test_resaved_schema_reads_globals_from_per_layer_config(single):
    path = single[0] / "config.json"
    text = json.loads(path.read_text())["text_config"]
    assert "global_head_dim" not in text and "num_global_key_value_heads" not in text  # the schema under test
    assert set(text["per_layer_config"]) == {"1", "3"}
    config = Config.from_json(path)
    assert (config.global_head_dim, config.num_global_key_value_heads) == (32, 1)
    assert (config.head_dim, config.num_key_value_heads) == (16, 2)  # sliding values stay
    assert config == Config.tiny()


def test_official_schema_is_the_26b_a4b(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(OFFICIAL, indent=2))
    config = Config.from_json(path)
    assert config == Config.diffusiongemma_26b_a4b()
    assert (config.global_head_dim, config.num_global_key_value_heads, config.canvas_length) == (512, 2, 256)
    assert config.sliding_window == 1024  # not halved: "vision" is not "all"
    assert [i for i in range(30) if not config.is_sliding(i)] == [5, 11, 17, 23, 29]
    assert OFFICIAL["text_config"]["global_head_dim"] == 512  # from_dict must not mutate its input


def test_official_schema_resaved_by_transformers_is_the_26b_a4b():
    """Transformers re-saves the official fields as per_layer_config, with zero-padded keys ("05")."""
    text = DiffusionGemmaTextConfig(**OFFICIAL["text_config"]).to_dict()
    assert "global_head_dim" not in text and "05" in text["per_layer_config"]
    assert Config.from_dict({"text_config": text, "canvas_length": 256}) == Config.diffusiongemma_26b_a4b()


@pytest.mark.parametrize(
    "per_layer",
    [
        {"0": {"head_dim": 32}, "1": {"head_dim": 32}, "3": {"head_dim": 32}},  # also overrides sliding layer 0
        {"1": {"head_dim": 32, "num_key_value_heads": 1}, "3": {"head_dim": 64, "num_key_value_heads": 1}},  # uneven
        {"3": {"head_dim": 32, "num_key_value_heads": 1}},  # full layer 1 left at the sliding values
    ],
)
def test_per_layer_config_must_override_exactly_the_full_layers_uniformly(per_layer):
    with pytest.raises(ValueError, match="per_layer_config must override exactly the full layers"):
        Config.from_dict(tiny_text(per_layer_config=per_layer))


def test_bidirectional_all_rejected():
    with pytest.raises(ValueError, match="use_bidirectional_attention='all'"):
        Config.from_dict(tiny_text(use_bidirectional_attention="all"))


@pytest.mark.parametrize("n", [3, 5])  # one layer short; one too many
def test_layer_types_length_mismatch_rejected(n):
    with pytest.raises(ValueError, match=f"layer_types has 4 entries for {n} layers"):
        Config.from_dict(tiny_text(num_hidden_layers=n))


@pytest.mark.parametrize(
    "raw, head_dim, derived",
    [
        (OFFICIAL, 256, 2816 // 16),  # the real model: 176 would be wrong
        (tiny_text(head_dim=24), 24, 64 // 4),  # tiny: 24 is neither 16 nor a power of two
    ],
)
def test_head_dim_is_never_derived(raw, head_dim, derived):
    config = Config.from_dict(raw)
    assert config.head_dim == head_dim != derived
    if config.hidden_size == 64:
        model = DiffusionGemma(config)
        assert model.layers[0].self_attn.q_proj.weight.shape == (4 * head_dim, 64)


@pytest.mark.parametrize(
    "config",
    [Config.tiny(), Config.diffusiongemma_26b_a4b()],  # tiny: what the oracle writes; 26b: the real layer pattern
)
def test_round_trip_through_transformers(config):
    text = DiffusionGemmaTextConfig(**config.hf_text_config()).to_dict()
    assert "per_layer_config" in text
    assert Config.from_dict(text) == replace(config, canvas_length=256)  # a bare text config has no canvas_length
    top = DiffusionGemmaConfig(
        text_config=config.hf_text_config(), vision_config=VISION, canvas_length=config.canvas_length
    )
    assert Config.from_dict(top.to_dict()) == config


# ---------------------------------------------------------------------------------------------------------------------
# 4. The real model, without its weights

# The official checkpoint's layer tensors: key suffix -> (sliding-layer shape, full-layer shape or None when absent).
LAYER_KEYS = {
    "self_attn.q_proj.weight": ([4096, 2816], [8192, 2816]),
    "self_attn.k_proj.weight": ([2048, 2816], [1024, 2816]),
    "self_attn.v_proj.weight": ([2048, 2816], None),
    "self_attn.o_proj.weight": ([2816, 4096], [2816, 8192]),
    "self_attn.q_norm.weight": ([256], [512]),
    "self_attn.k_norm.weight": ([256], [512]),
    "input_layernorm.weight": ([2816],) * 2,
    "post_attention_layernorm.weight": ([2816],) * 2,
    "pre_feedforward_layernorm.weight": ([2816],) * 2,
    "mlp.gate_proj.weight": ([2112, 2816],) * 2,
    "mlp.up_proj.weight": ([2112, 2816],) * 2,
    "mlp.down_proj.weight": ([2816, 2112],) * 2,
    "post_feedforward_layernorm_1.weight": ([2816],) * 2,
    "router.proj.weight": ([128, 2816],) * 2,
    "router.scale": ([2816],) * 2,
    "router.per_expert_scale": ([128],) * 2,
    "pre_feedforward_layernorm_2.weight": ([2816],) * 2,
    "experts.gate_up_proj": ([128, 1408, 2816],) * 2,
    "experts.down_proj": ([128, 2816, 704],) * 2,
    "post_feedforward_layernorm_2.weight": ([2816],) * 2,
    "post_feedforward_layernorm.weight": ([2816],) * 2,
    "layer_scalar": ([1],) * 2,
}
OTHER_KEYS = {
    "model.decoder.embed_tokens.weight": [262144, 2816],
    "model.decoder.norm.weight": [2816],
    "model.decoder.self_conditioning.pre_norm.weight": [2816],
    "model.decoder.self_conditioning.gate_proj.weight": [2112, 2816],
    "model.decoder.self_conditioning.up_proj.weight": [2112, 2816],
    "model.decoder.self_conditioning.down_proj.weight": [2816, 2112],
} | {f"model.encoder.language_model.layers.{i}.layer_scalar": [1] for i in range(30)}


def expected_keys() -> dict[str, list[int]]:
    keys = dict(OTHER_KEYS)
    for i in range(30):
        full = i % 6 == 5
        for suffix, shapes in LAYER_KEYS.items():
            if (shape := shapes[full]) is not None:
                keys[f"model.decoder.layers.{i}.{suffix}"] = shape
    return keys


@pytest.fixture(scope="module")
def real():
    with torch.device("meta"):
        return DiffusionGemma(Config.diffusiongemma_26b_a4b())


def test_real_parameter_count(real):
    assert sum(p.numel() for p in real.parameters()) == 25_233_141_760 + 3 * 2816 * 2112 + 2816 == 25_250_986_752
    assert sum(p.numel() for n, p in real.named_parameters() if ".experts." in n) == 22_837_985_280
    assert real.embed_tokens.weight.numel() == 738_197_504  # counted once: it is also the LM head
    scalars = [n for n, _ in real.named_buffers() if n.endswith(("encoder_scalar", "decoder_scalar"))]
    assert len(real.layers) == 30 and len(scalars) == 60


def test_real_checkpoint_names_and_shapes(real):
    ours = {checkpoint_name(n): list(t.shape) for n, t in real.state_dict().items()}
    assert len(ours) == 691 == 655 + 2 + 4 + 30
    assert sum(n.startswith("model.decoder.layers.") for n in ours) == 655  # 25 x 22 + 5 x 21
    assert ours == expected_keys()
    assert "model.decoder.layers.5.self_attn.v_proj.weight" not in ours
    assert ours["model.decoder.layers.5.self_attn.q_proj.weight"] == [8192, 2816]
    assert ours["model.decoder.layers.0.experts.gate_up_proj"] == [128, 1408, 2816]


def test_last_layer_must_be_full():
    # transformers silently turns a sliding last layer into a full one; we refuse rather than build another model
    with pytest.raises(ValueError, match="last layer must be full_attention"):
        Config.tiny(layer_types=[SLIDING, FULL, FULL, SLIDING])
