"""runtime/sampler.py on hand-made logits and entropies, against transformers 5.23.0 wherever it has the same piece.

Legend: B batch, C canvas positions, V vocabulary, N max_denoising_steps, s stability_threshold.
"""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from transformers.generation.stopping_criteria import EosTokenCriteria
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    DiffusionGemmaGenerationConfig,
    DiffusionGemmaGenerationMixin,
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)

from dgemma.runtime.sampler import (
    FastScores,
    SamplingConfig,
    SeededDraws,
    TorchDraws,
    entropy,
    entropy_bound_accept,
    finalize_canvas,
    stable,
    temperature,
)

from oracle import GENERATION as OFFICIAL_GENERATION_CONFIG  # the checkpoint's generation_config.json

F, T = False, True


def spread_logits(B, C, V):
    """Random logits whose per-position scale spans 0.1..300, so entropies run from ~0 to ~ln V."""
    scale = 10 ** (torch.rand(B, C, 1) * 3.5 - 1)
    return torch.randn(B, C, V) * scale


# ---------------------------------------------------------------------------------------------------------------
# temperature


def test_temperature_checkpoint_defaults():
    cfg = SamplingConfig()
    assert temperature(48, cfg).dtype == torch.float32  # fp32, as transformers computes it
    assert float(temperature(48, cfg)) == pytest.approx(0.8, rel=1e-7)  # first step
    assert float(temperature(25, cfg)) == pytest.approx(0.6083333333333333, rel=1e-7)  # the doc's "step 24, T ~ 0.608"
    assert float(temperature(1, cfg)) == pytest.approx(0.4083333333333333, rel=1e-7)  # last step: 0.4 + 0.4/48
    assert float(temperature(1, cfg)) > cfg.t_min


@pytest.mark.parametrize(
    "t_min, t_max, N",
    [
        (0.4, 0.8, 48),  # the checkpoint's schedule
        (0.3, 1.1, 7),  # prime N, t range not a power-of-two multiple of t_min
        (0.0, 1.0, 1),  # a single step (first = last) with t_min = 0 allowed
    ],
)
def test_temperature_schedule_endpoints_and_linear(t_min, t_max, N):
    cfg = SamplingConfig(t_min=t_min, t_max=t_max, max_denoising_steps=N)
    ts = [float(temperature(remaining, cfg)) for remaining in range(N, 0, -1)]  # step order: N remaining first
    assert ts[0] == pytest.approx(t_max, rel=1e-7)
    assert ts[-1] == pytest.approx(t_min + (t_max - t_min) / N, rel=1e-7)
    assert ts[-1] > t_min  # the schedule never reaches t_min
    assert all(a > b for a, b in zip(ts[:-1], ts[1:], strict=True))
    steps = [a - b for a, b in zip(ts[:-1], ts[1:], strict=True)]
    assert steps == pytest.approx([(t_max - t_min) / N] * (N - 1), abs=1e-6)  # linear (fp32)


def test_temperature_matches_transformers_as_generate_calls_it():
    cfg = SamplingConfig()
    processor = LinearTemperatureScheduleLogitsProcessor(cfg.t_min, cfg.t_max, cfg.max_denoising_steps)
    logits = torch.randn(2, 3, 257) * 30
    for remaining in range(cfg.max_denoising_steps, 0, -1):
        cur_step = torch.tensor(remaining, dtype=torch.int32)  # exactly as DiffusionGemmaGenerationMixin builds it
        assert torch.equal(logits / temperature(remaining, cfg), processor(None, logits, cur_step=cur_step))


# ---------------------------------------------------------------------------------------------------------------
# entropy


@pytest.mark.parametrize(
    "V",
    [
        262144,  # the checkpoint's vocabulary: a long fp32 reduction
        37,  # prime
        2,  # smallest non-trivial vocabulary
    ],
)
def test_entropy_of_uniform_logits_is_log_v(V):
    H = entropy(torch.full((3, V), 4.25))
    torch.testing.assert_close(H, torch.full((3,), math.log(V)))


