"""``rustinfer bench structured`` runs both settings and reports every figure (CPU, tiny sizes)."""

from __future__ import annotations

import json

from rustinfer.cli.main import main


def test_bench_structured_reports_both_runs_and_compile_times(capsys) -> None:
    argv = ["bench", "structured", "--device", "cpu", "--threads", "2", "--batch", "1", "2",
            "--output-len", "4", "--repeat", "1", "--json"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("b1_free_tok_s", "b1_json_schema_tok_s", "b2_free_tok_s", "b2_json_schema_tok_s",
                "tokenizer_read_ms", "schema_compile_ms", "first_mask_ms"):  # fmt: skip
        assert result[key] > 0, key
    assert "b2_cost_percent" in result
