"""The plugin host: hookspecs documented, built-ins and entry points registered
alike, API version checked, conflicts and broken plugins loud, ``orcd plugins``."""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import textwrap
import types
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

import orcd
from orcd import PLUGIN_API_VERSION, hookimpl, hookspecs
from orcd.arch import ArchSpec
from orcd.errors import ModelLoadFailed
from orcd.plugins import BLOCK_ENV, PluginError, PluginHost
from orcd.quant import QuantFormat

ROOT = Path(__file__).resolve().parents[2]
FIRST_PARTY = {"qwen": "qwen2", "phi3": "phi3", "gpt_oss": "gpt-oss"}  # entry point -> architecture
ALL_TYPE_IDS = {0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 30, 39}


def _hookspecs() -> list:
    return [f for name, f in vars(hookspecs).items()
            if name.startswith("orcd_") and hasattr(f, f"{hookspecs.PROJECT}_spec")]


def _plugin(name: str, api=PLUGIN_API_VERSION, **hooks) -> types.SimpleNamespace:
    """A module-like plugin: ``hooks`` are plain functions, marked here as hookimpls."""
    ns = types.SimpleNamespace(__name__=name, **{k: hookimpl(f) for k, f in hooks.items()})
    if api is not None:
        ns.ORCD_PLUGIN_API = api
    return ns


def _arch(name: str) -> ArchSpec:
    return ArchSpec(name=name, hparams=(), tensors=(), build=lambda hp, w, b: None)


def _fmt(type_id: int, name: str) -> QuantFormat:
    return QuantFormat(type_id, name, 1, 4, lambda raw: raw.view(np.float32))


# -- the hook contract -------------------------------------------------------

def test_hookspecs_exist():
    names = {f.__name__ for f in _hookspecs()}
    assert {"orcd_architectures", "orcd_quant_formats", "orcd_tokenizer"} <= names


@pytest.mark.parametrize("spec", _hookspecs(), ids=lambda f: f.__name__)
def test_every_hookspec_documents_its_parameters_and_return(spec):
    doc = inspect.getdoc(spec) or ""
    assert len(doc) > 80, f"{spec.__name__} needs a docstring stating its contract"
    assert "return" in doc.lower(), f"{spec.__name__}'s docstring does not say what it returns"
    for param in inspect.signature(spec).parameters:
        assert f"``{param}``" in doc, f"{spec.__name__}'s docstring does not describe {param!r}"


def test_docs_cover_every_hook_and_the_api_rules():
    doc = (ROOT / "docs" / "plugins.md").read_text()
    for spec in _hookspecs():
        assert spec.__name__ in doc, f"docs/plugins.md does not document {spec.__name__}"
    for term in ("ORCD_PLUGIN_API", BLOCK_ENV, "BUILTIN_PLUGINS", "ArchSpec", "orcd.weights.Weights",
                 "entry-points.orcd"):
        assert term in doc, f"docs/plugins.md does not mention {term}"


# -- what gets registered ----------------------------------------------------

def test_builtin_quant_formats_registered():
    host = PluginHost(entry_points=False)
    assert {f.type_id for f in host.formats} == ALL_TYPE_IDS
    info = host.infos["builtin"]
    assert info.builtin and info.module == "orcd.quant.builtin"
    assert info.version == metadata.version("orcd")
    assert info.provides["quant_formats"][:3] == ["F32", "F16", "BF16"]
    assert "MXFP4" in info.provides["quant_formats"]


