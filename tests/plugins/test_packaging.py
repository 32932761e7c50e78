"""Packaging: the core and each plugin build as wheels, and each plugin wheel
installs on its own next to the core wheel in a fresh venv, where ``orcd
plugins`` lists it.

The build runs on a clean copy of the files git would ship (tracked, plus new
files not ignored), so stale ``build/`` or ``*.egg-info`` folders in the
checkout cannot leak into a wheel. The venv has no system site-packages; pip
fetches the core's runtime dependencies from the configured index (its cache
makes that quick after the first run).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = ("orcd", ".")
# entry-point name -> (distribution, source folder, what it provides)
PLUGINS = {
    "qwen": ("orcd-plugin-qwen", "plugins/qwen", {"architectures": ["qwen2"]}),
    "phi3": ("orcd-plugin-phi3", "plugins/phi3", {"architectures": ["phi3"]}),
    "gpt_oss": ("orcd-plugin-gpt-oss", "plugins/gpt_oss", {"architectures": ["gpt-oss"]}),
    "tokenizers": ("orcd-plugin-tokenizers", "plugins/tokenizers", {"hooks": ["orcd_tokenizer"]}),
    "llama": ("orcd-plugin-llama", "plugins/llama", {"architectures": ["llama"]}),
}
#: model plugin -> its tiny synth preset, served right after the plugin is installed alone
TINY = {"qwen": "qwen2-tiny", "phi3": "phi3-tiny", "gpt_oss": "gpt-oss-tiny", "llama": "llama-tiny"}
# Runs ``orcd plugins --json`` in-process while the CLI cannot import yet
# (a subcommand module still being written); see _orcd_plugins_json.
PLUGINS_JSON = ("import argparse, sys; from orcd.commands import plugins; "
                "sys.exit(plugins.run(argparse.Namespace(json=True)))")


def _run(cmd: list, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "ORCD_BLOCK_PLUGINS", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _check(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"{' '.join(r.args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _clean_copy(dst: Path) -> Path:
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=ROOT, capture_output=True, check=True).stdout.decode()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: skip the usual litter
        shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(
            ".git", "build", "dist", "*.egg-info", "__pycache__", ".*cache", "*.gguf", ".venv"))
        return dst
    for rel in filter(None, listed.split("\0")):
        src = ROOT / rel
        if src.is_file():  # a tracked file deleted in the work tree is skipped
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


def _build_wheels(src: Path, out: Path) -> dict[str, Path]:
    """Build all the wheels concurrently; distribution name -> wheel path."""
    folders = [CORE[1]] + [folder for _, folder, _ in PLUGINS.values()]
    procs = [subprocess.Popen([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                               "--no-build-isolation", "-w", str(out), str(src / f)],
                              cwd=src, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for f in folders]
    for f, p in zip(folders, procs):
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, f"building the wheel of {f} failed:\n{log[-3000:]}"
    wheels = {}
    for whl in out.glob("*.whl"):
        dist = whl.name.split("-")[0].replace("_", "-")
        wheels[dist] = whl
    return wheels


def _fresh_venv(venv: Path) -> list:
    """A venv without system site-packages; returns the pip command that installs into it.
    This pip drives the venv (``--python``, pip >= 22.3) instead of bootstrapping
    a second pip into it, which is most of a venv's creation time."""
    import pip
    if tuple(int(x) for x in pip.__version__.split(".")[:2]) >= (22, 3):
        _check(_run([sys.executable, "-m", "venv", "--without-pip", venv], venv.parent))
        return [sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "-q"]
    _check(_run([sys.executable, "-m", "venv", venv], venv.parent))
    return [venv / "bin" / "python", "-m", "pip", "-q"]


def _entry_points(whl: Path) -> str:
    with zipfile.ZipFile(whl) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))
        return z.read(name).decode()


def _orcd_plugins_json(venv: Path, cwd: Path) -> dict[str, dict]:
    r = _run([venv / "bin" / "orcd", "plugins", "--json"], cwd)
    if r.returncode != 0 and "No module named 'orcd.commands." in r.stderr:
        r = _run([venv / "bin" / "python", "-c", PLUGINS_JSON], cwd)
    return {row["name"]: row for row in json.loads(_check(r).stdout)}


