"""The plugin author's test kit: call it from your plugin's pytest suite.

    from orcd.devkit import testing
    import orcd_myarch

    def test_my_plugin(tmp_path):
        preset = testing.tiny_preset(orcd_myarch.spec(), {"myarch.block_count": 2, ...})
        report = testing.check_plugin(orcd_myarch, preset, tmp_path)
        assert report.cuda is None or report.cuda_rel_err < 2e-2

``check_plugin`` runs every check below in order; each is usable alone:

- ``check_hooks``: the module registers in a fresh host: ``ORCD_PLUGIN_API``
  matches, every ``orcd_*`` function is marked ``@hookimpl`` and matches its
  hookspec (pluggy's validation), table hooks return lists.
- ``tiny_preset`` / ``synthesize_preset``: a tiny GGUF written from your own
  weight table (``orcd.devkit.synth``), so the file can never drift from the table.
- ``unread_keys`` / ``check_required_keys``: every ``{arch}.*`` key of a file
  is read by some ``HParam``; dropping any required key fails the load clearly.
- ``check_model``: the model loads on the CPU reference, takes every tensor
  of the file, gives finite logits of the right shape, and a prefill followed
  by decoding token by token (the KV cache, causality) agrees with the full
  forward at every position; where a GPU is
  present (``gpu_available()``), the CUDA path runs the same and is compared.

Everything here uses the same loading path ``orcd serve`` uses.
"""

from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from orcd.arch import REQUIRED, ArchSpec
from orcd.devkit.synth import F32, Q8_0, SynthPreset, SynthVocab
from orcd.errors import ModelLoadFailed

#: Modules a plugin may import: the plugin API (docs/plugins.md, "The public API").
#: ``orcd.ops`` covers its family modules (``orcd.ops.rope.RopeConfig``, the
#: numpy references a plugin's own op is checked against).
PUBLIC_MODULES = ("orcd", "orcd.arch", "orcd.weights", "orcd.blocks", "orcd.errors", "orcd.ops",
                  "orcd.quant", "orcd.devkit.synth", "orcd.tokenizer", "orcd.gguf_file",
                  "orcd.devkit.testing", "orcd.toolcalls")
#: Keys of the ``{arch}.`` namespace that are informational in llama.cpp's files too.
INFORMATIONAL_KEYS = ("{arch}.vocab_size",)


class KitFailure(AssertionError):
    """A plugin check failed; the message says what to fix."""


# -- hooks -------------------------------------------------------------------

def check_hooks(plugin: Any) -> Any:
    """Register ``plugin`` alone (with the built-in formats) in a fresh
    PluginHost and return it; raise KitFailure naming the problem."""
    from orcd import hookspecs
    from orcd.plugins import PluginError, PluginHost

    specs = {n for n in vars(hookspecs) if n.startswith("orcd_")}
    for name, fn in inspect.getmembers(plugin, callable):
        if name.startswith("orcd_") and name in specs and not hasattr(fn, f"{hookspecs.PROJECT}_impl"):
            raise KitFailure(f"{name} is not marked @orcd.hookimpl, so orcd would never call it")
    try:
        host = PluginHost(entry_points=False, extra=[plugin])
    except PluginError as e:
        raise KitFailure(f"the plugin does not register: {e}") from None
    name = getattr(plugin, "__name__", type(plugin).__name__)
    if not any(host.infos[name].provides.values()):
        raise KitFailure(f"plugin {name!r} implements no hook")
    return host


def host_with(plugin: Any) -> Any:
    """A full PluginHost (entry points included, e.g. the tokenizer plugin)
    in which ``plugin`` is registered exactly once, installed or not."""
    from orcd.plugins import ENTRY_POINT_GROUP, PluginHost

    mine = [ep.name for ep in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP)
            if ep.value.split(":")[0] == getattr(plugin, "__name__", None)]
    if mine:  # installed: its entry point registers it
        return PluginHost()
    return PluginHost(extra=[plugin])


