"""GGUF k-quants (Q2_K..Q6_K) and Q5_0/Q5_1: decoded against an independent float64 decoder and
gguf's own, Q4_K kept quantized as int4 through a whole model, unsupported types refused.

The float64 decoders below follow llama.cpp's ``dequantize_row_*`` loops block by block, reading
bytes at their offsets in ggml-common.h's structs: a different shape of code from the loader's
vectorized one, so a misread field cannot agree by accident.
"""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
import torch
from loader_helpers import PROJECTION_DIMS, random_blocks, write_gguf
from model_helpers import prefill_logits

from rustinfer.config import QuantizationConfig
from rustinfer.errors import ModelLoadError
from rustinfer.loaders import load_model_source
from rustinfer.loaders.dequant import SUPPORTED_TYPES
from rustinfer.ops import QUANTIZED_LINEAR
from rustinfer.ops.quant import QuantizedWeight, quantized_linear_reference
from rustinfer.plugins import get_registries
from rustinfer.runtime.loading import load_model

QT = gguf.GGMLQuantizationType
GGUF = QuantizationConfig("gguf")
K_TYPES = [QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K]
BLOCK_TYPES = [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, *K_TYPES]


# ---- the independent float64 decoders, one block at a time ----------------------------------------


def _f16(block: bytes, offset: int) -> float:
    return struct.unpack_from("<e", block, offset)[0]


def _legacy(block: bytes, kind: QT) -> list[float]:
    """Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: 32 values."""
    d = _f16(block, 0)
    if kind == QT.Q8_0:
        return [d * q for q in struct.unpack_from("32b", block, 2)]
    has_min = kind in (QT.Q4_1, QT.Q5_1)
    m = _f16(block, 2) if has_min else 0.0
    at = 4 if has_min else 2
    qh = 0
    if kind in (QT.Q5_0, QT.Q5_1):
        qh = struct.unpack_from("<I", block, at)[0]
        at += 4
    qs = block[at : at + 16]
    offset = {QT.Q4_0: 8, QT.Q5_0: 16}.get(kind, 0)
    y = [0.0] * 32
    for j in range(16):
        x0 = (qs[j] & 0x0F) | (((qh >> j) & 1) << 4)
        x1 = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)
        y[j] = d * (x0 - offset) + m
        y[j + 16] = d * (x1 - offset) + m
    return y


