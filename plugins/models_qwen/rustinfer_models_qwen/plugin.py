"""Hook implementations of rustinfer-models-qwen."""

from __future__ import annotations

from rustinfer.hookspecs import hookimpl
from rustinfer.registry import RegisterModel

QWEN2 = "rustinfer_models_qwen.model:Qwen2ForCausalLM"
QWEN3 = "rustinfer_models_qwen.model:Qwen3ForCausalLM"


@hookimpl
def rustinfer_register_models(register: RegisterModel) -> None:
    register("Qwen2ForCausalLM", QWEN2)  # HF config.json architectures[0] (Qwen2 and Qwen2.5)
    register("qwen2", QWEN2)  # GGUF general.architecture
    register("Qwen3ForCausalLM", QWEN3)
    register("qwen3", QWEN3)
