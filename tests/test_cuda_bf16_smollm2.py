"""bf16 end to end on a real model: SmolLM2 through the Triton kernels against its float32 run.

Teacher forcing over a few hundred tokens of real text: every position's next-token distribution
in bf16 (prefill kernels; then decode steps, replayed from CUDA graphs and eagerly) is compared
with the float32 path's (plain torch kernels) at the same position. The bounds are what bf16
rounding leaves on a healthy model; a kernel that drops a key, a page or a head misses them by far.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from smollm2_helpers import (
    TEXT,
    all_position_logits,
    check,
    compare,
    decode_logits,
    engine,
    gguf_path,
)

from rustinfer.runtime.loading import LoadedModel, load_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


@pytest.fixture(scope="module")
def models() -> tuple[LoadedModel, LoadedModel]:
    path = gguf_path()
    if not Path(path).is_file():
        pytest.skip(f"SmolLM2 GGUF not found at {path}")
    return (
        load_model(path, "cuda", "float32", quantization="none"),
        load_model(path, "cuda", "bfloat16", quantization="none"),
    )


def test_bf16_prefill_follows_float32_over_real_text(models) -> None:
    fp32, bf16 = models
    ids = fp32.tokenizer.encode(TEXT)
    assert len(ids) >= 450
    ref = all_position_logits(engine(fp32, max_num_seqs=1).runner, ids)
    got = all_position_logits(engine(bf16, max_num_seqs=1).runner, ids)
    stats = compare(got, ref)
    print("\nprefill", stats)
    check(stats)


@pytest.mark.parametrize("eager", [False, True])
def test_bf16_decode_steps_follow_float32(models, eager: bool) -> None:
    fp32, bf16 = models
    ids = fp32.tokenizer.encode(TEXT)
    start = 24
    ref = all_position_logits(engine(fp32, max_num_seqs=1).runner, ids)
    core = engine(bf16, max_num_seqs=4, enforce_eager=eager)
    assert (core.runner.graphs is None) == eager
    got = decode_logits(core, ids, start)
    stats = compare(got, ref[start - 1 : len(ids) - 1])
    print("\ndecode", "eager" if eager else "graphs", stats)
    check(stats)
