"""The plain PyTorch model and the generation loop against transformers 5.23.0 on tiny random checkpoints (fp32, CPU).

Each config randomizes every norm, scale and layer scalar (tests/oracle.py). Forward outputs must agree within 1e-4;
`generate` in reference mode must agree token for token.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache

from dgemma import DiffusionGemma, Pipeline
from dgemma.model.config import FULL, SLIDING, Config

from oracle import CONFIGS, build_checkpoint

ATOL = 1e-4


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(transformers model, our model) loaded from the same checkpoint folder."""
    path = tmp_path_factory.mktemp(request.param)
    hf = build_checkpoint(path, CONFIGS[request.param], seed=len(request.param))
    return hf, DiffusionGemma.from_pretrained(path, dtype=torch.float32)


def hf_trace(hf, prompt, canvas1, canvas2, sc_logits, mask):
    """Prefill, two decoder steps (without and with self-conditioning), a commit, then a step on the next canvas."""
    P, C = prompt.shape[1], canvas1.shape[1]
    cache = DynamicCache(config=hf.config.text_config)
    span = lambda a, b: torch.arange(a, b)[None]  # noqa: E731
    grow = lambda k: F.pad(mask, (0, k * C), value=True)  # noqa: E731
    out = {
        "enc1": hf.model.encoder(
            input_ids=prompt, attention_mask=mask, past_key_values=cache, position_ids=span(0, P)
        ).last_hidden_state
    }
    out["kv1"] = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    step = dict(past_key_values=cache, decoder_attention_mask=grow(1), decoder_position_ids=span(P, P + C))
    out["dec1"] = hf(decoder_input_ids=canvas1, **step).logits
    out["dec2"] = hf(decoder_input_ids=canvas1, self_conditioning_logits=sc_logits, **step).logits
    out["enc2"] = hf.model.encoder(
        input_ids=canvas1, attention_mask=grow(1), past_key_values=cache, position_ids=span(P, P + C)
    ).last_hidden_state
    out["kv2"] = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    out["dec3"] = hf(
        decoder_input_ids=canvas2,
        past_key_values=cache,
        decoder_attention_mask=grow(2),
        decoder_position_ids=span(P + C, P + 2 * C),
    ).logits
    return out


def committed(cache, layer, kept):
    """Our cache's last `kept` committed K and V of one layer, in position order."""
    slots = torch.arange(cache.length - kept, cache.length) % cache.k[layer].shape[2]
    return cache.k[layer][:, :, slots], cache.v[layer][:, :, slots]


def assert_cache_equal(cache, hf_kv, valid):
    for i, (k_ref, v_ref) in enumerate(hf_kv):
        k, v = committed(cache, i, k_ref.shape[2])
        keep = valid[:, -k_ref.shape[2] :][:, None, :, None]  # padded positions hold garbage in both
        torch.testing.assert_close(k * keep, k_ref * keep, atol=ATOL, rtol=0)
        torch.testing.assert_close(v * keep, v_ref * keep, atol=ATOL, rtol=0)


