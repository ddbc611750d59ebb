"""OpenAI request bodies, as pydantic models (the wire only: the engine never sees these).

Fields the engine can honour map onto ``SamplingParams`` (range checks live there, so REST, gRPC and
library callers get one set of rules). Fields that would change the result but that rustinfer
cannot honour yet are declared too, so that a request using them is refused with a 400 naming the
field rather than silently answered as if they were absent. Anything else unknown is ignored, as
OpenAI-compatible servers do.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "DetokenizeRequest",
    "StreamOptions",
    "TokenizeRequest",
]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Wire):
    include_usage: bool = False


class ContentPart(_Wire):
    type: str
    text: str | None = None


class ChatMessage(_Wire):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[Any] | None = None  # read by rustinfer.tool_calls (400s name the part)


class _SamplingFields(_Wire):
    """Everything both endpoints share: sampling parameters under their OpenAI (or vLLM) names."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    max_tokens: int | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Structured outputs: OpenAI's response_format (text, json_object, json_schema) or one of
    # vLLM's guided_* extensions (a JSON schema, a regex, choices, a grammar: Lark or GBNF).
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    # Tool calling: read and checked by rustinfer.tool_calls (400s name the part).
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    # Would change the answer; refused with a 400 until supported.
    functions: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    web_search_options: Any = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None  # refused: no fill-in-the-middle


class TokenizeRequest(_Wire):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Any] | None = None  # with messages: counted as a chat request would render them
    tool_choice: Any = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Wire):
    model: str | None = None
    tokens: list[int]
