"""Paged attention inputs whose outputs have scale: "needle" keys that no kernel can drop unnoticed.

With random inputs, attention over a long context is an average of thousands of random V rows:
its entries are ~1/sqrt(ctx), far below the bf16 tolerance, so a kernel that skips the newest key
or a whole page still passes. Here every query head points along one direction ``u`` of its KV
head, and a few needle keys per sequence lie along ``u`` too: their scores stand ln(ctx) + PEAK
above the background's, so the softmax puts nearly all its weight on them, a few tenths each.
Needle V rows are +-NEEDLE_V sign patterns, distinct per needle, sequence and KV head, so the
output is a mix of a handful of O(1) vectors and dropping any needle moves it by tenths: tens of
bf16 tolerances. Needles sit at the first position, on both sides of a page boundary a third in
(the last slot of one block, the first of the next), in the middle of a page half way in, at the
newest position and, for prefill, among the new tokens. Every slot that no sequence owns (past a
sequence's end, spare blocks) holds a decoy that outscores the needles, so reading one is as loud
as dropping a needle.

The spec's tolerances assume O(1) V entries (and O(1) scores for fp32, whose rounding errors grow
with the scores' magnitude): NEEDLE_V = 1 is the unit |v| of the bf16 and fp16 budgets, and
scores stay within +-S/2 (|S/2| < 8 to 32k context). A simulated bf16 flash kernel (fp32 scores,
probabilities rounded to bf16 before P @ V) used at most 0.4 of the bf16 tolerance at 32k
context; the fp16 interpreter run 0.4 of fp16's.

``decode_mutations`` and ``prefill_mutations`` give the spec reference on inputs changed the way a
broken kernel would read them (newest key dropped, a needle's page zeroed or its block-table entry
pointing at another block, a causal window one key short or long, a key read past the end), and
``teeth`` how far each moves the output in units of the op's tolerance: a test asserts that before
it trusts a kernel's pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rustinfer.ops import ATTENTION_DECODE, SPECS

from .paged import attention_scale, cu_seqlens, paged_kv

# Needle scores stand S = ln(ctx) + PEAK above the background's mean (background scores have std
# ~1), so the background's total weight is ~e^-PEAK * e^(1/2) of one needle's: ~3% at PEAK = 4.
# Needles score +S/2 and the background -S/2: the gap is what peaks the softmax, and fp32's
# rounding errors in the scores grow with their magnitude (S/2 rather than S halves them).
PEAK = 4.0
# Needle scores spread over [S/2 - NEEDLE_SPREAD * S, S/2]: unequal weights (0.6 at most between
# two needles at ctx 32k), still a few tenths each.
NEEDLE_SPREAD = 0.04
# Decoys (slots no sequence owns) score DECOY_SCORE * S, S/4 above the needles: a decoy read
# takes ~e^(S/4) times a needle's weight.
DECOY_SCORE = 0.75
# Each query row and head scales its score by a factor in [1 - QUERY_SPREAD, 1 + QUERY_SPREAD],
# so rows and heads differ (a kernel swapping them changes the answer).
QUERY_SPREAD = 0.1
# Query components orthogonal to u, relative to its length along u: they change background scores
# only (needle keys lie along u).
QUERY_NOISE = 0.3
NEEDLE_V = 1.0
BACKGROUND_V = 0.5
# A mutation must move the output by at least this many tolerances in every row and head it
# applies to.
MIN_MARGIN = 10.0

# Needle kinds, in the order of their positions in a sequence.
FIRST, PAGE_END, PAGE_START, MIDDLE, NEW, NEWEST = (
    "first",
    "page-end",
    "page-start",
    "middle",
    "new",
    "newest",
)


def needle_positions(seq_len: int, block_size: int, q_len: int = 1) -> dict[str, int]:
    """Where the needles of a sequence go, by kind: positions 0..seq_len-1, the last q_len of them
    new queries. Short sequences get fewer (kinds that would collide are left out).

    - first: position 0.
    - page-end, page-start: the last slot of one block and the first of the next, about a third
      into the keys before the first query; also a 64-key step boundary when the context allows.
    - middle: the middle of a page half way into those keys.
    - new (q_len >= 3): a new token a little past the middle of the new ones, so the query before
      it must not see it and it must see itself.
    - newest: position seq_len - 1.
    """
    context = max(seq_len - q_len, 1)  # keys before the first query (decode: all but the newest)
    step = block_size * 64 // math.gcd(block_size, 64)  # a page boundary and a 64-key boundary
    third = context // 3
    boundary = (third // step) * step if third >= step else max(1, third // block_size) * block_size
    half = context // 2
    wanted = [
        (FIRST, 0),
        (PAGE_END, boundary - 1),
        (PAGE_START, boundary),
        (MIDDLE, (half // block_size) * block_size + block_size // 2),
    ]
    if q_len >= 3:
        wanted.append((NEW, seq_len - q_len + q_len // 2 + 1))
    wanted.append((NEWEST, seq_len - 1))
    positions: dict[str, int] = {}
    for kind, pos in wanted:
        if 0 <= pos < seq_len and pos not in positions.values():
            positions[kind] = pos
    return positions


@dataclass
class ScaledCase:
    """An attention op's arguments (CPU tensors) and where each sequence's needles are."""

    op: str  # "attention_decode" or "attention_prefill"
    args: tuple
    needles: list[dict[str, int]]  # per sequence: kind -> position


def _unit_rows(n: int, dim: int) -> torch.Tensor:
    u = torch.randn(n, dim, dtype=torch.float64)
    return u / u.norm(dim=-1, keepdim=True)


def _signs(*shape: int) -> torch.Tensor:
    return torch.randint(0, 2, shape).to(torch.float64) * 2 - 1


def _scaled_caches(
    seq_lens: list[int],
    q_lens: list[int],
    heads: tuple[int, int],
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    consecutive: bool,
) -> tuple[torch.Tensor, ...]:
    """(q [T, Hq, D], k_cache, v_cache, block_tables, needles) with T = sum(q_lens): each
    sequence's queries are its last q_len positions."""
    n_heads, n_kv_heads = heads
    group = n_heads // n_kv_heads
    scale = attention_scale(head_dim)
    # Scores along u are scale * length(q along u) * length(key along u), in units of the gap S
    # between needles and background: keys of length `length` along u score S (queries have
    # about that length along u).
    gap = math.log(max(seq_lens)) + PEAK
    length = math.sqrt(gap / scale)
    u = _unit_rows(n_kv_heads, head_dim)  # [Hkv, D]: shared by all sequences (and the decoys)

    paged = paged_kv(seq_lens, block_size, n_kv_heads, head_dim, dtype, consecutive)
    tables = paged.block_tables
    num_blocks = paged.k_cache.shape[0]
    # Background: scores -S/2 plus standard normal ones (from the components off u).
    k = torch.randn(num_blocks, block_size, n_kv_heads, head_dim, dtype=torch.float64)
    k *= 1.0 / (scale * length)
    k -= 0.5 * length * u[None, None]
    v = torch.randn(num_blocks, block_size, n_kv_heads, head_dim, dtype=torch.float64)
    v *= BACKGROUND_V
    # Decoys in every slot no sequence owns.
    owned = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for i, n in enumerate(seq_lens):
        pos = torch.arange(n)
        owned[tables[i, pos // block_size].long(), pos % block_size] = True
    k[~owned] = DECOY_SCORE * length * u
    v[~owned] = NEEDLE_V * _signs(int((~owned).sum()), n_kv_heads, head_dim)

    needles = [needle_positions(n, block_size, q) for n, q in zip(seq_lens, q_lens, strict=True)]
    for i, found in enumerate(needles):
        strengths = 0.5 - NEEDLE_SPREAD * torch.rand(len(found), dtype=torch.float64)
        for strength, pos in zip(strengths.tolist(), found.values(), strict=True):
            block, slot = int(tables[i, pos // block_size]), pos % block_size
            k[block, slot] = strength * length * u
            v[block, slot] = NEEDLE_V * _signs(n_kv_heads, head_dim)

    # Queries: along their KV head's u, each row and head scaled a little differently, plus
    # components orthogonal to u.
    tokens = sum(q_lens)
    along = 1.0 + QUERY_SPREAD * (2 * torch.rand(tokens, n_heads, 1, dtype=torch.float64) - 1)
    u_q = u.repeat_interleave(group, dim=0)  # [Hq, D]: query head h reads KV head h // group
    noise = torch.randn(tokens, n_heads, head_dim, dtype=torch.float64)
    noise -= (noise * u_q).sum(-1, keepdim=True) * u_q
    noise *= QUERY_NOISE * length / math.sqrt(head_dim)
    q = along * length * u_q + noise
    return q.to(dtype), k.to(dtype), v.to(dtype), tables, needles


def scaled_decode(
    seq_lens: list[int],
    heads: tuple[int, int],
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    *,
    seed: int,
    consecutive: bool = False,
) -> ScaledCase:
    """attention_decode's arguments, needles planted (see the module doc); ``seed`` fixes them."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        q, k, v, tables, needles = _scaled_caches(
            seq_lens, [1] * len(seq_lens), heads, head_dim, block_size, dtype, consecutive
        )
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    args = (q, k, v, tables, lens, attention_scale(head_dim))
    return ScaledCase("attention_decode", args, needles)


def scaled_prefill(
    seqs: list[tuple[int, int]],
    heads: tuple[int, int],
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    *,
    seed: int,
    consecutive: bool = False,
) -> ScaledCase:
    """attention_prefill's arguments for sequences given as (seq_len, q_len), needles planted in
    the cached prefix and among the new tokens; ``seed`` fixes them."""
    seq_lens = [s for s, _ in seqs]
    q_lens = [n for _, n in seqs]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        q, k, v, tables, needles = _scaled_caches(
            seq_lens, q_lens, heads, head_dim, block_size, dtype, consecutive
        )
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    args = (q, k, v, tables, cu_seqlens(q_lens), lens, max(q_lens), attention_scale(head_dim))
    return ScaledCase("attention_prefill", args, needles)


# -- mutations: what a broken kernel would compute -----------------------------------------------


@dataclass
class Mutation:
    """The spec reference on inputs changed as a broken kernel would read them, for the output
    rows it changes (rows of q / of the op's output)."""

    name: str
    rows: list[int]
    reference: torch.Tensor  # [len(rows), Hq, D] float64


def _page_mutations(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    needles: list[dict[str, int]],
) -> list[tuple[str, list[int], torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For each needle kind but the newest: (name, sequences it applies to, k_cache, v_cache,
    block_tables) with the page holding that needle dropped, once zeroed in both caches and once
    with its block-table entry pointing at the sequence's next page instead."""
    block_size = k_cache.shape[1]
    out = []
    for kind in (FIRST, PAGE_END, PAGE_START, MIDDLE, NEW):
        seqs = [i for i, found in enumerate(needles) if kind in found]
        if not seqs:
            continue
        zk, zv = k_cache.clone(), v_cache.clone()
        for i in seqs:
            block = int(tables[i, needles[i][kind] // block_size])
            zk[block] = 0
            zv[block] = 0
        out.append((f"{kind} needle's page zeroed", seqs, zk, zv, tables))
        moved = tables.clone()
        moved_seqs = []
        for i in seqs:
            n_pages = -(-int(lens[i]) // block_size)
            page = needles[i][kind] // block_size
            if n_pages > 1:
                moved[i, page] = tables[i, (page + 1) % n_pages]
                moved_seqs.append(i)
        if moved_seqs:
            out.append((f"{kind} needle's page read from another block", moved_seqs, k_cache,
                        v_cache, moved))  # fmt: skip
    return out


def decode_mutations(case: ScaledCase) -> list[Mutation]:
    q, k_cache, v_cache, tables, lens, scale = case.args
    block_size = k_cache.shape[1]
    reference = ATTENTION_DECODE.reference
    out = []
    rows = [i for i, n in enumerate(lens.tolist()) if n > 1]
    if rows:
        short = torch.where(lens > 1, lens - 1, lens)
        ref = reference(q, k_cache, v_cache, tables, short, scale)
        out.append(Mutation("newest key dropped", rows, ref[rows]))
    rows = [i for i, n in enumerate(lens.tolist()) if n % block_size]
    if rows:
        # The slot after the newest key is in the last page and holds a decoy.
        long = torch.where(lens % block_size != 0, lens + 1, lens)
        ref = reference(q, k_cache, v_cache, tables, long, scale)
        out.append(Mutation("key past the end read", rows, ref[rows]))
    for name, rows, zk, zv, zt in _page_mutations(k_cache, v_cache, tables, lens, case.needles):
        ref = reference(q[rows], zk, zv, zt[rows], lens[rows], scale)
        out.append(Mutation(name, rows, ref))
    return out


def _windowed(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    rows: list[tuple[int, int, int]],
    scale: float,
) -> torch.Tensor:
    """Query rows given as (q row, sequence, window): each attends to its sequence's positions
    0..window-1. The decode reference with one "sequence" per row (a prefill query at position p
    is a decode query with seq_len p + 1), so any window can be asked for."""
    q_rows = q[[r for r, _, _ in rows]]
    row_tables = tables[[s for _, s, _ in rows]]
    windows = torch.tensor([w for _, _, w in rows], dtype=torch.int32)
    return ATTENTION_DECODE.reference(q_rows, k_cache, v_cache, row_tables, windows, scale)


def prefill_rows(case: ScaledCase) -> list[tuple[int, int, int]]:
    """The query rows the prefill mutations look at, as (q row, sequence, position): each
    sequence's first new query, the queries just before and at its new-token needle, its last."""
    _, _, _, _, cu, lens, _, _ = case.args
    rows = []
    for i, (start, n) in enumerate(zip(cu.tolist(), lens.tolist(), strict=False)):
        q_len = cu[i + 1].item() - start
        prefix = n - q_len
        picked = {prefix, n - 1}
        if NEW in case.needles[i]:
            picked |= {case.needles[i][NEW] - 1, case.needles[i][NEW]}
        rows += [(start + p - prefix, i, p) for p in sorted(picked)]
    return rows


def prefill_mutations(case: ScaledCase, true: torch.Tensor) -> list[Mutation]:
    """Mutations of the rows of ``prefill_rows``; checks first that the windowed decode reference
    gives ``true`` (the prefill reference) on those rows unmutated."""
    q, k_cache, v_cache, tables, cu, lens, _, scale = case.args
    first = (lens - cu.diff()).tolist()  # each sequence's first new position
    picked = prefill_rows(case)
    at_pos = [(r, s, p + 1) for r, s, p in picked]  # causal: query at p sees 0..p
    same = _windowed(q, k_cache, v_cache, tables, at_pos, scale)
    torch.testing.assert_close(same, true[[r for r, _, _ in picked]], rtol=1e-12, atol=1e-12)

    out = []

    def add(name: str, rows: list[tuple[int, int, int]], *cache: torch.Tensor) -> None:
        if rows:
            ref = _windowed(q, *(cache or (k_cache, v_cache, tables)), rows, scale)
            out.append(Mutation(name, [r for r, _, _ in rows], ref))

    last = [(r, s, p) for r, s, p in at_pos if p == lens[s].item() and p > 1]
    add("last query's newest key dropped", [(r, s, p - 1) for r, s, p in last])
    before = [(r, s, w) for r, s, w in at_pos if case.needles[s].get(NEW) == w]
    add("query sees the key after it", [(r, s, w + 1) for r, s, w in before])
    at = [(r, s, w) for r, s, w in at_pos if case.needles[s].get(NEW) == w - 1]
    add("query misses its own key", [(r, s, w - 1) for r, s, w in at])
    # Pages: looked at from each sequence's first and last new query (the costly part of the
    # check at long context), where they see the needle (the first may not see the new one).
    ends = [(r, s, w) for r, s, w in at_pos if w in (lens[s].item(), first[s] + 1)]
    for name, seqs, zk, zv, zt in _page_mutations(k_cache, v_cache, tables, lens, case.needles):
        kind = name.split()[0]
        rows = [(r, s, w) for r, s, w in ends if s in seqs and case.needles[s][kind] < w]
        add(name, rows, zk, zv, zt)
    return out


def margins(op: str, true: torch.Tensor, mutated: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[rows, heads]: the largest |mutated - true| over head_dim, in units of the tolerance
    atol + rtol * |true| of ``op`` at ``dtype`` (what assert_matches_spec allows there)."""
    tol = SPECS[op].tolerance(dtype)
    allowed = tol.atol + tol.rtol * true.abs()
    return ((mutated - true).abs() / allowed).amax(dim=-1)


def teeth(
    case: ScaledCase, true: torch.Tensor, dtype: torch.dtype, min_margin: float = MIN_MARGIN
) -> dict[str, float]:
    """Each mutation's smallest margin over the rows and heads it changes (see ``margins``);
    asserts every one is at least ``min_margin``: a kernel that computed any mutation would miss
    the tolerance by that much in every one of those rows and heads."""
    if case.op == "attention_decode":
        mutations = decode_mutations(case)
    else:
        mutations = prefill_mutations(case, true)
    found = {}
    for m in mutations:
        found[m.name] = margins(case.op, true[m.rows], m.reference, dtype).min().item()
    weak = {name: round(v, 1) for name, v in found.items() if not v >= min_margin}
    assert not weak, f"{case.op} [{dtype}]: mutations within {min_margin}x tolerance: {weak}"
    # Every kind of needle planted must have been checked.
    kinds = {kind for found_ in case.needles for kind in found_} - {NEWEST}
    assert all(any(n.startswith(kind + " ") for n in found) for kind in kinds), found
    return found
