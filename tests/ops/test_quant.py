"""Quantized weights (rustinfer.ops.quant) and the CPU ``quantized_linear`` against its spec."""

from __future__ import annotations

import gguf
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rustinfer.ops import QUANTIZED_LINEAR
from rustinfer.ops.quant import QuantizedWeight, pack_nibbles, quantize, unpack_nibbles
from rustinfer.plugins import get_registries

from .helpers import assert_matches_spec, cpu_impl, dtype_id, maybe_strided, randn
from .quant_helpers import FORMATS, GGUF_KINDS, make_weight, weight_values

# Each test runs through the C kernels and the torch ones (conftest.py).
pytestmark = pytest.mark.usefixtures("both_cpu_impls")

CPU_DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("format", list(GGUF_KINDS))
@pytest.mark.parametrize(("n", "k"), [(1, 32), (7, 96), (3, 576)])
def test_gguf_dequantize_equals_gguf_reference_decoder(format: str, n: int, k: int) -> None:
    values = weight_values(n, k, offset=2.0)
    weight = make_weight(values, format)
    kind = GGUF_KINDS[format]
    expected = gguf.quants.dequantize(gguf.quants.quantize(values.numpy(), kind), kind)
    # The decoder's float32 values are exact (small integer times fp16 scale, plus fp16 min).
    assert torch.equal(weight.dequantize(torch.float32), torch.from_numpy(expected).reshape(n, k))


@pytest.mark.parametrize("format", ["int8", "int4"])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_own_formats_round_to_nearest_within_half_a_step(format: str, group: int) -> None:
    values = weight_values(9, 384, offset=3.0)
    weight = quantize(values, format, group)
    got = weight.dequantize(torch.float64)
    blocks = values.double().view(9, -1, group)
    if format == "int8":
        step = blocks.abs().amax(-1, keepdim=True) / 127
    else:
        step = (blocks.amax(-1, keepdim=True) - blocks.amin(-1, keepdim=True)) / 15
    error = (got.view(9, -1, group) - blocks).abs()
    assert (error <= step / 2 * (1 + 1e-5)).all()
    # And it is not trivially exact: the codes carry real rounding.
    assert error.max() > step.min() / 8


def test_constant_groups_quantize_exactly() -> None:
    values = torch.zeros(2, 64)
    values[1] = 0.25
    for format in ("int8", "int4"):
        assert torch.equal(quantize(values, format, 32).dequantize(torch.float32), values)


def test_nibbles_round_trip_in_llama_cpp_order() -> None:
    codes = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (3, 32)
    # byte j of a 32-value run: value j low, value j + 16 high.
    assert torch.equal(packed[:, 5], codes[:, 5] | (codes[:, 21] << 4))
    assert torch.equal(unpack_nibbles(packed), codes)


@pytest.mark.parametrize("format", FORMATS)
def test_cat_rows_and_select_rows_move_whole_rows(format: str) -> None:
    parts = [make_weight(weight_values(n, 64, offset=1.0), format) for n in (5, 3, 8)]
    stacked = QuantizedWeight.cat_rows(parts)
    assert stacked.shape == (16, 64)
    assert torch.equal(stacked.dequantize(), torch.cat([p.dequantize() for p in parts]))
    order = torch.randperm(16)
    assert torch.equal(stacked.select_rows(order).dequantize(), stacked.dequantize()[order])


def test_cat_rows_refuses_mixed_formats() -> None:
    a, b = make_weight(weight_values(2, 64), "q8_0"), make_weight(weight_values(2, 64), "q4_0")
    with pytest.raises(ValueError, match="different formats"):
        QuantizedWeight.cat_rows([a, b])


def test_bad_group_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="groups of 128"):
        quantize(torch.zeros(4, 576), "int4", 128)  # 576 = 4.5 x 128
    with pytest.raises(ValueError, match="group size"):
        quantize(torch.zeros(4, 64), "int8", 48)


