"""runtime/rows.py: rows of concurrent requests share decoder passes, and each row's tokens are exactly those of
`Pipeline.generate` of its prompt alone (same seed and config), whoever shares its passes and whenever it arrives."""

import pytest
import torch

from dgemma.errors import DgemmaError
from dgemma.runtime.pipeline import Pipeline
from dgemma.runtime.rows import RowEngine, RowsPass, generate_rows
from dgemma.sudoku import board
from dgemma.sudoku.solve import shipped


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Batch invariance is exact with one torch thread (README "Serving"); the references run with it too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return Pipeline.from_pretrained(tiny_checkpoint, dtype=torch.float32)


@pytest.fixture(scope="module")
def sudoku():
    return Pipeline.from_pretrained(shipped(4), dtype=torch.float32)


# Different prompt lengths, seeds and sampling parameters, canvas controls and a warm start, in one batch.
TINY = [
    ([5, 6, 7], dict(max_new_tokens=20, max_denoising_steps=5), dict(pinned=[-1, 7, -1, -1, 9], allowed={3: [4, 5]})),
    ([9] * 13, dict(max_new_tokens=8, stop_ids=[], max_denoising_steps=6), dict(warm_start=list(range(100, 108)))),
    (list(range(3, 40)), dict(max_new_tokens=30, max_denoising_steps=4, t_min=0.1), {}),
    ([40, 41, 42, 43, 44], dict(max_new_tokens=16, entropy_bound=1.0, max_denoising_steps=6), {}),
    ([7], dict(max_new_tokens=24, stability_threshold=0, max_denoising_steps=3), {}),
    # pinned positions and a stop test they move (its mean entropy is over the positions not pinned)
    ([100] * 20, dict(max_new_tokens=9, confidence_threshold=1.0, max_denoising_steps=6), dict(pinned=[-1, 3, 4])),
]


def requests(pipe, cases):
    out = []
    for i, (prompt, sampling, extra) in enumerate(cases):
        out.append(dict(prompt=prompt, cfg=pipe.sampling_config(**sampling), seed=100 + i, **extra))
    return out


def alone(pipe, cases):
    return [pipe.generate([p], seed=100 + i, **s, **extra) for i, (p, s, extra) in enumerate(cases)]


@pytest.fixture(scope="module")
def refs(tiny):
    """Each TINY request run alone by Pipeline.generate."""
    return alone(tiny, TINY)


def run(engine, rows):
    for row in rows:
        engine.add(row)
    while not engine.idle:
        engine.step()


@pytest.mark.parametrize("max_batch, arrivals", [(8, None), (3, [0, 2, 1, 6, 2, 0])])
def test_rows_equal_generate_alone(tiny, refs, max_batch, arrivals):
    rows = generate_rows(tiny.model, requests(tiny, TINY), max_batch=max_batch, arrivals=arrivals)
    for row, ref in zip(rows, refs, strict=True):
        assert torch.equal(row.sequences, ref.sequences)
        assert row.stats.steps_per_canvas == ref.stats.steps_per_canvas
        assert row.stats.accepted_per_step == ref.stats.accepted_per_step
        assert row.stats.decoder_passes == ref.stats.decoder_passes
        assert row.stats.encoder_passes == ref.stats.encoder_passes


def test_sudoku_rows_equal_generate_alone_and_share_passes(sudoku):
    puzzles = ["0024000000020300", "1000000200030004", "0000000000000000", "1200340000000000"] * 2
    sampling = [{}, dict(t_min=0.5, t_max=1.0), dict(max_denoising_steps=5), dict(entropy_bound=0.5)] * 2
    cases = [(board.prompt_ids(board.parse(p)), s, {}) for p, s in zip(puzzles, sampling, strict=True)]
    refs = alone(sudoku, cases)
    engine = RowEngine(sudoku.model, max_batch=8)
    rows = [engine.row(**r) for r in requests(sudoku, cases)]
    run(engine, rows)
    assert [r.sequences.tolist() for r in rows] == [r.sequences.tolist() for r in refs]
    assert engine.decoder_rows == sum(r.stats.decoder_passes[0] for r in refs)
    assert engine.decoder_passes == max(r.stats.decoder_passes[0] for r in refs)  # every step one shared pass


def test_callbacks_see_what_generate_reports(tiny):
    prompt, sampling, extra = TINY[0]
    drafts, commits = [], []
    ref = tiny.generate([prompt], seed=100, on_draft=drafts.append, on_commit=lambda k, c: commits.append((k, c)),
                        **sampling, **extra)  # fmt: skip
    seen, committed, ended = [], [], []
    engine = RowEngine(tiny.model)
    row = engine.row(prompt, tiny.sampling_config(**sampling), seed=100, on_draft=seen.append,
                     on_commit=lambda k, c: committed.append((k, c)), on_end=ended.append, **extra)  # fmt: skip
    run(engine, [row])
    assert [(d.canvas, d.step, d.argmax.tolist(), d.tokens.tolist(), d.done.tolist()) for d in seen] == [
        (d.canvas, d.step, d.argmax.tolist(), d.tokens.tolist(), d.done.tolist()) for d in drafts
    ]
    assert [(k, c.tolist()) for k, c in committed] == [(k, c.tolist()) for k, c in commits]
    assert ended == [row] and torch.equal(row.sequences, ref.sequences) and row.cache is None


