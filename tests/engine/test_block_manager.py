"""BlockManager: paging arithmetic, prefix-cache hits, LRU eviction, revival, and a random walk."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)

from rustinfer.engine.block_manager import BlockManager, NoFreeBlocksError

SYSTEM = list(range(100, 132))  # a 32-token "system prompt": two 16-token blocks


def run_prefill(bm: BlockManager, seq: str, tokens: list[int]) -> int:
    """Allocate, pretend the model computed the whole prompt, commit; returns num_cached."""
    cached = bm.allocate(seq, tokens)
    bm.commit_computed(seq, tokens, len(tokens))
    bm.check_invariants()
    return cached


@pytest.mark.parametrize("block_size", [1, 3, 16])
@pytest.mark.parametrize("extra", [-1, 0, 1])
def test_block_table_covers_boundaries(block_size: int, extra: int) -> None:
    bm = BlockManager(num_blocks=64, block_size=block_size)
    n = 2 * block_size + extra
    assert bm.allocate("a", list(range(n))) == 0
    assert len(bm.block_table("a")) == bm.blocks_needed(n) == -(-n // block_size)
    bm.append_slots("a", n + 1)
    assert len(bm.block_table("a")) == bm.blocks_needed(n + 1)
    assert bm.num_used_blocks == len(bm.block_table("a"))
    bm.check_invariants()
    bm.free("a")
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == 64


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_shared_system_prompt_hits_full_blocks_only(block_size: int) -> None:
    bm = BlockManager(num_blocks=64, block_size=block_size)
    run_prefill(bm, "a", SYSTEM + [1, 2])
    cached = run_prefill(bm, "b", SYSTEM + [7, 8, 9])
    assert cached == (len(SYSTEM) // block_size) * block_size
    assert cached % block_size == 0
    shared = len(SYSTEM) // block_size
    assert bm.block_table("a")[:shared] == bm.block_table("b")[:shared]
    assert set(bm.block_table("a")[shared + 1 :]).isdisjoint(bm.block_table("b"))


@pytest.mark.parametrize("block_size", [1, 3, 16])
@pytest.mark.parametrize("length", [1, 2, 15, 16, 17, 32, 33])
def test_identical_prompts_never_fully_cached(block_size: int, length: int) -> None:
    # The n > 1 case: siblings with the same prompt, allocated after the first one committed.
    bm = BlockManager(num_blocks=64, block_size=block_size)
    prompt = list(range(length))
    assert run_prefill(bm, "a", prompt) == 0
    cached = run_prefill(bm, "b", prompt)
    assert cached == ((length - 1) // block_size) * block_size
    assert cached < length
    # The block holding the last token is private, so computing it writes into no shared block.
    assert bm.block_table("b")[-1] not in bm.block_table("a")


def test_partial_block_is_not_cached() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    run_prefill(bm, "a", [1, 2, 3])
    assert run_prefill(bm, "b", [1, 2, 3, 4, 5]) == 0
    assert bm.stats()["cached_blocks"] == 1  # only b's full block [1, 2, 3, 4]


def test_uncommitted_blocks_do_not_hit() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    bm.allocate("a", [1, 2, 3, 4, 5])
    bm.commit_computed(
        "a", [1, 2, 3, 4, 5], 3
    )  # chunked prefill: only block 0 is full and computed
    assert bm.allocate("b", [1, 2, 3, 4, 9]) == 2


def test_revival_of_evictable_block() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    run_prefill(bm, "a", [1, 2, 3])
    first = bm.block_table("a")[0]
    bm.free("a")
    assert bm.num_free_blocks == 4 and bm.stats()["evictable_blocks"] == 1
    assert run_prefill(bm, "b", [1, 2, 5]) == 2
    assert bm.block_table("b")[0] == first
    assert bm.stats()["evictable_blocks"] == 0 and bm.num_used_blocks == 2


def test_can_allocate_counts_evictable_hits_once() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    run_prefill(bm, "a", [1, 2, 3, 4, 5])  # blocks [1,2] and [3,4] become cached
    bm.free("a")
    assert bm.num_free_blocks == 3
    # 4 blocks needed, 2 are evictable hits: 2 fresh needed but only 1 free block remains beside them.
    assert not bm.can_allocate([1, 2, 3, 4, 5, 6, 7])
    with pytest.raises(NoFreeBlocksError):
        bm.allocate("b", [1, 2, 3, 4, 5, 6, 7])
    bm.check_invariants()
    assert bm.can_allocate([1, 2, 3, 4, 5, 6])
    assert bm.allocate("b", [1, 2, 3, 4, 5, 6]) == 4
    assert bm.num_free_blocks == 0


def test_lru_eviction_order() -> None:
    bm = BlockManager(num_blocks=4, block_size=1)
    run_prefill(bm, "a", [1, 2])
    run_prefill(bm, "b", [7, 8])
    a1, a2 = bm.block_table("a")
    bm.free("a")  # a is freed first, tail before head: evictable order a2, a1, b2, b1
    bm.free("b")
    assert bm.stats()["evictable_blocks"] == 4
    assert bm.allocate("c", [9]) == 0
    assert bm.block_table("c") == [a2]  # least recently freed goes first
    assert bm.stats()["cached_blocks"] == 3
    # [7, 8] still cached; its one fresh block must come from a1, not from b's revived blocks.
    assert bm.allocate("d", [7, 8, 3]) == 2
    assert bm.block_table("d")[2] == a1
    assert bm.stats()["cached_blocks"] == 2  # only b's; a's hashes went with eviction
    assert not bm.can_allocate([1, 4])
    bm.check_invariants()


def test_capacity_exhaustion_and_append() -> None:
    bm = BlockManager(num_blocks=3, block_size=4, enable_prefix_caching=False)
    bm.allocate("a", list(range(8)))
    assert not bm.can_allocate(list(range(5)))
    with pytest.raises(NoFreeBlocksError, match="'b' needs 2 blocks"):
        bm.allocate("b", list(range(5)))
    assert bm.can_append("a", 12) and not bm.can_append("a", 13)
    bm.append_slots("a", 12)
    with pytest.raises(NoFreeBlocksError):
        bm.append_slots("a", 13)
    bm.append_slots("a", 10)  # already covered: no-op
    assert len(bm.block_table("a")) == 3 and bm.num_free_blocks == 0
    bm.check_invariants()


def test_unknown_and_duplicate_ids() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    with pytest.raises(KeyError, match="ghost"):
        bm.free("ghost")
    with pytest.raises(KeyError, match="ghost"):
        bm.block_table("ghost")
    bm.allocate("a", [1])
    with pytest.raises(ValueError, match="already"):
        bm.allocate("a", [1])
    with pytest.raises(ValueError, match="empty"):
        bm.allocate("b", [])
    with pytest.raises(ValueError, match="num_computed"):
        bm.commit_computed("a", [1], 2)


def test_duplicate_content_stays_unregistered() -> None:
    # Both allocated before either computed: no sharing, and b's twin block is not registered.
    bm = BlockManager(num_blocks=8, block_size=2)
    bm.allocate("a", [1, 2, 3])
    bm.allocate("b", [1, 2, 3])
    bm.commit_computed("a", [1, 2, 3], 3)
    bm.commit_computed("b", [1, 2, 3], 3)
    bm.check_invariants()
    assert bm.stats()["cached_blocks"] == 1
    bm.free("a")
    bm.free("b")
    assert bm.stats()["evictable_blocks"] == 1 and bm.num_free_blocks == 8


def test_stats_and_reset() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    run_prefill(bm, "a", list(range(10)))  # 10 looked up, 0 hit; blocks [0..3], [4..7] cached
    run_prefill(bm, "b", list(range(9)))  # 9 looked up, 8 hit
    assert bm.stats() == {
        "blocks_total": 10,
        "blocks_used": 4,  # a: 3 blocks, b: 2 shared + 1 own
        "blocks_free": 6,
        "cached_blocks": 2,
        "evictable_blocks": 0,
        "prefix_cache_queries": 19,
        "prefix_cache_hits": 8,
    }
    bm.free("a")
    bm.reset_prefix_cache()
    bm.check_invariants()
    assert bm.stats()["cached_blocks"] == 0
    assert run_prefill(bm, "c", list(range(9))) == 0
    bm.free("b")
    bm.free("c")
    assert bm.num_free_blocks == 10 and bm.stats()["evictable_blocks"] == 2


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / compute / append / free over a tiny vocabulary so prefixes repeat.

    A fake KV store records, for every slot the "model" writes, the prefix that slot's KV depends
    on. Every live sequence's computed slots must hold exactly its own prefixes: that catches a
    wrong cache hit, a block reused while still referenced, and a write into a shared block.
    """

    seqs = Bundle("seqs")

    @initialize(block_size=st.sampled_from([1, 2, 3, 4]), num_blocks=st.integers(2, 12))
    def setup(self, block_size: int, num_blocks: int) -> None:
        self.bm = BlockManager(num_blocks=num_blocks, block_size=block_size)
        self.tokens: dict[int, list[int]] = {}
        self.computed: dict[int, int] = {}
        self.kv: dict[tuple[int, int], tuple[int, ...]] = {}
        self.next_id = 0

    @rule(target=seqs, prompt=st.lists(st.integers(0, 2), min_size=1, max_size=10))
    def allocate(self, prompt: list[int]) -> int:
        sid, self.next_id = self.next_id, self.next_id + 1
        if not self.bm.can_allocate(prompt):
            with pytest.raises(NoFreeBlocksError):
                self.bm.allocate(sid, prompt)
            return sid  # never allocated: the other rules skip it
        cached = self.bm.allocate(sid, prompt)
        assert cached % self.bm.block_size == 0 and 0 <= cached < len(prompt)
        self.tokens[sid], self.computed[sid] = list(prompt), cached
        return sid

    @rule(sid=seqs, chunk=st.integers(1, 6))
    def compute(self, sid: int, chunk: int) -> None:
        if sid not in self.tokens:
            return
        toks, start = self.tokens[sid], self.computed[sid]
        end = min(len(toks), start + chunk)
        table, bs = self.bm.block_table(sid), self.bm.block_size
        for p in range(start, end):
            self.kv[(table[p // bs], p % bs)] = tuple(toks[: p + 1])
        self.computed[sid] = end
        self.bm.commit_computed(sid, toks, end)

    @rule(sid=seqs, new=st.lists(st.integers(0, 2), min_size=1, max_size=4))
    def append(self, sid: int, new: list[int]) -> None:
        if sid not in self.tokens or self.computed[sid] < len(self.tokens[sid]):
            return  # decode only after prefill finished
        total = len(self.tokens[sid]) + len(new)
        if not self.bm.can_append(sid, total):
            with pytest.raises(NoFreeBlocksError):
                self.bm.append_slots(sid, total)
            return
        self.bm.append_slots(sid, total)
        self.tokens[sid].extend(new)

    @rule(sid=consumes(seqs))
    def free(self, sid: int) -> None:
        if sid not in self.tokens:
            with pytest.raises(KeyError):
                self.bm.free(sid)
            return
        self.bm.free(sid)
        del self.tokens[sid], self.computed[sid]

    @rule()
    def reset(self) -> None:
        self.bm.reset_prefix_cache()

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "bm"):
            return
        self.bm.check_invariants()
        bs = self.bm.block_size
        for sid, toks in self.tokens.items():
            table = self.bm.block_table(sid)
            assert len(table) * bs >= len(toks)
            for p in range(self.computed[sid]):
                assert self.kv.get((table[p // bs], p % bs)) == tuple(toks[: p + 1])

    def teardown(self) -> None:
        if not hasattr(self, "bm"):
            return
        for sid in list(self.tokens):
            self.bm.free(sid)
        self.bm.check_invariants()
        assert self.bm.num_used_blocks == 0
        assert self.bm.num_free_blocks == self.bm.num_blocks


BlockManagerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
TestBlockManagerMachine = BlockManagerMachine.TestCase