def check_cpu(
    format: str, m: int, n: int, k: int, dtype: torch.dtype, *, bias: bool, strided: bool,
    group: int = 32, offset: float = 1.0,
) -> None:  # fmt: skip
    weight = make_weight(weight_values(n, k, offset=offset), format, group)
    x = randn(m, k, dtype=dtype)
    b = randn(n, dtype=dtype) if bias else None
    prepared = cpu_impl("prepare_quantized_weight", dtype)(weight)
    assert prepared.shape == weight.shape and prepared.format == weight.format
    out = cpu_impl("quantized_linear", dtype)(maybe_strided(x, strided), prepared, b)
    reference = QUANTIZED_LINEAR.reference(x, weight, b)
    if reference.numel() >= 16:  # outputs with scale (O(1)): a wrong code or scale shows
        assert reference.std() > 0.5
    assert_matches_spec("quantized_linear", out, reference, dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize(("m", "n", "k"), [(1, 1, 32), (5, 17, 96), (1, 960, 576), (64, 48, 576)])
@pytest.mark.parametrize("strided", [False, True])
def test_cpu_quantized_linear(
    format: str, m: int, n: int, k: int, dtype: torch.dtype, strided: bool
) -> None:
    check_cpu(format, m, n, k, dtype, bias=m == 5, strided=strided)


@pytest.mark.parametrize("format", ["int8", "int4"])
@pytest.mark.parametrize("group", [64, 128])
def test_cpu_quantized_linear_larger_groups(format: str, group: int) -> None:
    check_cpu(format, 3, 32, 1536, torch.bfloat16, bias=False, strided=False, group=group)


@settings(max_examples=20, deadline=None)
@given(
    format=st.sampled_from(FORMATS),
    m=st.integers(1, 9),
    n=st.integers(1, 40),
    blocks=st.integers(1, 6),
    dtype=st.sampled_from(CPU_DTYPES),
    offset=st.sampled_from([0.0, 1.0]),  # O(1) outputs, the scale the tolerance assumes
    seed=st.integers(0, 2**31),
)
def test_cpu_quantized_linear_property(format, m, n, blocks, dtype, offset, seed) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    weight = make_weight(weight_values(n, 32 * blocks, offset=offset), format)
    x = randn(m, 32 * blocks, dtype=dtype)
    out = cpu_impl("quantized_linear", dtype)(
        x, cpu_impl("prepare_quantized_weight", dtype)(weight), None
    )
    assert_matches_spec("quantized_linear", out, QUANTIZED_LINEAR.reference(x, weight, None), dtype)


def test_wrong_nibble_order_would_fail_the_tolerance() -> None:
    """The check has teeth: the same codes read with the two nibbles of each byte swapped."""
    weight = make_weight(weight_values(16, 64), "q4_0")
    swapped = QuantizedWeight(
        "q4_0", weight.shape, 32, codes=(weight.codes >> 4) | (weight.codes << 4),
        scales=weight.scales,
    )  # fmt: skip
    x = randn(4, 64, dtype=torch.float32)
    out = cpu_impl("quantized_linear", torch.float32)(
        x, cpu_impl("prepare_quantized_weight", torch.float32)(swapped), None
    )
    with pytest.raises(AssertionError):
        assert_matches_spec(
            "quantized_linear", out, QUANTIZED_LINEAR.reference(x, weight, None), torch.float32
        )


def _torch_int4pack(codes: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)


@pytest.mark.parametrize("n", [16, 48, 64, 80, 112, 960])
@pytest.mark.parametrize("k", [32, 96, 1152])
def test_int4pack_equals_torchs_converter(n: int, k: int) -> None:
    """The rebuilt layout is torch's, byte for byte: whole blocks, a partial last block (16-48
    rows), and a weight that is only a partial block."""
    from rustinfer_ops_cpu.int4pack import pack_int4

    codes = torch.randint(
        0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(n)
    )
    assert torch.equal(pack_int4(codes), _torch_int4pack(codes))


def test_int4pack_falls_back_to_torch_when_the_layout_check_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A torch whose layout no longer matches the rebuild gets its own converter, never wrong
    bytes: the check runs on a probe before any weight is packed."""
    from rustinfer_ops_cpu import int4pack

    def wrong(codes: torch.Tensor, block: int) -> torch.Tensor:
        return torch.zeros((codes.shape[0], codes.shape[1] // 2), dtype=torch.uint8)

    monkeypatch.setattr(int4pack, "_fast_pack", wrong)
    int4pack._block_rows.cache_clear()
    try:
        codes = torch.randint(0, 16, (64, 64), dtype=torch.uint8)
        assert int4pack._block_rows() is None
        assert torch.equal(int4pack.pack_int4(codes), _torch_int4pack(codes))
    finally:
        int4pack._block_rows.cache_clear()


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("format", ["q8_0", "q4_1", "int8"])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 1000, 576), (3, 37, 96)])
def test_cpu_quantized_logits(format: str, m: int, n: int, k: int, dtype: torch.dtype) -> None:
    """The LM head on a quantized weight keeps ``logits``' float32 accuracy: its tolerance is
    2^-11 where ``quantized_linear``'s is 2^-5 (C kernel only: torch has no float32-accurate
    quantized kernel, so a model keeps a float head there). The output is float32 whatever x
    is, so it is held to the float32 tolerance."""
    from rustinfer.ops import QUANTIZED_LOGITS

    weight = make_weight(weight_values(n, k, offset=1.0), format)
    x = randn(m, k, dtype=dtype)
    registry = get_registries().ops
    prepared = registry.lookup("prepare_quantized_weight", "cpu", dtype, overrides={}).load()(
        weight
    )
    out = registry.lookup("quantized_logits", "cpu", dtype, overrides={}).load()(x, prepared)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    reference = QUANTIZED_LOGITS.reference(x, weight)
    assert reference.std() > 0.5  # outputs with scale
    assert_matches_spec("quantized_logits", out, reference, torch.float32)
    if dtype == torch.float32:
        # With teeth: float32 activations rounded to bf16 first (torch's int4 kernel does) miss
        # this tolerance.
        rounded = QUANTIZED_LOGITS.reference(x.bfloat16(), weight).float()
        with pytest.raises(AssertionError):
            assert_matches_spec("quantized_logits", rounded, reference, torch.float32)


@pytest.mark.parametrize("format", FORMATS)
def test_native_layout_round_trips_to_the_same_values(format: str) -> None:
    """The C kernel's tiles (N padded to 4) hold the canonical values exactly: read back, they
    dequantize to the very same numbers (the batched path builds torch's copy from them), and
    the C widening gives them in float32 bit for bit."""
    from rustinfer_ops_cpu.quant_native import (
        _dequantized,
        canonical_from_packed,
        plan_of,
        prepare_quantized_weight,
    )

    weight = make_weight(weight_values(37, 192, offset=1.0), format)
    prepared = prepare_quantized_weight(weight)
    back = canonical_from_packed(prepared)
    assert torch.equal(back.dequantize(), weight.dequantize())
    # The C widening the prompt path multiplies by: float32 values as dequantize rounds them.
    packed, bits, half, shift, n_pad, n, k = plan_of(prepared)
    widened = _dequantized(packed, bits, half, shift, n_pad, k)
    assert torch.equal(widened[:n], weight.dequantize(torch.float32))
    assert not widened[n:].any()  # the padding rows are zeros
