"""A decode layer's chain of kernels, captured in a CUDA graph and replayed, against the same
kernels run one at a time with a sync between each: the check every matmul kernel that waits on
the kernel ahead of it (programmatic dependent launch) must pass. A kernel that read its
activations before its predecessor finished would differ; a host sync would fail the capture
(and, with ``no_sync_check``, torch's sync checker raises on one in an eager pass first)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Matmul = Callable[[torch.Tensor, object], torch.Tensor]


def check_layer_chain_in_graph(
    matmul: Matmul,
    layers: Sequence[tuple[torch.Tensor, object, object]],
    x0: torch.Tensor,
    r0: torch.Tensor,
    no_sync_check: bool = False,
) -> None:
    """``layers``: (norm weight, gate/up weight, down weight) per layer, the weights in whatever
    form ``matmul(x, weight)`` takes. Runs add+RMSNorm -> gate/up -> SwiGLU -> down per layer."""
    from rustinfer_ops_cuda.kernels.activation import silu_and_mul
    from rustinfer_ops_cuda.kernels.norm import fused_add_rmsnorm

    def chain(x: torch.Tensor, residual: torch.Tensor, sync: bool) -> torch.Tensor:
        for norm_w, gate_up, down in layers:
            normed, residual = fused_add_rmsnorm(x, residual, norm_w, 1e-5)
            steps = [
                lambda t, w=gate_up: matmul(t, w),
                silu_and_mul,
                lambda t, w=down: matmul(t, w),
            ]
            t = normed
            for step in steps:
                t = step(t)
                if sync:
                    torch.cuda.synchronize()
            x = t
        return x + residual

    expected = chain(x0.clone(), r0.clone(), sync=True)  # compiles every kernel variant too
    if no_sync_check:
        torch.cuda.set_sync_debug_mode("error")
    try:
        chain(x0.clone(), r0.clone(), sync=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    x, residual = x0.clone(), r0.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = chain(x, residual, sync=False)
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(3):  # replays back to back, each from the same inputs
        x.copy_(x0)
        residual.copy_(r0)
        graph.replay()
        assert torch.equal(out, expected)


def bf16_layers(
    rows: int, hidden: int = 2048, inter: int = 8192
) -> tuple[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
    """Two Llama-3.2-1B-sized bf16 layers (norm weight, gate/up, down; weights scaled like
    trained ones) and a ``rows``-row input and residual, seeded: :func:`check_layer_chain_in_graph`'s
    arguments for a dense matmul."""
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(torch.bfloat16)

    layers = [
        (rand(hidden, scale=1.0), rand(2 * inter, hidden, scale=hidden**-0.5),
         rand(hidden, inter, scale=inter**-0.5))
        for _ in range(2)
    ]  # fmt: skip
    return layers, rand(rows, hidden, scale=1.0), rand(rows, hidden, scale=1.0)
