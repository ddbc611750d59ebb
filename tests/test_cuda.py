"""The cuda lane: run on a GPU machine (skipped without one)."""

from __future__ import annotations

import pytest
import torch
from model_helpers import random_weights, tiny_config, write_checkpoint

from rustinfer.config import config_from_hf
from rustinfer.engine.sampling_params import SamplingParams
from rustinfer.llm import LLM
from rustinfer.models.reference import ReferenceLlama
from rustinfer.plugins import get_registries
from rustinfer.runtime.loading import load_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

PROMPT = [1, 5, 17, 42, 3, 88, 9, 60, 61, 62, 7, 7, 7, 30, 31, 95, 4, 50, 11, 12, 13, 14, 80]


def test_every_op_has_a_cuda_implementation_and_cpu_never_gets_it():
    regs = get_registries()
    for op in ("rmsnorm", "attention_decode", "linear"):
        impl = regs.ops.lookup(op, "cuda", torch.bfloat16, overrides={})
        assert impl.device == "cuda"
        assert regs.ops.lookup(op, "cpu", torch.bfloat16, overrides={}).device == "cpu"


@pytest.mark.parametrize("rope_scaling", [False, True])
def test_tiny_model_on_cuda_matches_reference(tmp_path, rope_scaling):
    cfg = tiny_config(rope_scaling=rope_scaling)
    weights = random_weights(cfg)
    path = write_checkpoint(tmp_path / "m", cfg, weights)
    loaded = load_model(str(path), device="cuda", dtype="float32")
    assert next(loaded.model.parameters()).device.type == "cuda"
    ref = ReferenceLlama(config_from_hf(cfg), weights)
    # Greedy ids over the paged cache on the GPU equal the float64 oracle's (random weights at
    # this scale leave clear argmax margins).
    llm = LLM.for_single_request(loaded, len(PROMPT) + 12)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    tokens = [t for out in llm.stream(PROMPT, params) for t in out.new_token_ids]
    assert tokens == ref.greedy(PROMPT, 12)


def test_bench_latency_on_cuda(tmp_path, capsys):
    from rustinfer.cli.main import main

    path = write_checkpoint(tmp_path / "m", tiny_config(), {})
    argv = ["bench", "latency", "--model", str(path / "config.json"), "--load-format", "dummy",
            "--device", "cuda", "--dtype", "bfloat16", "--input-len", "17", "--output-len", "9",
            "--iters", "1", "--json"]  # fmt: skip
    assert main(argv) == 0
    assert '"device": "cuda:0' in capsys.readouterr().out


def test_engine_sizes_kv_from_free_gpu_memory_and_batches(tmp_path):
    cfg = tiny_config()
    weights = random_weights(cfg)
    path = write_checkpoint(tmp_path / "m", cfg, weights)
    llm = LLM(str(path), device="cuda", dtype="float32", gpu_memory_utilization=0.02)
    free, _ = llm.loaded.device.memory_info()
    per_block = llm.engine.kv_capacity_tokens // llm.engine.blocks.num_blocks
    assert per_block == llm.engine.config.block_size
    # The pool took about 2% of what was free when the engine was built (free now excludes it).
    pool_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in llm.engine.runner.kv_caches)
    assert 0.01 * (free + pool_bytes) < pool_bytes < 0.03 * (free + pool_bytes)
    ref = ReferenceLlama(config_from_hf(cfg), weights)
    prompts = [PROMPT, PROMPT[:7], PROMPT[3:18]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == [ref.greedy(p, 6) for p in prompts]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logits_keep_the_float32_accumulator(dtype):
    """The LM head's output is float32 straight from the accumulator: within float32 rounding of
    the float64 reference, where a result rounded through bf16/fp16 first would be off by its
    input dtype's spacing."""
    from rustinfer.ops import SPECS

    regs = get_registries()
    impl = regs.ops.lookup("logits", "cuda", dtype, overrides={}).load()
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 576, generator=gen) * 3).to(dtype).cuda()
    w = (torch.randn(4999, 576, generator=gen) * 576**-0.5).to(dtype).cuda()
    out = impl(x, w)
    assert out.dtype == torch.float32
    ref = SPECS["logits"].reference(x, w).cuda()
    rel = ((out.double() - ref).abs() / ref.abs().clamp_min(1.0)).max().item()
    assert rel < 2.0**-14, rel  # bf16 rounding alone would leave up to 2^-9


def test_seeded_noise_on_a_row_of_the_batch_equals_a_draw_of_its_own():
    # The sampler draws a seeded row's exponential noise straight into its row of the batch's
    # noise: the values must be those of a fresh [V] tensor (what the row gets alone), at any
    # row offset and width (alignment, vectorized tails).
    for vocab in (49152, 128256, 1001):
        for row in (0, 1, 5):
            alone = torch.empty(vocab, device="cuda")
            alone.exponential_(generator=torch.Generator("cuda").manual_seed(7))
            batch = torch.empty(6, vocab, device="cuda")
            batch[row].exponential_(generator=torch.Generator("cuda").manual_seed(7))
            assert torch.equal(batch[row], alone), (vocab, row)
