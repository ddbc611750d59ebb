"""Same-run peers for the GPU end-to-end benchmark: what this card and plain PyTorch reach.

    python3 bench/peers_gpu.py --config bench/configs/llama-3.2-1b/config.json \
        [--only copy,matmul,plain_graph,compile_graph,hf_eager] [--device cuda] [--json]

Measurements (each warms up, synchronizes, times with CUDA events, reports the median):
  copy           device-to-device copy bandwidth (1 GiB bf16, read + write bytes) and the batch-1
                 decode floor: bytes of every weight matrix one token reads / that bandwidth.
  matmul         bf16 8192^3 matmul TFLOP/s.
  plain_graph    a plain-PyTorch Llama (below, random bf16 weights), one CUDA graph per decode step
                 (greedy argmax and position advance inside the graph), replayed back to back:
                 batch 1 at context 128 and 2048, batch 64 and 256 at context 512; prefill of 2,048
                 tokens under a graph.
  compile_graph  the same decode step through torch.compile (max-autotune-no-cudagraphs, else
                 default), captured by hand in a CUDA graph (reduce-overhead skips graphs when the
                 KV cache is mutated: FACTS.md), batch 1 at context 128 and 2048.
  hf_eager       HF transformers LlamaForCausalLM, random weights, eager: batch-1 and batch-64
                 greedy decode after a 128-token prompt, prefill of 2,048 tokens.

One JSON line per measured case (``name``, ``case``, ``config``, figures; ``error`` or ``skipped``
instead of figures when it could not run), then a short table (to stderr with ``--json``, so that
stdout is JSON lines only). ``--device cpu`` runs the plain model eagerly (no graph, no compile):
the smoke test checks it against rustinfer's float64 reference. ``--smoke`` shrinks every shape.
``--attention matmul`` swaps the plain model's decode SDPA (cuDNN's masked kernel on the H200) for
two bmm and a softmax; ``--compile-mode`` picks compile_graph's first mode.

H200, torch 2.11, Llama-3.2-1B shapes (2026-11-28, this script, before its last small edits):
copy 4.26 TB/s (floor 0.58 ms, 1,722 tok/s), matmul 806 TFLOP/s; plain_graph (sdpa) batch 1
1.60 ms at ctx 128 / 2.07 ms at 2048, batch 64 26.5k tok/s, batch 256 51.6k, prefill 2,048 at 213k
tok/s; with --attention matmul 1.68 / 1.75 ms, 27.1k, 60.5k. compile_graph 1.01-1.31 ms (ctx 128),
about 50 s of compiling per context. hf_eager 90.7 tok/s (batch 1), 4.9k (batch 64), 164k prefill.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

BF16_BYTES = 2
ATTENTION = ("sdpa", "matmul")  # the plain model's decode attention


# ---------------------------------------------------------------------------------------------
# Shapes, weight bytes and the decode floor


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    rope_theta: float
    rope_scaling: dict | None
    tied: bool

    @classmethod
    def from_config(cls, cfg: dict) -> Shape:
        cfg = cfg.get("text_config") or cfg
        heads = int(cfg["num_attention_heads"])
        params = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or params or None
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
        if scaling and scaling.get("rope_type", scaling.get("type")) != "llama3":
            raise ValueError(f"unsupported rope_scaling {scaling!r} (only llama3)")
        return cls(
            vocab=int(cfg["vocab_size"]),
            hidden=int(cfg["hidden_size"]),
            inter=int(cfg["intermediate_size"]),
            layers=int(cfg["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
            eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(cfg.get("rope_theta", params.get("rope_theta", 10000.0))),
            rope_scaling=scaling,
            tied=bool(cfg.get("tie_word_embeddings", False)),
        )


def weight_bytes(cfg: dict, bytes_per_weight: int = BF16_BYTES) -> int:
    """Bytes of weights one decode token reads: every matrix of every layer, the norms and the LM
    head; not the embedding table (one row per token), so tied embeddings count once, as the head."""
    s = Shape.from_config(cfg)
    q_out, kv_out = s.heads * s.head_dim, s.kv_heads * s.head_dim
    per_layer = (
        s.hidden * (q_out + 2 * kv_out)  # q, k, v
        + q_out * s.hidden  # o
        + 3 * s.hidden * s.inter  # gate, up, down
        + 2 * s.hidden  # the two norms
    )
    total = s.layers * per_layer + s.hidden + s.vocab * s.hidden  # final norm, LM head
    return total * bytes_per_weight


def decode_floor(nbytes: int, bytes_per_s: float) -> dict:
    ms = nbytes / bytes_per_s * 1e3
    return {"floor_ms": round(ms, 4), "floor_tok_s": round(1e3 / ms, 1)}


# ---------------------------------------------------------------------------------------------
# The plain-PyTorch Llama: static contiguous KV cache as buffers, SDPA attention


def inv_freq_llama3(shape: Shape) -> torch.Tensor:
    """Rotary inverse frequencies in float64, with Llama 3 scaling when the config asks for it."""
    d = shape.head_dim
    inv = shape.rope_theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    sc = shape.rope_scaling
    if not sc:
        return inv
    orig = float(sc["original_max_position_embeddings"])
    low, high = float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
    factor = float(sc["factor"])
    wavelength = 2 * math.pi / inv
    # Short wavelengths keep their frequency, long ones (> orig / low) are slowed by `factor`, and
    # the band between blends the two linearly in orig / wavelength.
    blend = ((orig / wavelength - low) / (high - low)).clamp(0.0, 1.0)
    scaled = blend * inv + (1.0 - blend) * inv / factor
    scaled = torch.where(wavelength < orig / high, inv, scaled)
    return torch.where(wavelength > orig / low, inv / factor, scaled)


def _compiling() -> bool:
    check = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(check and check())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Eager, F.rms_norm is one fused kernel (torch 2.11, H200: 1.60 vs 1.92 ms per batch-1 step);
    # under torch.compile the spelled-out form fuses with its neighbours instead (1.12 vs 1.24 ms).
    if hasattr(F, "rms_norm") and not _compiling():
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on [B, T, H, D] with cos/sin [1, T, 1, D/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class PlainLayer(nn.Module):
    def __init__(self, s: Shape, param: Callable[..., nn.Parameter], attention: str) -> None:
        super().__init__()
        self.s, self.attention_impl = s, attention
        self.in_norm, self.post_norm = param(s.hidden), param(s.hidden)
        self.qkv = param((s.heads + 2 * s.kv_heads) * s.head_dim, s.hidden)
        self.o = param(s.hidden, s.heads * s.head_dim)
        self.gate_up = param(2 * s.inter, s.hidden)
        self.down = param(s.hidden, s.inter)
        self.register_buffer("k_cache", None)  # [B, kv_heads, max_len, head_dim]
        self.register_buffer("v_cache", None)

    def attention(self, x, positions, cos, sin, bias, prefill: bool) -> torch.Tensor:
        s, (b, t, _) = self.s, x.shape
        qkv = F.linear(x, self.qkv).view(b, t, s.heads + 2 * s.kv_heads, s.head_dim)
        qk = rotate(qkv[:, :, : s.heads + s.kv_heads], cos, sin)  # q and k heads in one go
        q, k = qk[:, :, : s.heads], qk[:, :, s.heads :].transpose(1, 2)  # k: [B, kv, T, D]
        v = qkv[:, :, s.heads + s.kv_heads :].transpose(1, 2)
        self.k_cache.index_copy_(2, positions, k)
        self.v_cache.index_copy_(2, positions, v)
        group = s.heads // s.kv_heads
        if prefill:  # positions are 0..t-1: causal over the new keys alone (flash-eligible)
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True)
        else:
            # Fold each KV head's query group into the query-length axis, so the whole cache is
            # read once per KV head with no repeated copy: [B, kv, group * t, D], row g*t + i.
            qf = q.transpose(1, 2).reshape(b, s.kv_heads, group * t, s.head_dim)
            if self.attention_impl == "sdpa":
                out = F.scaled_dot_product_attention(qf, self.k_cache, self.v_cache, attn_mask=bias)
            else:  # "matmul": two batched matmuls and a float32 softmax
                scores = torch.baddbmm(
                    bias, qf.flatten(0, 1), self.k_cache.flatten(0, 1).transpose(1, 2),
                    alpha=s.head_dim**-0.5,
                )  # fmt: skip
                probs = scores.float().softmax(-1).to(qf.dtype)
                out = torch.bmm(probs, self.v_cache.flatten(0, 1))
            out = out.view(b, s.heads, t, s.head_dim)
        return F.linear(out.transpose(1, 2).reshape(b, t, s.heads * s.head_dim), self.o)

    def forward(self, x, positions, cos, sin, bias, prefill: bool) -> torch.Tensor:
        x = x + self.attention(
            rms_norm(x, self.in_norm, self.s.eps), positions, cos, sin, bias, prefill
        )
        gate, up = F.linear(rms_norm(x, self.post_norm, self.s.eps), self.gate_up).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, self.down)


class PlainLlama(nn.Module):
    """Llama decoder over a static KV cache; every sequence of the batch is at the same positions."""

    def __init__(
        self, cfg: dict, device: torch.device | str, dtype: torch.dtype, attention: str = "sdpa"
    ) -> None:
        super().__init__()
        if attention not in ATTENTION:
            raise ValueError(f"attention {attention!r}: choose from {ATTENTION}")
        s = self.s = Shape.from_config(cfg)
        self.device, self.dtype = torch.device(device), dtype

        def param(*shape: int) -> nn.Parameter:
            t = torch.empty(*shape, device=device, dtype=dtype)
            return nn.Parameter(t, requires_grad=False)

        self.embed = param(s.vocab, s.hidden)
        self.layers = nn.ModuleList(PlainLayer(s, param, attention) for _ in range(s.layers))
        self.norm = param(s.hidden)
        self.lm_head = self.embed if s.tied else param(s.vocab, s.hidden)
        self.register_buffer("cos", None)
        self.register_buffer("sin", None)
        self.register_buffer("key_pos", None)

    @torch.no_grad()
    def init_random(self, std: float = 0.02, seed: int = 0) -> PlainLlama:
        torch.manual_seed(seed)
        for p in self.parameters():  # shared (tied) parameters are listed once
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)
        return self

    @torch.no_grad()
    def load_hf(self, weights: dict[str, torch.Tensor]) -> PlainLlama:
        """Copy HF-named weights (``model.layers.0.self_attn.q_proj.weight`` ...) into this model."""

        def get(name: str) -> torch.Tensor:
            return weights[name].to(self.device, self.dtype)

        self.embed.copy_(get("model.embed_tokens.weight"))
        self.norm.copy_(get("model.norm.weight"))
        if not self.s.tied:
            self.lm_head.copy_(get("lm_head.weight"))
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            layer.in_norm.copy_(get(p + "input_layernorm.weight"))
            layer.post_norm.copy_(get(p + "post_attention_layernorm.weight"))
            qkv = [get(p + f"self_attn.{n}_proj.weight") for n in "qkv"]
            layer.qkv.copy_(torch.cat(qkv))
            layer.o.copy_(get(p + "self_attn.o_proj.weight"))
            layer.gate_up.copy_(
                torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")])
            )
            layer.down.copy_(get(p + "mlp.down_proj.weight"))
        return self

    def allocate_cache(self, batch: int, max_len: int) -> None:
        """(Re)allocate zeroed KV caches and the rotary tables for positions < max_len."""
        s, kw = self.s, {"device": self.device, "dtype": self.dtype}
        for layer in self.layers:
            layer.k_cache = layer.v_cache = None  # free the old cache first
        for layer in self.layers:
            layer.k_cache = torch.zeros(batch, s.kv_heads, max_len, s.head_dim, **kw)
            layer.v_cache = torch.zeros(batch, s.kv_heads, max_len, s.head_dim, **kw)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq_llama3(s))
        self.cos, self.sin = angles.cos().to(**kw), angles.sin().to(**kw)
        self.key_pos = torch.arange(max_len, device=self.device)

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        prefill: bool = False,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """ids [B, T], positions [T] (long) -> logits [B, T or 1, vocab]. ``prefill`` promises
        positions == 0..T-1 (causal attention over the new tokens alone)."""
        cos = self.cos[positions][None, :, None, :]
        sin = self.sin[positions][None, :, None, :]
        bias = None
        if not prefill:  # additive mask [group * T, max_len]: 0 where a key is visible, else -inf
            visible = self.key_pos[None, :] <= positions[:, None]
            group = self.s.heads // self.s.kv_heads
            bias = torch.zeros(visible.shape, device=self.device, dtype=self.dtype)
            bias = bias.masked_fill(~visible, float("-inf")).repeat(group, 1)
        x = F.embedding(ids, self.embed)
        for layer in self.layers:
            x = layer(x, positions, cos, sin, bias, prefill)
        if not all_logits:
            x = x[:, -1:]
        return F.linear(rms_norm(x, self.norm, self.s.eps), self.lm_head)


def decode_step(model: nn.Module, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """One greedy step in place: ids [B, 1] <- argmax, pos [1] += 1. Graph- and compile-friendly."""
    logits = model(ids, pos)
    ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
    pos.add_(1)
    return logits


# ---------------------------------------------------------------------------------------------
# Timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(
    fn: Callable[[], object],
    device: torch.device,
    reps: int,
    warmup: int,
    inner: int = 1,
    before: Callable[[], object] | None = None,
) -> float:
    """Median over ``reps`` rounds of the time of one ``fn()``, each round ``inner`` calls back to
    back. ``before`` runs ahead of each round, outside the timed span. CUDA: events, one sync at
    the end; CPU: perf_counter."""
    for _ in range(warmup):
        if before:
            before()
        for _ in range(inner):
            fn()
    sync(device)
    samples = []
    events = []
    for _ in range(reps):
        if before:
            before()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            events.append((start, end))
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - t0) * 1e3 / inner)
    sync(device)
    samples += [s.elapsed_time(e) / inner for s, e in events]
    return statistics.median(samples)


def capture(fn: Callable[[], object], warmup: int = 3) -> torch.cuda.CUDAGraph:
    """Warm ``fn`` up on a side stream, then capture one call of it in a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


