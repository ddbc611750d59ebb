"""A Llama variant with final-logit soft-capping, as Gemma 2 does it.

Everything but the last step is the Llama family's: the forward, the packed layout and the
weight-name maps (HF and GGUF spellings) come from rustinfer-models-llama3, so a checkpoint of this
architecture is a Llama checkpoint whose config.json says ``"architectures":
["ExampleSoftcapLlamaForCausalLM"]``.
"""

from __future__ import annotations

import torch
from rustinfer_models_llama3.model import LlamaForCausalLM


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap): near the identity for small logits, never beyond +-cap."""
    return torch.tanh(logits / cap) * cap


class SoftcapLlamaForCausalLM(LlamaForCausalLM):
    """Llama whose logits are soft-capped at :attr:`LOGIT_SOFTCAP`."""

    # Gemma 2's final_logit_softcapping. A class constant: rustinfer's ModelConfig keeps only the
    # fields its loaders know, so a family-specific number lives with the family's class.
    LOGIT_SOFTCAP = 30.0

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # [N, vocab] in float32 (float64 for a float64 model), capped in that dtype.
        return softcap(super().compute_logits(hidden), self.LOGIT_SOFTCAP)
