"""Tiny random HF transformers models of any dense-decoder family, saved as HF saves them.

The checkpoint comes from transformers' own ``save_pretrained`` (its config.json, its tensor names,
its handling of tied heads), so a test exercises rustinfer's reading of what HF really writes; the
same in-memory model is the float32 oracle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from rustinfer.config import config_from_hf
from rustinfer.engine.sampling_params import SamplingParams
from rustinfer.llm import LLM
from rustinfer.models.reference import ReferenceLlama

# float32 keeps ~7 significant digits; after a few layers of matmuls (K <= ~80) the rounding of both
# implementations stays within ~1e-5 of logits of scale ~1-10, so 1e-4 leaves a margin of 10 while
# still catching any real mistake (a missing bias or q/k norm moves logits by ~1e-1).
FLOAT32_TOL = dict(atol=1e-4, rtol=1e-4)
# Both run in float64: only summation order differs (near machine epsilon times the logits' scale).
FLOAT64_TOL = dict(atol=1e-10, rtol=1e-10)

PROMPT = [1, 5, 17, 42, 3, 88, 9, 60, 61, 62, 7, 7, 7, 30, 31, 95, 4, 50, 11, 12, 13, 14, 80]
PROMPTS = [
    [1, 5, 17, 42, 3, 88, 9, 60, 61, 62, 7],
    [1, 33, 2, 90],
    [1, 8, 8, 8, 8, 12, 44, 71, 23, 19, 5, 6, 70, 3, 2, 1, 9],
    [9],
    [1, 77, 76, 75, 74, 73, 72, 71, 70, 69, 68, 67, 66, 65, 64, 63, 62, 61, 60, 59, 58],
]


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights at a scale where every part matters (HF's 0.02 init makes logits nearly flat).

    Norm scales near 1 (q/k norms spread wider, so a missing one shows), matrices ~1/sqrt(fan_in),
    biases of order 0.3 so they move the attention scores visibly, a smaller embedding table.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        noise = torch.randn(param.shape, generator=gen)
        if name.endswith("norm.weight"):
            spread = 0.3 if ("q_norm" in name or "k_norm" in name) else 0.1
            param.copy_(1.0 + spread * noise)
        elif name.endswith(".bias"):
            param.copy_(0.3 * noise)
        elif name.endswith("embed_tokens.weight"):
            # A tied head reads the embedding back: at full scale the last token's own embedding
            # dominates the final hidden state and greedy runs repeat one token; smaller, the
            # layers steer the choice, so generation compares varied sequences.
            param.copy_(0.25 * noise / param.shape[-1] ** 0.5)
        else:
            param.copy_(noise / param.shape[-1] ** 0.5)


def build_hf(family: str, seed: int = 0, **settings: Any) -> torch.nn.Module:
    """A random float32 HF model: ``family`` is "Qwen2", "Qwen3", "Mistral" or "Llama"."""
    transformers = pytest.importorskip("transformers")
    config_cls = getattr(transformers, f"{family}Config")
    model_cls = getattr(transformers, f"{family}ForCausalLM")
    base: dict[str, Any] = {
        "vocab_size": 101,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "bos_token_id": None,
        "eos_token_id": None,  # greedy runs go their full length on both sides
        "pad_token_id": None,
    }
    config = config_cls(**(base | settings))
    torch.manual_seed(seed)  # HF's own init runs first; randomize() then overwrites every value
    model = model_cls(config).eval().float()
    randomize(model, seed)
    return model


def save_hf(model: torch.nn.Module, folder: Path) -> Path:
    """transformers' own safetensors + config.json (a tied head is stored once, as HF does)."""
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def hf_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """HF-named tensors as the checkpoint holds them (the reference model reads these)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def reference_for(folder: Path, model: torch.nn.Module) -> ReferenceLlama:
    import json

    config = config_from_hf(json.loads((folder / "config.json").read_text()))
    return ReferenceLlama(config, hf_state(model))


@torch.no_grad()
def hf_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].double()


@torch.no_grad()
def hf_greedy(model: torch.nn.Module, ids: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return out[0, len(ids) :].tolist()


def greedy_params(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def llm_greedy(llm: LLM, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Every prompt submitted at once: one paged, continuously batched run."""
    results = llm.generate(prompts, greedy_params(max_tokens))
    return [r.outputs[0].token_ids for r in results]


def gguf_tokenizer_fields(hf_tokenizer: Any, specials: list[str]) -> dict[str, Any]:
    """A ``tokenizers`` byte-level BPE as llama.cpp's gpt2 vocabulary metadata (loader_helpers)."""
    import json

    model = json.loads(hf_tokenizer.to_str())["model"]
    by_id = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    tokens = [tok for tok, _ in by_id]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    control, normal = 3, 1
    types = [control if tok in specials else normal for tok in tokens]
    return {"model": "gpt2", "tokens": tokens, "types": types, "merges": merges}


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float32).contiguous().numpy()


def check_float32_against_hf(path: Path, hf: torch.nn.Module, prompt: list[int]) -> Any:
    """HF's float32 logits equal the float64 reference's (the two oracles agree), and ours equal
    them through a prefill and through decode over a shuffled paged cache. Returns our model."""
    from model_helpers import incremental_logits, prefill_logits

    from rustinfer.runtime.loading import load_model

    expected = hf_logits(hf, prompt)
    torch.testing.assert_close(expected, reference_for(path, hf).logits(prompt), **FLOAT32_TOL)
    ours = load_model(str(path), device="cpu", dtype=torch.float32)
    torch.testing.assert_close(prefill_logits(ours.model, prompt).double(), expected, **FLOAT32_TOL)
    torch.testing.assert_close(
        incremental_logits(ours.model, prompt, prefill_len=1).double(), expected, **FLOAT32_TOL
    )
    return ours


def check_float64_against_reference(path: Path, hf: torch.nn.Module, prompt: list[int]) -> None:
    """Our float64 model equals the float64 reference, prefilled and decoded."""
    from model_helpers import incremental_logits, prefill_logits

    from rustinfer.runtime.loading import load_model

    ours = load_model(str(path), device="cpu", dtype=torch.float64)
    ref = reference_for(path, hf).logits(prompt)
    torch.testing.assert_close(prefill_logits(ours.model, prompt).double(), ref, **FLOAT64_TOL)
    torch.testing.assert_close(
        incremental_logits(ours.model, prompt, prefill_len=7).double(), ref, **FLOAT64_TOL
    )
