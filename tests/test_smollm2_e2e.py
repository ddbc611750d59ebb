"""The embedded SmolLM2-135M-Instruct GGUF: token-exact against HF transformers, and the CLI."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest
import torch

from rustinfer.engine.core import EngineConfig, EngineCore
from rustinfer.engine.sampling_params import SamplingParams
from rustinfer.llm import LLM
from rustinfer.runtime.loading import load_model

pytest.importorskip("transformers")
default_model = pytest.importorskip("rustinfer.default_model")

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three prime numbers greater than 50.",
    "请用一句话介绍一下北京。",
    "def fibonacci(n):",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = default_model.default_model_path()
    except Exception as exc:  # the embedded model package is part of the test install
        pytest.fail(f"embedded model missing: {exc}")
    # The GGUF dequantized (as HF transformers loads it): token-exact is this path's promise; the
    # quantized default is held to its own bounds in test_quantization_smollm2.py.
    return path, load_model(None, device="cpu", dtype="float32", quantization="none")


@pytest.fixture(scope="module")
def hf_model(smollm2):
    import transformers

    path, _ = smollm2
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


def _cache_kw(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); pass whichever it takes."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def hf_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy decoding with HF's own KV cache, EOS not treated specially (both sides ignore it)."""
    out = model(torch.tensor([prompt_ids]), use_cache=True)
    past, ids = out.past_key_values, []
    for _ in range(n):
        nxt = int(out.logits[0, -1].argmax())
        ids.append(nxt)
        out = model(torch.tensor([[nxt]]), **{_cache_kw(model): past}, use_cache=True)
        past = out.past_key_values
    return ids


GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


def greedy_alone(loaded, prompt_ids: list[int]) -> list[int]:
    llm = LLM.for_single_request(loaded, len(prompt_ids) + NEW_TOKENS)
    return [t for out in llm.stream(prompt_ids, GREEDY) for t in out.new_token_ids]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_ids_match_hf_transformers(smollm2, hf_model, prompt):
    _, loaded = smollm2
    ids = loaded.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    assert greedy_alone(loaded, ids) == hf_greedy(hf_model, ids, NEW_TOKENS)


def test_float32_decode_runs_the_c_step_where_built(smollm2, hf_model):
    """On an AVX-512 CPU the float32 model's decode steps run every layer in one C call
    (``decode_layers``), and stay token-exact against HF transformers (the test above)."""
    from rustinfer_ops_cpu.step_native import F32_MATRICES

    _, loaded = smollm2
    ops = loaded.model.ops
    if not F32_MATRICES or "decode_layers" not in ops.chosen:
        pytest.skip("no C step for float32 weights on this CPU")
    served: list[bool] = []

    def counted(*args):
        result = ops.decode_layers(*args)
        served.append(result is not None)
        return result

    loaded.model.ops = ops.with_op("decode_layers", counted)
    try:
        ids = loaded.tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}])
        assert greedy_alone(loaded, ids) == hf_greedy(hf_model, ids, NEW_TOKENS)
    finally:
        loaded.model.ops = ops
    assert served and all(served), "the C step declined the float32 model"


def test_generate_cli_answers_paris():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rustinfer",
            "generate",
            "What is the capital of France?",
            "--device",
            "cpu",
            "--max-tokens",
            "24",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "Paris" in record["text"]
    assert record["finish_reason"] == "stop"
    assert record["prompt_tokens"] > 10 and record["token_ids"][-1] == 2  # <|im_end|>
    assert set(record["timings"]) == {"load_s", "prefill_ms", "decode_ms", "tokens_per_second"}


def test_batching_keeps_greedy_tokens(smollm2):
    """All six prompts in one continuous batch vs each alone, float32: batch shapes change matmul
    summation order, so a near-tie may flip late; at least 5 of 6 must match over 32 tokens."""
    _, loaded = smollm2
    tok = loaded.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    alone = [greedy_alone(loaded, p) for p in prompts]
    engine = EngineCore(loaded, EngineConfig(kv_cache_bytes=64 << 20, max_num_batched_tokens=96))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, GREEDY)
    batched: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            batched.setdefault(out.request_id, []).extend(out.new_token_ids)
    same = sum(batched[str(i)] == alone[i] for i in range(len(prompts)))
    assert same >= 5, f"only {same} of {len(prompts)} prompts kept their greedy tokens"
