"""EngineCore on a tiny float64 model: batching, chunking, preemption, prefix cache, abort, limits."""

from __future__ import annotations

import io

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from model_helpers import random_weights, tiny_config, write_checkpoint
from tqdm import tqdm

from rustinfer.engine.core import EngineConfig, EngineCore
from rustinfer.engine.model_runner import kv_bytes_per_block
from rustinfer.engine.sampling_params import SamplingParams
from rustinfer.engine.scheduler import OverloadedError
from rustinfer.errors import InvalidRequestError
from rustinfer.models.reference import ReferenceLlama
from rustinfer.runtime.loading import load_model

BLOCK = 4
PROMPTS = [
    [1, 5, 17, 42, 3, 88, 9, 60, 61, 62, 7],
    [1, 33, 2, 90],
    [1, 8, 8, 8, 8, 12, 44, 71, 23, 19, 5, 6, 70, 3, 2, 1, 9],
    [1, 5, 17, 42, 3, 88, 9, 60, 4],
    [1, 77, 76, 75, 74, 73, 72, 71, 70, 69, 68, 67, 66, 65, 64, 63, 62, 61, 60, 59, 58],
]


# Every test runs twice: stepping synchronously, and with one step in flight (``overlap``, the
# CUDA default), where a step's tokens are read back during the next step's call.
_MODE = {"overlap": False}


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "overlap"])
def tiny(request, tmp_path_factory):
    _MODE["overlap"] = request.param
    cfg = tiny_config(rope_scaling=True)
    weights = random_weights(cfg, seed=5)
    path = write_checkpoint(tmp_path_factory.mktemp("m"), cfg, weights)
    loaded = load_model(str(path), device="cpu", dtype="float64")
    return loaded, ReferenceLlama(loaded.config, weights)


def make_engine(loaded, blocks: int = 64, **kw) -> EngineCore:
    kw.setdefault("overlap", _MODE["overlap"])
    per_block = kv_bytes_per_block(loaded.model, BLOCK)
    return EngineCore(
        loaded, EngineConfig(block_size=BLOCK, kv_cache_bytes=blocks * per_block, **kw)
    )


def run_all(engine: EngineCore, max_steps: int = 500) -> dict[str, list]:
    tokens: dict[str, list[int]] = {}
    finish: dict[str, str] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            key = f"{out.request_id}/{out.index}"
            tokens.setdefault(key, []).extend(out.new_token_ids)
            if out.finished:
                finish[key] = out.finish_reason
    assert not engine.has_unfinished()
    return {"tokens": tokens, "finish": finish}


GREEDY = SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)


def test_batched_chunked_and_preempted_runs_match_the_oracle(tiny):
    loaded, ref = tiny
    expected = {f"r{i}/0": ref.greedy(p, 7) for i, p in enumerate(PROMPTS)}
    # Plenty of room, large budget: everything batched together.
    engine = make_engine(loaded)
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", p, GREEDY)
    assert run_all(engine)["tokens"] == expected
    # A 5-token budget forces chunked prefill mixed with decodes; 12 blocks (48 slots) for 5
    # sequences of up to 28 tokens forces preemption by recompute.
    engine = make_engine(loaded, blocks=12, max_num_batched_tokens=5)
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", p, GREEDY)
    result = run_all(engine)
    assert result["tokens"] == expected
    assert set(result["finish"].values()) == {"length"}
    assert engine.stats()["preemptions"] > 0
    assert engine.stats()["kv_blocks_used"] == 0


def test_prefix_cache_serves_a_repeated_prompt(tiny):
    loaded, ref = tiny
    engine = make_engine(loaded)
    engine.add_request("a", PROMPTS[4], GREEDY)
    first = run_all(engine)["tokens"]["a/0"]
    engine.add_request("b", PROMPTS[4], GREEDY)
    second = run_all(engine)["tokens"]["b/0"]
    assert first == second == ref.greedy(PROMPTS[4], 7)
    stats = engine.stats()
    # 21 prompt tokens = 5 full blocks of 4: the second request finds all 5 (20 tokens) cached.
    assert stats["prefix_cache_hits"] >= 20


