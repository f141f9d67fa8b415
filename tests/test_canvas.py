"""Pinned and constrained canvas positions (runtime/canvas.py) in the PyTorch loop and the device loop's kernels."""

import math

import pytest
import torch

from dgemma import Pipeline
from dgemma.errors import DgemmaError
from dgemma.runtime.canvas import MASKED, CanvasControl

C, V = 8, 256  # the tiny checkpoint's canvas and vocabulary
PINNED = [-1, 17, -1, -1, 99, -1, -1, -1, -1, 5]  # positions 1 and 4 of canvas 0, position 1 of canvas 1
ALLOWED = {2: [10, 11, 12], 6: list(range(100, 110)), 12: [3, 4]}  # the last in canvas 1


def expected(k: int) -> dict[int, set[int]]:
    """Canvas k's restricted columns -> their allowed ids."""
    sets = {p: {t} for p, t in enumerate(PINNED) if t >= 0} | {p: set(ids) for p, ids in ALLOWED.items()}
    return {p - k * C: ids for p, ids in sets.items() if p // C == k}


def check_every_step(drafts) -> None:
    assert {d.canvas for d in drafts} == {0, 1}
    for d in drafts:
        for col, ids in expected(d.canvas).items():
            assert d.argmax[0, col].item() in ids and d.tokens[0, col].item() in ids, (d.canvas, d.step, col)


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return Pipeline.from_pretrained(tiny_checkpoint, dtype=torch.float32)


def generate(pipe, **kwargs):
    drafts = []
    kwargs = dict(max_new_tokens=2 * C, max_denoising_steps=6, stop_ids=[], confidence_threshold=0.0) | kwargs
    out = pipe.generate("hello", pinned=PINNED, allowed=ALLOWED, on_draft=drafts.append, **kwargs)
    return out, drafts


@pytest.mark.parametrize("reference", [False, True])
def test_pinned_and_allowed_hold_at_every_step(pipe, reference):
    """Every step's argmax and canvas (the accepted samples and the renoised rest) keep pinned tokens and allowed
    ids, in the seeded loop and the reference's transformers-order loop; the committed tokens too."""
    out, drafts = generate(pipe, reference=reference)
    check_every_step(drafts)
    tokens = out.tokens[0]
    assert tokens[1] == 17 and tokens[4] == 99 and tokens[9] == 5
    assert tokens[2] in (10, 11, 12) and 100 <= tokens[6] < 110 and tokens[12] in (3, 4)


def test_device_loop_kernels_pin_and_constrain(tiny_checkpoint):
    """The same through the fused vocabulary pass and the sampler kernel (Triton's interpreter on the CPU)."""
    pipe = Pipeline.from_pretrained(tiny_checkpoint, dtype=torch.float32, backend="triton")
    out, drafts = generate(pipe, device_loop=True, max_denoising_steps=4)
    check_every_step(drafts)
    assert out.tokens[0][1] == 17 and out.tokens[0][4] == 99 and out.tokens[0][9] == 5


def test_unrestricted_generation_is_unchanged(pipe):
    """No restriction, or an empty one, takes exactly the path generate takes without the arguments."""
    kwargs = dict(max_new_tokens=C, max_denoising_steps=4, seed=3)
    plain = pipe.generate("hello", **kwargs).tokens
    assert pipe.generate("hello", pinned=[-1] * C, allowed={}, **kwargs).tokens == plain
    torch.manual_seed(5)
    ref = pipe.generate("hello", reference=True, **kwargs).tokens
    torch.manual_seed(5)
    assert pipe.generate("hello", reference=True, pinned=[-1, -1], **kwargs).tokens == ref


def test_restriction_ops():
    control = CanvasControl.build([-1, 7], {0: [3, 5]}, rows=2, C=4, canvases=1, V=40, device="cpu")
    r = control.at(0)
    z = torch.randn(2, 4, 40)
    masked = r.mask_(z.clone())
    assert torch.equal(masked[:, 2:], z[:, 2:])  # free positions untouched
    assert masked[0, 1, 7] == z[0, 1, 7] and (masked[0, 1, torch.arange(40) != 7] == MASKED).all()
    assert set((masked[1, 0] > MASKED).nonzero().flatten().tolist()) == {3, 5}
    canvas = r.project_(torch.arange(8).view(2, 4) * 5)  # draws 0, 5, 10, 15 / 20, 25, 30, 35
    assert canvas[0, 1] == 7 and canvas[1, 1] == 7 and canvas[0, 0] == 3 and canvas[1, 0] == 3  # 0 and 20 are even
    index, bits = r.bitset(2, 4, 40)
    assert index.tolist() == [0, 1, -1, -1, 2, 3, -1, -1]
    for slot, ids in enumerate(([3, 5], [7], [3, 5], [7])):
        word = torch.tensor(bits[slot].tolist(), dtype=torch.int64) & 0xFFFFFFFF
        allowed = [v for v in range(40) if (word[v // 32] >> (v % 32)) & 1]
        assert allowed == ids


def test_uniform_over_the_allowed_set():
    """A restricted position's uniform draws map onto its set (3 ids) uniformly, up to V mod 3 of V."""
    r = CanvasControl.build(None, {0: [2, 9, 31]}, rows=1, C=1, canvases=1, V=2**15, device="cpu").at(0)
    counts = torch.bincount(torch.cat([r.project_(torch.randint(0, 2**15, (1, 1))) for _ in range(3000)]).flatten())
    assert counts.nonzero().flatten().tolist() == [2, 9, 31] and counts[[2, 9, 31]].min() > 850  # 1000 each


@pytest.mark.parametrize(
    "pinned, allowed, fragment",
    [
        ([5] * (2 * C + 1), None, "holds 17 positions"),  # a template past the canvases generated
        ([-1, V], None, "pinned[1]"),  # an id outside the vocabulary
        ([-2], None, "pinned[0]"),
        ([1.5], None, "pinned[0]"),
        (None, {3: []}, "allowed[3] must be a non-empty list"),
        (None, {3: [V]}, "outside the vocabulary"),
        (None, {2 * C: [1]}, "allowed position 16"),  # past the canvases
        (None, {"3": [1]}, "allowed position '3'"),
        ([-1, 7], {1: [8, 9]}, "pinned to 7, which its allowed set excludes"),
        ("abc", None, "pinned must be a list"),
        (None, [{1: [2]}] * 3, "allowed must be"),  # three rows' dicts for a one-row prompt
    ],
)
def test_bad_restrictions(pipe, pinned, allowed, fragment):
    with pytest.raises(DgemmaError, match=fragment.replace("[", r"\[")):
        pipe.generate("hello", pinned=pinned, allowed=allowed, max_new_tokens=2 * C, max_denoising_steps=2)


def test_every_position_pinned_stops_at_once(pipe):
    """A canvas entirely pinned is certain: entropy 0 everywhere, stable after its stability threshold."""
    template = list(range(20, 20 + C))
    out = pipe.generate("hello", pinned=template, max_new_tokens=C, stop_ids=[], max_denoising_steps=8)
    assert out.tokens[0] == template and out.stats.steps_per_canvas[0] <= 2
    assert math.isclose(out.stats.accepted_per_step[0], C)


@pytest.mark.parametrize("stash", [True, False])  # the stash holds masked logits; the recompute variant masks again
def test_vocab_pass_masks_restricted_rows(stash, device):
    """The fused pass over restricted rows gives the statistics of the masked logits (the PyTorch loop's), and
    leaves unrestricted rows as they were."""
    from dgemma.kernels.vocab import vocab_pass, vocab_ref

    R, Vs, D = 6, 200, 32
    h, w, T = torch.randn(R, D, device=device) * 3, torch.randn(Vs, D, device=device) / D**0.5, torch.ones(1)
    control = CanvasControl.build([-1, 7], {2: [3, 150, 199], 4: list(range(0, 200, 2))}, rows=1, C=R, canvases=1,
                                  V=Vs, device=device)  # fmt: skip
    restriction = control.at(0)
    tick, args = torch.zeros(1, dtype=torch.long, device=device), dict(seed=1, cap=30.0, scale=D**0.5, stash=stash)
    free = vocab_pass(h, w, T.to(device), tick, **args)
    ours = vocab_pass(h, w, T.to(device), tick, allow=restriction.bitset(1, R, Vs), **args)
    z = restriction.mask_(vocab_ref(h, w, T.to(device), 30.0, D**0.5)[0].view(1, R, Vs))[0]
    p = z.softmax(-1)
    assert torch.equal(ours.argmax, z.argmax(-1))
    torch.testing.assert_close(ours.entropy, -(p * z.log_softmax(-1)).sum(-1), rtol=1e-4, atol=1e-5)
    soft = (p @ w) * D**0.5
    torch.testing.assert_close(ours.soft, soft, rtol=1e-4, atol=1e-4)
    assert ours.sample[1] == 7 and ours.sample[2] in (3, 150, 199) and ours.sample[4] % 2 == 0
    for r in (0, 3, 5):  # unrestricted
        assert ours.argmax[r] == free.argmax[r] and ours.sample[r] == free.sample[r]


def test_cli_pins_and_restricts(tiny_checkpoint, capsys):
    from dgemma.cli import main

    base = ["generate", "--model", str(tiny_checkpoint), "--max-new-tokens", "8", "--steps", "3", "--raw", "hi"]
    assert main([*base, "--pin", "1=17", "--allow", "2=10,11"]) == 0
    for bad, fragment in (("--pin=1=300", "pinned[1]"), ("--pin=x", "must be POS=ID"), ("--allow=3=", "POS=ID")):
        try:
            status = main([*base, bad])
        except SystemExit as e:
            status = e.code
        err = capsys.readouterr().err
        assert status == 2 and err.startswith("error:") and fragment in err and len(err.splitlines()) == 1


def test_sudoku_givens_pinned_and_cells_digits(capsys):
    """The shipped 4x4 model with its clues pinned and its blanks restricted to digits keeps every clue."""
    from dgemma.cli import main
    from dgemma.sudoku import board

    puzzle = "0024000000020300"
    assert main(["sudoku", puzzle, "--pin-givens", "--digits", "--steps", "2", "--delay", "0"]) == 0
    answer = capsys.readouterr().out.split("answer ")[-1].split()[0]
    grid = [int(c) for c in answer]
    assert board.keeps_clues(grid, board.parse(puzzle)) and all(1 <= d <= 4 for d in grid)


def test_stop_test_averages_over_the_positions_not_pinned():
    """Three of four positions pinned (entropy 0), the fourth uncertain (about ln 2): the mean over the free position
    is above the threshold, so the canvas has not converged, though the mean over all four would be below it."""
    from types import SimpleNamespace

    from dgemma.runtime.pipeline import denoise_step
    from dgemma.runtime.sampler import FastScores, SamplingConfig, SeededDraws

    V = 16
    model = SimpleNamespace(
        decoder_output="logits", config=SimpleNamespace(vocab_size=V), embed_tokens=torch.nn.Embedding(V, 4)
    )
    fast = dict(scores=FastScores((1, 4, V), "cpu"))
    out = torch.full((1, 4, V), -30.0)
    out[0, :, :2] = 0.0  # two equally likely tokens everywhere: entropy ln 2 where free
    control = CanvasControl.build([0, 0, 0], None, rows=1, C=4, canvases=1, V=V, device="cpu")
    cfg = SamplingConfig(confidence_threshold=0.4)
    step = denoise_step(model, out, torch.tensor(1.0), cfg, SeededDraws(0, "cpu"), restriction=control.at(0), **fast)
    assert step.entropy[0, :3].abs().max() < 1e-6 and abs(step.entropy[0, 3] - math.log(2)) < 1e-4
    assert not step.confident.item()  # ln 2 / 1 free position > 0.4 > ln 2 / 4
    plain = denoise_step(model, out.clone(), torch.tensor(1.0), cfg, SeededDraws(0, "cpu"), **fast)
    assert not plain.confident.item()  # no pins: every position uncertain