def test_entropy_of_one_huge_logit_is_zero():
    logits = torch.zeros(2, 1000)
    logits[0, 17] = 100.0
    logits[1, 999] = 60.0  # the rest still has probability e^-60 > 0 in fp32
    H = entropy(logits)
    assert torch.isfinite(H).all()
    assert (H.abs() < 1e-6).all()


def test_entropy_with_masked_logits_is_finite():
    logits = torch.tensor([[0.0, 0.0, -math.inf, -math.inf], [-math.inf, 3.0, -math.inf, -math.inf]])
    torch.testing.assert_close(entropy(logits), torch.tensor([math.log(2), 0.0]))
    assert torch.equal(entropy(logits), torch.distributions.Categorical(logits=logits).entropy())


@pytest.mark.parametrize(
    "shape, scale, dtype",
    [
        ((2, 5, 37), 1.0, torch.float32),  # small prime V, unit-scale logits
        ((2, 5, 37), 30.0, torch.float32),  # soft-cap range: near-one-hot rows
        ((1, 256, 1000), 10.0, torch.float32),  # a full canvas
        ((2, 5, 37), 30.0, torch.float64),  # the float64 oracle path
    ],
)
def test_entropy_equals_categorical_exactly(shape, scale, dtype):
    logits = (torch.randn(shape) * scale).to(dtype)
    assert torch.equal(entropy(logits), torch.distributions.Categorical(logits=logits).entropy())


def test_entropy_is_shift_invariant_and_bounded():
    logits = torch.randn(2, 5, 37) * 5
    shift = (torch.rand(2, 5, 1) - 0.5) * 100  # a different constant per position
    H = entropy(logits)
    torch.testing.assert_close(entropy(logits + shift), H, atol=1e-5, rtol=1e-5)
    assert (H >= 0).all() and (H <= math.log(37) + 1e-6).all()


# ---------------------------------------------------------------------------------------------------------------
# entropy_bound_accept


@pytest.mark.parametrize(
    "H, bound, expected",
    [
        # sorted: 0, .125, .25, .5, 1, 2; the sum before 0.5 is 0 + .125 + .25 = .375 = bound exactly: accepted (<=)
        ([1.0, 0.25, 2.0, 0.0, 0.5, 0.125], 0.375, [F, T, F, T, T, T]),
        # one representable step above the bound (dyadic values: every partial sum is exact): 0.5 is rejected
        ([1.0, 0.25 + 2**-20, 2.0, 0.0, 0.5, 0.125], 0.375, [F, T, F, T, F, T]),
        # the same H as the first row, bound just below the partial sum: 0.5 is rejected
        ([1.0, 0.25, 2.0, 0.0, 0.5, 0.125], 0.375 - 2**-20, [F, T, F, T, F, T]),
        # every entropy exceeds the bound: the lowest is still accepted
        ([3.0, 2.0, 5.0, 4.0], 0.1, [F, T, F, F]),
        # all-zero entropies: everything accepted
        ([0.0] * 7, 0.1, [T] * 7),
        # a single position
        ([9.0], 0.1, [T]),
    ],
)
def test_entropy_bound_accept_boundary(H, bound, expected):
    accepted = entropy_bound_accept(torch.tensor([H]), bound)
    assert accepted.dtype == torch.bool
    assert accepted.tolist() == [expected]


def test_entropy_bound_accept_ties_accept_the_right_count():
    # Eight equal entropies of 1/16 with bound 1/8: partial sums 0, 1/16, 1/8 (accepted), 3/16 (rejected).
    accepted = entropy_bound_accept(torch.full((2, 8), 0.0625), 0.125)
    assert accepted.sum(-1).tolist() == [3, 3]


def test_entropy_bound_accept_keeps_original_position_order():
    H = torch.rand(3, 64) ** 4 * 0.2  # many small, distinct entropies
    accepted = entropy_bound_accept(H, 0.1)
    assert 1 < accepted.sum() < H.numel()  # the check below is not vacuous
    for _ in range(5):
        perm = torch.randperm(64)
        assert torch.equal(entropy_bound_accept(H[:, perm], 0.1), accepted[:, perm])


