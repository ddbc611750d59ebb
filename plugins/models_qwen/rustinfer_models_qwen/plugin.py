"""Hook implementations of rustinfer-models-qwen."""

from __future__ import annotations

from rustinfer.hookspecs import hookimpl
from rustinfer.registry import RegisterModel, RegisterToolParser

QWEN2 = "rustinfer_models_qwen.model:Qwen2ForCausalLM"
QWEN3 = "rustinfer_models_qwen.model:Qwen3ForCausalLM"
# Qwen 2.5/3 write Hermes's format (<tool_call> blocks), which the core's parser reads. Qwen 3's
# <think> block needs nothing of a tool-call parser: it stays content, as any text outside a
# call does; splitting it out as reasoning is a separate concern from reading calls.
QWEN_TOOL_PARSER = "rustinfer.tool_calls.parsers:HermesParser"


@hookimpl
def rustinfer_register_models(register: RegisterModel) -> None:
    register("Qwen2ForCausalLM", QWEN2)  # HF config.json architectures[0] (Qwen2 and Qwen2.5)
    register("qwen2", QWEN2)  # GGUF general.architecture
    register("Qwen3ForCausalLM", QWEN3)
    register("qwen3", QWEN3)


@hookimpl
def rustinfer_register_tool_parsers(register: RegisterToolParser) -> None:
    # Qwen's templates render tools in ChatML turns and ask for <tool_call> blocks.
    register("qwen", QWEN_TOOL_PARSER, template_markers=[("<|im_start|>", "<tool_call>")])
