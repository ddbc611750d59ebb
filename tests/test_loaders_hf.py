"""HF directory loading: config variants, single and sharded safetensors, mmap, errors, progress."""

from __future__ import annotations

import io
import json

import pytest
import torch
from loader_helpers import (
    file_mapping_ranges,
    tiny_hf_config,
    tiny_hf_tensors,
    write_hf_dir,
    write_tokenizer_dir,
)
from safetensors.torch import save_file

from rustinfer import progress as progress_module
from rustinfer.errors import ModelLoadError
from rustinfer.loaders import load_model_source


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shards", [1, 2, 3])
def test_loads_every_tensor_by_its_hf_name(tmp_path, nested, shards):
    tensors = tiny_hf_tensors()
    write_hf_dir(tmp_path, tensors, tiny_hf_config(nested=nested), shards=shards)

    source = load_model_source(tmp_path)

    assert source.format == "safetensors" and source.path == tmp_path
    assert source.config.architecture == "LlamaForCausalLM"
    assert (source.config.hidden_size, source.config.num_key_value_heads) == (16, 1)
    assert source.num_tensors == len(tensors)
    assert source.tensor_shapes() == {n: tuple(t.shape) for n, t in tensors.items()}
    loaded = dict(source.weights(torch.float32))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name


def test_matching_dtype_is_a_view_of_the_file_mapping(tmp_path):
    write_hf_dir(tmp_path, tiny_hf_tensors(torch.bfloat16), tiny_hf_config())
    weights = tmp_path / "model.safetensors"
    for _, tensor in load_model_source(tmp_path).weights(torch.bfloat16):
        # The data lives inside this process's mapping of the file: nothing was copied.
        ranges = file_mapping_ranges(weights)
        assert tensor.dtype == torch.bfloat16
        assert any(lo <= tensor.data_ptr() < hi for lo, hi in ranges)


def test_other_dtype_is_converted_into_fresh_memory(tmp_path):
    tensors = tiny_hf_tensors(torch.bfloat16)
    write_hf_dir(tmp_path, tensors, tiny_hf_config(torch_dtype="bfloat16"))
    weights = tmp_path / "model.safetensors"
    for name, tensor in load_model_source(tmp_path).weights(torch.float32):
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, tensors[name].float())
        assert not any(lo <= tensor.data_ptr() < hi for lo, hi in file_mapping_ranges(weights))


def test_generation_config_adds_eos_ids_in_order(tmp_path):
    write_hf_dir(tmp_path, tiny_hf_tensors(), tiny_hf_config(eos_token_id=[2, 5]))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7, 2]}))
    assert load_model_source(tmp_path).config.eos_token_ids == (2, 5, 7)


def test_tokenizer_files_in_the_dir(tmp_path):
    write_hf_dir(tmp_path, tiny_hf_tensors(), tiny_hf_config(eos_token_id=2))
    write_tokenizer_dir(
        tmp_path,
        bos_template=True,
        tokenizer_config={"bos_token": "<s>", "eos_token": "<|im_end|>"},
        generation_config={"eos_token_id": [2, 1]},
    )
    for load_format in ("auto", "dummy"):
        source = load_model_source(tmp_path, load_format=load_format)
        assert source.tokenizer is not None and source.tokenizer.add_bos
        # config, then generation_config, then tokenizer_config's EOS (<|im_end|> is id 3)
        assert source.config.eos_token_ids == source.tokenizer.eos_token_ids == (2, 1, 3)


def test_dummy_format_from_dir_or_config_file(tmp_path):
    write_hf_dir(tmp_path, tiny_hf_tensors(), tiny_hf_config())
    for target in (tmp_path, tmp_path / "config.json"):
        source = load_model_source(target, load_format="dummy")
        assert source.format == "dummy" and source.tokenizer is None
        assert source.config.vocab_size == 32 and source.num_tensors == 0
        with pytest.raises(ModelLoadError, match="dummy_weights"):
            next(source.weights(torch.float32))
    with pytest.raises(ModelLoadError, match="load_format='dummy'"):
        load_model_source(tmp_path / "config.json")


# ---- errors name the file and say what to do ----------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model_source(tmp_path / "nope")


def test_dir_without_config(tmp_path):
    save_file(tiny_hf_tensors(), tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model_source(tmp_path)


def test_dir_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_hf_config()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"no weights.*model\.safetensors.*pytorch_model\.bin"):
        load_model_source(tmp_path)


def test_missing_shard_is_named(tmp_path):
    write_hf_dir(tmp_path, tiny_hf_tensors(), tiny_hf_config(), shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors"):
        load_model_source(tmp_path)


def test_index_naming_a_tensor_its_shard_lacks(tmp_path):
    write_hf_dir(tmp_path, tiny_hf_tensors(), tiny_hf_config(), shards=2)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="lm_head.weight"):
        load_model_source(tmp_path)


def test_unknown_dtype_string(tmp_path):
    write_hf_dir(tmp_path, tiny_hf_tensors(), tiny_hf_config(torch_dtype="float33"))
    with pytest.raises(ModelLoadError, match=r"config\.json.*float33"):
        load_model_source(tmp_path)
    write_hf_dir(tmp_path, tiny_hf_tensors(), tiny_hf_config())
    with pytest.raises(ModelLoadError, match="float33"):
        next(load_model_source(tmp_path).weights("float33"))


@pytest.mark.parametrize(
    ("content", "pattern"),
    [("{not json", "config.json"), (json.dumps({"hidden_size": 4}), "architecture")],
)
def test_bad_config(tmp_path, content, pattern):
    write_hf_dir(tmp_path, tiny_hf_tensors(), tiny_hf_config())
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(ModelLoadError, match=pattern):
        load_model_source(tmp_path)


def test_corrupt_safetensors_file(tmp_path):
    write_hf_dir(tmp_path, tiny_hf_tensors(), tiny_hf_config())
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_model_source(tmp_path)


def test_unknown_load_format(tmp_path):
    with pytest.raises(ModelLoadError, match="auto, safetensors, gguf, dummy"):
        load_model_source(tmp_path, load_format="pickle")


# ---- progress bar ------------------------------------------------------------------------------


class _FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("tty", [False, True])
def test_progress_bar_only_on_a_terminal(tmp_path, monkeypatch, tty):
    write_hf_dir(tmp_path, tiny_hf_tensors(), tiny_hf_config())
    stream = _FakeTerminal() if tty else io.StringIO()
    monkeypatch.setattr(progress_module.sys, "stderr", stream)
    assert len(list(load_model_source(tmp_path).weights(torch.float32))) == 6
    # tqdm draws at least the empty bar (later redraws are rate-limited), counting tensors.
    assert ("0/6 [" in stream.getvalue()) is tty
