"""The ``rustinfer`` command: bench latency on dummy weights, errors, generate on a tiny model."""

from __future__ import annotations

import json

import pytest
from model_helpers import tiny_config, write_checkpoint

from rustinfer.cli.main import main

LATENCY_KEYS = {
    "load_s",
    "prompt_tokens",
    "prefill_ms",
    "prefill_tok_s",
    "decode_ms_per_token",
    "decode_tok_s",
    "output_tokens",
    "device",
    "dtype",
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_latency_json_on_dummy_weights(tmp_path, capsys, dtype):
    path = write_checkpoint(tmp_path / "m", tiny_config(), {})
    argv = [
        "bench",
        "latency",
        "--model",
        str(path / "config.json"),
        "--load-format",
        "dummy",
        "--device",
        "cpu",
        "--dtype",
        dtype,
        "--threads",
        "1",
        "--input-len",
        "13",
        "--output-len",
        "7",
        "--iters",
        "1",
        "--json",
    ]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) >= LATENCY_KEYS
    assert result["prompt_tokens"] == 13 and result["output_tokens"] == 7
    assert result["dtype"] == dtype and result["device"].startswith("cpu")
    assert result["decode_tok_s"] > 0 and result["prefill_ms"] > 0


def test_bench_latency_rejects_context_overflow(tmp_path, capsys):
    path = write_checkpoint(tmp_path / "m", tiny_config(), {})  # max_position_embeddings 256
    argv = [
        "bench",
        "latency",
        "--model",
        str(path / "config.json"),
        "--load-format",
        "dummy",
        "--device",
        "cpu",
        "--input-len",
        "200",
        "--output-len",
        "100",
        "--json",
    ]
    assert main(argv) == 2
    assert "exceeds the context limit of 256 tokens" in capsys.readouterr().err


def test_missing_model_path_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "hi", "--model", str(tmp_path / "nope"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err


def test_unknown_device_is_a_clear_error(capsys):
    assert main(["generate", "hi", "--device", "tpu"]) == 2
    assert "unknown device type 'tpu'; registered: cpu, cuda" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["generate", "hi"], ["bench", "latency"]])
def test_batch_invariant_without_such_kernels_is_a_clear_error(tmp_path, capsys, command):
    """The flag reaches the loader from every command that loads a model; on the CPU no plugin
    offers batch-invariant kernels, and asking for the guarantee must not pass silently."""
    path = write_checkpoint(tmp_path / "m", tiny_config(), {})
    args = [*command, "--model", str(path), "--load-format", "dummy", "--device", "cpu"]
    assert main([*args, "--batch-invariant"]) == 2
    err = capsys.readouterr().err
    assert "--batch-invariant: no installed plugin has batch-invariant kernels for cpu" in err
    assert "Traceback" not in err


def test_serve_settings_take_batch_invariant(monkeypatch):
    from rustinfer.cli.main import build_parser
    from rustinfer.cli.serve import settings_from_args

    args = build_parser().parse_args(["serve", "--batch-invariant"])
    assert settings_from_args(args).batch_invariant is True
    monkeypatch.setenv("RUSTINFER_BATCH_INVARIANT", "true")
    assert settings_from_args(build_parser().parse_args(["serve"])).batch_invariant is True


def test_bench_throughput_json_on_dummy_weights(tmp_path, capsys):
    path = write_checkpoint(tmp_path / "m", tiny_config(), {})
    argv = ["bench", "throughput", "--model", str(path / "config.json"), "--load-format", "dummy",
            "--device", "cpu", "--threads", "1", "--num-prompts", "5", "--input-len", "9",
            "--output-len", "4", "--max-num-seqs", "3", "--json"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_prompts"] == 5 and result["max_num_seqs"] == 3
    # Every request produced exactly output_len tokens (EOS ignored).
    assert result["output_tokens"] == 20
    assert result["total_tok_s"] > result["output_tok_s"] > 0
