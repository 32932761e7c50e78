"""Loading the model on its own thread, begun as soon as the arguments are checked.

``orcd serve`` starts a ``Loading`` before it imports the HTTP stack (fastapi, pydantic,
uvicorn: ~0.9 s on the GPU machine, bench/RESULTS.md), so the device's start-up, the
kernel modules and the weights' upload overlap those imports instead of following them.
The app (server/app.py) attaches to it when its lifespan begins; an app made without one
(the tests' ``create_app``) starts its own there. Either way the load and the steps after
it (engine, chat template, scheduler warm-up, inference thread) run on the one thread
named ``orcd-load``, as the device context they make expects.

Nothing here imports more than the model loader needs.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from orcd.errors import InvalidRequest
from orcd.server.config import ServerConfig
from orcd.server.narration import LoadProgress, Narrator, process_age

Loader = Callable[[ServerConfig, Callable[[float], None]], Any]
#: what the app does once the load ended: (the model or None, its error or None, load start)
AfterLoad = Callable[[Any, BaseException | None, float], None]


def load_for_serving(config: ServerConfig, progress: Callable[[float], None]):
    """The default loader: the shared loading path, then the KV-cache budget."""
    from orcd.load import load_model
    from orcd.plugins import PluginHost
    lm = load_model(config.model_path, host=PluginHost(), device=config.device,
                    n_ctx=config.ctx_size, tokenizer_path=config.tokenizer_path, progress=progress,
                    **config.backend_options)
    if config.kv_cache_mb is not None:
        try:
            lm.n_ctx = kv_budget_ctx(lm.hp, lm.n_ctx, config.kv_cache_mb)
        except BaseException:
            lm.close()
            raise
    return lm


def kv_budget_ctx(hp, n_ctx: int, kv_cache_mb: int) -> int:
    """The context that fits ``kv_cache_mb`` of fp16 K and V (both backends'
    cache type): 2 bytes × (head_dim + head_dim_v) × n_head_kv × n_layer a token."""
    from orcd.vram import kv_bytes_per_token
    per_token = kv_bytes_per_token(hp.n_layer, hp.n_head_kv, hp.head_dim, hp.get("head_dim_v"))
    fits = kv_cache_mb * (1 << 20) // per_token
    if fits < 16:
        raise InvalidRequest(f"--kv-cache-size-mb {kv_cache_mb} holds only {fits} tokens of "
                             f"this model's KV cache ({per_token} bytes a token)",
                             field="kv_cache_size_mb")
    return min(n_ctx, fits)


def narrate_startup(narrator: Narrator, config: ServerConfig) -> None:
    """The ``startup`` event: the worker's settings, and the seconds before it (named in
    ``config.startup_phases``)."""
    narrator.event("startup", since_process_start_s=process_age(), phases=dict(config.startup_phases),
                   device=config.device, queue_size=config.queue_size, max_batch=config.max_batch,
                   ctx_size=config.ctx_size, max_tokens_out=config.max_tokens_out,
                   inference_timeout_s=config.inference_timeout_s, auth=bool(config.api_key))


class Loading:
    """``loader(config, progress)`` on the ``orcd-load`` thread, narrated
    (``model_load_start``, ``model_load_progress``); then, once the app has attached,
    its ``after`` on the same thread with the model or the error."""

    def __init__(self, config: ServerConfig, narrator: Narrator, loader: Loader = load_for_serving) -> None:
        self.config, self.narrator, self.loader = config, narrator, loader
        self._attached = threading.Event()
        self._after: AfterLoad | None = None
        self._thread = threading.Thread(target=self._run, name="orcd-load", daemon=True)

    def start(self) -> Loading:
        self._thread.start()
        return self

    def attach(self, after: AfterLoad) -> None:
        """The app is up: ``after`` runs when the load has ended (at once if it has)."""
        self._after = after
        self._attached.set()

    def _run(self) -> None:
        self.narrator.event("model_load_start", path=self.config.model_path, device=self.config.device)
        t0 = time.monotonic()
        lm, error = None, None
        try:
            progress = LoadProgress(self.narrator)
            lm = self.loader(self.config, progress)
            progress.finish()
        except BaseException as e:   # reported by the app, which exits with it
            error = e
        self._attached.wait()   # a daemon thread: a process that never serves ends anyway
        self._after(lm, error, t0)
