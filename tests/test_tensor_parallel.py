"""Tensor parallelism on the CPU (gloo): the shard plan, greedy tokens at TP=2 and TP=3 equal to
one rank's on SmolLM2, and the faults (a worker that dies or hangs, a driver that dies)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import torch

from rustinfer.config import ModelConfig
from rustinfer.distributed.parallel import DecoderShards, TensorParallel, even_range
from rustinfer.distributed.workers import LoadSpec, TensorParallelGroup, load_tensor_parallel
from rustinfer.engine.core import EngineConfig, EngineCore
from rustinfer.engine.model_runner import ScheduledSequence
from rustinfer.engine.sampling_params import SamplingParams
from rustinfer.errors import ModelLoadError
from rustinfer.runtime.loading import load_model

# The embedded SmolLM2-135M (9 query heads, 3 KV heads), dense float32 so every rank shards it.
SPEC = LoadSpec(None, "cpu", "float32", quantization="none", threads=1)
PROMPTS = [
    [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3398, 2, 198],
    [1, 4093, 314, 260, 3575, 282, 4649, 47, 2],
    [1, 504, 3458, 314, 2987, 30, 657, 314, 253, 2556, 8626, 1135, 351, 253, 3412, 282, 5749, 28],
]
NEW_TOKENS = 12


def _config(hq: int, hkv: int, vocab: int = 49152, inter: int = 1536) -> ModelConfig:
    return ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=vocab,
        hidden_size=64 * hq,
        intermediate_size=inter,
        num_hidden_layers=2,
        num_attention_heads=hq,
        num_key_value_heads=hkv,
        head_dim=64,
    )


def test_even_range_covers_everything_once():
    for total, size in [(10, 3), (9, 2), (1536, 2), (7, 7)]:
        runs = [even_range(total, r, size) for r in range(size)]
        assert runs[0][0] == 0 and runs[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(runs, runs[1:], strict=False))


@pytest.mark.parametrize(
    "hq, hkv, size, q_heads, kv_heads",
    [
        (9, 3, 2, [(0, 3), (3, 9)], [(0, 1), (1, 3)]),  # SmolLM2-135M: uneven KV groups
        (9, 3, 3, [(0, 3), (3, 6), (6, 9)], [(0, 1), (1, 2), (2, 3)]),
        (32, 8, 2, [(0, 16), (16, 32)], [(0, 4), (4, 8)]),  # Llama-3.1-8B
        (32, 8, 16, [(2 * r, 2 * r + 2) for r in range(16)], [(r // 2, r // 2 + 1) for r in range(16)]),
        (4, 2, 4, [(r, r + 1) for r in range(4)], [(r // 2, r // 2 + 1) for r in range(4)]),
    ],
)  # fmt: skip
def test_heads_split_by_kv_group(hq, hkv, size, q_heads, kv_heads):
    plans = [DecoderShards.plan(_config(hq, hkv), r, size) for r in range(size)]
    assert [p.q_heads for p in plans] == q_heads
    assert [p.kv_heads for p in plans] == kv_heads
    for p in plans:  # a rank's query heads read only its own KV heads
        group = hq // hkv
        assert {h // group for h in range(*p.q_heads)} <= set(range(*p.kv_heads))


@pytest.mark.parametrize("hq, hkv, size", [(9, 3, 4), (9, 3, 6), (32, 8, 12)])
def test_sizes_the_heads_do_not_allow_are_refused(hq, hkv, size):
    with pytest.raises(ModelLoadError, match=f"tensor-parallel size {size} does not fit"):
        DecoderShards.plan(_config(hq, hkv), 0, size)


def test_vocabulary_shards_are_padded_to_one_size():
    plans = [DecoderShards.plan(_config(3, 3, vocab=10), r, 3) for r in range(3)]
    assert [p.vocab for p in plans] == [(0, 4), (4, 8), (8, 10)]
    assert {p.vocab_rows for p in plans} == {4}
    full = torch.arange(10 * 3, dtype=torch.float32).view(10, 3)
    rows, start = plans[2].take("model.embed_tokens.weight", full, 64)
    assert start == 0 and rows.shape == (4, 3)
    assert torch.equal(rows[:2], full[8:]) and not rows[2:].any()


def test_one_rank_is_the_identity():
    tp = TensorParallel()
    x = torch.randn(3, 4)
    assert tp.all_reduce(x) is x and tp.all_gather_columns(x) is x
    with pytest.raises(ValueError, match="needs a process group"):
        TensorParallel(0, 2)


def _greedy(loaded, n: int = NEW_TOKENS) -> dict[str, list[int]]:
    """Every prompt at once through the engine (a mixed batch: prefills beside decodes)."""
    core = EngineCore(loaded, EngineConfig(max_num_seqs=8))
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        core.add_request(f"r{i}", prompt, params)
    out: dict[str, list[int]] = {}
    while core.has_unfinished():
        for o in core.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return out


@pytest.fixture(scope="module")
def one_rank():
    torch.set_num_threads(1)
    return load_model(None, "cpu", "float32", quantization="none")


@pytest.fixture(scope="class")
def two_ranks():
    """SmolLM2 at TP=2, shared by the tests that only drive it (starting a group costs seconds)."""
    loaded = load_tensor_parallel(SPEC, 2, timeout_s=120, failure_exit_s=None)
    yield loaded
    loaded.parallel.close()


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    """A small random Llama (6 query heads over 3 KV heads: N = 2 and 3 both fit) for the
    tests about processes, not numbers."""
    from model_helpers import random_weights, tiny_config, write_checkpoint

    cfg = tiny_config(kv_heads=3)
    return str(write_checkpoint(tmp_path_factory.mktemp("tiny"), cfg, random_weights(cfg, seed=9)))


def _tiny_spec(path: str) -> LoadSpec:
    return LoadSpec(path, "cpu", "float64", threads=1)


TINY_PROMPT = [1, 5, 17, 42, 3, 88, 9, 60, 61, 62, 7]


def _check_greedy_and_logits(one_rank, loaded) -> None:
    assert loaded.model.num_kv_heads < one_rank.model.num_kv_heads
    assert _greedy(loaded) == _greedy(one_rank)
    # The logits themselves: the all-gathered vocabulary of a prompt's step against one rank's.
    step = [ScheduledSequence(PROMPTS[0], 0, list(range(4)))]
    ref = EngineCore(one_rank, EngineConfig(max_num_seqs=2)).runner.execute(step)
    got = EngineCore(loaded, EngineConfig(max_num_seqs=2)).runner.execute(step)
    assert got.shape == ref.shape == (1, one_rank.config.vocab_size)
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=2e-4)


def test_greedy_tokens_at_tp3_equal_one_rank(one_rank):
    loaded = load_tensor_parallel(SPEC, 3, timeout_s=120, failure_exit_s=None)
    group = loaded.parallel
    try:
        _check_greedy_and_logits(one_rank, loaded)
    finally:
        group.close()
    assert all(w.exitcode == 0 for w in group.workers)  # stopped cleanly, nothing left behind


class TestTwoRanks:
    """SmolLM2 at TP=2, one group for the class (a process holds one group at a time)."""

    def test_greedy_tokens_equal_one_rank(self, one_rank, two_ranks):
        _check_greedy_and_logits(one_rank, two_ranks)

    def test_prefix_hits_and_preemption_run_the_same(self, one_rank, two_ranks):
        _check_prefix_hits_and_preemption(one_rank, two_ranks)


def _wait(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_worker_that_dies_fails_the_engine_at_once(tiny_path):
    loaded = load_tensor_parallel(_tiny_spec(tiny_path), 3, timeout_s=120, failure_exit_s=None)
    group = loaded.parallel
    heard: list[str] = []
    group.on_failure(heard.append)
    try:
        core = EngineCore(loaded, EngineConfig(max_num_seqs=2, max_model_len=128))
        core.add_request("a", TINY_PROMPT, SamplingParams(temperature=0, max_tokens=50))
        core.step()
        os.kill(group.workers[0].pid, signal.SIGKILL)
        assert _wait(lambda: heard, 10), "the monitor did not notice the dead worker"
        assert "rank 1" in heard[0] and "exited with code -9" in heard[0]
        # The other worker is stopped too, and the engine says why instead of hanging.
        assert _wait(lambda: not any(w.is_alive() for w in group.workers), 15)
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="rank 1 .* exited"):
            while core.has_unfinished():
                core.step()
        assert time.monotonic() - started < 5
    finally:
        group.close()


def test_a_hung_worker_times_out_the_step(tiny_path):
    loaded = load_tensor_parallel(_tiny_spec(tiny_path), 2, timeout_s=6, failure_exit_s=None)
    group = loaded.parallel
    worker = group.workers[0]
    try:
        core = EngineCore(loaded, EngineConfig(max_num_seqs=2, max_model_len=128))
        os.kill(worker.pid, signal.SIGSTOP)  # alive, but never answers
        core.add_request("a", TINY_PROMPT, SamplingParams(temperature=0, max_tokens=4))
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="did not take command|across the ranks failed"):
            while core.has_unfinished():
                core.step()
        assert time.monotonic() - started < 30
        # The group is broken for good: marked failed, its worker stopped, the next step refused.
        assert _wait(lambda: group.failed is not None, 10)
        assert "tensor-parallel step failed" in group.failed
        assert _wait(lambda: not worker.is_alive(), 15)
        core.add_request("b", TINY_PROMPT, SamplingParams(temperature=0, max_tokens=2))
        with pytest.raises(RuntimeError, match="tensor-parallel step failed"):
            core.step()
    finally:
        if worker.is_alive():
            os.kill(worker.pid, signal.SIGCONT)
        group.close()
    assert not worker.is_alive()


def test_workers_die_with_their_driver(tmp_path):
    # A driver killed without any chance to clean up (SIGKILL) takes its workers with it.
    script = textwrap.dedent(
        """
        import sys, time
        from rustinfer.distributed.workers import LoadSpec, TensorParallelGroup
        group = TensorParallelGroup(LoadSpec(None, "cpu", "float32", quantization="none",
                                             threads=1), 3, timeout_s=120)
        print(" ".join(str(w.pid) for w in group.workers), flush=True)
        time.sleep(600)
        """
    )
    driver = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        pids = [int(p) for p in driver.stdout.readline().split()]
        assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
    finally:
        driver.kill()
        driver.wait()
    assert _wait(lambda: not any(_alive(p) for p in pids), 15), "orphan workers survived"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_quantized_weights_and_one_process_group_are_refused():
    with pytest.raises(ModelLoadError, match="--quantization gguf keeps them quantized"):
        load_tensor_parallel(
            LoadSpec(None, "cpu", "float32", quantization="gguf", threads=1),
            2,
            timeout_s=60,
            failure_exit_s=None,
        )
    with pytest.raises(ValueError, match="at least 2 ranks"):
        TensorParallelGroup(SPEC, 1)


def test_a_checkpoint_with_biases_and_an_odd_vocabulary_shards_exactly(tmp_path):
    """A safetensors Llama (float32 on disk, run in float64: each shard converts only its slice)
    with q/k/v/o and MLP biases, an untied LM head and 97 vocabulary rows (shards of 49, the last
    padded): TP=2's logits equal one rank's up to summation order."""
    from model_helpers import random_weights, tiny_config, write_checkpoint

    cfg = tiny_config(kv_heads=2)
    cfg.update(attention_bias=True, mlp_bias=True)
    path = str(write_checkpoint(tmp_path / "m", cfg, random_weights(cfg, seed=5)))
    assert any(name.endswith("o_proj.bias") for name in random_weights(cfg))
    one = load_model(path, "cpu", "float64")
    two = load_tensor_parallel(
        LoadSpec(path, "cpu", "float64", threads=1), 2, timeout_s=120, failure_exit_s=None
    )
    try:
        engine = EngineConfig(max_num_seqs=2, max_model_len=64)
        step = [ScheduledSequence([1, 5, 17, 42, 3, 88, 9, 60, 61, 62, 7], 0, [0, 1, 2])]
        ref = EngineCore(one, engine).runner.execute(step)
        got = EngineCore(two, engine).runner.execute(step)
        assert got.shape == ref.shape == (1, 97)
        torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)
    finally:
        two.parallel.close()


@pytest.mark.parametrize("kv_heads, size", [(4, 4), (2, 4)], ids=["kv-split", "kv-replicated"])
def test_four_ranks_split_or_replicate_the_kv_heads(tmp_path, kv_heads, size):
    """N = 4 on gloo: 8 query heads over 4 KV heads (one each) or over 2 (each KV head held by
    the two ranks whose query heads read it): logits equal one rank's."""
    from model_helpers import random_weights, tiny_config, write_checkpoint

    cfg = tiny_config(kv_heads=kv_heads)
    cfg.update(num_attention_heads=8, hidden_size=64, intermediate_size=96)
    path = str(write_checkpoint(tmp_path / "m", cfg, random_weights(cfg, seed=7)))
    one = load_model(path, "cpu", "float64")
    many = load_tensor_parallel(
        LoadSpec(path, "cpu", "float64", threads=1), size, timeout_s=120, failure_exit_s=None
    )
    try:
        assert many.model.num_q_heads == 2 and many.model.num_kv_heads == 1
        engine = EngineConfig(max_num_seqs=2, max_model_len=64)
        step = [ScheduledSequence([1, 5, 17, 42, 3, 88, 9, 60, 61, 62, 7], 0, [0, 1, 2])]
        ref = EngineCore(one, engine).runner.execute(step)
        got = EngineCore(many, engine).runner.execute(step)
        torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)
    finally:
        many.parallel.close()


