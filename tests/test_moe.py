"""The moe op (dgemma.kernels.moe: route, align and moe) against the model's reference `Router` and `moe`
(dgemma.model.model).

On the CPU the kernels run under TRITON_INTERPRET=1 at tiny shapes in fp32 and fp16 (the interpreter's bf16 dot is
wrong in Triton 3.9). Its fp8 loads and fp8 -> fp32/fp16 casts are right, so the fp8 kernels run here too, against
the reference on dequantized banks. On a GPU the real shapes run in bf16 and fp8. In 16-bit dtypes the kernel may be
at most twice as far from the fp32 truth as PyTorch's own MoE in that dtype (accuracy.assert_within_torch_error).
"""

import pytest
import torch

from dgemma.kernels.moe import align, moe, route
from dgemma.model import fp8
from dgemma.model.config import Config
from dgemma.model.load import load_model
from dgemma.model.model import Router
from dgemma.model.model import moe as moe_ref

from accuracy import assert_within_torch_error
from oracle import CONFIGS, build_checkpoint

FP8 = torch.float8_e4m3fn


def make_router(E, K, D, dtype, device):
    """A reference Router with random projection, scale and per-expert scales."""
    router = Router(Config.tiny(hidden_size=D, num_experts=E, top_k_experts=K))
    with torch.no_grad():
        router.proj.weight.normal_()
        router.scale.uniform_(0.5, 1.5)
        router.per_expert_scale.uniform_(0.5, 2.0)
    return router.to(device=device, dtype=dtype)


@torch.no_grad()
def run_route(router, r):
    return route(r, router.scale, router.proj.weight, router.per_expert_scale, router.top_k, router.eps)


@torch.no_grad()
def reference_probs(router, r):
    """The reference router's softmax over all E experts, (T, E): the Router itself with top_k = E (renormalizing a
    full softmax changes nothing), divided by the per-expert scales it applies."""
    K, router.top_k = router.top_k, router.per_expert_scale.numel()
    try:
        weights, idx = router(r)
    finally:
        router.top_k = K
    scale = router.per_expert_scale.float()[idx]
    return torch.zeros_like(weights).scatter_(1, idx, weights / scale)


def check_route(router, r, weights, idx, tol):
    """Tie-proof checks of the kernel's (weights, idx) against the reference probabilities, to a relative tol: K
    distinct experts per token whose probabilities are the K largest, in descending order, weights = renormalized
    probabilities x per_expert_scale, and the reference's exact set of experts on every token whose K-th and (K+1)-th
    probabilities are further apart than tol. Returns those tokens."""
    T, K = idx.shape
    E = router.per_expert_scale.numel()
    probs = reference_probs(router, r)
    chosen = idx.long()
    assert weights.dtype == torch.float32 and weights.shape == (T, K)
    assert ((chosen >= 0) & (chosen < E)).all()
    assert (chosen.sort(-1).values.diff(dim=-1) > 0).all()  # distinct
    top = probs.topk(min(K + 1, E), dim=-1).values
    picked = probs.gather(1, chosen)
    torch.testing.assert_close(picked, top[:, :K], atol=0, rtol=tol)  # values at indices: ties cannot fail
    assert (picked.diff(dim=-1) <= tol * picked[:, 1:]).all()  # descending
    expected = picked / picked.sum(-1, keepdim=True) * router.per_expert_scale.float()[chosen]
    torch.testing.assert_close(weights, expected, atol=0, rtol=tol)
    _, ref_idx = router(r)
    clear = top[:, K - 1] > (1 + tol) * top[:, K] if K < E else torch.ones(T, dtype=torch.bool, device=r.device)
    assert (chosen.sort(-1).values == ref_idx.long().sort(-1).values)[clear].all()
    return clear


# (T, E, K, D)
ROUTER_SHAPES = [
    (33, 5, 3, 48),  # odd tokens (two token blocks), E not a power of 2
    (1, 128, 8, 64),  # one token, the real expert count and top-8
    (7, 4, 2, 64),  # the tiny model's router
]