@pytest.mark.parametrize("pad", [0, 4], ids=["batch1", "batch2-left-padded"])
def test_forward_matches_transformers(pair, pad):
    hf, model = pair
    cfg = model.config
    B, P, C, V = (1, 13, cfg.canvas_length, cfg.vocab_size) if pad == 0 else (2, 13, cfg.canvas_length, cfg.vocab_size)
    g = torch.Generator().manual_seed(pad)
    prompt, canvas1, canvas2 = (torch.randint(3, V, (B, n), generator=g) for n in (P, C, C))
    mask = torch.ones(B, P, dtype=torch.bool)
    mask[0, :pad] = False
    sc_logits = torch.randn(B, C, V, generator=g) * 4  # the same self-conditioning input for both
    with torch.no_grad():
        ref = hf_trace(hf, prompt, canvas1, canvas2, sc_logits, mask)

    cache = model.new_cache(B, P + 2 * C)
    enc1 = model.encode(prompt, cache, mask)
    torch.testing.assert_close(enc1[mask], ref["enc1"][mask], atol=ATOL, rtol=0)
    assert_cache_equal(cache, ref["kv1"], mask)
    # What later queries can still see: the last W - 1 committed tokens on sliding layers, all of them on full ones.
    kept = [min(P, cfg.sliding_window - 1) if cfg.is_sliding(i) else P for i in range(cfg.num_hidden_layers)]
    before = [tuple(t.clone() for t in committed(cache, i, n)) for i, n in enumerate(kept)]
    torch.testing.assert_close(model.denoise(canvas1, cache), ref["dec1"], atol=ATOL, rtol=0)
    torch.testing.assert_close(model.denoise(canvas1, cache, sc_logits), ref["dec2"], atol=ATOL, rtol=0)
    assert cache.length == P  # the decoder reads the committed prefix, never writes it
    for i, (k, v) in enumerate(before):
        k_now, v_now = committed(cache, i, kept[i])
        assert torch.equal(k, k_now) and torch.equal(v, v_now)
    enc2 = model.encode(canvas1, cache)
    torch.testing.assert_close(enc2, ref["enc2"], atol=ATOL, rtol=0)
    assert_cache_equal(cache, ref["kv2"], F.pad(mask, (0, C), value=True))
    torch.testing.assert_close(model.denoise(canvas2, cache), ref["dec3"], atol=ATOL, rtol=0)


def test_swapped_layer_scalars_are_caught(pair):
    """The oracle discriminates: swapping the encoder/decoder layer scalars changes the logits far beyond tolerance."""
    hf, model = pair
    V, C = model.config.vocab_size, model.config.canvas_length
    prompt, canvas = torch.randint(3, V, (1, 13)), torch.randint(0, V, (1, C))
    with torch.no_grad():
        ref = hf_trace(hf, prompt, canvas, canvas, torch.zeros(1, C, V), torch.ones(1, 13, dtype=torch.bool))
        for layer in model.layers:
            layer.encoder_scalar, layer.decoder_scalar = layer.decoder_scalar, layer.encoder_scalar
        try:
            cache = model.new_cache(1, 13 + C)
            model.encode(prompt, cache)
            assert (model.denoise(canvas, cache) - ref["dec1"]).abs().max() > 100 * ATOL
        finally:
            for layer in model.layers:
                layer.encoder_scalar, layer.decoder_scalar = layer.decoder_scalar, layer.encoder_scalar


def test_per_token_window_matches_transformers_with_that_mask(pair):
    """window="per_token" (|i - j| < W) against transformers fed the same window as an explicit 4-D mask."""
    hf, model = pair
    cfg = model.config
    W, C, V, P = cfg.sliding_window, cfg.canvas_length, cfg.vocab_size, 13
    prompt, canvas = torch.randint(3, V, (1, P)), torch.randint(0, V, (1, C))
    cache = DynamicCache(config=hf.config.text_config)
    with torch.no_grad():
        hf.model.encoder(input_ids=prompt, past_key_values=cache, position_ids=torch.arange(P)[None])
        kept = min(P, W - 1)  # what transformers' sliding layers hold
        keys = torch.cat([torch.arange(P - kept, P), torch.arange(P, P + C)])
        queries = torch.arange(P, P + C)
        masks = {
            SLIDING: ((queries[:, None] - keys[None]).abs() < W)[None, None],
            FULL: torch.ones(1, 1, C, P + C, dtype=torch.bool),
        }
        ref = hf(
            decoder_input_ids=canvas,
            past_key_values=cache,
            decoder_attention_mask=masks,
            decoder_position_ids=queries[None],
        ).logits
    model.window = "per_token"
    try:
        ours = model.new_cache(1, P + C)
        model.encode(prompt, ours)
        torch.testing.assert_close(model.denoise(canvas, ours), ref, atol=ATOL, rtol=0)
    finally:
        model.window = "shared"