def test_n_sequences_and_seeds(tiny):
    loaded, _ = tiny
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=6, ignore_eos=True)
    engine = make_engine(loaded)
    engine.add_request("alone", PROMPTS[0], params)
    alone = run_all(engine)["tokens"]
    engine = make_engine(loaded)
    engine.add_request("x", PROMPTS[2], SamplingParams(temperature=0.7, max_tokens=9))
    engine.add_request("alone", PROMPTS[0], params)
    engine.add_request("y", PROMPTS[1], SamplingParams(temperature=1.0, seed=3, max_tokens=4))
    batched = run_all(engine)["tokens"]
    for k in range(3):
        assert batched[f"alone/{k}"] == alone[f"alone/{k}"]  # seeded: same alone or batched
    assert len({tuple(alone[f"alone/{k}"]) for k in range(3)}) > 1  # n samples differ


def test_n_sequences_share_the_prompt_blocks(tiny):
    loaded, _ = tiny
    engine = make_engine(loaded)
    params = SamplingParams(n=3, temperature=1.0, seed=2, max_tokens=4, ignore_eos=True)
    engine.add_request("n3", PROMPTS[4], params)  # 21 tokens: 5 full blocks of 4
    result = run_all(engine)
    assert all(len(result["tokens"][f"n3/{k}"]) == 4 for k in range(3))
    # Sequences 1 and 2 find sequence 0's 5 full prompt blocks in the prefix cache.
    assert engine.stats()["prefix_cache_hits"] == 2 * 20


