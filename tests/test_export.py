"""Export to ONNX and TensorRT engines, and generation over them, on tiny checkpoints (CPU).

ONNX Runtime runs the fp32 graphs against the torch model; TensorRT-RTX parses and builds the bf16 graphs on the
CPU. Engine execution needs TensorRT on a GPU and is not tested here: only its construction-time checks are.
"""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import save_file

from dgemma import DiffusionGemma, Pipeline
from dgemma.cli import main
from dgemma.errors import DgemmaError, ExportError
from dgemma.export import staging
from dgemma.export.engine import build_engines, profile_shapes
from dgemma.export.onnx import export_onnx
from dgemma.export.weights import location, share_weights
from dgemma.model import sidecar
from dgemma.model.cache import WINDOW_MODES
from dgemma.model.checkpoint import CheckpointError, read_config
from dgemma.model.config import FULL, SLIDING, Config
from dgemma.model.sidecar import GRAPHS, SHORT
from dgemma.runtime.engine import load

from oracle import CONFIGS, build_checkpoint

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None and importlib.util.find_spec("tensorrt") is None
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")  # inside torch.export, at 2.13


@pytest.fixture(scope="module")
def fp32(tiny_checkpoint, tmp_path_factory):
    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("export") / "fp32", dtype="fp32")


@pytest.fixture(scope="module")
def bf16(tiny_checkpoint, tmp_path_factory):
    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("export") / "bf16", dtype="bf16")


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    """The other tiny config (window 5 < canvas 6, a full layer first), exported with the custom MoE node and the
    hidden-state output: (checkpoint, export)."""
    path = tmp_path_factory.mktemp("odd")
    build_checkpoint(path / "ckpt", CONFIGS["odd"], seed=3)
    out = export_onnx(
        path / "ckpt", path / "export", dtype="fp32", output="hidden", custom_ops=True, window="per_token"
    )
    return path / "ckpt", out


@pytest.fixture(scope="module")
def engines(bf16, tmp_path_factory):
    """TensorRT-RTX engines of the bf16 export, built through the command line."""
    if not HAS_RTX:
        pytest.skip("needs tensorrt_rtx (and no full TensorRT, which would build on a GPU instead)")
    out = tmp_path_factory.mktemp("engines") / "rtx"
    assert main(["export", "trt", "--onnx", str(bf16), "--out", str(out)]) == 0
    return out


def nodes(path):
    return onnx.load(path, load_external_data=False).graph.node


def test_graphs_are_opset_23_without_sequence_ops(fp32, tiny_checkpoint):
    layers = read_config(tiny_checkpoint).num_hidden_layers
    for graph, attending in (("decoder", layers), ("encoder", layers - 1)):  # the encoder's last layer stops at K/V
        path = fp32 / f"{graph}.onnx"
        onnx.checker.check_model(path)
        model = onnx.shape_inference.infer_shapes(onnx.load(path, load_external_data=False))
        assert [(o.domain, o.version) for o in model.opset_import] == [("", 23)]
        ops = Counter(n.op_type for n in model.graph.node)
        assert not [op for op in ops if "Sequence" in op or op in ("Loop", "If", "Scan", "NonZero")]
        assert ops["RMSNormalization"] and ops["RotaryEmbedding"] and ops["Gelu"]
        attention = [n for n in model.graph.node if n.op_type == "Attention"]
        assert len(attention) == attending and all(len(n.output) == 1 for n in attention)
        types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
        topk = [n for n in model.graph.node if n.op_type == "TopK"]
        assert len(topk) == attending and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in topk)
        external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert "model.embed_tokens.weight" in {t.name for t in external}
        # the weights are stored once: every tensor the encoder has, the decoder's data file already held
        assert {location(t)[0] for t in external} == {"decoder.onnx.data"}
    assert sorted(p.name for p in fp32.iterdir() if p.suffix == ".data") == ["decoder.onnx.data"]


def test_shared_weights_match_by_content_not_name(tmp_path):
    """share_weights on two hand-made graphs: the sharer's copy of the owner's tensor (under another name) is read
    from the owner's file; a tensor named like one of the owner's but holding other values keeps its own bytes."""
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal((64, 32)).astype(np.float32) for _ in range(3))

    def save(name, tensors):
        inits = [onnx.numpy_helper.from_array(v, k) for k, v in tensors.items()]
        out = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [64, 32])
        node = onnx.helper.make_node("Sum", list(tensors), ["y"])
        model = onnx.helper.make_model(onnx.helper.make_graph([node], name, [], [out], inits))
        onnx.save(model, tmp_path / f"{name}.onnx", save_as_external_data=True, location=f"{name}.onnx.data",
                  size_threshold=0)  # fmt: skip

    save("decoder", {"w": a, "val_1": b})
    save("encoder", {"w_copy": a, "val_1": c})
    share_weights(tmp_path)
    model = onnx.load(tmp_path / "encoder.onnx", load_external_data=False)
    files = {t.name: location(t)[0] for t in model.graph.initializer}
    assert files == {"w_copy": "decoder.onnx.data", "val_1": "encoder.onnx.data"}
    assert (tmp_path / "encoder.onnx.data").stat().st_size == c.nbytes
    loaded = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(tmp_path / "encoder.onnx").graph.initializer}
    assert np.array_equal(loaded["w_copy"], a) and np.array_equal(loaded["val_1"], c)