def test_builtins_pass_the_same_gates_as_entry_points(tmp_path, monkeypatch):
    # blocking by name works on a built-in…
    host = PluginHost(entry_points=False, blocked=["builtin"])
    assert len(host.formats) == 0 and host.skipped == ["builtin"]
    # …and a built-in with the wrong API version is refused like any plugin
    (tmp_path / "orcd_old_builtin.py").write_text("ORCD_PLUGIN_API = 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match=r"'orcd_old_builtin' targets orcd plugin API 0"):
        PluginHost(builtins=["orcd_old_builtin"], entry_points=False)


def test_first_party_plugins_found_through_entry_points(host):
    for plugin, arch in FIRST_PARTY.items():
        spec = host.architecture(arch)
        assert spec.name == arch and spec.plugin == plugin
        info = host.infos[plugin]
        assert not info.builtin and info.module == f"orcd_{plugin}"
        assert info.version == metadata.version(f"orcd-plugin-{plugin.replace('_', '-')}")
        assert info.provides["architectures"] == [arch]
    assert host.plugins()[0].name == "builtin"  # built-ins first, then by name


@pytest.mark.skipif(importlib.util.find_spec("orcd_tokenizers") is None,
                    reason="orcd-plugin-tokenizers not installed")
def test_tokenizer_plugin_provides_the_tokenizer_hook(host):
    assert host.infos["tokenizers"].provides["hooks"] == ["orcd_tokenizer"]
    owners = {host.pm.get_name(i.plugin) for i in host.pm.hook.orcd_tokenizer.get_hookimpls()}
    assert "tokenizers" in owners


def test_dummy_plugin_found_through_its_entry_point(host):
    eps = {ep.name: ep for ep in metadata.entry_points(group="orcd")}
    assert "dummy" in eps, "install the test plugin: pip install -e tests/dummy_plugin"
    assert eps["dummy"].value == "orcd_dummy"
    assert eps["dummy"].dist.metadata["Name"] == "orcd-plugin-dummy"
    info = host.infos["dummy"]
    assert (info.version, info.module, info.builtin) == ("0.0.1", "orcd_dummy", False)
    assert info.provides == {"architectures": ["dummy"]}
    assert host.architecture("dummy").plugin == "dummy"


def test_dummy_architecture_loads_through_its_table(host):
    """An ArchSpec table plus Weights is all a model needs: read, check, build, run."""
    from orcd.backends.cpu import CpuBackend
    from orcd.weights import Weights

    spec = host.architecture("dummy")
    hp = spec.read_hparams({"dummy.context_length": 16, "dummy.embedding_length": 8}, n_vocab=5)
    assert (hp.n_embd, hp.n_layer, hp.head_dim) == (8, 0, 1)
    rng = np.random.default_rng(0)
    tensors = {"token_embd.weight": rng.standard_normal((5, 8), dtype=np.float32),
               "output_norm.weight": rng.standard_normal(8, dtype=np.float32)}
    spec.check_tensors({n: t.shape for n, t in tensors.items()}, hp)
    with pytest.raises(ModelLoadFailed, match="mis-shaped tensors token_embd.weight"):
        spec.check_tensors({"token_embd.weight": (5, 9), "output_norm.weight": (8,)}, hp)
    store = Weights(tensors)
    model = spec.build(hp, store, CpuBackend())
    assert store.unconsumed() == []
    logits = model.forward(CpuBackend().ops, np.array([3, 1]), np.array([0, 1]), cache=None)
    x = tensors["token_embd.weight"][1]
    x = x / np.sqrt(np.mean(x * x) + 1e-6) * tensors["output_norm.weight"]
    np.testing.assert_allclose(logits, (tensors["token_embd.weight"] @ x)[None], rtol=1e-5)


# -- refusals ----------------------------------------------------------------

def test_blocked_plugin_is_not_loaded(monkeypatch):
    monkeypatch.setenv(BLOCK_ENV, " qwen , dummy")
    host = PluginHost()
    assert "qwen" not in host.infos and "qwen2" not in host.architectures
    assert sorted(host.skipped) == ["dummy", "qwen"]
    assert "phi3" in host.architectures
    with pytest.raises(ModelLoadFailed) as e:
        host.architecture("qwen2", source="m.gguf")
    msg = e.value.message
    assert e.value.code == "MODEL_LOAD_FAILED"
    assert msg.startswith("m.gguf: architecture 'qwen2' is not supported")
    # every installed architecture but the blocked one is listed
    assert f"installed architectures: {', '.join(sorted(host.architectures))})" in msg
    assert "pip install orcd-plugin-qwen`" in msg and "ORCD_BLOCK_PLUGINS" in msg


def test_unknown_architecture_names_a_plugin_to_install():
    host = PluginHost(entry_points=False, extra=[_plugin("p", orcd_architectures=lambda: [_arch("a")])])
    with pytest.raises(ModelLoadFailed, match=r"installed architectures: a\); .*"
                                              r"`pip install orcd-plugin-mamba-2`"):
        host.architecture("mamba_2")


@pytest.mark.parametrize("api", [None, 0, 2, "1", 1.5, True])
def test_wrong_or_missing_plugin_api_is_refused(api):
    with pytest.raises(PluginError) as e:
        PluginHost(entry_points=False, extra=[_plugin("oldie", api=api)])
    msg = e.value.message
    assert "'oldie'" in msg and f"ORCD_PLUGIN_API = {PLUGIN_API_VERSION}" in msg
    if api is None:
        assert "does not declare ORCD_PLUGIN_API" in msg
    else:
        assert f"targets orcd plugin API {api!r}" in msg


def test_two_plugins_claiming_one_architecture():
    a = _plugin("plug_a", orcd_architectures=lambda: [_arch("llama")])
    b = _plugin("plug_b", orcd_architectures=lambda: [_arch("x"), _arch("llama")])
    with pytest.raises(PluginError, match=r"architecture 'llama' is claimed by both plugin "
                                          r"'plug_\w' and plugin 'plug_\w'") as e:
        PluginHost(entry_points=False, extra=[a, b])
    assert "plug_a" in e.value.message and "plug_b" in e.value.message


def test_plugin_claiming_an_installed_architecture_names_both():
    rogue = _plugin("rogue", orcd_architectures=lambda: [_arch("qwen2")])
    with pytest.raises(PluginError) as e:
        PluginHost(extra=[rogue])
    assert "'qwen2'" in e.value.message and "'qwen'" in e.value.message
    assert "'rogue'" in e.value.message


def test_two_plugins_claiming_one_quant_type_id():
    rogue = _plugin("rogue_q8", orcd_quant_formats=lambda: [_fmt(8, "MY_Q8")])
    with pytest.raises(PluginError, match=r"quant type id 8 .* claimed by both plugin "
                                          r"'(builtin|rogue_q8)' and plugin '(builtin|rogue_q8)'") as e:
        PluginHost(entry_points=False, extra=[rogue])
    assert "'builtin'" in e.value.message and "'rogue_q8'" in e.value.message


def test_two_plugins_with_one_name():
    with pytest.raises(PluginError, match="two plugins are both named 'twin'"):
        PluginHost(entry_points=False, extra=[_plugin("twin"), _plugin("twin")])


def test_hook_that_raises_names_its_plugin():
    def boom():
        raise RuntimeError("no table today")
    with pytest.raises(PluginError, match=r"plugin 'moody': hook orcd_architectures failed: "
                                          r"RuntimeError: no table today"):
        PluginHost(entry_points=False, extra=[_plugin("moody", orcd_architectures=boom)])


def test_hook_returning_a_single_row_is_refused():
    bad = _plugin("single", orcd_architectures=lambda: _arch("solo"))
    with pytest.raises(PluginError, match=r"'single': hook orcd_architectures must return a list"):
        PluginHost(entry_points=False, extra=[bad])


def test_misspelled_hook_is_refused():
    typo = _plugin("typo", orcd_architecture=lambda: [_arch("t")])
    with pytest.raises(PluginError, match=r"plugin 'typo'.*unknown hook 'orcd_architecture'"):
        PluginHost(entry_points=False, extra=[typo])


def test_hook_with_wrong_arguments_is_refused():
    odd = _plugin("odd", orcd_tokenizer=lambda model, vocab_file: None)
    with pytest.raises(PluginError, match=r"plugin 'odd' is invalid: .*vocab_file"):
        PluginHost(entry_points=False, extra=[odd])


def _install_fake_distribution(root: Path, monkeypatch, name: str, module_source: str) -> None:
    """A real (if minimal) installed distribution on sys.path: dist-info with an
    ``orcd`` entry point ``name`` -> module ``orcd_{name}``."""
    dist = root / f"orcd_plugin_{name}-9.9.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: orcd-plugin-{name}\nVersion: 9.9\n")
    (dist / "entry_points.txt").write_text(f"[orcd]\n{name} = orcd_{name}\n")
    (root / f"orcd_{name}.py").write_text(textwrap.dedent(module_source))
    monkeypatch.syspath_prepend(str(root))


