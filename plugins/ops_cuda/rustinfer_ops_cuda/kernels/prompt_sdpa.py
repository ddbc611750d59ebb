"""Whole prompts of one sequence through torch's scaled_dot_product_attention, where it is faster.

The Triton prefill kernel reads K/V through the block table, one page per gather, and serves every
case with one code path (plain prompts, cached prefixes, chunks, ragged batches). On one
sequence's whole prompt it trails torch's SDPA (FlashAttention-2 on Hopper) on contiguous K/V:
H200, 32 query / 8 KV heads, D=64, bf16, by 4% / 15% / 19% at 2k / 4k / 8k tokens (BENCHMARKS.md,
28 tile shapes swept). When there is no cached prefix, the sequence's K/V are exactly its pages
in table order, so one ``index_select`` per cache makes them contiguous; at the lengths of
:data:`SDPA_BANDS` SDPA's lead is larger than that copy, and ``attention_prefill`` takes this
path there. Whether a prompt qualifies is decided on the host from ``max_seq_len`` (the op's
host-side hint): with one sequence and ``max_seq_len == max_query_len == T`` nothing was cached
before it.

Only on the card class where it was measured (compute capability 9.0): elsewhere the balance
between the two is unknown and the Triton kernel keeps every shape. And only for a q that
FlashAttention can read in place (16-byte aligned rows and heads): SDPA would otherwise fall back
to its math backend, whose bf16 scores miss the op's tolerance.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# Prompt lengths that take SDPA, as [low, high) bands (high None: no bound). H200, Llama-3.2-1B
# heads, bf16 (bench/kernels.py --only attention_prefill --prompt-sdpa on --prefill-lens ...,
# the op through this path against the Triton kernel alone, gather included; BENCHMARKS.md), ms:
#   tokens   256    512    768    1,024  1,280  1,536  1,792  2,048  2,560  3,072  4,096  8,192
#   SDPA     .0307  .0159  .0230  .0287  .0357  .0444  .0535  .0647  .0891  .1176  .1873  .6599
#   Triton   .0081  .0128  .0214  .0320  .0411  .0470  .0530  .0593  .1228  .1532  .2068  .7708
# Short prompts are too short for the gather to pay; near 2,048 the Triton kernel's mirrored tile
# pairs fill two waves of the 132 SMs exactly, and past it they leave a ragged last wave.
SDPA_BANDS: tuple[tuple[int, int | None], ...] = ((1024, 1792), (2049, None))
# Head dims FlashAttention-2 serves (SDPA falls back to slower backends for others).
FLASH_HEAD_DIMS = frozenset({64, 128})
MEASURED_CAPABILITY = (9, 0)


@functools.cache
def _measured_card(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) == MEASURED_CAPABILITY


def _in_bands(tokens: int) -> bool:
    return any(low <= tokens and (high is None or tokens < high) for low, high in SDPA_BANDS)


def _flash_readable(q: torch.Tensor) -> bool:
    # FlashAttention reads 16-byte vectors: unit last stride, every other stride and the start
    # a multiple of 8 elements (a q sliced from a fused QKV output is, at D = 64 or 128).
    return (
        q.stride(-1) == 1
        and all(stride % 8 == 0 for stride in q.stride()[:-1])
        and q.data_ptr() % 16 == 0
    )


def takes_prompt_sdpa(
    q: torch.Tensor, batch: int, max_query_len: int, max_seq_len: int | None
) -> bool:
    """Whether ``attention_prefill`` should run this step through :func:`prompt_sdpa`: one
    sequence, no cached prefix (known from the host-side ``max_seq_len``), a 16-bit prompt of a
    length in :data:`SDPA_BANDS`, on a measured card."""
    if max_seq_len is None or batch != 1 or not _in_bands(max_query_len):
        return False
    if not max_seq_len == max_query_len == q.shape[0]:
        return False
    if q.device.type != "cuda" or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    if q.shape[-1] not in FLASH_HEAD_DIMS or not _flash_readable(q):
        return False
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    return _measured_card(index)


def prompt_sdpa(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One sequence's whole prompt: q [T, Hq, D] against its T cached keys, causal -> [T, Hq, D]
    contiguous. The caller has checked :func:`takes_prompt_sdpa`."""
    tokens, n_heads, head_dim = q.shape
    page, n_kv_heads = k_cache.shape[1], k_cache.shape[2]
    pages = block_tables[0, : -(-tokens // page)]
    # [pages, page, Hkv, D] gathered, then token-major [T, Hkv, D]; SDPA takes [1, H, T, D]
    # views of these token-major tensors (FlashAttention reads them in that layout, no copy).
    k = k_cache.index_select(0, pages).view(-1, n_kv_heads, head_dim)[:tokens]
    v = v_cache.index_select(0, pages).view(-1, n_kv_heads, head_dim)[:tokens]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        is_causal=True,
        scale=scale,
        enable_gqa=n_heads != n_kv_heads,
    )[0].transpose(0, 1)  # [T, Hq, D]: FlashAttention writes token-major, so usually contiguous
    return out if out.is_contiguous() else out.contiguous()
