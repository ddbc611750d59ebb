"""bench/cpu_peers.py's memory floor: the bytes a decode token reads, counted from the GGUF, and a
read rate measured here; and its rows in the table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("cpu_peers", ROOT / "bench" / "cpu_peers.py")
peers = importlib.util.module_from_spec(_spec)
sys.modules["cpu_peers"] = peers
_spec.loader.exec_module(peers)


def test_memory_floor_counts_the_weights_and_measures_a_rate() -> None:
    model = pytest.importorskip("rustinfer.default_model").default_model_path()
    rows = {row["engine"]: row for row in peers.memory_floor(model, threads=2)}
    assert set(rows) == set(peers.FLOORS)
    gguf, f32 = rows["floor-gguf-bytes"], rows["floor-float32-bytes"]
    # SmolLM2-135M: ~134.5M matrix values (the tied embedding counted once), float32 4 bytes each;
    # the file's Q4_1 / Q8_0 blocks 5-8.5 bits a value.
    assert 130e6 * 4 < f32["bytes_per_token"] < 140e6 * 4
    assert f32["bytes_per_token"] / 8 < gguf["bytes_per_token"] < f32["bytes_per_token"] / 3
    assert gguf["read_gb_s"] == f32["read_gb_s"] > 0.1
    ratio = gguf["decode_tok_s"] / f32["decode_tok_s"]
    assert ratio == pytest.approx(f32["bytes_per_token"] / gguf["bytes_per_token"], rel=0.01)
    table = peers.table([{"round": 0, **row} for row in rows.values()], list(peers.FLOORS))
    assert "floor-float32-bytes" in table and "floor-gguf-bytes" in table
