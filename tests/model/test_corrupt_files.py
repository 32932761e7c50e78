"""A corpus of corrupt GGUF files, made by patching a small valid one: each must
fail ModelFile.open with MODEL_LOAD_FAILED naming the file and the problem."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from orcd.errors import ModelLoadFailed
from orcd.gguf_file import ModelFile
from test_gguf_file import write_small_gguf

HUGE = 1 << 60


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("valid") / "valid.gguf"
    write_small_gguf(path, extra={"general.alignment": (32, gguf.GGUFValueType.UINT32)})
    ModelFile.open(path).close()  # the base of every corruption is itself valid
    return path.read_bytes()


class Layout:
    """Byte positions of header fields in the valid file (found with gguf's reader)."""

    def __init__(self, raw: bytes, tmp: Path) -> None:
        (tmp / "layout.gguf").write_bytes(raw)
        self.reader = gguf.GGUFReader(tmp / "layout.gguf")

    def kv_value(self, key: str) -> int:
        """Offset of the value (after key and type) of metadata ``key``."""
        return self.reader.fields[key].offset + 8 + len(key.encode()) + 4

    def kv_type(self, key: str) -> int:
        return self.kv_value(key) - 4

    def tensor(self, name: str) -> dict[str, int]:
        """Offsets of n_dims, dims, type and data offset in tensor ``name``'s info."""
        t = next(t for t in self.reader.tensors if t.name == name)
        n_dims_at = t.field.offset + 8 + len(name.encode())
        dims_at = n_dims_at + 4
        type_at = dims_at + 8 * len(t.shape)
        return {"n_dims": n_dims_at, "dims": dims_at, "type": type_at, "offset": type_at + 4,
                "data_end": t.data_offset + t.n_bytes}


def patch(raw: bytes, at: int, fmt: str, value) -> bytes:
    buf = bytearray(raw)
    struct.pack_into(fmt, buf, at, value)
    return bytes(buf)


def corrupt(name: str, raw: bytes, lay: Layout) -> bytes:
    q = lay.tensor("blk.0.attn_q.weight")
    last_end = max(lay.tensor(t.name)["data_end"] for t in lay.reader.tensors)
    if name == "empty":
        return b""
    if name == "truncated header":
        return raw[:30]
    if name == "truncated data":
        return raw[:last_end - 10]
    if name == "bad magic":
        return b"GGML" + raw[4:]
    if name == "version 1":
        return patch(raw, 4, "<I", 1)
    if name == "version 99":
        return patch(raw, 4, "<I", 99)
    if name == "big-endian":
        return patch(raw, 4, ">I", 3)
    if name == "tensor count":
        return patch(raw, 8, "<Q", 10_000)
    if name == "metadata count":
        return patch(raw, 16, "<Q", HUGE)
    if name == "huge string length":
        return patch(raw, lay.kv_value("general.name"), "<Q", HUGE)
    if name == "huge array length":
        return patch(raw, lay.kv_value("tokenizer.ggml.token_type") + 4, "<Q", HUGE)
    if name == "unknown value type":
        return patch(raw, lay.kv_type("general.name"), "<I", 42)
    if name == "bad alignment":
        return patch(raw, lay.kv_value("general.alignment"), "<I", 48)
    if name == "bad key utf-8":
        return raw.replace(b"general.name", b"general\xffname", 1)
    if name == "tensor offset past EOF":
        return patch(raw, q["offset"], "<Q", 1 << 40)
    if name == "unaligned offset":
        return patch(raw, q["offset"], "<Q", struct.unpack_from("<Q", raw, q["offset"])[0] + 4)
    if name == "absurd dims":
        return patch(patch(raw, q["dims"], "<Q", 1 << 40), q["dims"] + 8, "<Q", 1 << 40)
    if name == "zero dim":
        return patch(raw, q["dims"] + 8, "<Q", 0)
    if name == "too many dims":
        return patch(raw, q["n_dims"], "<I", 5)
    if name == "partial block":
        return patch(raw, q["dims"], "<Q", 48)  # Q4_0 rows are 32-value blocks
    if name == "unknown type id":
        return patch(raw, q["type"], "<I", 77)
    if name == "duplicate tensor":
        return raw.replace(b"blk.1.attn_q.weight", b"blk.0.attn_q.weight", 1)
    raise AssertionError(name)


CASES = {
    "empty": "file is empty",
    "truncated header": "file is truncated",
    "truncated data": "lies past the end of the file",
    "bad magic": "not a GGUF file: bad magic b'GGML'",
    "version 1": "unsupported GGUF version 1 ",
    "version 99": "unsupported GGUF version 99",
    "big-endian": "big-endian GGUF files are not supported",
    "tensor count": "tensor count 10000 is not sane",
    "metadata count": f"metadata count {HUGE} is not sane",
    "huge string length": f"string value of metadata key 'general.name' has length {HUGE}, "
                          "past the end of the file",
    "huge array length": f"array of metadata key 'tokenizer.ggml.token_type' has {HUGE} elements",
    "unknown value type": "metadata key 'general.name' has unknown value type 42",
    "bad alignment": "general.alignment 48 is not a power of two",
    "bad key utf-8": "is not valid UTF-8",
    "tensor offset past EOF": "tensor 'blk.0.attn_q.weight' data",
    "unaligned offset": "is not a multiple of the alignment 32",
    "absurd dims": "tensor 'blk.0.attn_q.weight' has absurd dimensions (1099511627776, 1099511627776)",
    "zero dim": "tensor 'blk.0.attn_q.weight' has a non-positive dimension in shape (0, 64)",
    "too many dims": "tensor 'blk.0.attn_q.weight' has 5 dimensions (1 to 4 allowed)",
    "partial block": "rows of 48 values are not a whole number of 32-value blocks",
    "unknown type id": "tensor 'blk.0.attn_q.weight' has unknown type id 77",
    "duplicate tensor": "duplicate tensor name 'blk.0.attn_q.weight'",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_corrupt_file_fails_with_its_specific_message(case, valid, tmp_path):
    path = tmp_path / f"{case.replace(' ', '_')}.gguf"
    path.write_bytes(corrupt(case, valid, Layout(valid, tmp_path)))
    with pytest.raises(ModelLoadFailed) as info:
        ModelFile.open(path)
    msg = info.value.message
    assert msg.startswith(f"{path}: "), msg
    assert CASES[case] in msg, msg
    assert info.value.code == "MODEL_LOAD_FAILED"


def test_tensor_offset_past_eof_names_the_range(valid, tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(corrupt("tensor offset past EOF", valid, Layout(valid, tmp_path)))
    with pytest.raises(ModelLoadFailed, match=r"lies past the end of the file \(\d+ bytes\)"):
        ModelFile.open(path)


def test_directory_missing_and_special_files(tmp_path):
    with pytest.raises(ModelLoadFailed, match="is a directory, not a GGUF model file"):
        ModelFile.open(tmp_path)
    with pytest.raises(ModelLoadFailed, match="no such model file"):
        ModelFile.open(tmp_path / "nope.gguf")
    if os.path.exists("/dev/null"):
        with pytest.raises(ModelLoadFailed, match="is not a regular file"):
            ModelFile.open("/dev/null")


def test_invalid_utf8_string_value_fails_on_access(valid, tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(valid.replace(b"small test model", b"small\xfftest model", 1))
    with ModelFile.open(path) as mf:
        with pytest.raises(ModelLoadFailed, match="'general.name' holds a string that is not valid"):
            mf.name


def test_every_truncation_fails_cleanly(valid, tmp_path):
    """No cut of the file short of its last tensor's end can be opened."""
    lay = Layout(valid, tmp_path)
    last_end = max(lay.tensor(t.name)["data_end"] for t in lay.reader.tensors)
    path = tmp_path / "cut.gguf"
    path.write_bytes(valid[:last_end])  # trailing padding is optional
    ModelFile.open(path).close()
    # Every cut inside the header, a sample of cuts inside the tensor data.
    cuts = [*range(lay.reader.data_offset + 1), *range(lay.reader.data_offset, last_end, 61)]
    for cut in sorted(set(cuts), reverse=True):
        os.truncate(path, cut)
        with pytest.raises(ModelLoadFailed):
            ModelFile.open(path)


def test_random_header_damage_never_escapes_as_another_error(valid, tmp_path):
    """Flipped header bytes either still parse (and every tensor stays inside the
    file, every value decodes) or fail as MODEL_LOAD_FAILED; never a traceback."""
    lay = Layout(valid, tmp_path)
    header_end = lay.reader.data_offset
    rng = np.random.default_rng(1234)
    path = tmp_path / "fuzz.gguf"
    for _ in range(300):
        buf = bytearray(valid)
        for at in rng.integers(0, header_end, size=rng.integers(1, 4)):
            buf[at] = int(rng.integers(0, 256))
        path.write_bytes(bytes(buf))
        try:
            mf = ModelFile.open(path)
        except ModelLoadFailed:
            continue
        assert all(t.offset + t.n_bytes <= mf.size for t in mf.tensors.values())
        for key in mf.metadata:
            try:
                mf.metadata[key]
            except ModelLoadFailed:
                pass
        mf.close()