def test_plugin_whose_import_fails_is_loud(tmp_path, monkeypatch):
    _install_fake_distribution(tmp_path, monkeypatch, "broken", """
        import orcd_missing_dependency_xyz
        ORCD_PLUGIN_API = 1
    """)
    with pytest.raises(PluginError) as e:
        PluginHost()
    msg = e.value.message
    assert msg.startswith("plugin 'broken' (orcd_broken) failed to import: ModuleNotFoundError")
    assert "orcd_missing_dependency_xyz" in msg
    monkeypatch.setenv(BLOCK_ENV, "broken")  # the way out the user has until the plugin is fixed
    assert "broken" not in PluginHost().infos


def test_entry_point_plugin_with_another_api_is_refused(tmp_path, monkeypatch):
    _install_fake_distribution(tmp_path, monkeypatch, "future", "ORCD_PLUGIN_API = 2\n")
    with pytest.raises(PluginError, match=r"plugin 'future' targets orcd plugin API 2, but this "
                                          r"orcd provides API 1"):
        PluginHost()


def test_entry_point_version_comes_from_its_distribution(tmp_path, monkeypatch):
    _install_fake_distribution(tmp_path, monkeypatch, "extra", """
        from orcd import hookimpl
        ORCD_PLUGIN_API = 1
    """)
    assert PluginHost().infos["extra"].version == "9.9"


