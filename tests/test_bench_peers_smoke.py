"""bench/peers_gpu.py on the CPU: its plain-PyTorch Llama (the GPU peer) must be a correct Llama,
its decode floor arithmetic must be right, and every measurement's code path must run. The GPU
timings themselves are not checked here."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from model_helpers import random_weights

from rustinfer.config import config_from_hf
from rustinfer.models.reference import ReferenceLlama

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("peers_gpu", ROOT / "bench" / "peers_gpu.py")
peers = importlib.util.module_from_spec(_spec)
sys.modules["peers_gpu"] = peers  # dataclasses look their module up while it loads
_spec.loader.exec_module(peers)


def tiny_config(tied: bool) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": tied,
        # With head_dim 16 and theta 1e4 the wavelengths run 6.3 .. 2e4: original_max 64 puts
        # them in all three llama3 regimes (kept < 16, blended 16..64, divided > 64).
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    }


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    """Max abs difference within ``rel`` times the logits' own scale (their max magnitude)."""
    scale = want.abs().max().item()
    err = (got.double() - want.double()).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3e} vs scale {scale:.3e} (allowed {rel:.0e})"


@pytest.mark.parametrize(
    ("tied", "attention"),
    [(True, "sdpa"), (False, "sdpa"), (True, "matmul")],
    ids=["tied-sdpa", "untied-sdpa", "tied-matmul"],
)
def test_plain_model_matches_float64_reference(tied: bool, attention: str) -> None:
    cfg = tiny_config(tied)
    weights = random_weights(cfg, seed=3)
    if tied:
        weights.pop("lm_head.weight", None)
    ref = ReferenceLlama(config_from_hf(cfg), weights)
    gen = torch.Generator().manual_seed(0)
    n, prefill, chunk = 80, 9, 4  # past original_max 64: long positions see the scaled rope
    rows = torch.randint(0, cfg["vocab_size"], (2, n), generator=gen)  # batch 2, own tokens
    want = torch.stack([ref.logits(r.tolist()) for r in rows])  # [2, n, vocab] float64

    model = peers.PlainLlama(cfg, "cpu", torch.float32, attention).load_hf(weights)
    model.allocate_cache(batch=2, max_len=96)  # longer than used: the mask must hide the rest
    with torch.no_grad():
        got = [model(rows[:, :prefill], torch.arange(prefill), prefill=True, all_logits=True)]
        # A chunk at a non-zero start goes through the masked (decode) attention path with t > 1.
        span = torch.arange(prefill, prefill + chunk)
        got.append(model(rows[:, span], span, all_logits=True))
        # Then one token at a time through the same in-place step the benchmark captures.
        ids = torch.empty(2, 1, dtype=torch.long)
        pos = torch.empty(1, dtype=torch.long)
        for p in range(prefill + chunk, n):
            ids.copy_(rows[:, p : p + 1])
            pos.fill_(p)
            got.append(peers.decode_step(model, ids, pos))
            assert pos.item() == p + 1
            assert torch.equal(ids[:, 0], got[-1][:, -1].argmax(-1))  # the greedy feedback
        got = torch.cat(got, dim=1)
    assert got.shape == want.shape
    assert_close_scaled(got, want, rel=1e-4)

    # Decode's last logits equal a single prefill's last-position logits over the same tokens.
    fresh = peers.PlainLlama(cfg, "cpu", torch.float32).load_hf(weights)
    fresh.allocate_cache(batch=2, max_len=n)
    with torch.no_grad():
        last = fresh(rows, torch.arange(n), prefill=True)
    assert last.shape == (2, 1, cfg["vocab_size"])
    assert_close_scaled(got[:, -1], last[:, 0], rel=1e-5)


def test_rms_norm_spelled_out_for_compile_matches_fused(monkeypatch: pytest.MonkeyPatch) -> None:
    x, w = torch.randn(3, 5, 64, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    fused = peers.rms_norm(x, w, 1e-5)
    monkeypatch.setattr(peers, "_compiling", lambda: True)  # the form torch.compile traces
    torch.testing.assert_close(peers.rms_norm(x, w, 1e-5), fused)


def test_weight_bytes_and_decode_floor_on_llama_3_2_1b() -> None:
    cfg = json.loads((ROOT / "bench/configs/llama-3.2-1b/config.json").read_text())
    nbytes = peers.weight_bytes(cfg)
    # 16 layers x (q 2048^2 + k, v 2 x 2048 x 512 + o 2048^2 + 3 x 2048 x 8192) + norms
    # + one 128256 x 2048 LM head (tied: the embedding is not counted again), 2 bytes each.
    per_layer = 2048 * 2048 * 2 + 2 * 2048 * 512 + 3 * 2048 * 8192 + 2 * 2048
    assert nbytes == 2 * (16 * per_layer + 2048 + 128256 * 2048)
    assert nbytes == pytest.approx(2.47e9, rel=2e-3)
    # Untied: the head is still read once and the embedding table (a row per token) not at all.
    assert peers.weight_bytes({**cfg, "tie_word_embeddings": False}) == nbytes
    floor = peers.decode_floor(nbytes, 4.21e12)  # the H200's copy bandwidth in FACTS.md
    assert floor["floor_ms"] == pytest.approx(0.587, abs=1e-3)
    assert floor["floor_tok_s"] == pytest.approx(1703, abs=2)


def test_every_measurement_runs_on_cpu(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # transformers' import alone takes 6-10 s here, past this test's budget: hf_eager's own path
    # was run by hand (CPU and GPU); here it must skip cleanly when transformers is missing.
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_config(tied=True)))
    assert peers.main(["--config", str(path), "--device", "cpu", "--smoke", "--json"]) == 0
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines()]  # --json: JSON lines only
    assert not [r for r in records if "error" in r], err[-3000:]
    by_name = {}
    for r in records:
        assert r["config"] == str(path) and r["device"] == "cpu"
        by_name.setdefault(r["name"], []).append(r)
    assert set(by_name) == set(peers.MEASUREMENTS)
    assert by_name["copy"][0]["floor_ms"] > 0 and by_name["matmul"][0]["tflop_s"] >= 0
    cases = {r["case"] for r in by_name["plain_graph"]}
    assert cases == {f"decode_b{b}_ctx{c}" for b, c in peers.SMOKE.decode} | {"prefill_64"}
    assert all(r["tok_s"] > 0 and r["graph"] is False for r in by_name["plain_graph"])
    assert "skipped" in by_name["compile_graph"][0]  # graphs need CUDA
    assert "transformers not importable" in by_name["hf_eager"][0]["skipped"]
    assert "measurement" in err and "plain_graph" in err  # the table went to stderr
