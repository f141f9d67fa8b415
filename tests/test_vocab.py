"""The fused vocabulary pass (dgemma.kernels.vocab) and the sampler's device step (dgemma.kernels.sampler) against the
runtime's reference sampler math (runtime/sampler.py) and the model's own ops, and the Triton backend's no-sync
canvas loop (runtime/pipeline.py's DeviceLoop) end to end.

On the CPU the kernels run under TRITON_INTERPRET=1 at small shapes in fp32 and fp16 (the interpreter's bf16 dot is
wrong in Triton 3.9); the real shapes run on a GPU (marked gpu). The truth is the reference math in float64 on the
same inputs.

Legend: R rows (B batch rows of C positions), V vocabulary, D hidden, N max denoising steps, s stability threshold.
"""

import pytest
import torch

from dgemma import Pipeline
from dgemma.kernels import vocab
from dgemma.kernels.sampler import SamplerState, sampler_step
from dgemma.kernels.vocab import CombineTile, ReduceTile, SoftTile, StatsTile, Tiles, vocab_pass, vocab_ref
from dgemma.model.config import Config
from dgemma.runtime.sampler import SamplingConfig, entropy, entropy_bound_accept, stable, temperature

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


def assert_argmax(z, idx, dtype):
    """The truth's logit at the returned index is the max, up to the rounding of the logits to the activation dtype
    (which the kernel does, as F.linear does): so ties, real or made by that rounding, cannot fail."""
    top = z.max(-1).values
    eps = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    assert (top - z.gather(-1, idx[:, None]).squeeze(-1) <= eps * top.abs().clamp(min=1)).all()


# (R, V, D, B)
CASES = {
    "one-position": (1, 300, 40, 1),  # a single row; V not a multiple of the 64-wide tile
    "many-positions": (40, 300, 72, 5),  # 5 batch rows of 8 positions; D not a multiple of BLOCK_D; several splits
    "one-tile": (24, 64, 32, 2),  # the whole vocabulary in one tile and one split
}


