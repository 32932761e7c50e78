"""The FastAPI app: /execute (SSE), /cancel, /health, /metrics, /shutdown,
/tokenize and /detokenize, and the OpenAI-compatible /v1 routes.

Startup: the HTTP server comes up at once and the model loads on a
background thread, so /health can say "loading" (every other endpoint answers
503 meanwhile, as llama-server does). Shutdown (POST /shutdown, or SIGTERM /
SIGINT through ``orcd serve``): new work gets 503, the running job may finish
within ``shutdown_deadline_s`` and is then cancelled, the model is freed.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
import time
import urllib.request
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from orcd.errors import InternalError, InvalidRequest, OrcdError
from orcd.server.gate import Gate
from orcd.server.http import (BodyTimeout, ClientGone, MethodNotAllowed, NotFound,
                              error_response, read_body)
from orcd.server.inference import InferenceThread, ShutdownCancelled
from orcd.server.loading import Loader, Loading, load_for_serving, narrate_startup
from orcd.server.narration import Narrator, process_age
from orcd.server.openai_api import router as openai_router
from orcd.server.tokenize_api import router as tokenize_router
from orcd.server.openai_choices import Choices
from orcd.server.schemas import CancelRequest, ExecuteRequest, parse
from orcd.server.sse import SSEResponse, sse_event
from orcd.server.state import Planned, ServerConfig, ServerState
from orcd.server.streaming import frame_batches

#: how often the inference thread, when idle, checks that the weights are resident
IDLE_REFRESH_S = 5.0   # how often an idle worker refreshes memory figures and maybe checks residency

def new_scheduler(config: ServerConfig, engine):
    """The continuous-batching scheduler for ``--max-batch`` N > 1 (None for 1:
    one job at a time through Engine.generate), its KV pool sized by
    ``vram.kv_pool_blocks``: the --kv-cache-size-mb budget, else N full contexts,
    on a GPU capped by the memory free after the weights."""
    if config.max_batch <= 1:
        return None
    from orcd.kvcache import KV_BLOCK
    from orcd.scheduler import Scheduler
    from orcd.vram import KV_POOL_FREE_SHARE, estimate_for_model, kv_bytes_per_token, kv_pool_blocks
    lm = engine.lm
    hp = lm.hp
    per_token = kv_bytes_per_token(hp.n_layer, hp.n_head_kv, hp.head_dim, hp.get("head_dim_v"))
    budget = None if config.kv_cache_mb is None else config.kv_cache_mb << 20
    free = None
    device = getattr(lm.backend, "device", None)
    if hasattr(device, "mem_info"):
        scratch = estimate_for_model(lm.file, hp, lm.n_ctx, flash_attention=True).scratch
        free = max(0, int(device.mem_info()[0] * KV_POOL_FREE_SHARE) - scratch)
    n_blocks = kv_pool_blocks(per_token, lm.n_ctx, config.max_batch, KV_BLOCK,
                              budget_bytes=budget, free_bytes=free)
    return Scheduler(engine, n_blocks, config.max_batch)


def create_app(config: ServerConfig, *, narrator: Narrator | None = None,
               loader: Loader = load_for_serving, loading: Loading | None = None) -> FastAPI:
    """The worker's app. ``loading``: a load already under way (``orcd serve`` starts it
    before importing this module; its ``startup`` event already narrated), else the
    lifespan narrates ``startup`` and starts ``loader`` itself."""
    narrator = narrator or Narrator(worker_id=config.worker_id, model_ref=config.model_ref,
                                    gpu_device=config.device, log_prompts=config.log_prompts)
    state = ServerState(config, narrator)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        load = loading
        if load is None:
            narrate_startup(narrator, config)
            load = Loading(config, narrator, loader).start()
        loop = asyncio.get_running_loop()
        load.attach(lambda lm, error, t0: _after_load(state, loop, lm, error, t0))
        yield
        await asyncio.to_thread(_free, state)

    app = FastAPI(title="orcd", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.orcd = state
    app.add_middleware(Gate, state=state)

    @app.exception_handler(OrcdError)
    async def _orcd_error(request: Request, err: OrcdError):
        if isinstance(err, (ClientGone, BodyTimeout)):   # one line, never a traceback
            narrator.event("client_dropped", path=request.url.path, reason=err.message)
        return error_response(err, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        where = f"{request.method} {request.url.path}"
        err = (NotFound(f"no such endpoint: {where}") if exc.status_code == 404 else
               MethodNotAllowed(f"method not allowed: {where}") if exc.status_code == 405 else
               InvalidRequest(str(exc.detail)))
        err.http_status = exc.status_code
        return error_response(err, request.url.path)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):   # a bug: still the API's shape
        narrator.event("error", where=request.url.path, code="INTERNAL",
                       message=f"{type(exc).__name__}: {exc}")
        return error_response(InternalError("internal error (see the worker's log)"),
                              request.url.path)

    @app.get("/health")
    async def health():
        # 200 only when a job sent now would be taken; the same body either way
        ok = state.can_take_work()
        return JSONResponse(state.health(), status_code=200 if ok else 503,
                            headers=None if ok else {"Retry-After": "1"})

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.post("/execute")
    async def execute(request: Request):
        body = await read_body(request, config.max_body_bytes, config.body_timeout_s)
        planned = await state.off_loop(_prepare_execute, state, body)
        stream = state.submit(planned)
        return SSEResponse(_execute_frames(stream, config.model_ref, planned.sampling.seed),
                           on_disconnect=stream.cancel)

    @app.post("/cancel", status_code=202)
    async def cancel(request: Request):
        body = await read_body(request, config.max_body_bytes, config.body_timeout_s)
        req: CancelRequest = await state.off_loop(parse, CancelRequest, body)
        if state.inference is None:
            state.require_ready()
        status = state.inference.cancel(req.job_id)
        return {"job_id": req.job_id, "status": status}

    @app.post("/shutdown", status_code=202)
    async def shutdown():
        begin_shutdown(state, "request")
        return {"status": "shutting_down",
                "deadline_s": config.shutdown_deadline_s}

    app.include_router(openai_router(state))
    app.include_router(tokenize_router(state))
    return app


def _prepare_execute(state: ServerState, body: bytes) -> Planned:
    """Body → planned job: the CPU work of /execute, on a prep thread."""
    req: ExecuteRequest = parse(ExecuteRequest, body)
    state.require_ready()
    sampling = state.sampling(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                              min_p=req.min_p, repetition_penalty=req.repetition_penalty,
                              seed=req.seed)
    ids = state.encode(req.prompt)   # special-token text parsed, as llama-server's /completion
    return state.plan(req.job_id, ids, max_tokens=req.max_tokens, sampling=sampling,
                      stop=req.stop, prompt_text=req.prompt)


async def _execute_frames(stream, model: str, seed: int):
    # ``i`` numbers the token events 0, 1, 2… (gap-free, so a client can spot a lost
    # frame); a token that completes no character yet releases no event
    i = 0

    def render(event, out: list[bytes]) -> None:
        nonlocal i
        _, kind, payload = event   # (choice 0, kind, payload)
        if kind == "started":
            out.append(sse_event("started", {"job_id": stream.job_id, "model": model,
                                             "started_at": payload["started_at"], "seed": seed}))
        elif kind == "token":
            out.append(sse_event("token", {"t": payload.text, "i": i}))
            i += 1
        elif kind == "end":
            out.append(sse_event("end", {"tokens_out": payload.tokens_out,
                                         "decode_time_ms": round(payload.decode_time_ms, 3),
                                         "stop_reason": payload.stop_reason,
                                         "prompt_tokens": payload.prompt_tokens,
                                         "ttft_ms": round(payload.ttft_ms, 3)}))
        else:
            err = payload.to_dict()
            err.pop("field", None)
            out.append(sse_event("error", err))
    job = Choices([stream])   # the OpenAI routes' reader, for one choice
    try:
        # no keep-alive here (take waits without a timeout), as before
        async for frames in frame_batches(job.take, render):
            yield frames
    finally:
        job.cancel()


# -- lifecycle -----------------------------------------------------------------

def _after_load(state: ServerState, loop: asyncio.AbstractEventLoop, lm, error: BaseException | None,
                t0: float) -> None:
    """On the load's thread once it ended: the engine, chat template, scheduler and
    inference thread around the model, then ``ready``; or the load's error, and exit."""
    cfg, narr = state.config, state.narrator
    try:
        if error is not None:
            raise error
        from orcd.engine import Engine
        from orcd.load import Phases
        state.loaded, state.engine = lm, Engine(lm)
        phases = Phases(getattr(lm, "phases", None) or {})   # the narration names each one
        with phases("chat_template"):
            state.chat_template = _chat_template(state)
        with phases("kv_pool"):
            scheduler = new_scheduler(cfg, state.engine)
        if scheduler is not None:
            with phases("batch_graphs"):   # the one-row step; every other capture while idle
                scheduler.warm_up(lazy=True)
        state.inference = InferenceThread(
            state.engine, queue_size=cfg.queue_size, metrics=state.metrics, narrator=narr,
            idle_task=lambda: _refresh_device_state(state),
            idle_interval=min(IDLE_REFRESH_S, cfg.residency_interval_s), scheduler=scheduler,
            on_device_lost=lambda err: _mark_unhealthy(state))
        state.health_cache.update(_model_facts(state))
        _refresh_device_state(state)
        state.inference.start()
    except BaseException as e:
        state.load_error = e
        state.status = "unhealthy"
        state.loaded = state.engine = None
        if lm is not None:
            lm.close()
        err = e if isinstance(e, OrcdError) else None
        narr.event("error", where="model_load", code=getattr(err, "code", "MODEL_LOAD_FAILED"),
                   message=f"{type(e).__name__}: {e}" if err is None else err.message)
        loop.call_soon_threadsafe(state.request_exit)
        return
    scheduler = state.inference.scheduler
    narr.event("model_load_complete", seconds=round(time.monotonic() - t0, 3),
               weight_bytes=lm.weight_bytes, quant_kind=lm.quant_kind, n_ctx=lm.n_ctx,
               arch=lm.arch.name, phases=dict(phases), max_batch=cfg.max_batch,
               kv_pool_blocks=scheduler.blocks.n_blocks if scheduler is not None else None)
    if state.status != "loading":   # the first residency check already failed
        return
    state.status = "healthy"
    # how long the worker took to serve; phases: what `orcd serve` named before the app
    narr.event("ready", url=cfg.public_url, since_process_start_s=process_age(), phases=dict(cfg.startup_phases))
    if cfg.callback_url:
        _callback(state)


