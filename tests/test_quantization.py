"""Quantized matmul weights end to end: GGUF tensors kept as shipped, float checkpoints quantized
at load (int8/int4), the packing into fused QKV and gate/up, and the errors for what cannot work."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from loader_helpers import PROJECTION_DIMS, TINY_LLAMA, permute_like_llama_cpp, write_gguf
from model_helpers import prefill_logits, random_weights, tiny_config, write_checkpoint

from rustinfer.config import QuantizationConfig
from rustinfer.errors import ModelLoadError
from rustinfer.loaders import load_model_source
from rustinfer.ops.quant import QuantizedWeight
from rustinfer.registry import RegistryError
from rustinfer.runtime.loading import load_model

QT = gguf.GGMLQuantizationType
GGUF = QuantizationConfig("gguf")


def _dim(hp: dict[str, int], key: str) -> int:
    return hp[key] * hp["head_dim"] if key in ("heads", "kv_heads") else hp[key]


def tiny_llama_tensors(kinds: dict[str, QT], seed: int = 0) -> dict[str, tuple[np.ndarray, QT]]:
    """A whole tiny Llama in GGUF spelling; projection ``p`` stored as ``kinds.get(p, Q4_1)``,
    the embedding as Q8_0 (as SmolLM2 ships), Q and K rows permuted like llama.cpp's converter."""
    hp, rng = TINY_LLAMA, np.random.default_rng(seed)
    tensors: dict[str, tuple[np.ndarray, QT]] = {
        "token_embd.weight": (rng.standard_normal((hp["vocab"], hp["hidden"])), QT.Q8_0),
        "output_norm.weight": (1 + 0.1 * rng.standard_normal(hp["hidden"]), QT.F32),
    }
    for i in range(hp["layers"]):
        for name, (rows, cols) in PROJECTION_DIMS.items():
            n, k = _dim(hp, rows), _dim(hp, cols)
            w = rng.standard_normal((n, k)) / k**0.5
            if name in ("attn_q", "attn_k"):
                w = permute_like_llama_cpp(w, hp["heads" if name == "attn_q" else "kv_heads"])
            tensors[f"blk.{i}.{name}.weight"] = (w, kinds.get(name, QT.Q4_1))
        for norm in ("attn_norm", "ffn_norm"):
            tensors[f"blk.{i}.{norm}.weight"] = (
                1 + 0.1 * rng.standard_normal(hp["hidden"]),
                QT.F32,
            )
    return {k: (v.astype(np.float32), kind) for k, (v, kind) in tensors.items()}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    kinds = {"attn_q": QT.Q4_0, "attn_k": QT.Q4_0, "attn_v": QT.Q4_0, "attn_output": QT.Q8_0}
    return write_gguf(tmp_path_factory.mktemp("q") / "tiny.gguf", tiny_llama_tensors(kinds))


def test_gguf_projections_stay_quantized_and_equal_the_dequantized_path(tiny_gguf) -> None:
    source = load_model_source(tiny_gguf)
    kept = dict(source.weights(torch.float32, GGUF))
    floats = dict(source.weights(torch.float32))
    formats = {"attn_q": "q4_0", "attn_output": "q8_0", "ffn_up": "q4_1"}
    for name, fmt in formats.items():
        weight = kept[f"blk.1.{name}.weight"]
        assert isinstance(weight, QuantizedWeight) and weight.format == fmt
        # Same values as today's dequantizing loader, Q rows un-permuted alike.
        assert torch.equal(weight.dequantize(torch.float32), floats[f"blk.1.{name}.weight"])
    # Q4 keeps half a byte per value plus a 2-byte scale (and min) per 32: not a float copy.
    assert kept["blk.0.attn_q.weight"].nbytes == 64 * 64 // 2 + 64 * 2 * 2
    # The embedding (a gather) and the norms arrive as float tensors.
    assert isinstance(kept["token_embd.weight"], torch.Tensor)
    assert torch.equal(kept["token_embd.weight"], floats["token_embd.weight"])


