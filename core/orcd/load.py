"""From a GGUF path to a ready model: the loading path every command uses.

    ModelFile.open ─▶ ArchSpec (general.architecture) ─▶ hparams ─▶ tensor check
      ─▶ tokenizer (orcd_tokenizer hook) ─▶ backend.load_weights (progress 0..1)
      ─▶ ArchSpec.build ─▶ every tensor consumed?
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from orcd.arch import ArchSpec, HParams
from orcd.errors import ModelLoadFailed, OrcdError
from orcd.gguf_file import ModelFile
from orcd.weights import Weights


@dataclass
class LoadedModel:
    path: Path
    file: ModelFile
    arch: ArchSpec
    hp: HParams
    model: Any
    tokenizer: Any
    backend: Any
    n_ctx: int
    quant_kind: str
    weight_bytes: int
    output_parser: Any = None
    phases: dict[str, float] = field(default_factory=dict)   # seconds per start-up phase, in order

    def close(self) -> None:
        self.backend.close()
        self.file.close()


def quant_kind(mf: ModelFile, formats) -> str:
    """``general.file_type`` as llama.cpp names it (Q4_K_M, Q4_0, MXFP4_MOE…),
    else the format holding the most bytes."""
    ft = mf.metadata.get("general.file_type")
    if ft is not None:
        try:
            from gguf import LlamaFileType
            return LlamaFileType(int(ft)).name.removeprefix("MOSTLY_")
        except (ValueError, ImportError):
            pass
    by_type: dict[int, int] = {}
    for t in mf.tensors.values():
        by_type[t.type_id] = by_type.get(t.type_id, 0) + t.n_bytes
    top = max(by_type, key=by_type.get)
    return formats[top].name if top in formats else str(top)


def check_vram(mf: ModelFile, hp: HParams, n_ctx: int, backend: Any) -> None:
    """Fail fast, before any upload, when weights + the KV cache of the chosen
    context + scratch exceed the device's free memory (GPU backends only)."""
    device = getattr(backend, "device", None)
    if device is None or not hasattr(device, "mem_info"):
        return
    from orcd.vram import check_fits, estimate_for_model
    free, _total = device.mem_info()
    need = estimate_for_model(mf, hp, n_ctx, flash_attention=True).total
    check_fits(need, free, getattr(device, "index", 0), mf.path)


class Phases(dict):
    """Seconds per start-up phase: ``with phases("upload"): ...``."""

    def __call__(self, name: str):
        phases = self

        class _Timer:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                phases[name] = round(phases.get(name, 0.0) + time.perf_counter() - self.t0, 4)
        return _Timer()


def load_model(path: str | Path, *, host, device: str = "cpu", n_ctx: int | None = None,
               tokenizer_path: str | Path | None = None,
               progress: Callable[[float], None] | None = None, backend: Any = None,
               **backend_options) -> LoadedModel:
    phases = Phases()
    with phases("open"):
        mf = ModelFile.open(path)
    try:
        lm = _load(mf, host, device, n_ctx, tokenizer_path, progress, backend, backend_options, phases)
    except BaseException:
        mf.close()
        raise
    lm.phases = dict(phases)
    return lm


def _tokenizer(host, mf, tokenizer_path, phases):
    with phases("tokenizer"):
        return host.tokenizer(mf, Path(tokenizer_path) if tokenizer_path else None)


def _load(mf, host, device, n_ctx, tokenizer_path, progress, backend, backend_options, phases):
    src = str(mf.path)
    arch = host.architecture(mf.arch, source=src)
    hp = arch.read_hparams(mf.metadata, mf.vocab_size(), source=src)
    arch.check_tensors({n: t.shape for n, t in mf.tensors.items()}, hp, source=src)
    for t in mf.tensors.values():
        host.formats[t.type_id]  # unknown type ids fail here, before any upload
    n_ctx = int(n_ctx or hp.n_ctx_train)
    if n_ctx <= 0:
        raise ModelLoadFailed(f"{src}: context size must be positive, got {n_ctx}")
    hp["n_ctx"] = n_ctx  # the runtime context, e.g. for Phi-3's long/short rope factors
    # the tokenizer is built on a thread beside the device's set-up and the upload (Python
    # and Rust on the CPU while the driver works): its phase overlaps theirs
    tokenizing = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="orcd-tokenizer")
    tok_future = tokenizing.submit(_tokenizer, host, mf, tokenizer_path, phases)
    tokenizing.shutdown(wait=False)
    if backend is None:
        from orcd.backends import create_backend
        try:
            with phases("backend"):   # device, context, the format-free kernels (compiled in parallel)
                backend = create_backend(device, **backend_options)
        except BaseException:
            concurrent.futures.wait([tok_future])
            raise
    try:
        check_vram(mf, hp, n_ctx, backend)
        with phases("weights"):   # upload, and the weight formats' kernels compiled meanwhile
            tensors = backend.load_weights(mf, host.formats, list(mf.tensors), progress)
        with phases("build"):
            store = Weights(tensors)
            model = arch.build(hp, store, backend)
        left = store.unconsumed()
        if left:
            raise ModelLoadFailed(f"{src}: the {arch.name} model did not use tensors "
                                  f"{', '.join(left[:5])}{' …' if len(left) > 5 else ''}")
    except OrcdError:
        concurrent.futures.wait([tok_future])
        backend.close()
        raise
    except Exception as e:
        concurrent.futures.wait([tok_future])
        backend.close()
        raise ModelLoadFailed(f"{src}: building the {arch.name} model failed: "
                              f"{type(e).__name__}: {e}") from e
    try:
        tokenizer = tok_future.result()   # its own errors as they are
    except BaseException:
        backend.close()
        raise
    return LoadedModel(path=mf.path, file=mf, arch=arch, hp=hp, model=model, tokenizer=tokenizer,
                       backend=backend, n_ctx=n_ctx, quant_kind=quant_kind(mf, host.formats),
                       weight_bytes=sum(t.n_bytes for t in mf.tensors.values()),
                       output_parser=host.output_parser(arch.name, tokenizer))
