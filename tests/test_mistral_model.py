"""Mistral on the Llama plugin: HF transformers fidelity, and sliding-window configs refused."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from hf_family_helpers import (
    PROMPT,
    PROMPTS,
    build_hf,
    check_float32_against_hf,
    check_float64_against_reference,
    hf_greedy,
    llm_greedy,
    reference_for,
    save_hf,
)
from loader_helpers import TINY_LLAMA, write_gguf

from rustinfer.errors import ModelLoadError
from rustinfer.llm import LLM
from rustinfer.runtime.loading import load_model

CONFIGS = {
    # Mistral-Nemo style: head_dim set on its own (12, where hidden / heads would be 10).
    "gqa2_head_dim12": dict(
        hidden_size=40,
        intermediate_size=46,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        sliding_window=None,
    ),
    # A window as long as the context never cuts anything off: plain causal attention.
    "gqa3_tied_full_window": dict(
        hidden_size=60,
        intermediate_size=34,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        sliding_window=256,
    ),
}


@pytest.fixture(params=list(CONFIGS), scope="module")
def checkpoint(request, tmp_path_factory):
    hf = build_hf("Mistral", seed=len(request.param), **CONFIGS[request.param])
    return hf, save_hf(hf, tmp_path_factory.mktemp(request.param))


def test_float32_logits_match_hf_transformers_and_reference(checkpoint):
    hf, path = checkpoint
    ours = check_float32_against_hf(path, hf, PROMPT)
    assert ours.config.architecture == "MistralForCausalLM"


def test_float64_model_matches_reference(checkpoint):
    hf, path = checkpoint
    check_float64_against_reference(path, hf, PROMPT)


def test_greedy_generation_matches_hf_generate(checkpoint):
    hf, path = checkpoint
    llm = LLM(str(path), device="cpu", dtype="float32", kv_cache_bytes=1 << 20)
    prompts = [PROMPT, PROMPTS[2]]
    assert llm_greedy(llm, prompts, 12) == [hf_greedy(hf, p, 12) for p in prompts]


def test_batched_paged_engine_equals_single_requests(checkpoint):
    hf, path = checkpoint
    llm = LLM(
        str(path),
        device="cpu",
        dtype="float64",
        block_size=4,
        max_num_batched_tokens=7,
        kv_cache_bytes=1 << 20,
    )
    batched = llm_greedy(llm, PROMPTS, 6)
    singles = [
        llm_greedy(LLM.for_single_request(llm.loaded, len(p) + 6), [p], 6)[0] for p in PROMPTS
    ]
    assert batched == singles == [reference_for(path, hf).greedy(p, 6) for p in PROMPTS]


def test_active_sliding_window_is_refused_naming_the_setting(tmp_path):
    # Mistral 7B v0.1's shape of config: a 4096 window in a 32768 context, here 16 in 256.
    settings = dict(CONFIGS["gqa2_head_dim12"], sliding_window=16)
    path = save_hf(build_hf("Mistral", **settings), tmp_path / "m")
    with pytest.raises(
        ModelLoadError,
        match=r"MistralForCausalLM config sets sliding_window=16, smaller than "
        r"max_position_embeddings=256: sliding-window attention is not supported yet",
    ):
        load_model(str(path), device="cpu", dtype="float32")
    # The dummy format builds the model class too: refused the same way.
    with pytest.raises(ModelLoadError, match=r"sliding_window=16"):
        load_model(str(path / "config.json"), device="cpu", load_format="dummy")


def test_gguf_sliding_window_is_refused(tmp_path):
    # llama.cpp converts Mistral to the "llama" architecture; a window it states is honoured.
    norm = np.ones(TINY_LLAMA["hidden"], dtype=np.float32)
    window = {"llama.attention.sliding_window": (16, gguf.GGUFValueType.UINT32)}
    path = write_gguf(
        tmp_path / "m.gguf",
        {"output_norm.weight": (norm, gguf.GGMLQuantizationType.F32)},
        extra=window,
    )
    with pytest.raises(ModelLoadError, match=r"llama config sets sliding_window=16"):
        load_model(str(path), device="cpu", dtype="float32")
