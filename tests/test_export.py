"""Export to ONNX and TensorRT engines, and generation over them, on tiny checkpoints (CPU).

ONNX Runtime runs the fp32 graphs against the torch model; TensorRT-RTX parses and builds the bf16 graphs on the
CPU. Engine execution needs TensorRT on a GPU and is not tested here: only its construction-time checks are.
"""

import importlib.util
from collections import Counter
from dataclasses import asdict

import numpy as np
import onnx
import pytest
import torch

from dgemma import DiffusionGemma, Pipeline
from dgemma.export import sidecar
from dgemma.export.engine import build_engines, profile_shapes
from dgemma.export.onnx import export_onnx
from dgemma.export.sidecar import GRAPHS, SHORT, ExportError
from dgemma.export.weights import location, share_weights
from dgemma.model.cache import WINDOW_MODES
from dgemma.model.checkpoint import CheckpointError, read_config
from dgemma.model.config import FULL, SLIDING, Config
from dgemma.runtime.cli import main
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
    assert meta["config"] == asdict(config) and meta["checkpoint"]["fingerprint"] == sidecar.fingerprint(
        tiny_checkpoint
    )
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
        torch.testing.assert_close(ours.denoise(canvas, caches[1], soft), want, atol=1e-5 * want.abs().max(), rtol=0)


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
        assert profile_shapes(meta["graphs"][graph], {k: d | {"opt": d["max"]} for k, d in meta["dims"].items()})
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
    want = ref.denoise_hidden(canvas, caches[0])
    torch.testing.assert_close(ours.denoise_hidden(canvas, caches[1]), want, atol=1e-5 * want.abs().max(), rtol=0)


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
    lo, opt, hi = meta["engine"]["profiles"]["decoder"]["mask_full"]
    C = meta["config"]["canvas_length"]
    assert (lo[3], opt[3], hi[3]) == (1 + C, 256 + C, 512 + C)  # past_full from 1 to max_prompt, tuned for half
    assert meta["engine"]["profiles"]["encoder"]["past_key_0"][2][2] == meta["config"]["sliding_window"] - 1


def retarget(folder, tmp_path, edit):
    """A copy of an export's sidecar alone, edited: the checks below refuse it before opening any graph."""
    meta = sidecar.read(folder)
    edit(meta)
    out = tmp_path / f"edited{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    sidecar.write(out, meta)
    return out


def test_engine_backends_refuse_mismatches(tiny_checkpoint, fp32, bf16, odd, tmp_path):
    other = tmp_path / "other"
    build_checkpoint(other, Config.tiny(), seed=7)
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
        meta["engine"]["package"] = "tensorrt_nonexistent"

    for edit, message in ((version, "built with tensorrt_rtx 0.0 but"), (package, "which is not installed")):
        with pytest.raises(ExportError, match=message):
            Pipeline.from_pretrained(tiny_checkpoint, backend="tensorrt", engine=retarget(engines, tmp_path, edit))
    with pytest.raises(ExportError, match="holds TensorRT engines"):
        Pipeline.from_pretrained(tiny_checkpoint, backend="onnxruntime", engine=engines)
    with pytest.raises(ExportError, match="CUDA device"):  # every check passed: only the GPU is missing
        Pipeline.from_pretrained(tiny_checkpoint, backend="tensorrt", engine=engines)


def test_bad_input_leaves_no_output(tiny_checkpoint, fp32, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "taken").mkdir()
    (work / "taken" / "file").write_text("")
    with pytest.raises(CheckpointError, match="config.json"):
        export_onnx(tmp_path / "missing", work / "out")
    with pytest.raises(ExportError, match="dtype"):
        export_onnx(tiny_checkpoint, work / "out", dtype="int8")
    with pytest.raises(ExportError, match="not empty"):
        export_onnx(tiny_checkpoint, work / "taken")
    with pytest.raises(ExportError, match="not a folder written by `dgemma export`"):
        build_engines(tmp_path / "missing", work / "out")

    def fail(*args, **kwargs):
        raise RuntimeError("tracing failed")

    monkeypatch.setattr("dgemma.export.onnx.trace", fail)
    with pytest.raises(RuntimeError, match="tracing failed"):  # a failure half-way removes what it wrote
        export_onnx(tiny_checkpoint, work / "out")
    assert main(["export", "onnx", "--model", str(tmp_path / "missing"), "--out", str(work / "out")]) == 2
    assert "config.json" in capsys.readouterr().out.replace("\n", "")  # the console wraps long paths
    assert [p.name for p in work.iterdir()] == ["taken"]


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