def _chat_template(state: ServerState):
    """The model's template, compiled once. A broken one fails only chat
    requests (with its error), not the worker."""
    from orcd.chat import ChatTemplate, TemplateError
    try:
        template = ChatTemplate.for_tokenizer(state.loaded.tokenizer, state.config.chat_template)
        template.guard(state.loaded.tokenizer)   # built now: it probes every control token
        return template
    except TemplateError as e:
        state.narrator.event("error", where="chat_template", message=e.message)
        return e


def _model_facts(state: ServerState) -> dict[str, Any]:
    lm = state.loaded
    backend = lm.backend
    return {"resident": True, "quant_kind": lm.quant_kind,
            "tokenizer_kind": getattr(lm.tokenizer, "kind", None),
            "vocab_size": lm.hp.n_vocab, "context_length": lm.n_ctx,
            "sm": getattr(backend, "sm", None),
            "cuda_runtime_version": getattr(backend, "cuda_runtime_version", None)}


def _refresh_device_state(state: ServerState) -> None:
    """On the inference thread between jobs: memory by purpose and, where the
    backend offers one, the residency check. /health reads only the cache."""
    _trim_heap()
    backend = state.loaded.backend
    usage = dict(backend.memory_usage() or {})
    state.metrics.set_memory(usage)
    state.health_cache["vram_bytes_used"] = int(sum(usage.values()))
    check = getattr(backend, "check_residency", None)
    now = time.monotonic()
    if check is None or now - state.last_residency_check < state.config.residency_interval_s:
        return
    state.last_residency_check = now
    if not check():
        state.metrics.residency_failures.inc()
        state.health_cache["resident"] = False
        state.status = "unhealthy"
        state.narrator.event("residency_check_failed")