def test_entropy_bound_accept_batch_rows_are_independent():
    H = torch.stack([torch.rand(16) * 0.05, torch.rand(16) * 5, torch.zeros(16)])
    accepted = entropy_bound_accept(H, 0.1)
    for b in range(3):
        assert torch.equal(accepted[b : b + 1], entropy_bound_accept(H[b : b + 1], 0.1))
    changed = H.clone()
    changed[1] = 0.0
    assert torch.equal(entropy_bound_accept(changed, 0.1)[[0, 2]], accepted[[0, 2]])


@pytest.mark.parametrize(
    "B, C, bound",
    [
        (4, 256, 0.1),  # full canvases at the checkpoint's bound
        (3, 37, 1.5),  # prime C, a loose bound accepting many
    ],
)
def test_entropy_bound_accept_invariants(B, C, bound):
    H = entropy(spread_logits(B, C, 50))
    accepted = entropy_bound_accept(H, bound)
    assert accepted.any(-1).all()  # at least one position per row
    assert not accepted.all(-1).any()  # every row has a rejected position, so the checks below bite
    for h, a in zip(H, accepted, strict=True):
        assert h[a].max() <= h[~a].min()  # the k lowest entropies, nothing skipped
        assert h[a].sum() - h[a].max() <= bound + 1e-5
        assert h[a].sum() > bound - 1e-5  # taking the next lowest would break the bound
    assert (entropy_bound_accept(H, bound * 2) >= accepted).all()  # a looser bound accepts a superset


@pytest.mark.parametrize(
    "B, C, V, bound",
    [
        (2, 256, 64, 0.1),  # full canvases at the checkpoint's bound
        (3, 37, 11, 1.0),  # odd sizes, a loose bound
        (1, 5, 2, 1e-3),  # binary vocabulary, a tight bound
    ],
)
def test_entropy_bound_accept_matches_transformers(B, C, V, bound):
    logits = spread_logits(B, C, V)
    sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=bound), C, V, max_denoising_steps=48)
    current, denoised = torch.randint(0, V, (B, C)), torch.randint(0, V, (B, C))
    reference_canvas = sampler.accept_canvas(current, denoised, logits, cur_step=48)
    accepted = entropy_bound_accept(entropy(logits), bound)
    assert torch.equal(accepted, sampler.accepted_token_mask)
    assert torch.equal(torch.where(accepted, denoised, current), reference_canvas)


# ---------------------------------------------------------------------------------------------------------------
# stable


def new_history(s, B, C):
    return torch.full((s, B, C), -1, dtype=torch.long)  # as the pipeline resets it at each canvas start


@pytest.mark.parametrize(
    "s, sequence, expected",
    [
        # s=1 (the checkpoint's): the 2nd identical canvas is stable; a change resets
        (1, "AAABB", [F, T, T, F, T]),
        # s=2: three identical canvases in a row
        (2, "AAABBBB", [F, F, T, F, F, T, T]),
        # s=2: an A-B-A alternation never stabilises
        (2, "ABABAB", [F] * 6),
        # s=3: four identical canvases
        (3, "AAAAA", [F, F, F, T, T]),
    ],
)
def test_stable_sequence(s, sequence, expected):
    canvases = {"A": torch.tensor([[3, 1, 4, 1, 5]]), "B": torch.tensor([[3, 1, 4, 1, 6]])}
    history = new_history(s, 1, 5)
    assert [bool(stable(history, canvases[c])[0]) for c in sequence] == expected


def test_stable_first_call_never_stable():
    history = new_history(1, 3, 4)
    assert not stable(history, torch.zeros(3, 4, dtype=torch.long)).any()


def test_stable_threshold_zero_is_always_stable():
    history = new_history(0, 2, 5)
    for _ in range(3):
        result = stable(history, torch.randint(0, 9, (2, 5)))
        assert result.dtype == torch.bool and result.tolist() == [T, T]
    assert history.shape == (0, 2, 5)


