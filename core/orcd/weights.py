"""Weights handed to a model builder, with a record of what it consumed.

The host refuses a file whose tensors the model did not all take: a tensor the
model ignores is a sign the file is not what the plugin believes it is.
"""

from __future__ import annotations

from typing import Any, Mapping

from orcd.errors import ModelLoadFailed


class Weights:
    def __init__(self, tensors: Mapping[str, Any], prefix: str = "",
                 taken: set[str] | None = None) -> None:
        self._tensors = tensors
        self._prefix = prefix
        self._taken = taken if taken is not None else set()

    def take(self, name: str) -> Any:
        """The weight ``prefix + name``; a missing one is MODEL_LOAD_FAILED."""
        full = self._prefix + name
        if full not in self._tensors:
            raise ModelLoadFailed(f"model needs tensor {full!r}, which the file lacks")
        self._taken.add(full)
        return self._tensors[full]

    def take_optional(self, name: str) -> Any | None:
        full = self._prefix + name
        return self.take(name) if full in self._tensors else None

    def layer(self, i: int) -> "Weights":
        """The same store seen from ``blk.{i}.``."""
        return Weights(self._tensors, f"{self._prefix}blk.{i}.", self._taken)

    def unconsumed(self) -> list[str]:
        return sorted(set(self._tensors) - self._taken)
