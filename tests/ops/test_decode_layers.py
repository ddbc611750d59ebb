"""``decode_layers``: a whole stack of decoder layers for one decode step in one op.

The CPU's C step is checked against the float64 reference (the layer loop spelled with each op's
reference) and, bit for bit, against the same ops called one by one, the path the model takes
when the op declines; and it must decline what it does not serve.
"""

from __future__ import annotations

import pytest
import torch
from rustinfer_ops_cpu.native import library
from rustinfer_ops_cpu.quant_native import BATCHES_IN_C
from rustinfer_ops_cpu.step_native import F32_MATRICES

from rustinfer.ops import DecodeDims, build_cos_sin_cache
from rustinfer.ops.decode_layers import LayerStack, decode_layers_reference
from rustinfer.ops.quant import QuantizedWeight

from .helpers import assert_matches_spec, cpu_impl, randn
from .paged import paged_kv
from .quant_helpers import make_weight, weight_values

pytestmark = pytest.mark.skipif(library() is None, reason="no C compiler: no C step")

F32 = torch.float32
H, HQ, HKV, D, INTER, LAYERS, BLOCK = 64, 4, 2, 16, 96, 3, 16
DIMS = DecodeDims(HQ, HKV, D, 1e-5, D**-0.5)


def _layers(fmt: str, qkv_bias: bool) -> tuple[list[dict], LayerStack]:
    """(canonical layers for the reference, the same prepared for the C step); ``fmt`` float32:
    dense weights, column-major for the C step as the CPU's prepare_linear_weight stores them."""
    prepare = cpu_impl("prepare_quantized_weight", F32)
    shapes = {"qkv": ((HQ + 2 * HKV) * D, H), "o": (H, HQ * D), "gate_up": (2 * INTER, H)}
    shapes["down"] = (H, INTER)
    canonical, prepared = [], LayerStack()
    for _ in range(LAYERS):
        layer: dict = {
            "input_norm": 1.0 + 0.3 * randn(H, dtype=F32),
            "post_attn_norm": 1.0 + 0.3 * randn(H, dtype=F32),
            "q_norm": None,
            "k_norm": None,
        }
        for name, (n, k) in shapes.items():
            values = weight_values(n, k, offset=0.5)
            dense = values.t().contiguous().t()  # column-major
            layer[f"{name}_weight"] = dense if fmt == "float32" else make_weight(values, fmt)
            layer[f"{name}_bias"] = None
        if qkv_bias:
            layer["qkv_bias"] = 0.5 * randn(shapes["qkv"][0], dtype=F32)
        canonical.append(layer)
        prepared.append(
            {key: prepare(v) if isinstance(v, QuantizedWeight) else v for key, v in layer.items()}
        )
    return canonical, prepared


