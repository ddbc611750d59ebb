"""The Llama family (Llama 3/3.1/3.2, SmolLM2, Mistral) on the core dense decoder."""

from __future__ import annotations

from rustinfer.config import ModelConfig
from rustinfer.models.decoder import DenseDecoderForCausalLM
from rustinfer.models.decoder_weights import DecoderLayout
from rustinfer_models_llama3.weights import llama_layout


class LlamaForCausalLM(DenseDecoderForCausalLM):
    """GQA attention, RoPE (with Llama 3 scaling), SwiGLU MLP, RMSNorm, optionally tied embeddings.

    Mistral checkpoints are this model too: the same tensors and math. Their sliding-window
    attention is refused by the decoder (it has none) unless the window covers every position.
    """

    @classmethod
    def decoder_layout(cls, config: ModelConfig) -> DecoderLayout:
        return llama_layout(config)
