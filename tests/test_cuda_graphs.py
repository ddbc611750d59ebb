"""Decode steps replayed from CUDA graphs: the same tokens as eager steps, padding never leaks."""

from __future__ import annotations

import pytest
import torch
from model_helpers import random_weights, tiny_config, write_checkpoint

from rustinfer.engine.core import EngineConfig, EngineCore
from rustinfer.engine.cuda_graphs import graph_batch_sizes
from rustinfer.engine.sampling_params import SamplingParams
from rustinfer.runtime.loading import load_model

no_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def test_graph_batch_sizes_cover_every_batch_up_to_the_largest():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(5) == [1, 2, 4, 5]
    sizes = graph_batch_sizes(256)
    assert sizes[:6] == [1, 2, 4, 8, 16, 24] and sizes[-1] == 256
    assert sizes == sorted(set(sizes))
    for n in range(1, 257):  # every batch pads to a captured size at most 25% larger past 64
        pad = next(s for s in sizes if s >= n)
        assert pad - n <= max(n // 4, 8)


def kernel_config() -> dict:
    """Shapes the Triton kernels take (head_dim 64, GQA 2), small enough to run in seconds."""
    cfg = tiny_config(kv_heads=2, layers=3)
    cfg.update(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=384,
        num_attention_heads=4,
        head_dim=64,
        max_position_embeddings=1024,
    )
    return cfg


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    cfg = kernel_config()
    path = write_checkpoint(tmp_path_factory.mktemp("m"), cfg, random_weights(cfg, seed=3))
    return load_model(str(path), device="cuda", dtype="bfloat16")


def greedy_tokens(loaded, prompts, eager: bool, max_tokens: int = 24) -> dict[str, list[int]]:
    core = EngineCore(loaded, EngineConfig(max_num_seqs=16, enforce_eager=eager))
    assert (core.runner.graphs is None) == eager
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        core.add_request(f"r{i}", p, params)
    out: dict[str, list[int]] = {}
    while core.has_unfinished():
        for o in core.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    if not eager:
        assert core.runner.graphs.replays >= max_tokens - 1
    return out


def prompts_of(count: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(count)
    return [
        torch.randint(3, 500, (int(n),), generator=gen).tolist()
        for n in torch.randint(5, 90, (count,), generator=gen)
    ]


@pytest.mark.cuda
@no_gpu
@pytest.mark.parametrize("batch", [1, 4, 5, 8, 13])
def test_graphed_greedy_equals_eager_greedy(bf16_model, batch):
    prompts = prompts_of(batch)  # 5 and 13 pad to 8 and 16: padding rows must not leak
    assert greedy_tokens(bf16_model, prompts, eager=False) == greedy_tokens(
        bf16_model, prompts, eager=True
    )


@pytest.mark.cuda
@no_gpu
def test_back_to_back_replays_without_a_sync_see_their_own_inputs(bf16_model):
    """Nothing between two steps reads the device (no sampling): each replay must still see the
    inputs of its own step, not the next one's written into the pinned buffers meanwhile."""
    from rustinfer.engine.model_runner import ScheduledSequence

    eager = EngineCore(bf16_model, EngineConfig(max_num_seqs=4, enforce_eager=True)).runner
    graphed = EngineCore(bf16_model, EngineConfig(max_num_seqs=4)).runner
    prompt = prompts_of(1)[0]
    table = list(range(12))  # room for a 90-token prompt and 40 more
    outs = {}
    for name, runner in (("eager", eager), ("graphed", graphed)):
        rows = [runner.execute([ScheduledSequence(prompt, 0, table)]).clone()]
        for i in range(40):
            step = [ScheduledSequence([11 + i], len(prompt) + i, table)]
            rows.append(runner.execute(step).clone())  # no .cpu(), no sync
        outs[name] = torch.cat(rows)
    assert torch.equal(outs["graphed"].argmax(-1), outs["eager"].argmax(-1))


@pytest.mark.cuda
@no_gpu
def test_graphed_logits_equal_eager_logits_for_one_step(bf16_model):
    """The same kernels on the same rows: a replay's logits match an eager step's closely."""
    from rustinfer.engine.model_runner import ScheduledSequence

    eager = EngineCore(bf16_model, EngineConfig(max_num_seqs=8, enforce_eager=True)).runner
    graphed = EngineCore(bf16_model, EngineConfig(max_num_seqs=8)).runner
    prompts = prompts_of(5)
    for runner in (eager, graphed):  # same block ids in both: each gets its own fresh cache
        for i, p in enumerate(prompts):
            runner.execute([ScheduledSequence(p, 0, list(range(i * 8, i * 8 + 8)))])
    step = [
        ScheduledSequence([7 + i], len(p), list(range(i * 8, i * 8 + 8)))
        for i, p in enumerate(prompts)
    ]
    expected = eager.execute(step).clone()
    replays = graphed.graphs.replays  # the load-time warm-up replays too
    got = graphed.execute(step)
    assert graphed.graphs.replays == replays + 1
    scale = expected.abs().max()
    assert scale > 1  # logits with scale: a wrong row cannot hide under the tolerance
    torch.testing.assert_close(got, expected, atol=0.02 * scale, rtol=0)
