"""The Model interface, attention metadata and the float64 reference model."""

from rustinfer.models.base import AttentionMetadata, KVCaches, Model
from rustinfer.models.op_table import OpTable

__all__ = ["AttentionMetadata", "KVCaches", "Model", "OpTable"]