def test_sidecar_describes_the_graphs(fp32, tiny_checkpoint):
    meta = sidecar.read(fp32)
    config = read_config(tiny_checkpoint)
    assert meta["config"] == asdict(config) and meta["checkpoint"]["path"] == str(tiny_checkpoint.resolve())
    assert (meta["kind"], meta["dtype"], meta["decoder_output"], meta["window"]) == ("onnx", "fp32", "logits", "shared")
    W, C = config.sliding_window, config.canvas_length
    assert meta["dims"] == {
        "batch": {"min": 1, "max": 1},
        "past_full": {"min": 1, "max": config.max_position_embeddings},
        "past_sliding": {"min": 1, "max": W - 1},
    }
    for graph in GRAPHS:
        model = onnx.load(fp32 / meta["graphs"][graph]["file"], load_external_data=False)
        assert [e["name"] for e in meta["graphs"][graph]["inputs"]] == [v.name for v in model.graph.input]
    inputs = {e["name"]: e for e in meta["graphs"]["decoder"]["inputs"]}
    assert inputs["mask_full"] == {"name": "mask_full", "dtype": "bool", "shape": ["batch", 1, C, f"past_full + {C}"]}
    assert inputs["past_key_0"]["shape"] == ["batch", config.num_key_value_heads, "past_sliding", config.head_dim]
    assert meta["graphs"]["decoder"]["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", C, 256]}]


def committed(cache, layer: int, kind: str):
    """The committed K and V an engine pass reads for one layer (position order) and their validity."""
    n = cache.length
    kept = n if kind == FULL else min(n, cache.config.sliding_window - 1)
    slots = torch.arange(n - kept, n) % cache.slots_of[kind]
    valid = cache.valid[kind][:, slots][:, None, :, None]
    return cache.k[layer][:, :, slots] * valid, cache.v[layer][:, :, slots] * valid


def assert_same_pass(ref, ours, caches, canvas, sc):
    """Encoder K/V of every layer within 1e-5; decoder outputs within 1e-5 of their largest magnitude."""
    for i, kind in enumerate(ref.config.layer_types):
        for a, b in zip(committed(caches[1], i, kind), committed(caches[0], i, kind), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for soft in (None, sc):
        want = ref.denoise(canvas, caches[0], soft)
        torch.testing.assert_close(
            ours.denoise(canvas, caches[1], soft), want, atol=1e-5 * want.abs().max().item(), rtol=0
        )


@pytest.mark.parametrize("window", WINDOW_MODES)
@pytest.mark.parametrize("prompt", [3, 13])  # committed 3 and 11, then 13 and 21: inside and past the window of 8
def test_onnxruntime_matches_the_model(tiny_checkpoint, fp32, window, prompt):
    ref = DiffusionGemma.from_pretrained(tiny_checkpoint, dtype=torch.float32, window=window)
    ours = load(tiny_checkpoint, fp32, backend="onnxruntime", window=window)
    C = ref.config.canvas_length
    ids, canvas, sc = torch.randint(3, 256, (2, prompt)), torch.randint(0, 256, (2, C)), 3 * torch.randn(2, C, 256)
    mask = torch.ones(2, prompt, dtype=torch.bool)
    mask[1, :2] = False  # left padding
    caches = [model.new_cache(2, prompt + 2 * C) for model in (ref, ours)]
    for chunk, valid in ((ids, mask), (canvas, None)):  # the prompt, then a committed canvas
        for model, cache in zip((ref, ours), caches, strict=True):
            model.encode(chunk, cache, valid)
        assert_same_pass(ref, ours, caches, canvas, sc)


@pytest.mark.parametrize("types", [[FULL], [SLIDING, FULL]])
def test_encoders_that_attend_with_one_layer_type_or_none(types, tmp_path):
    """Cut-down models (bench_export.py's): a one-layer encoder takes no prefix at all, and a sliding-then-global one
    only sliding keys. Each graph takes masks only for the layer types it attends with, every dynamic dimension has
    its name (profiles resolve), and ONNX Runtime still matches the model after a prompt and a commit."""
    build_checkpoint(tmp_path / "ckpt", Config.tiny(num_hidden_layers=len(types), layer_types=types), seed=4)
    export = export_onnx(tmp_path / "ckpt", tmp_path / "export", dtype="fp32")
    meta = sidecar.read(export)
    encoder_inputs = {e["name"] for e in meta["graphs"]["encoder"]["inputs"]}
    assert {n for n in encoder_inputs if n.startswith("mask_")} == {f"mask_{SHORT[t]}" for t in types[:-1]}
    for graph in GRAPHS:
        shapes = profile_shapes(meta["graphs"][graph], {k: d | {"opt": d["max"]} for k, d in meta["dims"].items()})
        inputs = meta["graphs"][graph]["inputs"]
        dynamic = {e["name"] for e in inputs if any(isinstance(d, str) for d in e["shape"])}
        assert dynamic and set(shapes) == dynamic  # every input with a named dimension has a profile
        for name, (lo, opt, hi) in shapes.items():
            assert all(0 < a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)), (name, lo, opt, hi)
    ref = DiffusionGemma.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    ours = load(tmp_path / "ckpt", export, backend="onnxruntime")
    C = ref.config.canvas_length
    ids, canvas, sc = torch.randint(3, 256, (1, 11)), torch.randint(0, 256, (1, C)), 3 * torch.randn(1, C, 256)
    caches = [model.new_cache(1, 11 + 2 * C) for model in (ref, ours)]
    for chunk in (ids, canvas):
        for model, cache in zip((ref, ours), caches, strict=True):
            model.encode(chunk, cache)
        assert_same_pass(ref, ours, caches, canvas, sc)


