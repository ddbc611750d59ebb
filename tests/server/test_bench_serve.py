"""``rustinfer bench serve`` end to end on the CPU: the offline engine, REST and gRPC clients all
run and every figure is reported."""

from __future__ import annotations

import json

from rustinfer.cli.main import main


def test_bench_serve_reports_served_and_offline_figures(capsys) -> None:
    argv = ["bench", "serve", "--device", "cpu", "--threads", "2", "--concurrency", "2",
            "--num-prompts", "3", "--input-len", "8", "--output-len", "3", "--api", "both",
            "--json"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("serve_output_tok_s", "offline_output_tok_s", "serve_requests_per_s",
                "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99",
                "grpc_output_tok_s", "grpc_requests_per_s", "grpc_ttft_ms_p50",
                "grpc_itl_ms_p50"):  # fmt: skip
        assert result[key] > 0, key
    assert 0 < result["grpc_vs_rest"] < 10 and result["grpc_vs_offline"] > 0
    assert result["serve_vs_offline_each"] and 0 < result["serve_vs_offline"] < 10
