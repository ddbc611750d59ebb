"""Batched steps over the paged cache: batching and chunking do not change results."""

from __future__ import annotations

import pytest
import torch
from model_helpers import random_weights, tiny_config, write_checkpoint

from rustinfer.engine.model_runner import (
    ModelRunner,
    ScheduledSequence,
    kv_bytes_per_block,
    num_blocks_for_budget,
)
from rustinfer.runtime.loading import load_model

BLOCK = 4
PROMPTS = [
    [1, 5, 17, 42, 3, 88, 9, 60, 61, 62, 7],
    [1, 33, 2, 90],
    [1, 8, 8, 8, 8, 12, 44, 71, 23, 19, 5, 6, 70, 3, 2, 1, 9],
]
STEPS = 6


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    cfg = tiny_config(rope_scaling=True)
    path = write_checkpoint(tmp_path_factory.mktemp("m"), cfg, random_weights(cfg, seed=3))
    return load_model(str(path), device="cpu", dtype="float64").model


def _tables(n_seqs: int, blocks_each: int) -> list[list[int]]:
    # Interleaved block ids, so every sequence's blocks are scattered through the pool.
    return [[i + n_seqs * j for j in range(blocks_each)] for i in range(n_seqs)]


def greedy_alone(model, prompt: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    runner = ModelRunner(model, torch.device("cpu"), num_blocks=16, block_size=BLOCK)
    table = list(range(8))
    logits = runner.execute([ScheduledSequence(prompt, 0, table)])
    out, rows = [], []
    for step in range(STEPS):
        rows.append(logits[0])
        out.append(int(logits[0].argmax()))
        logits = runner.execute([ScheduledSequence([out[-1]], len(prompt) + step, table)])
    return out, rows


def test_batched_and_chunked_steps_match_each_sequence_alone(model):
    alone = [greedy_alone(model, p) for p in PROMPTS]
    runner = ModelRunner(model, torch.device("cpu"), num_blocks=32, block_size=BLOCK)
    tables = _tables(len(PROMPTS), 8)
    # Step 1: sequence 0 prefills whole, sequence 2 prefills its first chunk (no logits).
    chunk = 9
    logits = runner.execute(
        [
            ScheduledSequence(PROMPTS[0], 0, tables[0]),
            ScheduledSequence(PROMPTS[2][:chunk], 0, tables[2], needs_logits=False),
        ]
    )
    assert logits.shape[0] == 1
    outs: list[list[int]] = [[int(logits[0].argmax())], [], []]
    rows: list[list[torch.Tensor]] = [[logits[0]], [], []]
    # Step 2: a decode for 0, the whole prompt of 1, the rest of 2's prompt: a mixed batch.
    logits = runner.execute(
        [
            ScheduledSequence([outs[0][-1]], len(PROMPTS[0]), tables[0]),
            ScheduledSequence(PROMPTS[1], 0, tables[1]),
            ScheduledSequence(PROMPTS[2][chunk:], chunk, tables[2]),
        ]
    )
    for i in range(3):
        rows[i].append(logits[i])
        outs[i].append(int(logits[i].argmax()))
    # Pure decode steps for all three (different context lengths in one batch).
    while min(len(o) for o in outs) < STEPS + 1:
        batch = [
            ScheduledSequence([outs[i][-1]], len(PROMPTS[i]) + len(outs[i]) - 1, tables[i])
            for i in range(3)
        ]
        logits = runner.execute(batch)
        for i in range(3):
            rows[i].append(logits[i])
            outs[i].append(int(logits[i].argmax()))
    for i, (tokens, ref_rows) in enumerate(alone):
        assert outs[i][:STEPS] == tokens, f"sequence {i}"
        got = torch.stack(rows[i][:STEPS])
        # float64 throughout: only summation order may differ between batch shapes.
        torch.testing.assert_close(got, torch.stack(ref_rows), atol=1e-10, rtol=1e-10)


def test_step_metadata_tells_kernels_the_longest_context(model):
    # max_seq_len (host side) is the longest context of the step, prefix included: with
    # max_query_len it tells a kernel whether a lone prompt has a cached prefix.
    runner = ModelRunner(model, torch.device("cpu"), num_blocks=16, block_size=BLOCK)
    step = runner.prepare([ScheduledSequence(PROMPTS[0], 0, [0, 1, 2])])
    assert (step.attn.max_query_len, step.attn.max_seq_len) == (11, 11)
    step = runner.prepare(
        [ScheduledSequence(PROMPTS[1], 7, [0, 1, 2]), ScheduledSequence([5], 2, [3])]
    )
    assert (step.attn.max_query_len, step.attn.max_seq_len) == (4, 11)
    assert step.attn.seq_lens.tolist() == [11, 3]


def test_block_table_too_short_is_rejected(model):
    runner = ModelRunner(model, torch.device("cpu"), num_blocks=4, block_size=BLOCK)
    with pytest.raises(ValueError, match="needs 5 slots but its block table covers 4"):
        runner.execute([ScheduledSequence([1, 2, 3, 4, 5], 0, [0])])


def test_kv_budget(model):
    per_block = kv_bytes_per_block(model, BLOCK)
    c = model.config
    assert per_block == 2 * c.num_hidden_layers * BLOCK * c.num_key_value_heads * c.head_dim * 8
    assert num_blocks_for_budget(model, BLOCK, 10 * per_block + 1) == 10
    with pytest.raises(ValueError, match="holds no block"):
        num_blocks_for_budget(model, BLOCK, per_block - 1)


@pytest.mark.parametrize("num_blocks", [1, 3, 16, 200])
def test_warm_up_fits_any_pool_and_leaves_results_unchanged(model, num_blocks):
    """Warm-up runs before any request, in whatever pool there is; what it writes is never read
    by a later request (each prefill writes its own slots before attending to them)."""
    runner = ModelRunner(model, torch.device("cpu"), num_blocks=num_blocks, block_size=BLOCK)
    runner.warm_up(model.config.max_position_embeddings)
    if num_blocks < 4:
        return
    fresh = ModelRunner(model, torch.device("cpu"), num_blocks=num_blocks, block_size=BLOCK)
    seq = [ScheduledSequence(PROMPTS[1], 0, [0])]
    torch.testing.assert_close(runner.execute(seq), fresh.execute(seq), rtol=0, atol=0)


@pytest.mark.parametrize("pad_to", [5, 8])
def test_padded_steps_give_the_same_logits_and_cache(model, pad_to):
    """On CUDA eager steps round their token count up (fewer GEMM shapes for cuBLAS to meet);
    the padding sequences write only the scratch block, sample nothing, and leave every real
    row's logits and K/V as an unpadded step computes them. A step of decodes stays one (padded
    with one-token sequences). Padding wider than a block takes several scratch-table entries."""
    plain = ModelRunner(model, torch.device("cpu"), num_blocks=32, block_size=BLOCK)
    padded = ModelRunner(
        model, torch.device("cpu"), num_blocks=32, block_size=BLOCK, pad_tokens_to=pad_to
    )
    assert plain.scratch_block is None and padded.scratch_block == 32
    tables = _tables(len(PROMPTS), 8)
    steps = [
        [ScheduledSequence(PROMPTS[0], 0, tables[0])],
        [
            ScheduledSequence([9], len(PROMPTS[0]), tables[0]),
            ScheduledSequence(PROMPTS[1], 0, tables[1]),
            ScheduledSequence(PROMPTS[2][:6], 0, tables[2], needs_logits=False),
        ],
        [
            ScheduledSequence([4], len(PROMPTS[0]) + 1, tables[0]),
            ScheduledSequence([7], len(PROMPTS[1]), tables[1]),
        ],
    ]
    for seqs in steps:
        filled = padded.padded(seqs)
        assert sum(len(s.token_ids) for s in filled) % pad_to == 0
        extra = filled[len(seqs) :]
        assert all(not s.needs_logits and set(s.block_table) == {32} for s in extra)
        if all(len(s.token_ids) == 1 for s in seqs):
            assert padded.prepare(filled).attn.is_decode
        torch.testing.assert_close(
            padded.execute(seqs), plain.execute(seqs), atol=1e-10, rtol=1e-10
        )
    # The positions each sequence wrote (the pools' other slots hold whatever memory held).
    written = {0: len(PROMPTS[0]) + 2, 1: len(PROMPTS[1]) + 1, 2: 6}
    blocks = torch.tensor([tables[i][p // BLOCK] for i, n in written.items() for p in range(n)])
    offsets = torch.tensor([p % BLOCK for n in written.values() for p in range(n)])
    for (k_pad, v_pad), (k, v) in zip(padded.kv_caches, plain.kv_caches, strict=True):
        assert k_pad.shape[0] == k.shape[0] + 1  # the scratch block
        for got, want in ((k_pad, k), (v_pad, v)):
            torch.testing.assert_close(
                got[blocks, offsets], want[blocks, offsets], atol=1e-10, rtol=1e-10
            )


def test_padding_needs_a_positive_multiple(model):
    with pytest.raises(ValueError, match="pad_tokens_to must be >= 1"):
        ModelRunner(model, torch.device("cpu"), num_blocks=4, block_size=BLOCK, pad_tokens_to=0)
