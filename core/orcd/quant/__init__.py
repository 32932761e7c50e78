"""Quantization formats as data: one ``QuantFormat`` row per GGML type.

A row says how big a block is and carries the numpy reference dequantizer (and
quantizer where one exists). CUDA device functions for a format live next to
its reference in the same family module.
"""

from orcd.quant.format import QuantFormat, FormatTable

__all__ = ["QuantFormat", "FormatTable"]
