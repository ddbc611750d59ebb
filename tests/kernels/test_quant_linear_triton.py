"""The Triton ``quantized_linear`` (both kernels, every format) against the float64 spec
reference on the canonical weight. Inputs have outputs of scale (rows of norm ~1 with a per-row
offset, so mins and q4_0's offset move outputs by O(1)): a kernel that drops a group, swaps the
nibbles of a byte or ignores mins misses the tolerance by far (the mutation tests show it).

Interpret lane: small odd shapes; the GEMV in bf16, fp16 and fp32, the tl.dot tiles in fp16 and
fp32 (the interpreter's bf16 dot is wrong). cuda lane: bf16 (and the other dtypes) at
Llama-3.2-1B's shapes, and the GEMV as a programmatic dependent inside a captured graph. The
weights are quantized here in torch, on the lane's device (the GPU image has no gguf package, and
the reference runs on the GPU in float64 there).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ops.helpers import assert_matches_spec, dtype_id, maybe_strided
from rustinfer_ops_cuda.kernels.quant_linear import (
    FEW_ROWS,
    FEW_ROWS_KERNEL_MAX,
    prepare_quantized_weight,
    quantized_linear,
    quantized_linear_few_rows,
    quantized_linear_tiled,
)

from rustinfer.ops import QUANTIZED_LINEAR
from rustinfer.ops.quant import QuantizedWeight, pack_nibbles, quantize
from rustinfer.plugins import get_registries

from .lanes import LANE_DEVICE
from .layer_chain import check_layer_chain_in_graph

FORMATS = ["q8_0", "q4_0", "q4_1", "int8", "int4"]
Kernel = Callable[[torch.Tensor, QuantizedWeight, torch.Tensor | None], torch.Tensor]
REGISTERED = {
    "quantized_linear": quantized_linear,
    "prepare_quantized_weight": prepare_quantized_weight,
}
KERNELS: dict[str, Kernel] = {
    "few_rows": quantized_linear_few_rows,
    "tiled": quantized_linear_tiled,
    "dispatch": quantized_linear,
}


def randn(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """Standard normal values (times ``scale``) on the lane's device, rounded once to ``dtype``."""
    return (torch.randn(*shape, dtype=torch.float64, device=LANE_DEVICE) * scale).to(dtype)


def weight_values(n: int, k: int, offset: float) -> torch.Tensor:
    """[N, K] like a trained layer (rows of norm ~1, so x @ W.T is O(1) for randn x), plus a
    per-row ``offset`` in the same unit: what makes mins and q4_0's offset matter."""
    rows = randn(n, k, dtype=torch.float64, scale=k**-0.5)
    return rows + randn(n, 1, dtype=torch.float64, scale=offset * k**-0.5)


def _gguf_like(values: torch.Tensor, format: str) -> QuantizedWeight:
    """Q8_0 / Q4_0 / Q4_1 blocks of 32 rounded to nearest (llama.cpp's encoder picks d and m the
    same way; the tests need valid codes, not its exact bits: the reference reads these)."""
    n, k = values.shape
    blocks = values.to(torch.float32).view(n, k // 32, 32)
    if format == "q8_0":
        d = (blocks.abs().amax(-1) / 127).half()
        lo = torch.zeros_like(d)
    elif format == "q4_0":
        extreme = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True)).squeeze(-1)
        d = (extreme / -8).half()
        lo = -8 * d.float()
    else:
        d = ((blocks.amax(-1) - blocks.amin(-1)) / 15).half()
        lo = blocks.amin(-1).half().float()
    step = torch.where(d == 0, torch.ones_like(d), d).float()[..., None]
    codes = torch.round((blocks - lo[..., None]) / step)
    if format == "q8_0":
        codes = codes.clamp(-127, 127).to(torch.int8).view(n, k)
        return QuantizedWeight("q8_0", (n, k), 32, codes=codes, scales=d)
    packed = pack_nibbles(codes.clamp(0, 15).view(n, k))
    if format == "q4_0":
        return QuantizedWeight("q4_0", (n, k), 32, codes=packed, scales=d)
    return QuantizedWeight("q4_1", (n, k), 32, codes=packed, scales=d, mins=lo.half())