def test_rows_without_shared_passes_are_the_same(tiny, refs):
    """Models that cannot share a pass (exported graphs) run one decoder pass per row: same tokens."""
    engine = RowEngine(tiny.model)
    engine.shared = False
    rows = [engine.row(**r) for r in requests(tiny, TINY[:3])]
    run(engine, rows)
    assert [r.sequences.tolist() for r in rows] == [r.sequences.tolist() for r in refs[:3]]
    assert engine.decoder_passes == engine.decoder_rows


def test_a_failing_row_leaves_the_others(tiny, refs):
    engine = RowEngine(tiny.model)
    ended = []

    def broken(k, canvas):
        raise RuntimeError("listener failed")

    rows = [engine.row(**r, on_end=ended.append) for r in requests(tiny, TINY[:3])]
    rows[1].on_commit = broken
    run(engine, rows)
    assert isinstance(rows[1].error, RuntimeError) and rows[1].sequences is None and rows[1].cache is None
    assert torch.equal(rows[0].sequences, refs[0].sequences) and torch.equal(rows[2].sequences, refs[2].sequences)
    assert sorted(map(id, ended)) == sorted(map(id, rows))


def test_a_failing_shared_pass_is_retried_row_by_row(tiny, refs, monkeypatch):
    engine = RowEngine(tiny.model)
    monkeypatch.setattr(engine, "_decode_rows", lambda rows: 1 / 0)
    rows = [engine.row(**r) for r in requests(tiny, TINY[:2])]
    run(engine, rows)
    assert [r.sequences.tolist() for r in rows] == [r.sequences.tolist() for r in refs[:2]]


def test_cancelled_rows_leave_before_the_next_step(tiny):
    engine = RowEngine(tiny.model)
    rows = [engine.row(**r) for r in requests(tiny, TINY[:2])]
    for row in rows:
        engine.add(row)
    engine.step()
    assert len(engine.running) == 2
    rows[0].cancel()
    engine.step()
    assert engine.running == [rows[1]] and int(rows[0].passes) == 1 and int(rows[1].passes) == 2


def test_abort_fails_every_row(tiny):
    engine = RowEngine(tiny.model)
    rows = [engine.row(**r) for r in requests(tiny, TINY[:3])]
    engine.add(rows[0])
    engine.step()
    engine.add(rows[1])
    engine.abort(DgemmaError("stopping"))
    assert engine.idle and all(isinstance(r.error, DgemmaError) for r in rows[:2]) and rows[2].error is None


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(prompt=[]), "empty"),
        (dict(prompt=[5, 300]), "outside"),
        (dict(prompt=[[5], [6]]), "one prompt"),
        (dict(prompt=[[5], [6, 7]]), "token ids"),
        (dict(prompt=[5.5]), "integer tensor"),
        (dict(seed=-1), "seed"),
        (dict(prompt=[5] * 500), "positions"),
        (dict(warm_start=[1, 2]), "warm_start"),
        (dict(warm_start=[999] * 8), "warm_start"),
        (dict(pinned=[300]), "pinned"),
        (dict(cfg="fast"), "SamplingConfig"),
    ],
)
def test_bad_rows_are_refused(tiny, kwargs, fragment):
    engine = RowEngine(tiny.model)
    request = dict(prompt=[5, 6, 7], cfg=tiny.sampling_config(max_new_tokens=16)) | kwargs
    with pytest.raises(DgemmaError, match=fragment):
        engine.row(**request)
    with pytest.raises(DgemmaError, match="max_batch"):
        RowEngine(tiny.model, max_batch=0)


def test_fused_attention_runs_rows_through_their_own_passes(tiny_checkpoint, cache_at):
    """backend="triton": the kernel-backed attention takes a RowsPass row by row (Triton's interpreter here)."""
    from dgemma.model.load import load_model
    from dgemma.model.model import CachePass

    model = load_model(tiny_checkpoint, dtype=torch.float32, backend="triton")
    config, C = model.config, model.config.canvas_length
    caches = [cache_at(config, 1, n, 0, extra=C, dtype=torch.float32, device="cpu") for n in (5, 11)]
    for cache in caches:
        for k, v in zip(cache.k, cache.v, strict=True):
            k.normal_(), v.normal_()
    x = torch.randn(2, C, config.hidden_size)
    for layer in model.layers[:2]:  # a sliding and a full layer
        passes = [CachePass(model, cache, C, None, causal=False) for cache in caches]
        together = layer.self_attn(x, RowsPass(passes))
        passes = [CachePass(model, cache, C, None, causal=False) for cache in caches]
        apart = torch.cat([layer.self_attn(x[i : i + 1], p) for i, p in enumerate(passes)])
        assert torch.equal(together, apart)
