"""Hook implementations of rustinfer-models-llama3."""

from __future__ import annotations

from rustinfer.hookspecs import hookimpl
from rustinfer.registry import RegisterModel

LLAMA = "rustinfer_models_llama3.model:LlamaForCausalLM"


@hookimpl
def rustinfer_register_models(register: RegisterModel) -> None:
    register("LlamaForCausalLM", LLAMA)  # HF config.json architectures[0]
    register("llama", LLAMA)  # GGUF general.architecture
