"""One small error hierarchy carrying orcd's stable error codes.

The server maps each error to an HTTP status and an SSE ``error`` event; the
CLI maps it to a one-line message and exit code 1. Codes never change.
"""

from __future__ import annotations

from typing import Any


class OrcdError(Exception):
    """Base of every error a user may see. ``code`` is the stable error code."""

    code = "INTERNAL"
    http_status = 500
    retriable = False

    def __init__(self, message: str, *, field: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message,
                               "retriable": self.retriable}
        if self.field is not None:
            out["field"] = self.field
        return out


class InvalidRequest(OrcdError):
    code = "INVALID_REQUEST"
    http_status = 400


class ModelLoadFailed(OrcdError):
    code = "MODEL_LOAD_FAILED"
    http_status = 500


class InsufficientVram(OrcdError):
    code = "INSUFFICIENT_VRAM"
    http_status = 507


class VramOom(OrcdError):
    code = "VRAM_OOM"
    http_status = 507
    retriable = True


class CudaError(OrcdError):
    code = "CUDA_ERROR"
    http_status = 500


class InferenceTimeout(OrcdError):
    code = "INFERENCE_TIMEOUT"
    http_status = 504
    retriable = True


class Cancelled(OrcdError):
    code = "CANCELLED"
    http_status = 499


class InternalError(OrcdError):
    code = "INTERNAL"
    http_status = 500


#: CUDA errors after which the process's context is unusable: every later call fails
#: the same way ("the process must be terminated and relaunched", CUDA's documentation)
CONTEXT_LOST = frozenset({
    "CUDA_ERROR_ILLEGAL_ADDRESS", "CUDA_ERROR_MISALIGNED_ADDRESS", "CUDA_ERROR_INVALID_ADDRESS_SPACE",
    "CUDA_ERROR_INVALID_PC", "CUDA_ERROR_ILLEGAL_INSTRUCTION", "CUDA_ERROR_HARDWARE_STACK_ERROR",
    "CUDA_ERROR_LAUNCH_FAILED", "CUDA_ERROR_ASSERT", "CUDA_ERROR_LAUNCH_TIMEOUT",
    "CUDA_ERROR_ECC_UNCORRECTABLE"})


def device_lost(e: BaseException) -> bool:
    """Whether ``e`` left the GPU context unusable (a kernel faulted): not the request's
    fault, and nothing more will run on this device in this process."""
    return isinstance(e, CudaError) and e.details.get("cuda_error") in CONTEXT_LOST


def as_orcd_error(e: BaseException, doing: str = "inference") -> OrcdError:
    """``e`` as the error a client sees: an OrcdError as it is, anything else
    (a bug, a driver failure) as INTERNAL with its type and message on one line."""
    if isinstance(e, OrcdError):
        return e
    return InternalError(f"{doing} failed: {type(e).__name__}: {e}")


# -- the worker's admission errors (HTTP only; added for orcd serve) ---------

class Unavailable(OrcdError):
    """Loading, shutting down, or the job queue is full: try again later."""

    code = "UNAVAILABLE"
    http_status = 503
    retriable = True


class DuplicateJob(OrcdError):
    code = "DUPLICATE_JOB"
    http_status = 409


class Unauthorized(OrcdError):
    code = "UNAUTHORIZED"
    http_status = 401


# the stable codes: the eight of inference, then the worker's three of admission
ERROR_CODES = tuple(cls.code for cls in (
    InvalidRequest, ModelLoadFailed, InsufficientVram, VramOom, CudaError,
    InferenceTimeout, Cancelled, InternalError, Unavailable, DuplicateJob, Unauthorized))
