"""The Qwen families: Qwen2/Qwen2.5 (q/k/v biases) and Qwen3 dense (per-head q/k RMSNorm)."""
