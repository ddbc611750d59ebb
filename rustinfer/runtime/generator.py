"""Run one request at a time on a loaded model: prefill, then decode token by token.

The continuous-batching engine serves many requests; this runner is the minimal path used by
``rustinfer generate`` and ``rustinfer bench latency``, and it shares the model, ops and paged KV
layout with the engine.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from rustinfer.runtime.kv_cache import (
    DEFAULT_BLOCK_SIZE,
    allocate_kv_caches,
    blocks_for,
    single_sequence_metadata,
)
from rustinfer.runtime.loading import LoadedModel


@dataclass
class Timings:
    prefill_ms: float = 0.0  # prompt forward + first sampled token
    decode_ms: float = 0.0  # all later tokens together
    decode_tokens: int = 0  # tokens produced by decode steps (the first token comes from prefill)

    @property
    def decode_ms_per_token(self) -> float:
        return self.decode_ms / self.decode_tokens if self.decode_tokens else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return 1000.0 / self.decode_ms_per_token if self.decode_tokens else 0.0


@dataclass
class SamplingConfig:
    max_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


@dataclass
class Generation:
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS or a stop id) or "length"
    timings: Timings = field(default_factory=Timings)


class SingleSequenceRunner:
    def __init__(
        self,
        loaded: LoadedModel,
        max_model_len: int | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device.torch_device
        self.block_size = block_size
        self.max_model_len = min(
            max_model_len or loaded.config.max_position_embeddings,
            loaded.config.max_position_embeddings,
        )

    def _sample(
        self, logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator | None
    ) -> int:
        # logits: [1, vocab] float32
        if cfg.temperature == 0:
            return int(self.model.ops.argmax(logits)[0])
        probs = torch.softmax(logits / cfg.temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=gen)[0, 0])

    def stream(
        self, prompt_ids: Sequence[int], cfg: SamplingConfig
    ) -> Iterator[tuple[int, Generation]]:
        """Yield ``(token_id, generation_so_far)`` per new token; the last one carries finish_reason."""
        n_prompt = len(prompt_ids)
        if n_prompt == 0:
            raise ValueError("the prompt is empty: give at least one token")
        total = n_prompt + cfg.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({n_prompt} tokens) + max_tokens ({cfg.max_tokens}) = {total} exceeds the "
                f"context limit of {self.max_model_len} tokens"
            )
        stop_ids = set(cfg.stop_token_ids)
        if not cfg.ignore_eos:
            stop_ids |= set(self.loaded.tokenizer.eos_token_ids if self.loaded.tokenizer else ())
            stop_ids |= set(self.loaded.config.eos_token_ids)
        gen = None
        if cfg.temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
        n_blocks = blocks_for(total, self.block_size)
        caches = allocate_kv_caches(self.model, n_blocks, self.block_size, self.device)
        block_table = torch.arange(n_blocks, dtype=torch.int32, device=self.device)
        result = Generation()
        dev = self.loaded.device

        with torch.inference_mode():
            start = time.perf_counter()
            ids = torch.tensor(list(prompt_ids), dtype=torch.long, device=self.device)
            positions = torch.arange(n_prompt, device=self.device)
            attn = single_sequence_metadata(0, n_prompt, block_table, self.block_size)
            hidden = self.model(ids, positions, caches, attn)
            token = self._sample(self.model.compute_logits(hidden[-1:]), cfg, gen)
            dev.synchronize()
            result.timings.prefill_ms = (time.perf_counter() - start) * 1000
            pos = n_prompt
            while True:
                result.token_ids.append(token)
                if token in stop_ids:
                    result.finish_reason = "stop"
                elif len(result.token_ids) >= cfg.max_tokens:
                    result.finish_reason = "length"
                yield token, result
                if result.finish_reason is not None:
                    return
                start = time.perf_counter()
                ids = torch.tensor([token], dtype=torch.long, device=self.device)
                positions = torch.tensor([pos], dtype=torch.long, device=self.device)
                attn = single_sequence_metadata(pos, 1, block_table, self.block_size)
                hidden = self.model(ids, positions, caches, attn)
                token = self._sample(self.model.compute_logits(hidden), cfg, gen)
                dev.synchronize()
                result.timings.decode_ms += (time.perf_counter() - start) * 1000
                result.timings.decode_tokens += 1
                pos += 1

    def generate(self, prompt_ids: Sequence[int], cfg: SamplingConfig) -> Generation:
        final = Generation()
        for _, final in self.stream(prompt_ids, cfg):  # noqa: B007  the last value is the result
            pass
        return final
