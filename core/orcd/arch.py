"""Architectures as data: hyper-parameter keys and a weight-name table.

An ``ArchSpec`` is the row a model plugin contributes through the
``orcd_architectures`` hook. The host reads hyper-parameters and checks the
file's tensors against the table before a single byte is uploaded; after the
model is built it checks that every tensor of the file was consumed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from orcd.errors import ModelLoadFailed

REQUIRED = object()  # marker: the key must be present in the GGUF metadata


class HParams(dict):
    """Hyper-parameters by name; attribute access for readable forwards."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no hyper-parameter {name!r}") from None


@dataclass(frozen=True)
class HParam:
    """One hyper-parameter: ``key`` is the GGUF key with ``{arch}`` substituted."""

    name: str
    key: str
    default: Any = REQUIRED
    cast: Callable[[Any], Any] = int


@dataclass(frozen=True)
class TensorSpec:
    """One weight. ``name`` contains ``{i}`` for per-layer tensors; ``shape``
    maps hyper-parameters to the numpy shape (last axis contiguous, i.e. GGUF's
    ne reversed: a linear weight is ``(n_out, n_in)``)."""

    name: str
    shape: Callable[[HParams], tuple[int, ...]]
    optional: bool = False

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.name

    def names(self, n_layer: int) -> list[str]:
        if self.per_layer:
            return [self.name.format(i=i) for i in range(n_layer)]
        return [self.name]


@dataclass(frozen=True)
class ArchSpec:
    """An architecture row.

    ``derive(hp)`` returns extra hyper-parameters computed from the read ones
    (e.g. ``head_dim``); ``build(hp, weights, backend)`` returns the model.
    ``n_layer`` must be one of the hyper-parameters.
    """

    name: str
    hparams: tuple[HParam, ...]
    tensors: tuple[TensorSpec, ...]
    build: Callable[..., Any]
    derive: Callable[[HParams], Mapping[str, Any]] | None = None
    plugin: str = field(default="", compare=False)

    def read_hparams(self, metadata: Mapping[str, Any], n_vocab: int,
                     source: str = "model") -> HParams:
        """Read every hyper-parameter from GGUF ``metadata``; a missing
        required key or an unconvertible value is MODEL_LOAD_FAILED.
        ``n_vocab`` (from the vocabulary) is always provided as ``hp.n_vocab``."""
        hp = HParams(n_vocab=int(n_vocab))
        for p in self.hparams:
            key = p.key.format(arch=self.name)
            if key in metadata:
                try:
                    hp[p.name] = p.cast(metadata[key])
                except (TypeError, ValueError) as e:
                    raise ModelLoadFailed(f"{source}: metadata key {key!r} has a bad value "
                                          f"{metadata[key]!r}: {e}") from None
            elif p.default is REQUIRED:
                raise ModelLoadFailed(f"{source}: required metadata key {key!r} is missing "
                                      f"for architecture {self.name!r}")
            else:
                hp[p.name] = p.default
        if self.derive is not None:
            hp.update(self.derive(hp))
        return hp

    def expected_tensors(self, hp: HParams) -> dict[str, tuple[tuple[int, ...], bool]]:
        """Every tensor name the table allows -> (numpy shape, optional)."""
        out: dict[str, tuple[tuple[int, ...], bool]] = {}
        for spec in self.tensors:
            shape = tuple(int(d) for d in spec.shape(hp))
            for name in spec.names(hp.n_layer):
                out[name] = (shape, spec.optional)
        return out

    def check_tensors(self, present: Mapping[str, tuple[int, ...]], hp: HParams,
                      source: str = "model") -> None:
        """Refuse a file whose tensors (name -> numpy shape) do not match the
        table: missing required ones, unknown ones, or wrong shapes."""
        expected = self.expected_tensors(hp)
        missing = [n for n, (_, opt) in expected.items() if not opt and n not in present]
        unknown = [n for n in present if n not in expected]
        wrong = [f"{n}: file {tuple(present[n])}, expected {expected[n][0]}"
                 for n in present if n in expected and tuple(present[n]) != expected[n][0]]
        problems = []
        if missing:
            problems.append(f"missing tensors {_few(missing)}")
        if unknown:
            problems.append(f"unknown tensors {_few(unknown)}")
        if wrong:
            problems.append(f"mis-shaped tensors {_few(wrong)}")
        if problems:
            raise ModelLoadFailed(f"{source}: does not match architecture {self.name!r}: "
                                  + "; ".join(problems))


def _few(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")
