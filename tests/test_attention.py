"""The attention op (dgemma.kernels.attention: norm_rope and attention) against the model's reference attention,
`dgemma.model.model.attention`, and its rms_norm and apply_rope.

On the CPU the kernels run under TRITON_INTERPRET=1 at tiny shapes in fp32 and fp16 (the interpreter's bf16 dot is
wrong in Triton 3.9); on a GPU the real shapes run in bf16. In 16-bit dtypes the kernel may be at most twice as far
from the fp32 truth as PyTorch's own attention in that dtype (accuracy.assert_within_torch_error).
"""

import pytest
import torch

from dgemma.kernels.attention import attention, norm_rope
from dgemma.model.config import FULL, SLIDING
from dgemma.model.load import load_model
from dgemma.model.model import apply_rope, rms_norm, rope_inv_freq
from dgemma.model.model import attention as attention_ref

from accuracy import assert_within_torch_error
from oracle import CONFIGS, build_checkpoint


@pytest.fixture(scope="session")
def scenario(cache_at):
    """scenario(config, kind, n, T, *, window, batch, pad, dtype, device) -> (cache, layer, q): a cache with n
    committed tokens (rows after the first left-padded by `pad`) and a staged chunk of T, 3 slots to spare; random q
    and random K/V in the active slots, NaN in the slots past them (the kernel must never read those)."""

    def make(config, kind, n, T, *, window="shared", batch=1, pad=0, dtype=torch.float32, device="cpu"):
        cache = cache_at(config, batch, n, T, pad=pad, extra=3, dtype=dtype, device=device, window=window)
        layer, S = config.layer_types.index(kind), min(cache.slots_of[kind], n + T)
        for ring in (cache.k[layer], cache.v[layer]):
            ring[:, :, :S] = torch.randn(ring[:, :, :S].shape, device=device).to(dtype)
            ring[:, :, S:] = float("nan")
        q = torch.randn(batch, config.num_attention_heads, T, config.head_dim_of(kind), device=device).to(dtype)
        return cache, layer, q  # q head-major (B, H, T, d), as norm_rope writes it

    return make


def run_both(cache, layer, q, kind, causal, splits=None, upcast=False):
    """(kernel output, reference output, rows with at least one visible key) for one scenario."""
    T, n = q.shape[2], cache.length
    band = cache.band(kind, causal)
    out = attention(q, cache.k[layer], cache.v[layer], cache.pos[kind], cache.valid[kind], n, band, splits=splits)
    out = out.transpose(1, 2)
    S = min(cache.slots_of[kind], n + T)
    mask = cache.mask(kind, T, causal)
    k, v = cache.k[layer][:, :, :S], cache.v[layer][:, :, :S]
    cast = (lambda x: x.float()) if upcast else (lambda x: x)  # noqa: E731
    ref = attention_ref(cast(q), cast(k), cast(v), mask).transpose(1, 2)
    return out, ref, mask[:, 0].any(-1)  # (B, T, H, d), (B, T, H, d), (B, T)


