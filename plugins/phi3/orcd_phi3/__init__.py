"""orcd plugin: Phi-3 (arch phi3)."""

from orcd import hookimpl
from orcd.arch import ArchSpec

from orcd_phi3 import arch

ORCD_PLUGIN_API = 1


def _build(*args, **kwargs):
    from orcd_phi3.model import build  # the forward is imported only when a model is built
    return build(*args, **kwargs)


@hookimpl
def orcd_architectures():
    return [ArchSpec(name="phi3", hparams=arch.HPARAMS, tensors=arch.TENSORS,
                     build=_build, derive=arch.derive)]


@hookimpl
def orcd_synth_presets():
    from orcd_phi3.synth import PRESETS
    return list(PRESETS)
