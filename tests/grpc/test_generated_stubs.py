"""The stubs under rustinfer/server/grpc/generated are what scripts/gen_protos.py makes of protos/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_match_the_protos() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_modules_import_by_their_package_path() -> None:
    from rustinfer.server.grpc.generated.rustinfer.v1 import inference_pb2

    assert inference_pb2.DESCRIPTOR.package == "rustinfer.v1"
