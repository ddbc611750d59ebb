"""bench/kernels.py --smoke: every code path of the kernel benchmark (registry lookup bypassed,
correctness check, timing, SDPA peers, table, JSON) on tiny shapes through Triton's interpreter,
so the GPU script cannot rot between GPU runs. Its times mean nothing and are not checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_kernel_bench_smoke_runs_every_kernel_and_checks_it(tmp_path: Path) -> None:
    out = tmp_path / "kernels.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kernels.py"), "--smoke", "--compile", "none",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"rmsnorm", "fused_add_rmsnorm", "silu_and_mul", "rope_kv_store",
                       "attention_decode", "attention_prefill"}  # fmt: skip
    # Every Triton kernel ran and matched the torch implementation on its inputs.
    assert all(r["status"] == "ok" for r in rows), [(r["kernel"], r["status"]) for r in rows]
    assert all(r["rel_err"] is not None and r["rel_err"] < 2e-2 for r in rows)
    assert "| kernel | shape |" in proc.stdout
