"""A model on cuda:1 serves exactly as on cuda:0: its kernels, CUDA graphs and the engine thread
stay on the device it was loaded on, whatever the calling thread's current device is (every new
thread starts on device 0, and Triton launches on the current device).

cuda lane with two GPUs or more (skipped otherwise).
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from model_helpers import random_weights, tiny_config, write_checkpoint

from rustinfer.engine.async_engine import AsyncEngine
from rustinfer.engine.core import EngineConfig, EngineCore
from rustinfer.engine.sampling_params import SamplingParams
from rustinfer.llm import LLM
from rustinfer.runtime.loading import load_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]

PROMPT = [1, 5, 17, 42, 3, 88, 9, 60, 61, 62, 7, 7, 7, 30, 31, 95, 4, 50, 11, 12, 13, 14, 80]
# Three prompts at once: batched decode steps replay the graphs of sizes 4, 2 and 1 as they end.
PROMPTS = [PROMPT, PROMPT[:7], PROMPT[3:18]]
PARAMS = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (24, 9, 17)]
ENGINE = {"max_num_seqs": 4, "kv_cache_bytes": 64 << 20}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny Llama at shapes the Triton kernels take (head_dim 64, GQA 2), random weights."""
    cfg = tiny_config(kv_heads=2, layers=3)
    cfg.update(vocab_size=512, hidden_size=256, intermediate_size=384, num_attention_heads=4,
               head_dim=64, max_position_embeddings=1024)  # fmt: skip
    return str(write_checkpoint(tmp_path_factory.mktemp("m"), cfg, random_weights(cfg, seed=3)))


def _greedy(llm: LLM) -> list[list[int]]:
    graphs = llm.engine.runner.graphs
    assert graphs is not None, "bf16 decode should replay CUDA graphs"
    replays = graphs.replays  # the engine's warm-up replayed some already
    outs = llm.generate(PROMPTS, PARAMS)
    assert graphs.replays - replays >= PARAMS[0].max_tokens - 1
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def on_cuda0(checkpoint: str) -> list[list[int]]:
    return _greedy(LLM(checkpoint, device="cuda:0", dtype="bfloat16", **ENGINE))


def test_cuda1_from_the_callers_thread_matches_cuda0(checkpoint: str, on_cuda0: list[list[int]]):
    # The caller's thread stays on device 0 throughout: loading, graph capture, warm-up and every
    # step (LLM runs the engine in the caller's thread) must still run on GPU 1.
    assert torch.cuda.current_device() == 0
    allocated_on_0 = torch.cuda.memory_allocated(0)
    llm = LLM(checkpoint, device="cuda:1", dtype="bfloat16", **ENGINE)
    assert {p.device for p in llm.loaded.model.parameters()} == {torch.device("cuda:1")}
    assert _greedy(llm) == on_cuda0
    assert torch.cuda.memory_allocated(0) == allocated_on_0, "the cuda:1 engine allocated on GPU 0"
    assert torch.cuda.current_device() == 0, "the caller's current device was changed"


async def _collect(engine: AsyncEngine, prompt: list[int], params: SamplingParams) -> list[int]:
    tokens: list[int] = []
    async for out in engine.generate(prompt, params):
        tokens.extend(out.new_token_ids)
    return tokens


def test_async_engine_thread_on_cuda1_matches_cuda0(checkpoint: str, on_cuda0: list[list[int]]):
    # The engine thread is a new thread (current device 0 until the engine sets its own).
    loaded = load_model(checkpoint, device="cuda:1", dtype="bfloat16")
    core = EngineCore(loaded, EngineConfig(**ENGINE))
    assert core.runner.graphs is not None
    replays = core.runner.graphs.replays
    allocated_on_0 = torch.cuda.memory_allocated(0)

    async def run() -> list[list[int]]:
        async with AsyncEngine(core) as engine:
            jobs = (_collect(engine, p, s) for p, s in zip(PROMPTS, PARAMS, strict=True))
            return list(await asyncio.gather(*jobs))

    assert asyncio.run(run()) == on_cuda0
    assert core.runner.graphs.replays - replays >= PARAMS[0].max_tokens - 1
    assert torch.cuda.memory_allocated(0) == allocated_on_0, "the cuda:1 engine allocated on GPU 0"