def assert_matches(out, h, w, T):
    """fp32: max probability and entropy within 1e-4 relative of the truth, the soft embedding within 1e-5; fp16 and
    bf16: at most twice as far from the truth as PyTorch's own ops in that dtype (which round logits and probs)."""
    z, _, max_prob, H, soft = truth(h, w, T)
    assert_argmax(z, out.argmax, h.dtype)
    assert ((out.sample >= 0) & (out.sample < w.shape[0])).all()
    if h.dtype == torch.float32:
        torch.testing.assert_close(out.max_prob.double(), max_prob, rtol=1e-4, atol=0)
        torch.testing.assert_close(out.entropy.double(), H, rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(out.soft.double(), soft, rtol=1e-5, atol=1e-5 * soft.abs().max().item())
        return
    _, _, own_max_prob, own_H, own_soft = vocab_ref(h, w, T, CAP, h.shape[1] ** 0.5)
    pairs = ((out.max_prob, own_max_prob, max_prob), (out.entropy, own_H, H), (out.soft, own_soft, soft))
    for ours, own, exact in pairs:
        err, own_err = (ours.double() - exact).abs().max(), (own.double() - exact).abs().max()
        assert err <= 2 * own_err + 1e-6 * exact.abs().max(), (err, own_err)


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


def sampler_scenario(s, device, B=4, C=37, V=50, N=6, step=2):
    """Mid-canvas state (step 2): row 0 confident and stable, row 1 with entropies spread over 1e-4..6 (some positions
    accepted), row 2 stopped at an earlier step (frozen), row 3 finished in an earlier canvas (frozen)."""
    cfg = SamplingConfig(max_denoising_steps=N, stability_threshold=s, confidence_threshold=0.05)
    schedule = torch.stack([temperature(n, cfg) for n in range(N, 0, -1)]).to(device)
    state = SamplerState.new(B, C, 8, s, schedule, torch.float32)
    state.start(torch.randint(0, V, (B, C), device=device), torch.tensor([False, False, False, True], device=device))
    argmax, sample = torch.randint(0, V, (2, B, C), device=device)
    state.argmax.copy_(torch.randint(0, V, (B, C), device=device))
    state.history.copy_(torch.randint(0, V, (s, B, C), device=device))
    state.history[:, 0] = argmax[0]
    state.done[2] = state.frozen[2] = state.frozen[3] = True
    state.step.fill_(step)
    state.tick.fill_(11)
    H = 10 ** (torch.rand(B, C, device=device) * 4.8 - 4)
    H[0] = torch.rand(C, device=device) * 0.01
    H[0, ::5] = 0.0  # ties at zero (their order cannot matter)
    return cfg, state, argmax, sample, H


@pytest.mark.parametrize("s", [0, 1, 2])  # always stable; the checkpoint's 1; a longer history that must roll
def test_sampler_step_matches_reference(s, device):
    cfg, state, argmax, sample, H = sampler_scenario(s, device)
    B, C, V, step = 4, 37, 50, 2
    before = {name: getattr(state, name).clone() for name in ("canvas", "argmax", "history", "done", "frozen")}
    frozen = before["frozen"][:, None]
    a = torch.where(frozen, before["argmax"], argmax)  # the runtime's default loop, on the same inputs
    history = before["history"].clone()
    done = before["done"] | (stable(history, a) & (H.mean(-1) < cfg.confidence_threshold))
    accepted = entropy_bound_accept(H, cfg.entropy_bound)
    passes = torch.zeros(B, dtype=torch.long, device=device)
    sampler_step(
        state, argmax, sample, H, passes, V=V, seed=5, bound=cfg.entropy_bound, threshold=cfg.confidence_threshold
    )
    assert torch.equal(state.accepted, accepted) and 0 < accepted[1].sum() < C
    assert torch.equal(state.argmax, a) and torch.equal(state.history, history) and torch.equal(state.done, done)
    assert done[0] and not done[1]
    live = ~frozen & accepted
    assert torch.equal(state.canvas[live], sample[live])  # accepted positions take the sample
    noise = state.canvas[~frozen & ~accepted]
    assert ((noise >= 0) & (noise < V)).all() and noise.unique().numel() > 5  # the rest are renoised uniformly
    assert torch.equal(state.canvas[frozen.expand(B, C)], before["canvas"][frozen.expand(B, C)])
    assert torch.equal(passes, (~before["done"]).long())
    assert state.counts[1 + step * B : 1 + (step + 1) * B].tolist() == accepted.sum(-1).tolist()
    # the finishing program: statistics, the next step's temperature and frozen rows
    assert state.counts[0] == 1 and state.running.item() == 1 and state.tick.item() == 12 and state.step.item() == 3
    assert torch.equal(state.frozen, done)
    assert torch.equal(state.temperature, temperature(cfg.max_denoising_steps - 3, cfg).expand(B).to(device))


def test_a_step_after_convergence_changes_nothing(device):
    """The host may queue one step after every row has stopped: it must leave the state and the statistics alone."""
    cfg, state, argmax, sample, H = sampler_scenario(1, device)
    state.done.fill_(True)
    state.frozen.fill_(True)
    state.running.zero_()
    before = {name: getattr(state, name).clone() for name in ("canvas", "argmax", "counts", "tick", "done")}
    passes = torch.zeros(4, dtype=torch.long, device=device)
    sampler_step(state, argmax, sample, H, passes, V=50, seed=5, bound=0.1, threshold=0.05)
    for name, value in before.items():
        assert torch.equal(getattr(state, name), value), name
    assert (passes == 0).all() and state.running.item() == 0 and state.step.item() == 3


@pytest.fixture(scope="module")
def triton_pipe(tiny_checkpoint, device):
    return Pipeline.from_pretrained(tiny_checkpoint, dtype=torch.float32, device=device, backend="triton")


def generate_and_replay(pipe, monkeypatch, prompt, seed, **sampling):
    """Generates one canvas with the Triton backend, recording each step's hidden states and the vocabulary pass's
    outputs, then replays the runtime's reference sampler math on the logits of those same hidden states: the
    decisions the device made (argmax, acceptance, stop) must be the reference's, step by step."""
    steps = []
    real = vocab.vocab_pass

    def spy(h, weight, temperature, tick, **kwargs):
        out = real(h, weight, temperature, tick, **kwargs)
        steps.append((h.clone(), temperature.clone(), out.argmax.clone(), out.soft.clone()))
        return out

    monkeypatch.setattr(vocab, "vocab_pass", spy)
    drafts = []
    out = pipe.generate(prompt, max_new_tokens=8, stop_ids=[], seed=seed, on_draft=drafts.append, **sampling)
    model, cfg = pipe.model, pipe.sampling_config(**sampling)
    (B, C), N = drafts[0].argmax.shape, cfg.max_denoising_steps
    assert len(steps) == len(drafts) == out.stats.steps_per_canvas[0] == out.stats.decoder_passes[0]
    history = torch.full((cfg.stability_threshold, B, C), -1)
    done, argmax = torch.zeros(B, dtype=torch.bool), None
    for i, ((h, T, kernel_argmax, soft), draft) in enumerate(zip(steps, drafts, strict=True)):
        assert torch.equal(T.cpu(), temperature(N - i, cfg).expand(B))  # the device schedule is bit-equal
        z = (model.logits(h.view(B, C, -1)) / temperature(N - i, cfg)).cpu()
        assert_argmax(z.view(B * C, -1), kernel_argmax.cpu(), torch.float32)
        new = kernel_argmax.view(B, C).cpu() if argmax is None else torch.where(done[:, None], argmax, draft.argmax)
        assert torch.equal(draft.argmax, new)
        H = entropy(z)
        assert torch.equal(draft.accepted, entropy_bound_accept(H, cfg.entropy_bound))
        done = done | (stable(history, draft.argmax) & (H.mean(-1) < cfg.confidence_threshold))
        assert torch.equal(draft.done, done)
        ref_soft = model.soft_embedding(z.to(device=h.device)).view(B * C, -1)
        torch.testing.assert_close(soft, ref_soft, rtol=1e-5, atol=1e-5 * ref_soft.abs().max().item())
        argmax = draft.argmax
    assert out.sequences[0, len(prompt) :].tolist() == argmax[0].tolist()  # the last argmax is committed
    assert out.stats.accepted_per_step == [d.accepted.sum(-1).float().mean().item() for d in drafts]
    return out, drafts


def test_generate_stops_when_the_canvas_converges(triton_pipe, monkeypatch):
    """Near-greedy temperatures: every position is accepted and the sample is the argmax, so the argmax canvas follows
    the model's own map, which from this seed's first canvas settles at step 2; the canvas stops at step 3 (stable
    and confident), before its 6-step budget."""
    sampling = dict(max_denoising_steps=6, t_max=0.002, t_min=0.001, confidence_threshold=1.0)
    out, drafts = generate_and_replay(triton_pipe, monkeypatch, [5, 6, 7], 1, **sampling)
    assert out.stats.steps_per_canvas == [3] and drafts[-1].done.all() and not drafts[-1].changed.any()


def test_generate_reproduces_its_seed(triton_pipe, monkeypatch):
    """The checkpoint's temperatures (a few positions accepted per step): decisions match the reference, and the
    same seed gives the same tokens again, without the per-step callbacks (the no-sync loop)."""
    out, drafts = generate_and_replay(triton_pipe, monkeypatch, [5, 6, 7], 3, max_denoising_steps=2)
    assert 0 < drafts[0].accepted.sum() < drafts[0].accepted.numel()
    again = triton_pipe.generate([5, 6, 7], max_new_tokens=8, stop_ids=[], seed=3, max_denoising_steps=2)
    assert torch.equal(again.sequences, out.sequences)
    assert again.stats.accepted_per_step == out.stats.accepted_per_step


def test_reference_draws_take_the_pytorch_loop(triton_pipe):
    with pytest.raises(ValueError, match="reference=True"):
        triton_pipe.generate([5, 6, 7], max_new_tokens=8, reference=True, device_loop=True)


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
    cfg, state, argmax, sample, H = sampler_scenario(1, device)
    with pytest.raises(ValueError, match="passes"):
        sampler_step(state, argmax, sample, H, torch.zeros(3, dtype=torch.long), V=50, seed=0, bound=0.1, threshold=0.1)


REAL = Config.diffusiongemma_26b_a4b()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the real vocabulary and hidden size need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # IEEE fp32 dots; the model's dtype
def test_real_shapes(dtype):
    """One canvas of 256 positions against the 262,144 x 2,816 table, to the CPU tests' tolerances."""
    h, w, T = inputs(REAL.canvas_length, REAL.vocab_size, REAL.hidden_size, 1, dtype, torch.device("cuda"))
    assert_matches(run(h, w, T), h, w, T)
