"""``POST /v1/completions``: raw text (or token ids) in, continuations out, in OpenAI's shapes."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.responses import Response

from rustinfer.engine.async_engine import RequestStream
from rustinfer.engine.outputs import TokenLogprob
from rustinfer.server.openai.errors import ApiError
from rustinfer.server.openai.protocol import CompletionRequest
from rustinfer.server.openai.serving import Choice, Serving, finite, now_s, sse, usage_dict
from rustinfer.server.requests_common import check_token_ids

__all__ = ["Completions"]

# More prompts than this in one request is a batch job, not a completion call.
MAX_PROMPTS = 64


def legacy_logprobs(lps: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """The completions API's column-wise logprobs; ``offset`` is where this text starts."""
    text_offset = []
    for lp in lps:
        text_offset.append(offset)
        offset += len(lp.token)
    return {
        "tokens": [lp.token for lp in lps],
        "token_logprobs": [finite(lp.logprob) for lp in lps],
        "top_logprobs": [{t.token: finite(t.logprob) for t in lp.top} for lp in lps],
        "text_offset": text_offset,
    }


class Completions:
    def __init__(self, serving: Serving) -> None:
        self.serving = serving

    async def _prompts(self, req: CompletionRequest) -> list[tuple[str, list[int]]]:
        """(text, ids) per prompt; text is what ``echo`` repeats."""
        p = req.prompt
        if isinstance(p, str):
            items: list[str | list[int]] = [p]
        elif p and all(isinstance(t, int) for t in p):
            items = [p]  # type: ignore[list-item]
        else:
            items = list(p)  # type: ignore[arg-type]
        if not items:
            raise ApiError(400, "prompt is empty: give a string, token ids, or a list", "prompt")
        if len(items) > MAX_PROMPTS:
            raise ApiError(
                400, f"at most {MAX_PROMPTS} prompts per request, got {len(items)}", param="prompt"
            )
        engine = self.serving.engine
        tok = engine.tokenizer
        out = []
        for item in items:
            if isinstance(item, str):
                if tok is None:
                    raise ApiError(400, "this model has no tokenizer: send token ids", "prompt")
                ids = await asyncio.to_thread(tok.encode, item, add_special_tokens=True)
                out.append((item, ids))
            else:
                ids = check_token_ids(item, engine.vocab_size, "prompt")
                text = tok.decode(ids, skip_special_tokens=False) if tok else ""
                out.append((text, ids))
        return out

    def _check(self, req: CompletionRequest) -> None:
        s = self.serving
        s.check_model(req.model)
        if req.suffix:
            raise s.refuse("suffix", "a suffix (fill-in-the-middle)")
        if req.best_of is not None and req.best_of != req.n:
            raise s.refuse("best_of", "best_of other than n")
        if req.echo and req.logprobs is not None:
            raise s.refuse("echo", "echo together with logprobs (prompt logprobs)")

    async def __call__(self, req: CompletionRequest, raw: Request) -> Response:
        arrival = time.monotonic()
        self._check(req)
        s = self.serving
        prompts = await self._prompts(req)
        params = s.sampling_params(req, req.max_tokens, req.logprobs)
        streams = await s.submit_all([ids for _, ids in prompts], params, arrival, "cmpl")
        rid = f"cmpl-{uuid.uuid4().hex}"
        echo = [text if req.echo else "" for text, _ in prompts]
        lengths = [len(ids) for _, ids in prompts]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = self._stream(rid, streams, params.n, echo, lengths, include_usage, raw)
            return s.streaming_response(events, "completion")
        choices = await s.collect(streams, params.n, raw)
        return JSONResponse(
            {
                "id": rid,
                "object": "text_completion",
                "created": now_s(),
                "model": s.model_name,
                "choices": [
                    {
                        "index": c.index,
                        "text": echo[c.index // params.n] + c.text,
                        "logprobs": legacy_logprobs(c.logprobs, 0)
                        if req.logprobs is not None
                        else None,
                        "finish_reason": c.finish_reason,
                    }
                    for c in choices
                ],
                "usage": usage_dict(choices, lengths, params.n),
            }
        )

    async def _stream(
        self,
        rid: str,
        streams: list[RequestStream],
        n: int,
        echo: list[str],
        lengths: list[int],
        include_usage: bool,
        raw: Request,
    ) -> AsyncIterator[str]:
        created = now_s()
        model = self.serving.model_name
        choices = [Choice(k) for k in range(len(streams) * n)]
        offsets = [0] * len(choices)

        def chunk(index: int, text: str, logprobs: Any, finish_reason: str | None) -> str:
            body: dict[str, Any] = {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": index,
                        "text": text,
                        "logprobs": logprobs,
                        "finish_reason": finish_reason,
                    }
                ],
            }
            if include_usage:
                body["usage"] = None
            return sse(body)

        for index in range(len(choices)):
            if echo[index // n]:
                yield chunk(index, echo[index // n], None, None)
        async for p, out in self.serving.merged(streams, raw):
            index = p * n + out.index
            choice = choices[index]
            choice.add(out)
            lps = None
            if out.logprobs:
                lps = legacy_logprobs(out.logprobs, offsets[index])
                offsets[index] += sum(len(lp.token) for lp in out.logprobs)
            if out.text_delta or lps or out.finished:
                yield chunk(index, out.text_delta, lps, choice.finish_reason)
        if include_usage:
            yield sse(
                {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage_dict(choices, lengths, n),
                }
            )
