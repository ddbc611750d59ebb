"""The ops cuda serves with torch's own CUDA kernels (cuBLAS matmuls, gathers, reductions).

Every function here only queues work: none reads a tensor's values on the host (no ``.item()``,
``.tolist()``, ``.cpu()``, no Python branch on values; branches look at dtypes, which the host
knows), so a step never waits for the GPU here and a CUDA graph can capture it. They are plain
torch and run on CPU tensors too, which is how the CPU lane tests them against the specs.

float32 matmuls follow torch's float32 matmul precision, "highest" unless a caller lowers it
(``torch.set_float32_matmul_precision``): full fp32 on cuBLAS, no TF32, as the fp32 spec needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

HALF_DTYPES = (torch.bfloat16, torch.float16)


def embedding(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """ids [T] int64, table [V, H] -> [T, H] (a gather; out-of-range ids trip a device-side
    assert, never a host check)."""
    return F.embedding(ids, table)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, K] (rows may be strided), weight [N, K], bias [N] | None -> [T, N] in x's dtype
    (cuBLAS, fp32 accumulation)."""
    return F.linear(x, weight, bias)


def logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The LM head: x [T, K], weight [N, K], both bf16, fp16 or fp32 -> [T, N] float32.

    For 16-bit inputs cuBLAS accumulates in float32 either way; asking for a float32 output
    keeps that accumulator instead of rounding it to bf16 (spacing 0.125 at typical logit sizes,
    enough to flip argmax near-ties) and widening it again. (``out_dtype`` is a CUDA-only
    overload of ``torch.mm``.)
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"logits: x {tuple(x.shape)} and weight {tuple(weight.shape)} mismatch")
    if x.dtype != weight.dtype or x.dtype not in (*HALF_DTYPES, torch.float32):
        got = f"{x.dtype}, {weight.dtype}"
        raise ValueError(f"logits: expected bf16/fp16/fp32 x and weight alike, got {got}")
    if x.dtype == torch.float32:
        return torch.mm(x, weight.t())
    return torch.mm(x, weight.t(), out_dtype=torch.float32)


def prepare_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> the same tensor: cuBLAS reads the row-major layout the weights load in as the
    transposed operand of its GEMM, at full bandwidth, so there is nothing to re-lay."""
    return weight


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> [B] int64: the first maximum of each row (torch documents that ties go
    to the first index, on CUDA as on the CPU)."""
    return torch.argmax(logits, dim=-1)
