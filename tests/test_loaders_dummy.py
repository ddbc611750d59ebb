"""Random "dummy" weights: deterministic, at the given shapes, norms near one."""

from __future__ import annotations

import json

import pytest
import torch

from rustinfer.errors import ModelLoadError
from rustinfer.loaders import dummy_source, dummy_weights, load_model_source

SHAPES = {
    "model.embed_tokens.weight": (257, 96),
    "model.layers.0.input_layernorm.weight": (96,),
    "model.layers.0.self_attn.q_proj.weight": (96, 96),
    "model.layers.0.self_attn.q_proj.bias": (96,),
    "blk.0.attn_norm.weight": (96,),
    "model.norm.weight": (96,),
}


def test_every_name_in_order_at_its_shape_and_dtype():
    got = list(dummy_weights(SHAPES, torch.bfloat16))
    assert [n for n, _ in got] == list(SHAPES)
    for name, tensor in got:
        assert tuple(tensor.shape) == SHAPES[name] and tensor.dtype == torch.bfloat16


def test_deterministic_per_seed_and_independent_of_order_and_subset():
    first = dict(dummy_weights(SHAPES, torch.float32, seed=7))
    again = dict(dummy_weights(SHAPES, torch.float32, seed=7))
    other = dict(dummy_weights(SHAPES, torch.float32, seed=8))
    name = "model.layers.0.self_attn.q_proj.weight"
    subset = dict(dummy_weights({name: SHAPES[name]}, torch.float32, seed=7))
    for key in SHAPES:
        assert torch.equal(first[key], again[key])
        assert not torch.equal(first[key], other[key])
    assert torch.equal(subset[name], first[name])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lower_precision_rounds_the_float32_draw(dtype):
    full = dict(dummy_weights(SHAPES, torch.float32, seed=3))
    low = dict(dummy_weights(SHAPES, dtype, seed=3))
    for name in SHAPES:
        assert torch.equal(low[name], full[name].to(dtype))


@pytest.mark.parametrize("std", [0.02, 0.5])
def test_scales_norms_near_one_everything_else_centred(std):
    got = dict(dummy_weights(SHAPES, torch.float64, std=std))
    for name, tensor in got.items():
        if name.endswith("norm.weight"):
            assert (tensor - 1).abs().max() < std  # 1 + N(0, std/10): > 10 sigma to exceed
        else:
            assert abs(tensor.mean().item()) < 5 * std / tensor.numel() ** 0.5
            assert tensor.std().item() == pytest.approx(std, rel=0.2)


def test_dummy_source_from_config_dict():
    raw = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 128,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    source = dummy_source(raw)
    assert source.path is None and source.format == "dummy" and source.tokenizer is None
    assert source.config.head_dim == 8 and source.num_tensors == 0
    with pytest.raises(ModelLoadError, match="dummy_weights"):
        next(source.weights(torch.float32))
    with pytest.raises(ModelLoadError, match="invalid model config"):
        dummy_source({"architectures": ["X"]})


def test_load_model_source_dummy_on_a_config_file(tmp_path):
    raw = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    path = tmp_path / "llama-1b.json"
    path.write_text(json.dumps(raw))
    source = load_model_source(path, load_format="dummy")
    assert source.format == "dummy" and source.path == path
    assert source.config.num_key_value_heads == 8 and source.config.rope_scaling.factor == 32.0
