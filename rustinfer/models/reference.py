"""A float64 pure-torch Llama forward: the oracle end-to-end tests compare models against.

Written for clarity, not speed: no KV cache, no packing, no ops registry; one full causal pass over
the token ids. It reads HF-spelled weights (``model.layers.N.self_attn.q_proj.weight`` ...), and
the optional ones where the weights have them, as the families on the dense decoder do: biases on
any projection (Qwen2: q/k/v), and per-head RMSNorm scales ``self_attn.q_norm.weight`` /
``k_norm.weight`` applied to q and k before rope (Qwen3).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from rustinfer.config import ModelConfig
from rustinfer.ops import build_cos_sin_cache


class ReferenceLlama:
    def __init__(self, config: ModelConfig, weights: Mapping[str, torch.Tensor]) -> None:
        self.config = config
        self.w = {name: t.detach().to(torch.float64) for name, t in weights.items()}
        if "lm_head.weight" not in self.w:
            self.w["lm_head.weight"] = self.w["model.embed_tokens.weight"]

    def _get(self, name: str) -> torch.Tensor | None:
        return self.w.get(name)

    def _rmsnorm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(variance + self.config.rms_norm_eps) * weight

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [heads, T, D]; rotate-half pairs element i with element i + D/2.
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def _linear(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        y = x @ self.w[prefix + ".weight"].T
        bias = self._get(prefix + ".bias")
        return y if bias is None else y + bias

    def _attention(
        self, x: torch.Tensor, p: str, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        c = self.config
        n, d = x.shape[0], c.head_dim
        q = self._linear(x, p + "q_proj").view(n, c.num_attention_heads, d).transpose(0, 1)
        k = self._linear(x, p + "k_proj").view(n, c.num_key_value_heads, d).transpose(0, 1)
        v = self._linear(x, p + "v_proj").view(n, c.num_key_value_heads, d).transpose(0, 1)
        # Per-head norms run over each head's own D values (the last axis of [heads, T, D]).
        q_norm, k_norm = self._get(p + "q_norm.weight"), self._get(p + "k_norm.weight")
        q = q if q_norm is None else self._rmsnorm(q, q_norm)
        k = k if k_norm is None else self._rmsnorm(k, k_norm)
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        group = c.num_attention_heads // c.num_key_value_heads
        k = k.repeat_interleave(group, dim=0)  # [Hq, T, D]: query head h reads kv head h // group
        v = v.repeat_interleave(group, dim=0)
        scores = (q @ k.transpose(1, 2)) * d**-0.5  # [Hq, T, T]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v  # [Hq, T, D]
        return self._linear(out.transpose(0, 1).reshape(n, -1), p + "o_proj")

    def _mlp(self, x: torch.Tensor, p: str) -> torch.Tensor:
        gate = self._linear(x, p + "gate_proj")
        up = self._linear(x, p + "up_proj")
        return self._linear(torch.nn.functional.silu(gate) * up, p + "down_proj")

    @torch.no_grad()
    def logits(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """[T] token ids -> [T, vocab] float64 logits, position t attending to 0..t."""
        c = self.config
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        n = ids.shape[0]
        cache = build_cos_sin_cache(
            c.head_dim, n, c.rope_theta, c.rope_scaling, dtype=torch.float64
        )
        cos, sin = cache[:, : c.head_dim // 2], cache[:, c.head_dim // 2 :]  # [T, D/2] each
        h = self.w["model.embed_tokens.weight"][ids]
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            h = h + self._attention(
                self._rmsnorm(h, self.w[p + "input_layernorm.weight"]), p + "self_attn.", cos, sin
            )
            h = h + self._mlp(
                self._rmsnorm(h, self.w[p + "post_attention_layernorm.weight"]), p + "mlp."
            )
        h = self._rmsnorm(h, self.w["model.norm.weight"])
        return h @ self.w["lm_head.weight"].T

    def greedy(self, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation, recomputing the whole sequence each step (it is the oracle)."""
        ids = list(prompt_ids)
        out: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(self.logits(ids)[-1].argmax())
            out.append(nxt)
            ids.append(nxt)
        return out
