"""Property-based fuzzing of every parser of untrusted input: the only outcomes are a valid object or the project's
own error (a DgemmaError), never another exception. Bounded (a few hundred examples each, no deadline) so CI stays
fast; a failure prints the smallest input that breaks the parser."""

import json
import math
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from dgemma.errors import DgemmaError
from dgemma.model.checkpoint import read_config, read_generation_config, weight_files
from dgemma.model.config import Config
from dgemma.model.load import load_model
from dgemma.model.tokenizer import Tokenizer, format_chat
from dgemma.runtime.sampler import SamplingConfig
from dgemma.sudoku import board as sudoku

from oracle import GENERATION

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# JSON values, NaN and the infinities included (Python's json reads them), nested a few levels deep.
scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=12)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
TINY = {"text_config": Config.tiny().hf_text_config(), "canvas_length": 8, "model_type": "diffusion_gemma"}


def mutated(base: dict):
    """`base` with one entry (at the top or in text_config) replaced by an arbitrary JSON value, or removed."""

    def mutate(args):
        where, key, value, remove = args
        out = json.loads(json.dumps(base))
        target = out["text_config"] if where and out.get("text_config") else out
        key = sorted(target)[key % len(target)]
        if remove:
            del target[key]
        else:
            target[key] = value
        return out

    return st.tuples(st.booleans(), st.integers(0, 100), json_values, st.booleans()).map(mutate)


def only_dgemma_errors(call, *args, **kwargs):
    try:
        return call(*args, **kwargs)
    except DgemmaError:
        return None


@FUZZ
@given(st.one_of(json_values, mutated(TINY)))
def test_config_from_dict(raw):
    config = only_dgemma_errors(Config.from_dict, raw)
    if config is not None:  # whatever it accepted describes a model: positive sizes, finite scales
        assert config.hidden_size > 0 and config.num_hidden_layers == len(config.layer_types)
        assert math.isfinite(config.rms_norm_eps) and config.top_k_experts <= config.num_experts


@FUZZ
@given(st.one_of(json_values, mutated(GENERATION)))
def test_generation_config(raw):
    cfg = only_dgemma_errors(SamplingConfig.from_generation_config, raw)
    if cfg is not None:
        assert 0 < cfg.max_denoising_steps and 0 <= cfg.t_min < cfg.t_max < math.inf


@FUZZ
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_json_files(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("config")
    for name in ("config.json", "generation_config.json"):
        (folder / name).write_bytes(data)
    only_dgemma_errors(read_config, folder)
    only_dgemma_errors(read_generation_config, folder)


def safetensors_bytes(header) -> st.SearchStrategy[bytes]:
    """An 8-byte length and a JSON header drawn from `header`, then a few data bytes; or any bytes at all."""
    framed = st.tuples(header, st.binary(max_size=64), st.integers(-8, 8)).map(
        lambda t: struct.pack("<Q", max(0, len(h := json.dumps(t[0]).encode()) + t[2])) + h + t[1]
    )
    return framed | st.binary(max_size=200)


tensor_entry = st.fixed_dictionaries(
    {"dtype": st.sampled_from(["F32", "BF16", "I64", "F8_E4M3", "XX"]) | st.text(max_size=4),
     "shape": st.lists(st.integers(-2, 2**33), max_size=3),
     "data_offsets": st.lists(st.integers(-4, 2**33), min_size=0, max_size=3)}
)  # fmt: skip
headers = st.dictionaries(st.text(max_size=12), tensor_entry | json_values, max_size=3)


@FUZZ
@given(safetensors_bytes(headers))
def test_safetensors_header(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("weights")
    (folder / "model.safetensors").write_bytes(data)
    only_dgemma_errors(weight_files, folder)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """config.json and valid weights of Config.tiny(), for fuzzing one tensor's header entry at a time."""
    folder = tmp_path_factory.mktemp("tiny")
    (folder / "config.json").write_text(json.dumps(TINY))
    return folder


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["F32", "BF16", "I64", "U8"]), st.lists(st.integers(0, 70), min_size=1, max_size=3))
def test_weights_of_any_dtype_and_shape(tiny_folder, dtype, shape):
    """The loader checks every tensor's dtype and shape against the config before it copies a weight."""
    names = {"F32": torch.float32, "BF16": torch.bfloat16, "I64": torch.int64, "U8": torch.uint8}
    save_file({"model.decoder.embed_tokens.weight": torch.zeros(shape, dtype=names[dtype])}, tiny_folder / "x")
    (tiny_folder / "x").replace(tiny_folder / "model.safetensors")
    with pytest.raises(DgemmaError):
        load_model(tiny_folder, dtype=torch.float32)


@FUZZ
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_tokenizer_file(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("tokenizer")
    (folder / "tokenizer.json").write_bytes(data)
    only_dgemma_errors(Tokenizer.from_pretrained, folder)


messages = st.lists(
    st.dictionaries(st.sampled_from(["role", "content", "x"]), json_values | st.sampled_from(["user", "system"]))
    | json_values,
    max_size=4,
)


@FUZZ
@given(messages | json_values, st.booleans())
def test_chat_messages(raw, thinking):
    text = only_dgemma_errors(format_chat, raw, thinking=thinking)
    if text is not None:
        assert text.startswith("<bos>") and text.encode("utf-8")


@FUZZ
@given(st.text(max_size=90) | st.text(alphabet="0123456789. \n٣", max_size=90))
def test_sudoku_puzzle(text):
    cells = only_dgemma_errors(sudoku.parse, text)
    if cells is not None:
        n = sudoku.size_of(len(cells))
        assert all(0 <= c <= n for c in cells)
