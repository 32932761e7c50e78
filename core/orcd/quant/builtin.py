"""The built-in plugin: ggml's float and quantized tensor types, numpy reference
and device structs."""

from __future__ import annotations

from orcd import hookimpl
from orcd.quant import kquants, mxfp4, simple
from orcd.quant.format import FormatTable, QuantFormat

ORCD_PLUGIN_API = 1

FORMATS: tuple[QuantFormat, ...] = (*simple.FORMATS, *kquants.FORMATS, *mxfp4.FORMATS)


def builtin_table() -> FormatTable:
    """The built-in rows alone (kernel families default to them; a worker uses its
    plugin host's table, which may hold more)."""
    return FormatTable(FORMATS)


@hookimpl
def orcd_quant_formats() -> list[QuantFormat]:
    return list(FORMATS)
