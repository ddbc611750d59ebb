"""``decode_layers``: a whole stack of decoder layers for one decode step in one op.

The CPU's C step is checked against the float64 reference (the layer loop spelled with each op's
reference) and, bit for bit, against the same ops called one by one, the path the model takes
when the op declines; and it must decline what it does not serve.
"""

from __future__ import annotations

import pytest
import torch
from rustinfer_ops_cpu.native import library

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
    """(canonical layers for the reference, the same prepared for the C step)."""
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
            layer[f"{name}_weight"] = make_weight(weight_values(n, k, offset=0.5), fmt)
            layer[f"{name}_bias"] = None
        if qkv_bias:
            layer["qkv_bias"] = 0.5 * randn(shapes["qkv"][0], dtype=F32)
        canonical.append(layer)
        prepared.append(
            {key: prepare(v) if isinstance(v, QuantizedWeight) else v for key, v in layer.items()}
        )
    return canonical, prepared


def _step(ctx: int) -> dict:
    """One sequence whose new token sits at position ctx - 1 of random paged caches."""
    caches = []
    for _ in range(LAYERS):
        paged = paged_kv([ctx], BLOCK, HKV, D, F32)
        caches.append((paged.k_cache, paged.v_cache))
    position = ctx - 1
    block = int(paged.block_tables[0, position // BLOCK])
    return {
        "hidden": randn(1, H, dtype=F32),
        "positions": torch.tensor([position]),
        "cos_sin_cache": build_cos_sin_cache(D, 256, 10000.0, None, dtype=F32),
        "kv_caches": caches,
        "slot_mapping": torch.tensor([block * BLOCK + position % BLOCK]),
        # Every layer's cache shares one block table here (as the engine's do).
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
    x = op["rmsnorm"](hidden, layers[0]["input_norm"], eps)
    for i, (layer, (k_cache, v_cache)) in enumerate(zip(layers, step["kv_caches"], strict=True)):
        if i > 0:
            x, residual = op["fused_add_rmsnorm"](hidden, residual, layer["input_norm"], eps)
        qkv = linear(x, layer["qkv_weight"], layer["qkv_bias"])
        q = qkv[:, : hq * d].view(1, hq, d)
        k = qkv[:, hq * d : (hq + hkv) * d].view(1, hkv, d)
        v = qkv[:, (hq + hkv) * d :].view(1, hkv, d)
        q = op["rope_kv_store"](
            q, k, v, step["positions"], step["cos_sin_cache"], k_cache, v_cache,
            step["slot_mapping"],
        )  # fmt: skip
        o = op["attention_decode"](
            q, k_cache, v_cache, step["block_tables"], step["seq_lens"], scale
        )
        o = linear(o.reshape(1, hq * d), layer["o_weight"], None)
        x, residual = op["fused_add_rmsnorm"](o, residual, layer["post_attn_norm"], eps)
        gate_up = linear(x, layer["gate_up_weight"], None)
        hidden = linear(op["silu_and_mul"](gate_up), layer["down_weight"], None)
    return hidden, residual


def _clone(step: dict) -> dict:
    out = dict(step)
    out["kv_caches"] = [(k.clone(), v.clone()) for k, v in step["kv_caches"]]
    return out


@pytest.mark.parametrize("qkv_bias", [False, True], ids=["nobias", "qkvbias"])
@pytest.mark.parametrize("fmt", ["q4_1", "q8_0", "int4"])
@pytest.mark.parametrize("ctx", [1, 37])
def test_c_step_matches_reference(fmt: str, qkv_bias: bool, ctx: int) -> None:
    canonical, prepared = _layers(fmt, qkv_bias)
    step = _step(ctx)
    before = _clone(step)
    result = _call(cpu_impl("decode_layers", F32), step, prepared)
    assert result is not None, "the C step declined a model it serves"
    ref_out, ref_residual, ref_caches = _call(decode_layers_reference, before, canonical)
    assert_matches_spec("decode_layers", result[0], ref_out, F32)
    assert_matches_spec("decode_layers", result[1], ref_residual, F32)
    slot = int(step["slot_mapping"][0])
    for (k, v), (k_ref, v_ref) in zip(step["kv_caches"], ref_caches, strict=True):
        kf, vf = k.view(-1, HKV, D)[slot], v.view(-1, HKV, D)[slot]
        assert_matches_spec("decode_layers", kf, k_ref.view(-1, HKV, D)[slot], F32)
        assert_matches_spec("decode_layers", vf, v_ref.view(-1, HKV, D)[slot], F32)
        # Only the new token's slot is written.
        k.view(-1, HKV, D)[slot] = k_ref.view(-1, HKV, D)[slot].float()
        v.view(-1, HKV, D)[slot] = v_ref.view(-1, HKV, D)[slot].float()
    for (k, v), (k0, v0) in zip(step["kv_caches"], before["kv_caches"], strict=True):
        mask = torch.ones(k.view(-1, HKV, D).shape[0], dtype=torch.bool)
        mask[slot] = False
        assert torch.equal(k.view(-1, HKV, D)[mask], k0.view(-1, HKV, D)[mask])
        assert torch.equal(v.view(-1, HKV, D)[mask], v0.view(-1, HKV, D)[mask])


@pytest.mark.parametrize("fmt", ["q4_1", "q8_0", "int4"])
def test_c_step_equals_the_ops_one_by_one(fmt: str) -> None:
    """The step strings together the very C pieces the single ops call: the same bits out."""
    _, prepared = _layers(fmt, qkv_bias=True)
    step = _step(40)
    plain = _clone(step)
    fused = _call(cpu_impl("decode_layers", F32), step, prepared)
    assert fused is not None
    out, residual = _one_by_one(plain, prepared)
    assert torch.equal(fused[0], out)
    assert torch.equal(fused[1], residual)
    for (k, v), (k1, v1) in zip(step["kv_caches"], plain["kv_caches"], strict=True):
        assert torch.equal(k, k1) and torch.equal(v, v1)


def test_c_step_declines_what_it_does_not_serve() -> None:
    """None (the model then runs op by op) for batches, q/k norms and float weights."""
    step_op = cpu_impl("decode_layers", F32)
    _, prepared = _layers("q4_1", qkv_bias=False)
    step = _step(9)
    batch = dict(step, hidden=randn(2, H, dtype=F32))
    assert _call(step_op, batch, prepared) is None
    normed = LayerStack(
        dict(layer, q_norm=torch.ones(D), k_norm=torch.ones(D)) for layer in prepared
    )
    assert _call(step_op, step, normed) is None
    dense = LayerStack(dict(layer) for layer in prepared)
    dense[1]["down_weight"] = randn(H, INTER, dtype=F32)
    assert _call(step_op, step, dense) is None
    assert _call(step_op, step, prepared) is not None