def private_imports(package_dir: str | Path) -> list[str]:
    """``file:line module`` for every import of an orcd module outside
    ``PUBLIC_MODULES`` in the Python files under ``package_dir``."""
    import ast

    found = []
    for path in sorted(Path(package_dir).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for mod in names:
                if (mod == "orcd" or mod.startswith("orcd.")) and not _is_public(mod):
                    found.append(f"{path.name}:{node.lineno} {mod}")
    return found


def _is_public(module: str) -> bool:
    return any(module == p or (p != "orcd" and module.startswith(p + ".")) for p in PUBLIC_MODULES)


# -- a tiny file from the weight table ---------------------------------------

def tiny_vocab(size: int = 320) -> SynthVocab:
    """A small GPT-2 BPE vocabulary with ChatML-style specials."""
    return SynthVocab(kind="bpe", size=size, pre="gpt-2",
                      specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                      bos="<|im_start|>", eos="<|im_end|>", eog=("<|im_end|>", "<|endoftext|>"))


def tiny_preset(spec: ArchSpec, metadata: Mapping[str, Any], *, name: str | None = None,
                vocab: SynthVocab | None = None,
                tensor_type: Callable[[str, tuple[int, ...]], int] | None = None,
                optional_tensors: Iterable[str] | str = "all") -> SynthPreset:
    """A SynthPreset for ``spec`` with tiny hyper-parameters ``metadata`` (GGUF
    keys, ``{arch}`` spelled out). By default vectors are F32 and matrices
    Q8_0 (any width that is a multiple of 32), and every optional tensor is
    written so the forward's optional paths run too."""
    vocab = vocab or tiny_vocab()
    if optional_tensors == "all":
        hp = spec.read_hparams(metadata, vocab.size, source="tiny preset")
        optional_tensors = [n for n, (_, opt) in spec.expected_tensors(hp).items() if opt]
    return SynthPreset(name=name or f"{spec.name}-kit-tiny", arch=spec.name,
                       description=f"orcd.devkit.testing tiny {spec.name}", metadata=dict(metadata),
                       tensor_type=tensor_type or _f32_vectors_q8_0_matrices, vocab=vocab,
                       optional_tensors=tuple(optional_tensors))


def _f32_vectors_q8_0_matrices(name: str, shape: tuple[int, ...]) -> int:
    return F32 if len(shape) == 1 else Q8_0


class _PresetHost:
    """The host as ``orcd.devkit.synth`` sees it, with one extra preset."""

    def __init__(self, host: Any, preset: SynthPreset) -> None:
        self._host = host
        self.synth_presets = {**host.synth_presets, preset.name: preset}
        self.formats = host.formats

    def architecture(self, name: str, source: str = "model") -> ArchSpec:
        return self._host.architecture(name, source)


def synthesize_preset(host: Any, preset: SynthPreset, path: str | Path, seed: int = 0) -> Path:
    """Write ``preset`` (registered with the host or not) to ``path``."""
    from orcd.devkit.synth import synthesize
    return synthesize(_PresetHost(host, preset), preset.name, path, seed=seed)


# -- metadata keys ------------------------------------------------------------

def unread_keys(spec: ArchSpec, metadata: Mapping[str, Any],
                ignore: Iterable[str] = INFORMATIONAL_KEYS) -> list[str]:
    """Keys ``{arch}.*`` in ``metadata`` that no HParam of ``spec`` reads: a
    file option the plugin would silently ignore (rope scaling, experts…)."""
    read = {p.key.format(arch=spec.name) for p in spec.hparams}
    skipped = {k.format(arch=spec.name) for k in ignore}
    return sorted(k for k in metadata if k.startswith(spec.name + ".") and k not in read | skipped)


def check_required_keys(spec: ArchSpec, metadata: Mapping[str, Any], n_vocab: int) -> None:
    """``metadata`` satisfies ``spec``, and dropping any one required key is a
    MODEL_LOAD_FAILED that names it."""
    spec.read_hparams(metadata, n_vocab, source="kit")
    for p in spec.hparams:
        if p.default is not REQUIRED:
            continue
        key = p.key.format(arch=spec.name)
        try:
            spec.read_hparams({k: v for k, v in metadata.items() if k != key}, n_vocab, source="kit")
        except ModelLoadFailed as e:
            if key not in str(e):
                raise KitFailure(f"dropping {key!r} fails with a message that does not name "
                                 f"it: {e}") from None
        else:
            raise KitFailure(f"dropping required key {key!r} did not fail the load")


# -- the model on the CPU reference (and CUDA where present) ---------------------

@functools.lru_cache(maxsize=1)
def gpu_available() -> bool:
    """True when an NVIDIA GPU is usable. Never raises: cuda-bindings missing,
    a driver library that cannot be found (cuda-bindings 13 with a recent
    cuda-pathfinder raises DynamicLibNotFoundError from ``cuInit`` where older
    versions returned an error code), a failing driver or no device all
    mean False, so a CPU-only machine runs the CPU checks whatever is installed."""
    from orcd.backends.cuda.device import device_count
    try:
        return device_count() > 0
    except Exception:  # noqa: BLE001 - any failure of the probe means "no GPU here"
        return False


@dataclass
class ModelReport:
    arch: str
    n_tensors: int
    cpu: np.ndarray                    # [T, n_vocab] logits of the full prompt
    decode_rel_err: float              # prefill T/2, then decode token by token, vs full forward
    cuda: np.ndarray | None = None     # the same logits from cuda:0, None without a GPU
    cuda_rel_err: float | None = None  # max over positions of |cuda - cpu| / |cpu|
    cuda_top1_agree: float | None = None


def _rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a - b, axis=-1) / np.maximum(np.linalg.norm(b, axis=-1), 1e-30)


