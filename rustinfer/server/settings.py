"""``rustinfer serve`` settings: flags, or ``RUSTINFER_*`` environment variables, or defaults.

One pydantic-settings model is the single description of every option; the CLI builds its flags
from it, so a flag and its environment variable can never drift apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["ServeSettings"]


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RUSTINFER_", extra="forbid")

    model: str | None = Field(
        None,
        description="HF model dir, .gguf file, or config.json with --load-format dummy; "
        "default: the embedded SmolLM2-135M-Instruct",
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port (0: pick a free one)")
    device: str = Field("auto", description="cpu, cuda, cuda:N or auto")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="compute dtype"
    )
    load_format: Literal["auto", "safetensors", "gguf", "dummy"] = Field(
        "auto", description="dummy: random weights at the config's shapes"
    )
    quantization: str = Field(
        "auto",
        description="matmul weights: auto (a GGUF's quantized tensors kept where the device has "
        "kernels for them), none, gguf, int8, int4 (optionally -g32/-g64/-g128)",
    )
    served_model_name: str | None = Field(
        None, description="the model id clients send and /v1/models lists (default: its name)"
    )
    api_key: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="accept this key as 'Authorization: Bearer KEY'",
    )
    api_key_file: Path | None = Field(None, description="a file of API keys, one per line")
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="CORS origins allowed to call the API ('*' for any)"
    )
    max_model_len: int | None = Field(None, ge=1, description="context limit (default: model's)")
    max_num_seqs: int = Field(64, ge=1, description="sequences decoded together at most")
    max_queue: int = Field(
        1024, ge=1, description="requests waiting beyond this get 429 (back-pressure)"
    )
    kv_cache_gb: float | None = Field(
        None, gt=0, description="KV cache size in GiB on CPU (default 2)"
    )
    threads: int | None = Field(None, ge=1, description="CPU threads for torch")
    enforce_eager: bool = Field(False, description="no CUDA graphs: every decode step eager")
    batch_invariant: bool = Field(
        False,
        description="a request's output does not depend on what else runs beside it (greedy "
        "tokens alone = in a batch); slower kernels, CUDA only",
    )
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="split the model's weights across N devices (N GPUs from --device on, or N "
        "CPU processes), one worker process per extra rank",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="server log level"
    )
    grpc_port: int = Field(
        50051,
        ge=0,
        le=65535,
        description="gRPC port: rustinfer.v1, KServe OIP, health, reflection (0 disables)",
    )
    tool_call_parser: str | None = Field(
        None,
        description="how tool calls are read from the output: hermes, llama3_json, qwen or a "
        "plugin's parser (default: from the chat template, else hermes)",
    )
    shutdown_grace_s: float = Field(
        10.0, ge=0, description="on SIGTERM/SIGINT, let running requests finish this long"
    )

    @field_validator("api_key", "allowed_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        # Environment variables hold one string: RUSTINFER_API_KEY="k1,k2".
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("quantization")
    @classmethod
    def _known_quantization(cls, value: str) -> str:
        from rustinfer.config import parse_quantization

        return str(parse_quantization(value))  # ValueError names the accepted spellings

    @field_validator("tool_call_parser")
    @classmethod
    def _known_parser(cls, value: str | None) -> str | None:
        if value is not None:
            from rustinfer.tool_calls.parsers import TOOL_PARSERS  # torch: only when given

            if value not in TOOL_PARSERS:
                raise ValueError(f"unknown parser {value!r}; one of {sorted(TOOL_PARSERS)}")
        return value

    def api_keys(self) -> list[str]:
        """Every accepted key: the flags' and the key file's (blank lines and # comments skipped)."""
        keys = list(self.api_key)
        if self.api_key_file is not None:
            try:
                text = self.api_key_file.read_text(encoding="utf-8")
            except OSError as exc:
                raise ValueError(f"cannot read --api-key-file {self.api_key_file}: {exc}") from exc
            for line in text.splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.append(line)
        return keys
