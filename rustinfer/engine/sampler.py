"""Batched sampling on the logits' device, with per-request parameters.

Processing order, per row (each stage is skipped when no row in the batch needs it):

1. A grammar's mask (structured outputs: disallowed tokens to -inf); ``logit_bias`` added;
   ``min_tokens``: stop_token_ids (and EOS unless ignore_eos) set to -inf
   while the output is shorter than min_tokens.
2. Penalties: repetition (HF/vLLM: logit > 0 -> logit / p, else logit * p, over prompt + output
   tokens), then frequency (times the output count) and presence (once per seen output token).
3. Greedy rows take ``argmax`` of these logits, exactly.
4. Temperature, 5. top_k, 6. top_p (over the top_k survivors, renormalized), 7. min_p.
8. Sample with the exponential race ``argmax(probs / E)``, E ~ Exp(1): it equals a categorical draw
   and needs one noise value per token, so a seeded row draws its own noise from its own generator
   and gets the same tokens alone or in any batch.

Logprobs are reported under the raw model distribution (log_softmax of the unprocessed logits), as
vLLM does, so they do not change with temperature or truncation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rustinfer.engine.host_copy import upload
from rustinfer.engine.sampling_params import SamplingParams

__all__ = [
    "Sampler",
    "SamplerOutput",
    "SamplingBatch",
    "is_plain_greedy",
    "needs_output_history",
]


def _token_counts(
    seqs: Sequence[Sequence[int]], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """[B, V] float32 occurrence counts, built with one scatter_add on the device."""
    width = max((len(s) for s in seqs), default=0)
    # Pad (and ids the model cannot produce) go to an extra column that is dropped afterwards.
    padded = torch.full((len(seqs), max(width, 1)), vocab_size, dtype=torch.long)
    for row, seq in enumerate(seqs):
        if seq:
            padded[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    padded = upload(padded, torch.long, device)
    padded = torch.where((padded >= 0) & (padded < vocab_size), padded, vocab_size)
    counts = torch.zeros(len(seqs), vocab_size + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    return counts[:, :vocab_size]


@dataclass
class SamplingBatch:
    """Per-row sampling state as device tensors; a field is None when no row needs that stage."""

    num_rows: int
    vocab_size: int
    temperature: torch.Tensor  # [B] float32, 1.0 on greedy rows (their draw is discarded)
    all_greedy: bool
    greedy_mask: torch.Tensor | None  # [B] bool; None when no row is greedy
    top_k: torch.Tensor | None  # [B] int64, vocab_size where off
    max_top_k: int  # host copy, so the top-k fast path needs no device sync
    top_p: torch.Tensor | None  # [B] float32
    min_p: torch.Tensor | None  # [B] float32
    repetition_penalty: torch.Tensor  # [B] float32
    frequency_penalty: torch.Tensor  # [B] float32
    presence_penalty: torch.Tensor  # [B] float32
    uses_frequency_presence: bool
    prompt_mask: torch.Tensor | None  # [B, V] bool, only when a row has repetition_penalty != 1
    output_counts: torch.Tensor | None  # [B, V] float32, only when a row has any penalty
    logit_bias: torch.Tensor | None  # [B, V] float32 dense add
    stop_mask_rows: torch.Tensor | None  # [M] int64 rows of (row, token) pairs set to -inf
    stop_mask_tokens: torch.Tensor | None  # [M] int64
    seeded_rows: list[tuple[int, torch.Generator]]
    has_unseeded_random: bool
    max_num_logprobs: int | None  # None: no row asked for logprobs
    # [B, V] bool: the tokens each row's grammar forbids this step (structured outputs); set per
    # step by the engine, None when no row has a grammar.
    banned: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        prompt_token_ids: Sequence[Sequence[int]],
        output_token_ids: Sequence[Sequence[int]],
        generators: Sequence[torch.Generator | None],
        eos_token_ids: Sequence[int],
        vocab_size: int,
        device: torch.device,
    ) -> SamplingBatch:
        rows = len(params)
        if not rows == len(prompt_token_ids) == len(output_token_ids) == len(generators):
            raise ValueError("params, prompt/output token ids and generators differ in length")
        for p in params:
            p.check_vocab(vocab_size)

        def column(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return upload(values, dtype, device)

        greedy = [p.is_greedy for p in params]
        temperature = column(
            [1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)]
        )
        top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        rep = [p.repetition_penalty for p in params]
        freq = [p.frequency_penalty for p in params]
        pres = [p.presence_penalty for p in params]
        uses_rep = any(r != 1.0 for r in rep)
        uses_fp = any(f != 0.0 for f in freq) or any(x != 0.0 for x in pres)

        def only(flags: list[bool], seqs: Sequence[Sequence[int]]) -> list[Sequence[int]]:
            # Rows without the penalty contribute nothing: no need to scatter their long prompts.
            return [s if f else () for f, s in zip(flags, seqs, strict=True)]

        output_counts = prompt_mask = None
        if uses_rep or uses_fp:
            needs = [
                r != 1.0 or f != 0.0 or x != 0.0 for r, f, x in zip(rep, freq, pres, strict=True)
            ]
            output_counts = _token_counts(only(needs, output_token_ids), vocab_size, device)
        if uses_rep:
            needs_prompt = [r != 1.0 for r in rep]
            prompt = only(needs_prompt, prompt_token_ids)
            prompt_mask = _token_counts(prompt, vocab_size, device) > 0

        logit_bias = None
        if any(p.logit_bias for p in params):
            bias = torch.zeros(rows, vocab_size, dtype=torch.float32)
            for row, p in enumerate(params):
                for token, value in (p.logit_bias or {}).items():
                    bias[row, token] = value
            logit_bias = upload(bias, torch.float32, device)

        mask_rows: list[int] = []
        mask_tokens: list[int] = []
        for row, (p, out) in enumerate(zip(params, output_token_ids, strict=True)):
            if len(out) < p.min_tokens:
                # With ignore_eos, EOS does not end the request, so it need not be held back.
                stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
                # Ids past the vocabulary can never be sampled; skip rather than index out of range.
                valid = sorted(t for t in stops if 0 <= t < vocab_size)
                mask_rows += [row] * len(valid)
                mask_tokens += valid

        # Greedy rows never draw, so their generators are left unadvanced.
        random_rows = [
            (row, g)
            for row, (g, is_g) in enumerate(zip(generators, greedy, strict=True))
            if not is_g
        ]
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            num_rows=rows,
            vocab_size=vocab_size,
            temperature=temperature,
            all_greedy=all(greedy),
            greedy_mask=column(greedy, torch.bool) if any(greedy) else None,
            top_k=column(top_k, torch.long) if any(k < vocab_size for k in top_k) else None,
            max_top_k=max((k for k in top_k if k < vocab_size), default=vocab_size),
            top_p=column([p.top_p for p in params]) if any(p.top_p < 1 for p in params) else None,
            min_p=column([p.min_p for p in params]) if any(p.min_p > 0 for p in params) else None,
            repetition_penalty=column(rep),
            frequency_penalty=column(freq),
            presence_penalty=column(pres),
            uses_frequency_presence=uses_fp,
            prompt_mask=prompt_mask,
            output_counts=output_counts,
            logit_bias=logit_bias,
            stop_mask_rows=column(mask_rows, torch.long) if mask_rows else None,
            stop_mask_tokens=column(mask_tokens, torch.long) if mask_rows else None,
            seeded_rows=[(row, g) for row, g in random_rows if g is not None],
            has_unseeded_random=any(g is None for _, g in random_rows),
            max_num_logprobs=min(max(wanted), vocab_size) if wanted else None,
        )


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] float32, raw distribution; None when no row asked
    top_logprob_ids: torch.Tensor | None  # [B, K] int64, K = max requested k in the batch
    top_logprobs: torch.Tensor | None  # [B, K] float32


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Stages 1-2 in place on ``logits`` [B, V]; returns it."""
    if batch.banned is not None:
        logits.masked_fill_(batch.banned, float("-inf"))
    if batch.logit_bias is not None:
        logits += batch.logit_bias
    if batch.stop_mask_rows is not None:
        logits[batch.stop_mask_rows, batch.stop_mask_tokens] = float("-inf")
    if batch.prompt_mask is not None and batch.output_counts is not None:
        seen = batch.prompt_mask | (batch.output_counts > 0)
        penalty = batch.repetition_penalty.unsqueeze(1)
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalized, logits)
    if batch.output_counts is not None and batch.uses_frequency_presence:
        counts = batch.output_counts
        logits -= batch.frequency_penalty.unsqueeze(1) * counts
        logits -= batch.presence_penalty.unsqueeze(1) * (counts > 0).to(logits.dtype)
    return logits