def test_torchrun_launch_generates_as_one_rank(tmp_path):
    """``torchrun --nproc-per-node 2 -m rustinfer generate``: rank 0 runs the command, rank 1
    holds its shard; the greedy tokens are one process's."""
    flags = ["generate", "--device", "cpu", "--threads", "1", "--quantization", "none",
             "--dtype", "float32", "--max-tokens", "12", "--temperature", "0", "--json",
             "What is the capital of France?"]  # fmt: skip
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "-m", "rustinfer", *flags],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert launched.returncode == 0, launched.stderr[-3000:]
    alone = subprocess.run(
        [sys.executable, "-m", "rustinfer", *flags],
        capture_output=True, text=True, timeout=300, check=True, cwd=tmp_path,
    )  # fmt: skip
    lines = [json.loads(x) for x in launched.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1, launched.stdout  # only rank 0 answers
    assert lines[0]["token_ids"] == json.loads(alone.stdout.splitlines()[-1])["token_ids"]


def test_a_bad_step_fails_on_every_rank_and_the_next_one_runs(tiny_path):
    """A step every rank rejects before any collective (a block table too short) is an error for
    the engine, not a broken group: the ranks stay in step and the next step runs."""
    two = load_tensor_parallel(_tiny_spec(tiny_path), 2, timeout_s=60, failure_exit_s=None)
    try:
        runner = EngineCore(two, EngineConfig(max_num_seqs=2, max_model_len=64)).runner
        with pytest.raises(ValueError, match="block table covers"):
            runner.execute([ScheduledSequence(list(range(1, 40)), 0, [0])])
        good = [ScheduledSequence([1, 5, 17, 42], 0, [0])]
        ref = EngineCore(load_model(tiny_path, "cpu", "float64"), EngineConfig(max_model_len=64))
        torch.testing.assert_close(
            runner.execute(good), ref.runner.execute(good), atol=1e-10, rtol=1e-10
        )
        assert two.parallel.failed is None and all(w.is_alive() for w in two.parallel.workers)
    finally:
        two.parallel.close()


def test_the_python_api_takes_a_tensor_parallel_size(tiny_path):
    from rustinfer.llm import LLM

    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    options = {"device": "cpu", "dtype": "float64", "max_model_len": 128}
    llm = LLM(tiny_path, tensor_parallel_size=2, **options)
    try:
        got = llm.generate([TINY_PROMPT], params)[0].outputs[0].token_ids
    finally:
        llm.loaded.parallel.close()
    alone = LLM(tiny_path, **options)
    assert got == alone.generate([TINY_PROMPT], params)[0].outputs[0].token_ids


def _take_commands(name: str, reader: int, count: int, out) -> None:  # a spawned reader
    from rustinfer.distributed.channel import CommandChannel

    channel = CommandChannel.attach(name, 2)
    out.put([channel.receive(reader, 30.0, lambda: True) for _ in range(count)])
    channel.close()


def test_the_command_channel_hands_every_reader_every_command_in_order():
    import multiprocessing as mp

    from rustinfer.distributed.channel import CommandChannel

    channel = CommandChannel.create(2, capacity=1 << 16)
    context = mp.get_context("spawn")
    out = context.Queue()
    readers = [
        context.Process(target=_take_commands, args=(channel.name, r, 4, out)) for r in (1, 2)
    ]
    for p in readers:
        p.start()
    commands = [("runner", 1, 2), ("execute", [ScheduledSequence([5, 6], 3, [0])], None, None),
                ("execute", list(range(5000)), (4,), torch.int64), ("stop",)]  # fmt: skip
    try:
        for command in commands:  # each waits until both readers took the one before
            channel.send(command, 30.0, lambda: True)
        got = [out.get(timeout=60), out.get(timeout=60)]
    finally:
        for p in readers:
            p.join(timeout=30)
        channel.close()
    assert got == [commands, commands]


def test_the_command_channel_fails_clearly():
    from rustinfer.distributed.channel import ChannelError, CommandChannel

    channel = CommandChannel.create(1, capacity=64)
    try:
        with pytest.raises(ChannelError, match="exceeds the channel's 64"):
            channel.send(list(range(100)), 1.0, lambda: True)
        channel.send(("runner",), 1.0, lambda: True)  # nobody takes it
        with pytest.raises(ChannelError, match="did not take command 1 within"):
            channel.send(("warm_up",), 0.3, lambda: True)
        started = time.monotonic()
        with pytest.raises(ChannelError):  # a dead reader ends the wait at once
            channel.send(("warm_up",), 30.0, lambda: False)
        assert time.monotonic() - started < 5
    finally:
        channel.close()


def _check_prefix_hits_and_preemption(one_rank, two_ranks) -> None:
    """A pool of 12 blocks for six requests that share a 40-token prefix: some start from cached
    blocks, some are preempted and recomputed; TP=2 makes one rank's tokens, with the same
    number of blocks (each rank's budget counts its own KV heads)."""
    from rustinfer.engine.model_runner import kv_bytes_per_block

    shared = PROMPTS[2] * 2 + PROMPTS[0][:4]  # 40 tokens
    prompts = [shared + [100 + i, 200 + i] for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    def run(loaded) -> tuple[dict[str, list[int]], int, int]:
        budget = 12 * kv_bytes_per_block(loaded.model, 16)
        core = EngineCore(loaded, EngineConfig(max_num_seqs=6, kv_cache_bytes=budget))
        for i, prompt in enumerate(prompts):
            core.add_request(f"r{i}", prompt, params)
        out: dict[str, list[int]] = {}
        while core.has_unfinished():
            for o in core.step():
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
        return out, core.scheduler.num_preemptions, core.blocks.num_blocks

    expected, preempted, blocks = run(one_rank)
    assert preempted > 0 and blocks == 12
    got, preempted_tp, blocks_tp = run(two_ranks)
    assert blocks_tp == 12 and preempted_tp == preempted
    assert got == expected
