"""A GGUF model file: validated, memory-mapped, decoded lazily.

``ModelFile.open(path)`` walks the header once (``_walk``): every length, count,
type id and tensor bound is checked against the file size, and the walk records
where each metadata value and each tensor lies. Values are decoded on first
access (``Metadata``); a 150k-token vocabulary is skipped at C-loop speed by the
walk and decoded only when a tokenizer asks for it. (gguf-py's GGUFReader parsed
every array element into numpy views up front: ~2.5 s for the real Qwen file's
vocabulary on the GPU machine, most of a warm start; it stays the tests' oracle.)
Every problem is a ``ModelLoadFailed`` naming the file and the problem; no
traceback or out-of-bounds read reaches the user.
"""

from __future__ import annotations

import mmap
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from orcd.errors import ModelLoadFailed

SUPPORTED_VERSIONS = (2, 3)
MAX_TENSORS = 10_000      # real models have hundreds; more means a corrupt count
MAX_METADATA = 100_000    # real models have tens of keys
MAX_DIMS = 4              # ggml tensors have at most 4 dimensions
MAX_ARRAY_DEPTH = 4       # arrays of arrays are legal GGUF, but never deep
DEFAULT_ALIGNMENT = 32
MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, smallest value

_SCALAR_BYTES = {
    GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8,
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_SCALAR_DTYPE = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.BOOL: "<u1",
    GGUFValueType.UINT16: "<u2", GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4", GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_id: int
    shape: tuple[int, ...]  # numpy order: GGUF's ne reversed, last axis contiguous
    offset: int             # absolute byte offset in the file
    n_bytes: int
    data: np.ndarray        # zero-copy uint8 view of the tensor's n_bytes (mmap)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def type_name(self) -> str:
        return type_name(self.type_id)


def type_name(type_id: int) -> str:
    """GGML type name ("Q4_K") for a type id, or "type<N>" if gguf-py does not know it."""
    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"type{type_id}"


def _read_value(buf, pos: int, vtype: int) -> tuple[Any, int]:
    """The value of type ``vtype`` at ``pos`` (already bounds-checked by the walk), as
    gguf-py's ``contents()`` gives it: Python scalars, str, lists; and the next offset."""
    if vtype in _SCALAR_DTYPE:
        n = _SCALAR_BYTES[vtype]
        v = np.frombuffer(buf, _SCALAR_DTYPE[vtype], 1, pos)[0].item()
        return (bool(v) if vtype == GGUFValueType.BOOL else v), pos + n
    if vtype == GGUFValueType.STRING:
        n = _U64.unpack_from(buf, pos)[0]
        return bytes(buf[pos + 8:pos + 8 + n]).decode("utf-8"), pos + 8 + n
    itype = _U32.unpack_from(buf, pos)[0]
    count = _U64.unpack_from(buf, pos + 4)[0]
    pos += 12
    if itype in _SCALAR_DTYPE:
        arr = np.frombuffer(buf, _SCALAR_DTYPE[itype], count, pos)
        values = arr.astype(bool).tolist() if itype == GGUFValueType.BOOL else arr.tolist()
        return values, pos + count * _SCALAR_BYTES[itype]
    if itype == GGUFValueType.STRING:   # a vocabulary: keep the loop tight (str of a
        out, unpack, mv = [None] * count, _U64.unpack_from, memoryview(buf)   # view: one copy)
        for i in range(count):
            n = unpack(buf, pos)[0]
            pos += 8
            out[i] = str(mv[pos:pos + n], "utf-8")
            pos += n
        return out, pos
    out = []
    for _ in range(count):
        v, pos = _read_value(buf, pos, itype)
        out.append(v)
    return out, pos


@dataclass(frozen=True)
class _Field:
    """Where a metadata value lies: its type and the offset of its bytes."""

    vtype: int
    pos: int


class Metadata(Mapping[str, Any]):
    """GGUF key/value pairs, decoded to Python values on first access."""

    def __init__(self, fields: Mapping[str, _Field], buf, source: str = "model") -> None:
        self._fields, self._buf = fields, buf
        self._source = source
        self._cache: dict[str, Any] = {}

    def _field(self, key: str) -> _Field:
        return self._fields[key]

    def __getitem__(self, key: str) -> Any:
        if key not in self._cache:
            field = self._field(key)
            try:
                self._cache[key] = _read_value(self._buf, field.pos, field.vtype)[0]
            except UnicodeDecodeError:
                raise ModelLoadFailed(f"{self._source}: metadata key {key!r} holds a string "
                                      f"that is not valid UTF-8") from None
        return self._cache[key]

    def __contains__(self, key: object) -> bool:
        # Mapping's default would decode the value (a 150k-token list) just to test membership.
        return isinstance(key, str) and key in self._fields

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def array_len(self, key: str) -> int:
        """Length of an array-valued key without decoding it."""
        field = self._field(key)
        if field.vtype != GGUFValueType.ARRAY:
            raise ModelLoadFailed(f"{self._source}: metadata key {key!r} is not an array")
        return _U64.unpack_from(self._buf, field.pos + 4)[0]


class ModelFile:
    def __init__(self, path: Path, buf: mmap.mmap, layout: "_Layout") -> None:
        self.path = path
        self._buf = buf
        raw = np.frombuffer(buf, dtype=np.uint8)   # the whole file; tensor data are views of it
        self.metadata = Metadata(layout.fields, raw, source=str(path))
        self.size = raw.size
        self.alignment = layout.alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, type_id, ne, offset, n_bytes in layout.tensors:
            self.tensors[name] = TensorInfo(name=name, type_id=type_id, shape=tuple(reversed(ne)),
                                            offset=offset, n_bytes=n_bytes, data=raw[offset:offset + n_bytes])

    @classmethod
    def open(cls, path: str | Path) -> "ModelFile":
        path = Path(path)
        buf, size = _map(path)
        try:
            layout = _walk(_Cursor(buf, size))
        except _Bad as e:
            raise ModelLoadFailed(f"{path}: {e}") from None
        return cls(path, buf, layout)

    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def name(self) -> str | None:
        v = self.metadata.get("general.name")
        return None if v is None else str(v)

    def vocab_size(self) -> int:
        """``{arch}.vocab_size`` if present, else the length of the token list,
        else the token embedding's row count."""
        key = f"{self.arch}.vocab_size"
        if key in self.metadata:
            return int(self.metadata[key])
        if "tokenizer.ggml.tokens" in self.metadata:
            return self.metadata.array_len("tokenizer.ggml.tokens")
        emb = self.tensors.get("token_embd.weight")
        if emb is None:
            raise ModelLoadFailed(f"{self.path}: cannot tell the vocabulary size")
        return emb.shape[0]

    def close(self) -> None:
        # Dropping the references unmaps the file once no tensor view is alive;
        # closing the mmap under a live view would crash the process.
        self.tensors.clear()
        self.metadata = Metadata({}, None, source=str(self.path))
        self._buf = None

    def __enter__(self) -> "ModelFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- the header check ---------------------------------------------------------

class _Bad(Exception):
    """A problem found by the header walk; becomes ModelLoadFailed with the path."""


class _Cursor:
    """Bounds-checked little-endian reads over the mapped header."""

    def __init__(self, buf: mmap.mmap, size: int) -> None:
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, n: int, what: str) -> int:
        if n > self.size - self.pos:
            raise _Bad(f"file is truncated: {what} at offset {self.pos} needs {n} bytes, "
                       f"but only {self.size - self.pos} remain")
        start, self.pos = self.pos, self.pos + n
        return start

    def u32(self, what: str) -> int:
        return _U32.unpack_from(self.buf, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack_from(self.buf, self.take(8, what))[0]

    def string(self, what: str) -> bytes:
        n = self.u64(f"length of {what}")
        if n > self.size - self.pos:
            raise _Bad(f"{what} has length {n}, past the end of the file "
                       f"(only {self.size - self.pos} bytes remain at offset {self.pos})")
        start = self.take(n, what)
        return self.buf[start:start + n]

    def skip_strings(self, count: int, what: str) -> None:
        """Skip ``count`` length-prefixed strings (a vocabulary: keep the loop tight)."""
        buf, size, pos = self.buf, self.size, self.pos
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.take(8, f"length of element {i} of {what}")
            n = _U64.unpack_from(buf, pos)[0]
            pos += 8 + n
            if pos > size:
                raise _Bad(f"element {i} of {what} has length {n}, past the end of the file")
        self.pos = pos


@dataclass
class _Layout:
    """What the walk found: metadata fields by key, tensors as (name, type id, ne,
    absolute offset, bytes), and the data alignment."""

    fields: dict[str, _Field]
    tensors: list[tuple[str, int, list[int], int, int]]
    alignment: int


def _map(path: Path) -> tuple[mmap.mmap, int]:
    """The file mapped read-only, or a ModelLoadFailed saying why not."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ModelLoadFailed(f"{path}: no such model file") from None
    except OSError as e:
        raise ModelLoadFailed(f"{path}: cannot read the model file: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ModelLoadFailed(f"{path}: is a directory, not a GGUF model file")
    if not stat.S_ISREG(st.st_mode):
        raise ModelLoadFailed(f"{path}: is not a regular file")
    if st.st_size == 0:
        raise ModelLoadFailed(f"{path}: file is empty (0 bytes), not a GGUF model")
    try:
        with open(path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), st.st_size
    except (OSError, ValueError) as e:  # permission denied, unmappable file
        msg = getattr(e, "strerror", None) or str(e)
        raise ModelLoadFailed(f"{path}: cannot read the model file: {msg}") from None


def _walk(c: _Cursor) -> _Layout:
    """Check the whole header of a GGUF v2/v3 file against the file size; return where
    everything lies."""
    if c.size < 4 or c.buf[:4] != b"GGUF":
        raise _Bad(f"not a GGUF file: bad magic {bytes(c.buf[:4])!r} (expected b'GGUF')")
    c.pos = 4
    version = c.u32("the version")
    if version not in SUPPORTED_VERSIONS and version & 0xFFFF == 0:
        raise _Bad("big-endian GGUF files are not supported")
    if version not in SUPPORTED_VERSIONS:
        raise _Bad(f"unsupported GGUF version {version} (orcd reads versions 2 and 3)")
    n_tensors = c.u64("the tensor count")
    n_kv = c.u64("the metadata count")
    if n_tensors >= MAX_TENSORS:
        raise _Bad(f"tensor count {n_tensors} is not sane (at most {MAX_TENSORS - 1})")
    if n_kv > MAX_METADATA:
        raise _Bad(f"metadata count {n_kv} is not sane (at most {MAX_METADATA})")
    if n_kv * MIN_KV_BYTES > c.size - c.pos:
        raise _Bad(f"file is truncated: {n_kv} metadata entries cannot fit in the "
                   f"{c.size - c.pos} bytes after the header")
    fields: dict[str, _Field] = {}
    alignment = _walk_metadata(c, n_kv, fields)
    infos = _walk_tensor_infos(c, n_tensors)
    data_start = -(-c.pos // alignment) * alignment
    tensors = []
    for name, type_id, ne, rel_offset, n_bytes in infos:
        if rel_offset % alignment:
            raise _Bad(f"tensor {name!r} data offset {rel_offset} is not a multiple of "
                       f"the alignment {alignment}")
        start, end = data_start + rel_offset, data_start + rel_offset + n_bytes
        if end > c.size:
            raise _Bad(f"tensor {name!r} data [{start}, {end}) lies past the end of the file "
                       f"({c.size} bytes): the file is truncated or corrupt")
        tensors.append((name, type_id, ne, start, n_bytes))
    return _Layout(fields, tensors, alignment)


def _decode(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Bad(f"{what} is not valid UTF-8: {raw[:40]!r}") from None


def _walk_metadata(c: _Cursor, n_kv: int, fields: dict[str, _Field]) -> int:
    """Check every key/value pair, recording where each value lies in ``fields``;
    return the data alignment."""
    alignment = DEFAULT_ALIGNMENT
    for i in range(n_kv):
        key = _decode(c.string(f"the key of metadata entry {i}"), f"the key of metadata entry {i}")
        if key in fields:
            raise _Bad(f"duplicate metadata key {key!r}")
        vtype = c.u32(f"the value type of metadata key {key!r}")
        fields[key] = _Field(vtype, c.pos)
        if key == "general.alignment":
            if vtype != GGUFValueType.UINT32:
                raise _Bad(f"general.alignment must be a uint32, not value type {vtype}")
            alignment = c.u32("the value of general.alignment")
            if alignment == 0 or alignment & (alignment - 1):
                raise _Bad(f"general.alignment {alignment} is not a power of two")
            continue
        _skip_value(c, vtype, f"metadata key {key!r}", depth=0)
    return alignment


def _skip_value(c: _Cursor, vtype: int, what: str, depth: int) -> None:
    if vtype in _SCALAR_BYTES:
        c.take(_SCALAR_BYTES[vtype], f"the value of {what}")
    elif vtype == GGUFValueType.STRING:
        c.string(f"the string value of {what}")
    elif vtype == GGUFValueType.ARRAY:
        if depth >= MAX_ARRAY_DEPTH:
            raise _Bad(f"{what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        itype = c.u32(f"the element type of {what}")
        if itype not in _SCALAR_BYTES and itype not in (GGUFValueType.STRING, GGUFValueType.ARRAY):
            raise _Bad(f"array of {what} has unknown element type {itype}")
        n = c.u64(f"the array length of {what}")
        # Every element needs at least one byte (8 for a string length): a larger
        # count cannot fit in the rest of the file.
        least = _SCALAR_BYTES.get(itype, 8)
        if n * least > c.size - c.pos:
            raise _Bad(f"array of {what} has {n} elements, past the end of the file")
        if itype in _SCALAR_BYTES:
            c.take(n * least, f"the array of {what}")
        elif itype == GGUFValueType.STRING:
            c.skip_strings(n, f"the array of {what}")
        else:  # an array of arrays
            for j in range(n):
                _skip_value(c, itype, f"element {j} of {what}", depth + 1)
    else:
        raise _Bad(f"{what} has unknown value type {vtype}")


def _walk_tensor_infos(c: _Cursor, n_tensors: int) -> list[tuple[str, int, list[int], int, int]]:
    """Check every tensor description; return (name, type id, ne, relative offset, n_bytes)."""
    out: list[tuple[str, int, list[int], int, int]] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = _decode(c.string(f"the name of tensor {i}"), f"the name of tensor {i}")
        if name in seen:
            raise _Bad(f"duplicate tensor name {name!r}")
        seen.add(name)
        n_dims = c.u32(f"the dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Bad(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        ne = [c.u64(f"dimension {d} of tensor {name!r}") for d in range(n_dims)]
        type_id = c.u32(f"the type of tensor {name!r}")
        rel_offset = c.u64(f"the data offset of tensor {name!r}")
        out.append((name, type_id, ne, rel_offset, _tensor_bytes(name, ne, type_id, c.size)))
    return out


def _tensor_bytes(name: str, ne: list[int], type_id: int, file_size: int) -> int:
    shape = tuple(reversed(ne))  # numpy order, as users see it
    if any(d == 0 or d >= 1 << 63 for d in ne):
        raise _Bad(f"tensor {name!r} has a non-positive dimension in shape {shape}")
    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        raise _Bad(f"tensor {name!r} has unknown type id {type_id}") from None
    if ne[0] % block:
        raise _Bad(f"tensor {name!r} of type {type_name(type_id)}: its rows of {ne[0]} values "
                   f"are not a whole number of {block}-value blocks")
    n_bytes = int(np.prod(ne, dtype=object)) // block * type_size
    if n_bytes > file_size:
        raise _Bad(f"tensor {name!r} has absurd dimensions {shape}: it needs {n_bytes} bytes, "
                   f"more than the whole file ({file_size} bytes)")
    return n_bytes
