"""The ``rope_kv_store`` spec: rotary embedding on q and k fused with storing k and v in the cache.

Every attention layer runs rope and then writes the rotated k (and v) into the paged cache; one op
for both lets a GPU kernel read q, k, v once and never write the rotated k anywhere but its cache
slot. The plain ``rope`` and ``kv_cache_store`` ops stay for backends and tests that want them apart.
"""

from __future__ import annotations

import torch

from rustinfer.ops.attention import kv_cache_store_reference
from rustinfer.ops.rope import ROPE, rope_reference
from rustinfer.ops.spec import OpSpec


def rope_kv_store_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rotated q, new k cache, new v cache), all float64; the caches are clones, never written."""
    q_out, k_rot = rope_reference(q, k, positions, cos_sin_cache)
    new_k, new_v = kv_cache_store_reference(
        k_rot,
        v.to(torch.float64),
        k_cache.to(torch.float64),
        v_cache.to(torch.float64),
        slot_mapping,
    )
    return q_out, new_k, new_v


ROPE_KV_STORE = OpSpec(
    name="rope_kv_store",
    doc="""rope_kv_store(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping) -> q_out

    q, k, positions, cos_sin_cache: as in ``rope`` (q, k, v may be strided views of a fused QKV
                   output).
    v:             [T, Hkv, D], q's dtype.
    k_cache, v_cache, slot_mapping: as in ``kv_cache_store`` (caches written IN PLACE, slots < 0
                   are padding tokens: their q is still rotated, nothing is stored).
    q_out:         [T, Hq, D] contiguous, rope(q) exactly as ``rope`` computes it.

    Afterwards the cache slot of token t holds rope(k)[t] (rounded once to the cache dtype) and
    v[t] bit for bit. Reference: reference(...) -> (q_out, new_k_cache, new_v_cache) in float64
    on clones; q_out and the k cache are compared with ``rope``'s tolerances, the v cache exactly.
    """,
    reference=rope_kv_store_reference,
    tolerances=ROPE.tolerances,
)