# ---------------------------------------------------------------------------------------------
# Measurements: each yields records (dicts); the driver adds name/config and catches errors


@dataclass
class Plan:
    copy_mib: int = 1024
    matmul_n: int = 8192
    decode: tuple[tuple[int, int], ...] = ((1, 128), (1, 2048), (64, 512), (256, 512))
    prefill: int = 2048
    compile_ctx: tuple[int, ...] = (128, 2048)
    steps: int = 16  # decode replays per timed round (the positions advance through them)
    reps: int = 20
    warmup: int = 3
    hf_prompt: int = 128
    hf_steps: int = 64
    hf_batch: int = 64
    hf_prefill: int = 2048
    hf_reps: int = 3


SMOKE = Plan(
    copy_mib=4, matmul_n=128, decode=((1, 16), (1, 48), (4, 32)), prefill=64,
    compile_ctx=(16,), steps=4, reps=3, warmup=1, hf_prompt=16, hf_steps=4, hf_batch=4,
    hf_prefill=64, hf_reps=2,
)  # fmt: skip


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_copy(cfg: dict, device: torch.device, plan: Plan):
    n = plan.copy_mib * 2**20 // BF16_BYTES
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, reps=plan.reps, warmup=plan.warmup)
    moved = 2 * n * BF16_BYTES  # read + write
    nbytes = weight_bytes(cfg)
    yield {
        "case": f"d2d_{plan.copy_mib}MiB",
        "ms": round(ms, 4),
        "bytes_moved": moved,
        "tb_s": round(moved / ms / 1e9, 3),
        "weight_bytes": nbytes,
        **decode_floor(nbytes, moved / ms * 1e3),
    }