def test_onnxruntime_runs_the_fp16_export(tiny_checkpoint, tmp_path):
    """fp16 graphs (the router's TopK stays fp32) run in ONNX Runtime; after a prompt their logits stay within half
    the error of the bf16 model itself against fp32 (fp16 has 3 more mantissa bits: about 1/8 is expected)."""
    ours = load(tiny_checkpoint, export_onnx(tiny_checkpoint, tmp_path / "fp16", dtype="fp16"), backend="onnxruntime")
    ref, bf16_model = (
        DiffusionGemma.from_pretrained(tiny_checkpoint, dtype=d) for d in (torch.float32, torch.bfloat16)
    )
    C = ref.config.canvas_length
    ids, canvas = torch.randint(3, 256, (1, 13)), torch.randint(0, 256, (1, C))
    out = []
    for model in (ref, bf16_model, ours):
        cache = model.new_cache(1, 13 + C)
        model.encode(ids, cache)
        out.append(model.denoise(canvas, cache).float())
    assert ours.dtype == torch.float16 and out[2].isfinite().all()
    assert (out[2] - out[0]).abs().max() <= 0.5 * (out[1] - out[0]).abs().max()


def test_custom_moe_node_runs_its_function_body(odd):
    checkpoint, export = odd
    config = read_config(checkpoint)
    for graph in GRAPHS:
        model = onnx.load(export / f"{graph}.onnx", load_external_data=False)
        moe = [n for n in model.graph.node if n.domain == "dgemma"]
        assert {n.op_type for n in moe} == {"MoE"} and len(moe) == config.num_hidden_layers - (graph == "encoder")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in moe[0].attribute}
        assert attrs == {"plugin_namespace": b"dgemma", "plugin_version": b"1", "aot": 1}
        assert [(f.domain, f.name) for f in model.functions] == [("dgemma", "MoE")]
        assert ("dgemma", 1) in [(o.domain, o.version) for o in model.opset_import]
        assert "TopK" in {n.op_type for n in model.graph.node}  # the router stays standard
    ref = DiffusionGemma.from_pretrained(checkpoint, dtype=torch.float32, window="per_token")
    ours = load(checkpoint, export, backend="onnxruntime")
    assert ours.window == "per_token"  # the sidecar's, when not given
    C = config.canvas_length
    ids, canvas, sc = torch.randint(3, 256, (1, 13)), torch.randint(0, 256, (1, C)), 3 * torch.randn(1, C, 256)
    caches = [model.new_cache(1, 13 + C) for model in (ref, ours)]
    for model, cache in zip((ref, ours), caches, strict=True):
        model.encode(ids, cache)
    assert_same_pass(ref, ours, caches, canvas, sc)
    want = ref.decode(canvas, caches[0])  # the final hidden states
    torch.testing.assert_close(ours.decode(canvas, caches[1], None), want, atol=1e-5 * want.abs().max().item(), rtol=0)


@pytest.mark.parametrize("reference", [False, True])  # SeededDraws, then transformers' draws on the global RNG
def test_generate_over_onnxruntime_equals_torch(tiny_checkpoint, fp32, reference):
    runs = []
    for kwargs in ({"dtype": torch.float32}, {"backend": "onnxruntime", "engine": fp32}):
        pipe = Pipeline.from_pretrained(tiny_checkpoint, **kwargs)
        torch.manual_seed(0)
        out = pipe.generate(
            ["Why is the sky blue?", "Hi"], reference=reference, seed=5, max_new_tokens=24, max_denoising_steps=6,
            stop_ids=[],
        )  # fmt: skip
        runs.append((out.sequences, out.stats.steps_per_canvas))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]


@pytest.mark.parametrize("which", ["logits", "hidden"])
def test_device_loop_over_engines_equals_the_model(tiny_checkpoint, fp32, odd, which):
    """The TensorRT backend's canvas loop (pipeline.DeviceLoop: the vocabulary and sampler kernels on the graph's
    output, no host sync in a canvas), run over ONNX Runtime with the kernels interpreted: a decoder graph that outputs
    logits, and one that outputs hidden states (the odd config, custom MoE node), each generate the same tokens, steps
    and acceptances as the PyTorch model in the same loop."""
    checkpoint, export, window = (tiny_checkpoint, fp32, "shared") if which == "logits" else (*odd, "per_token")
    assert sidecar.read(export)["decoder_output"] == which
    runs = []
    for kwargs in ({"dtype": torch.float32}, {"backend": "onnxruntime", "engine": export}):
        pipe = Pipeline.from_pretrained(checkpoint, window=window, **kwargs)
        out = pipe.generate(
            [[5, 6, 7, 8], [9, 10]], seed=5, max_new_tokens=16, max_denoising_steps=4, stop_ids=[], device_loop=True
        )
        runs.append((out.sequences, out.stats.steps_per_canvas, out.stats.accepted_per_step))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1:] == runs[1][1:]
    assert len(runs[0][1]) >= 2 and sum(runs[0][2]) > 0  # more than one canvas; positions were accepted


