"""The engine: scheduling, paged KV block management and the model-runner loop."""
