"""``orcd pull`` beyond the registry: a local GGUF file, or a GGUF file on the
Hugging Face Hub (huggingface_hub, where the network allows).

Either is checked (a valid GGUF header, and an installed plugin for its
architecture, else a warning naming the package) and made servable by name:
the cache gets ``NAME.gguf``, a symbolic link to the local file or to the
Hub's cached copy, so ``orcd serve --model NAME`` finds it. NAME is the file's
stem; a name of the registry is refused rather than shadowed.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from orcd.errors import InvalidRequest, ModelLoadFailed

HF_PREFIXES = ("hf://", "hf.co/", "https://huggingface.co/", "huggingface.co/")
FORMS = ("a known model name (orcd pull --list), a GGUF file path, or a Hugging Face Hub "
         "file: hf://OWNER/REPO/FILE.gguf (or OWNER/REPO when it holds one GGUF)")


@dataclass(frozen=True)
class HubFile:
    repo: str
    filename: str | None    # None: the repository's only GGUF
    revision: str | None = None


def parse_hub(source: str) -> HubFile | None:
    """``hf://OWNER/REPO/FILE.gguf``, a copied huggingface.co URL, or a bare
    ``OWNER/REPO`` → HubFile; anything else (a path that does not exist) → None."""
    rest = next((source[len(p):] for p in HF_PREFIXES if source.startswith(p)), None)
    explicit = rest is not None
    parts = [p for p in (rest if explicit else source).split("/") if p]
    if len(parts) < 2 or not all(re.fullmatch(r"[\w.\-]+", p) for p in parts[:2]):
        return None
    if not explicit and (len(parts) != 2 or source.endswith(".gguf") or source[0] in "./~"):
        return None   # a missing local path, not a Hub repository
    repo, tail, revision = "/".join(parts[:2]), parts[2:], None
    if len(tail) >= 2 and tail[0] in ("blob", "resolve"):
        revision, tail = tail[1], tail[2:]
    filename = "/".join(tail) or None
    if filename is not None and not filename.endswith(".gguf"):
        raise InvalidRequest(f"{source}: {filename} is not a .gguf file", field="model")
    return HubFile(repo, filename, revision)


def pull_local(path: Path, cache: Path, registry_names) -> Path:
    """Check the GGUF at ``path`` and link it into ``cache`` by its stem."""
    path = path.expanduser().resolve()
    if not path.is_file():
        raise InvalidRequest(f"{path}: not a file", field="model")
    return _register(path, cache, registry_names, source=str(path))


def pull_hub(hub: HubFile, cache: Path, registry_names, progress: bool = True) -> Path:
    """Download ``hub`` through huggingface_hub (its cache under ``cache/hf``) and link it."""
    try:
        import huggingface_hub
    except ImportError:
        raise InvalidRequest("pulling from the Hugging Face Hub needs huggingface_hub: "
                             "pip install 'orcd[hf]'", field="model") from None
    filename = hub.filename or _only_gguf(huggingface_hub, hub)
    try:
        local = huggingface_hub.hf_hub_download(hub.repo, filename, revision=hub.revision,
                                                cache_dir=str(cache / "hf"))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo or file, auth: one line
        raise ModelLoadFailed(f"could not download {filename} from Hugging Face repository "
                              f"{hub.repo}: {_first_line(e)}") from None
    return _register(Path(local), cache, registry_names,
                     source=f"hf://{hub.repo}/{filename}")


def _only_gguf(huggingface_hub, hub: HubFile) -> str:
    try:
        files = huggingface_hub.list_repo_files(hub.repo, revision=hub.revision)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadFailed(f"could not list Hugging Face repository {hub.repo}: "
                              f"{_first_line(e)}") from None
    ggufs = sorted(f for f in files if f.endswith(".gguf"))
    if len(ggufs) != 1:
        listed = ", ".join(ggufs) if ggufs else "none"
        raise InvalidRequest(f"{hub.repo} holds {len(ggufs)} GGUF files ({listed}); name one: "
                             f"hf://{hub.repo}/FILE.gguf", field="model")
    return ggufs[0]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _register(path: Path, cache: Path, registry_names, source: str) -> Path:
    from orcd.gguf_file import ModelFile

    name = path.name.removesuffix(".gguf")
    if name in registry_names:
        raise InvalidRequest(f"{source}: its name {name!r} is a known model's; rename the "
                             f"file or serve it by path", field="model")
    with ModelFile.open(path) as mf:   # MODEL_LOAD_FAILED naming the problem if it is no GGUF
        arch = mf.arch
    warn_if_unservable(arch, name)
    cache.mkdir(parents=True, exist_ok=True)
    link = cache / f"{name}.gguf"
    tmp = cache / f".{name}.gguf.link"
    tmp.unlink(missing_ok=True)
    os.symlink(path.resolve(), tmp)
    os.replace(tmp, link)   # a re-pull of the same name points it at the new file
    return link


def cached_local(name: str, cache: Path) -> Path | None:
    """The file a pulled local or Hub model ``name`` links to, if it still exists."""
    if "/" in name or name.startswith("."):
        return None
    link = cache / f"{name}.gguf"
    return link.resolve() if link.is_symlink() and link.resolve().is_file() else None


def warn_if_unservable(arch: str, name: str) -> bool:
    """Warn on stderr when no installed plugin serves ``arch``; True if one does."""
    from orcd.plugins import PluginHost

    try:
        PluginHost().architecture(arch, source=name)
        return True
    except Exception as e:  # noqa: BLE001 - ModelLoadFailed naming the package, or a broken plugin
        print(f"orcd pull: warning: {getattr(e, 'message', e)}", file=sys.stderr)
        return False
