"""AsyncEngine on a tiny float64 model: streaming, n > 1, cancel, abort, errors, loop liveness."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from model_helpers import random_weights, tiny_config, write_checkpoint

from rustinfer.engine.async_engine import AsyncEngine, EngineShutdownError
from rustinfer.engine.core import EngineConfig, EngineCore
from rustinfer.engine.model_runner import kv_bytes_per_block
from rustinfer.engine.outputs import RequestOutput
from rustinfer.engine.sampling_params import SamplingParams
from rustinfer.errors import InvalidRequestError
from rustinfer.runtime.loading import load_model

BLOCK = 4
PROMPTS = [
    [1, 5, 17, 42, 3, 88, 9, 60, 61, 62, 7],
    [1, 33, 2, 90],
    [1, 8, 8, 8, 8, 12, 44, 71, 23, 19, 5, 6, 70, 3, 2, 1, 9],
    [1, 77, 76, 75, 74, 73, 72, 71, 70, 69, 68, 67, 66, 65, 64, 63, 62, 61, 60, 59, 58],
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)
LONG = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    cfg = tiny_config()
    path = write_checkpoint(tmp_path_factory.mktemp("m"), cfg, random_weights(cfg, seed=5))
    return load_model(str(path), device="cpu", dtype="float64")


def make_core(loaded, blocks: int = 64, **kw) -> EngineCore:
    per_block = kv_bytes_per_block(loaded.model, BLOCK)
    return EngineCore(
        loaded, EngineConfig(block_size=BLOCK, kv_cache_bytes=blocks * per_block, **kw)
    )


def direct_greedy(loaded, prompts: list[list[int]]) -> dict[str, list[int]]:
    """The tokens EngineCore itself produces, stepped synchronously."""
    core = make_core(loaded)
    for i, p in enumerate(prompts):
        core.add_request(f"r{i}", p, GREEDY)
    tokens: dict[str, list[int]] = {}
    while core.has_unfinished():
        for out in core.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


async def collect(engine: AsyncEngine, prompt, params, rid=None) -> list[RequestOutput]:
    return [out async for out in engine.generate(prompt, params, rid)]


async def wait_idle(engine: AsyncEngine, timeout: float = 5.0) -> dict:
    """Poll the stats snapshot until the engine holds no requests and no KV blocks."""
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        idle = stats["requests"] == 0 and stats["running"] == 0 and stats["waiting"] == 0
        if idle and stats["kv_blocks_used"] == 0:
            return stats
        assert time.monotonic() < deadline, f"engine never went idle: {stats}"
        await asyncio.sleep(0.01)


def test_concurrent_requests_match_the_core_run_directly(loaded):
    expected = direct_greedy(loaded, PROMPTS)

    async def main() -> dict[str, list[int]]:
        async with AsyncEngine(make_core(loaded)) as engine:
            results = await asyncio.gather(
                *(collect(engine, p, GREEDY, f"r{i}") for i, p in enumerate(PROMPTS))
            )
            await wait_idle(engine)
        got = {}
        for outs in results:
            assert outs[-1].finished and outs[-1].finish_reason == "length"
            assert sum(o.finished for o in outs) == 1
            got[outs[0].request_id] = [t for o in outs for t in o.new_token_ids]
        return got

    assert asyncio.run(main()) == expected


def test_n_2_yields_both_indices(loaded):
    params = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=5, ignore_eos=True)

    async def main() -> list[RequestOutput]:
        async with AsyncEngine(make_core(loaded)) as engine:
            outs = await collect(engine, PROMPTS[0], params)  # generated request id
            await wait_idle(engine)
            return outs

    outs = asyncio.run(main())
    assert {o.index for o in outs} == {0, 1}
    for k in (0, 1):
        mine = [o for o in outs if o.index == k]
        assert sum(len(o.new_token_ids) for o in mine) == 5
        assert mine[-1].finished and not any(o.finished for o in mine[:-1])
    assert len({o.request_id for o in outs}) == 1


def test_cancelling_the_consumer_aborts_and_frees_blocks(loaded):
    async def main() -> None:
        async with AsyncEngine(make_core(loaded)) as engine:
            started = asyncio.Event()

            async def consume() -> None:
                async for _ in engine.generate(PROMPTS[2], LONG, "c"):
                    started.set()

            task = asyncio.create_task(consume())
            await started.wait()
            assert engine.stats()["kv_blocks_used"] > 0
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            stats = await wait_idle(engine)
            assert stats["tokens_generated"] < LONG.max_tokens
            assert not engine.core.children and not engine.core.requests

            # Breaking out of the loop early (closed deterministically) also aborts.
            async with contextlib.aclosing(engine.generate(PROMPTS[1], LONG, "b")) as gen:
                async for _ in gen:
                    break
            await wait_idle(engine)
            # The same id is free again: the engine forgot both requests.
            outs = await collect(engine, PROMPTS[1], GREEDY, "c")
            assert sum(len(o.new_token_ids) for o in outs) == 7

    asyncio.run(main())


def test_abort_from_another_task_ends_the_stream(loaded):
    async def main() -> list[RequestOutput]:
        async with AsyncEngine(make_core(loaded)) as engine:
            outs: list[RequestOutput] = []
            async for out in engine.generate(PROMPTS[0], LONG, "victim"):
                outs.append(out)
                if len(outs) == 2:
                    asyncio.get_running_loop().create_task(engine.abort("victim"))
            await wait_idle(engine)
            await engine.abort("nobody")  # unknown ids are ignored
            return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].finish_reason == "abort"
    assert len(outs) < LONG.max_tokens


def test_validation_errors_raise_and_the_engine_keeps_serving(loaded):
    async def main() -> None:
        async with AsyncEngine(make_core(loaded, blocks=8)) as engine:  # 32 KV slots
            with pytest.raises(InvalidRequestError, match="'prompt'.*empty"):
                await collect(engine, [], GREEDY, "empty")
            with pytest.raises(InvalidRequestError, match="exceeds the context limit of 32"):
                await collect(engine, PROMPTS[3], SamplingParams(max_tokens=20), "long")
            with pytest.raises(InvalidRequestError, match="no tokenizer"):
                await collect(engine, "hello", GREEDY)  # the tiny model has no tokenizer
            gen = engine.generate([1, 500], GREEDY)
            with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
                await gen.__anext__()  # raised before any output
            assert engine.stats()["requests"] == 0 and not engine.core.children
            outs = await collect(engine, PROMPTS[1], GREEDY, "empty")  # ids were not kept
            assert outs[-1].finish_reason == "length"

    asyncio.run(main())


def test_a_failing_step_fails_in_flight_requests_and_the_loop_survives(loaded, caplog):
    core = make_core(loaded)
    real_step = core.step
    fail = {"armed": False}

    def flaky_step() -> list[RequestOutput]:
        if fail["armed"]:
            fail["armed"] = False
            raise RuntimeError("boom")
        return real_step()

    core.step = flaky_step  # only the engine thread calls it

    async def main() -> None:
        async with AsyncEngine(core) as engine:

            async def victim() -> None:
                async for _ in engine.generate(PROMPTS[0], LONG, "v"):
                    fail["armed"] = True

            with pytest.raises(RuntimeError, match="boom"):
                await asyncio.wait_for(victim(), 10)
            await wait_idle(engine)
            outs = await collect(engine, PROMPTS[1], GREEDY)
            assert outs[-1].finish_reason == "length"

    asyncio.run(main())
    assert "engine step failed" in caplog.text


def test_the_event_loop_stays_responsive_during_generation(loaded):
    async def main() -> tuple[float, int, float]:
        async with AsyncEngine(make_core(loaded, blocks=256)) as engine:
            done = asyncio.Event()
            gaps: list[float] = []

            async def heartbeat() -> None:
                last = time.monotonic()
                while not done.is_set():
                    await asyncio.sleep(0.01)
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now

            beat = asyncio.create_task(heartbeat())
            params = SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True)
            t0 = time.monotonic()
            results = await asyncio.gather(*(collect(engine, p, params) for p in PROMPTS))
            elapsed = time.monotonic() - t0
            done.set()
            await beat
            tokens = sum(len(o.new_token_ids) for r in results for o in r)
            return max(gaps), len(gaps), elapsed, tokens

    max_gap, beats, elapsed, outputs = asyncio.run(main())
    assert outputs == 4 * 120
    # The loop kept ticking while the engine worked, instead of stalling for whole generations.
    assert beats >= elapsed / 0.05, (beats, elapsed)
    assert max_gap < 0.5, max_gap


def test_shutdown_joins_the_thread_and_refuses_new_work(loaded):
    async def main() -> None:
        engine = AsyncEngine.from_loaded(
            loaded, EngineConfig(block_size=BLOCK, kv_cache_bytes=64 * 1024 * 1024)
        )
        assert not engine.is_running  # __init__ does not start the thread
        engine.start()
        assert engine.is_running
        gen = engine.generate(PROMPTS[0], LONG)
        first = await gen.__anext__()
        assert first.new_token_ids
        await engine.shutdown()
        assert not engine.is_running
        with pytest.raises(EngineShutdownError):
            async for _ in gen:  # the in-flight request ends with the shutdown error
                pass
        with pytest.raises(EngineShutdownError):
            await collect(engine, PROMPTS[1], GREEDY)
        assert engine.stats()["kv_blocks_used"] == 0

    asyncio.run(main())
