"""``orcd inspect``: its facts checked against gguf's own GGUFReader, for a small
GGUF written here and for the real Qwen file."""

from __future__ import annotations

import json
import types
from collections import defaultdict

import gguf
import numpy as np
import pytest

from orcd import cli, hookimpl
from orcd.arch import ArchSpec, HParam
from orcd.commands.inspect import describe
from orcd.gguf_file import ModelFile
from orcd.plugins import PluginHost
from test_gguf_file import N_CTX, N_EMBD, N_HEAD, N_HEAD_KV, N_LAYER, N_VOCAB, write_small_gguf

U32 = gguf.GGUFValueType.UINT32


def reader_facts(path) -> dict:
    """What inspect must report, computed from gguf's GGUFReader alone."""
    r = gguf.GGUFReader(path)
    quant = defaultdict(lambda: {"tensors": 0, "bytes": 0, "parameters": 0})
    for t in r.tensors:
        row = quant[t.tensor_type.name]
        row["tensors"] += 1
        row["bytes"] += int(t.n_bytes)
        row["parameters"] += int(t.n_elements)
    arch = r.fields["general.architecture"].contents()
    return {"architecture": arch, "quantization": dict(quant),
            "parameters": sum(int(t.n_elements) for t in r.tensors),
            "weights_bytes": sum(int(t.n_bytes) for t in r.tensors),
            "context_length": r.fields[f"{arch}.context_length"].contents(),
            "tokenizer_model": r.fields["tokenizer.ggml.model"].contents(),
            "chat_template": "tokenizer.chat_template" in r.fields}


