"""The llama plugin's own tests, through orcd's plugin test kit."""

from pathlib import Path

import pytest

from orcd.devkit import testing
from orcd.errors import ModelLoadFailed

import orcd_llama

SMALL = {"llama.block_count": 2, "llama.context_length": 256, "llama.embedding_length": 64,
         "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
         "llama.attention.head_count_kv": 2, "llama.rope.freq_base": 100000.0}


def test_hooks_and_public_api_only():
    assert testing.check_hooks(orcd_llama).architecture("llama").plugin == "orcd_llama"
    assert testing.private_imports(Path(orcd_llama.__file__).parent) == []


def test_llama_tiny_preset(tmp_path):
    report = testing.check_plugin(orcd_llama, "llama-tiny", tmp_path)
    assert report.model.cpu.shape == (8, 512)
    if report.cuda is not None:
        assert report.cuda_rel_err < 2e-2 and report.cuda_top1_agree >= 0.9


def test_every_optional_tensor_is_used(tmp_path):
    """Biases, a separate output matrix and Llama-3 rope factors: all written, all taken."""
    preset = testing.tiny_preset(orcd_llama.spec(), SMALL)
    assert "rope_freqs.weight" in preset.optional_tensors
    report = testing.check_plugin(orcd_llama, preset, tmp_path)
    assert report.model.n_tensors == 3 + 1 + 2 * 16


@pytest.mark.parametrize("key,value,match", [
    ("llama.expert_count", 8, "experts"),
    ("llama.rope.scaling.type", "yarn", "rope scaling 'yarn'"),
    ("llama.rope.dimension_count", 8, "must equal the head size"),
    ("llama.attention.head_count_kv", 3, "not a multiple"),
])
def test_unsupported_options_fail_clearly(key, value, match):
    with pytest.raises(ModelLoadFailed, match=match):
        orcd_llama.spec().read_hparams({**SMALL, key: value}, 320)


def test_linear_rope_scaling_sets_freq_scale():
    hp = orcd_llama.spec().read_hparams({**SMALL, "llama.rope.scaling.type": "linear",
                                         "llama.rope.scaling.factor": 4.0}, 320)
    assert hp.rope_freq_scale == 0.25
