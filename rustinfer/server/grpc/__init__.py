"""gRPC faces of the engine: the native ``rustinfer.v1`` service and KServe's Open Inference
Protocol, with health and reflection, served beside REST by ``rustinfer serve``."""