def make_weight(
    n: int, k: int, format: str, group: int = 32, offset: float = 1.0
) -> QuantizedWeight:
    """A canonical ``format`` weight [N, K] on the lane's device."""
    values = weight_values(n, k, offset)
    if format in ("int8", "int4"):
        return quantize(values, format, group)
    return _gguf_like(values, format)


@functools.cache
def shared_weight(n: int, k: int, format: str, group: int = 32) -> QuantizedWeight:
    """One weight per shape and format for the GPU's many large cases (quantizing 33M values
    each time would dominate the lane)."""
    return make_weight(n, k, format, group)


def run(
    kernel: str,
    weight: QuantizedWeight,
    m: int,
    dtype: torch.dtype,
    *,
    bias: bool,
    strided: bool,
    reference_weight: QuantizedWeight | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel output, float64 reference) for randn activations [m, K]; the reference on
    ``reference_weight`` when given (the right weight, where ``weight`` is a broken one)."""
    k = weight.shape[1]
    x = randn(m, k, dtype=dtype)
    b = randn(weight.shape[0], dtype=dtype) if bias else None
    reference = QUANTIZED_LINEAR.reference(x, reference_weight or weight, b)
    out = KERNELS[kernel](maybe_strided(x, strided), prepare_quantized_weight(weight), b)
    assert out.shape == (m, weight.shape[0]) and out.dtype == dtype
    return out, reference


def check(
    kernel: str,
    format: str,
    m: int,
    n: int,
    k: int,
    dtype: torch.dtype,
    *,
    bias: bool,
    strided: bool,
    group: int = 32,
    shared: bool = False,
) -> None:
    weight = (shared_weight if shared else make_weight)(n, k, format, group)
    out, reference = run(kernel, weight, m, dtype, bias=bias, strided=strided)
    if reference.numel() >= 16:  # outputs with scale: a wrong code, group or min shows
        assert reference.std() > 0.5
    assert_matches_spec("quantized_linear", out, reference, dtype)


# (M, N, K): N prime (the last program's rows partly out of range); K = 96 is 3 groups (one chunk
# of 4, the last masked), 256 is 8 groups.
FEW_ROW_CASES = [(1, 37, 256), (3, 19, 96)]


@pytest.mark.interpret
@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize(("m", "n", "k"), FEW_ROW_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=dtype_id)
def test_few_rows_interpret(format: str, m: int, n: int, k: int, dtype: torch.dtype) -> None:
    check("few_rows", format, m, n, k, dtype, bias=m > 1, strided=m > 1)


@pytest.mark.interpret
@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_tiled_interpret(format: str, dtype: torch.dtype, bias: bool) -> None:
    # 21 rows in a 32-row tile, 37 weight rows in a 64-row one (the interpreter takes the widest
    # tile that fits); strided rows.
    check("tiled", format, 21, 37, 96 if bias else 256, dtype, bias=bias, strided=True)


@pytest.mark.interpret
@pytest.mark.parametrize("format", ["q4_1", "q8_0"])
def test_tiled_many_programs_interpret(format: str) -> None:
    # 150 tokens and 130 weight rows: 2 x 2 programs of 128 x 128, each partly out of range.
    check("tiled", format, 150, 130, 64, torch.float16, bias=True, strided=False)


@pytest.mark.interpret
@pytest.mark.parametrize("format", ["int8", "int4"])
@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("kernel", ["few_rows", "tiled"])
def test_larger_groups_interpret(format: str, group: int, kernel: str) -> None:
    m = 2 if kernel == "few_rows" else 17
    check(kernel, format, m, 11, 384, torch.float16, bias=False, strided=False, group=group)


@pytest.mark.interpret
def test_few_rows_kernel_takes_its_most_rows() -> None:
    check("few_rows", "q4_1", FEW_ROWS_KERNEL_MAX, 5, 64, torch.bfloat16, bias=True, strided=True)


@pytest.mark.interpret
@pytest.mark.parametrize("m", [FEW_ROWS, FEW_ROWS + 1])
def test_dispatch_either_side_of_the_row_limit(m: int) -> None:
    check("dispatch", "q4_0", m, 9, 64, torch.float16, bias=False, strided=False)


@pytest.mark.interpret
def test_no_rows() -> None:
    weight = make_weight(7, 64, "q4_0")
    out = quantized_linear(
        torch.zeros(0, 64, dtype=torch.float16, device=LANE_DEVICE), weight, None
    )
    assert out.shape == (0, 7) and out.dtype == torch.float16


def _broken(weight: QuantizedWeight, how: str) -> QuantizedWeight:
    """``weight`` as a kernel with one bug would read it."""
    tensors = {"codes": weight.codes, "scales": weight.scales.clone()}
    fmt = weight.format
    if weight.spec.has_mins:
        tensors["mins"] = weight.mins
    if how == "swapped_nibbles":
        tensors["codes"] = (weight.codes >> 4) | (weight.codes << 4)
    elif how == "dropped_group":
        tensors["scales"][:, 1] = 0
    elif how == "ignored_mins":
        tensors["mins"] = torch.zeros_like(weight.mins)
    elif how == "ignored_offset":  # q4_0 read as c * d
        fmt, tensors["mins"] = "q4_1", torch.zeros_like(weight.scales)
    return QuantizedWeight(fmt, weight.shape, weight.group_size, **tensors)


@pytest.mark.interpret
@pytest.mark.parametrize(
    ("format", "how"),
    [
        ("q4_0", "swapped_nibbles"),
        ("q4_0", "ignored_offset"),
        ("q8_0", "dropped_group"),
        ("q4_1", "ignored_mins"),
        ("int4", "ignored_mins"),
    ],
)
@pytest.mark.parametrize("kernel", ["few_rows", "tiled"])
def test_a_broken_kernel_would_fail(format: str, how: str, kernel: str) -> None:
    """The checks have teeth: the kernels fed the weight a buggy kernel would see miss the
    reference of the true weight by far more than the tolerance."""
    weight = make_weight(16, 96, format)
    m = 1 if kernel == "few_rows" else 17
    out, reference = run(
        kernel, _broken(weight, how), m, torch.float32, bias=False, strided=False,
        reference_weight=weight,
    )  # fmt: skip
    with pytest.raises(AssertionError):
        assert_matches_spec("quantized_linear", out, reference, torch.float32)


@pytest.mark.interpret
@settings(max_examples=12, deadline=None)
@given(
    format=st.sampled_from(FORMATS),
    m=st.integers(1, 24),
    n=st.integers(1, 24),
    blocks=st.integers(1, 5),
    dtype=st.sampled_from([torch.float16, torch.float32]),
    offset=st.sampled_from([0.0, 1.0]),
    seed=st.integers(0, 2**31),
)
def test_quantized_linear_property(format, m, n, blocks, dtype, offset, seed) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    weight = make_weight(n, 32 * blocks, format, offset=offset)
    out, reference = run("dispatch", weight, m, dtype, bias=seed % 2 == 1, strided=False)
    assert_matches_spec("quantized_linear", out, reference, dtype)


@pytest.mark.interpret
def test_arguments_are_checked() -> None:
    weight = make_weight(8, 64, "q4_1")
    x = torch.zeros(2, 64, dtype=torch.float16)
    with pytest.raises(TypeError, match="x has dtype float64"):
        quantized_linear(x.double(), weight, None)
    with pytest.raises(ValueError, match="x has shape"):
        quantized_linear(torch.zeros(2, 96, dtype=torch.float16), weight, None)
    with pytest.raises(TypeError, match="bias has dtype"):
        quantized_linear(x, weight, torch.zeros(8))
    with pytest.raises(ValueError, match="rows"):
        quantized_linear_few_rows(torch.zeros(FEW_ROWS_KERNEL_MAX + 1, 64), weight, None)
    private = QuantizedWeight("q4_1", (8, 64), 32, layout="elsewhere", packed=weight.codes)
    with pytest.raises(ValueError, match="canonical"):
        quantized_linear(x, private, None)
    with pytest.raises(ValueError, match="canonical"):
        prepare_quantized_weight(private)
    assert prepare_quantized_weight(weight) is weight


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=dtype_id)
def test_auto_keeps_gguf_quantized_on_cuda(monkeypatch: pytest.MonkeyPatch, dtype) -> None:  # type: ignore[no-untyped-def]
    """``--quantization auto`` keeps a GGUF file quantized where the device serves
    ``quantized_linear`` (the loader asks the registry): on cuda these kernels do. Without a GPU
    an Ampere-or-newer one is pretended, so the registry's real selection runs."""
    from rustinfer.runtime.loading import _serves_quantized  # the loader's own check

    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    regs = get_registries()
    for op in ("quantized_linear", "prepare_quantized_weight"):
        impl = regs.ops.lookup(op, "cuda", dtype, overrides={})
        assert (impl.plugin, impl.load()) == ("ops_cuda", REGISTERED[op])
    assert _serves_quantized(regs, "cuda", dtype)