def test_stable_rolls_history_in_place():
    history = new_history(2, 2, 3)
    ptr = history.data_ptr()
    a, b, c = (torch.arange(6).view(2, 3) + 10 * k for k in range(3))
    stable(history, a)
    assert torch.equal(history, torch.stack([torch.full((2, 3), -1), a]))
    stable(history, b)
    assert torch.equal(history, torch.stack([a, b]))
    stable(history, c)
    assert torch.equal(history, torch.stack([b, c]))
    assert history.data_ptr() == ptr


def test_stable_batch_rows_are_independent():
    history = new_history(1, 2, 3)
    steady = torch.tensor([7, 8, 9])
    results = [stable(history, torch.stack([steady, torch.full((3,), k)])).tolist() for k in range(3)]
    assert results == [[F, F], [T, F], [T, F]]


@pytest.mark.parametrize(
    "s, B, C",
    [
        (1, 3, 256),  # the checkpoint's threshold on full canvases
        (2, 2, 7),  # prime C
        (3, 1, 1),  # a single position
        (0, 2, 5),  # s=0: always stable
    ],
)
def test_stable_matches_transformers(s, B, C):
    reference = StableAndConfidentStoppingCriteria(stability_threshold=s, confidence_threshold=1e9)  # only stability
    history = new_history(s, B, C)
    argmax = torch.randint(0, 2, (B, C))
    seen_stable = False
    for _ in range(30):
        change = torch.rand(B) < 0.4  # each row keeps its canvas with probability 0.6
        argmax = torch.where(change[:, None], torch.randint(0, 2, (B, C)), argmax)
        expected = reference(argmax, torch.zeros(B, C, 2))
        assert torch.equal(stable(history, argmax), expected)
        seen_stable |= bool(expected.any())
    assert seen_stable


# ---------------------------------------------------------------------------------------------------------------
# finalize_canvas


@pytest.mark.parametrize(
    "row, finished, expected, expected_finished",
    [
        ([5, 6, 1, 7, 8], F, [5, 6, 1, 0, 0], T),  # stop id mid-canvas: kept, tail padded
        ([5, 106, 7, 1, 8], F, [5, 106, 0, 0, 0], T),  # two different stop ids: only the first kept
        ([5, 1, 7, 1, 8], F, [5, 1, 0, 0, 0], T),  # the same stop id twice
        ([50, 5, 6, 7, 8], F, [50, 0, 0, 0, 0], T),  # stop id at position 0
        ([5, 6, 7, 8, 106], F, [5, 6, 7, 8, 106], T),  # stop id at the last position: nothing to pad
        ([106, 1, 50, 106, 1], F, [106, 0, 0, 0, 0], T),  # a canvas of stop ids
        ([5, 6, 7, 8, 9], F, [5, 6, 7, 8, 9], F),  # no stop id: untouched, not finished
        ([5, 6, 7, 8, 9], T, [0, 0, 0, 0, 0], T),  # finished in an earlier canvas: all pad
        ([5, 1, 7, 8, 9], T, [0, 0, 0, 0, 0], T),  # finished earlier, even with a stop id in this canvas
    ],
)
def test_finalize_canvas_rows(row, finished, expected, expected_finished):
    canvas, done = finalize_canvas(torch.tensor([row]), torch.tensor([finished]), SamplingConfig())
    assert canvas.tolist() == [expected]
    assert done.tolist() == [expected_finished]


def test_finalize_canvas_uses_config_ids_and_does_not_mutate():
    cfg = SamplingConfig(stop_ids=(3,), pad_id=7)
    canvas = torch.tensor([[5, 3, 9, 1], [5, 6, 9, 1], [2, 2, 2, 2]])
    finished = torch.tensor([F, F, T])
    canvas_before, finished_before = canvas.clone(), finished.clone()
    committed, done = finalize_canvas(canvas, finished, cfg)
    assert committed.tolist() == [[5, 3, 7, 7], [5, 6, 9, 1], [7, 7, 7, 7]]  # 1 is no stop id here
    assert done.tolist() == [T, F, T]
    assert torch.equal(canvas, canvas_before) and torch.equal(finished, finished_before)


