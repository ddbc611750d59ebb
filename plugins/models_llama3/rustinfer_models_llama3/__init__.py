"""The Llama 3 family (Llama 3/3.1/3.2, SmolLM2 and other Llama-architecture checkpoints), Mistral."""
