"""Specs of the plain ops: ``embedding`` (exact), ``linear``, ``logits``, ``prepare_linear_weight`` (exact) and
``argmax`` (exact)."""

from __future__ import annotations

import torch

from rustinfer.ops.spec import OpSpec, Tolerance


def embedding_reference(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rows of ``table`` selected by ``ids``, in the table's dtype (a copy, compared exactly)."""
    return table[ids.to(torch.int64)]


def linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x @ weight.T + bias in float64."""
    out = x.to(torch.float64) @ weight.to(torch.float64).T  # [T, N]
    if bias is not None:
        out = out + bias.to(torch.float64)
    return out


def logits_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.double() @ weight.double().t()


def prepare_linear_weight_reference(weight: torch.Tensor) -> torch.Tensor:
    """The same values: only the memory layout may change."""
    return weight.clone()


def argmax_reference(logits: torch.Tensor) -> torch.Tensor:
    """Index of the first maximum of each row, spelled out rather than trusting torch.argmax."""
    x = logits.to(torch.float64)  # [B, V]; exact for every float input dtype
    is_max = x == x.max(dim=-1, keepdim=True).values  # [B, V]
    vocab = x.shape[-1]
    index = torch.arange(vocab, dtype=torch.int64).expand_as(x)
    # Non-maxima get index V, so the row minimum is the first maximum.
    return torch.where(is_max, index, torch.full_like(index, vocab)).min(dim=-1).values


EMBEDDING = OpSpec(
    name="embedding",
    doc="""embedding(ids, table) -> out

    ids:   [T] int64, each in [0, V).
    table: [V, H] float.
    out:   [T, H], table's dtype: out[t] = table[ids[t]]. Compared exactly.
    """,
    reference=embedding_reference,
    exact=True,
)

LINEAR = OpSpec(
    name="linear",
    doc="""linear(x, weight, bias) -> out

    x:      [T, K] float (rows may be strided).
    weight: [N, K], same dtype (the PyTorch / HF layout: one row per output feature).
    bias:   [N] same dtype, or None.
    out:    [T, N], x's dtype: x @ weight.T + bias, accumulated in at least float32.

    Tolerances assume O(1) outputs: inputs at randn scale and weights scaled by 1/sqrt(K), as
    trained layers are. Accumulation error is then absolute on that unit scale (sums cancel, so an
    output near zero keeps the absolute error of its terms, not a relative one).
    """,
    reference=linear_reference,
    tolerances={
        torch.float64: Tolerance(
            2.0**-40,
            2.0**-44,
            "float64 blocked dot products over K <= 4096 terms, terms summing to <= ~0.8 sqrt(K) "
            "in magnitude: ~K u64 * 50 < 2^-40 even in the worst case",
        ),
        torch.float32: Tolerance(
            2.0**-16,
            2.0**-20,
            "fp32 dot products over K <= 4096 terms: the running sums (~sqrt(k/K) at unit output "
            "scale) round by u32 each and those errors add like a random walk, ~sqrt(K/2) u32 = "
            "2^-18.5 rms at K = 4096; 4 sigma: 2^-16 absolute; rtol covers the output rounding",
        ),
        torch.bfloat16: Tolerance(
            2.0**-16,
            1.25 * 2.0**-8,
            "products of bf16 inputs are exact in fp32 and accumulate in fp32 (atol as float32); "
            "the output is rounded once to bf16: u = 2^-8 relative plus a quarter-u margin",
        ),
        torch.float16: Tolerance(
            2.0**-16,
            1.25 * 2.0**-11,
            "products of fp16 inputs are exact in fp32 and accumulate in fp32 (atol as float32); "
            "the output is rounded once to fp16: u = 2^-11 relative plus a quarter-u margin",
        ),
    },
)

LOGITS = OpSpec(
    name="logits",
    doc="""logits(x, weight) -> out

    The LM head: x [T, K] (a half or single dtype, or float64), weight [N, K] same dtype.
    out: [T, N] float32 (float64 for float64 inputs): x @ weight.T accumulated in at least float32.

    Returning the float32 accumulator, not a result rounded to bf16, matters for sampling: logits
    of a few tens sit where bf16's spacing is 0.125, enough to flip near-ties in argmax. The
    tolerances below still admit an implementation that rounds through the input dtype (a CPU
    BLAS with no wider output), so they equal ``linear``'s; a float32-output kernel beats them.
    """,
    reference=logits_reference,
    tolerances=LINEAR.tolerances,
)

ARGMAX = OpSpec(
    name="argmax",
    doc="""argmax(logits) -> ids

    logits: [B, V] float.
    ids:    [B] int64: the index of the FIRST maximum of each row (ties go to the lower index).
    Compared exactly. NaN logits are outside the contract.
    """,
    reference=argmax_reference,
    exact=True,
)

PREPARE_LINEAR_WEIGHT = OpSpec(
    name="prepare_linear_weight",
    doc="""prepare_linear_weight(weight) -> prepared

    weight:   [N, K] float, contiguous (as loaded).
    prepared: [N, K], same dtype and values, in whatever strides this device's ``linear`` reads
              fastest; models call it once per weight at load time and pass the result to
              ``linear`` (and to ``embedding`` for tied tables). Compared exactly.

    Why: a decode step is a matrix-vector product per weight, bound by memory bandwidth, and the
    fastest layout differs by device and dtype (on AVX2 CPUs MKL's fp32 path streams a [K, N]
    column-major matrix about 1.5x faster than the [N, K] row-major one).
    """,
    reference=prepare_linear_weight_reference,
    exact=True,
)