# -- orcd plugins ----------------------------------------------------------------

def _orcd_plugins(*argv: str) -> int:
    """``orcd plugins ARGV`` through the real CLI, or straight through the command
    module while another helper's command module is still missing."""
    try:
        from orcd import cli
        cli.build_parser()
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("orcd.commands."):
            raise
        from orcd.commands import plugins
        parser = argparse.ArgumentParser()
        plugins.add_arguments(parser)
        return plugins.run(parser.parse_args(list(argv)))
    return cli.main(["plugins", *argv])


def test_orcd_plugins_lists_plugins_versions_and_provisions(capsys, monkeypatch):
    monkeypatch.delenv(BLOCK_ENV, raising=False)
    assert _orcd_plugins() == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"orcd plugin API {PLUGIN_API_VERSION}"
    assert lines[1] == f"builtin {orcd.__version__} (built-in, orcd.quant.builtin)"
    assert lines[2].startswith("  quant_formats: F32, F16, BF16, Q4_0")
    for plugin, arch in FIRST_PARTY.items():
        version = metadata.version(f"orcd-plugin-{plugin.replace('_', '-')}")
        at = lines.index(f"{plugin} {version} (plugin, orcd_{plugin})")
        assert f"  architectures: {arch}" in lines[at + 1:at + 3]
    assert "dummy 0.0.1 (plugin, orcd_dummy)" in lines
    assert "blocked" not in out


def test_orcd_plugins_names_blocked_plugins(capsys, monkeypatch):
    monkeypatch.setenv(BLOCK_ENV, "phi3")
    assert _orcd_plugins() == 0
    out = capsys.readouterr().out
    assert "phi3 " not in out and out.splitlines()[-1] == f"blocked by {BLOCK_ENV}: phi3"


def test_orcd_plugins_json(capsys, monkeypatch):
    monkeypatch.delenv(BLOCK_ENV, raising=False)
    assert _orcd_plugins("--json") == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["builtin"]["builtin"] is True
    assert len(rows["builtin"]["provides"]["quant_formats"]) == len(ALL_TYPE_IDS)
    for plugin, arch in FIRST_PARTY.items():
        assert rows[plugin]["provides"]["architectures"] == [arch]
        assert rows[plugin]["module"] == f"orcd_{plugin}" and rows[plugin]["builtin"] is False