def _q2_k(block: bytes) -> list[float]:
    scales, qs = block[0:16], block[16:80]
    d, dmin = _f16(block, 80), _f16(block, 82)
    y, i = [], 0
    for n in (0, 128):
        q = qs[n // 4 : n // 4 + 32]
        for shift in (0, 2, 4, 6):
            for half in (0, 1):
                sc = scales[i]
                i += 1
                for t in range(16):
                    code = (q[16 * half + t] >> shift) & 3
                    y.append(d * (sc & 0x0F) * code - dmin * (sc >> 4))
    return y


def _q3_k_scales(packed: bytes) -> tuple[int, ...]:
    # llama.cpp's way: three 32-bit words remixed with masks into four.
    kmask1, kmask2 = 0x03030303, 0x0F0F0F0F
    a0, a1, tmp = struct.unpack("<3I", packed)
    words = (
        (a0 & kmask2) | (((tmp >> 0) & kmask1) << 4),
        (a1 & kmask2) | (((tmp >> 2) & kmask1) << 4),
        ((a0 >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4),
        ((a1 >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4),
    )
    return struct.unpack("16b", struct.pack("<4I", *words))


def _q3_k(block: bytes) -> list[float]:
    hmask, qs = block[0:32], block[32:96]
    scales, d = _q3_k_scales(block[96:108]), _f16(block, 108)
    y, i, m = [], 0, 1
    for n in (0, 128):
        q = qs[n // 4 : n // 4 + 32]
        for shift in (0, 2, 4, 6):
            for half in (0, 1):
                dl = d * (scales[i] - 32)
                i += 1
                for t in range(16 * half, 16 * half + 16):
                    y.append(dl * (((q[t] >> shift) & 3) - (0 if hmask[t] & m else 4)))
            m <<= 1
    return y


def _scale_min_k4(j: int, s: bytes) -> tuple[int, int]:
    if j < 4:
        return s[j] & 63, s[j + 4] & 63
    return (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)


def _q45_k(block: bytes, kind: QT) -> list[float]:
    d, dmin, scales = _f16(block, 0), _f16(block, 2), block[4:16]
    qh, qs = (block[16:48], block[48:176]) if kind == QT.Q5_K else (bytes(32), block[16:144])
    y, u1, u2 = [], 1, 2
    for j in range(4):
        q = qs[32 * j : 32 * j + 32]
        sc1, m1 = _scale_min_k4(2 * j, scales)
        sc2, m2 = _scale_min_k4(2 * j + 1, scales)
        y += [d * sc1 * ((q[t] & 0x0F) + (16 if qh[t] & u1 else 0)) - dmin * m1 for t in range(32)]
        y += [d * sc2 * ((q[t] >> 4) + (16 if qh[t] & u2 else 0)) - dmin * m2 for t in range(32)]
        u1, u2 = u1 << 2, u2 << 2
    return y


def _q6_k(block: bytes) -> list[float]:
    ql, qh = block[0:128], block[128:192]
    sc, d = struct.unpack_from("16b", block, 192), _f16(block, 208)
    y = [0.0] * 256
    for h in range(2):
        lo, hi, s = ql[64 * h :], qh[32 * h :], sc[8 * h :]
        for t in range(32):
            i = t // 16
            q1 = ((lo[t] & 0x0F) | (((hi[t] >> 0) & 3) << 4)) - 32
            q2 = ((lo[t + 32] & 0x0F) | (((hi[t] >> 2) & 3) << 4)) - 32
            q3 = ((lo[t] >> 4) | (((hi[t] >> 4) & 3) << 4)) - 32
            q4 = ((lo[t + 32] >> 4) | (((hi[t] >> 6) & 3) << 4)) - 32
            y[128 * h + t] = d * s[i] * q1
            y[128 * h + t + 32] = d * s[i + 2] * q2
            y[128 * h + t + 64] = d * s[i + 4] * q3
            y[128 * h + t + 96] = d * s[i + 6] * q4
    return y


def reference_decode(kind: QT, stored: np.ndarray) -> np.ndarray:
    """float64 values of ``stored`` (uint8 [rows, bytes per row]), block by block."""
    size = gguf.constants.GGML_QUANT_SIZES[kind][1]
    data = stored.tobytes()
    values: list[float] = []
    for start in range(0, len(data), size):
        block = data[start : start + size]
        if kind == QT.Q2_K:
            values += _q2_k(block)
        elif kind == QT.Q3_K:
            values += _q3_k(block)
        elif kind in (QT.Q4_K, QT.Q5_K):
            values += _q45_k(block, kind)
        elif kind == QT.Q6_K:
            values += _q6_k(block)
        else:
            values += _legacy(block, kind)
    return np.array(values, dtype=np.float64).reshape(stored.shape[0], -1)


def _load_one(tmp_path, stored: np.ndarray, kind: QT, dtype=torch.float32, quantization=None):
    """``stored`` written as a GGUF's one projection, loaded back (``quantization``: None, GGUF)."""
    raw = {"blk.0.ffn_up.weight": (stored, kind)}
    path = write_gguf(tmp_path / f"{kind.name}.gguf", {}, raw=raw)
    [(_, got)] = list(load_model_source(path).weights(dtype, quantization))
    return got


# ---- decoding -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BLOCK_TYPES, ids=lambda k: k.name)
@pytest.mark.parametrize(("rows", "cols"), [(1, 256), (3, 768)])
def test_blocks_decode_as_the_layout_defines_and_as_gguf_does(tmp_path, kind, rows, cols):
    # Random bits everywhere, fp16 fields over their whole finite range (subnormals included).
    stored = random_blocks(kind, rows, cols, np.random.default_rng(rows * cols + kind))
    got = _load_one(tmp_path, stored, kind)
    assert got.dtype == torch.float32 and tuple(got.shape) == (rows, cols)
    # Each value is a small integer times fp16 scales (exact in float32), less a min: the float64
    # decoding rounded once to float32 must match to the bit.
    expected = reference_decode(kind, stored).astype(np.float32)
    np.testing.assert_array_equal(got.numpy(), expected)
    np.testing.assert_array_equal(got.numpy(), gguf.quants.dequantize(stored, kind))


@pytest.mark.parametrize("kind", BLOCK_TYPES, ids=lambda k: k.name)
def test_many_chunks_and_a_ragged_last_one_decode_alike(tmp_path, kind):
    # 601 x 512 values: several of the decoder's chunks, the last one partial.
    stored = random_blocks(kind, 601, 512, np.random.default_rng(7), fp16_scales=(0.01, 0.02))
    as_f32 = _load_one(tmp_path, stored, kind)
    np.testing.assert_array_equal(as_f32.numpy(), gguf.quants.dequantize(stored, kind))
    as_bf16 = _load_one(tmp_path, stored, kind, torch.bfloat16)
    assert torch.equal(as_bf16, as_f32.to(torch.bfloat16))  # one rounding from float32


# ---- Q4_K kept quantized -------------------------------------------------------------------------


# Weight rows of norm ~1 (values ~1/sqrt(K)), as quantized_linear's tolerances assume. Q4_K:
# value = d sc q - dmin m with sc, m uniform in 0..63 and q in 0..15, so dmin = 7.5 d centres it and
# a value's spread is ~250 d. Q6_K: d sc (q - 32) with int8 sc, spread ~1400 d.
def _q4_k_scales(k: int) -> tuple[float, float]:
    d = 1 / (250 * k**0.5)
    return d, 7.5 * d


def _q6_k_scales(k: int) -> tuple[float]:
    return (1 / (1400 * k**0.5),)


def test_q4_k_stays_int4_with_groups_of_32_and_the_same_values(tmp_path):
    n, k = 48, 512
    stored = random_blocks(QT.Q4_K, n, k, np.random.default_rng(3), _q4_k_scales(k))
    kept = _load_one(tmp_path, stored, QT.Q4_K, quantization=GGUF)
    assert isinstance(kept, QuantizedWeight)
    assert (kept.format, kept.group_size, kept.shape) == ("int4", 32, (n, k))
    assert kept.layout == "canonical"
    # Half a byte per value plus a float32 scale and min per 32: not a float copy.
    assert kept.nbytes == n * k // 2 + 2 * 4 * n * k // 32
    dense = _load_one(tmp_path, stored, QT.Q4_K)
    assert torch.equal(kept.dequantize(torch.float32), dense)
    # The canonical float64 values are exact: d * sc and dmin * m are exact float32 scales.
    exact = torch.from_numpy(reference_decode(QT.Q4_K, stored))
    assert torch.equal(kept.dequantize(torch.float64), exact)


@pytest.mark.parametrize("kind", [QT.Q6_K, QT.Q5_K, QT.Q2_K, QT.Q3_K, QT.Q5_0, QT.Q5_1])
def test_other_new_types_are_dequantized_even_under_gguf_quantization(tmp_path, kind):
    stored = random_blocks(kind, 4, 256, np.random.default_rng(5), (0.01, 0.01))
    got = _load_one(tmp_path, stored, kind, quantization=GGUF)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5])
def test_cpu_quantized_linear_serves_a_kept_q4_k_weight(tmp_path, dtype, tokens):
    n, k = 80, 768
    stored = random_blocks(QT.Q4_K, n, k, np.random.default_rng(11), _q4_k_scales(k))
    weight = _load_one(tmp_path, stored, QT.Q4_K, quantization=GGUF)
    ops = get_registries().ops
    prepare = ops.lookup("prepare_quantized_weight", "cpu", dtype, overrides={}).load()
    linear = ops.lookup("quantized_linear", "cpu", dtype, overrides={}).load()
    x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    got = linear(x, prepare(weight), None)
    want = quantized_linear_reference(x, weight, None)
    assert want.std() > 0.5  # unit-scale outputs, as the tolerances assume
    tol = QUANTIZED_LINEAR.tolerance(dtype)
    torch.testing.assert_close(got.double(), want, atol=tol.atol, rtol=tol.rtol)


# ---- a whole model: Q4_K and Q6_K projections, as a Q4_K_M file mixes them ------------------------

TINY_K_LLAMA = {
    "hidden": 256,
    "ffn": 512,
    "heads": 4,
    "kv_heads": 2,
    "head_dim": 64,
    "layers": 2,
    "vocab": 40,
}


def _dim(key: str) -> int:
    hp = TINY_K_LLAMA
    return hp[key] * hp["head_dim"] if key in ("heads", "kv_heads") else hp[key]


@pytest.fixture(scope="module")
def k_quant_llama(tmp_path_factory):
    """Every projection Q4_K but ffn_down (Q6_K) and layer 1's attn_v (Q6_K, so that layer's
    fused QKV mixes types, as llama.cpp's Q4_K_M does in some layers)."""
    hp, rng = TINY_K_LLAMA, np.random.default_rng(0)
    floats = {
        "token_embd.weight": rng.standard_normal((hp["vocab"], hp["hidden"])),
        "output_norm.weight": 1 + 0.1 * rng.standard_normal(hp["hidden"]),
    }
    raw = {}
    for i in range(hp["layers"]):
        for norm in ("attn_norm", "ffn_norm"):
            floats[f"blk.{i}.{norm}.weight"] = 1 + 0.1 * rng.standard_normal(hp["hidden"])
        for name, (rows, cols) in PROJECTION_DIMS.items():
            n, k = _dim(rows), _dim(cols)
            q6 = name == "ffn_down" or (i == 1 and name == "attn_v")
            kind = QT.Q6_K if q6 else QT.Q4_K
            scales = _q6_k_scales(k) if q6 else _q4_k_scales(k)
            raw[f"blk.{i}.{name}.weight"] = (random_blocks(kind, n, k, rng, scales), kind)
    tensors = {name: (v.astype(np.float32), QT.F32) for name, v in floats.items()}
    path = tmp_path_factory.mktemp("kq") / "tiny-q4_k_m.gguf"
    return write_gguf(path, tensors, hp=hp, raw=raw)


def test_q4_k_m_style_model_keeps_q4_k_and_matches_the_float_model(k_quant_llama):
    quantized = load_model(k_quant_llama, device="cpu", dtype="float32", quantization="gguf")
    dense = load_model(k_quant_llama, device="cpu", dtype="float32", quantization="none")
    model = quantized.model
    for name in ("layers_0_qkv_weight", "layers_0_o_weight", "layers_1_gate_up_weight"):
        weight = getattr(model, name)
        assert isinstance(weight, QuantizedWeight), name
        assert (weight.format, weight.group_size) == ("int4", 32), name
    # Q6_K matrices, and a fused QKV with a Q6_K part, are float (dequantized exactly).
    for name in ("layers_0_down_weight", "layers_1_qkv_weight"):
        assert isinstance(getattr(model, name), torch.nn.Parameter), name
        assert torch.equal(getattr(model, name), getattr(dense.model, name)), name
    ids = [3, 17, 5, 39, 0, 22, 8, 11, 30]
    got, want = prefill_logits(model, ids), prefill_logits(dense.model, ids)
    # Same weights; the quantized path only rounds activations and scales to bf16 (the
    # quantized_linear spec's float32 allowance). Its atol is for unit-scale outputs, so it scales
    # with the logits' (std ~27 here; measured: largest error 0.29 against 0.85 allowed, while a
    # misplaced nibble or scale moves logits by their whole scale).
    assert want.std() > 1.0
    tol = QUANTIZED_LINEAR.tolerance(torch.float32)
    torch.testing.assert_close(got, want, atol=tol.atol * want.std().item(), rtol=tol.rtol)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


# ---- what still cannot load ---------------------------------------------------------------------


def test_still_unsupported_type_names_the_tensor_and_every_supported_type(tmp_path):
    # IQ4_NL: 32-value blocks of 18 bytes (its bits never get read: the type is refused first).
    stored = np.random.default_rng(0).integers(0, 256, size=(4, 2 * 18), dtype=np.uint8)
    path = write_gguf(tmp_path / "iq.gguf", {}, raw={"blk.0.ffn_up.weight": (stored, QT.IQ4_NL)})
    for quantization in (None, GGUF):
        with pytest.raises(ModelLoadError) as info:
            list(load_model_source(path).weights(torch.float32, quantization))
        message = str(info.value)
        assert "blk.0.ffn_up.weight" in message and "IQ4_NL" in message
        assert all(t in message for t in ("F16", "Q8_0", "Q4_1", "Q5_0", "Q2_K", "Q4_K", "Q6_K"))
    assert set(SUPPORTED_TYPES) >= {t.name for t in BLOCK_TYPES}
