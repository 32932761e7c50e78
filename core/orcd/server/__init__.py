"""The HTTP worker behind ``orcd serve``.

    app.py        FastAPI app factory: /execute, /cancel, /health, /metrics, /shutdown
    openai_api.py /v1/models, /v1/completions, /v1/chat/completions
    worker.py     the single inference thread and its bounded FIFO
    schemas.py    request models (pydantic)
    sse.py        server-sent events with disconnect detection
    metrics.py    Prometheus metrics on a per-app registry
    narration.py  one JSON line per lifecycle event on stderr
"""
