"""orcd plugin: Llama-family decoders (GGUF arch ``llama``), e.g. SmolLM2.

Uses only orcd's public plugin API: ``orcd`` (hookimpl), ``orcd.arch``,
``orcd.weights``, ``orcd.errors``, ``orcd.ops.rope.RopeConfig`` and ``orcd.devkit.synth``.
"""

from orcd import hookimpl
from orcd.arch import ArchSpec

from orcd_llama import arch

ORCD_PLUGIN_API = 1


def _build(*args, **kwargs):
    from orcd_llama.model import build  # the forward is imported only when a model is built
    return build(*args, **kwargs)


def spec() -> ArchSpec:
    return ArchSpec(name="llama", hparams=arch.HPARAMS, tensors=arch.TENSORS,
                    build=_build, derive=arch.derive)


@hookimpl
def orcd_architectures():
    return [spec()]


@hookimpl
def orcd_synth_presets():
    from orcd_llama.synth import PRESETS
    return list(PRESETS)