def test_model_packs_quantized_qkv_and_gate_up_and_matches_the_float_model(tiny_gguf) -> None:
    quantized = load_model(tiny_gguf, device="cpu", dtype="float32", quantization="gguf")
    dense = load_model(tiny_gguf, device="cpu", dtype="float32", quantization="none")
    assert quantized.quantization == "gguf" and dense.quantization == "none"
    model = quantized.model
    hp = TINY_LLAMA
    qkv, gate_up = model.layers_0_qkv_weight, model.layers_0_gate_up_weight
    assert isinstance(qkv, QuantizedWeight) and qkv.format == "q4_0"
    assert qkv.shape == ((hp["heads"] + 2 * hp["kv_heads"]) * hp["head_dim"], hp["hidden"])
    assert isinstance(gate_up, QuantizedWeight) and gate_up.shape == (2 * hp["ffn"], hp["hidden"])
    assert isinstance(model.layers_1_o_weight, QuantizedWeight)
    assert isinstance(model.embed_tokens, torch.nn.Parameter)
    ids = [3, 17, 5, 39, 0, 22, 8, 11, 30]
    got, want = prefill_logits(model, ids), prefill_logits(dense.model, ids)
    # Same weights; only the kernel's bf16 rounding of activations and scales differs.
    assert want.std() > 1.0  # logits with scale
    assert (got - want).abs().max() < 0.05 * want.std()
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_a_fused_matrix_of_mixed_types_is_dequantized(tmp_path) -> None:
    kinds = {"attn_q": QT.Q4_0, "attn_k": QT.Q8_0, "attn_v": QT.F16}
    path = write_gguf(tmp_path / "mixed.gguf", tiny_llama_tensors(kinds))
    loaded = load_model(path, device="cpu", dtype="float32", quantization="gguf")
    dense = load_model(path, device="cpu", dtype="float32", quantization="none")
    qkv = loaded.model.layers_0_qkv_weight
    assert isinstance(qkv, torch.nn.Parameter)
    assert torch.equal(qkv, dense.model.layers_0_qkv_weight)
    assert isinstance(loaded.model.layers_0_gate_up_weight, QuantizedWeight)


@pytest.mark.parametrize("method", ["int8", "int4", "int4-g64"])
def test_float_checkpoint_quantized_at_load(tmp_path, method: str) -> None:
    cfg = {**tiny_config(), "hidden_size": 64, "intermediate_size": 128, "head_dim": 16,
           "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
    folder = write_checkpoint(tmp_path / "m", cfg, random_weights(cfg))
    quantized = load_model(folder, device="cpu", dtype="float32", quantization=method)
    dense = load_model(folder, device="cpu", dtype="float32", quantization="none")
    assert quantized.quantization == (method if "-g" in method else f"{method}-g32")
    down = quantized.model.layers_1_down_weight
    assert isinstance(down, QuantizedWeight) and down.format == method[:4]
    assert down.group_size == (64 if "-g64" in method else 32)
    ids = list(range(3, 40, 3))
    got, want = prefill_logits(quantized.model, ids), prefill_logits(dense.model, ids)
    # int8 rounds each weight by <= absmax/254 of its group, int4 by <= span/30; on top, the CPU
    # kernel rounds activations to bf16 (the quantized_linear spec), which dominates for int8.
    # Measured (relative rms of the logits): int8 0.018, int4 0.24 (g32) and 0.21 (g64): random
    # Gaussian weights are int4's worst case (a group spans ~4 sigma, so a step is 0.27 sigma,
    # ~8% noise per matmul, compounding over 8 of them). A broken kernel gives ~1.4.
    bound = {"int8": 0.05, "int4": 0.4}[method[:4]]
    assert want.std() > 1.0
    relative_rms = ((got - want).pow(2).mean().sqrt() / want.std()).item()
    assert 0 < relative_rms < bound, relative_rms


def test_bfloat16_quantized_model_runs(tiny_gguf) -> None:
    loaded = load_model(tiny_gguf, device="cpu", dtype="bfloat16")  # auto: gguf for GGUF files
    assert loaded.quantization == "gguf"
    logits = prefill_logits(loaded.model, [1, 2, 3])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_unworkable_combinations_fail_clearly(tmp_path, tiny_gguf) -> None:
    folder = write_checkpoint(tmp_path / "m", tiny_config(), random_weights(tiny_config()))
    with pytest.raises(ModelLoadError, match="GGUF file's quantized tensors"):
        load_model(folder, device="cpu", quantization="gguf")
    with pytest.raises(ModelLoadError, match="unknown quantization"):
        load_model(tiny_gguf, device="cpu", quantization="int3")
    with pytest.raises(RegistryError, match="quantized_linear"):
        load_model(tiny_gguf, device="cpu", dtype="float16", quantization="gguf")