@pytest.mark.parametrize(
    "B, C",
    [
        (8, 256),  # full canvases
        (5, 13),  # prime C
    ],
)
def test_finalize_canvas_matches_transformers(B, C):
    cfg = SamplingConfig()
    canvas = torch.randint(2, 100, (B, C))
    canvas[canvas == 50] = 51  # only the stop ids planted below
    for b in range(B):
        n_stops = b % 4  # rows with 0..3 stop ids
        canvas[b, torch.randperm(C)[:n_stops]] = torch.tensor([1, 106, 50])[torch.randint(0, 3, (n_stops,))]
    finished = torch.arange(B) % 3 == 0
    prompt = torch.randint(2, 100, (B, 4))
    reference_ids, reference_finished = DiffusionGemmaGenerationMixin._finalize_canvas(
        torch.cat([prompt, canvas], 1),
        finished.clone(),
        SimpleNamespace(pad_token_id=cfg.pad_id, eos_token_id=list(cfg.stop_ids)),
        EosTokenCriteria(list(cfg.stop_ids)),
        C,
        torch.tensor(cfg.stop_ids),
    )
    committed, done = finalize_canvas(canvas, finished, cfg)
    assert torch.equal(committed, reference_ids[:, -C:])
    assert torch.equal(done, reference_finished)


# ---------------------------------------------------------------------------------------------------------------
# SamplingConfig


def test_sampling_config_defaults_are_the_checkpoints():
    cfg = SamplingConfig()
    assert (cfg.max_new_tokens, cfg.max_denoising_steps) == (256, 48)
    assert (cfg.t_min, cfg.t_max, cfg.entropy_bound) == (0.4, 0.8, 0.1)
    assert (cfg.stability_threshold, cfg.confidence_threshold) == (1, 0.005)
    assert (cfg.stop_ids, cfg.pad_id) == ((1, 106, 50), 0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"t_min": 0.8, "t_max": 0.8},  # t_min == t_max: the schedule must decrease
        {"t_min": 0.9, "t_max": 0.8},  # t_min > t_max
        {"t_min": -0.1},  # negative temperature
        {"entropy_bound": 0.0},  # transformers requires a bound > 0
        {"entropy_bound": -0.1},  # negative bound
        {"max_denoising_steps": 0},  # no step to take
        {"max_new_tokens": 0},  # nothing to generate
        {"stability_threshold": -1},  # negative history length
        {"confidence_threshold": -0.005},  # negative entropy threshold
    ],
)
def test_sampling_config_rejects(kwargs):
    with pytest.raises(ValueError):
        SamplingConfig(**kwargs)


def test_sampling_config_accepts_edges():
    cfg = SamplingConfig(t_min=0.0, stability_threshold=0, confidence_threshold=0.0, stop_ids=[7, 8])
    assert cfg.stop_ids == (7, 8)  # lists become tuples


def test_from_generation_config_official_file_gives_defaults():
    cfg = SamplingConfig.from_generation_config(json.loads(json.dumps(OFFICIAL_GENERATION_CONFIG)))
    assert cfg == SamplingConfig()
    assert isinstance(cfg.stop_ids, tuple)


def test_from_generation_config_reads_every_field():
    generation = {
        "max_denoising_steps": 16,
        "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.3},
        "t_max": 1.0,
        "t_min": 0.2,
        "stability_threshold": 2,
        "confidence_threshold": 0.01,
        "eos_token_id": [1, 9],
        "pad_token_id": 3,
        "max_new_tokens": 512,
    }
    cfg = SamplingConfig.from_generation_config(generation)
    assert cfg == SamplingConfig(
        max_new_tokens=512,
        max_denoising_steps=16,
        t_min=0.2,
        t_max=1.0,
        entropy_bound=0.3,
        stability_threshold=2,
        confidence_threshold=0.01,
        stop_ids=(1, 9),
        pad_id=3,
    )