def test_cli_generates_over_onnxruntime(tiny_checkpoint, fp32, capsys):
    args = ["generate", "--model", str(tiny_checkpoint), "--backend", "onnxruntime", "--engine", str(fp32)]
    assert main([*args, "--max-new-tokens", "8", "--steps", "3", "Hello"]) == 0
    out = capsys.readouterr().out
    assert "steps per canvas [3]" in out and "torch.float32, onnxruntime" in out


@pytest.mark.skipif(not HAS_RTX, reason="needs tensorrt_rtx, which builds on a CPU")
def test_tensorrt_rtx_builds_both_bf16_graphs(engines, bf16):
    import tensorrt_rtx

    meta = sidecar.read(engines)
    assert meta["kind"] == "engine" and meta["dtype"] == "bf16"
    assert (meta["engine"]["package"], meta["engine"]["version"]) == ("tensorrt_rtx", tensorrt_rtx.__version__)
    for graph in GRAPHS:
        assert (engines / meta["engine"]["files"][graph]).stat().st_size > 0
    # the runtime's embedding table travels with the engines: the one the ONNX graphs were traced with
    assert torch.equal(sidecar.read_embedding(engines, meta), sidecar.read_embedding(bf16, sidecar.read(bf16)))
    lo, opt, hi = meta["engine"]["profiles"]["decoder"]["mask_full"]
    C = meta["config"]["canvas_length"]
    assert (lo[3], opt[3], hi[3]) == (1 + C, 256 + C, 512 + C)  # past_full from 1 to max_prompt, tuned for half
    assert meta["engine"]["profiles"]["encoder"]["past_key_0"][2][2] == meta["config"]["sliding_window"] - 1


def retarget(folder, tmp_path, edit):
    """A copy of an export or engine folder (a few hundred kB at the tiny size) with its sidecar edited."""
    meta = sidecar.read(folder)
    edit(meta)
    out = tmp_path / f"edited{len(list(tmp_path.iterdir()))}"
    shutil.copytree(folder, out)
    sidecar.write(out, meta)
    return out


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """Another training of the tiny config: same config, other weights (seed 7)."""
    path = tmp_path_factory.mktemp("other")
    build_checkpoint(path, Config.tiny(), seed=7)
    return path


def test_engine_backends_refuse_mismatches(tiny_checkpoint, fp32, bf16, odd, other, tmp_path):
    cases = [
        (other, fp32, "onnxruntime", "other weights"),
        (odd[0], fp32, "onnxruntime", "another config"),
        (tiny_checkpoint, bf16, "onnxruntime", "no bf16 kernels"),
        (tiny_checkpoint, fp32, "tensorrt", "build engines with `dgemma export trt`"),
        (tiny_checkpoint, None, "tensorrt", "needs engine="),
        (tiny_checkpoint, tmp_path, "onnxruntime", "not a folder written by `dgemma export`"),
        (tiny_checkpoint, retarget(fp32, tmp_path, lambda m: m.update(format=0)), "onnxruntime", "re-export"),
        (tiny_checkpoint, fp32, "torch", "is for backend 'onnxruntime' or 'tensorrt'"),
    ]
    for checkpoint, folder, backend, message in cases:
        with pytest.raises(ValueError, match=message):
            Pipeline.from_pretrained(checkpoint, backend=backend, engine=folder)


@pytest.mark.skipif(not HAS_RTX or torch.cuda.is_available(), reason="a CPU machine with tensorrt_rtx")
def test_tensorrt_backend_checks_the_engines_before_the_device(tiny_checkpoint, engines, tmp_path):
    def version(meta):
        meta["engine"]["version"] = "0.0"

    def package(meta):
        meta["engine"]["package"] = "tensorrt"  # the other known package, absent where tensorrt_rtx builds

    for edit, message in ((version, "built with tensorrt_rtx 0.0 but"), (package, "which is not installed")):
        with pytest.raises(ExportError, match=message):
            Pipeline.from_pretrained(tiny_checkpoint, backend="tensorrt", engine=retarget(engines, tmp_path, edit))
    with pytest.raises(ExportError, match="holds TensorRT engines"):
        Pipeline.from_pretrained(tiny_checkpoint, backend="onnxruntime", engine=engines)
    with pytest.raises(DgemmaError, match="CUDA device"):  # every check passed: only the GPU is missing
        Pipeline.from_pretrained(tiny_checkpoint, backend="tensorrt", engine=engines)


