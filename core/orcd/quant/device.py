"""The CUDA side of the format table: the dispatch header the kernels include,
generated from the rows.

Kernels that read weights (ops/matmul.cu, ops/fused.cu) never name a format.
They include ``formats.cuh``, which this module writes from the table: every
format's device header, then two X-macros listing ``X(suffix, Struct, type_id)``
for every format with device code (``ORCD_FORMATS``), for those with int8
activation support (``ORCD_INT8_FORMATS``) and for those the int8 tensor cores
take (``ORCD_MMA_FORMATS``). matmul.cu instantiates its kernels
per entry; fused.cu turns the list into a switch on the type id. A format a
plugin adds is one more entry: its header travels to NVRTC in memory with the
rest, and the cubin cache key (orcd.backends.cuda.nvrtc) hashes all of it.
"""

from __future__ import annotations

from importlib import resources
from typing import Iterable

from orcd.quant.format import QuantFormat

HEADER = "formats.cuh"
BASE = ("orcd.quant", "base.cuh")   # what every weight kernel includes, formats or not


def with_device(formats: Iterable[QuantFormat]) -> list[QuantFormat]:
    """The rows that have device code, by type id."""
    return sorted((f for f in formats if f.device is not None), key=lambda f: f.type_id)


def header_texts(formats: Iterable[QuantFormat]) -> dict[str, str]:
    """Include name -> text of every device header the formats need."""
    out: dict[str, str] = {}
    for f in with_device(formats):
        for package, name in f.device.headers:
            if name not in out:
                out[name] = (resources.files(package) / name).read_text()
    return out


def formats_header(formats: Iterable[QuantFormat]) -> str:
    rows = with_device(formats)
    includes = []
    for f in rows:
        for _, name in f.device.headers:
            if name not in includes:
                includes.append(name)

    def xs(fs):
        return " ".join(f"X({f.device.suffix}, {f.device.struct}, {f.type_id})" for f in fs) or " "

    lines = ["// Generated from orcd's format table (orcd.quant.device): do not edit.",
             "#pragma once",
             *(f'#include "{name}"' for name in includes),
             "// X(kernel-name suffix, device struct, GGML type id)",
             f"#define ORCD_FORMATS(X) {xs(rows)}",
             f"#define ORCD_INT8_FORMATS(X) {xs(f for f in rows if f.device.int8)}",
             f"#define ORCD_MMA_FORMATS(X) {xs(f for f in rows if f.device.mma)}",
             ""]
    return "\n".join(lines)


def kernel_source(package: str, name: str, formats: Iterable[QuantFormat]):
    """The KernelSource of ``name`` (package data of ``package``) with the generated
    ``formats.cuh``, every device header of ``formats`` and the headers of ``package``
    that ``name`` includes."""
    from orcd.backends.cuda.nvrtc import KernelSource, package_headers

    formats = list(formats)
    text = (resources.files(package) / name).read_text()
    base = {BASE[1]: (resources.files(BASE[0]) / BASE[1]).read_text()}
    own = package_headers(package, [text])
    headers = {**base, **header_texts(formats), HEADER: formats_header(formats), **own}
    return KernelSource(name, text, headers)
