"""The vocab op (dgemma.kernels.vocab: vocab_pass) against its reference `vocab_ref`: the model's LM head and soft
embedding and the runtime's sampler math (runtime/sampler.py), unfused.

On the CPU the kernels run under TRITON_INTERPRET=1 at small shapes in fp32 and fp16 (the interpreter's bf16 dot is
wrong in Triton 3.9); the real shapes run on a GPU (marked gpu). The truth is the reference math in float64 on the
same inputs; in 16-bit dtypes the pass may be at most twice as far from it as the reference in that dtype
(accuracy.assert_within_torch_error).

Legend: R rows (B batch rows of C positions), V vocabulary, D hidden.
"""

import pytest
import torch

from dgemma.kernels.vocab import CombineTile, ReduceTile, SoftTile, StatsTile, Tiles, vocab_pass, vocab_ref
from dgemma.runtime.sampler import SamplingConfig, entropy, temperature

from accuracy import assert_argmax, assert_within_torch_error

CAP = 30.0


def inputs(R, V, D, B, dtype=torch.float32, device="cpu"):
    """h (R, D) whose rows' logit scales span 0.03..30 (entropies from ~ln V down to ~0, softcaps saturated at the
    top), a (V, D) table and B temperatures from the checkpoint's schedule."""
    h = torch.randn(R, D, device=device) * 10 ** (torch.rand(R, 1, device=device) * 3 - 1.5)
    w = torch.randn(V, D, device=device) / D**0.5
    T = torch.stack([temperature(n, SamplingConfig()) for n in torch.randint(1, 49, (B,)).tolist()]).to(device)
    return h.to(dtype), w.to(dtype), T


def run(h, w, T, *, seed=0, tick=0, **kwargs):
    tick = torch.tensor([tick], device=h.device)
    return vocab_pass(h, w, T, tick, seed=seed, cap=CAP, scale=float(w.shape[1] ** 0.5), **kwargs)


def truth(h, w, T):
    """The reference math in float64 on the same (rounded) inputs: scaled logits, argmax, max prob, entropy, soft."""
    return vocab_ref(h.double(), w.double(), T.double(), CAP, h.shape[1] ** 0.5)


# (R, V, D, B)
CASES = {
    "one-position": (1, 300, 40, 1),  # a single row; V not a multiple of the 64-wide tile
    "many-positions": (40, 300, 72, 5),  # 5 batch rows of 8 positions; D not a multiple of BLOCK_D; several splits
    "one-tile": (24, 64, 32, 2),  # the whole vocabulary in one tile and one split
}