def edit_sidecar(folder, edit):
    meta = json.loads((folder / sidecar.NAME).read_text())
    edit(meta)
    return json.dumps(meta)


def test_sidecar_damage_is_an_export_error_naming_the_field(fp32, tmp_path):
    """A damaged or edited dgemma.json is one ExportError naming the file and the field, never a KeyError, a
    TypeError or a JSONDecodeError; a file name in it cannot leave the folder."""
    folder = tmp_path / "copy"
    shutil.copytree(fp32, folder)
    (tmp_path / "outside.onnx").write_bytes((fp32 / "decoder.onnx").read_bytes())
    (folder / "link.onnx").symlink_to(tmp_path / "outside.onnx")

    def at(*keys, value=None, delete=False):
        def edit(meta):
            for key in keys[:-1]:
                meta = meta[key]
            if delete:
                del meta[keys[-1]]
            else:
                meta[keys[-1]] = value

        return edit_sidecar(fp32, edit)

    cases = [
        (b"\xff\xfe{}", "is not UTF-8 text"),
        ("{", "is not valid JSON"),
        ("[" * 100_000, "is not valid JSON"),
        ("[]", "holds a JSON list, not an object"),
        (at("format", delete=True), "has format None, this dgemma reads format 2: re-export"),
        (at("kind", delete=True), "has no kind"),
        (at("dtype", value="fp8"), "dtype must be one of"),
        (at("window", value=3), "window must be one of"),
        (at("decoder_output", value="probs"), "decoder_output must be one of"),
        (at("custom_ops", value=1), "custom_ops must be true or false"),
        (at("config", "layer_types", value=["full_attention"]), "config is not a valid model config"),
        (at("config", "hidden_size", value="64"), "config is not a valid model config"),
        (at("config", "rope", value={}), "config is not a valid model config"),
        (at("dims", "past_sliding", delete=True), "dims must name"),
        (at("dims", "batch", "max", value=0), "dims.batch.max must be a positive integer"),
        (at("dims", "batch", "max", value=True), "dims.batch.max must be a positive integer"),
        (at("dims", "batch", "min", value=2), "dims.batch must have min <= max"),
        (at("dims", "past_full", "max", value=10**6), "dims.past_full.max exceeds"),
        (at("graphs", "encoder", delete=True), "graphs must describe"),
        (at("graphs", "decoder", "inputs", value=5), "graphs.decoder.inputs must be a list"),
        (at("graphs", "decoder", "inputs", 0, "shape", value=["nope"]), r"inputs\[0\].shape holds 'nope'"),
        (at("graphs", "decoder", "inputs", 0, "dtype", value="float64"), r"inputs\[0\].dtype must be one of"),
        (at("graphs", "decoder", "outputs", 0, "name", value="hidden"), "decoder's outputs .* its decoder_output"),
        (at("graphs", "encoder", "inputs", 0, "name", value="tokens"), "graphs.encoder does not describe encoder"),
        (at("graphs", "decoder", "file", value="../fp32/decoder.onnx"), "graphs.decoder.file must be the name of"),
        (at("graphs", "decoder", "file", value=str(fp32 / "decoder.onnx")), "graphs.decoder.file must be the name"),
        (at("graphs", "decoder", "file", value="sub/decoder.onnx"), "graphs.decoder.file must be the name of"),
        (at("graphs", "decoder", "file", value="link.onnx"), "graphs.decoder.file 'link.onnx' is a link that leads"),
        (at("graphs", "decoder", "file", value="missing.onnx"), "graphs.decoder.file names .*missing.onnx, which is"),
    ]
    for text, message in cases:
        (folder / sidecar.NAME).write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(ExportError, match=message) as refused:
            sidecar.read(folder)
        assert str(folder / sidecar.NAME) in str(refused.value)


def engine_sidecar(fp32, folder, package):
    """An engine folder made from the fp32 export: its sidecar with an `engine` section, placeholder engines."""
    shutil.copytree(fp32, folder)
    files = {graph: f"{graph}.engine" for graph in GRAPHS}
    for file in files.values():
        (folder / file).write_bytes(b"not an engine")

    def edit(meta):
        meta["kind"] = "engine"
        for d in meta["dims"].values():
            d["opt"] = d["max"]
        meta["engine"] = {"package": package, "version": "1.0", "files": files, "profiles": {}}

    (folder / sidecar.NAME).write_text(edit_sidecar(fp32, edit))
    return folder


