"""Shape-accurate synthetic GGUF models: ``orcd synth PRESET -o FILE``.

A ``SynthPreset`` (contributed by a model plugin through ``orcd_synth_presets``)
names an architecture, its hyper-parameter metadata, the quant type of every
tensor and a vocabulary spec. ``synthesize`` reads the weight table from the
architecture's ``ArchSpec``, so a preset can never drift from what the loader
expects, and writes random but well-scaled weights plus a working vocabulary
with gguf-py's ``GGUFWriter``, streaming tensor data so a 12 GB file never sits
in memory. Both llama.cpp and orcd load the result.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from orcd.errors import InvalidRequest

# GGML type ids used by the presets
F32, F16, Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K, BF16, MXFP4 = 0, 1, 2, 6, 8, 12, 13, 14, 30, 39
# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

CHUNK_BYTES = 32 << 20  # tensor data is generated and written in pieces of about this size


@dataclass(frozen=True)
class SynthVocab:
    """A vocabulary to synthesize.

    ``kind`` "bpe": GPT-2 byte-level BPE (``tokenizer.ggml.model`` "gpt2"): 256
    byte tokens, then merged tokens, each reachable by one merge. ``kind``
    "spm": SentencePiece (model "llama"): <unk> <s> </s>, 256 <0xNN> byte
    tokens, then scored pieces. ``specials`` (control tokens) start at id
    ``n_normal`` (default: right after the normal tokens so they end the
    vocabulary); ids after them up to ``size`` are padding ``pad_text``.
    Special-token roles (bos, eos, ...) are given as token text.
    """

    kind: str
    size: int
    pre: str
    specials: tuple[str, ...] = ()
    n_normal: int | None = None
    pad_text: str = "[PAD{i}]"
    pad_type: int = UNUSED
    bos: str | None = None
    eos: str | None = None
    eot: str | None = None
    pad: str | None = None
    unk: str | None = None
    add_bos: bool = False
    eog: tuple[str, ...] = ()  # every token that ends a generation (llama.cpp detects these by text)
    chat_template: str | None = None

    @property
    def first_special(self) -> int:
        return self.n_normal if self.n_normal is not None else self.size - len(self.specials)


@dataclass(frozen=True)
class SynthPreset:
    """One synthetic model. ``metadata`` holds the hyper-parameter GGUF keys
    with ``{arch}`` spelled out (ints are written as uint32, floats as
    float32); ``tensor_type(name, shape)`` gives each tensor's GGML type id (the
    quant mix); ``optional_tensors`` lists optional table entries to write."""

    name: str
    arch: str
    description: str
    metadata: Mapping[str, Any]
    tensor_type: Callable[[str, tuple[int, ...]], int]
    vocab: SynthVocab
    optional_tensors: tuple[str, ...] = ()


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]  # numpy order, last axis contiguous
    type_id: int
    n_bytes: int


def get_preset(host: Any, name: str) -> SynthPreset:
    try:
        return host.synth_presets[name]
    except KeyError:
        known = ", ".join(sorted(host.synth_presets)) or "none (install a model plugin)"
        raise InvalidRequest(f"unknown synth preset {name!r}; known presets: {known}",
                             field="preset") from None


def tensor_bytes(type_id: int, shape: tuple[int, ...]) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block_elems, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    if shape[-1] % block_elems:
        raise InvalidRequest(f"a row of {shape[-1]} values is not a whole number of "
                             f"{block_elems}-value blocks of type {type_id}")
    return int(np.prod(shape, dtype=np.int64)) // block_elems * block_bytes


def plan(host: Any, preset: SynthPreset | str) -> list[PlannedTensor]:
    """Every tensor the preset writes, in file order: global tensors, then
    layer by layer. Computed from the ArchSpec table; writes nothing."""
    if isinstance(preset, str):
        preset = get_preset(host, preset)
    spec = host.architecture(preset.arch, source=f"synth preset {preset.name!r}")
    hp = spec.read_hparams(preset.metadata, preset.vocab.size, source=f"synth preset {preset.name!r}")
    expected = spec.expected_tensors(hp)
    unknown = [n for n in preset.optional_tensors if n not in expected]
    if unknown:
        raise InvalidRequest(f"synth preset {preset.name!r} asks for tensors {unknown} "
                             f"that architecture {preset.arch!r} does not have")
    wanted = [n for n, (_, optional) in expected.items()
              if not optional or n in preset.optional_tensors]
    ordered = sorted(wanted, key=_file_order)
    out = []
    for name in ordered:
        shape = expected[name][0]
        type_id = preset.tensor_type(name, shape)
        out.append(PlannedTensor(name, shape, type_id, tensor_bytes(type_id, shape)))
    return out


def _file_order(name: str) -> tuple[int, int]:
    if name.startswith("blk."):
        return (1, int(name.split(".")[1]))
    return (0, 0)


def planned_file_bytes(host: Any, preset: SynthPreset | str) -> int:
    """The exact size ``synthesize`` will produce, writing only the header,
    metadata and tensor infos (to a temporary file), never the tensor data."""
    import tempfile

    if isinstance(preset, str):
        preset = get_preset(host, preset)
    tensors = plan(host, preset)
    with tempfile.TemporaryDirectory() as tmp:
        writer = _start_writer(preset, tensors, Path(tmp) / "header.gguf")
        head = writer.fout[0].tell()
        writer.close()
    align = writer.data_alignment  # the header and every tensor are padded to it
    return sum(-(-n // align) * align for n in [head, *(t.n_bytes for t in tensors)])


def synthesize(host: Any, preset_name: str, path: str | Path, seed: int = 0,
               progress: bool = False) -> Path:
    """Write preset ``preset_name`` to ``path`` and return the path. The same
    seed gives the same bytes."""
    preset = get_preset(host, preset_name)
    tensors = plan(host, preset)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(t.n_bytes for t in tensors), unit="B", unit_scale=True,
                   desc=f"synth {preset.name}")
    # written under a temporary name: a half-written file never carries the real one
    tmp = path.with_name(path.name + ".partial")
    try:
        writer = _start_writer(preset, tensors, tmp)
        try:
            for t in tensors:
                writer.write_tensor_data(_LazyTensor(host, t, seed, bar))
        finally:
            writer.close()
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
        if bar is not None:
            bar.close()
    return path


def _start_writer(preset: SynthPreset, tensors: list[PlannedTensor], path: Path):
    """A GGUFWriter with header, metadata and tensor infos written; the
    tensor data is to follow in ``tensors`` order."""
    from gguf import GGMLQuantizationType, GGUFWriter

    writer = GGUFWriter(path, preset.arch)
    writer.add_type("model")
    writer.add_name(f"orcd synthetic {preset.name}")
    for key, value in preset.metadata.items():
        _add_value(writer, key, value)
    _add_vocab(writer, preset.vocab)
    for t in tensors:
        dtype = np.float32 if t.type_id == F32 else np.uint8
        shape = t.shape if t.type_id == F32 else (*t.shape[:-1], t.n_bytes // _rows(t.shape))
        writer.add_tensor_info(t.name, shape, np.dtype(dtype), t.n_bytes,
                               raw_dtype=GGMLQuantizationType(t.type_id))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    return writer


def _rows(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape[:-1], dtype=np.int64))


def _add_value(writer, key: str, value: Any) -> None:
    from gguf import GGUFValueType as V

    if isinstance(value, bool):
        writer.add_key_value(key, value, V.BOOL)
    elif isinstance(value, int):
        writer.add_key_value(key, value, V.UINT32)
    elif isinstance(value, float):
        writer.add_key_value(key, value, V.FLOAT32)
    elif isinstance(value, str):
        writer.add_key_value(key, value, V.STRING)
    elif isinstance(value, (list, tuple)):
        writer.add_array(key, list(value))
    else:
        raise TypeError(f"metadata key {key!r}: cannot write a {type(value).__name__}")


# -- tensor data ------------------------------------------------------------

class _LazyTensor:
    """Stands in for a numpy array in ``GGUFWriter.write_tensor_data``: it
    generates the tensor's bytes chunk by chunk inside ``tofile``."""

    def __init__(self, host: Any, t: PlannedTensor, seed: int, bar: Any) -> None:
        self.t, self.host, self.bar = t, host, bar
        self.nbytes = t.n_bytes
        # one stream per tensor: a tensor's bytes depend only on (seed, name)
        self.rng = np.random.default_rng([seed, zlib.crc32(t.name.encode())])

    def tofile(self, fp) -> None:
        t = self.t
        rows, row_bytes = _rows(t.shape), t.n_bytes // _rows(t.shape)
        step = max(1, CHUNK_BYTES // row_bytes)
        for r0 in range(0, rows, step):
            n = min(step, rows - r0)
            data = _weights(self.host, t, n, self.rng)
            assert data.nbytes == n * row_bytes, (t.name, data.nbytes, n * row_bytes)
            data.tofile(fp)
            if self.bar is not None:
                self.bar.update(data.nbytes)


def _weights(host: Any, t: PlannedTensor, n_rows: int, rng: np.random.Generator) -> np.ndarray:
    """``n_rows`` rows of tensor ``t`` as raw bytes (F32: float32 values).

    Norms are 1 ± 2 %, biases small, a linear weight has std 1/sqrt(n_in) so
    activations keep unit scale through every layer (no fp16 overflow)."""
    n_in = t.shape[-1]
    n = n_rows * n_in
    if t.name.endswith("norm.weight"):
        return (1.0 + 0.02 * rng.standard_normal(n)).astype(np.float32)
    if t.name.startswith("rope_factors"):
        return np.ones(n, np.float32)
    if t.name.endswith(".bias"):
        std = 0.02
    elif "attn_sinks" in t.name:
        std = 0.5
    elif t.name == "token_embd.weight":
        std = 1.0
    else:
        std = 1.0 / np.sqrt(n_in)
    if t.type_id == F32:
        return (std * rng.standard_normal(n)).astype(np.float32)
    fmt = host.formats[t.type_id]
    if fmt.random_blocks is None:
        raise InvalidRequest(f"quant format {fmt.name} cannot make random blocks; "
                             f"synth presets cannot use it")
    return np.asarray(fmt.random_blocks(n // fmt.block_elems, rng, std), np.uint8).reshape(-1)


# -- vocabulary -------------------------------------------------------------

def _gpt2_byte_chars() -> list[str]:
    """GPT-2's byte-to-unicode table: printable bytes map to themselves, the
    rest to code points from 256 up, so every byte is one visible character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _merged_tokens(alphabet: list[str], n: int) -> list[tuple[str, str]]:
    """``n`` distinct (left, right) pairs, shortest first: every two-symbol
    string over ``alphabet``, then each of those extended by one symbol, and
    so on. Each merged token's left part is itself a token, so all are reachable."""
    out: list[tuple[str, str]] = []
    level = list(alphabet)
    while len(out) < n:
        nxt = []
        for left in level:
            for c in alphabet:
                out.append((left, c))
                nxt.append(left + c)
                if len(out) == n:
                    return out
        level = nxt
    return out


_WORD_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:;()"


def _bpe_tokens(n_normal: int) -> tuple[list[str], list[int], list[str]]:
    byte_chars = _gpt2_byte_chars()
    space = byte_chars[ord(" ")]
    alphabet = [space] + [c for c in _WORD_CHARS]  # printable ASCII maps to itself
    pairs = _merged_tokens(alphabet, n_normal - 256)
    tokens = byte_chars + [a + b for a, b in pairs]
    merges = [f"{a} {b}" for a, b in pairs] or [f"{space} {space}"]  # writer refuses []
    return tokens, [NORMAL] * n_normal, merges


def _spm_tokens(n_normal: int) -> tuple[list[str], list[int], list[float]]:
    head = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256
    alphabet = ["▁"] + list(_WORD_CHARS)
    n_pieces = n_normal - len(head)
    pieces = alphabet[:n_pieces]
    pieces += [a + b for a, b in _merged_tokens(alphabet, n_pieces - len(pieces))]
    scores = [0.0] * len(head) + [-float(i) for i in range(len(pieces))]  # higher merges first
    return head + pieces, types + [NORMAL] * len(pieces), scores


def build_vocab(v: SynthVocab) -> dict[str, Any]:
    """tokens, token_type, scores (spm) or merges (bpe), exactly ``v.size`` long."""
    n_normal = v.first_special
    if n_normal < (259 if v.kind == "spm" else 256) or n_normal + len(v.specials) > v.size:
        raise InvalidRequest(f"vocab of size {v.size} cannot hold {n_normal} normal tokens "
                             f"and {len(v.specials)} specials")
    if v.kind == "bpe":
        tokens, types, merges = _bpe_tokens(n_normal)
        extra: dict[str, Any] = {"merges": merges}
    elif v.kind == "spm":
        tokens, types, scores = _spm_tokens(n_normal)
        extra = {"scores": scores}
    else:
        raise InvalidRequest(f"unknown vocab kind {v.kind!r} (expected 'bpe' or 'spm')")
    tokens += list(v.specials)
    types += [CONTROL] * len(v.specials)
    n_pad = v.size - len(tokens)
    tokens += [v.pad_text.format(i=i) for i in range(len(tokens), v.size)]
    types += [v.pad_type] * n_pad
    if "scores" in extra:
        extra["scores"] += [0.0] * (v.size - len(extra["scores"]))
    assert len(tokens) == v.size and len(set(tokens)) == v.size, "token texts must be unique"
    return {"tokens": tokens, "token_type": types, **extra}


def _add_vocab(writer, v: SynthVocab) -> None:
    vocab = build_vocab(v)
    ids = {t: i for i, t in enumerate(vocab["tokens"])}
    writer.add_tokenizer_model("gpt2" if v.kind == "bpe" else "llama")
    writer.add_tokenizer_pre(v.pre)
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["token_type"])
    if "merges" in vocab:
        writer.add_token_merges(vocab["merges"])
    if "scores" in vocab:
        writer.add_token_scores(vocab["scores"])
    for role in ("bos", "eos", "eot", "pad", "unk"):
        text = getattr(v, role)
        if text is not None:
            _add_value(writer, f"tokenizer.ggml.{role}_token_id"
                       if role != "pad" else "tokenizer.ggml.padding_token_id", ids[text])
    writer.add_add_bos_token(v.add_bos)
    if v.chat_template:
        writer.add_chat_template(v.chat_template)
