"""Checked calls into the CUDA driver and NVRTC.

cuda-python returns ``(result, *values)`` tuples instead of raising. ``cu`` and
``rtc`` call a function by name, raise ``CudaError`` (stable code CUDA_ERROR)
carrying the error name and the call when the result is not success, and
return the values: nothing, one value, or a tuple.
"""

from __future__ import annotations

from typing import Any

from orcd.errors import CudaError

OUT_OF_MEMORY = "CUDA_ERROR_OUT_OF_MEMORY"
INSTALL_HINT = "the CUDA backend needs cuda-python: pip install 'orcd[cuda]'"


def error_name(code: Any) -> str:
    """``CUDA_ERROR_OUT_OF_MEMORY`` for an enum member; ``str`` otherwise."""
    return getattr(code, "name", None) or str(code)


def check(result: Any, call: str, success: Any) -> Any:
    """Unpack a cuda-python result tuple; raise ``CudaError`` unless it succeeded."""
    if not isinstance(result, tuple):
        result = (result,)
    code, values = result[0], result[1:]
    if code != success:
        name = error_name(code)
        raise CudaError(f"{call} failed: {name}", cuda_error=name, call=call)
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def driver_module():
    try:
        from cuda.bindings import driver
    except ImportError:
        raise CudaError(INSTALL_HINT, cuda_error="IMPORT", call="import cuda.bindings.driver") from None
    return driver


def nvrtc_module():
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        raise CudaError(INSTALL_HINT, cuda_error="IMPORT", call="import cuda.bindings.nvrtc") from None
    return nvrtc


def cu(name: str, *args: Any) -> Any:
    """Call ``cuda.bindings.driver.<name>(*args)`` and check its result."""
    drv = driver_module()
    return check(getattr(drv, name)(*args), name, drv.CUresult.CUDA_SUCCESS)


def rtc(name: str, *args: Any) -> Any:
    """Call ``cuda.bindings.nvrtc.<name>(*args)`` and check its result."""
    nv = nvrtc_module()
    return check(getattr(nv, name)(*args), name, nv.nvrtcResult.NVRTC_SUCCESS)


def is_oom(err: CudaError) -> bool:
    return err.details.get("cuda_error") == OUT_OF_MEMORY


def init() -> None:
    """``cuInit(0)``: idempotent, cheap after the first call."""
    cu("cuInit", 0)
