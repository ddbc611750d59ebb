"""Hook implementations of rustinfer-models-llama3."""

from __future__ import annotations

from rustinfer.hookspecs import hookimpl
from rustinfer.registry import RegisterModel, RegisterToolParser

LLAMA = "rustinfer_models_llama3.model:LlamaForCausalLM"
LLAMA3_JSON = "rustinfer_models_llama3.tool_parser:Llama3JsonParser"


@hookimpl
def rustinfer_register_models(register: RegisterModel) -> None:
    register("LlamaForCausalLM", LLAMA)  # HF config.json architectures[0]
    register("llama", LLAMA)  # GGUF general.architecture (llama.cpp converts Mistral to it too)
    # Mistral (7B v0.2+, Nemo and the like) is Llama's tensors and math; an active sliding window
    # is refused at build. gguf's "mistral3" is another family (MoE tensors), not registered here.
    register("MistralForCausalLM", LLAMA)


@hookimpl
def rustinfer_register_tool_parsers(register: RegisterToolParser) -> None:
    # Llama 3.1+ templates that render tools either mention <|python_tag|> (the token before a
    # call) or, in their header-delimited turns, ask for calls with "parameters".
    register(
        "llama3_json",
        LLAMA3_JSON,
        template_markers=["<|python_tag|>", ("<|start_header_id|>", '"parameters"')],
    )
