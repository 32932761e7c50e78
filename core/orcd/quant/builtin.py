"""The built-in plugin: ggml's float and quantized tensor types, numpy reference."""

from __future__ import annotations

from orcd import hookimpl
from orcd.quant import kquants, mxfp4, simple
from orcd.quant.format import QuantFormat

ORCD_PLUGIN_API = 1


@hookimpl
def orcd_quant_formats() -> list[QuantFormat]:
    return [*simple.FORMATS, *kquants.FORMATS, *mxfp4.FORMATS]
