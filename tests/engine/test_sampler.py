from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rustinfer.engine.sampler import (
    Sampler,
    SamplingBatch,
    apply_penalties,
    apply_truncation,
    is_plain_greedy,
)
from rustinfer.engine.sampling_params import SamplingParams, SamplingParamsError

CPU = torch.device("cpu")
EOS = 1
sampler = Sampler()


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    # A fixed seed per test id: the statistical tests are deterministic, never flaky.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def build(
    params: Sequence[SamplingParams],
    vocab: int,
    prompts: Sequence[Sequence[int]] | None = None,
    outputs: Sequence[Sequence[int]] | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
) -> SamplingBatch:
    rows = len(params)
    return SamplingBatch.build(
        params,
        prompts if prompts is not None else [[]] * rows,
        outputs if outputs is not None else [[]] * rows,
        generators if generators is not None else [None] * rows,
        [EOS],
        vocab,
        CPU,
    )


def log_probs(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).log().float()


@pytest.mark.parametrize("rows", [1, 3, 7])
@pytest.mark.parametrize("vocab", [2, 97, 1000])
def test_greedy_equals_argmax(rows: int, vocab: int) -> None:
    logits = torch.randn(rows, vocab)
    before = logits.clone()
    out = sampler(logits, build([SamplingParams(temperature=0)] * rows, vocab))
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))
    assert out.token_ids.dtype == torch.int64 and out.logprobs is None
    assert torch.equal(logits, before)  # the caller's logits are never modified


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    return float(((counts.double() - expected) ** 2 / expected).sum())


def test_temperature_matches_softmax() -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 0.2])
    rows, temperature = 6000, 0.7
    out = sampler(logits.expand(rows, -1), build([SamplingParams(temperature=0.7)] * rows, 6))
    counts = torch.bincount(out.token_ids, minlength=6)
    # Critical value of chi-square with 5 degrees of freedom at p = 0.001 is 20.5.
    assert chi_square(counts, (logits / temperature).softmax(-1)) < 20.5
    # The same test rejects the untempered distribution: it can fail.
    assert chi_square(counts, logits.softmax(-1)) > 20.5


@pytest.mark.parametrize("k", [1, 3, 11])
def test_top_k_never_samples_outside(k: int) -> None:
    vocab, rows = 53, 2000
    logits = torch.randn(vocab) * 0.3  # flat: without truncation most tokens would appear
    out = sampler(logits.expand(rows, -1), build([SamplingParams(top_k=k)] * rows, vocab))
    allowed = set(logits.topk(k).indices.tolist())
    assert set(out.token_ids.tolist()) == allowed


@pytest.mark.parametrize("off", [0, -1])
def test_top_k_rows_beside_rows_without_top_k(off: int) -> None:
    # The topk fast path spans only the largest active k; rows with top_k off must keep everything.
    logits = torch.randn(3, 50)
    params = [SamplingParams(top_k=2), SamplingParams(top_k=off), SamplingParams(top_k=5)]
    batch = build(params, 50)
    assert batch.max_top_k == 5
    kept = torch.isfinite(apply_truncation(logits, batch))
    assert kept.sum(dim=-1).tolist() == [2, 50, 5]
    assert torch.equal(kept[2], logits[2] >= logits[2].topk(5).values[-1])


def test_top_k_larger_than_vocab_is_off() -> None:
    batch = build([SamplingParams(top_k=500)], 7)
    assert batch.top_k is None


CRAFTED = [0.5, 0.3, 0.15, 0.05]


@pytest.mark.parametrize(
    ("top_p", "kept"), [(0.45, {0}), (0.6, {0, 1}), (0.85, {0, 1, 2}), (0.99, {0, 1, 2, 3})]
)
def test_top_p_keeps_smallest_prefix_reaching_p(top_p: float, kept: set[int]) -> None:
    order = torch.tensor([2, 0, 3, 1])  # the crafted distribution, shuffled over token ids
    logits = torch.empty(4).scatter_(0, order, log_probs(CRAFTED))
    expected = {int(order[i]) for i in kept}
    batch = build([SamplingParams(top_p=top_p)], 4)
    finite = torch.isfinite(apply_truncation(logits.unsqueeze(0), batch)[0])
    assert set(finite.nonzero().flatten().tolist()) == expected
    rows = 1000
    out = sampler(logits.expand(rows, -1), build([SamplingParams(top_p=top_p)] * rows, 4))
    assert set(out.token_ids.tolist()) == expected


@pytest.mark.parametrize(("min_p", "kept"), [(0.2, {0, 1, 2}), (0.5, {0, 1}), (0.95, {0})])
def test_min_p_drops_tokens_below_fraction_of_top(min_p: float, kept: set[int]) -> None:
    logits = log_probs(CRAFTED).unsqueeze(0)
    finite = torch.isfinite(apply_truncation(logits, build([SamplingParams(min_p=min_p)], 4))[0])
    assert set(finite.nonzero().flatten().tolist()) == kept