@pytest.mark.parametrize("T, E, K, D", ROUTER_SHAPES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
def test_route_matches_reference_router(T, E, K, D, dtype, tol, device):
    router = make_router(E, K, D, dtype, device)
    r = (torch.randn(T, D, device=device) * 3).to(dtype)
    weights, idx = run_route(router, r)
    clear = check_route(router, r, weights, idx, tol)
    assert clear.float().mean() > 0.5  # the exact-set check is not vacuous
    with torch.no_grad():
        ref_weights, ref_idx = router(r)
    by_expert = lambda w, i: w.gather(1, i.long().argsort(-1))[clear]  # noqa: E731 - tied experts may swap places
    torch.testing.assert_close(by_expert(weights, idx), by_expert(ref_weights, ref_idx), atol=0, rtol=tol)


def test_route_ties(device):
    """Experts 1-3 share one projection row, so their probabilities tie on every token; a zero projection makes all
    E probabilities equal, and any K distinct experts are then right, each weighted 1/K x its scale."""
    router = make_router(6, 3, 32, torch.float32, device)
    with torch.no_grad():
        router.proj.weight[2:4] = router.proj.weight[1]
    r = torch.randn(9, 32, device=device)
    weights, idx = run_route(router, r)
    check_route(router, r, weights, idx, 1e-5)
    assert (((idx >= 1) & (idx <= 3)).sum(-1) == 2).any()  # on some tokens the tie straddles the K boundary
    with torch.no_grad():
        router.proj.weight.zero_()
    weights, idx = run_route(router, r)
    check_route(router, r, weights, idx, 1e-5)
    torch.testing.assert_close(weights, router.per_expert_scale.detach()[idx.long()] / 3)


def test_route_one_expert_for_all_and_one_for_none(device):
    """A dominant expert is every token's first choice; an expert with a hugely negative logit is nobody's."""
    router = make_router(5, 2, 32, torch.float32, device)
    with torch.no_grad():
        router.scale.fill_(1.0)
        router.proj.weight.mul_(0.1)
        router.proj.weight[2] = 5.0
        router.proj.weight[3] = -5.0
    r = 1 + 0.1 * torch.randn(17, 32, device=device)
    weights, idx = run_route(router, r)
    check_route(router, r, weights, idx, 1e-5)
    assert (idx[:, 0] == 2).all() and not (idx == 3).any()


def test_route_top_k_equals_expert_count(device):
    router = make_router(5, 5, 48, torch.float32, device)
    r = torch.randn(7, 48, device=device)
    weights, idx = run_route(router, r)
    check_route(router, r, weights, idx, 1e-5)
    assert (idx.long().sort(-1).values == torch.arange(5, device=device)).all()  # every expert, once
    torch.testing.assert_close(
        (weights / router.per_expert_scale.detach()[idx.long()]).sum(-1), torch.ones(7, device=device)
    )


def check_alignment(idx, E, block_m, pair, block_expert):
    """Every (token, choice) pair sits in exactly one row of a block of its own expert; padding rows hold T*K."""
    P = idx.numel()
    flat = idx.flatten().long()
    counts = torch.bincount(flat, minlength=E)
    blocks = (counts + block_m - 1) // block_m
    used = int(blocks.sum())
    assert block_expert.numel() == (P + min(E, P) * (block_m - 1)) // block_m  # the worst case, no host sync
    assert pair.numel() == block_expert.numel() * block_m
    assert (block_expert[:used] >= 0).all() and (block_expert[used:] == -1).all()  # used blocks first
    assert torch.equal(block_expert[:used].long(), torch.repeat_interleave(torch.arange(E), blocks))  # expert order
    rows = pair[: used * block_m].long().view(used, block_m)
    real = rows < P
    assert (rows[~real] == P).all()  # padding is marked with the sentinel
    assert torch.equal(rows[real].sort().values, torch.arange(P))  # every pair exactly once
    assert (flat[rows[real]] == block_expert[:used, None].long().expand_as(rows)[real]).all()  # expert-homogeneous
    run = rows.flatten()
    for e, start in zip(range(E), (torch.cumsum(blocks, 0) - blocks) * block_m, strict=True):
        mine = run[start : start + counts[e]]
        assert (mine < P).all() and (mine.diff() > 0).all()  # real rows first, in (token, choice) order
        assert (run[start + counts[e] : start + blocks[e] * block_m] == P).all()


def distinct_choices(T, E, K, device):
    return torch.rand(T, E, device=device).argsort(-1)[:, :K].to(torch.int32)


# name -> (E, expert ids)
ALIGN_CASES = {
    "random": (5, lambda d: distinct_choices(33, 5, 3, d)),  # several blocks for some experts
    "one-token-many-experts": (128, lambda d: distinct_choices(1, 128, 8, d)),  # 120 experts receive nothing
    "all-to-one-expert": (5, lambda d: torch.full((40, 1), 2, dtype=torch.int32, device=d)),  # 3 blocks of expert 2
    "k-equals-e": (4, lambda d: distinct_choices(7, 4, 4, d)),
    "expert-without-tokens": (5, lambda d: 1 + distinct_choices(20, 4, 2, d)),  # expert 0 receives nothing
}


@pytest.mark.parametrize("case", list(ALIGN_CASES))
@pytest.mark.parametrize("block_m", [16, 32])
def test_align_invariants(case, block_m, device):
    E, make = ALIGN_CASES[case]
    idx = make(device)
    pair, block_expert = align(idx, E, block_m)
    check_alignment(idx.cpu(), E, block_m, pair.cpu(), block_expert.cpu())


def expert_banks(E, D, I, device):
    gate_up = torch.randn(E, 2 * I, D, device=device) / D**0.5
    down = torch.randn(E, D, I, device=device) / I**0.5
    return gate_up, down


# (T, E, K, D, I)
MOE_SHAPES = [
    (33, 4, 2, 64, 32),  # the tiny model's experts; ~16 rows per expert, so some need two 16-row blocks
    (7, 5, 3, 48, 24),  # E not a power of 2; D and I not multiples of the 16-wide tiles
    (1, 5, 3, 48, 24),  # one token: most blocks empty
]


@pytest.mark.parametrize("T, E, K, D, I", MOE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_moe_matches_reference(T, E, K, D, I, dtype, device):
    x = torch.randn(T, D, device=device)
    weights, idx = torch.rand(T, K, device=device) + 0.5, distinct_choices(T, E, K, device)
    gate_up, down = expert_banks(E, D, I, device)
    truth = moe_ref(x, weights, idx.long(), gate_up, down)
    lo = [t.to(dtype) for t in (x, gate_up, down)]
    out = moe(lo[0], weights, idx, lo[1], lo[2])
    assert out.dtype == dtype and out.shape == (T, D)
    if dtype == torch.float32:
        torch.testing.assert_close(out, truth, atol=1e-5, rtol=1e-5)
    else:
        assert_within_torch_error(out, truth, moe_ref(lo[0], weights, idx.long(), lo[1], lo[2]))


@pytest.mark.parametrize(
    "case",
    [
        "same-experts-for-all",  # every token picks experts 3, 1: two full runs, the other experts idle
        "expert-without-tokens",  # expert 0 is never picked
        "k-equals-e",  # every expert gets every token
    ],
)
def test_moe_routing_edge_cases(case, device):
    T, E, D, I = 21, 4, 48, 24
    if case == "same-experts-for-all":
        idx = torch.tensor([[3, 1]], dtype=torch.int32, device=device).expand(T, 2).contiguous()
    elif case == "expert-without-tokens":
        idx = 1 + distinct_choices(T, E - 1, 2, device)
    else:
        idx = distinct_choices(T, E, E, device)
    weights = torch.rand(idx.shape, device=device)
    x = torch.randn(T, D, device=device)
    gate_up, down = expert_banks(E, D, I, device)
    out = moe(x, weights, idx, gate_up, down)
    torch.testing.assert_close(out, moe_ref(x, weights, idx.long(), gate_up, down), atol=1e-5, rtol=1e-5)


def test_quantize_fp8_per_output_channel():
    """One scale per output row: each row's largest magnitude maps to e4m3's 448 and back; elements round-trip
    within half an e4m3 step (2^-4 relative, 2^-10 x scale in the subnormal range); a zero row stays zero."""
    w = torch.randn(3, 40, 24) * torch.logspace(-3, 2, 40)[None, :, None]  # rows of very different magnitude
    w[1, 5] = 0.0
    q, scale = fp8.quantize(w)
    assert q.dtype == FP8 and scale.dtype == torch.float32 and scale.shape == (3, 40)
    assert (q.float().abs().amax(-1)[scale != 1] == 448).all() and scale[1, 5] == 1
    back = fp8.dequantize(q, scale, torch.float32)
    assert (back[1, 5] == 0).all()
    bound = 2**-4 * w.abs() + 2**-10 * scale[..., None]
    assert ((back - w).abs() <= bound).all()
    assert (back - w).norm() / w.norm() < 0.03
    w[0, 0] *= 1000  # per-channel, not per-tensor: rescaling one row leaves every other row's codes alone
    q2, _ = fp8.quantize(w)
    assert torch.equal(q2.view(torch.uint8).flatten()[24:], q.view(torch.uint8).flatten()[24:])


@pytest.mark.parametrize("T, E, K, D, I", MOE_SHAPES[:2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_moe_fp8_matches_dequantized_reference(T, E, K, D, I, dtype, device):
    """fp8 banks with per-channel scales, upcast in the kernel; the reference runs on the dequantized banks."""
    x = torch.randn(T, D, device=device)
    weights, idx = torch.rand(T, K, device=device) + 0.5, distinct_choices(T, E, K, device)
    (gu_q, gu_s), (dn_q, dn_s) = (fp8.quantize(b) for b in expert_banks(E, D, I, device))
    dequantized = lambda dt: (fp8.dequantize(gu_q, gu_s, dt), fp8.dequantize(dn_q, dn_s, dt))  # noqa: E731
    truth = moe_ref(x, weights, idx.long(), *dequantized(torch.float32))
    out = moe(x.to(dtype), weights, idx, gu_q, dn_q, gu_s, dn_s)
    if dtype == torch.float32:
        torch.testing.assert_close(out, truth, atol=1e-5, rtol=1e-5)
    else:
        assert_within_torch_error(out, truth, moe_ref(x.to(dtype), weights, idx.long(), *dequantized(dtype)))


def test_moe_rejects_mismatched_inputs(device):
    T, E, K, D, I = 5, 4, 2, 32, 16
    x, weights = torch.randn(T, D, device=device), torch.rand(T, K, device=device)
    idx = distinct_choices(T, E, K, device)
    gate_up, down = expert_banks(E, D, I, device)
    with pytest.raises(ValueError, match="do not match x"):
        moe(x[:, :-1], weights, idx, gate_up, down)
    with pytest.raises(ValueError, match="must both be"):
        moe(x, weights[:, :1], idx, gate_up, down)
    with pytest.raises(ValueError, match="need gate_up_scale"):
        moe(x, weights, idx, gate_up.to(FP8), down.to(FP8))
    ones = lambda n: torch.ones(n, device=device)  # noqa: E731
    with pytest.raises(ValueError, match="top_k"):
        route(x, ones(D), torch.randn(E, D, device=device), ones(E), E + 1, 1e-6)


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    build_checkpoint(path, CONFIGS[request.param], seed=11)
    return path


@pytest.mark.parametrize("expert_dtype", [None, "fp8"])
def test_triton_backend_matches_reference_model(checkpoint, expert_dtype, device):
    """A prompt chunk through the encoder, then a canvas through the decoder: the Triton backend (attention and MoE
    kernels) matches the torch backend in fp32; with fp8 experts, the torch backend runs on the dequantized banks."""
    models = [
        load_model(checkpoint, dtype=torch.float32, device=device, backend=backend, expert_dtype=expert_dtype)
        for backend in ("torch", "triton")
    ]
    C = models[0].config.canvas_length
    prompt, canvas = torch.randint(3, 256, (1, C), device=device), torch.randint(0, 256, (1, C), device=device)
    outs = []
    for model in models:
        experts = model.layers[0].experts
        assert experts.gate_up_proj.dtype == (FP8 if expert_dtype else torch.float32)
        assert (getattr(experts, "gate_up_scale", None) is not None) == (expert_dtype == "fp8")
        cache = model.new_cache(1, 2 * C)
        outs.append((model.encode(prompt, cache), model.denoise(canvas, cache)))
    for ref, ours in zip(*outs, strict=True):  # atol: 7e-6 is the most either config needs at rtol 1e-4
        torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_fp8_loading(tiny_checkpoint):
    full = load_model(tiny_checkpoint, dtype=torch.float32)
    quantized = load_model(tiny_checkpoint, dtype=torch.float32, expert_dtype="fp8")
    for a, b in zip(full.layers, quantized.layers, strict=True):
        for bank in ("gate_up", "down"):
            w, q = getattr(a.experts, f"{bank}_proj"), getattr(b.experts, f"{bank}_proj")
            scale = getattr(b.experts, f"{bank}_scale")
            assert q.dtype == FP8 and scale.shape == w.shape[:2]
            back = fp8.dequantize(q, scale, torch.float32)
            assert ((back - w).abs() <= 2**-4 * w.abs() + 2**-10 * scale[..., None]).all()
        torch.testing.assert_close(b.mlp.down_proj.weight, a.mlp.down_proj.weight, atol=0, rtol=0)  # others untouched
    with pytest.raises(ValueError, match="expert_dtype"):
        load_model(tiny_checkpoint, expert_dtype="int4")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="real shapes in bf16 and fp8 need a GPU")
@pytest.mark.parametrize("expert_dtype", [None, "fp8"])
def test_real_shapes(real_config, expert_dtype):
    """T=256, E=128, K=8, D=2816, I=704 in bf16: route and moe without a host sync, the router against the reference
    router, the MoE within twice PyTorch's own bf16 error of the fp32 truth (fp8: on the dequantized banks)."""
    c = real_config
    T, E, K, D, I = c.canvas_length, c.num_experts, c.top_k_experts, c.hidden_size, c.moe_intermediate_size
    router = make_router(E, K, D, torch.bfloat16, "cuda")
    r = torch.randn(T, D, device="cuda").to(torch.bfloat16)
    x = torch.randn(T, D, device="cuda").to(torch.bfloat16)
    gate_up, down = (b.to(torch.bfloat16) for b in expert_banks(E, D, I, "cuda"))
    banks, scales = (gate_up, down), (None, None)
    if expert_dtype == "fp8":
        (gu_q, gu_s), (dn_q, dn_s) = fp8.quantize(gate_up), fp8.quantize(down)
        banks, scales = (gu_q, dn_q), (gu_s, dn_s)
        gate_up, down = (
            fp8.dequantize(gu_q, gu_s, torch.float32),
            fp8.dequantize(dn_q, dn_s, torch.float32),
        )
    moe(x, *run_route(router, r), *banks, *scales)  # compile first: the checked call is the steady state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        weights, idx = run_route(router, r)
        out = moe(x, weights, idx, *banks, *scales)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    check_route(router, r, weights, idx, 5e-2)  # bf16 logits: the dot's order moves them by an ulp (0.4%) or two
    truth = moe_ref(x.float(), weights, idx.long(), gate_up.float(), down.float())
    own = moe_ref(x, weights, idx.long(), gate_up.to(torch.bfloat16), down.to(torch.bfloat16))
    assert_within_torch_error(out, truth, own)