def measure_matmul(cfg: dict, device: torch.device, plan: Plan):
    n = plan.matmul_n
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    ms = median_ms(lambda: torch.mm(a, b, out=out), device, reps=plan.reps, warmup=plan.warmup)
    yield {"case": f"bf16_{n}^3", "ms": round(ms, 4), "tflop_s": round(2 * n**3 / ms / 1e9, 2)}


def _decode_record(case: str, batch: int, ctx: int, max_len: int, ms: float, **extra) -> dict:
    return {
        "case": case, "batch": batch, "context": ctx, "kv_len": max_len,
        "ms_per_step": round(ms, 4), "tok_s": round(batch * 1e3 / ms, 1), **extra,
    }  # fmt: skip


def time_decode(model: PlainLlama, step: Callable, batch: int, ctx: int, plan: Plan, graph: bool):
    """ms per decode step at context ``ctx``: each round resets the position to ``ctx`` and runs
    ``plan.steps`` greedy steps (positions ctx .. ctx + steps - 1), graph replays back to back."""
    dev = model.device
    max_len = -(-(ctx + max(plan.steps, 4)) // 16) * 16  # capture's 3 warm-up steps fit too
    model.allocate_cache(batch, max_len)
    ids = torch.randint(0, model.s.vocab, (batch, 1), device=dev)
    pos = torch.full((1,), ctx, dtype=torch.long, device=dev)

    def call() -> None:
        step(ids, pos)

    fn = call
    if graph:
        fn = capture(call).replay
    ms = median_ms(fn, dev, plan.reps, plan.warmup, inner=plan.steps, before=lambda: pos.fill_(ctx))
    return ms, max_len


@torch.no_grad()
def measure_plain_graph(cfg: dict, device: torch.device, plan: Plan, attention: str = "sdpa"):
    graph = device.type == "cuda"
    model = PlainLlama(cfg, device, torch.bfloat16, attention).init_random()
    for batch, ctx in plan.decode:
        case = f"decode_b{batch}_ctx{ctx}"
        try:
            ms, max_len = time_decode(
                model, lambda i, p: decode_step(model, i, p), batch, ctx, plan, graph
            )
            yield _decode_record(case, batch, ctx, max_len, ms, graph=graph, attention=attention)
        except Exception as exc:  # one failing shape must not lose the others
            yield error_record(case, exc)
        free_memory()
    case = f"prefill_{plan.prefill}"
    try:
        model.allocate_cache(1, plan.prefill)
        ids = torch.randint(0, model.s.vocab, (1, plan.prefill), device=device)
        positions = torch.arange(plan.prefill, device=device)

        def call() -> None:
            model(ids, positions, prefill=True)

        fn = capture(call).replay if graph else call
        ms = median_ms(fn, device, max(3, plan.reps // 2), plan.warmup)
        yield {"case": case, "batch": 1, "tokens": plan.prefill, "ms": round(ms, 3),
               "tok_s": round(plan.prefill * 1e3 / ms, 1), "graph": graph, "attention": "sdpa"}  # fmt: skip
    except Exception as exc:
        yield error_record(case, exc)
    free_memory()


@torch.no_grad()
def measure_compile_graph(
    cfg: dict, device: torch.device, plan: Plan, mode: str, attention: str = "sdpa"
):
    if device.type != "cuda":
        yield {"case": "decode", "skipped": "compile_graph needs CUDA (graphs)"}
        return
    model = PlainLlama(cfg, device, torch.bfloat16, attention).init_random()

    def compiled_ms(ctx: int, how: str) -> tuple[float, int]:
        torch._dynamo.reset()  # a fresh, static compile for this cache shape
        compiled = torch.compile(decode_step, mode=how, dynamic=False)
        return time_decode(model, lambda i, p: compiled(model, i, p), 1, ctx, plan, graph=True)

    for ctx in plan.compile_ctx:
        case = f"decode_b1_ctx{ctx}"
        try:
            used, t0 = mode, time.perf_counter()
            try:
                ms, max_len = compiled_ms(ctx, mode)
            except Exception as exc:
                if mode == "default":
                    raise
                print(f"compile mode {mode!r} failed ({exc!r}); retrying with mode='default'",
                      file=sys.stderr)  # fmt: skip
                used = "default"
                ms, max_len = compiled_ms(ctx, used)
            yield _decode_record(case, 1, ctx, max_len, ms, graph=True, compile_mode=used,
                                 attention=attention,
                                 compile_and_time_s=round(time.perf_counter() - t0, 1))  # fmt: skip
        except Exception as exc:
            yield error_record(case, exc)
        free_memory()
    torch._dynamo.reset()
    free_memory()


def _cache_of(out):
    for name in ("cache", "past_key_values"):  # transformers renamed it during 5.x
        value = getattr(out, name, None)
        if value is not None:
            return value
    raise RuntimeError("model output carries no KV cache")


@torch.no_grad()
def measure_hf_eager(cfg: dict, device: torch.device, plan: Plan):
    # Run as a script, bench/ leads sys.path, and bench/kernels.py would shadow the `kernels`
    # package that transformers probes for on import.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    try:
        import inspect

        import transformers
    except Exception as exc:
        yield {"case": "all", "skipped": f"transformers not importable: {exc!r}"}
        return
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(hf_cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    model.to(device=device, dtype=torch.bfloat16)
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    vocab = hf_cfg.vocab_size
    tag = f"transformers {transformers.__version__}"

    def decode_ms(prompt: torch.Tensor, steps: int) -> float:
        """ms per greedy step over ``steps`` steps after an (untimed) prefill of ``prompt``."""
        out = model(prompt, use_cache=True, **keep)
        token, cache = out.logits[:, -1].argmax(-1, keepdim=True), _cache_of(out)
        sync(device)
        t0 = time.perf_counter()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        for _ in range(steps):
            out = model(token, use_cache=True, **{cache_kw: cache}, **keep)
            token, cache = out.logits[:, -1].argmax(-1, keepdim=True), _cache_of(out)
        if device.type == "cuda":
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / steps
        return (time.perf_counter() - t0) * 1e3 / steps

    for batch in (1, plan.hf_batch):
        case = f"decode_b{batch}_prompt{plan.hf_prompt}"
        try:
            prompt = torch.randint(0, vocab, (batch, plan.hf_prompt), device=device)
            decode_ms(prompt, min(8, plan.hf_steps))  # warm-up
            ms = statistics.median(decode_ms(prompt, plan.hf_steps) for _ in range(plan.hf_reps))
            yield _decode_record(case, batch, plan.hf_prompt, plan.hf_prompt + plan.hf_steps, ms,
                                 steps=plan.hf_steps, peer=tag)  # fmt: skip
        except Exception as exc:
            yield error_record(case, exc)
        free_memory()
    case = f"prefill_{plan.hf_prefill}"
    try:
        ids = torch.randint(0, vocab, (1, plan.hf_prefill), device=device)
        ms = median_ms(lambda: model(ids, use_cache=True, **keep), device, plan.hf_reps + 2, 2)
        yield {"case": case, "batch": 1, "tokens": plan.hf_prefill, "ms": round(ms, 3),
               "tok_s": round(plan.hf_prefill * 1e3 / ms, 1), "peer": tag}  # fmt: skip
    except Exception as exc:
        yield error_record(case, exc)
    free_memory()


# ---------------------------------------------------------------------------------------------
# Driver


def error_record(case: str, exc: BaseException) -> dict:
    traceback.print_exception(exc, file=sys.stderr)
    return {"case": case, "error": f"{type(exc).__name__}: {exc}"[:500]}


def table(records: list[dict]) -> str:
    lines = [f"{'measurement':<14}{'case':<22}{'ms':>10}{'tok/s':>11}  other"]
    for r in records:
        ms = r.get("ms_per_step", r.get("ms"))
        other = ""
        if "tb_s" in r:
            other = f"{r['tb_s']} TB/s; floor {r['floor_ms']} ms = {r['floor_tok_s']} tok/s"
        elif "tflop_s" in r:
            other = f"{r['tflop_s']} TFLOP/s"
        elif "kv_len" in r:
            other = f"kv_len {r['kv_len']}" + (
                f", {r['compile_mode']}" if "compile_mode" in r else ""
            )
        if "error" in r:
            other = "error: " + r["error"][:80]
        elif "skipped" in r:
            other = "skipped: " + r["skipped"][:80]
        ms_s = "" if ms is None else f"{ms:.3f}"
        tok_s = "" if r.get("tok_s") is None else f"{r['tok_s']:.1f}"
        lines.append(f"{r['name']:<14}{r.get('case', ''):<22}{ms_s:>10}{tok_s:>11}  {other}")
    return "\n".join(lines)


MEASUREMENTS = ("copy", "matmul", "plain_graph", "compile_graph", "hf_eager")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="bench/configs/llama-3.2-1b/config.json")
    ap.add_argument("--only", default=",".join(MEASUREMENTS), help="comma-separated subset")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", action="store_true", help="stdout carries JSON lines only")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: checks the code paths")
    ap.add_argument("--compile-mode", default="max-autotune-no-cudagraphs")
    ap.add_argument(
        "--attention", default="sdpa", choices=ATTENTION,
        help="the plain model's decode attention: SDPA with a mask, or two bmm and a softmax",
    )  # fmt: skip
    args = ap.parse_args(argv)
    only = [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = sorted(set(only) - set(MEASUREMENTS))
    if unknown:
        ap.error(f"unknown measurement(s) {unknown}; choose from {list(MEASUREMENTS)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available (use --device cpu for the eager check)")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    cfg = json.loads(Path(args.config).read_text())
    plan = SMOKE if args.smoke else Plan()
    runners = {
        "copy": lambda: measure_copy(cfg, device, plan),
        "matmul": lambda: measure_matmul(cfg, device, plan),
        "plain_graph": lambda: measure_plain_graph(cfg, device, plan, args.attention),
        "compile_graph": lambda: measure_compile_graph(
            cfg, device, plan, args.compile_mode, args.attention
        ),
        "hf_eager": lambda: measure_hf_eager(cfg, device, plan),
    }
    base = {"config": args.config, "device": str(device)}
    if device.type == "cuda":
        base["gpu"] = torch.cuda.get_device_name(device)
    records = []
    for name in only:
        gen = runners[name]()
        while True:
            try:
                rec = next(gen)
            except StopIteration:
                break
            except Exception as exc:  # the measurement's own setup failed: that ends it
                rec = error_record("setup", exc)
            rec = {"name": name, **base, **rec}
            records.append(rec)
            print(json.dumps(rec), flush=True)
            if "error" in rec and rec["case"] == "setup":
                break
        del gen
        free_memory()
    print(table(records), file=sys.stderr if args.json else sys.stdout, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
