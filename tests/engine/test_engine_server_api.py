"""The engine API a server needs: unique ids, arrival time, timings, back-pressure, slow readers."""

from __future__ import annotations

import asyncio
import time

import pytest
from model_helpers import random_weights, tiny_config, write_checkpoint

from engine.test_async_engine import GREEDY, LONG, PROMPTS, collect, make_core, wait_idle
from rustinfer.engine.async_engine import AsyncEngine
from rustinfer.engine.rate import RecentRate
from rustinfer.engine.sampling_params import SamplingParams
from rustinfer.errors import (
    ContextLengthExceededError,
    DuplicateRequestError,
    InvalidRequestError,
    OverloadedError,
    RequestError,
)
from rustinfer.runtime.loading import load_model


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    cfg = tiny_config()
    path = write_checkpoint(tmp_path_factory.mktemp("m"), cfg, random_weights(cfg, seed=5))
    return load_model(str(path), device="cpu", dtype="float64")


def test_a_duplicate_id_is_refused_and_the_live_request_runs_on(loaded):
    async def main() -> None:
        async with AsyncEngine(make_core(loaded)) as engine:
            live = await engine.submit(PROMPTS[0], LONG, "same")
            first = await anext(live)
            with pytest.raises(DuplicateRequestError) as info:
                await engine.submit(PROMPTS[1], GREEDY, "same")
            assert info.value.field == "request_id" and isinstance(info.value, RequestError)
            # The refused call's cleanup must not abort the live request of that id.
            outs = [first] + [o async for o in live]
            assert outs[-1].finish_reason == "length"
            assert sum(len(o.new_token_ids) for o in outs) == LONG.max_tokens
            await wait_idle(engine)

    asyncio.run(main())


def test_arrival_time_counts_in_queue_time_and_ttft(loaded):
    async def main() -> list:
        async with AsyncEngine(make_core(loaded)) as engine:
            arrived = time.monotonic() - 2.0  # e.g. two seconds spent tokenizing upstream
            return await collect(engine, PROMPTS[0], GREEDY, None) + [
                o async for o in engine.generate(PROMPTS[1], GREEDY, "late", arrived)
            ]

    outs = asyncio.run(main())
    late = [o for o in outs if o.request_id == "late"]
    t = late[-1].timings
    assert t.queue_s >= 2.0 and t.ttft_s >= 2.0
    assert t.ttft_s == pytest.approx(t.queue_s + t.prefill_s, abs=1e-6)
    assert t.e2e_s >= t.ttft_s + t.decode_s - 1e-6
    assert all(o.timings.e2e_s is None for o in late[:-1])  # only the final has it


def test_inter_token_intervals_cover_every_token_after_the_first(loaded):
    outs = asyncio.run(_run_one(loaded, PROMPTS[2], GREEDY))
    gaps = [g for o in outs for g in o.inter_token_s]
    assert len(gaps) == GREEDY.max_tokens - 1 and all(g >= 0 for g in gaps)
    # A reader that falls behind gets merged outputs (RequestStream), so under load two steps'
    # tokens may come as one output: the counts only have to rise to max_tokens.
    counts = [o.num_output_tokens for o in outs]
    assert counts == sorted(set(counts)) and counts[-1] == GREEDY.max_tokens


async def _run_one(loaded, prompt, params):
    async with AsyncEngine(make_core(loaded)) as engine:
        return await collect(engine, prompt, params)


def test_a_full_queue_refuses_all_of_an_n_request_and_nothing_is_left(loaded):
    async def main() -> None:
        core = make_core(loaded, max_waiting=2)
        async with AsyncEngine(core) as engine:
            with pytest.raises(OverloadedError):
                await engine.submit(PROMPTS[0], SamplingParams(n=3, max_tokens=2))
            assert not core.requests and not core.children
            assert engine.stats()["waiting"] == 0
            outs = await collect(engine, PROMPTS[0], GREEDY)
            assert sum(len(o.new_token_ids) for o in outs) == GREEDY.max_tokens

    asyncio.run(main())


def test_too_long_is_its_own_error_kind(loaded):
    async def main() -> None:
        async with AsyncEngine(make_core(loaded)) as engine:
            with pytest.raises(ContextLengthExceededError) as info:
                await engine.submit(PROMPTS[0], SamplingParams(max_tokens=10_000))
            assert info.value.field == "max_tokens"
            assert isinstance(info.value, InvalidRequestError)

    asyncio.run(main())


def test_a_slow_reader_gets_merged_outputs_not_a_growing_queue(loaded):
    async def main() -> None:
        async with AsyncEngine(make_core(loaded)) as engine:
            params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, n=2)
            stream = await engine.submit(PROMPTS[0], params, "slow")
            # Nobody reads while the request runs to its end.
            while sum(o.finished for o in stream._buffer) < params.n:
                await asyncio.sleep(0.01)
            assert len(stream._buffer) == params.n  # one (merged) output per sequence
            outs = [o async for o in stream]
            assert len(outs) == 2 and all(o.finished for o in outs)
            for o in outs:
                assert len(o.new_token_ids) == 40 and len(o.inter_token_s) == 39
                assert o.num_output_tokens == 40

    asyncio.run(main())


def test_read_only_accessors(loaded):
    engine = AsyncEngine(make_core(loaded), model_name="tiny")
    assert engine.model_name == "tiny"
    assert engine.max_model_len == engine.core.context_limit > 0
    assert engine.tokenizer is None  # a bare checkpoint
    stats = engine.stats()
    assert stats["kv_cache_usage"] == 0.0 and stats["tokens_per_second"] == 0.0
    assert engine.num_running == engine.num_waiting == 0
    with pytest.raises(InvalidRequestError):
        engine.render_chat([{"role": "user", "content": "hi"}])


def test_recent_rate_is_a_window_not_a_lifetime_average():
    rate = RecentRate(window_s=2.0)
    rate.add(10, now=100.0)
    rate.add(10, now=101.0)
    assert rate.per_second(now=101.5) == pytest.approx(10.0)
    assert rate.per_second(now=102.5) == pytest.approx(5.0)  # the first burst left the window
    assert rate.per_second(now=110.0) == 0.0  # idle: back to zero
