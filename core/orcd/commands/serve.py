"""``orcd serve``: the HTTP worker for one model on one device.

Arguments are validated up front (UUID form, readable model file, port range
and availability, device present) so a bad invocation is one clear line and
exit code 1 (the CLI's rule, orcd.cli), never a traceback or a half-started
server. The model loads after HTTP is up; /health says "loading" meanwhile.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import uuid
from pathlib import Path

from orcd.commands._options import (UsageError, add_cuda_option_argument, add_device_argument,
                                    cuda_options, device_from_args)

NAME = "serve"
HELP = "serve one model over HTTP (/execute SSE, /health, /metrics, OpenAI-compatible /v1)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="PATH|NAME",
                   help="GGUF file or pulled model name (default: orcd pull's default, "
                        "qwen2.5-coder-0.5b)")
    p.add_argument("--worker-id", metavar="UUID", help="this worker's id (default: a new UUID4)")
    add_device_argument(p, gpu_device_alias=True)
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=int, default=8080, metavar="P", help="port, 1024-65535")
    p.add_argument("--ctx-size", type=int, metavar="N", help="context length (default: the model's)")
    p.add_argument("--max-tokens-out", type=int, default=None, metavar="N",
                   help="most tokens one request may generate; at most the context length "
                        "(default: the context length)")
    p.add_argument("--inference-timeout-sec", type=float, default=300.0, metavar="S",
                   help="a job running longer fails with INFERENCE_TIMEOUT")
    p.add_argument("--kv-cache-size-mb", type=int, metavar="N",
                   help="cap the KV cache; the context shrinks to what fits (default: no cap)")
    p.add_argument("--queue-size", type=int, default=16, metavar="N",
                   help="jobs that may wait beyond the running ones (default 16)")
    p.add_argument("--max-batch", type=int, default=16, metavar="N",
                   help="jobs decoded together, 1-256 (default 16); new ones join between "
                        "steps while the KV pool has room for their prompt + max_tokens; "
                        "1: one job at a time")
    p.add_argument("--callback-url", metavar="URL",
                   help="POST worker details here when ready (default: none)")
    p.add_argument("--api-key", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                        "(default: none; visible in ps: prefer ORCD_API_KEY or --api-key-file)")
    p.add_argument("--api-key-file", metavar="PATH",
                   help="read the API key from the first line of this file (default: none)")
    p.add_argument("--body-timeout-sec", type=float, default=30.0, metavar="S",
                   help="a request body must arrive within this (default 30; then 408)")
    p.add_argument("--header-timeout-sec", type=float, default=10.0, metavar="S",
                   help="a request's line and headers must arrive within this (default 10; "
                        "then 408 and the connection is closed)")
    p.add_argument("--max-connections", type=int, default=256, metavar="N",
                   help="HTTP requests in progress at once; more get 503 (default 256); as "
                        "many connections may be sending headers, beyond that the oldest "
                        "is closed")
    p.add_argument("--log-prompts", action="store_true", help="include prompts in the narration")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="a tokenizer.json to use instead of the GGUF vocabulary (default: the GGUF's)")
    p.add_argument("--residency-check-sec", type=float, default=60.0, metavar="S",
                   help="seconds between checks that every weight is still in device memory")
    p.add_argument("--served-model-name", metavar="NAME",
                   help="the model name /v1 lists and answers to; requests naming another "
                        "get 404 (default: --model as given)")
    p.add_argument("--chat-template", metavar="FILE",
                   help="a Jinja chat template to use instead of the model's (default: the GGUF's)")
    add_cuda_option_argument(p)


def validate(args) -> dict:
    """Checked arguments → the values the server needs. Raises UsageError."""
    worker_id = args.worker_id or str(uuid.uuid4())
    try:
        uuid.UUID(worker_id)
    except ValueError:
        raise UsageError(f"--worker-id {worker_id!r} is not a UUID "
                         f"(e.g. {uuid.uuid4()})") from None
    if not 1024 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is outside 1024-65535")
    _positive(args, "ctx_size", "--ctx-size", allow_none=True)
    _positive(args, "max_tokens_out", "--max-tokens-out", allow_none=True)
    _positive(args, "kv_cache_size_mb", "--kv-cache-size-mb", allow_none=True)
    if not args.inference_timeout_sec > 0:
        raise UsageError(f"--inference-timeout-sec must be positive, got {args.inference_timeout_sec}")
    if args.queue_size < 0:
        raise UsageError(f"--queue-size must be 0 or more, got {args.queue_size}")
    from orcd.scheduler import MAX_BATCH
    if not 1 <= args.max_batch <= MAX_BATCH:
        raise UsageError(f"--max-batch must be between 1 and {MAX_BATCH}, got {args.max_batch}")
    if not args.residency_check_sec > 0:
        raise UsageError(f"--residency-check-sec must be positive, got {args.residency_check_sec}")
    api_key = _api_key(args)
    if not args.body_timeout_sec > 0:
        raise UsageError(f"--body-timeout-sec must be positive, got {args.body_timeout_sec}")
    if not args.header_timeout_sec > 0:
        raise UsageError(f"--header-timeout-sec must be positive, got {args.header_timeout_sec}")
    if args.max_connections < 1:
        raise UsageError(f"--max-connections must be 1 or more, got {args.max_connections}")
    if args.callback_url is not None and not args.callback_url.startswith(("http://", "https://")):
        raise UsageError(f"--callback-url {args.callback_url!r} must be an http(s) URL")
    model_ref, model_path = _model(args.model)
    _max_tokens_within_context(args, model_path)
    if args.tokenizer is not None and not Path(args.tokenizer).is_file():
        raise UsageError(f"--tokenizer {args.tokenizer}: no such file")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise UsageError("--served-model-name must not be empty")
    chat_template = _chat_template(args.chat_template)
    device = device_from_args(args, "orcd serve")
    backend_options = cuda_options(args.cuda_option, device)
    _port_free(args.host, args.port)
    return {"worker_id": worker_id, "model_ref": model_ref, "model_path": str(model_path),
            "device": device, "api_key": api_key, "chat_template": chat_template,
            "backend_options": backend_options}


def _chat_template(path: str | None) -> str | None:
    """--chat-template FILE: its text, checked to compile (as vLLM refuses a bad one at start)."""
    if path is None:
        return None
    from orcd.chat import ChatTemplate, TemplateError
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--chat-template {path}: {e}") from None
    if not source.strip():
        raise UsageError(f"--chat-template {path}: the file is empty")
    try:
        ChatTemplate(source)
    except TemplateError as e:
        raise UsageError(f"--chat-template {path}: {e.message}") from None
    return source


def _api_key(args) -> str | None:
    """--api-key, else --api-key-file, else $ORCD_API_KEY (the last two keep the
    key out of the process list)."""
    if args.api_key is not None and args.api_key_file is not None:
        raise UsageError("give --api-key or --api-key-file, not both")
    if args.api_key_file is not None:
        try:
            with open(args.api_key_file, encoding="utf-8") as f:
                key = f.readline().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--api-key-file {args.api_key_file}: {e}") from None
        if not key:
            raise UsageError(f"--api-key-file {args.api_key_file}: the file holds no key")
        return key
    if args.api_key is not None:
        if not args.api_key.strip():
            raise UsageError("--api-key must not be empty")
        return args.api_key
    env = os.environ.get("ORCD_API_KEY")
    if env is not None and not env.strip():
        raise UsageError("ORCD_API_KEY is set but empty")
    return env.strip() if env else None


def _warn_if_exposed(host: str, api_key: str | None) -> None:
    from orcd.server.gate import is_loopback
    if api_key is None and not is_loopback(host):
        print(f"orcd serve: warning: listening on {host} without an API key: anyone who "
              f"can reach this address can run and stop jobs (set ORCD_API_KEY or "
              f"--api-key-file)", file=sys.stderr)


def _positive(args, attr: str, flag: str, allow_none: bool = False) -> None:
    v = getattr(args, attr)
    if v is None and allow_none:
        return
    if v is None or v <= 0:
        raise UsageError(f"{flag} must be a positive integer, got {v}")


def _model(name: str | None) -> tuple[str, Path]:
    from orcd.errors import OrcdError
    from orcd.pull import DEFAULT, resolve_model
    ref = name or DEFAULT
    try:
        path = resolve_model(ref)
    except OrcdError as e:
        raise UsageError(e.message) from None
    if path.is_dir():
        raise UsageError(f"--model {ref}: is a directory, not a GGUF file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"--model {ref}: {path} is not readable")
    model_ref = ref if name is None or not Path(ref).exists() else path.stem
    return model_ref, path


def _max_tokens_within_context(args, model_path: Path) -> None:
    """--max-tokens-out must leave room for a prompt in the context (--ctx-size,
    else the model's own context length, read from the GGUF header)."""
    if args.max_tokens_out is None:
        return
    ctx, where = args.ctx_size, "--ctx-size"
    if ctx is None:
        ctx, where = _model_context(model_path), "the model's context length"
    if ctx is not None and args.max_tokens_out >= ctx:
        raise UsageError(f"--max-tokens-out {args.max_tokens_out} leaves no room for a prompt "
                         f"in {where} {ctx}; use at most {ctx - 1}")


def _model_context(path: Path) -> int | None:
    from orcd.errors import OrcdError
    from orcd.gguf_file import ModelFile
    try:
        with ModelFile.open(path) as mf:
            return int(mf.metadata[f"{mf.arch}.context_length"])
    except (OrcdError, KeyError, TypeError, ValueError):
        return None  # a broken file fails the load later, with its own message


def _port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def run(args) -> int:
    from orcd.server.narration import Narrator, process_age

    # what passes before the load begins, named in `startup` (issue 15's start-up time)
    before, t0 = process_age(), time.monotonic()
    checked = validate(args)   # UsageError: one line and exit 1 (orcd.cli)
    config = _config(args, checked, phases={"process": before, "validate": round(time.monotonic() - t0, 3)})
    narrator = Narrator(worker_id=config.worker_id, model_ref=config.model_ref,
                        gpu_device=config.device, log_prompts=config.log_prompts)
    # the model loads on its own thread while the HTTP stack imports (~1 s on a GPU machine)
    from orcd.server.loading import Loading, narrate_startup
    narrate_startup(narrator, config)
    loading = Loading(config, narrator).start()
    t1 = time.monotonic()
    _warn_if_exposed(args.host, checked["api_key"])   # imports the server's gate: after the load began
    from orcd.server.process import serve
    config.startup_phases["server_imports"] = round(time.monotonic() - t1, 3)   # reported in `ready`
    return serve(config, host=args.host, port=args.port, narrator=narrator, loading=loading)


def _config(args, checked: dict, phases: dict):
    from orcd.server.config import ServerConfig
    url_host = f"[{args.host}]" if ":" in args.host else args.host
    return ServerConfig(
        model_path=checked["model_path"], model_ref=checked["model_ref"],
        worker_id=checked["worker_id"], device=checked["device"], ctx_size=args.ctx_size,
        max_tokens_out=args.max_tokens_out, inference_timeout_s=args.inference_timeout_sec,
        kv_cache_mb=args.kv_cache_size_mb, queue_size=args.queue_size, max_batch=args.max_batch,
        callback_url=args.callback_url, api_key=checked["api_key"], log_prompts=args.log_prompts,
        body_timeout_s=args.body_timeout_sec, header_timeout_s=args.header_timeout_sec,
        max_connections=args.max_connections,
        residency_interval_s=args.residency_check_sec, tokenizer_path=args.tokenizer,
        served_model_name=args.served_model_name, chat_template=checked["chat_template"],
        backend_options=checked["backend_options"], public_url=f"http://{url_host}:{args.port}",
        startup_phases=phases)
