"""orcd plugin: Qwen2 / Qwen2.5 (arch qwen2)."""

from orcd import hookimpl
from orcd.arch import ArchSpec

from orcd_qwen import arch

ORCD_PLUGIN_API = 1


def _build(*args, **kwargs):
    from orcd_qwen.model import build  # the forward is imported only when a model is built
    return build(*args, **kwargs)


@hookimpl
def orcd_architectures():
    return [ArchSpec(name="qwen2", hparams=arch.HPARAMS, tensors=arch.TENSORS,
                     build=_build, derive=arch.derive)]


@hookimpl
def orcd_synth_presets():
    from orcd_qwen.synth import PRESETS
    return list(PRESETS)


@hookimpl
def orcd_output_parser(arch, tokenizer):
    if arch != "qwen2":
        return None
    from orcd_qwen.tools import parser_factory
    return parser_factory(tokenizer)
