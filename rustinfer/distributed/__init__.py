"""Tensor parallelism: a model's weights split across the devices of one host (see
:mod:`rustinfer.distributed.parallel` for the split, :mod:`rustinfer.distributed.workers` for the
processes that hold the other ranks)."""
