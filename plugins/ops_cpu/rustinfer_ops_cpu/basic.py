"""embedding, linear and argmax: thin wrappers over the torch kernels, no extra work."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def embedding(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """ids [T] int64, table [V, H] -> [T, H]."""
    return F.embedding(ids, table)


# Row counts for which MKL runs W @ x^T faster than x @ W^T on a column-major weight (see
# prepare_linear_weight), on AVX2 CPUs only. Measured on a 2-core AVX2 EPYC over SmolLM2's
# weights: 16 rows 78 vs 98 ms, 32 rows 107 vs 125 ms; at 8 and at 42+ rows F.linear was as
# fast or faster. On a 2-core AVX-512 Xeon it is the other way round: the LM head at 16 rows
# 33.8 ms against F.linear's 19.8, and 16 concurrent SmolLM2 requests 56-60 tok/s (float32)
# and 80-85 (Q4_1) through W @ x^T against 78-88 and 90 through F.linear. Batched decode of
# 16-32 sequences lands here.
_WT_X_ROWS = (16, 32) if torch.backends.cpu.get_cpu_capability() == "AVX2" else (1, 0)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, K], weight [N, K], bias [N] | None -> [T, N] (oneDNN / BLAS, fp32 accumulation)."""
    if bias is not None and x.dtype in (torch.float16, torch.bfloat16):
        # A 16-bit F.linear rounds the product, then rounds again after adding the bias; the spec
        # allows one rounding, so the bias is added in float32 (biased half models are rare on
        # the CPU: the widening costs nothing elsewhere).
        out = F.linear(x.float(), weight.float(), bias.float())
        return out.to(x.dtype)
    if _WT_X_ROWS[0] <= x.shape[0] <= _WT_X_ROWS[1] and weight.stride(0) == 1:
        out = torch.mm(weight, x.t()).t().contiguous()  # [T, N]
        return out if bias is None else out.add_(bias)
    return F.linear(x, weight, bias)


def logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The LM head: [T, K] x [N, K]^T -> [T, N] float32 (float64 stays float64). CPU BLAS returns
    the input dtype, so half inputs are rounded once before the cast (the spec allows it)."""
    out = linear(x, weight, None)
    return out if out.dtype == torch.float64 else out.float()


def prepare_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> the same values; float32 weights are stored column-major ([K, N] in memory).

    Measured on a 2-core AVX2 box (torch 2.13, MKL): for a [1, K] x [N, K]^T decode product MKL's
    fp32 path streams a column-major weight ~1.5x faster (SmolLM2 decode 64 -> 50 ms/token), while
    bf16 goes through oneDNN, which is fastest on the row-major layout it gets as loaded.
    """
    if weight.dtype == torch.float32 and weight.dim() == 2:
        return weight.t().contiguous().t()
    return weight


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> [B] int64: the first maximum of each row (torch documents that ties go to
    the first index)."""
    return torch.argmax(logits, dim=-1)