def test_from_generation_config_null_fields_fall_back_to_defaults(tmp_path):
    nulls = {k: None for k in OFFICIAL_GENERATION_CONFIG}
    assert SamplingConfig.from_generation_config(nulls) == SamplingConfig()
    nested_null = {"sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": None}}
    assert SamplingConfig.from_generation_config(nested_null) == SamplingConfig()
    DiffusionGemmaGenerationConfig().save_pretrained(tmp_path)  # every diffusion field saved as null
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["t_max"] is None and saved["sampler_config"] is None
    assert SamplingConfig.from_generation_config(saved) == SamplingConfig()


def test_from_generation_config_scalar_eos():
    assert SamplingConfig.from_generation_config({"eos_token_id": 106}).stop_ids == (106,)


def test_from_generation_config_precedence():
    generation = OFFICIAL_GENERATION_CONFIG | {"t_max": 1.0, "max_denoising_steps": 16}
    cfg = SamplingConfig.from_generation_config(
        generation,
        t_max=1.2,  # override beats the file
        max_denoising_steps=None,  # a None override is ignored: the file's 16 stays
        t_min=None,  # ... and the file's 0.4
        entropy_bound=0.5,  # beats sampler_config.entropy_bound
        stop_ids=(2,),  # beats eos_token_id
        pad_id=9,  # beats pad_token_id
    )
    assert (cfg.t_max, cfg.max_denoising_steps, cfg.t_min) == (1.2, 16, 0.4)
    assert (cfg.entropy_bound, cfg.stop_ids, cfg.pad_id) == (0.5, (2,), 9)
    assert cfg.confidence_threshold == 0.005  # from the file
    assert SamplingConfig.from_generation_config({}, stability_threshold=3).stability_threshold == 3  # over default
    with pytest.raises(ValueError):  # the merged values are validated
        SamplingConfig.from_generation_config(generation, t_min=1.0)


# ---------------------------------------------------------------------------------------------------------------
# TorchDraws / SeededDraws


@pytest.mark.parametrize(
    "B, C, V",
    [
        (2, 256, 262144),  # full canvases over the checkpoint's vocabulary
        (3, 7, 5),  # odd, tiny
    ],
)
def test_torch_draws_canvas_is_transformers_randint(B, C, V):
    torch.manual_seed(11)
    ours, after_ours = TorchDraws().canvas(B, C, V, "cpu"), torch.rand(1)
    torch.manual_seed(11)
    reference, after_reference = torch.randint(0, V, (B, C)), torch.rand(1)
    torch.manual_seed(11)
    sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=0.1), C, V, max_denoising_steps=48)
    assert torch.equal(ours, reference) and torch.equal(ours, sampler.initialize_canvas(B, "cpu"))
    assert torch.equal(after_ours, after_reference)  # the same amount of the global stream consumed


@pytest.mark.parametrize(
    "B, C, V",
    [
        (2, 256, 1000),  # full canvases
        (3, 7, 5),  # odd, tiny
    ],
)
def test_torch_draws_sample_is_transformers_multinomial(B, C, V):
    probs = (torch.randn(B, C, V) * 3).softmax(-1)
    torch.manual_seed(5)
    ours, after_ours = TorchDraws().sample(probs), torch.rand(1)
    torch.manual_seed(5)
    reference = torch.multinomial(probs.view(-1, V), num_samples=1).squeeze(-1).view(B, C)
    assert ours.shape == (B, C) and torch.equal(ours, reference)
    assert torch.equal(after_ours, torch.rand(1))


