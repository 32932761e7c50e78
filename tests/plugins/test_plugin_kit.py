"""orcd.devkit.testing catches what it promises to catch, and ``orcd new-plugin``
writes a plugin that installs and passes its own tests as generated."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from orcd import cli, hookimpl
from orcd.devkit import testing
from orcd.errors import ModelLoadFailed

from support import fake_cuda_package

llama = pytest.importorskip("orcd_llama")

ARCH = "kitllama"
SMALL = {f"{ARCH}.block_count": 2, f"{ARCH}.context_length": 128,
         f"{ARCH}.embedding_length": 64, f"{ARCH}.feed_forward_length": 96,
         f"{ARCH}.attention.head_count": 4, f"{ARCH}.attention.head_count_kv": 2}


def _plugin(build=None, mark=True) -> tuple[types.SimpleNamespace, object]:
    """A plugin serving arch ``kitllama`` with llama's table and ``build``."""
    spec = dataclasses.replace(llama.spec(), name=ARCH, build=build or llama.spec().build)

    def orcd_architectures():
        return [spec]

    ns = types.SimpleNamespace(__name__="kit_plugin", ORCD_PLUGIN_API=1,
                               orcd_architectures=hookimpl(orcd_architectures) if mark
                               else orcd_architectures)
    return ns, testing.tiny_preset(spec, SMALL, optional_tensors=())


def test_a_good_plugin_passes(tmp_path):
    plugin, preset = _plugin()
    report = testing.check_plugin(plugin, preset, tmp_path)
    assert report.model.cpu.shape == (8, 320) and report.model.decode_rel_err < 1e-4


def test_an_unmarked_hook_is_caught():
    plugin, _ = _plugin(mark=False)
    with pytest.raises(testing.KitFailure, match="orcd_architectures is not marked"):
        testing.check_hooks(plugin)


def test_a_hook_with_wrong_arguments_is_caught():
    plugin = types.SimpleNamespace(__name__="kit_bad", ORCD_PLUGIN_API=1,
                                   orcd_tokenizer=hookimpl(lambda model, path, extra: None))
    with pytest.raises(testing.KitFailure, match="does not register"):
        testing.check_hooks(plugin)


def test_an_unconsumed_tensor_is_caught(tmp_path):
    def build(hp, w, backend):
        model = llama.spec().build(hp, w, backend)
        w._taken.discard("blk.1.ffn_down.weight")  # as if the builder never took it
        return model

    plugin, preset = _plugin(build)
    with pytest.raises(ModelLoadFailed, match="did not use tensors blk.1.ffn_down.weight"):
        testing.check_plugin(plugin, preset, tmp_path)


def test_a_forward_that_misplaces_the_kv_cache_is_caught(tmp_path):
    class PosZero:  # stores every token's k/v at position 0
        def __init__(self, inner):
            self.inner = inner

        def forward(self, ops, ids, pos, cache, last_only=True):
            return self.inner.forward(ops, ids, pos * 0, cache, last_only)

    plugin, preset = _plugin(lambda hp, w, b: PosZero(llama.spec().build(hp, w, b)))
    with pytest.raises(testing.KitFailure, match="check pos and the KV cache"):
        testing.check_plugin(plugin, preset, tmp_path)


def test_keys_no_hparam_reads_are_reported():
    spec = llama.spec()
    md = {"llama.block_count": 2, "llama.vocab_size": 5, "llama.rope.scaling.yarn_log_mul": 0.1,
          "general.name": "x"}
    assert testing.unread_keys(spec, md) == ["llama.rope.scaling.yarn_log_mul"]


def test_dropping_a_required_key_fails_naming_it():
    spec = dataclasses.replace(llama.spec(), name=ARCH)
    testing.check_required_keys(spec, SMALL, 320)
    with pytest.raises(ModelLoadFailed, match="kitllama.block_count"):
        testing.check_required_keys(spec, {k: v for k, v in SMALL.items() if "block" not in k}, 320)


# -- orcd new-plugin -----------------------------------------------------------

def test_new_plugin_refuses_bad_names_and_full_folders(tmp_path, capsys):
    assert cli.main(["new-plugin", "My-Arch", "-o", str(tmp_path)]) == 1
    assert "lowercase letters" in capsys.readouterr().err
    assert cli.main(["new-plugin", "mini", "-o", str(tmp_path)]) == 0
    assert cli.main(["new-plugin", "mini", "-o", str(tmp_path)]) == 1
    assert "not empty" in capsys.readouterr().err


def test_generated_plugin_installs_and_passes_its_own_tests(tmp_path):
    assert cli.main(["new-plugin", "toy_arch", "-o", str(tmp_path)]) == 0
    root = tmp_path / "orcd-plugin-toy-arch"
    assert 'toy_arch = "orcd_toy_arch"' in (root / "pyproject.toml").read_text()
    site = tmp_path / "site"  # installed beside, not into, this environment
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ORCD_BLOCK_PLUGINS")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "--no-build-isolation", "--target", str(site), str(root)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # as generated, and again where cuda-bindings is installed but no driver is
    # (cuInit raises, as cuda-bindings 13.5 with cuda-pathfinder 1.9 does)
    fake_cuda = fake_cuda_package(tmp_path / "fake_cuda")
    for path in (str(site), os.pathsep.join([str(fake_cuda), str(site)])):
        env["PYTHONPATH"] = path
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "tests"], cwd=root, capture_output=True, text=True, env=env,
                           timeout=300)
        assert r.returncode == 0, r.stdout[-3000:]
        assert "3 passed" in r.stdout
    env["PYTHONPATH"] = str(site)
    r = subprocess.run([sys.executable, "-m", "orcd.cli", "plugins"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert "orcd_toy_arch" in r.stdout and "architectures: toy_arch" in r.stdout, r.stdout