# Llama-3.2-1B: fused QKV (N = 3072), O (2048), fused gate/up (16384), down (K = 8192); and
# 2048 -> 6144.
LLAMA_1B = [(2048, 3072), (2048, 2048), (2048, 16384), (8192, 2048), (2048, 6144)]


@pytest.mark.cuda
@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("m", [1, 4, 64, 512])
@pytest.mark.parametrize(("k", "n"), LLAMA_1B, ids=lambda v: str(v))
def test_llama_shapes_cuda(format: str, m: int, k: int, n: int) -> None:
    check("dispatch", format, m, n, k, torch.bfloat16, bias=False, strided=m == 4, shared=True)


# (kernel, rows): the GEMV at one row, three (with a bias) and its most; the tiles at one row (a
# 16-token tile that is mostly padding) and at 200 (the last token tile partly out of range).
FORCED = [("few_rows", 1), ("few_rows", 3), ("few_rows", FEW_ROWS_KERNEL_MAX), ("tiled", 1),
          ("tiled", 200)]  # fmt: skip


@pytest.mark.cuda
@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize(("kernel", "m"), FORCED, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=dtype_id)
def test_each_kernel_cuda(format: str, kernel: str, m: int, dtype: torch.dtype) -> None:
    # N = 2047: the last program's rows partly out of range.
    check(kernel, format, m, 2047, 2048, dtype, bias=m in (3, 200), strided=m > 1, shared=True)


