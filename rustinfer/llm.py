"""The offline API, in the vLLM convention: ``LLM(...).generate(prompts, params)`` and ``.chat(...)``.

    from rustinfer import LLM, SamplingParams
    llm = LLM()  # the embedded SmolLM2-135M-Instruct
    out = llm.chat([{"role": "user", "content": "Hi!"}], SamplingParams(temperature=0, max_tokens=32))
    print(out[0].outputs[0].text)

All prompts are submitted at once and run with continuous batching on one synchronous engine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from rustinfer.engine.core import EngineConfig, EngineCore
from rustinfer.engine.model_runner import DEFAULT_BLOCK_SIZE, kv_bytes_per_block
from rustinfer.engine.outputs import RequestOutput, RequestTimings, TokenLogprob
from rustinfer.engine.sampling_params import SamplingParams
from rustinfer.runtime.loading import LoadedModel, load_model

Prompt = str | Sequence[int]
Message = dict[str, Any]
# The largest prompt a lone request prefills in one step (generate, bench latency).
_SINGLE_REQUEST_CHUNK = 16384


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class GenerationResult:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    cached_tokens: int = 0
    timings: RequestTimings = field(default_factory=RequestTimings)

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


class LLM:
    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        device: str = "auto",
        dtype: str = "auto",
        load_format: str = "auto",
        seed: int = 0,
        quantization: str = "auto",
        batch_invariant: bool = False,
        tensor_parallel_size: int = 1,
        **engine_options: Any,
    ) -> None:
        """Load ``model`` (None: the embedded default); ``engine_options`` are EngineConfig fields.
        ``quantization``: auto, none, gguf, int8 or int4 (``int4-g64``: group size), see
        :class:`rustinfer.config.QuantizationConfig`; ``batch_invariant``: a request's output
        does not depend on the batch it runs in (slower kernels; CUDA); ``tensor_parallel_size``:
        the weights split across that many devices or CPU processes (README, tensor
        parallelism)."""
        if tensor_parallel_size > 1:
            from rustinfer.distributed.workers import LoadSpec, load_tensor_parallel

            spec = LoadSpec(
                None if model is None else str(model),
                device,
                dtype,
                load_format,
                quantization,
                batch_invariant,
                seed,
            )
            loaded = load_tensor_parallel(spec, tensor_parallel_size)
        else:
            loaded = load_model(
                model,
                device=device,
                dtype=dtype,
                load_format=load_format,
                seed=seed,
                quantization=quantization,
                batch_invariant=batch_invariant,
            )
        self._attach(loaded, EngineCore(loaded, EngineConfig(**engine_options)))

    def _attach(self, loaded: LoadedModel, engine: EngineCore) -> None:
        self.loaded = loaded
        self.engine = engine
        self.tokenizer = loaded.tokenizer
        self._counter = 0

    @classmethod
    def for_single_request(
        cls, loaded: LoadedModel, max_tokens_total: int, enforce_eager: bool = False
    ) -> LLM:
        """An LLM over an already loaded model whose KV pool holds exactly one request of
        ``max_tokens_total`` tokens: ``rustinfer generate`` and ``bench latency`` allocate no more
        than they use. No prefix cache: one request has nothing to share, and repeated benchmark
        runs must prefill for real. A prompt of up to 16,384 tokens is one step (no chunks):
        with no other request to keep decoding, chunking would only add launches and re-read the
        prefix; longer ones go in chunks of that size, which bounds the step's activations."""
        block = DEFAULT_BLOCK_SIZE
        blocks = max(1, -(-max_tokens_total // block))
        config = EngineConfig(
            block_size=block,
            max_num_seqs=1,
            max_num_batched_tokens=max(
                EngineConfig.max_num_batched_tokens, min(max_tokens_total, _SINGLE_REQUEST_CHUNK)
            ),
            kv_cache_bytes=blocks * kv_bytes_per_block(loaded.model, block),
            enable_prefix_caching=False,
            enforce_eager=enforce_eager,
        )
        llm = cls.__new__(cls)
        llm._attach(loaded, EngineCore(loaded, config))
        return llm

    def stream(self, prompt: Prompt, params: SamplingParams) -> Iterator[RequestOutput]:
        """One request's outputs as the engine produces them (text deltas, tokens, timings)."""
        _, ids = self._encode(prompt)
        self._counter += 1
        request_id = f"llm-{self._counter}"
        self.engine.add_request(request_id, ids, params)
        try:
            while self.engine.has_unfinished():
                yield from (o for o in self.engine.step() if o.request_id == request_id)
        finally:  # a consumer that stops early (Ctrl-C, break) leaves nothing running
            self._drain([request_id])

    def _encode(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids instead of text")
            return prompt, self.tokenizer.encode(prompt)
        return None, [int(t) for t in prompt]

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[GenerationResult]:
        """Complete each prompt (text or token ids); results come back in prompt order."""
        if isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        encoded = [self._encode(p) for p in prompts]  # type: ignore[union-attr]
        return self._run(encoded, params)

    def chat(
        self,
        conversations: Sequence[Message] | Sequence[Sequence[Message]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[GenerationResult]:
        """Reply to each conversation (a list of ``{"role", "content"}`` messages)."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so no chat template")
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # type: ignore[list-item]
        encoded = [
            (None, self.tokenizer.apply_chat_template(list(c), add_generation_prompt))
            for c in conversations
        ]
        return self._run(encoded, params)

    def _run(
        self,
        encoded: list[tuple[str | None, list[int]]],
        params: SamplingParams | Sequence[SamplingParams] | None,
    ) -> list[GenerationResult]:
        if params is None or isinstance(params, SamplingParams):
            per_prompt = [params or SamplingParams()] * len(encoded)
        else:
            per_prompt = list(params)
            if len(per_prompt) != len(encoded):
                raise ValueError(
                    f"{len(per_prompt)} SamplingParams for {len(encoded)} prompts: give one, "
                    "or one per prompt"
                )
        results: dict[str, GenerationResult] = {}
        order: list[str] = []
        try:
            for (text, ids), p in zip(encoded, per_prompt, strict=True):
                self._counter += 1
                rid = f"llm-{self._counter}"
                self.engine.add_request(rid, ids, p)
                results[rid] = GenerationResult(
                    rid, text, ids, [CompletionOutput(k) for k in range(p.n)]
                )
                order.append(rid)
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    self._collect(results[out.request_id], out)
        except BaseException:
            self._drain(order)  # leave nothing behind in the engine on an error or Ctrl-C
            raise
        return [results[rid] for rid in order]

    def _drain(self, request_ids: Sequence[str]) -> None:
        aborted = [rid for rid in request_ids if self.engine.abort(rid)]
        while aborted and self.engine.has_unfinished():
            self.engine.step()

    @staticmethod
    def _collect(result: GenerationResult, out: RequestOutput) -> None:
        comp = result.outputs[out.index]
        comp.text += out.text_delta
        comp.token_ids.extend(out.new_token_ids)
        if out.logprobs is not None:
            comp.logprobs = (comp.logprobs or []) + out.logprobs
        result.cached_tokens = out.cached_tokens
        result.timings = out.timings
        if out.finished:
            comp.finish_reason, comp.stop_reason = out.finish_reason, out.stop_reason
