"""orcd synth: tiny presets round-trip through orcd's reader and arch tables;
the big presets' plans match the real models' shapes, types and sizes."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from orcd.devkit.synth import (BYTE, CONTROL, F32, MXFP4, Q4_0, Q4_K, Q5_0, Q5_K, Q6_K, Q8_0,
                               build_vocab, plan, planned_file_bytes, synthesize)
from orcd.errors import InvalidRequest
from orcd.gguf_file import ModelFile

TINY = ("qwen2-tiny", "phi3-tiny", "phi3-tiny-q4_0", "gpt-oss-tiny")
TINY_OF = {"qwen2-tiny": "qwen2-0.5b", "phi3-tiny": "phi3-mini",
           "phi3-tiny-q4_0": "phi3-mini-q4_0", "gpt-oss-tiny": "gpt-oss-20b"}


def _open(host, path: Path):
    mf = ModelFile.open(path)
    spec = host.architecture(mf.arch)
    hp = spec.read_hparams(mf.metadata, mf.vocab_size())
    return mf, spec, hp


@pytest.mark.parametrize("preset", TINY)
def test_tiny_preset_loads_with_intended_types_and_sane_values(host, tiny_model, preset):
    path = tiny_model(preset)
    mf, spec, hp = _open(host, path)
    spec.check_tensors({n: t.shape for n, t in mf.tensors.items()}, hp)
    planned = {t.name: t for t in plan(host, preset)}
    assert set(mf.tensors) == set(planned)
    assert path.stat().st_size == planned_file_bytes(host, preset)
    for name, t in mf.tensors.items():
        assert (t.type_id, t.shape) == (planned[name].type_id, planned[name].shape), name
        w = host.formats[t.type_id].dequantize_tensor(t.data, t.shape)
        assert np.isfinite(w).all(), name
        if name.endswith("norm.weight"):
            assert abs(w.mean() - 1) < 0.01 and w.std() < 0.05, name
        elif name.endswith(".bias"):
            assert w.std() < 0.05, name
        elif w.ndim >= 2 and name != "token_embd.weight":
            # std 1/sqrt(n_in): activations keep unit scale (no fp16 overflow on the GPU)
            assert abs(w.mean()) < 0.1 / np.sqrt(t.shape[-1]), name
            assert 0.7 < w.std() * np.sqrt(t.shape[-1]) < 1.4, name


def test_tiny_presets_use_every_type_of_their_big_preset(host):
    for tiny, big in TINY_OF.items():
        tiny_types = Counter(t.type_id for t in plan(host, tiny))
        big_types = Counter(t.type_id for t in plan(host, big))
        assert set(tiny_types) == set(big_types), (tiny, big)


def test_gpt_oss_tiny_keeps_what_tests_must_exercise(host, tiny_model):
    _, _, hp = _open(host, tiny_model("gpt-oss-tiny"))
    assert hp.head_dim == 64 and hp.n_swa == 8 and hp.n_layer >= 2
    assert hp.n_expert >= 4 and hp.n_expert_used == 2
    assert hp.rope_scaling == "yarn" and hp.rope_factor == 32


# name, tensors, tensor bytes, file bytes measured by the notes' generator, type counts
BIG = [
    ("qwen2-0.5b", 291, 485_452_288, 491_400_064,
     {Q5_0: 133, F32: 121, Q8_0: 13, Q6_K: 12, Q4_K: 12}),
    ("phi3-mini", 195, 2_392_493_568, 2_393_296_480, {F32: 65, Q5_K: 32, Q4_K: 81, Q6_K: 17}),
    ("phi3-mini-q4_0", 195, 2_175_438_336, None, {F32: 65, Q4_0: 129, Q6_K: 1}),
    ("gpt-oss-20b", 459, 12_096_558_336, 12_100_308_928, {F32: 289, Q8_0: 98, MXFP4: 72}),
]


@pytest.mark.parametrize("preset,n_tensors,n_bytes,file_bytes,types", BIG)
def test_big_preset_plan(host, preset, n_tensors, n_bytes, file_bytes, types):
    tensors = plan(host, preset)
    assert len(tensors) == n_tensors
    assert sum(t.n_bytes for t in tensors) == n_bytes
    assert Counter(t.type_id for t in tensors) == types
    if file_bytes is not None:  # the vocabulary's bytes differ a little from the real one
        assert abs(planned_file_bytes(host, preset) - file_bytes) < 0.005 * file_bytes
    spec = host.architecture(host.synth_presets[preset].arch)
    hp = spec.read_hparams(host.synth_presets[preset].metadata, host.synth_presets[preset].vocab.size)
    spec.check_tensors({t.name: t.shape for t in tensors}, hp)


def test_phi3_mini_gives_ffn_down_more_bits_in_half_the_layers(host):
    down = [t.type_id for t in plan(host, "phi3-mini") if t.name.endswith("ffn_down.weight")]
    assert Counter(down) == {Q6_K: 16, Q4_K: 16}


def _real_qwen() -> Path | None:
    try:
        from orcd.pull import cached_path
        path = cached_path("qwen2.5-coder-0.5b")
    except Exception:
        path = None
    fallback = Path("/tmp/models/qwen.gguf")
    return path or (fallback if fallback.is_file() else None)


def test_qwen_plan_clones_the_real_file(host):
    real = _real_qwen()
    if real is None:
        pytest.skip("real Qwen file not available")
    mf = ModelFile.open(real)
    preset = host.synth_presets["qwen2-0.5b"]
    for key, value in preset.metadata.items():
        assert mf.metadata[key] == pytest.approx(value), key
    assert mf.vocab_size() == preset.vocab.size
    assert {t.name: (t.type_id, t.shape) for t in plan(host, preset)} == \
        {n: (t.type_id, t.shape) for n, t in mf.tensors.items()}


def test_same_seed_same_bytes(host, tmp_path):
    a = synthesize(host, "qwen2-tiny", tmp_path / "a.gguf", seed=1).read_bytes()
    b = synthesize(host, "qwen2-tiny", tmp_path / "b.gguf", seed=1).read_bytes()
    c = synthesize(host, "qwen2-tiny", tmp_path / "c.gguf", seed=2).read_bytes()
    assert a == b and a != c and len(a) == len(c)


@pytest.mark.parametrize("preset", ["qwen2-0.5b", "gpt-oss-tiny", "phi3-mini"])
def test_vocab_is_complete_and_reachable(host, preset):
    v = host.synth_presets[preset].vocab
    vocab = build_vocab(v)
    tokens, types = vocab["tokens"], vocab["token_type"]
    assert len(tokens) == len(types) == v.size == len(set(tokens))
    ids = {t: i for i, t in enumerate(tokens)}
    for text in v.specials + v.eog:
        assert types[ids[text]] == CONTROL, text
    if v.kind == "bpe":
        assert len(set(tokens[:256])) == 256 and all(len(t) == 1 for t in tokens[:256])
        for merge in vocab["merges"][:: max(1, len(vocab["merges"]) // 2000)]:
            left, right = merge.split(" ")
            assert left in ids and right in ids and left + right in ids, merge
    else:
        assert tokens[:3] == ["<unk>", "<s>", "</s>"]
        assert types[ids["<0x0A>"]] == BYTE and len(vocab["scores"]) == v.size


def _args(**kw):
    base = dict(preset=None, output=None, seed=0, list=False)
    return argparse.Namespace(**{**base, **kw})


def test_cli_lists_writes_and_refuses_unknown(tmp_path, capsys):
    from orcd.commands import synth as cmd

    assert cmd.run(_args(list=True)) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in (*TINY, *TINY_OF.values()))
    out = tmp_path / "m.gguf"
    assert cmd.run(_args(preset="phi3-tiny-q4_0", output=str(out), seed=3)) == 0
    assert ModelFile.open(out).arch == "phi3"
    with pytest.raises(InvalidRequest, match="known presets"):
        cmd.run(_args(preset="llama-70b", output=str(out)))
    with pytest.raises(InvalidRequest, match="-o FILE"):
        cmd.run(_args(preset="phi3-tiny"))


@pytest.mark.oracle
@pytest.mark.parametrize("preset", TINY)
def test_llama_cpp_loads_and_evaluates_tiny_preset(host, tiny_model, preset):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(tiny_model(preset)), n_ctx=64, n_threads=2, verbose=False)
    text = b"Hello world, this is a test."
    ids = llm.tokenize(text, add_bos=False, special=False)
    assert ids and llm.detokenize(ids).lstrip() == text
    vocab = host.synth_presets[preset].vocab
    eos = llm.tokenize(vocab.eos.encode(), add_bos=False, special=True)
    assert eos == [llm.token_eos()]
    llm.eval(ids)
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
    assert np.isfinite(logits).all() and 0.3 < logits.std() < 3
