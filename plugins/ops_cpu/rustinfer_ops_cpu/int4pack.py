"""4-bit codes -> the byte layout of torch's CPU int4 matmul, built with a few tensor ops.

``torch.ops.aten._convert_weight_to_int4pack_for_cpu`` takes the codes as int32 ``[N, K]``: for a
model that is four bytes written and read per 4-bit code, plus the unpacking and widening before
it, and a scalar loop inside. At load that was most of the embedded model's quantized start (the
SmolLM2 Q4_1 file spent ~4 s of ~6.5 s there). The layout it writes is simple, so it is rebuilt
here from uint8 codes with vectorized ops.

The layout (what torch's CPU kernel reads, per ``torch.backends.cpu.get_cpu_capability()``): rows
come in blocks of ``B`` (64 on AVX512, 32 on AVX2); a whole block is stored k-major, ``K`` runs of
``B / 2`` bytes, byte ``j`` of run ``k`` holding row ``j``'s code at ``k`` in its low nibble and
row ``j + B / 2``'s in its high nibble. A last, partial block (16, 32 or 48 rows) pairs rows
``2j`` and ``2j + 1`` instead; it is left to torch's own converter (at most 48 rows).

The rebuild is checked against torch's converter once per process on a small random weight, and
on any other CPU capability, or on a mismatch (a future torch changing the layout), every weight
goes through torch's converter: slower, never wrong.
"""

from __future__ import annotations

import functools
import logging

import torch

__all__ = ["pack_int4"]

logger = logging.getLogger(__name__)

# Rows per block of the vectorized kernel: 4 float vectors (16 lanes on AVX512, 8 on AVX2).
_BLOCK_ROWS = {"AVX512": 64, "AVX2": 32}
# torch's converter ignores its inner-K-tiles argument on the CPU.
_INNER_K_TILES = 1


def _torch_pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] -> packed [N, K / 2] through torch's converter (int32 in)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), _INNER_K_TILES)


def _fast_pack(codes: torch.Tensor, block: int) -> torch.Tensor:
    """The same bytes as :func:`_torch_pack` for a kernel with ``block`` rows per block."""
    n, k = codes.shape
    full = n - n % block
    nb, half = full // block, block // 2
    blocks = codes[:full].view(nb, 2, half, k)  # [nb, lo|hi rows, B/2, K]
    # uint8 << 4 drops the code's high bits, which are zero anyway (codes are 0..15).
    paired = blocks[:, 0] | (blocks[:, 1] << 4)  # [nb, B/2, K]
    out = torch.empty((n, k // 2), dtype=torch.uint8)
    out[:full].view(nb, k, half).copy_(paired.transpose(1, 2))  # k-major within each block
    if full < n:
        out[full:] = _torch_pack(codes[full:])  # the partial block's own pairing
    return out


@functools.cache
def _block_rows() -> int | None:
    """Rows per block if the fast rebuild matches torch's converter here, else None."""
    capability = torch.backends.cpu.get_cpu_capability()
    block = _BLOCK_ROWS.get(capability)
    if block is None:
        logger.info("int4 packing: no fast layout for CPU capability %s", capability)
        return None
    gen = torch.Generator().manual_seed(0)
    # Two whole blocks and a partial one, K past one 32-run: every part of the layout.
    probe = torch.randint(0, 16, (2 * block + 16, 96), generator=gen, dtype=torch.uint8)
    if not torch.equal(_fast_pack(probe, block), _torch_pack(probe)):
        logger.warning(
            "int4 packing: torch's layout on %s is not the one expected; using its converter",
            capability,
        )
        return None
    return block


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[N, K]`` in 0..15 (N a multiple of 16, K even) -> uint8 ``[N, K / 2]`` in
    the layout ``_weight_int4pack_mm_for_cpu`` reads."""
    assert codes.dtype == torch.uint8 and codes.dim() == 2, (
        f"pack_int4: {codes.dtype} {codes.shape}"
    )
    assert codes.shape[0] % 16 == 0 and codes.shape[1] % 2 == 0, f"pack_int4: {codes.shape}"
    block = _block_rows()
    codes = codes.contiguous()
    return _torch_pack(codes) if block is None else _fast_pack(codes, block)
