"""Llama 3 plugin against the float64 reference model and against HF transformers."""

from __future__ import annotations

import pytest
import torch
from model_helpers import (
    incremental_logits,
    prefill_logits,
    random_weights,
    tiny_config,
    write_checkpoint,
)

from rustinfer.config import config_from_hf
from rustinfer.errors import ModelLoadError, UnsupportedArchitectureError
from rustinfer.models.reference import ReferenceLlama
from rustinfer.runtime.loading import load_model

PROMPT = [1, 5, 17, 42, 3, 88, 9, 60, 61, 62, 7, 7, 7, 30, 31, 95, 4, 50, 11, 12, 13, 14, 80]

CONFIGS = {
    "plain": dict(),
    "rope_scaling": dict(rope_scaling=True),
    "tied_mha": dict(tied=True, kv_heads=6),
    "gqa3_scaled": dict(rope_scaling=True, kv_heads=2, layers=3),
}


@pytest.fixture(params=list(CONFIGS), scope="module")
def checkpoint(request, tmp_path_factory):
    cfg = tiny_config(**CONFIGS[request.param])
    weights = random_weights(cfg, seed=len(request.param))
    path = write_checkpoint(tmp_path_factory.mktemp(request.param), cfg, weights)
    return cfg, weights, path


def test_float64_model_matches_reference(checkpoint):
    cfg, weights, path = checkpoint
    loaded = load_model(str(path), device="cpu", dtype=torch.float64)
    ref = ReferenceLlama(config_from_hf(cfg), weights).logits(PROMPT)
    # Both run in float64: only summation order differs, so agreement is near machine epsilon
    # times the logits' scale (~1-10).
    torch.testing.assert_close(
        prefill_logits(loaded.model, PROMPT).double(), ref, atol=1e-10, rtol=1e-10
    )
    # The decode path over a shuffled, odd-sized paged cache gives the same logits.
    torch.testing.assert_close(
        incremental_logits(loaded.model, PROMPT, prefill_len=7).double(),
        ref,
        atol=1e-10,
        rtol=1e-10,
    )


def test_float32_model_matches_hf_transformers(checkpoint):
    transformers = pytest.importorskip("transformers")
    cfg, weights, path = checkpoint
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"})
    hf = transformers.LlamaForCausalLM(hf_cfg).eval().float()
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    with torch.no_grad():
        hf_logits = hf(torch.tensor([PROMPT])).logits[0].double()
    ours = load_model(str(path), device="cpu", dtype=torch.float32)
    ref = ReferenceLlama(config_from_hf(cfg), weights).logits(PROMPT)
    # float32 keeps ~7 significant digits; after a few layers of matmuls (K <= 76) the rounding of
    # both implementations stays within ~1e-5 of logits of scale ~1-10, so 1e-4 leaves a margin of 10
    # while still catching any real mistake (a wrong rope regime moves logits by ~1e-1).
    tol = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hf_logits, ref, **tol)  # the two oracles agree
    torch.testing.assert_close(prefill_logits(ours.model, PROMPT).double(), hf_logits, **tol)
    torch.testing.assert_close(
        incremental_logits(ours.model, PROMPT, prefill_len=1).double(), hf_logits, **tol
    )


def test_missing_tensor_is_named(tmp_path):
    cfg = tiny_config()
    weights = random_weights(cfg)
    del weights["model.layers.1.mlp.up_proj.weight"]
    path = write_checkpoint(tmp_path / "m", cfg, weights)
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(str(path), device="cpu", dtype="float32")


def test_shape_mismatch_is_named(tmp_path):
    cfg = tiny_config()
    weights = random_weights(cfg)
    weights["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(24, 48)
    path = write_checkpoint(tmp_path / "m", cfg, weights)
    with pytest.raises(ModelLoadError, match=r"k_proj\.weight' has shape \(24, 48\).*\(16, 48\)"):
        load_model(str(path), device="cpu", dtype="float32")


def test_unsupported_architecture_lists_supported(tmp_path):
    cfg = tiny_config() | {"architectures": ["MambaForCausalLM"]}
    path = write_checkpoint(tmp_path / "m", cfg, random_weights(tiny_config()))
    with pytest.raises(UnsupportedArchitectureError, match=r"'MambaForCausalLM'.*LlamaForCausalLM"):
        load_model(str(path), device="cpu", dtype="float32")


def test_dummy_load_format_builds_real_shapes(tmp_path):
    cfg = tiny_config()
    path = write_checkpoint(tmp_path / "m", cfg, {})
    loaded = load_model(
        str(path / "config.json"), device="cpu", dtype="float32", load_format="dummy"
    )
    logits = prefill_logits(loaded.model, PROMPT)
    assert logits.shape == (len(PROMPT), cfg["vocab_size"])
    assert torch.isfinite(logits).all() and logits.std() > 0