def test_engine_package_is_checked_before_it_is_imported(tiny_checkpoint, fp32, tmp_path, monkeypatch):
    """engine.package names the module the runtime imports: a module other than TensorRT's is refused, not run."""
    (tmp_path / "payload.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(tmp_path)
    folder = engine_sidecar(fp32, tmp_path / "engines", package="payload")
    with pytest.raises(ExportError, match="engine.package must be one of \\['tensorrt', 'tensorrt_rtx'\\]"):
        load(tiny_checkpoint, folder, backend="tensorrt")
    assert not (tmp_path / "ran").exists()
    for name in ("../decoder.engine", "/dev/zero"):

        def escape(meta, name=name):
            meta["engine"].update(package="tensorrt_rtx", files={"decoder": name, "encoder": "encoder.engine"})

        (folder / sidecar.NAME).write_text(edit_sidecar(folder, escape))
        with pytest.raises(ExportError, match="engine.files.decoder must be the name of a file"):
            load(tiny_checkpoint, folder, backend="tensorrt")


def test_external_data_must_stay_in_the_folder(fp32, tmp_path):
    """A graph whose external data names a file outside its folder (a path, `..`, a symlink) or bytes past a file's
    end is refused before ONNX Runtime or a TensorRT parser opens it (ONNX Runtime 1.32 refuses the first three
    itself, with its own exception; a parser need not)."""
    (tmp_path / "secret").write_bytes(bytes(1 << 20))
    folder = tmp_path / "copy"
    shutil.copytree(fp32, folder)
    (folder / "link.data").symlink_to(tmp_path / "secret")
    (folder / "short.data").write_bytes(bytes(1))
    original = onnx.load(fp32 / "decoder.onnx", load_external_data=False)
    for name, message in [
        ("../secret", "must be the name of a file in"),
        (str(tmp_path / "secret"), "must be the name of a file in"),
        ("link.data", "is a link that leads out of"),
        ("short.data", "reads past the end of short.data"),
    ]:
        model = onnx.ModelProto()
        model.CopyFrom(original)
        tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
        next(e for e in tensor.external_data if e.key == "location").value = name
        onnx.save(model, folder / "decoder.onnx")
        with pytest.raises(ExportError, match=f"decoder.onnx: .*tensor '{tensor.name}'.*{message}"):
            sidecar.read(folder)


def test_runtime_embedding_is_the_graphs_and_the_checkpoints(tiny_checkpoint, fp32, other, tmp_path):
    """The runtime's embedding table is the one decoder.onnx holds, and it must equal the checkpoint's: no edit of
    dgemma.json pairs the graphs with another checkpoint's table, and a damaged table file is refused."""
    ours = load(tiny_checkpoint, fp32, backend="onnxruntime")
    graph = onnx.load(fp32 / "decoder.onnx")  # with its external data
    traced = next(t for t in graph.graph.initializer if t.name == "model.embed_tokens.weight")
    assert torch.equal(ours.embed_tokens.weight, torch.from_numpy(onnx.numpy_helper.to_array(traced).copy()))
    copy = retarget(fp32, tmp_path, lambda m: m.update(checkpoint={"path": str(other)}))
    for folder in (fp32, copy):
        with pytest.raises(ExportError, match="other weights than .*its embedding table differs"):
            load(other, folder, backend="onnxruntime")
    table = ours.embed_tokens.weight
    for tensors, message in [
        ({sidecar.EMBEDDING_KEY: table.half()}, "must hold embed_tokens.weight as torch.float32 \\[256, 64\\]"),
        ({sidecar.EMBEDDING_KEY: table[:-1].clone()}, "torch.float32 \\[255, 64\\]"),
        ({"other": table}, "not nothing"),
    ]:
        save_file(tensors, copy / sidecar.EMBEDDING)
        with pytest.raises(ExportError, match=message):
            load(tiny_checkpoint, copy, backend="onnxruntime")
    (copy / sidecar.EMBEDDING).write_bytes(b"truncated")
    with pytest.raises(ExportError, match="embedding.safetensors is not a readable safetensors file"):
        load(tiny_checkpoint, copy, backend="onnxruntime")
    (copy / sidecar.EMBEDDING).unlink()
    with pytest.raises(ExportError, match="embedding.safetensors, which is not a file"):
        load(tiny_checkpoint, copy, backend="onnxruntime")


def test_engine_model_refuses_bad_ids_and_arguments(tiny_checkpoint, fp32):
    """Token ids outside the vocabulary (a device-side assert on a GPU), of another shape or type, and bad load
    arguments are DgemmaErrors naming them; nothing is committed."""
    model = load(tiny_checkpoint, fp32, backend="onnxruntime")
    cache = model.new_cache(1, 24)
    C = model.config.canvas_length
    for ids, message in [
        (torch.tensor([[5, 256]]), "ids holds token ids outside the vocabulary \\[0, 256\\): 5 to 256"),
        (torch.tensor([[-1]]), "outside the vocabulary"),
        (torch.tensor([[1.0]]), "ids must be an integer tensor"),
        (torch.tensor([[1], [2]]), "must hold 1 row"),
        ([[1, 2]], "ids must be an integer tensor \\(batch, tokens\\), not list"),
    ]:
        with pytest.raises(DgemmaError, match=message):
            model.encode(ids, cache)
    assert cache.length == 0
    for canvas, message in [
        (torch.full((1, C), 256), "canvas_ids holds token ids outside the vocabulary"),
        (torch.zeros(1, C - 1, dtype=torch.long), f"must hold 1 row\\(s\\) .* of {C} tokens"),
    ]:
        with pytest.raises(DgemmaError, match=message):
            model.denoise(canvas, cache)
    for kwargs, message in [
        ({"backend": "torch"}, "engine backend must be one of"),
        ({"window": "diagonal"}, "window must be one of"),
        ({"device": "tpu"}, "device 'tpu'"),
        ({"device": "cuda:7"} if not torch.cuda.is_available() else {"device": "cuda:99"}, "cuda:"),
    ]:
        with pytest.raises(DgemmaError, match=message):
            load(tiny_checkpoint, fp32, **({"backend": "onnxruntime"} | kwargs))
    with pytest.raises(DgemmaError, match="engine must be a folder path"):
        load(tiny_checkpoint, 42, backend="onnxruntime")


def listing(*folders):
    """Every path under `folders`, hidden staging folders included: what a refused export must leave unchanged."""
    return {folder: sorted(p.relative_to(folder) for p in folder.rglob("*")) for folder in folders}


def test_bad_input_leaves_no_output(tiny_checkpoint, fp32, tmp_path, monkeypatch, capsys):
    """Every bad argument is one ExportError (CheckpointError for the checkpoint) naming it, raised before anything is
    written: no output folder, no staging folder beside it, no parent folder created for it."""
    from dgemma.export.goldens import save_goldens

    work = tmp_path / "work"
    work.mkdir()
    (work / "taken").mkdir()
    (work / "taken" / "file").write_text("")
    (work / "a_file").write_text("")
    out = work / "new" / "out"
    onnx_cases = [
        ({"model_dir": tmp_path / "missing"}, CheckpointError, "missing/config.json"),
        ({"model_dir": None}, ExportError, "checkpoint folder \\(--model\\) must be a folder path"),
        ({"dtype": "int8"}, ExportError, "dtype must be one of"),
        ({"output": "probs"}, ExportError, "output must be one of"),
        ({"window": "diagonal"}, ExportError, "window must be one of"),
        ({"custom_ops": "yes"}, ExportError, "custom_ops must be True or False"),
        ({"max_prompt": 10**6}, ExportError, "max_prompt \\(--max-prompt\\) must be an integer from 1 to 512"),
        ({"max_prompt": 0}, ExportError, "max_prompt"),
        ({"max_prompt": 2.5}, ExportError, "max_prompt"),
        ({"max_batch": 0}, ExportError, "max_batch \\(--max-batch\\) must be an integer from 1 to 1024"),
        ({"max_batch": 10**9}, ExportError, "max_batch"),
        ({"max_batch": True}, ExportError, "max_batch"),
        ({"out_dir": ""}, ExportError, "empty path"),
        ({"out_dir": None}, ExportError, "output folder must be a path"),
        ({"out_dir": work / "taken"}, ExportError, "taken already exists and is not empty"),
        ({"out_dir": work / "a_file"}, ExportError, "a_file already exists"),
        ({"out_dir": work / "a_file" / "out"}, ExportError, "cannot write .*a_file/out: .*a_file is a file"),
        ({"out_dir": tiny_checkpoint}, ExportError, "is the folder the export reads"),
    ]
    for kwargs, error, message in onnx_cases:
        kwargs = {"model_dir": tiny_checkpoint, "out_dir": out} | kwargs
        with pytest.raises(error, match=message):
            export_onnx(kwargs.pop("model_dir"), kwargs.pop("out_dir"), **kwargs)
    engine_cases = [
        ({"onnx_dir": tmp_path / "missing"}, "not a folder written by `dgemma export`"),
        ({"onnx_dir": tiny_checkpoint}, "not a folder written by `dgemma export`"),
        ({"out_dir": fp32 / "engines"}, "is inside .*fp32, which the export reads"),
        ({"opt_prompt": 10**6}, "opt_prompt \\(--opt-prompt\\) must be an integer from 1 to 512"),
        ({"opt_prompt": 0}, "opt_prompt"),
        ({"opt_batch": 2}, "opt_batch \\(--opt-batch\\) must be an integer from 1 to 1"),
    ]
    for kwargs, message in engine_cases:
        kwargs = {"onnx_dir": fp32, "out_dir": out} | kwargs
        with pytest.raises(ExportError, match=message):
            build_engines(kwargs.pop("onnx_dir"), kwargs.pop("out_dir"), **kwargs)
    golden_cases = [
        ({"dtype": "int4"}, "dtype \\(the engine's, --dtype\\) must be one of"),
        ({"prompt": 0}, "prompt \\(the committed length\\) must be an integer from 1 to 504"),
        ({"seed": -1}, "seed must be"),
        ({"onnx_dir": work}, "not a folder written by `dgemma export`"),
        ({"out_dir": fp32 / "goldens"}, "is inside"),
        ({"out_dir": tiny_checkpoint}, "is the folder the export reads"),
        ({"out_dir": fp32}, "is inside .*fp32, which the export reads"),
    ]
    for kwargs, message in golden_cases:
        kwargs = {"onnx_dir": fp32, "out_dir": out} | kwargs
        with pytest.raises(ExportError, match=message):
            save_goldens(tiny_checkpoint, kwargs.pop("onnx_dir"), kwargs.pop("out_dir"), **kwargs)
    before = listing(work, fp32)

    def denied(*args, **kwargs):  # as mkdtemp in a folder this user cannot write (root can write anywhere)
        raise PermissionError(13, "Permission denied", str(out.parent))

    monkeypatch.setattr("dgemma.export.staging.tempfile.mkdtemp", denied)
    with pytest.raises(ExportError, match="cannot write .*new/out: Permission denied"):
        export_onnx(tiny_checkpoint, out)
    monkeypatch.undo()

    def fail(*args, **kwargs):
        raise RuntimeError("tracing failed")

    monkeypatch.setattr("dgemma.export.onnx.trace", fail)
    with pytest.raises(RuntimeError, match="tracing failed"):  # a failure half-way removes what it wrote
        export_onnx(tiny_checkpoint, out)
    assert main(["export", "onnx", "--model", str(tmp_path / "missing"), "--out", str(out)]) == 2
    printed = capsys.readouterr()
    assert "config.json" in (printed.out + printed.err).replace("\n", "")  # a console may wrap long paths
    assert listing(work, fp32) == before  # "new", which the refused exports would have created, is gone too


def test_cli_prints_one_error_line_for_bad_input(tiny_checkpoint, tmp_path):
    """`python -m dgemma export` in a process of its own: a bad argument is exit status 2 and one `error:` line."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "dgemma", "export", "onnx", "--model", str(tiny_checkpoint), "--out", str(out)]
    run = subprocess.run([*command, "--max-prompt", "100000"], capture_output=True, text=True, timeout=300)
    printed = (run.stdout + run.stderr).splitlines()
    errors = [line for line in printed if line.startswith("error:")]
    assert run.returncode == 2 and len(errors) == 1 and "Traceback" not in run.stdout + run.stderr
    assert "--max-prompt" in errors[0] and not list(tmp_path.iterdir())


def test_sigterm_during_an_export_leaves_nothing(tiny_checkpoint, tmp_path):
    """SIGTERM while `dgemma export onnx` writes: the process ends (status 143, as after SIGTERM) and removes its
    staging folder and the parent it created; nothing is at --out or beside it."""
    work = tmp_path / "work"
    work.mkdir()
    out = work / "sub" / "out"
    command = [sys.executable, "-m", "dgemma", "export", "onnx", "--model", str(tiny_checkpoint), "--out", str(out)]
    process = subprocess.Popen([*command, "--dtype", "fp32"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not (out.parent.exists() and any(out.parent.iterdir())):  # the staging folder appeared
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 143, process.stdout.read()
    finally:
        process.kill()
    assert list(work.iterdir()) == []


def test_staging_removes_what_killed_runs_left(tmp_path):
    """A staging folder whose process no longer runs (killed by SIGKILL) is removed by the next run on the same
    --out; one of a running process, and other hidden folders, are kept. SystemExit (what SIGTERM raises during an
    export) removes the run's own staging folder."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "out"
    left = [tmp_path / f".out.{dead.pid}.k1ll3d", tmp_path / f".out.{os.getpid()}.running", tmp_path / ".out.backup"]
    for folder in left:
        folder.mkdir()
        (folder / "decoder.onnx").write_text("")
    with pytest.raises(SystemExit):
        with staging.staging(out) as tmp:
            (tmp / "half").write_text("")
            raise SystemExit(143)
    assert sorted(tmp_path.iterdir()) == sorted(left[1:])
    with staging.staging(out) as tmp:
        (tmp / "whole").write_text("")
    assert sorted(tmp_path.iterdir()) == sorted([out, *left[1:]]) and [p.name for p in out.iterdir()] == ["whole"]


@pytest.mark.skipif(importlib.util.find_spec("polygraphy") is None, reason="needs polygraphy")
def test_polygraphy_goldens_for_the_engine_comparison(tiny_checkpoint, fp32, tmp_path):
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    from dgemma.export.goldens import save_goldens

    out = save_goldens(tiny_checkpoint, fp32, tmp_path / "goldens", dtype="bf16")
    (inputs,) = load_json(out / "inputs.json")
    meta = sidecar.read(fp32)
    assert list(inputs) == [e["name"] for e in meta["graphs"]["decoder"]["inputs"]]
    assert (
        inputs["soft"].dtype == inputs["past_key_0"].dtype == torch.bfloat16 and inputs["mask_full"].dtype == torch.bool
    )
    ((runner, (iteration,)),) = RunResults.load(str(out / "golden.json"))
    assert runner.startswith("onnxrt") and iteration["logits"].shape == (1, 8, 256)
    script = (out / "compare.sh").read_text()
    assert 'polygraphy run "$1/decoder.engine" --model-type engine --trt --atol' in script
    assert "--load-inputs" in script and "--load-outputs" in script


def test_an_interrupt_a_library_swallows_still_stops_the_export(tmp_path):
    """A Ctrl-C that code inside the block catches (torch.onnx's exporter has) still keeps the export from being
    moved into place, and nothing is left at --out or beside it."""
    out = tmp_path / "out"
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # the CLI's: another test may have set one
    try:
        with pytest.raises(KeyboardInterrupt):
            with staging.staging(out) as tmp:
                (tmp / "half").write_text("x")
                try:
                    os.kill(os.getpid(), signal.SIGINT)
                except KeyboardInterrupt:
                    pass  # what a library catching BaseException does
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not out.exists() and list(tmp_path.iterdir()) == []