def assert_matches(out, h, w, T):
    """fp32: max probability and entropy within 1e-4 relative of the truth, the soft embedding within 1e-5 (the CPU
    shapes need 1e-5 and 2e-6; the GPU test's 262,144-token rows share these bounds); fp16 and bf16: at most twice as
    far from the truth as PyTorch's own ops in that dtype (which round logits and probs)."""
    z, _, max_prob, H, soft = truth(h, w, T)
    assert_argmax(z, out.argmax, h.dtype)
    # the sample's key beat the argmax's: a Gumbel key is at most G_MAX = 17 above its logit, and at least
    # -log(31 log 2) = -3.07 below it (tl.rand's least u > 0 is 2^-31); the kernel's logits are rounded to h's dtype
    top, drawn = z.max(-1).values, z.gather(-1, out.sample[:, None]).squeeze(-1)
    assert ((out.sample >= 0) & (out.sample < w.shape[0])).all()
    assert (top - drawn <= 17 + 3.07 + 4 * torch.finfo(h.dtype).eps * top.abs()).all()
    if h.dtype == torch.float32:
        torch.testing.assert_close(out.max_prob.double(), max_prob, rtol=1e-4, atol=0)
        torch.testing.assert_close(out.entropy.double(), H, rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(out.soft.double(), soft, rtol=1e-5, atol=1e-5 * soft.abs().max().item())
        return
    _, _, own_max_prob, own_H, own_soft = vocab_ref(h, w, T, CAP, h.shape[1] ** 0.5)
    for ours, exact, own in (
        (out.max_prob, max_prob, own_max_prob),
        (out.entropy, H, own_H),
        (out.soft, soft, own_soft),
    ):
        assert_within_torch_error(ours, exact, own)


def test_reference_entropy_is_the_samplers():
    """vocab_ref computes the entropy itself (the kernels import nothing of the runtime): exactly the sampler's."""
    h, w, T = inputs(*CASES["many-positions"])
    z, _, _, H, _ = vocab_ref(h.double(), w.double(), T.double(), CAP, 1.0)
    torch.testing.assert_close(H, entropy(z), rtol=0, atol=0)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_vocab_pass_matches_reference(case, dtype, device):
    h, w, T = inputs(*CASES[case], dtype, device)
    assert_matches(run(h, w, T), h, w, T)


def test_near_deterministic_rows_keep_their_entropy(device):
    """Rows whose top logit leads by 7..56 nats: entropies down to ~2e-21 stay within 1e-4 of the truth (a plain
    log l - sum p z loses them to cancellation, as the runtime's fp32 `entropy` does below ~1e-7)."""
    V = 64
    lead = torch.tensor([3.0, 8.0, 16.0, 24.0, 29.0], device=device)  # pre-softcap; softcapped, / T = 0.4: 7.5 .. 56
    h = torch.randn(len(lead), V, device=device) * 0.3
    h[:, 5] = lead
    w = torch.eye(V, device=device)  # logits = h
    T = torch.full((1,), 0.4, device=device)
    out = run(h, w, T)
    z, _, max_prob, _, _ = truth(h, w, T)
    # the truth without cancellation: log p of the top token is -log1p(the others' mass), not a difference of two
    # ~50-nat numbers (even in float64 the runtime's formula drops that leading term below H ~ 1e-16)
    d = z - z.max(-1, keepdim=True).values
    others = d.exp().scatter(-1, z.argmax(-1, keepdim=True), 0.0).sum(-1, keepdim=True)
    logp = d - others.log1p()
    H = -(logp.exp() * logp).sum(-1)
    assert (out.argmax == 5).all() and H.min() < 1e-15
    torch.testing.assert_close(out.entropy.double(), H, rtol=1e-4, atol=0)
    torch.testing.assert_close(out.max_prob.double(), max_prob, rtol=1e-6, atol=0)


@pytest.mark.parametrize("splits", [1, 2, 5])  # one split of several tiles, and splits that divide V unevenly
def test_splits_and_the_recompute_variant_agree(splits, device):
    """The vocabulary splits only reorder sums, and Philox's counters do not depend on the tiling: the same argmax
    and sample for every split count; recomputing the logits instead of stashing them gives the same soft embedding."""
    h, w, T = inputs(16, 300, 40, 2, device=device)
    ref = run(h, w, T, seed=3, tick=5)
    out = run(h, w, T, seed=3, tick=5, splits=splits, stash=splits != 2)
    assert torch.equal(out.argmax, ref.argmax) and torch.equal(out.sample, ref.sample)
    for ours, theirs in zip(out[2:], ref[2:], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stash", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_logits_input_is_the_same_pass(stash, dtype, device):
    """An exported decoder graph hands over soft-capped fp32 logits, not hidden states (runtime/engine.py): reading
    them where the kernel would compute them gives the hidden-state pass's argmax and (same Philox counters) sample,
    and the reference's probabilities, entropy and soft embedding, in both the stash and the recompute variant."""
    h, w, T = inputs(*CASES["many-positions"], dtype, device)
    logits = CAP * torch.tanh(torch.nn.functional.linear(h, w).float() / CAP)  # DiffusionGemma.logits
    out = run(logits, w, T, seed=3, tick=5, logits=True, stash=stash)
    ref = run(h, w, T, seed=3, tick=5, stash=stash)
    assert torch.equal(out.argmax, ref.argmax) and torch.equal(out.sample, ref.sample)
    assert_matches(out, h, w, T)
    with pytest.raises(ValueError, match="want"):  # hidden states passed as logits
        run(h, w, T, logits=True)


def test_kept_rows_are_not_written(device):
    h, w, T = inputs(12, 100, 24, 3, device=device)
    before = torch.full_like(h, 7.0)
    keep = torch.tensor([False, True, False], device=device)
    out = run(h, w, T, soft=before.clone(), keep=keep)
    fresh = run(h, w, T).soft
    assert (out.soft[4:8] == 7.0).all()  # batch row 1 is positions 4..7
    torch.testing.assert_close(out.soft[:4], fresh[:4], rtol=0, atol=0)
    torch.testing.assert_close(out.soft[8:], fresh[8:], rtol=0, atol=0)


def test_seeds_and_ticks_reproduce(device):
    h, w, T = inputs(16, 200, 24, 1, device=device)
    h = h / h.norm(dim=-1, keepdim=True)  # flat distributions: the sample is mostly not the argmax
    a, b = run(h, w, T, seed=7, tick=2).sample, run(h, w, T, seed=7, tick=2).sample
    assert torch.equal(a, b)
    assert not torch.equal(a, run(h, w, T, seed=8, tick=2).sample)
    assert not torch.equal(a, run(h, w, T, seed=7, tick=3).sample)


def test_gumbel_sample_follows_the_probabilities(device):
    """2048 positions with the same distribution over 16 tokens: the likeliest (p = 0.9) in the first 64-token tile,
    the other 15 (4.5 to 5.5 nats lower) scattered through the next two tiles, all others at ~e^-34. A chi-square
    test of the sample counts against softmax of the float64 scaled logits; the seed is fixed, and the threshold
    p < 1e-6 would fail a correct sampler once in a million seeds (this one gives p = 0.19). Dropping the Gumbel term,
    flipping its sign or skipping later tiles that could still win (a too small G_MAX) fails it by many orders of
    magnitude."""
    R, V, live = 2048, 192, 16
    tokens = torch.cat([torch.randint(0, 64, (1,)), 64 + torch.randperm(128)[: live - 1]]).to(device)
    w = torch.zeros(V, live + 1, device=device)
    w[:, live] = 1.0  # every token reads h's last entry...
    w[tokens] = torch.eye(live + 1, device=device)[:live]  # ...but the live ones, one entry each
    h = torch.cat([torch.tensor([2.4]), torch.linspace(-2.0, -1.2, live - 1), torch.tensor([-40.0])])
    h = h.to(device).expand(R, live + 1).contiguous()
    T = torch.full((1,), 0.8, device=device)
    config = None
    if device.type != "cuda":  # few big programs: the interpreter's cost is per program and op
        config = Tiles(
            stats=StatsTile(BLOCK_M=256, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=1),
            combine=CombineTile(BLOCK_R=256, BLOCK_V=256),
            soft=SoftTile(BLOCK_M=256, BLOCK_N=32, BLOCK_K=64, BLOCK_D=32, num_warps=4, num_stages=1),
            reduce=ReduceTile(BLOCK_R=256, BLOCK_N=32),
        )
    out = run(h, w, T, seed=1234, tick=0, config=config, splits=1)
    p = truth(h[:1], w, T)[0].softmax(-1)[0, tokens]
    counts = torch.bincount(out.sample, minlength=V).double()
    assert counts[tokens].sum() == R  # never a token at ~e^-34
    expected, observed = R * p / p.sum(), counts[tokens]
    chi2 = ((observed - expected) ** 2 / expected).sum()
    p_value = torch.special.gammaincc(torch.tensor((live - 1) / 2, dtype=torch.float64), chi2.cpu() / 2)
    assert p_value > 1e-6, (chi2, observed, expected)


def test_bad_arguments_are_refused(device):
    h, w, T = inputs(6, 40, 16, 2, device=device)
    with pytest.raises(ValueError, match="weight"):
        run(h, w[:, :8].contiguous(), T)  # hidden sizes differ
    with pytest.raises(ValueError, match="B=4"):
        run(h, w, torch.ones(4, device=device))  # 6 rows are not 4 batch rows of equal canvases
    with pytest.raises(ValueError, match="tick"):
        vocab_pass(h, w, T, torch.zeros(1, dtype=torch.int32, device=device), seed=0, cap=CAP, scale=4.0)
    with pytest.raises(ValueError, match="keep"):
        run(h, w, T, keep=torch.zeros(3, dtype=torch.bool, device=device))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the real vocabulary and hidden size need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # IEEE fp32 dots; the model's dtype
def test_real_shapes(real_config, dtype):
    """One canvas of 256 positions against the 262,144 x 2,816 table, to the CPU tests' tolerances."""
    c = real_config
    h, w, T = inputs(c.canvas_length, c.vocab_size, c.hidden_size, 1, dtype, torch.device("cuda"))
    assert_matches(run(h, w, T), h, w, T)
