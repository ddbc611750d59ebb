"""rustinfer's CPU kernels: plain torch implementations of every op in :mod:`rustinfer.ops`.

Registered through the ``rustinfer`` entry point (:mod:`rustinfer_ops_cpu.plugin`); importing this
package does nothing else.
"""
