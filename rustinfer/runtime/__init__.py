"""Turning a checkpoint into a ready model, and running single requests on it."""
