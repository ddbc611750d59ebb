"""The plugin as rustinfer sees it once installed: its kernel against the op spec's float64
reference, its registration, and its model against the float64 reference model and against HF
transformers.

Run against the installed package (``pip install .[test]`` then ``pytest``), never the source
tree: the entry point that makes it a plugin exists only in an installed distribution.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rustinfer_example_plugin.model import SoftcapLlamaForCausalLM, softcap
from rustinfer_example_plugin.norm import rmsnorm
from rustinfer_example_plugin.plugin import ARCHITECTURE, RMSNORM_IMPL
from rustinfer_models_llama3.weights import hf_weight_shapes
from safetensors.torch import save_file

from rustinfer.config import config_from_hf
from rustinfer.models import AttentionMetadata, Model
from rustinfer.models.reference import ReferenceLlama
from rustinfer.ops import RMSNORM
from rustinfer.plugins import get_registries
from rustinfer.runtime.loading import load_model

# -- the kernel ----------------------------------------------------------------------------------


def _assert_matches_reference(out: torch.Tensor, ref: torch.Tensor) -> None:
    tol = RMSNORM.tolerance(torch.float32)
    bound = tol.atol + tol.rtol * ref.abs()
    err = (out.double() - ref).abs()
    assert bool((err <= bound).all()), f"max error {float((err - bound).max()):.3g} over bound"


@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("hidden", [1, 13, 576, 1536])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_rmsnorm_matches_spec_reference(rows: int, hidden: int, strided: bool) -> None:
    gen = torch.Generator().manual_seed(rows * 10_000 + hidden)
    # Rows of different scales: a kernel that normalized by the wrong row or forgot eps fails.
    scales = torch.logspace(-3, 3, rows, dtype=torch.float64)[:, None]
    wide = torch.randn(rows, hidden + 5 * strided, generator=gen, dtype=torch.float64) * scales
    x = wide.float()[:, :hidden]  # strided: each row a view into a wider one
    weight = (1.0 + torch.randn(hidden, generator=gen)).float()
    before = x.clone()
    out = rmsnorm(x, weight, 1e-5)
    assert out.shape == (rows, hidden) and out.dtype == torch.float32 and out.is_contiguous()
    _assert_matches_reference(out, RMSNORM.reference(x, weight, 1e-5))
    assert torch.equal(x, before), "rmsnorm wrote into its input"


def test_rmsnorm_refuses_other_dtypes() -> None:
    x = torch.ones(2, 4, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="float32 only"):
        rmsnorm(x, torch.ones(4, dtype=torch.bfloat16), 1e-5)


# -- registration --------------------------------------------------------------------------------


def test_registered_and_chosen_over_the_builtin() -> None:
    regs = get_registries()
    assert regs.ops.lookup("rmsnorm", "cpu", torch.float32, overrides={}).name == RMSNORM_IMPL
    # Pinned away, and for dtypes this plugin does not serve, the built-in kernel applies.
    pinned = regs.ops.lookup("rmsnorm", "cpu", torch.float32, overrides={"rmsnorm": "torch"})
    assert pinned.name == "torch"
    assert regs.ops.lookup("rmsnorm", "cpu", torch.bfloat16, overrides={}).name == "torch"
    assert regs.models.get(ARCHITECTURE) is SoftcapLlamaForCausalLM


# -- the model -----------------------------------------------------------------------------------

PROMPT = [1, 5, 17, 42, 3, 88, 9, 60, 61, 62, 7, 7, 30, 31, 95, 4, 50]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, Path]:
    """A tiny random checkpoint of this architecture, written as HF would (config + safetensors)."""
    cfg = {
        "architectures": [ARCHITECTURE],
        "vocab_size": 97,
        "hidden_size": 48,
        "intermediate_size": 76,
        "num_hidden_layers": 2,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    gen = torch.Generator().manual_seed(0)
    weights = {}
    for name, shape in hf_weight_shapes(config_from_hf(cfg)).items():
        if name.endswith("norm.weight"):
            weights[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            # Scaled so logits reach several units: the cap then moves them measurably.
            weights[name] = 3.0 * torch.randn(shape, generator=gen) / shape[-1] ** 0.5
    path = tmp_path_factory.mktemp("softcap-llama")
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(weights, str(path / "model.safetensors"))
    return cfg, weights, path


@torch.inference_mode()
def prefill_logits(model: Model, ids: list[int], block_size: int = 4) -> torch.Tensor:
    """Logits at every position from one prefill over a paged KV cache: the metadata the engine
    builds each step, for one sequence whose blocks are laid out in reverse order."""
    n = len(ids)
    blocks = -(-n // block_size)
    shape = model.kv_cache_shape(blocks, block_size)
    caches = [
        (torch.zeros(shape, dtype=model.dtype), torch.zeros(shape, dtype=model.dtype))
        for _ in range(model.num_kv_layers)
    ]
    table = torch.arange(blocks - 1, -1, -1, dtype=torch.int32)  # any block order must work
    slots = torch.tensor(
        [int(table[i // block_size]) * block_size + i % block_size for i in range(n)]
    )
    attn = AttentionMetadata(
        slot_mapping=slots,
        block_tables=table[None, :],
        seq_lens=torch.tensor([n], dtype=torch.int32),
        cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32),
        max_query_len=n,
    )
    hidden = model(torch.tensor(ids), torch.arange(n), caches, attn)
    return model.compute_logits(hidden)


def test_float64_model_matches_reference(checkpoint: tuple[dict, dict, Path]) -> None:
    cfg, weights, path = checkpoint
    loaded = load_model(str(path), device="cpu", dtype="float64")
    assert type(loaded.model) is SoftcapLlamaForCausalLM
    raw = ReferenceLlama(config_from_hf(cfg), weights).logits(PROMPT)
    assert raw.abs().max() > 3.0, "logits too small for the cap to show"
    ours = prefill_logits(loaded.model, PROMPT)
    # Both float64: only summation order differs, ~1e-15 relative on logits of a few units.
    torch.testing.assert_close(
        ours, softcap(raw, SoftcapLlamaForCausalLM.LOGIT_SOFTCAP), atol=1e-10, rtol=1e-10
    )
    # The cap is really applied: the uncapped logits are far outside that tolerance.
    assert (ours - raw).abs().max() > 1e-3


def test_float32_model_matches_hf_transformers(checkpoint: tuple[dict, dict, Path]) -> None:
    transformers = pytest.importorskip("transformers")
    cfg, weights, path = checkpoint
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"})
    hf = transformers.LlamaForCausalLM(hf_cfg).eval().float()
    hf.load_state_dict(weights, strict=True)
    with torch.no_grad():
        expected = softcap(
            hf(torch.tensor([PROMPT])).logits[0], SoftcapLlamaForCausalLM.LOGIT_SOFTCAP
        )
    loaded = load_model(str(path), device="cpu", dtype="float32")
    # The model runs this plugin's rmsnorm (priority 10), not the built-in one.
    assert loaded.model.ops.chosen["rmsnorm"].startswith(f"{RMSNORM_IMPL} [cpu")
    # float32 through two small layers: both implementations round within ~1e-5 of logits of a
    # few units; 1e-4 keeps a margin of 10 and still catches a wrong cap (1e-3 and up).
    torch.testing.assert_close(prefill_logits(loaded.model, PROMPT), expected, atol=1e-4, rtol=1e-4)
