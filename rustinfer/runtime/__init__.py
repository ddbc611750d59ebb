"""Turning a checkpoint into a model on its device, with its tokenizer."""
