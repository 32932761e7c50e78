"""Runtime vs dev kit: the serving path never imports ``orcd.devkit``.

The developer kit (synthetic GGUFs, the plugin test kit, the new-plugin
scaffold, the loopback test server, the benchmark) lives in ``orcd.devkit``;
only the CLI subcommands synth, new-plugin and bench import it, lazily in
``run``. Each check imports in a fresh interpreter, so modules this test
session already loaded (conftest imports the kit) cannot hide an import.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

RUNTIME = ("orcd.server.app", "orcd.load", "orcd.engine", "orcd.scheduler", "orcd.backends.cpu",
           "orcd.cli")
DEVKIT = ("synth", "testing", "scaffold", "server_testing", "bench")
PROBE = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(m for m in sys.modules if m == "orcd.devkit" or m.startswith("orcd.devkit."))))
"""


def _devkit_loaded_after(*modules: str, code: str = PROBE) -> list[str]:
    r = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_runtime_modules_do_not_import_the_devkit():
    assert _devkit_loaded_after(*RUNTIME) == []


def test_a_plugin_host_does_not_import_the_devkit_until_synth_presets_are_asked_for():
    # the bundled model plugins build their synth presets from orcd.devkit.synth
    code = PROBE.replace("print(", "from orcd.plugins import PluginHost; h = PluginHost(); "
                                   "h.architecture('qwen2'); h.formats\nprint(", 1)
    assert _devkit_loaded_after(code=code) == []
    asked = code.replace("h.formats", "h.synth_presets['qwen2-tiny']")
    assert "orcd.devkit.synth" in _devkit_loaded_after(code=asked)


def test_building_the_cli_parser_does_not_import_the_devkit():
    # every subcommand module is imported to build the parser; the kit only when one runs
    code = PROBE.replace("print(", "import orcd.cli; orcd.cli.build_parser()\nprint(", 1)
    assert _devkit_loaded_after(code=code) == []


def test_the_probe_sees_a_devkit_import():
    # the check above would fail if a runtime module imported the kit
    assert _devkit_loaded_after("orcd.load", "orcd.devkit.bench") == ["orcd.devkit", "orcd.devkit.bench"]


@pytest.mark.parametrize("name", DEVKIT)
def test_the_devkit_modules_live_only_in_orcd_devkit(name):
    assert importlib.util.find_spec(f"orcd.devkit.{name}") is not None
    old = "orcd.server.testing" if name == "server_testing" else f"orcd.{name}"
    assert importlib.util.find_spec(old) is None, f"{old} is back beside the runtime"


def test_every_package_folder_says_what_lives_there_and_who_imports_it():
    # a newcomer opens a folder and reads what it holds and its import rules
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "core" / "orcd"   # the source tree, not a wheel
    folders = [p.parent for p in root.rglob("*/__init__.py") if p.parent.name != "kernels"]
    assert len(folders) >= 8
    for folder in folders:
        name = ".".join(folder.relative_to(root).parts)
        readme = folder / "README.md"
        assert readme.is_file(), f"{name} has no README.md"
        text = readme.read_text()
        assert text.startswith(f"# orcd.{name} ") and "mport" in text, name
