"""rustinfer-ops-cuda registers an implementation of its own for every op the Llama model calls,
in every dtype it runs in on cuda, with its spec's arguments, and none is picked where it cannot
run (this lane: no GPU)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch
from model_helpers import incremental_logits, random_weights, tiny_config, write_checkpoint
from ops.helpers import dtype_id
from rustinfer_ops_cuda.plugin import (
    BATCH_INVARIANT,
    DTYPES,
    QUANTIZED_TARGETS,
    TORCH_TARGETS,
    TRITON_PREFERRED,
    TRITON_TARGETS,
)

from rustinfer.config import config_from_hf
from rustinfer.engine.model_runner import ModelRunner, ScheduledSequence
from rustinfer.errors import ModelLoadError
from rustinfer.models.op_table import OpTable
from rustinfer.models.reference import ReferenceLlama
from rustinfer.ops import SPECS
from rustinfer.plugins import get_registries
from rustinfer.registry import BATCH_INVARIANT_IMPL, OpImpl, RegistryError
from rustinfer.runtime.loading import load_model

CUDA_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _cuda_impls(op: str, name: str | None = None) -> list[OpImpl]:
    impls = get_registries().ops.implementations(op)
    return [i for i in impls if i.device == "cuda" and name in (None, i.name)]


def _positional(fn: Callable[..., Any]) -> list[str]:
    return [
        name
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is not inspect.Parameter.KEYWORD_ONLY
    ]


@pytest.fixture(scope="module")
def llama_ops(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The ops the Llama model calls: recorded while it loads, prefills, decodes and computes
    logits on the CPU (the same forward runs on cuda)."""
    called: set[str] = set()
    resolve = OpTable.resolve.__func__  # type: ignore[attr-defined]

    def recording(cls, registry, device_type, dtype, ops=None, overrides=None):  # type: ignore[no-untyped-def]
        table = resolve(cls, registry, device_type, dtype, ops, overrides)

        def record(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                called.add(name)
                return fn(*args, **kwargs)

            return wrapper

        table._fns = {name: record(name, fn) for name, fn in table._fns.items()}
        return table

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(OpTable, "resolve", classmethod(recording))
        cfg = tiny_config(tied=True)
        path = write_checkpoint(tmp_path_factory.mktemp("m"), cfg, random_weights(cfg))
        loaded = load_model(str(path), device="cpu", dtype="float32")
        incremental_logits(loaded.model, [1, 5, 17, 42, 3, 88], prefill_len=4)
    # The recorder saw the load (weights prepared), both attention paths and the LM head.
    assert {"prepare_linear_weight", "attention_prefill", "attention_decode", "logits"} <= called
    return called


@pytest.fixture
def cuda_requirements_met(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a machine without a GPU, pretend an Ampere-or-newer one is there, so lookups for cuda
    run the registry's real selection (nothing is launched)."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


def test_registered_dtypes_are_every_cuda_model_dtype() -> None:
    assert set(DTYPES) == set(CUDA_DTYPES)


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
def test_every_llama_op_resolves_to_ops_cuda_on_cuda(
    llama_ops: set[str], dtype: torch.dtype, cuda_requirements_met: None
) -> None:
    for op in sorted(llama_ops):
        impl = get_registries().ops.lookup(op, "cuda", dtype, overrides={})
        assert impl.plugin == "ops_cuda", f"{op} [{dtype_id(dtype)}] resolves to {impl.describe()}"
        # Its own code, not another plugin's: the lazy target names a module of this plugin.
        assert isinstance(impl.target, str) and impl.target.startswith("rustinfer_ops_cuda."), (
            op,
            impl.target,
        )
        assert _positional(impl.load()) == list(inspect.signature(SPECS[op].reference).parameters)


def test_ops_cuda_registers_only_its_own_targets_and_nothing_unused(llama_ops: set[str]) -> None:
    # "argmax" is specified and tested like the others but no model calls it yet (the sampler
    # takes its own argmax), hence the one name beyond what the model records; the quantized ops
    # serve models loaded quantized (the recorder loads a float one).
    registered = {i.op for i in get_registries().ops.implementations() if i.plugin == "ops_cuda"}
    assert registered == llama_ops | {"argmax"} | set(QUANTIZED_TARGETS)
    assert registered == (
        set(TORCH_TARGETS)
        | set(TRITON_TARGETS)
        | set(TRITON_PREFERRED)
        | set(QUANTIZED_TARGETS)
        | set(BATCH_INVARIANT)
    )
    half = {torch.bfloat16, torch.float16}
    for impl in get_registries().ops.implementations():
        if impl.plugin == "ops_cuda":
            # The preferred Triton ops serve the 16-bit dtypes; float32 keeps the torch one.
            preferred = impl.op in TRITON_PREFERRED and impl.name == "triton"
            # (the batch-invariant forms serve every dtype, float32 included)
            dtypes = half if preferred else set(CUDA_DTYPES)
            assert impl.device == "cuda" and impl.dtypes == dtypes, impl.describe()
            assert str(impl.target).startswith("rustinfer_ops_cuda."), impl.target


@pytest.mark.parametrize(
    "op", sorted(TRITON_TARGETS) + sorted(TRITON_PREFERRED) + sorted(QUANTIZED_TARGETS)
)
def test_triton_kernel_registered_with_spec_signature(op: str) -> None:
    (impl,) = _cuda_impls(op, "triton")
    assert impl.name == "triton" and impl.plugin == "ops_cuda"
    assert _positional(impl.load()) == list(inspect.signature(SPECS[op].reference).parameters)


@pytest.mark.parametrize("op", sorted(TORCH_TARGETS))
def test_torch_op_registered_with_spec_signature(op: str) -> None:
    (impl,) = _cuda_impls(op, "torch")
    assert impl.name == "torch" and impl.plugin == "ops_cuda"
    assert _positional(impl.load()) == list(inspect.signature(SPECS[op].reference).parameters)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without GPU")
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("op", sorted(TRITON_TARGETS) + sorted(TORCH_TARGETS))
def test_cuda_ops_never_picked_without_gpu(op: str, dtype: torch.dtype) -> None:
    impls = _cuda_impls(op)
    assert all("CUDA" in (i.unmet_requirement() or "") for i in impls)
    impl = impls[0]
    assert get_registries().ops.lookup(op, "cpu", dtype, overrides={}).plugin == "ops_cpu"
    with pytest.raises(RegistryError, match="no CUDA device"):
        get_registries().ops.lookup(op, "cuda", dtype, overrides={})
    with pytest.raises(RegistryError, match="cannot run here"):
        get_registries().ops.lookup(op, "cuda", dtype, overrides={op: impl.name})


def _kernel_sized_config() -> dict:
    """A tiny Llama at shapes the Triton kernels take (head_dim 64, GQA 2)."""
    cfg = tiny_config(kv_heads=2, layers=2)
    cfg.update(vocab_size=256, hidden_size=256, intermediate_size=384, num_attention_heads=4,
               head_dim=64)  # fmt: skip
    return cfg


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
def test_llama_on_cuda_runs_ops_cuda_without_host_syncs(llama_ops: set[str], dtype: torch.dtype):
    """A prefill and a decode step of the Llama model over ops-cuda's implementations alone, with
    torch's sync checker raising on any host sync (what a CUDA-graph capture needs); in float32
    the logits stay within float32 error of the float64 reference (no TF32 anywhere)."""
    cfg = _kernel_sized_config()
    weights = random_weights(cfg, seed=5)
    config = config_from_hf(cfg)
    regs = get_registries()
    ops = OpTable.resolve(regs.ops, "cuda", dtype, ops=sorted(llama_ops))
    assert all("from ops_cuda" in chosen for chosen in ops.chosen.values()), ops.chosen
    model = regs.models.get(config.architecture)(config, ops, dtype)
    model.load_weights(weights.items())
    model = model.to("cuda").eval()
    runner = ModelRunner(model, torch.device("cuda"), num_blocks=8, block_size=16)
    prompt = [1, 5, 17, 42, 3, 88, 9, 60, 61, 62, 7, 7, 7, 30, 31, 95, 4, 50, 11]
    table = [3, 0, 5]  # not in order: the paged path must follow the table
    steps = [ScheduledSequence(prompt[:-1], 0, table), ScheduledSequence(prompt[-1:], 18, table)]
    logits = []
    with torch.inference_mode():
        for seq in steps:
            step = runner.prepare([seq])  # uploads its inputs: those copies do sync
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                hidden = model(step.input_ids, step.positions, runner.kv_caches, step.attn)
                logits.append(model.compute_logits(hidden))
            finally:
                torch.cuda.set_sync_debug_mode("default")
    got = torch.cat(logits).double().cpu()
    assert got.shape == (len(prompt), cfg["vocab_size"])
    if dtype == torch.float32:
        expected = ReferenceLlama(config, weights).logits(prompt)
        # Two layers of fp32 ops, each within its spec: ~1e-6 relative on logits of a few units.
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("op", sorted(BATCH_INVARIANT))
def test_batch_invariant_ops_have_the_spec_signature_and_are_never_the_default(
    op: str, cuda_requirements_met: None
) -> None:
    (impl,) = _cuda_impls(op, BATCH_INVARIANT_IMPL)
    assert impl.plugin == "ops_cuda" and impl.priority < 0
    assert _positional(impl.load()) == list(inspect.signature(SPECS[op].reference).parameters)
    for dtype in CUDA_DTYPES:
        default = get_registries().ops.lookup(op, "cuda", dtype, overrides={})
        assert default.name != BATCH_INVARIANT_IMPL, default.describe()


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
def test_batch_invariant_mode_pins_exactly_the_batch_dependent_ops(
    llama_ops: set[str], dtype: torch.dtype, cuda_requirements_met: None
) -> None:
    regs = get_registries()
    pins = regs.ops.batch_invariant_overrides(llama_ops, "cuda", dtype)
    assert pins == dict.fromkeys(BATCH_INVARIANT, BATCH_INVARIANT_IMPL)
    table = OpTable.resolve(regs.ops, "cuda", dtype, sorted(llama_ops), pins)
    for op in BATCH_INVARIANT:
        assert table.chosen[op].startswith(BATCH_INVARIANT_IMPL), table.chosen[op]


def test_batch_invariant_mode_without_such_kernels_is_a_clear_error(tmp_path) -> None:
    cfg = tiny_config(tied=True)
    path = write_checkpoint(tmp_path, cfg, random_weights(cfg))
    with pytest.raises(ModelLoadError, match="no installed plugin has batch-invariant kernels"):
        load_model(str(path), device="cpu", dtype="float32", batch_invariant=True)
