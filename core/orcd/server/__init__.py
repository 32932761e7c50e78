"""The HTTP worker behind ``orcd serve``.

    app.py             FastAPI app factory: /execute, /cancel, /health, /metrics, /shutdown
    openai_api.py      /v1/models, /v1/completions, /v1/chat/completions
    openai_request.py  an OpenAI request's options checked against the model (grammar, extras)
    openai_format.py   engine output in OpenAI's shapes (messages, tool calls, logprobs)
    openai_choices.py  OpenAI's n: one job per choice, merged into one response or stream
    state.py           what the endpoints share: config, loaded model, worker, request -> job
    inference.py       the inference thread (InferenceThread) and its bounded queue of jobs
    schemas.py         request models (pydantic)
    http.py            bounded body reads, error bodies in each API's shape
    gate.py            the middleware every request passes first (Host, Origin, key, limits)
    jobstream.py       a job's events from the inference thread to the loop (one wakeup a step)
    sse.py             server-sent events with disconnect detection
    streaming.py       a stream's waiting events as one write; keep-alive comments when quiet
    metrics.py         Prometheus metrics on a per-app registry
    narration.py       one JSON line per lifecycle event on stderr
    protocol.py        connections that never finish their headers
    process.py         the worker process: uvicorn with orcd's shutdown semantics
"""