#: a cubin as ``python -m orcd.backends.cuda.aot`` leaves it before a release build (the folder is ignored by git)
AOT_PROBE = "orcd/backends/cuda/aot/matmul-sm_90-0123456789abcdef0123456789abcdef.cubin"


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("packaging")
    src = _clean_copy(tmp / "src")
    probe = src / "core" / AOT_PROBE
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_bytes(b"\x7fELF")
    return _build_wheels(src, tmp / "wheels")


@pytest.mark.slow
def test_wheels_build_and_each_plugin_installs_next_to_the_core(wheels, tmp_path):
    assert set(wheels) == {CORE[0]} | {dist for dist, _, _ in PLUGINS.values()}

    with zipfile.ZipFile(wheels["orcd"]) as z:
        names = z.namelist()
    assert "orcd/quant/builtin.py" in names and "orcd/backends/cuda/kernels/gemm_simt.cu" in names
    assert AOT_PROBE in names   # kernels built ahead of time ship in the wheel
    assert not [n for n in names if n.startswith(("orcd_", "tests/", "plugins/"))]
    assert re.search(r"^orcd = orcd\.cli:main$", _entry_points(wheels["orcd"]), re.M)
    for name, (dist, _, _) in PLUGINS.items():
        assert re.search(rf"^\[orcd\]\n{name} = orcd_{name}$", _entry_points(wheels[dist]), re.M)

    venv = tmp_path / "venv"
    pip = _fresh_venv(venv)
    install = [*pip, "install", "--find-links", wheels["orcd"].parent]
    _check(_run([*install, wheels["orcd"]], tmp_path, timeout=600))
    where = _check(_run([venv / "bin" / "python", "-c", "import orcd; print(orcd.__file__)"], tmp_path))
    assert where.stdout.startswith(str(venv)), f"the venv sees another orcd: {where.stdout}"
    assert set(_orcd_plugins_json(venv, tmp_path)) == {"builtin"}

    for name, (dist, _, provides) in PLUGINS.items():  # each on its own next to the core
        _check(_run([*install, wheels[dist]], tmp_path))
        rows = _orcd_plugins_json(venv, tmp_path)
        # a model plugin brings the tokenizer plugin it needs, and nothing else
        assert set(rows) == {"builtin", name, "tokenizers"}, f"{dist} alone next to the core"
        assert rows[name]["version"] == wheels[dist].name.split("-")[1]
        for what, items in provides.items():
            assert rows[name]["provides"][what] == items
        if name in TINY:  # `pip install orcd-plugin-NAME` alone serves its models
            _serves(venv, TINY[name], tmp_path)
        _check(_run([*pip, "uninstall", "-y", *{dist, "orcd-plugin-tokenizers"}], tmp_path))

    _check(_run([*install, *(wheels[dist] for dist, _, _ in PLUGINS.values())], tmp_path))
    rows = _orcd_plugins_json(venv, tmp_path)  # and all together, without conflicts
    assert set(rows) == {"builtin", *PLUGINS}
    assert len(rows["builtin"]["provides"]["quant_formats"]) == 12


def _serves(venv: Path, preset: str, tmp: Path) -> None:
    model = tmp / f"{preset}.gguf"
    _check(_run([venv / "bin" / "orcd", "synth", preset, "-o", model], tmp))
    _check(_run([venv / "bin" / "orcd", "generate", "--model", model, "--device", "cpu",
                 "--prompt", "Hello", "--max-tokens", "3", "--quiet"], tmp))


@pytest.mark.slow
def test_license_and_readmes_are_package_metadata(wheels):
    """SPDX license expressions (PEP 639), the LICENSE file in the core's wheel,
    each distribution's README as its long description."""
    for dist, whl in wheels.items():
        with zipfile.ZipFile(whl) as z:
            names = z.namelist()
            meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        head, _, body = meta.partition("\n\n")
        assert "License-Expression: MIT" in head and "\nLicense:" not in head, dist
        assert "Description-Content-Type: text/markdown" in head, dist
        assert body.startswith(f"# {dist}"), f"{dist}: its README is not its description"
        if dist == "orcd":
            assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_readme_and_ci_run_the_same_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert "python3 -m pytest" in ci and "-e tests/dummy_plugin" in ci
    assert f"    {ci}\n" in readme, "README's test command and .ci/run differ"