@pytest.mark.cuda
@pytest.mark.parametrize("format", ["int8", "int4"])
@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("m", [1, 300])
def test_larger_groups_cuda(format: str, group: int, m: int) -> None:
    check("dispatch", format, m, 1000, 8192, torch.bfloat16, bias=True, strided=False, group=group)


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_in_a_captured_graph_after_the_kernels_ahead(rows: int) -> None:
    """A layer's chain as decode runs it (add+RMSNorm -> quantized gate/up -> SwiGLU -> quantized
    down, twice), captured and replayed: equal to the same kernels run one at a time with a sync
    between each (a GEMV that read its activations before its predecessor finished would
    differ). No host sync: torch's sync checker raises on one in an eager pass, and a capture
    would fail on one."""
    hidden, inter = 2048, 8192
    layers = [
        (randn(hidden, dtype=torch.bfloat16), make_weight(2 * inter, hidden, "q4_1"),
         make_weight(hidden, inter, "q4_0"))
        for _ in range(2)
    ]  # fmt: skip
    x0, r0 = randn(rows, hidden, dtype=torch.bfloat16), randn(rows, hidden, dtype=torch.bfloat16)
    check_layer_chain_in_graph(
        lambda t, w: quantized_linear(t, w, None), layers, x0, r0, no_sync_check=True
    )