GENERATE_CASES = [
    dict(max_new_tokens=20, max_denoising_steps=5),  # three canvases, budget-limited steps, output not truncated
    dict(max_new_tokens=30, max_denoising_steps=9, stability_threshold=0, confidence_threshold=1.0),  # rows stop early
    dict(max_new_tokens=40, max_denoising_steps=6, stop_ids=[7, 11, 13]),  # stop ids end rows, tails padded
]


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    """A checkpoint with sharp logits, reloaded by transformers so its generate reads generation_config.json."""
    path = tmp_path_factory.mktemp("sharp")
    build_checkpoint(path, Config.tiny(), seed=3, embed_std=2.0)
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(path).eval()
    return hf, Pipeline.from_pretrained(path, dtype=torch.float32)


@pytest.mark.parametrize("case", GENERATE_CASES)
@pytest.mark.parametrize("padded", [False, True], ids=["batch1", "batch3-padded"])
def test_generate_matches_transformers_token_for_token(sharp, case, padded):
    hf, pipe = sharp
    rows = [list(range(20, 33))] if not padded else [list(range(20, 33)), list(range(40, 49)), list(range(60, 71))]
    P = max(map(len, rows))
    ids = torch.tensor([[0] * (P - len(r)) + r for r in rows])
    mask = torch.tensor([[False] * (P - len(r)) + [True] * len(r) for r in rows])
    hf_case = {("eos_token_id" if k == "stop_ids" else k): v for k, v in case.items()}
    torch.manual_seed(5)
    ref = hf.generate(ids, attention_mask=mask, **hf_case)
    torch.manual_seed(5)
    out = pipe.generate(rows, reference=True, **case)
    assert torch.equal(out.sequences, ref.sequences)
    assert out.stats.tokens_per_forward == pytest.approx(ref.tokens_per_forward.tolist())


def test_warm_start_matches_transformers(sharp):
    hf, pipe = sharp
    prompt = torch.arange(20, 33)[None]
    warm = torch.arange(100, 108)[None]
    torch.manual_seed(9)
    ref = hf.generate(prompt, decoder_input_ids=warm, max_new_tokens=16, max_denoising_steps=4)
    torch.manual_seed(9)
    out = pipe.generate(prompt, reference=True, warm_start=warm, max_new_tokens=16, max_denoising_steps=4)
    assert torch.equal(out.sequences, ref.sequences)


def test_steps_matter(sharp):
    """A decoder that ignored its canvas or self-conditioning would give the same tokens at 1 and at 8 steps."""
    _, pipe = sharp
    one = pipe.generate([list(range(20, 33))], max_new_tokens=8, max_denoising_steps=1, seed=1)
    eight = pipe.generate([list(range(20, 33))], max_new_tokens=8, max_denoising_steps=8, seed=1)
    assert one.stats.steps_per_canvas == [1] and eight.stats.steps_per_canvas[0] > 1
    assert one.tokens != eight.tokens


def test_bf16_error_is_within_twice_transformers_own(tmp_path):
    """In bf16 both implementations round differently; ours may be at most twice as far from the fp32 truth."""
    build_checkpoint(tmp_path, Config.tiny(), seed=4)
    prompt, canvas = torch.randint(3, 256, (1, 13)), torch.randint(0, 256, (1, 8))

    def hf_logits(dtype):
        hf = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path, dtype=dtype).eval()
        cache = DynamicCache(config=hf.config.text_config)
        with torch.no_grad():
            hf.model.encoder(input_ids=prompt, past_key_values=cache, position_ids=torch.arange(13)[None])
            return hf(decoder_input_ids=canvas, past_key_values=cache, decoder_position_ids=torch.arange(13, 21)[None])

    truth, theirs = hf_logits(torch.float32).logits, hf_logits(torch.bfloat16).logits
    model = DiffusionGemma.from_pretrained(tmp_path, dtype=torch.bfloat16)
    cache = model.new_cache(1, 21)
    model.encode(prompt, cache)
    ours = model.denoise(canvas, cache)
    assert (ours - truth).abs().max() <= 2 * (theirs - truth).abs().max()
