"""ModelFile: metadata, tensor table and zero-copy data, checked against what
gguf's own GGUFWriter wrote and GGUFReader reads."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from orcd.errors import ModelLoadFailed
from orcd.gguf_file import ModelFile, type_name

N_EMBD, N_HEAD, N_HEAD_KV, N_LAYER, N_CTX, N_VOCAB = 64, 4, 2, 2, 256, 48


def write_small_gguf(path: Path, *, arch: str = "toy", tokenizer: str | None = "gpt2",
                     chat_template: str | None = "{{ messages[0].content }}",
                     vocab_in_tokens: bool = True, extra=None) -> Path:
    """A small valid GGUF: llama-like metadata and Q8_0/Q4_0/F16/F32 tensors."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("small test model")
    w.add_context_length(N_CTX)
    w.add_block_count(N_LAYER)
    w.add_embedding_length(N_EMBD)
    w.add_feed_forward_length(2 * N_EMBD)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_layer_norm_rms_eps(1e-6)
    if tokenizer is not None:
        w.add_tokenizer_model(tokenizer)
    if vocab_in_tokens:
        w.add_token_list([f"tok{i}" for i in range(N_VOCAB)])
        w.add_token_types([1] * N_VOCAB)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    for key, value in (extra or {}).items():
        w.add_key_value(key, value[0], value[1])

    def add(name, shape, qtype):
        x = rng.standard_normal(shape).astype(np.float32)
        if qtype == T.F32:
            w.add_tensor(name, x)
        elif qtype == T.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)

    add("token_embd.weight", (N_VOCAB, N_EMBD), T.Q8_0)
    add("output_norm.weight", (N_EMBD,), T.F32)
    for i in range(N_LAYER):
        add(f"blk.{i}.attn_norm.weight", (N_EMBD,), T.F32)
        add(f"blk.{i}.attn_q.weight", (N_EMBD, N_EMBD), T.Q4_0)
        add(f"blk.{i}.attn_v.weight", (N_EMBD * N_HEAD_KV // N_HEAD, N_EMBD), T.F16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return write_small_gguf(tmp_path_factory.mktemp("gguf") / "small.gguf")


def test_metadata_matches_writer(small):
    with ModelFile.open(small) as mf:
        assert mf.arch == "toy"
        assert mf.name == "small test model"
        assert mf.metadata["toy.block_count"] == N_LAYER
        assert mf.metadata["toy.context_length"] == N_CTX
        assert mf.metadata["tokenizer.ggml.model"] == "gpt2"
        assert mf.metadata["tokenizer.ggml.tokens"][:2] == ["tok0", "tok1"]
        assert mf.metadata.array_len("tokenizer.ggml.tokens") == N_VOCAB
        assert mf.vocab_size() == N_VOCAB
        assert mf.alignment == 32
        assert mf.size == small.stat().st_size


def test_metadata_hides_reader_bookkeeping_and_decodes_lazily(small):
    with ModelFile.open(small) as mf:
        md = mf.metadata
        assert "GGUF.version" not in md and "GGUF.version" not in list(md)
        with pytest.raises(KeyError):
            md["GGUF.version"]
        assert "tokenizer.ggml.tokens" in md
        assert "tokenizer.ggml.tokens" not in md._cache  # membership did not decode 48 strings
        assert md.get("no.such.key", 7) == 7
        assert len(md) == len(list(md)) == sum(1 for k in gguf.GGUFReader(small).fields
                                                 if not k.startswith("GGUF."))
        with pytest.raises(ModelLoadFailed, match="'toy.block_count' is not an array"):
            md.array_len("toy.block_count")


def test_tensors_match_gguf_reader(small):
    reader = gguf.GGUFReader(small)
    raw = small.read_bytes()
    with ModelFile.open(small) as mf:
        assert list(mf.tensors) == [t.name for t in reader.tensors]
        for rt in reader.tensors:
            t = mf.tensors[rt.name]
            assert t.type_id == int(rt.tensor_type)
            assert t.type_name == rt.tensor_type.name
            assert t.shape == tuple(int(d) for d in reversed(rt.shape.tolist()))
            assert (t.offset, t.n_bytes) == (rt.data_offset, rt.n_bytes)
            assert t.n_elements == rt.n_elements
            assert t.data.dtype == np.uint8 and t.data.shape == (t.n_bytes,)
            assert t.data.tobytes() == raw[t.offset:t.offset + t.n_bytes]
        q = mf.tensors["blk.0.attn_q.weight"]
        assert q.shape == (N_EMBD, N_EMBD) and q.type_name == "Q4_0"
        assert q.n_bytes == N_EMBD * N_EMBD // 32 * 18


def test_tensor_data_is_a_read_only_view_of_the_mapping(small):
    with ModelFile.open(small) as mf:
        a, b = mf.tensors["output_norm.weight"], mf.tensors["token_embd.weight"]
        assert not a.data.flags.writeable
        assert not a.data.flags.owndata
        assert np.shares_memory(a.data, np.frombuffer(mf._buf, np.uint8))  # zero-copy: the mapping itself
        assert np.array_equal(a.data.view(np.float32),
                              gguf.GGUFReader(small).tensors[1].data)
        assert b.data.ctypes.data - a.data.ctypes.data == b.offset - a.offset


def test_vocab_size_fallbacks(tmp_path):
    p = write_small_gguf(tmp_path / "a.gguf", vocab_in_tokens=False,
                         extra={"toy.vocab_size": (1000, gguf.GGUFValueType.UINT32)})
    with ModelFile.open(p) as mf:
        assert mf.vocab_size() == 1000
    p = write_small_gguf(tmp_path / "b.gguf", vocab_in_tokens=False)
    with ModelFile.open(p) as mf:
        assert mf.vocab_size() == N_VOCAB  # token_embd rows


def test_close_drops_the_tensors(small):
    mf = ModelFile.open(small)
    mf.close()
    assert mf.tensors == {}


def test_type_name():
    assert type_name(14) == "Q6_K" and type_name(0) == "F32" and type_name(999) == "type999"


@pytest.mark.slow
def test_real_qwen(real_qwen):
    with ModelFile.open(real_qwen) as mf:
        assert mf.arch == "qwen2"
        assert mf.vocab_size() == 151936
        assert len(mf.tensors) == 291
        emb = mf.tensors["token_embd.weight"]
        assert emb.shape == (151936, 896)
        assert max(t.offset + t.n_bytes for t in mf.tensors.values()) <= mf.size
        assert {t.type_name for t in mf.tensors.values()} == {"F32", "Q5_0", "Q8_0", "Q4_K", "Q6_K"}