# (config, kind, committed n, chunk T, window, causal, batch, pad, splits)
CASES = {
    "sliding-prefix-shorter-than-window": ("tiny", SLIDING, 3, 8, "shared", False, 1, 0, None),
    "sliding-ring-wrapped": ("tiny", SLIDING, 37, 8, "shared", False, 1, 0, None),  # n > W - 1 + chunk
    "sliding-per-token": ("tiny", SLIDING, 37, 8, "per_token", False, 1, 0, 2),  # |i - j| < W
    "global-prefix-odd-split": ("tiny", FULL, 37, 8, "shared", False, 1, 0, 3),  # 45 keys, not a block multiple
    "global-one-committed": ("tiny", FULL, 1, 8, "shared", False, 1, 0, None),
    "encoder-first-chunk": ("tiny", FULL, 0, 8, "shared", True, 1, 0, None),  # causal prompt start
    "encoder-sliding-wrapped": ("tiny", SLIDING, 21, 8, "shared", True, 1, 0, 2),  # causal within a window
    "padded-batch-global": ("odd", FULL, 13, 6, "shared", False, 2, 3, None),  # head dim 24, GQA 2
    "padded-batch-per-token": ("odd", SLIDING, 13, 6, "per_token", False, 2, 3, None),  # W 5 < canvas 6, GQA 1
    "padded-encoder-short-chunk": ("odd", SLIDING, 13, 5, "shared", True, 2, 3, None),  # a 5-token prompt tail
    "padded-query-rows": ("odd", FULL, 0, 6, "shared", True, 2, 3, None),  # row 1's first 3 queries see nothing
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_matches_reference(scenario, case, dtype, device):
    name, kind, n, T, window, causal, batch, pad, splits = CASES[case]
    cache, layer, q = scenario(
        CONFIGS[name], kind, n, T, window=window, batch=batch, pad=pad, dtype=dtype, device=device
    )
    out, ref, seen = run_both(cache, layer, q, kind, causal, splits, upcast=True)
    # rows with no visible key (padded queries) average values: finite, so they cannot poison the cache with NaN
    values = cache.v[layer][:, :, : min(cache.slots_of[kind], n + T)]
    assert torch.isfinite(out).all() and (out[~seen].abs() <= values.abs().max()).all()
    if dtype == torch.float32:
        torch.testing.assert_close(out[seen], ref[seen], atol=1e-5, rtol=1e-5)
    else:
        _, ref_low, _ = run_both(cache, layer, q, kind, causal, splits)
        assert_within_torch_error(out, ref, ref_low, where=seen)


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_key_splits_agree(scenario, splits, device):
    """Splitting the keys between programs only reorders the sum: every split count gives the same output."""
    cache, layer, q = scenario(CONFIGS["tiny"], FULL, 70, 8, device=device)
    out, ref, _ = run_both(cache, layer, q, FULL, False, splits)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", [SLIDING, FULL])  # default RoPE over all dims; proportional over a quarter
@pytest.mark.parametrize("weight", [True, False])  # q/k norm; V's weightless norm (then no RoPE either)
def test_norm_rope_writes_the_reference_vectors_into_ring_slots(kind, weight, device):
    config = CONFIGS["tiny"]
    B, T, H, d, R, n = 2, 8, 3, config.head_dim_of(kind), 11, 29  # positions 29..36 wrap around the 11-slot ring
    x = torch.randn(B, T, H, d, device=device)
    w = torch.randn(d, device=device) if weight else None
    inv_freq = rope_inv_freq(config, kind).to(device) if weight else None
    ring = torch.full((B, H, R, d), float("nan"), device=device)
    norm_rope(x, w, inv_freq, 1e-6, pos0=n, out=ring.transpose(1, 2), slot0=n)
    ref = rms_norm(x, w, 1e-6)
    if weight:
        angles = torch.arange(n, n + T, device=device)[:, None].float() * inv_freq
        angles = torch.cat([angles, angles], -1)
        ref = apply_rope(ref, angles.cos(), angles.sin())
    slots = torch.arange(n, n + T) % R
    torch.testing.assert_close(ring[:, :, slots].transpose(1, 2), ref, atol=1e-5, rtol=1e-5)
    untouched = torch.ones(R, dtype=torch.bool)
    untouched[slots] = False
    assert ring[:, :, untouched].isnan().all()
    head_major = norm_rope(x, w, inv_freq, 1e-6, pos0=n)
    assert head_major.is_contiguous()
    torch.testing.assert_close(head_major, ref.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_attention_rejects_mismatched_shapes(scenario, device):
    cache, layer, q = scenario(CONFIGS["tiny"], FULL, 5, 8, device=device)
    band = cache.band(FULL, False)
    with pytest.raises(ValueError, match="does not match the cache"):
        attention(q[..., :-1].contiguous(), cache.k[layer], cache.v[layer], cache.pos[FULL], cache.valid[FULL], 5, band)
    with pytest.raises(ValueError, match="pos"):
        attention(q, cache.k[layer], cache.v[layer], cache.pos[FULL][:-1], cache.valid[FULL], 5, band)


@pytest.fixture(scope="module", params=list(CONFIGS))
def backends(request, tmp_path_factory, device):
    """The same checkpoint loaded with the reference (torch) and the Triton backend."""
    path = tmp_path_factory.mktemp(request.param)
    build_checkpoint(path, CONFIGS[request.param], seed=7)
    load = lambda backend, window: load_model(  # noqa: E731
        path, dtype=torch.float32, device=device, backend=backend, window=window
    )
    return {window: (load("torch", window), load("triton", window)) for window in ("shared", "per_token")}


@pytest.mark.parametrize("window", ["shared", "per_token"])
def test_triton_backend_matches_reference_model(backends, window, device):
    """Prefill a padded batch longer than the window, denoise, commit, denoise again: outputs and cache agree.

    Padded positions are left out: their outputs are never used and their keys are masked for every query."""
    C = backends[window][0].config.canvas_length
    prompt = torch.randint(3, 256, (2, 2 * C + 1), device=device)
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0
    canvas = torch.randint(0, 256, (2, C), device=device)
    outs = []
    for model in backends[window]:
        cache = model.new_cache(2, 4 * C + 1)
        enc = model.encode(prompt, cache, mask)
        first = model.denoise(canvas, cache)
        model.encode(canvas, cache)
        second = model.denoise(canvas, cache, first)
        kv = [
            ring * cache.valid[kind][:, None, :, None]
            for ring, kind in zip(cache.k + cache.v, 2 * model.config.layer_types, strict=True)
        ]
        outs.append((enc[0], enc[1, 4:], first, second, *kv))
    for ref, ours in zip(*outs, strict=True):  # atol: 3.7e-5 is the most either config needs at rtol 1e-4
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_triton_backend_needs_a_device_or_the_interpreter(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        load_model(tiny_checkpoint, device="cpu", backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="real shapes in bf16 need a GPU")
@pytest.mark.parametrize(
    "kind, n, window, causal",
    [
        (SLIDING, 4096, "shared", False),  # decoder, a full ring of W - 1 + 256 slots
        (SLIDING, 4096, "per_token", False),  # decoder, symmetric window
        (FULL, 4096, "shared", False),  # decoder, head dim 512, 8 query heads per KV head
        (SLIDING, 4096, "shared", True),  # encoder commit
        (FULL, 1000, "shared", True),  # encoder, prefix not a block multiple
    ],
)
def test_real_shapes_bf16(scenario, real_config, kind, n, window, causal):
    cache, layer, q = scenario(real_config, kind, n, 256, window=window, dtype=torch.bfloat16, device="cuda")
    out, truth, _ = run_both(cache, layer, q, kind, causal, upcast=True)
    _, own, _ = run_both(cache, layer, q, kind, causal)
    assert_within_torch_error(out, truth, own)
