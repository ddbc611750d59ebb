"""Our C kernels for the CPU, compiled for this machine on first use and cached.

Built with the system C compiler (``cc``, or ``$CC``) as ``-O3 -march=native -fopenmp``: plain C
files, no torch headers, so a build takes about a second, and ``-march=native`` picks the widest
vector unit of the machine that runs it (AVX-512, AVX2, or plain C). The library lands in
``$RUSTINFER_CACHE/cpu_kernels`` (default ``~/.cache/rustinfer``) under a name made of the
source's hash, the compiler's identity and this CPU's flags, so a new source, compiler or machine
builds its own. Calls go through ``ctypes`` with raw tensor pointers.

The library links ``libgomp.so.1`` and is loaded after torch, which has loaded its own copy by that
name: the loader reuses it, so our parallel regions run on torch's OpenMP threads (two thread pools
on two cores would take turns spinning).

No compiler, or a failed build: :func:`library` returns None and logs why once; callers keep
torch's kernels. ``RUSTINFER_CPU_NATIVE=0`` turns the library off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

__all__ = ["library", "simd", "unavailable_reason"]

logger = logging.getLogger(__name__)

_SOURCES = ("qlinear.c", "layer_ops.c", "decode_step.c", "rq_kernels.h")
_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
_i64, _int, _ptr, _f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
_SIGNATURES = {
    # x, M, K, ldx, packed, bits, half, has_shift, bias, out, N, ldo
    "rq_linear": (
        ctypes.c_int,
        [_ptr, _i64, _i64, _i64, _ptr, _int, _int, _int, _ptr, _ptr, _i64, _i64],
    ),
    # K, bits, half, has_shift
    "rq_tile_bytes": (_i64, [_i64, _int, _int, _int]),
    # packed, bits, half, has_shift, N, K, out
    "rq_dequantize": (None, [_ptr, _int, _int, _int, _i64, _i64, _ptr]),
    # x, ldx, residual, ldr, weight, eps, T, H, norm, sum
    "rq_add_rmsnorm": (None, [_ptr, _i64, _ptr, _i64, _ptr, _f32, _i64, _i64, _ptr, _ptr]),
    # x, ldx, T, I, out
    "rq_silu_mul": (None, [_ptr, _i64, _i64, _i64, _ptr]),
    # q, ldq, k, ldk, v, ldv, T, Hq, Hkv, D, positions, cos_sin, k_cache, v_cache, slots, q_out
    "rq_rope_kv_store": (None, [_ptr, _i64] * 3 + [_i64] * 4 + [_ptr] * 6),
    # q, ldq, B, Hq, Hkv, D, k_cache, v_cache, block_size, tables, width, seq_lens, scale, out
    "rq_attention_decode": (
        _int,
        [_ptr, _i64, _i64, _i64, _i64, _i64, _ptr, _ptr, _i64, _ptr, _i64, _ptr, _f32, _ptr],
    ),
    # layers, caches, L, T, H, Hq, Hkv, D, I, eps, scale, cos_sin, positions, slots, block_size,
    # block_tables, width, seq_lens, x, residual (in: the embedded tokens; out: the stream), mlp_out
    "rq_decode_layers": (
        _int,
        [_ptr, _ptr] + [_i64] * 7 + [_f32, _f32] + [_ptr] * 3 + [_i64, _ptr, _i64] + [_ptr] * 4,
    ),
    "rq_step_serves_f32": (_int, []),
    "rq_simd": (ctypes.c_char_p, []),
    "rq_half": (_int, []),
}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return os.uname().machine


def _cache_dir() -> Path:
    root = os.environ.get("RUSTINFER_CACHE") or Path.home() / ".cache" / "rustinfer"
    return Path(root) / "cpu_kernels"


def _build(compiler: str, target: Path) -> None:
    here = Path(__file__).parent
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent processes never load a half-written file.
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        sources = [str(here / s) for s in _SOURCES if s.endswith(".c")]
        cmd = [compiler, *_FLAGS, "-o", str(partial), *sources, "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr.strip()}")
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


_why_not = ""  # why library() returned None, for the registry's requirement


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, building them if this machine has none yet; None if they cannot be
    had (the reason is logged once)."""
    global _why_not
    if os.environ.get("RUSTINFER_CPU_NATIVE", "1") == "0":
        _why_not = "turned off by RUSTINFER_CPU_NATIVE=0"
        logger.info("CPU native kernels off (RUSTINFER_CPU_NATIVE=0)")
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        _why_not = "no C compiler (cc or gcc; or set CC)"
        logger.warning("no C compiler (cc/gcc): the CPU keeps torch's quantized kernels")
        return None
    try:
        # The compiler's identity without running it (a subprocess costs ~15 ms a start): its
        # resolved path, size and time stamp change when it is upgraded.
        binary = Path(shutil.which(compiler) or compiler).resolve()
        stat = binary.stat()
        version = f"{binary} {stat.st_size} {stat.st_mtime_ns}"
        here = Path(__file__).parent
        key = hashlib.sha256()
        for part in (*(here.joinpath(s).read_bytes() for s in _SOURCES), " ".join(_FLAGS)):
            key.update(part if isinstance(part, bytes) else part.encode())
        key.update(version.encode())
        key.update(_cpu_flags().encode())
        target = _cache_dir() / f"rustinfer_cpu_{key.hexdigest()[:16]}.so"
        if not target.exists():
            logger.info("building the CPU kernels with %s -> %s", compiler, target)
            _build(compiler, target)
        torch.get_num_threads()  # torch (and its libgomp) loaded first: see the module docstring
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        _why_not = f"the build failed: {exc}"
        logger.warning("CPU native kernels unavailable, keeping torch's: %s", exc)
        return None
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    logger.info("CPU native kernels: %s (%s)", target.name, lib.rq_simd().decode())
    return lib


def simd() -> str | None:
    """The vector unit the kernels were built for ("avx512", "avx2", "scalar"), or None."""
    lib = library()
    return None if lib is None else lib.rq_simd().decode()


def unavailable_reason() -> str | None:
    """The registry's requirement check for the native ops: None when the library loads here."""
    if library() is not None:
        return None
    return f"rustinfer's CPU kernels could not be built: {_why_not}"