def apply_truncation(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Stages 4-7 on temperature-free ``logits`` [B, V]; masked tokens become -inf."""
    logits = logits / batch.temperature.unsqueeze(1)
    neg_inf = float("-inf")
    if batch.top_p is not None:
        # top_p needs the sorted order anyway, so top_k rides on the same sort.
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        if batch.top_k is not None:
            rank = torch.arange(logits.shape[1], device=logits.device)
            sorted_logits.masked_fill_(rank >= batch.top_k.unsqueeze(1), neg_inf)
        probs = sorted_logits.softmax(dim=-1)
        # Keep token i when the mass strictly before it is < p: the smallest prefix reaching p.
        # The top token is always kept, whatever rounding does to the cumulative sum.
        mass_before = probs.cumsum(dim=-1) - probs
        drop = mass_before >= batch.top_p.unsqueeze(1)
        drop[:, 0] = False
        sorted_logits.masked_fill_(drop, neg_inf)
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    elif batch.top_k is not None:
        # topk over the largest requested k is cheaper than a full-vocabulary sort. Ties with the
        # k-th value are kept: they are equally likely, so no choice among them is more correct.
        k = batch.top_k
        top = logits.topk(batch.max_top_k, dim=-1).values
        kth = top.gather(1, (k.clamp(max=top.shape[1]) - 1).unsqueeze(1))
        # Rows with top_k off (k = vocab_size) keep everything.
        kth = kth.masked_fill(k.unsqueeze(1) >= batch.vocab_size, neg_inf)
        logits = logits.masked_fill(logits < kth, neg_inf)
    if batch.min_p is not None:
        probs = logits.softmax(dim=-1)
        threshold = batch.min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(probs < threshold, neg_inf)
    return logits


def _exponential_noise(probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    noise = torch.empty_like(probs)
    if batch.has_unseeded_random:
        noise.exponential_()  # one batched draw from the default generator
    for row, generator in batch.seeded_rows:
        # The row is a contiguous [V] view: the draw depends only on this generator and V, never
        # on the batch's layout (one launch per row, not three).
        noise[row].exponential_(generator=generator)
    # exponential_ may return exactly 0; 0/0 = NaN would win argmax for a masked token.
    return noise.clamp_min_(torch.finfo(noise.dtype).tiny)


def is_plain_greedy(params: SamplingParams, num_output_tokens: int) -> bool:
    """Whether a row's next token is the argmax of its raw logits: greedy, with no stage that
    changes the logits and no logprobs asked. A batch of such rows needs no SamplingBatch at all
    (no host-to-device copies of per-row parameters)."""
    return (
        params.is_greedy
        and params.logprobs is None
        and params.repetition_penalty == 1.0
        and params.presence_penalty == 0.0
        and params.frequency_penalty == 0.0
        and not params.logit_bias
        and params.structured is None
        and num_output_tokens >= params.min_tokens
    )


def needs_output_history(params: SamplingParams) -> bool:
    """Whether sampling a row reads its output tokens on the host: penalties count them,
    ``min_tokens`` holds stops back by their number, a grammar must have seen the last one."""
    return (
        params.structured is not None
        or params.repetition_penalty != 1.0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
        or params.min_tokens > 0
    )


class Sampler:
    """Stateless; per-request state (generators, token counts) arrives in the SamplingBatch."""

    @staticmethod
    def greedy(logits: torch.Tensor) -> SamplerOutput:
        """The sampler's answer for a batch of plain-greedy rows (see ``is_plain_greedy``)."""
        return SamplerOutput(logits.argmax(dim=-1), None, None, None)

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != batch.num_rows:
            raise ValueError(f"logits must be [{batch.num_rows}, V], got {tuple(logits.shape)}")
        logits = logits.float()
        logprob_out = self._logprobs(logits, batch)
        # Clone so the caller's logits (and the raw logprobs above) stay untouched.
        processed = apply_penalties(logits.clone(), batch)
        if batch.all_greedy:
            greedy_ids = processed.argmax(dim=-1)
            return SamplerOutput(greedy_ids, *self._gather(logprob_out, greedy_ids))
        # Greedy rows beside sampled ones take the argmax before temperature and truncation.
        greedy_ids = processed.argmax(dim=-1) if batch.greedy_mask is not None else None
        truncated = apply_truncation(processed, batch)
        probs = truncated.softmax(dim=-1)
        sampled = (probs / _exponential_noise(probs, batch)).argmax(dim=-1)
        if greedy_ids is not None:
            sampled = torch.where(batch.greedy_mask, greedy_ids, sampled)
        return SamplerOutput(sampled, *self._gather(logprob_out, sampled))

    @staticmethod
    def _logprobs(
        logits: torch.Tensor, batch: SamplingBatch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        if batch.max_num_logprobs is None:
            return None
        raw = logits.log_softmax(dim=-1)
        top_values, top_ids = raw.topk(batch.max_num_logprobs, dim=-1)
        return raw, top_ids, top_values

    @staticmethod
    def _gather(
        logprob_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, token_ids: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        if logprob_out is None:
            return None, None, None
        raw, top_ids, top_values = logprob_out
        return raw.gather(1, token_ids.unsqueeze(1)).squeeze(1), top_ids, top_values
