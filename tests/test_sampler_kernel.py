"""The sampler op (dgemma.kernels.sampler: SamplerState and sampler_step) against the runtime's reference sampler
math (runtime/sampler.py), and the Triton backend's no-sync canvas loop (runtime/pipeline.py's DeviceLoop: the vocab
and sampler ops per step) end to end. tests/test_sampler.py tests the reference sampler itself.

On the CPU the kernels run under TRITON_INTERPRET=1.

Legend: B batch rows, C canvas positions, V vocabulary, D hidden, N max denoising steps, s stability threshold.
"""

import pytest
import torch

from dgemma import Pipeline
from dgemma.kernels import vocab
from dgemma.kernels.sampler import SamplerState, sampler_step
from dgemma.runtime.sampler import SamplingConfig, entropy, entropy_bound_accept, stable, temperature

from accuracy import assert_argmax


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
        # atol: 1e-6 x the largest value is the most these two canvases need at rtol 1e-5
        torch.testing.assert_close(soft, ref_soft, rtol=1e-5, atol=3e-6 * ref_soft.abs().max().item())
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
    cfg, state, argmax, sample, H = sampler_scenario(1, device)
    with pytest.raises(ValueError, match="passes"):
        sampler_step(state, argmax, sample, H, torch.zeros(3, dtype=torch.long), V=50, seed=0, bound=0.1, threshold=0.1)
