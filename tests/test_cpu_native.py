"""rustinfer's C kernels for the CPU (rustinfer_ops_cpu.native): built for this machine, cached,
and, where they cannot be built, replaced by the torch kernels with the reason logged."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from rustinfer_ops_cpu import native


def test_the_kernels_build_here() -> None:
    """CI machines have a C compiler (scripts/install.sh installs one): the C kernels must load,
    or every model would silently run the slower torch kernels."""
    assert native.library() is not None, native.unavailable_reason()
    assert native.simd() in ("avx512-vnni", "avx512", "avx2", "scalar")
    assert native.unavailable_reason() is None


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


_RESOLVE = """
    import logging, torch
    logging.basicConfig(level=logging.INFO)
    from rustinfer.plugins import get_registries
    from rustinfer_ops_cpu import native
    ops = get_registries().ops
    print("reason:", native.unavailable_reason())
    print("linear:", ops.lookup("quantized_linear", "cpu", torch.float32, overrides={}).name)
    print("norm:", ops.lookup("fused_add_rmsnorm", "cpu", torch.float32, overrides={}).name)
"""


@pytest.mark.parametrize(
    ("env", "why"),
    [
        ({"CC": "/bin/false"}, "the build failed"),
        ({"CC": "", "PATH": "/nonexistent"}, "no C compiler"),
        ({"RUSTINFER_CPU_NATIVE": "0"}, "RUSTINFER_CPU_NATIVE=0"),
    ],
)
def test_without_the_kernels_torch_serves(tmp_path, env: dict[str, str], why: str) -> None:  # type: ignore[no-untyped-def]
    # A fresh cache: a library built earlier would otherwise be found and loaded.
    env = {**env, "RUSTINFER_CACHE": str(tmp_path)}
    if "PATH" in env:
        env["PATH"] = os.path.dirname(sys.executable) + ":/nonexistent"
    done = _run(_RESOLVE, **env)
    assert done.returncode == 0, done.stderr
    assert why in done.stdout
    assert "linear: torch" in done.stdout and "norm: torch" in done.stdout


def test_a_build_is_cached_per_source_and_machine(tmp_path) -> None:  # type: ignore[no-untyped-def]
    code = """
        import logging
        logging.basicConfig(level=logging.INFO)
        from rustinfer_ops_cpu import native
        assert native.library() is not None, native.unavailable_reason()
    """
    first = _run(code, RUSTINFER_CACHE=str(tmp_path))
    assert first.returncode == 0, first.stderr
    assert "building the CPU kernels" in first.stderr
    built = list((tmp_path / "cpu_kernels").glob("rustinfer_cpu_*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    second = _run(code, RUSTINFER_CACHE=str(tmp_path))
    assert second.returncode == 0, second.stderr
    assert "building the CPU kernels" not in second.stderr
    assert built[0].stat().st_mtime_ns == stamp
