"""The worker's configuration, as ``orcd serve`` checked it.

A module of its own, with nothing heavy imported, so that ``orcd serve`` can make it and
start loading the model before the HTTP stack is imported (server/loading.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ServerConfig:
    model_path: str
    model_ref: str                      # the name the operator gave (reported as "model")
    worker_id: str
    device: str = "cpu"                 # "cpu" or "cuda:N"
    ctx_size: int | None = None
    max_tokens_out: int | None = None   # most tokens a request may generate; None: the context
    inference_timeout_s: float = 300.0
    kv_cache_mb: int | None = None
    queue_size: int = 16                # jobs that may wait beyond the running ones
    max_batch: int = 16                 # jobs decoded together (1: one at a time, Engine.generate)
    callback_url: str | None = None
    api_key: str | None = None
    log_prompts: bool = False
    shutdown_deadline_s: float = 5.0
    max_body_bytes: int = 1 << 20
    tokenizer_path: str | None = None   # an explicit tokenizer.json (wins over the GGUF vocab)
    residency_interval_s: float = 60.0  # between checks that weights are still device memory
    public_url: str | None = None       # where this worker is reachable (for the callback)
    bind_host: str = "127.0.0.1"        # on loopback, only loopback Host names are answered
    body_timeout_s: float = 30.0        # the whole request body must arrive within this
    header_timeout_s: float = 10.0      # the request line and headers must arrive within this
    max_connections: int = 256          # HTTP requests in progress at once (beyond: 503)
    served_model_name: str | None = None   # the /v1 name (default: model_ref), vLLM's flag
    chat_template: str | None = None    # a template's source replacing the GGUF's
    sse_keepalive_s: float = 15.0       # a quiet stream gets an SSE comment this often
    backend_options: dict = field(default_factory=dict)   # CudaBackend tuning (--cuda-option)
    startup_phases: dict = field(default_factory=dict)    # orcd serve's seconds: before the load, its imports

    @property
    def health_device(self) -> str:
        return "cpu-reference" if self.device == "cpu" else self.device

    @property
    def served_names(self) -> list[str]:
        return [self.served_model_name or self.model_ref]