def test_seeded_draws_reproduce_and_differ_by_seed():
    probs = (torch.randn(2, 64, 50) * 2).softmax(-1)

    def run(seed):
        draws = SeededDraws(seed, "cpu")
        return [draws.canvas(2, 64, 50, "cpu"), draws.sample(probs), draws.canvas(2, 64, 50, "cpu")]

    a, b, c = run(123), run(123), run(124)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not any(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    assert not torch.equal(a[0], a[2])  # the generator advances between calls


def test_seeded_draws_leave_the_global_rng_alone():
    state = torch.get_rng_state()
    draws = SeededDraws(0, torch.device("cpu"))
    draws.canvas(2, 8, 10, "cpu")
    draws.sample(torch.full((2, 8, 10), 0.1))
    assert torch.equal(torch.get_rng_state(), state)


def test_seeded_draws_canvas_is_uniform_over_the_vocabulary():
    canvas = SeededDraws(3, "cpu").canvas(4, 5000, 5, "cpu")
    assert canvas.dtype == torch.long and canvas.shape == (4, 5000)
    counts = torch.bincount(canvas.flatten(), minlength=5)
    assert counts.numel() == 5 and (counts > 3600).all()  # 4000 expected each, sd ~ 57


def test_seeded_draws_never_pick_zero_probability():
    logits = torch.randn(4, 256, 64)
    logits[torch.rand(4, 256, 64) < 0.9] = -math.inf  # sparse supports
    logits[..., 0] = 0.0  # keep at least one token per position
    logits[0, :, 1:] = -math.inf  # one-hot row
    probs = logits.softmax(-1)
    draws = SeededDraws(1, "cpu")
    for _ in range(20):
        assert (probs.gather(-1, draws.sample(probs)[..., None]) > 0).all()


def chi_square(counts, probs):
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_seeded_draws_match_the_distribution():
    # Two distributions over V=5 (each with a zero), 10k positions each; chi-square over the 4 non-zero cells, df=3:
    # P(chi2 > 35) ~ 1.2e-7 for a correct sampler, while argmax sampling scores 10k * (1/p_max - 1) >= 15k.
    p = torch.tensor([[0.5, 0.25, 0.15, 0.1, 0.0], [0.0, 0.1, 0.2, 0.3, 0.4]])
    probs = p[torch.arange(4) % 2, None, :].expand(4, 5000, 5)  # rows alternate the two distributions
    sample = SeededDraws(2024, "cpu").sample(probs)
    for k in range(2):
        counts = torch.bincount(sample[k::2].flatten(), minlength=5).double()
        support = p[k] > 0
        assert counts[~support].sum() == 0
        assert chi_square(counts[support], p[k][support].double()) < 35
        argmax_counts = torch.zeros(5, dtype=torch.double)
        argmax_counts[p[k].argmax()] = counts.sum()
        assert chi_square(argmax_counts[support], p[k][support].double()) > 35  # the test has power


@pytest.mark.parametrize(
    "B, C, V, scale",
    [
        (2, 64, 1000, 3.0),  # spread distributions
        (1, 7, 33, 40.0),  # near one-hot rows: entropies near zero, where a lost digit would show
    ],
)
def test_fast_scores_are_the_reference_quantities(B, C, V, scale):
    """The default mode's fused step gives the reference's argmax and probabilities, and an entropy as close to the
    float64 truth as the reference's own fp32 `entropy`, within 4x plus 1e-6 (its fp32 dot product accumulates in
    another order: measured 0.3x to 3.4x the reference's error, 1e-6 to 1e-4 nats at V = 262,144)."""
    z = torch.randn(B, C, V, dtype=torch.float32) * scale
    z[0, 0, :2] = z[0, 0].max() + 1  # a tie for the maximum: the first one wins, as argmax does
    sample, argmax, H, probs = FastScores((B, C, V), "cpu")(z.clone(), SeededDraws(0, "cpu"))
    assert torch.equal(argmax, z.argmax(-1))
    truth = entropy(z.double())
    assert (H.double() - truth).abs().max() <= 4 * (entropy(z).double() - truth).abs().max() + 1e-6
    torch.testing.assert_close(probs, z.softmax(-1), rtol=1e-5, atol=1e-7)
    assert sample.shape == (B, C) and (probs.gather(-1, sample[..., None]) > 0).all()