def _mark_unhealthy(state: ServerState) -> None:
    """The GPU context is lost (InferenceThread._device_lost): /health answers 503 and
    every request is refused from now on, so that a supervisor restarts the worker."""
    state.status = "unhealthy"


def _load_libc():
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return lib if hasattr(lib, "malloc_trim") else None   # glibc only


_LIBC = _load_libc()


def _trim_heap() -> None:
    """Give freed heap back to the OS (glibc keeps it per thread arena: after a
    flood of large request bodies RSS would otherwise stay at its peak)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _callback(state: ServerState) -> None:
    cfg = state.config
    body = json.dumps({"worker_id": cfg.worker_id, "model": cfg.model_ref,
                       "vram_bytes": state.health_cache.get("vram_bytes_used", 0),
                       "url": cfg.public_url}).encode()
    req = urllib.request.Request(cfg.callback_url, data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            state.narrator.event("ready", callback_url=cfg.callback_url, callback_status=r.status)
    except Exception as e:  # the worker serves regardless; the operator sees why
        state.narrator.event("error", where="callback", callback_url=cfg.callback_url,
                             message=f"{type(e).__name__}: {e}")


def begin_shutdown(state: ServerState, reason: str) -> None:
    """Stop accepting; drain (on the event loop) and then ask to exit. Idempotent."""
    if state.shutdown_task is not None:
        return
    state.accepting = False
    state.narrator.event("shutdown", phase="begin", reason=reason,
                         running_job=state.inference.running_job_id if state.inference else None,
                         running=state.inference.running if state.inference else 0)
    state.shutdown_task = asyncio.get_running_loop().create_task(_drain(state))


async def _drain(state: ServerState) -> None:
    inference, deadline = state.inference, state.config.shutdown_deadline_s
    if inference is not None:
        inference.cancel_queued(ShutdownCancelled)   # only the running job may finish
        finished = await asyncio.to_thread(inference.wait_idle, deadline)
        if not finished:
            state.narrator.event("shutdown", phase="cancel", job_id=inference.running_job_id,
                                 deadline_s=deadline)
            inference.cancel_all(ShutdownCancelled)
            await asyncio.to_thread(inference.wait_idle, 5.0)
    await asyncio.sleep(0.05)   # let the last SSE frames go out before connections close
    state.request_exit()


def hurry_shutdown(state: ServerState) -> None:
    """A second signal: cancel every job now. Their streams still end with an
    error event (retriable: another worker can run them); then the drain exits."""
    inference = state.inference
    state.narrator.event("shutdown", phase="cancel", reason="second signal",
                         job_id=inference.running_job_id if inference else None)
    if inference is not None:
        inference.cancel_all(ShutdownCancelled)


def _free(state: ServerState) -> None:
    state.prep.shutdown(wait=False, cancel_futures=True)
    if state.inference is not None:
        state.inference.stop()
    if state.loaded is not None:
        state.loaded.close()
        state.loaded = state.engine = None
    state.narrator.event("shutdown", phase="done")