PENALTY_LOGITS = [2.0, -1.0, 0.5, -0.3, 1.0, 0.0]
PROMPT, OUTPUT = [0, 1], [2, 2, 3]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # Repetition over prompt + output: positive logits divided, the rest multiplied.
        ({"repetition_penalty": 2.0}, [1.0, -2.0, 0.25, -0.6, 1.0, 0.0]),
        # Frequency: times the count in the output only (token 2 twice, token 3 once).
        ({"frequency_penalty": 0.5}, [2.0, -1.0, -0.5, -0.8, 1.0, 0.0]),
        # Presence: once per token seen in the output, negative values reward repeats.
        ({"presence_penalty": -0.7}, [2.0, -1.0, 1.2, 0.4, 1.0, 0.0]),
        (
            {"repetition_penalty": 2.0, "frequency_penalty": 0.5, "presence_penalty": 0.7},
            [1.0, -2.0, 0.25 - 1.0 - 0.7, -0.6 - 0.5 - 0.7, 1.0, 0.0],
        ),
    ],
)
def test_penalties_match_hand_computation(kwargs: dict[str, float], expected: list[float]) -> None:
    logits = torch.tensor([PENALTY_LOGITS, PENALTY_LOGITS])
    # Row 1 has no penalties and must come through untouched in the same batch.
    params = [SamplingParams(temperature=0, **kwargs), SamplingParams(temperature=0)]
    batch = build(params, 6, prompts=[PROMPT, PROMPT], outputs=[OUTPUT, OUTPUT])
    got = apply_penalties(logits.clone(), batch)
    torch.testing.assert_close(got[0], torch.tensor(expected))
    assert torch.equal(got[1], logits[1])
    out = sampler(logits, batch)
    assert out.token_ids.tolist() == [int(torch.tensor(expected).argmax()), 0]


def test_logit_bias_forces_and_bans_tokens() -> None:
    rows, vocab = 64, 50
    logits = torch.randn(rows, vocab)
    forced = sampler(logits, build([SamplingParams(logit_bias={7: 100})] * rows, vocab))
    assert forced.token_ids.tolist() == [7] * rows
    top = logits.argmax(dim=-1)
    params = [SamplingParams(temperature=0, logit_bias={int(t): -100}) for t in top]
    banned = sampler(logits, build(params, vocab))
    assert not (banned.token_ids == top).any()


def test_logit_bias_outside_vocab_is_rejected_at_build() -> None:
    with pytest.raises(SamplingParamsError) as info:
        build([SamplingParams(), SamplingParams(logit_bias={10: 1.0})], 10)
    assert info.value.field == "logit_bias"


def test_min_tokens_blocks_eos_and_stop_ids_until_reached() -> None:
    vocab, stop_id = 10, 4
    logits = torch.zeros(vocab)
    logits[EOS], logits[stop_id], logits[6] = 9.0, 8.0, 1.0
    params = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[stop_id, 99])
    ignore = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[stop_id], ignore_eos=True)
    picks = []
    for produced in range(4):
        outputs = [[6] * produced] * 2
        out = sampler(logits.expand(2, -1), build([params, ignore], vocab, outputs=outputs))
        picks.append(out.token_ids.tolist())
    # Under min_tokens the best remaining token wins; with ignore_eos, EOS is not a stop at all.
    assert picks == [[6, EOS], [6, EOS], [6, EOS], [EOS, EOS]]
    rows = 500  # random rows too: masked tokens are never drawn, however likely
    out = sampler(logits.expand(rows, -1), build([params] * rows, vocab, outputs=[[]] * rows))
    assert not ({EOS, stop_id} & set(out.token_ids.tolist()))


def generate(rows: list[SamplingParams], step_logits: list[torch.Tensor]) -> list[list[int]]:
    generators = [
        torch.Generator(CPU).manual_seed(p.seed) if p.seed is not None else None for p in rows
    ]
    prompts = [[2, 3, 5]] * len(rows)
    outputs: list[list[int]] = [[] for _ in rows]
    for logits in step_logits:
        batch = build(rows, logits.shape[1], prompts, outputs, generators)
        for row, token in enumerate(sampler(logits, batch).token_ids.tolist()):
            outputs[row].append(token)
    return outputs


def test_seeded_row_is_identical_alone_and_in_a_mixed_batch() -> None:
    vocab, steps = 101, 8
    seeded = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=1234, frequency_penalty=0.3)
    others = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.3, seed=99, repetition_penalty=1.2),
        SamplingParams(temperature=0.8),
        SamplingParams(min_p=0.1, logprobs=2),
    ]
    batch_logits = [torch.randn(5, vocab) * 0.5 for _ in range(steps)]
    alone = generate([seeded], [step[2:3] for step in batch_logits])[0]
    mixed = generate(others[:2] + [seeded] + others[2:], batch_logits)[2]
    assert alone == mixed
    assert len(set(alone)) > 1  # flat logits: a real draw, not a forced token
    again = generate([seeded], [step[2:3] for step in batch_logits])[0]
    assert again == alone