def test_abort_frees_blocks_within_a_step(tiny):
    loaded, _ = tiny
    engine = make_engine(loaded)
    engine.add_request("long", PROMPTS[2], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("short", PROMPTS[1], GREEDY)
    engine.step()
    assert engine.stats()["kv_blocks_used"] > 0
    assert engine.abort("long")
    assert engine.stats()["kv_blocks_used"] > 0  # "short" still holds its blocks
    outs = engine.step()
    final = [o for o in outs if o.request_id == "long"]
    assert final and final[0].finished and final[0].finish_reason == "abort"
    run_all(engine)
    assert engine.stats()["kv_blocks_used"] == 0
    assert not engine.abort("long")  # already gone


def test_limits_fail_before_any_work(tiny):
    loaded, _ = tiny
    engine = make_engine(loaded, blocks=8, max_waiting=2)  # 32 KV slots
    with pytest.raises(
        InvalidRequestError, match=r"'max_tokens'.*21 tokens.*exceeds the context limit of 32"
    ):
        engine.add_request("big", PROMPTS[4], SamplingParams(max_tokens=20))
    with pytest.raises(InvalidRequestError, match="'prompt'.*empty"):
        engine.add_request("empty", [], GREEDY)
    with pytest.raises(InvalidRequestError, match=r"outside the vocabulary \[0, 97\)"):
        engine.add_request("oov", [1, 500], GREEDY)
    engine.add_request("a", PROMPTS[1], GREEDY)
    engine.add_request("b", PROMPTS[1], GREEDY)
    with pytest.raises(OverloadedError, match="overloaded"):
        engine.add_request("c", PROMPTS[1], GREEDY)
    assert not engine.abort("c") and "big" not in engine.children
    run_all(engine)


def test_eos_and_stop_token_ids_finish_with_stop(tiny):
    loaded, ref = tiny
    greedy = ref.greedy(PROMPTS[0], 7)
    stop_at = greedy[3]
    engine = make_engine(loaded)
    engine.add_request(
        "s", PROMPTS[0], SamplingParams(temperature=0, max_tokens=7, stop_token_ids=[stop_at])
    )
    result = run_all(engine)
    assert result["tokens"]["s/0"] == greedy[: greedy.index(stop_at) + 1]
    assert result["finish"]["s/0"] == "stop"
    engine.add_request(
        "m",
        PROMPTS[0],
        SamplingParams(temperature=0, max_tokens=7, min_tokens=7, stop_token_ids=[stop_at]),
    )
    assert len(run_all(engine)["tokens"]["m/0"]) == 7


class EngineMachine(RuleBasedStateMachine):
    """Random submit / step / abort sequences never leak blocks or requests."""

    loaded = None

    def __init__(self) -> None:
        super().__init__()
        self.engine = make_engine(self.loaded, blocks=10, max_num_batched_tokens=6, max_num_seqs=3)
        self.count = 0

    @rule(
        prompt=st.lists(st.integers(1, 96), min_size=1, max_size=14),
        max_tokens=st.integers(1, 8),
        temperature=st.sampled_from([0.0, 1.0]),
    )
    def submit(self, prompt, max_tokens, temperature):
        self.count += 1
        self.engine.add_request(
            f"q{self.count}", prompt, SamplingParams(temperature=temperature, max_tokens=max_tokens)
        )

    @rule()
    def step(self):
        self.engine.step()

    @rule(which=st.integers(0, 50))
    def abort(self, which):
        live = sorted(self.engine.children)
        if live:
            self.engine.abort(live[which % len(live)])

    @invariant()
    def blocks_consistent(self):
        self.engine.blocks.check_invariants()

    def teardown(self):
        for _ in range(400):
            if not self.engine.has_unfinished():
                break
            self.engine.step()
        assert not self.engine.has_unfinished()
        assert not self.engine.requests and not self.engine.children
        assert self.engine.stats()["kv_blocks_used"] == 0


def test_engine_state_machine(tiny):
    EngineMachine.loaded = tiny[0]
    runner = EngineMachine.TestCase()
    runner.settings = settings(max_examples=25, stateful_step_count=25, deadline=None)
    runner.runTest()


def test_warm_up_leaves_no_trace(tmp_path):
    """What a GPU engine runs at load (compiling kernels) must not show in what users see."""
    from rustinfer.runtime.loading import load_model

    cfg = tiny_config()
    path = write_checkpoint(tmp_path / "m", cfg, random_weights(cfg, seed=2))
    loaded = load_model(str(path), device="cpu", dtype="float32")
    core = EngineCore(loaded, EngineConfig(kv_cache_bytes=1 << 20))
    bar = tqdm(total=1, file=io.StringIO())  # one for the whole-engine request
    core._warm_up(bar)
    assert bar.total == 5 and bar.n == 5  # the runner's four step shapes, then the request
    stats = core.stats()
    assert stats["tokens_generated"] == 0 and stats["tokens_per_second"] == 0
    assert stats["kv_blocks_used"] == 0 and stats["running"] == stats["waiting"] == 0
    assert not core.requests and not core.children
    # Nothing it computed is served from the prefix cache to a real request.
    core.add_request("a", list(range(64)), SamplingParams(temperature=0, max_tokens=2))
    while core.has_unfinished():
        core.step()
    assert core.stats()["prefix_cache_hits"] == 0


def test_overlap_gives_what_stepping_in_sync_gives(tiny):
    """Logprobs, penalties and min_tokens (which read a sequence's tokens on the host, so the
    step in flight is read back first), stop ids met mid-flight, n > 1 and seeds: the same
    outputs, token for token, with a step in flight as without."""
    loaded, ref = tiny
    greedy = ref.greedy(PROMPTS[0], 7)
    requests = [
        ("lp", PROMPTS[0], SamplingParams(temperature=0, max_tokens=6, logprobs=3)),
        ("pen", PROMPTS[2], SamplingParams(temperature=0, max_tokens=8, repetition_penalty=1.3)),
        ("freq", PROMPTS[1], SamplingParams(temperature=0.8, seed=4, max_tokens=8,
                                            frequency_penalty=0.5, presence_penalty=0.2)),
        ("min", PROMPTS[0], SamplingParams(temperature=0, max_tokens=7, min_tokens=5,
                                           stop_token_ids=[greedy[1]])),
        ("stop", PROMPTS[0], SamplingParams(temperature=0, max_tokens=7,
                                            stop_token_ids=[greedy[2]])),
        ("n", PROMPTS[4], SamplingParams(n=2, temperature=1.0, seed=9, max_tokens=5)),
    ]  # fmt: skip
    results = []
    for overlap in (False, True):
        engine = make_engine(loaded, blocks=24, max_num_batched_tokens=8, overlap=overlap)
        logprobs: dict[str, list] = {}
        for rid, prompt, params in requests:
            engine.add_request(rid, prompt, params)
        result = run_all(engine)
        engine.add_request("lp2", PROMPTS[0], requests[0][2])
        while engine.has_unfinished():
            for out in engine.step():
                logprobs.setdefault(out.request_id, []).extend(out.logprobs or [])
        result["logprobs"] = [(lp.token_id, round(lp.logprob, 9)) for lp in logprobs["lp2"]]
        assert engine.stats()["kv_blocks_used"] == 0
        results.append(result)
    assert results[0] == results[1]
    assert results[1]["finish"]["stop/0"] == "stop"
    assert results[1]["tokens"]["stop/0"] == greedy[:3]
    assert len(results[1]["tokens"]["min/0"]) >= 5


def test_a_sequence_that_stops_mid_flight_computes_one_row_more_and_reports_nothing_of_it(tiny):
    loaded, ref = tiny
    if not _MODE["overlap"]:
        pytest.skip("only a step in flight computes past a stop")
    greedy = ref.greedy(PROMPTS[0], 7)
    engine = make_engine(loaded)
    engine.add_request(
        "s", PROMPTS[0], SamplingParams(temperature=0, max_tokens=7, stop_token_ids=[greedy[1]])
    )
    steps = 0
    tokens = []
    while engine.has_unfinished():
        steps += 1
        for out in engine.step():
            tokens += out.new_token_ids
    assert tokens == greedy[:2]
    # prefill, decode (samples the stop id), one more decode launched before that id was read,
    # and the call that reads the last launched step back.
    assert steps == 4


def test_sampling_state_is_built_when_the_batch_changes_not_every_step(tiny, monkeypatch):
    """Penalties read token counts kept on the device: a steady batch builds its sampling state
    once and the counts follow the sampled tokens there, giving what a rebuild each step gives."""
    from rustinfer.engine import core as core_module

    loaded, _ = tiny
    params = [
        SamplingParams(temperature=0.9, seed=1, max_tokens=12, ignore_eos=True,
                       frequency_penalty=0.7, presence_penalty=0.3, repetition_penalty=1.2),
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.5),
    ]  # fmt: skip
    builds = []
    real_build = core_module.SamplingBatch.build

    def counting_build(*args, **kw):
        builds.append(1)
        return real_build(*args, **kw)

    def run(rebuild_every_step: bool) -> dict[str, list]:
        engine = make_engine(loaded)
        if rebuild_every_step:
            monkeypatch.setattr(core_module, "sampling_key", lambda reqs: object())
        for i, p in enumerate(params):
            engine.add_request(f"p{i}", PROMPTS[i], p)
        result = run_all(engine)["tokens"]
        monkeypatch.undo()
        return result

    monkeypatch.setattr(core_module.SamplingBatch, "build", counting_build)
    steady = run(rebuild_every_step=False)
    assert len(builds) == 1, builds  # both prompts prefill in one step, then the same pair decodes
    assert run(rebuild_every_step=True) == steady


def test_a_single_request_prefills_its_prompt_in_one_step(tiny):
    # generate / bench latency: a lone request's prompt is one step up to 16,384 tokens (no
    # other request waits on its chunks), beyond that in chunks of that size.
    from rustinfer.llm import LLM

    loaded, ref = tiny
    assert LLM.for_single_request(loaded, 200).engine.config.max_num_batched_tokens == 2048
    huge = LLM.for_single_request(loaded, 40_000).engine.config.max_num_batched_tokens
    assert huge == 16_384
    # (The tiny model's context is 256 tokens: its longest prompt, greedy, against the reference.)
    llm = LLM.for_single_request(loaded, 253)
    prompt = [(7 * i) % 90 + 3 for i in range(250)]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert out[0].outputs[0].token_ids == ref.greedy(prompt, 3)