def _step(*ctxs: int) -> dict:
    """One sequence per ctx, its new token at position ctx - 1 of random paged caches."""
    caches = []
    for _ in range(LAYERS):
        paged = paged_kv(list(ctxs), BLOCK, HKV, D, F32)
        caches.append((paged.k_cache, paged.v_cache))
    slots = []
    for i, ctx in enumerate(ctxs):
        block = int(paged.block_tables[i, (ctx - 1) // BLOCK])
        slots.append(block * BLOCK + (ctx - 1) % BLOCK)
    return {
        "hidden": randn(len(ctxs), H, dtype=F32),
        "positions": torch.tensor([ctx - 1 for ctx in ctxs]),
        "cos_sin_cache": build_cos_sin_cache(D, 256, 10000.0, None, dtype=F32),
        "kv_caches": caches,
        "slot_mapping": torch.tensor(slots),
        # Every layer's cache is read through one block table (as the engine's are).
        "block_tables": paged.block_tables,
        "seq_lens": paged.seq_lens,
    }


def _call(fn, step: dict, layers: list[dict]):  # type: ignore[no-untyped-def]
    x = cpu_impl("rmsnorm", F32)(step["hidden"], layers[0]["input_norm"], DIMS.eps)
    return fn(
        x,
        step["hidden"],
        layers,
        step["positions"],
        step["cos_sin_cache"],
        step["kv_caches"],
        step["slot_mapping"],
        step["block_tables"],
        step["seq_lens"],
        DIMS,
    )


def _one_by_one(step: dict, layers: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's layer loop through the CPU's ops, as the model runs it without the op."""
    op = {name: cpu_impl(name, F32) for name in ("rmsnorm", "fused_add_rmsnorm", "rope_kv_store")}
    # The model's own path without the op: each op as the registry picks it for float32.
    op.update({name: cpu_impl(name, F32) for name in ("attention_decode", "silu_and_mul")})
    linear = cpu_impl("quantized_linear", F32)
    hq, hkv, d, eps, scale = DIMS
    hidden, residual = step["hidden"], step["hidden"]
    t = hidden.shape[0]
    x = op["rmsnorm"](hidden, layers[0]["input_norm"], eps)
    for i, (layer, (k_cache, v_cache)) in enumerate(zip(layers, step["kv_caches"], strict=True)):
        if i > 0:
            x, residual = op["fused_add_rmsnorm"](hidden, residual, layer["input_norm"], eps)
        qkv = linear(x, layer["qkv_weight"], layer["qkv_bias"])
        q = qkv[:, : hq * d].view(t, hq, d)
        k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
        v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
        q = op["rope_kv_store"](
            q, k, v, step["positions"], step["cos_sin_cache"], k_cache, v_cache,
            step["slot_mapping"],
        )  # fmt: skip
        o = op["attention_decode"](
            q, k_cache, v_cache, step["block_tables"], step["seq_lens"], scale
        )
        o = linear(o.reshape(t, hq * d), layer["o_weight"], None)
        x, residual = op["fused_add_rmsnorm"](o, residual, layer["post_attn_norm"], eps)
        gate_up = linear(x, layer["gate_up_weight"], None)
        hidden = linear(op["silu_and_mul"](gate_up), layer["down_weight"], None)
    return hidden, residual


def _clone(step: dict) -> dict:
    out = dict(step)
    out["kv_caches"] = [(k.clone(), v.clone()) for k, v in step["kv_caches"]]
    return out


@pytest.mark.parametrize("qkv_bias", [False, True], ids=["nobias", "qkvbias"])
@pytest.mark.parametrize("fmt", ["q4_1", "q8_0", "int4", "float32"])
@pytest.mark.parametrize("ctxs", [(1,), (37,), (5, 37, 20)], ids=["first", "one", "batch"])
def test_c_step_matches_reference(fmt: str, qkv_bias: bool, ctxs: tuple[int, ...]) -> None:
    if fmt == "float32" and not F32_MATRICES:
        pytest.skip("the C step's float32 kernel needs AVX-512")
    if len(ctxs) > 1 and not BATCHES_IN_C:
        pytest.skip("without AVX512-VNNI batches run op by op")
    canonical, prepared = _layers(fmt, qkv_bias)
    step = _step(*ctxs)
    before = _clone(step)
    result = _call(cpu_impl("decode_layers", F32), step, prepared)
    assert result is not None, "the C step declined a model it serves"
    ref_out, ref_residual, ref_caches = _call(decode_layers_reference, before, canonical)
    assert_matches_spec("decode_layers", result[0], ref_out, F32)
    assert_matches_spec("decode_layers", result[1], ref_residual, F32)
    slots = step["slot_mapping"]
    for (k, v), (k_ref, v_ref) in zip(step["kv_caches"], ref_caches, strict=True):
        kf, vf = k.view(-1, HKV, D)[slots], v.view(-1, HKV, D)[slots]
        assert_matches_spec("decode_layers", kf, k_ref.view(-1, HKV, D)[slots], F32)
        assert_matches_spec("decode_layers", vf, v_ref.view(-1, HKV, D)[slots], F32)
        # Only the new tokens' slots are written.
        k.view(-1, HKV, D)[slots] = k_ref.view(-1, HKV, D)[slots].float()
        v.view(-1, HKV, D)[slots] = v_ref.view(-1, HKV, D)[slots].float()
    for (k, v), (k0, v0) in zip(step["kv_caches"], before["kv_caches"], strict=True):
        mask = torch.ones(k.view(-1, HKV, D).shape[0], dtype=torch.bool)
        mask[slots] = False
        assert torch.equal(k.view(-1, HKV, D)[mask], k0.view(-1, HKV, D)[mask])
        assert torch.equal(v.view(-1, HKV, D)[mask], v0.view(-1, HKV, D)[mask])


@pytest.mark.parametrize("ctxs", [(40,), (40, 3, 17, 64, 9)], ids=["one", "batch"])
@pytest.mark.parametrize("fmt", ["q4_1", "q8_0", "int4"])
def test_c_step_equals_the_ops_one_by_one(fmt: str, ctxs: tuple[int, ...]) -> None:
    """The step strings together the very C pieces the single ops call: the same bits out."""
    if len(ctxs) > 1 and not BATCHES_IN_C:
        pytest.skip("without AVX512-VNNI batches run op by op")
    _, prepared = _layers(fmt, qkv_bias=True)
    step = _step(*ctxs)
    plain = _clone(step)
    fused = _call(cpu_impl("decode_layers", F32), step, prepared)
    assert fused is not None
    out, residual = _one_by_one(plain, prepared)
    assert torch.equal(fused[0], out)
    assert torch.equal(fused[1], residual)
    for (k, v), (k1, v1) in zip(step["kv_caches"], plain["kv_caches"], strict=True):
        assert torch.equal(k, k1) and torch.equal(v, v1)


def test_c_step_declines_what_it_does_not_serve() -> None:
    """None (the model then runs op by op) for q/k norms, float weights, and batches where the
    block kernel does not serve them."""
    step_op = cpu_impl("decode_layers", F32)
    _, prepared = _layers("q4_1", qkv_bias=False)
    step = _step(9)
    if not BATCHES_IN_C:
        batch = _step(9, 12)
        assert _call(step_op, batch, prepared) is None
    normed = LayerStack(
        dict(layer, q_norm=torch.ones(D), k_norm=torch.ones(D)) for layer in prepared
    )
    assert _call(step_op, step, normed) is None
    row_major = LayerStack(dict(layer) for layer in prepared)
    row_major[1]["down_weight"] = randn(H, INTER, dtype=F32)
    assert _call(step_op, step, row_major) is None
    assert _call(step_op, step, prepared) is not None
