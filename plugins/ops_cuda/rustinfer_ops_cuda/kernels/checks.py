"""Argument checks shared by the kernel launchers.

A Triton kernel reads raw pointers: a wrong dtype, a stride it does not expect or a tensor on
another device silently produces garbage or a memory fault, so every launcher checks first and
names the argument and what it should be.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    if hasattr(triton, "knobs"):
        return bool(triton.knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(**tensors: torch.Tensor) -> torch.device:
    """All tensors on one device, a CUDA one unless the interpreter runs the kernels on the CPU."""
    # Every launch runs these checks: a plain loop with no intermediate containers keeps them to
    # well under a microsecond per tensor (a prefill launches ~150 kernels on the host's clock).
    first_name, first = next(iter(tensors.items()))
    device, index = first.device, first.get_device()  # get_device: an int, cheap to compare
    for name, t in tensors.items():
        if t.get_device() != index:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {device}")
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        raise ValueError(f"Triton kernels need CUDA tensors, got {first_name} on {device}")
    return device


def _expected_shape(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def check_tensor(
    name: str,
    t: torch.Tensor,
    shape: Sequence[int | None],
    dtypes: torch.dtype | Sequence[torch.dtype],
    *,
    inner_contiguous: bool = True,
    contiguous: bool = False,
) -> None:
    """``shape`` lists the expected sizes (None: any); ``inner_contiguous``: the last dim has
    stride 1 (what vectorised loads need); ``contiguous``: the whole tensor is dense."""
    dtype = t.dtype
    if dtype is not dtypes and (isinstance(dtypes, torch.dtype) or dtype not in dtypes):
        allowed = (dtypes,) if isinstance(dtypes, torch.dtype) else tuple(dtypes)
        names = " or ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{name} has dtype {str(dtype).removeprefix('torch.')}, expected {names}")
    got = t.shape
    if len(got) != len(shape):
        raise ValueError(f"{name} has shape {list(got)}, expected {_expected_shape(shape)}")
    for size, want in zip(got, shape):  # noqa: B905 (lengths equal: checked above)
        if want is not None and size != want:
            raise ValueError(f"{name} has shape {list(got)}, expected {_expected_shape(shape)}")
    if contiguous:
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")
    elif inner_contiguous and got and got[-1] > 1 and t.stride(-1) != 1 and t.numel() > 0:
        raise ValueError(f"{name} must have unit stride in its last dim, got strides {t.stride()}")


def check_index_rows(name: str, t: torch.Tensor, rows: int) -> None:
    """Per-token metadata vectors (positions, slots) on the kernels' device, int32 or int64."""
    check_tensor(name, t, [rows], (torch.int32, torch.int64))
    if t.stride(0) != 1 and rows > 1:
        raise ValueError(f"{name} must be contiguous, got stride {t.stride(0)}")


def check_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    **more: torch.Tensor,
) -> None:
    """The arguments every paged attention launcher shares: q [rows, Hq, D] (last dim unit
    stride), dense caches [num_blocks, block_size, Hkv, D] of q's dtype with Hkv dividing Hq,
    int32 block tables with contiguous rows and int32 seq_lens, all on one device (``more``:
    further tensors for the device check)."""
    check_tensor("q", q, [None, None, None], (torch.bfloat16, torch.float16, torch.float32))
    n_heads, head_dim = q.shape[1], q.shape[2]
    check_tensor("k_cache", k_cache, [None, None, None, head_dim], q.dtype, contiguous=True)
    check_tensor("v_cache", v_cache, list(k_cache.shape), q.dtype, contiguous=True)
    check_tensor("block_tables", block_tables, [None, None], torch.int32)
    check_tensor("seq_lens", seq_lens, [block_tables.shape[0]], torch.int32)
    check_device(
        q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, seq_lens=seq_lens, **more
    )
    n_kv_heads = k_cache.shape[2]
    if n_heads % n_kv_heads:
        raise ValueError(f"{n_heads} query heads are not a multiple of {n_kv_heads} kv heads")
    if block_tables.stride(1) != 1 and block_tables.shape[1] > 1:
        raise ValueError(
            f"block_tables rows must be contiguous, got strides {block_tables.stride()}"
        )
