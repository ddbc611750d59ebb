"""A worked third-party rustinfer plugin: a Llama variant with final-logit soft-capping and an
RMSNorm kernel for cpu float32 that outranks the built-in one.

Registered through the ``rustinfer`` entry point (:mod:`rustinfer_example_plugin.plugin`);
importing this package does nothing else.
"""