def test_logprobs_follow_the_raw_distribution() -> None:
    vocab = 37
    logits = torch.randn(3, vocab) * 3
    params = [
        SamplingParams(logprobs=0, temperature=0.5, repetition_penalty=1.5),
        SamplingParams(logprobs=5, top_k=3),
        SamplingParams(temperature=0),
    ]
    out = sampler(logits, build(params, vocab, prompts=[[0, 1]] * 3))
    raw = logits.double().log_softmax(-1)
    assert out.logprobs is not None and out.top_logprobs is not None
    assert out.top_logprob_ids is not None and out.top_logprob_ids.shape == (3, 5)
    expected = raw.gather(1, out.token_ids.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(out.logprobs.double(), expected, rtol=0, atol=1e-5)
    top_values, top_ids = raw.topk(5, dim=-1)
    assert torch.equal(out.top_logprob_ids, top_ids)
    torch.testing.assert_close(out.top_logprobs.double(), top_values, rtol=0, atol=1e-5)


params_strategy = st.builds(
    SamplingParams,
    temperature=st.one_of(st.just(0.0), st.floats(0.05, 3.0)),
    top_k=st.integers(-1, 12),
    top_p=st.floats(0.05, 1.0),
    min_p=st.floats(0.0, 1.0),
    repetition_penalty=st.floats(0.5, 2.0),
    presence_penalty=st.floats(-2.0, 2.0),
    frequency_penalty=st.floats(-2.0, 2.0),
)


@settings(max_examples=60, deadline=None)
@given(
    params=st.lists(params_strategy, min_size=1, max_size=4),
    vocab=st.integers(2, 40),
    seed=st.integers(0, 2**31),
)
def test_sampled_token_is_always_allowed(
    params: list[SamplingParams], vocab: int, seed: int
) -> None:
    torch.manual_seed(seed)
    rows = len(params)
    logits = torch.randn(rows, vocab) * 2
    outputs = [torch.randint(0, vocab, (3,)).tolist() for _ in range(rows)]
    batch = build(params, vocab, prompts=[[0]] * rows, outputs=outputs)
    tokens = sampler(logits, batch).token_ids.tolist()
    penalized = apply_penalties(logits.clone(), batch).double()
    processed = apply_truncation(penalized.float(), batch)
    for row, (p, token) in enumerate(zip(params, tokens, strict=True)):
        if p.is_greedy:
            assert token == int(penalized[row].argmax())
            continue
        assert math.isfinite(processed[row, token])
        scaled = penalized[row] / p.temperature
        if p.top_k > 0:  # ties at the k-th value may survive, strictly-better tokens count
            assert int((scaled > scaled[token]).sum()) < p.top_k
            scaled = scaled.masked_fill(
                scaled < scaled.topk(min(p.top_k, vocab)).values[-1], -math.inf
            )
        probs = scaled.softmax(-1)
        assert float(probs[probs > probs[token]].sum()) < p.top_p + 1e-5
        # The top token survives top_k and top_p, and renormalizing keeps ratios: compare with it.
        assert float(probs[token]) >= p.min_p * float(probs.max()) * (1 - 1e-5) - 1e-12


@pytest.mark.parametrize(
    ("kwargs", "outputs", "plain"),
    [
        ({"temperature": 0}, 0, True),
        ({"temperature": 0, "min_tokens": 2}, 2, True),  # min_tokens already reached
        ({"temperature": 0, "min_tokens": 2}, 1, False),  # EOS still masked
        ({"temperature": 0.5}, 0, False),
        ({"temperature": 0, "repetition_penalty": 1.1}, 0, False),
        ({"temperature": 0, "presence_penalty": 0.5}, 0, False),
        ({"temperature": 0, "frequency_penalty": -0.5}, 0, False),
        ({"temperature": 0, "logit_bias": {3: 5.0}}, 0, False),
        ({"temperature": 0, "logprobs": 0}, 0, False),
    ],
)
def test_plain_greedy_rows_skip_the_sampling_batch(kwargs, outputs, plain) -> None:
    params = SamplingParams(**kwargs)
    assert is_plain_greedy(params, outputs) is plain
    if plain:  # the shortcut gives what the full sampler gives
        logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1)) * 4
        batch = SamplingBatch.build(
            [params] * 3, [[1, 2]] * 3, [[5] * outputs] * 3, [None] * 3, [0], 50, logits.device
        )
        full = Sampler()(logits, batch).token_ids
        assert torch.equal(Sampler.greedy(logits).token_ids, full)