def _run(lm, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(full-prompt logits [T, V], the same rows computed incrementally: a
    prefill of the first half, then one decode step per token [T - T//2 + 1, V])."""
    from orcd.engine import Runner

    b, hp = lm.backend, lm.hp

    def cache():
        return b.new_kv_cache(hp.n_layer, lm.n_ctx, hp.n_head_kv, hp.head_dim, hp.get("head_dim_v"))

    full = b.to_host(lm.model.forward(b.ops, b.ids(ids), b.positions(0, len(ids)), cache(),
                                      last_only=False))
    c = cache()
    runner = b.make_runner(lm.model, c) if hasattr(b, "make_runner") else Runner(lm.model, b, c)
    half = len(ids) // 2
    rows = [b.to_host(runner.forward(ids[:half], 0)).reshape(-1)]
    rows += [b.to_host(runner.forward([t], p)).reshape(-1) for p, t in enumerate(ids) if p >= half]
    return full, np.stack(rows)


def check_model(path: str | Path, host: Any, *, prompt_len: int = 8, n_ctx: int = 64,
                cuda: bool | None = None, seed: int = 0) -> ModelReport:
    """Load ``path`` through the serving path and run it (see module doc).
    ``cuda=None`` runs the CUDA path exactly when ``gpu_available()``."""
    from orcd.load import load_model

    lm = load_model(path, host=host, device="cpu", n_ctx=n_ctx)  # fails on an unconsumed tensor
    try:
        n_vocab = lm.hp.n_vocab
        ids = np.random.default_rng(seed).integers(0, n_vocab, prompt_len).tolist()
        full, steps = _run(lm, ids)
        report = ModelReport(lm.arch.name, len(lm.file.tensors), full,
                             float(_rel(steps, full[prompt_len // 2 - 1:]).max()))
    finally:
        lm.close()
    if full.shape != (prompt_len, n_vocab):
        raise KitFailure(f"forward(last_only=False) gave logits {full.shape}, "
                         f"expected {(prompt_len, n_vocab)}")
    if not np.isfinite(full).all():
        raise KitFailure("the CPU reference forward gave non-finite logits")
    if report.decode_rel_err > 1e-3:
        raise KitFailure(f"a prefill followed by one decode step per token differs from the full "
                         f"forward by {report.decode_rel_err:.2e} (relative): a position sees "
                         f"later tokens or the wrong cache rows; check pos and the KV cache")
    if cuda if cuda is not None else gpu_available():
        lm = load_model(path, host=host, device="cuda:0", n_ctx=n_ctx)
        try:
            got, got_steps = _run(lm, ids)  # the prefill and the (graph) decode path
        finally:
            lm.close()
        report.cuda = got
        report.cuda_rel_err = float(max(_rel(got, full).max(),
                                        _rel(got_steps, full[prompt_len // 2 - 1:]).max()))
        report.cuda_top1_agree = float((got.argmax(-1) == full.argmax(-1)).mean())
    return report


# -- everything at once ---------------------------------------------------------

@dataclass
class PluginReport:
    host: Any
    path: Path
    model: ModelReport

    @property
    def cuda(self) -> np.ndarray | None:
        return self.model.cuda

    @property
    def cuda_rel_err(self) -> float | None:
        return self.model.cuda_rel_err


def check_plugin(plugin: types.ModuleType | Any, preset: SynthPreset | str,
                 tmp_path: str | Path, *, ignore_keys: Iterable[str] = (),
                 **model_options: Any) -> PluginReport:
    """All the checks for one architecture: hooks, a tiny file from the table
    (``preset``: a SynthPreset, or the name of one the plugin offers),
    metadata keys (``ignore_keys``: ones a real file carries that the model
    rightly does not need), the model on CPU (and CUDA where present)."""
    check_hooks(plugin)
    host = host_with(plugin)
    if isinstance(preset, str):
        preset = host.synth_presets[preset]
    spec = host.architecture(preset.arch)
    check_required_keys(spec, preset.metadata, preset.vocab.size)
    extra = unread_keys(spec, preset.metadata, (*INFORMATIONAL_KEYS, *ignore_keys))
    if extra:
        raise KitFailure(f"the preset sets keys no HParam reads: {extra}")
    path = synthesize_preset(host, preset, Path(tmp_path) / f"{preset.name}.gguf")
    return PluginReport(host, path, check_model(path, host, **model_options))


__all__ = ["PUBLIC_MODULES", "KitFailure", "ModelReport", "PluginReport", "check_hooks",
           "check_model", "check_plugin", "check_required_keys", "gpu_available", "host_with",
           "private_imports", "synthesize_preset", "tiny_preset", "tiny_vocab", "unread_keys"]
