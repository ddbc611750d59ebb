"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts and a prefix cache.

A sequence's block table maps token position ``p`` to slot ``p % block_size`` of block
``table[p // block_size]``. Full blocks whose KV has been computed are registered under a chained
hash (parent block's hash + this block's token ids), so a later prompt with the same leading tokens
reuses them instead of recomputing. Blocks nobody references but that still hold a hash stay
*evictable*: they count as free, are revived on a hit, and are recycled least recently freed first.

Pure Python and no torch: the scheduler asks, the model runner reads ``block_table``.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence

from rustinfer.errors import RustinferError

__all__ = ["BlockManager", "NoFreeBlocksError"]

logger = logging.getLogger(__name__)

# blake2b with a 16-byte digest: cryptographic, so two different prefixes colliding (which would
# silently serve one prompt another prompt's KV) is out of reach even for adversarial input; the
# builtin ``hash`` is only 64 bits and not designed against deliberate collisions. Token ids are packed
# as fixed-width int64 after a fixed-width parent digest, so the byte encoding is unambiguous.
_DIGEST_SIZE = 16
_ROOT_HASH = b"\x00" * _DIGEST_SIZE


def hash_block(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    """Chained hash of one full block: ``parent`` is the previous block's hash (None for the first)."""
    h = hashlib.blake2b(parent or _ROOT_HASH, digest_size=_DIGEST_SIZE)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


class NoFreeBlocksError(RustinferError):
    """The KV cache has too few free blocks; the scheduler should have asked ``can_*`` first."""


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._block_hash: list[bytes | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # ref 0, no hash
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0, hashed; oldest first
        self._hash_to_block: dict[bytes, int] = {}
        self._tables: dict[Hashable, list[int]] = {}
        # Content hashes of each sequence's leading computed full blocks. Kept apart from the
        # registry because a block can be computed but unregistered (duplicate content, reset) and
        # the next block's hash still chains on it.
        self._seq_hashes: dict[Hashable, list[bytes]] = {}
        self._queries = 0
        self._hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _lookup(self, token_ids: Sequence[int]) -> list[tuple[bytes, int]]:
        """Leading cached blocks of a prompt as (hash, block id).

        Only blocks lying wholly within the first ``len - 1`` tokens count: the last token is always
        computed, and if its block were a shared cached one the model would write into a block other
        sequences are reading.
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[tuple[bytes, int]] = []
        parent: bytes | None = None
        bs = self.block_size
        for i in range((len(token_ids) - 1) // bs):
            parent = hash_block(parent, token_ids[i * bs : (i + 1) * bs])
            block = self._hash_to_block.get(parent)
            if block is None:
                break
            hits.append((parent, block))
        return hits

    def can_allocate(self, token_ids: Sequence[int]) -> bool:
        return self._fits(token_ids, self._lookup(token_ids))

    def _fits(self, token_ids: Sequence[int], hits: list[tuple[bytes, int]]) -> bool:
        # An evictable hit is counted in num_free_blocks but gets revived, not handed out fresh.
        revived = sum(1 for _, b in hits if self._ref[b] == 0)
        fresh = self.blocks_needed(len(token_ids)) - len(hits)
        return fresh <= self.num_free_blocks - revived

    def allocate(self, seq_id: Hashable, token_ids: Sequence[int]) -> int:
        """Give ``seq_id`` blocks for its prompt; returns how many leading tokens are already cached."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} already has blocks; free it first")
        if not token_ids:
            raise ValueError(f"sequence {seq_id!r}: cannot allocate an empty prompt")
        hits = self._lookup(token_ids)
        if not self._fits(token_ids, hits):
            raise NoFreeBlocksError(
                f"sequence {seq_id!r} needs {self.blocks_needed(len(token_ids))} blocks for "
                f"{len(token_ids)} tokens but only {self.num_free_blocks} are free; check "
                "can_allocate() first or preempt a running sequence"
            )
        table: list[int] = []
        # Revive hits before taking fresh blocks so eviction can never reclaim one we are reusing.
        for _, block in hits:
            if self._ref[block] == 0:
                del self._evictable[block]
            self._ref[block] += 1
            table.append(block)
        for _ in range(self.blocks_needed(len(token_ids)) - len(hits)):
            table.append(self._take_fresh())
        self._tables[seq_id] = table
        self._seq_hashes[seq_id] = [h for h, _ in hits]
        num_cached = len(hits) * self.block_size
        if self.enable_prefix_caching:
            self._queries += len(token_ids)
            self._hits += num_cached
        return num_cached

    def _take_fresh(self) -> int:
        if self._free:
            block = self._free.popleft()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._hash_to_block[self._block_hash[block]]  # type: ignore[index]
            self._block_hash[block] = None
        else:  # callers check capacity first; reaching here is a bookkeeping bug
            raise NoFreeBlocksError("no free KV blocks left")
        self._ref[block] = 1
        return block

    def has_room(self, seq_id: Hashable, num_tokens: int) -> bool:
        """Whether the sequence's blocks already cover ``num_tokens`` tokens (no block needed)."""
        return len(self._tables[seq_id]) * self.block_size >= num_tokens

    def can_append(self, seq_id: Hashable, num_tokens: int) -> bool:
        """Can the sequence grow to ``num_tokens`` tokens in total?"""
        missing = self.blocks_needed(num_tokens) - len(self._table(seq_id))
        return missing <= self.num_free_blocks

    def append_slots(self, seq_id: Hashable, num_tokens: int) -> None:
        """Grow the table to cover ``num_tokens`` tokens in total (never shrinks it)."""
        table = self._table(seq_id)
        if len(table) * self.block_size >= num_tokens:
            return  # the common decode step: the last block still has room
        if not self.can_append(seq_id, num_tokens):
            raise NoFreeBlocksError(
                f"sequence {seq_id!r} cannot grow to {num_tokens} tokens: "
                f"{self.num_free_blocks} free blocks; check can_append() or preempt"
            )
        while len(table) < self.blocks_needed(num_tokens):
            table.append(self._take_fresh())

    def has_blocks_to_commit(self, seq_id: Hashable, num_computed: int) -> bool:
        """Whether ``commit_computed`` would register anything: a block filled since the last
        commit (cheap; callers skip gathering the token ids otherwise)."""
        return self.enable_prefix_caching and num_computed // self.block_size > len(
            self._seq_hashes[seq_id]
        )

    def commit_computed(
        self, seq_id: Hashable, token_ids: Sequence[int], num_computed: int
    ) -> None:
        """Register the full blocks among the first ``num_computed`` tokens in the prefix cache.

        If another block already holds the same hash (two sequences computed the same content
        concurrently), this block stays unregistered and returns to the plain free list when released;
        the registered twin keeps serving hits.
        """
        table = self._table(seq_id)
        if not 0 <= num_computed <= min(len(token_ids), len(table) * self.block_size):
            raise ValueError(
                f"sequence {seq_id!r}: num_computed={num_computed} exceeds its {len(token_ids)} "
                f"tokens or its {len(table)} blocks"
            )
        if not self.enable_prefix_caching:
            return
        hashes = self._seq_hashes[seq_id]
        bs = self.block_size
        for i in range(len(hashes), num_computed // bs):
            h = hash_block(hashes[-1] if hashes else None, token_ids[i * bs : (i + 1) * bs])
            hashes.append(h)
            if h not in self._hash_to_block:
                self._hash_to_block[h] = table[i]
                self._block_hash[table[i]] = h

    def block_table(self, seq_id: Hashable) -> list[int]:
        return list(self._table(seq_id))

    def block_table_view(self, seq_id: Hashable) -> Sequence[int]:
        """The live table, not a copy: read it before the sequence next grows or is freed (an
        engine step reads it within the step it was scheduled in)."""
        return self._table(seq_id)

    def _table(self, seq_id: Hashable) -> list[int]:
        try:
            return self._tables[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id!r}: it has no blocks") from None

    def free(self, seq_id: Hashable) -> None:
        table = self._table(seq_id)
        del self._tables[seq_id], self._seq_hashes[seq_id]
        # Tail first: a sequence's later blocks are shared by fewer future prompts than its leading
        # ones, so they should be evicted first; LRU order is release order.
        released: list[int] = []
        for block in reversed(table):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if self._block_hash[block] is None:
                    released.append(block)
                else:
                    self._evictable[block] = None
        # Unhashed blocks go back to the FRONT of the free list in table order: the next sequence
        # reuses them first (still in cache) and in the same order, so a table that was a run of
        # consecutive ids stays one, which lets the CPU attention read the cache without a gather.
        self._free.extendleft(released)

    def reset_prefix_cache(self) -> None:
        """Forget every hash. Blocks in use stay allocated; evictable ones become plain free."""
        self._hash_to_block.clear()
        self._block_hash = [None] * self.num_blocks
        self._free.extend(self._evictable)
        self._evictable.clear()
        logger.info("prefix cache reset")

    def stats(self) -> dict[str, int]:
        """Counters; ``prefix_cache_queries``/``hits`` are prompt tokens looked up / served cached."""
        return {
            "blocks_total": self.num_blocks,
            "blocks_used": self.num_used_blocks,
            "blocks_free": self.num_free_blocks,
            "cached_blocks": len(self._hash_to_block),
            "evictable_blocks": len(self._evictable),
            "prefix_cache_queries": self._queries,
            "prefix_cache_hits": self._hits,
        }

    def check_invariants(self) -> None:
        """Raise AssertionError on inconsistent bookkeeping (explicit raises survive ``python -O``)."""

        def check(cond: bool, msg: str) -> None:
            if not cond:
                raise AssertionError(msg)

        refs = [0] * self.num_blocks
        for seq_id, table in self._tables.items():
            for b in table:
                refs[b] += 1
            hashes = self._seq_hashes[seq_id]
            check(len(hashes) <= len(table), f"{seq_id!r}: more hashes than blocks")
            for i, b in enumerate(table):
                h = self._block_hash[b]
                ok = h is None or (i < len(hashes) and hashes[i] == h)
                check(ok, f"{seq_id!r}: block {b} at {i} has a hash its content lacks")
        check(refs == self._ref, f"ref counts {self._ref} != table memberships {refs}")
        free, evictable = set(self._free), set(self._evictable)
        check(len(free) == len(self._free), "duplicate block in the free list")
        check(not free & evictable, "block both free and evictable")
        for b in range(self.num_blocks):
            idle = b in free or b in evictable
            check(idle == (refs[b] == 0), f"block {b}: ref {refs[b]} but idle={idle}")
            check(b not in free or self._block_hash[b] is None, f"free block {b} has a hash")
            check(b not in evictable or self._block_hash[b] is not None, f"evictable {b} unhashed")
        for h, b in self._hash_to_block.items():
            check(self._block_hash[b] == h, f"hash map and block {b} disagree")
        hashed = sum(h is not None for h in self._block_hash)
        check(hashed == len(self._hash_to_block), "hashed blocks missing from the hash map")