def assert_matches_reader(facts: dict, path) -> None:
    want = reader_facts(path)
    assert facts["architecture"] == want["architecture"]
    assert facts["quantization"] == want["quantization"]
    assert list(facts["quantization"]) == sorted(want["quantization"],
                                                 key=lambda k: -want["quantization"][k]["bytes"])
    assert facts["parameters"] == want["parameters"]
    assert facts["vram"]["weights_bytes"] == want["weights_bytes"]
    assert facts["context_length"] == want["context_length"]
    assert facts["tokenizer_model"] == want["tokenizer_model"]
    assert facts["chat_template"] == want["chat_template"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return write_small_gguf(tmp_path_factory.mktemp("inspect") / "small.gguf")


def kv_bytes(ctx, n_layer=N_LAYER, n_head_kv=N_HEAD_KV, k=N_EMBD // N_HEAD, v=N_EMBD // N_HEAD):
    return 2 * ctx * n_layer * n_head_kv * (k + v)


def test_small_model_facts_from_metadata(small):
    with ModelFile.open(small) as mf:
        f = describe(mf)
    assert_matches_reader(f, small)
    assert f["name"] == "small test model" and f["vocab_size"] == N_VOCAB
    assert f["tokenizer"] == "gguf-bpe"
    assert f["tensors"] == 2 + 3 * N_LAYER
    vram = f["vram"]
    assert vram["ctx"] == N_CTX
    assert vram["kv_layout"] == {"source": "metadata", "n_layer": N_LAYER, "n_head_kv": N_HEAD_KV,
                                 "head_dim_k": 16, "head_dim_v": 16,
                                 "bytes_per_token": 2 * N_LAYER * N_HEAD_KV * 32}
    assert vram["kv_cache_bytes"] == kv_bytes(N_CTX)
    assert vram["total_bytes"] == vram["weights_bytes"] + kv_bytes(N_CTX)


def test_ctx_override_scales_only_the_kv_cache(small):
    with ModelFile.open(small) as mf:
        f = describe(mf, ctx=4096)
    assert f["context_length"] == N_CTX and f["vram"]["ctx"] == 4096
    assert f["vram"]["kv_cache_bytes"] == kv_bytes(4096)


@pytest.mark.parametrize("model, kind", [("gpt2", "gguf-bpe"), ("llama", "gguf-spm"),
                                         ("bert", "bert"), (None, None)])
def test_tokenizer_kind_and_chat_template(tmp_path, model, kind):
    path = write_small_gguf(tmp_path / "m.gguf", tokenizer=model, chat_template=None)
    with ModelFile.open(path) as mf:
        f = describe(mf)
    assert f["tokenizer"] == kind and f["tokenizer_model"] == model
    assert f["chat_template"] is False


def test_key_and_value_lengths_from_metadata(tmp_path):
    path = write_small_gguf(tmp_path / "m.gguf", extra={
        "toy.attention.key_length": (24, U32), "toy.attention.value_length": (8, U32)})
    with ModelFile.open(path) as mf:
        f = describe(mf, ctx=100)
    assert f["vram"]["kv_cache_bytes"] == kv_bytes(100, k=24, v=8)


def test_missing_hparams_leave_the_kv_cache_unknown(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), "bare")
    w.add_tensor("x", np.zeros(32, dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with ModelFile.open(tmp_path / "bare.gguf") as mf:
        f = describe(mf)
    assert f["context_length"] is None and f["vocab_size"] is None and f["tokenizer"] is None
    assert f["vram"]["kv_layout"] is None and f["vram"]["total_bytes"] is None
    assert f["vram"]["weights_bytes"] == 128


def toy_plugin(head_dim_v: int, key: str = "{arch}.block_count"):
    """A plugin serving arch "toy" whose derive() sets a value head size."""
    hp = (HParam("n_layer", key), HParam("n_embd", "{arch}.embedding_length"),
          HParam("n_head", "{arch}.attention.head_count"),
          HParam("n_head_kv", "{arch}.attention.head_count_kv"))
    mod = types.ModuleType("toyplugin")
    mod.ORCD_PLUGIN_API = 1
    mod.orcd_architectures = hookimpl(lambda: [ArchSpec(
        "toy", hp, (), build=None,
        derive=lambda h: {"head_dim": h.n_embd // h.n_head, "head_dim_v": head_dim_v})])
    return PluginHost(builtins=(), entry_points=False, extra=[mod])


def test_hparams_come_from_the_architecture_plugin(small):
    with ModelFile.open(small) as mf:
        f = describe(mf, ctx=10, host=toy_plugin(head_dim_v=4))
    assert f["vram"]["kv_layout"]["source"] == "plugin toyplugin"
    assert f["vram"]["kv_cache_bytes"] == kv_bytes(10, k=16, v=4)


def test_plugin_that_cannot_read_the_file_falls_back_to_metadata(small):
    with ModelFile.open(small) as mf:
        f = describe(mf, ctx=10, host=toy_plugin(4, key="{arch}.no_such_key"))
    assert f["vram"]["kv_layout"]["source"] == "metadata"
    assert f["vram"]["kv_cache_bytes"] == kv_bytes(10)


# -- the CLI ------------------------------------------------------------------------

@pytest.fixture
def orcd_cli(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", ("inspect", "pull"))
    return lambda *argv: cli.main(list(argv))


def test_cli_json_and_text(small, orcd_cli, capsys):
    assert orcd_cli("inspect", str(small), "--json", "--ctx", "512") == 0
    f = json.loads(capsys.readouterr().out)
    assert_matches_reader(f, small)
    assert f["vram"]["kv_cache_bytes"] == kv_bytes(512)
    assert orcd_cli("inspect", str(small)) == 0
    out = capsys.readouterr().out
    assert "architecture   toy" in out and "chat template  yes" in out
    assert "Q8_0" in out and "VRAM estimate at ctx 256" in out


def test_cli_errors(tmp_path, orcd_cli, capsys, small):
    assert orcd_cli("inspect", str(tmp_path / "missing.gguf")) == 1
    assert "orcd: error [MODEL_LOAD_FAILED]: " in capsys.readouterr().err
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x01\x00\x00\x00" + bytes(16))
    assert orcd_cli("inspect", str(tmp_path / "bad.gguf")) == 1
    assert "unsupported GGUF version 1" in capsys.readouterr().err
    assert orcd_cli("inspect", str(tmp_path)) == 1
    assert "is a directory" in capsys.readouterr().err
    assert orcd_cli("inspect", str(small), "--ctx", "0") == 1
    assert "[INVALID_REQUEST]: --ctx must be a positive" in capsys.readouterr().err


@pytest.mark.slow
def test_real_qwen(real_qwen, host):
    with ModelFile.open(real_qwen) as mf:
        f = describe(mf, host=host)
    assert_matches_reader(f, real_qwen)
    assert f["architecture"] == "qwen2" and f["tokenizer"] == "gguf-bpe"
    assert f["vocab_size"] == 151936 and f["chat_template"] is True
    assert {k: v["tensors"] for k, v in f["quantization"].items()} == \
        {"Q5_0": 133, "F32": 121, "Q8_0": 13, "Q6_K": 12, "Q4_K": 12}
    kv = f["vram"]["kv_layout"]
    assert kv["source"].startswith("plugin")
    assert (kv["n_layer"], kv["n_head_kv"], kv["head_dim_k"], kv["head_dim_v"]) == (24, 2, 64, 64)
    assert f["vram"]["ctx"] == 32768
    assert f["vram"]["kv_cache_bytes"] == 2 * 32768 * 24 * 2 * (64 + 64)


@pytest.mark.parametrize("preset", ["qwen2-tiny", "phi3-tiny", "phi3-tiny-q4_0", "gpt-oss-tiny"])
def test_synth_presets(preset, tiny_model, host):
    path = tiny_model(preset)
    with ModelFile.open(path) as mf:
        f = describe(mf, ctx=128, host=host)
    assert_matches_reader(f, path)
    assert f["architecture"] == host.synth_presets[preset].arch
    kv = f["vram"]["kv_layout"]
    assert kv["source"].startswith("plugin")
    assert f["vram"]["kv_cache_bytes"] == 128 * kv["bytes_per_token"] > 0
