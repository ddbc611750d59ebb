"""rustinfer's GGUF reader against gguf's own (llama.cpp's Python package) on the same bytes."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from rustinfer.errors import ModelLoadError
from rustinfer.loaders.gguf_meta import open_gguf
from rustinfer.loaders.gguf_reader import GGML_BLOCKS, GGMLType, GGUFFile, GGUFFormatError
from tests.loader_helpers import smollm2_gguf

VT = gguf.GGUFValueType


def _write_every_value_type(path: Path, alignment: int | None = None) -> None:
    writer = gguf.GGUFWriter(path, "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    values = {
        "t.u8": (200, VT.UINT8),
        "t.i8": (-100, VT.INT8),
        "t.u16": (60000, VT.UINT16),
        "t.i16": (-30000, VT.INT16),
        "t.u32": (4_000_000_000, VT.UINT32),
        "t.i32": (-2_000_000_000, VT.INT32),
        "t.f32": (0.1, VT.FLOAT32),
        "t.bool": (True, VT.BOOL),
        "t.str": ("héllo ✓", VT.STRING),
        "t.u64": (2**63 + 5, VT.UINT64),
        "t.i64": (-(2**62), VT.INT64),
        "t.f64": (1e-300, VT.FLOAT64),
        "t.empty": ("", VT.STRING),
    }
    for key, (value, kind) in values.items():
        writer.add_key_value(key, value, kind)
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.floats", [0.5, -1.25])
    writer.add_array("t.bools", [True, False, True])
    writer.add_array("t.strings", ["a", "", "ü b", "Ġthe"])
    writer.add_array("t.empty_list", [])
    rng = np.random.default_rng(0)
    writer.add_tensor("a.weight", rng.standard_normal((3, 64)).astype(np.float32))
    writer.add_tensor("b.weight", rng.standard_normal((5, 7)).astype(np.float16))
    q = gguf.quants.quantize(
        rng.standard_normal((4, 96)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0
    )
    writer.add_tensor("c.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _assert_same_as_gguf_reader(path: Path) -> GGUFFile:
    ours = GGUFFile(path)
    theirs = gguf.GGUFReader(path)
    keys = {k for k in theirs.fields if not k.startswith("GGUF.")}  # the reader's pseudo-fields
    assert set(ours.fields) == keys
    for key in keys:
        expected = theirs.fields[key].contents()
        assert ours.fields[key] == expected, key
        assert type(ours.fields[key]) is type(expected), key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, ref in zip(ours.tensors, theirs.tensors, strict=True):
        assert int(mine.tensor_type) == int(ref.tensor_type)
        assert mine.dims == tuple(int(d) for d in ref.shape)
        assert mine.shape == tuple(reversed(mine.dims))
        assert mine.n_elements == int(ref.n_elements)
        assert np.array_equal(mine.data, np.asarray(ref.data).reshape(-1).view(np.uint8))
    return ours


def test_every_value_type_and_tensors_read_as_gguf_reads_them(tmp_path):
    path = tmp_path / "all.gguf"
    _write_every_value_type(path)
    ours = _assert_same_as_gguf_reader(path)
    assert ours.fields["t.strings"] == ["a", "", "ü b", "Ġthe"]
    assert ours.fields["t.bool"] is True
    assert ours.fields["t.u64"] == 2**63 + 5
    assert ours.tensors[2].tensor_type == GGMLType.Q8_0
    assert ours.tensors[0].shape == (3, 64)


def test_custom_alignment_moves_the_data_start(tmp_path):
    path = tmp_path / "aligned.gguf"
    _write_every_value_type(path, alignment=256)
    ours = _assert_same_as_gguf_reader(path)
    assert ours.data_offset % 256 == 0


def test_the_embedded_model_reads_as_gguf_reads_it():
    ours = _assert_same_as_gguf_reader(smollm2_gguf())
    assert len(ours.fields["tokenizer.ggml.tokens"]) == 49152


def test_block_table_agrees_with_gguf_package():
    for kind, sizes in gguf.GGML_QUANT_SIZES.items():
        assert GGML_BLOCKS[GGMLType(int(kind))] == sizes, kind.name
        assert GGMLType(int(kind)).name == kind.name


def _header(version: int = 3, tensors: int = 0, fields: int = 0, order: str = "<") -> bytes:
    return b"GGUF" + struct.pack(order + "IQQ", version, tensors, fields)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"PK\x03\x04" + bytes(20), "magic"),
        (_header(version=1), "version 1"),
        (_header(order=">"), "big-endian"),
        (_header(fields=1) + struct.pack("<Q", 1000) + b"key", "past the end"),
        (_header(fields=1) + struct.pack("<Q", 1) + b"k" + struct.pack("<I", 99), "unknown type"),
        (_header(fields=1)[:-3], "ends early"),
        (
            _header(tensors=1)
            + struct.pack("<Q", 1)
            + b"w"
            + struct.pack("<I2QIQ", 2, 4, 4, 77, 0),
            "ggml type 77",
        ),
        (
            _header(tensors=1) + struct.pack("<Q", 1) + b"w" + struct.pack("<I2QIQ", 2, 4, 4, 0, 0),
            "runs past the end",
        ),
        (
            _header(tensors=1) + struct.pack("<Q", 1) + b"w" + struct.pack("<I1QIQ", 1, 33, 8, 0),
            "not whole blocks",
        ),
    ],
)
def test_damaged_files_raise_errors_that_say_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFFormatError, match=message):
        GGUFFile(path)
    with pytest.raises(ModelLoadError, match=message):
        open_gguf(path)
