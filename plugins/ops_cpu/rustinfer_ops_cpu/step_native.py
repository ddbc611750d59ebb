"""``decode_layers`` through our C kernels (``native/decode_step.c``): a whole decode step's
layers in one call.

It serves float32 models whose four matmul weights per layer are held quantized in the C kernel's
layout (``quant_native``) or float32 ones as ``prepare_linear_weight`` stores them (column-major,
on AVX-512 CPUs), with no q/k norm: single-sequence steps everywhere, batches on CPUs
with AVX512-VNNI (elsewhere torch's packed int4 kernel is faster for batches: ``quant_native``).
It declines everything else (returns None) and the model runs its ops one by one.

What a step passes is built once per model and kept: a ctypes array of per-layer structs (the
weights' pointers) kept on the model's LayerStack, which the model replaces when its tensors
change, and one of the KV caches' pointers, keyed on the cache list's identity.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch

from rustinfer.ops.decode_layers import DecodeDims
from rustinfer.ops.quant import QuantizedWeight
from rustinfer_ops_cpu.native import library
from rustinfer_ops_cpu.quant_native import BATCHED_ROWS, BATCHES_IN_C, NATIVE_LAYOUT, plan_of

__all__ = ["decode_layers"]

_F32 = torch.float32
# Float32 matrices are served where the C step has its AVX-512 float kernel.
F32_MATRICES = bool(library() is not None and library().rq_step_serves_f32())
_MATRICES = ("qkv", "o", "gate_up", "down")


class _Matrix(ctypes.Structure):
    _fields_ = [
        ("packed", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("n_pad", ctypes.c_int64),
        ("bits", ctypes.c_int32),
        ("half", ctypes.c_int32),
        ("has_shift", ctypes.c_int32),
        ("pad_", ctypes.c_int32),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("input_norm", ctypes.c_void_p),
        ("post_attn_norm", ctypes.c_void_p),
        *((name, _Matrix) for name in _MATRICES),
    ]


class _Plan:
    """The layer structs of one model (or why it is declined), and the cache pointers of the
    cache list last seen."""

    def __init__(self, layers: Sequence[dict], dims: DecodeDims) -> None:
        self.refusal: str | None = None
        self.dims = dims
        self.keep: list[torch.Tensor] = []  # what the structs point into
        self.structs = (_Layer * len(layers))()
        self.caches_key: tuple[int, int, int] | None = None
        self.cache_ptrs: ctypes.Array | None = None
        hq, hkv, d = dims.num_q_heads, dims.num_kv_heads, dims.head_dim
        if not layers:
            self.refusal = "no layers"
            return
        for i, layer in enumerate(layers):
            refusal = self._fill(self.structs[i], layer, hq, hkv, d)
            if refusal is not None:
                self.refusal = f"layer {i}: {refusal}"
                self.structs = None
                self.keep = []
                return
        self.hidden = layers[0]["o_weight"].shape[0]
        self.inter = layers[0]["down_weight"].shape[1]

    def _fill(self, s: _Layer, layer: dict, hq: int, hkv: int, d: int) -> str | None:
        """Layer ``layer``'s struct ``s``, or why the C step cannot take it."""
        if layer.get("q_norm") is not None:
            return "q/k norms are not in the C step"
        h = layer["input_norm"].shape[0]
        for name in ("input_norm", "post_attn_norm"):
            t = layer[name]
            if t.dtype != _F32 or not t.is_contiguous():
                return f"{name} is not contiguous float32"
            self.keep.append(t)
            setattr(s, name, t.data_ptr())
        inter = layer["down_weight"].shape[1]
        expect = {"qkv": (hq + 2 * hkv) * d, "o": h, "gate_up": 2 * inter, "down": h}
        for name in _MATRICES:
            w, b = layer[f"{name}_weight"], layer.get(f"{name}_bias")
            if b is not None and (b.dtype != _F32 or not b.is_contiguous()):
                return f"{name}_bias is not contiguous float32"
            m = getattr(s, name)
            if isinstance(w, QuantizedWeight):
                if w.layout != NATIVE_LAYOUT:
                    return f"{name}_weight is quantized, not in the C kernel's layout"
                packed, bits, half, shift, n_pad, n, _ = plan_of(w)
                if n_pad != n:
                    return f"{name}_weight has {n} rows, not a multiple of 4"
                m.bits, m.half, m.has_shift = bits, half, shift
            else:
                # Float32 as the CPU's prepare_linear_weight stores it: column-major.
                if not (F32_MATRICES and w.dtype == _F32 and w.t().is_contiguous()):
                    return f"{name}_weight is neither quantized nor column-major float32"
                (n, _), packed = w.shape, w
                if n % 16:
                    return f"{name}_weight has {n} rows: the float step needs a multiple of 16"
                m.bits, m.half, m.has_shift = 32, 0, 0
            if n != expect[name]:
                return f"{name}_weight has {n} rows, the step needs {expect[name]}"
            m.packed, m.bias, m.n_pad = packed.data_ptr(), None if b is None else b.data_ptr(), n
            self.keep.append(packed)
            if b is not None:
                self.keep.append(b)
        return None

    def caches(self, kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> ctypes.Array:
        key = (id(kv_caches), kv_caches[0][0].data_ptr(), kv_caches[-1][1].data_ptr())
        if key != self.caches_key:
            ptrs = (ctypes.c_void_p * (2 * len(kv_caches)))()
            for i, (k, v) in enumerate(kv_caches):
                if (
                    k.dtype != _F32
                    or v.dtype != _F32
                    or not (k.is_contiguous() and v.is_contiguous())
                ):
                    raise ValueError("decode_layers: the KV caches must be contiguous float32")
                ptrs[2 * i], ptrs[2 * i + 1] = k.data_ptr(), v.data_ptr()
            self.cache_ptrs, self.caches_key = ptrs, key
        assert self.cache_ptrs is not None
        return self.cache_ptrs


_KEY = "rustinfer_ops_cpu.step_native"


def _plan_for(layers: Sequence[dict], dims: DecodeDims) -> _Plan:
    """The stack's plan, kept on it (a LayerStack) so it is built once per model."""
    derived = getattr(layers, "derived", None)
    plan = None if derived is None else derived.get(_KEY)
    if plan is None or plan.dims != dims:
        plan = _Plan(layers, dims)
        if derived is not None:
            derived[_KEY] = plan
    return plan


def decode_layers(
    x: torch.Tensor,
    residual: torch.Tensor,
    layers: Sequence[dict],
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    dims: DecodeDims,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The layers of one decode step in C, or None for what the C step does not serve."""
    t = x.shape[0]
    # Batches where the block kernel serves them (with VNNI); without it they go op by op,
    # through torch's int4 kernel (quant_native says why).
    if (t >= BATCHED_ROWS and not BATCHES_IN_C) or x.dtype != _F32 or residual.dtype != _F32:
        return None
    plan = _plan_for(layers, dims)
    if plan.refusal is not None:
        return None
    if not (
        x.is_contiguous()
        and residual.is_contiguous()
        and positions.dtype == torch.int64
        and slot_mapping.dtype == torch.int64
        and block_tables.dtype == torch.int32
        and seq_lens.dtype == torch.int32
        and cos_sin_cache.dtype == _F32
        and block_tables.stride(-1) == 1
    ):
        return None
    positions, slot_mapping = positions.contiguous(), slot_mapping.contiguous()
    seq_lens, cos_sin_cache = seq_lens.contiguous(), cos_sin_cache.contiguous()
    caches = plan.caches(kv_caches)
    block_size = kv_caches[0][0].shape[1]
    out = torch.empty((2, t, plan.hidden), dtype=_F32)
    mlp_out, stream = out[0], out[1]
    stream.copy_(residual)  # the C step adds into the stream in place
    status = library().rq_decode_layers(
        plan.structs,
        caches,
        len(layers),
        t,
        plan.hidden,
        dims.num_q_heads,
        dims.num_kv_heads,
        dims.head_dim,
        plan.inter,
        dims.eps,
        dims.scale,
        cos_sin_cache.data_ptr(),
        positions.data_ptr(),
        slot_mapping.data_ptr(),
        block_size,
        block_tables.data_ptr(),
        block_tables.stride(0),
        seq_lens.data_ptr(),
        x.data_ptr(),
        stream.data_ptr(),
        mlp_out.data_ptr(),
    )
    if status != 0:
        raise MemoryError(f"decode_layers: no scratch memory for {t} sequences")
    return mlp_out, stream
