"""orcd plugin: GPT-OSS (arch gpt-oss)."""

from orcd import hookimpl
from orcd.arch import ArchSpec

from orcd_gpt_oss import arch

ORCD_PLUGIN_API = 1


def _build(*args, **kwargs):
    from orcd_gpt_oss.model import build  # the forward is imported only when a model is built
    return build(*args, **kwargs)


@hookimpl
def orcd_architectures():
    return [ArchSpec(name="gpt-oss", hparams=arch.HPARAMS, tensors=arch.TENSORS,
                     build=_build, derive=arch.derive)]


@hookimpl
def orcd_synth_presets():
    from orcd_gpt_oss.synth import PRESETS
    return list(PRESETS)


@hookimpl
def orcd_output_parser(arch, tokenizer):
    if arch != "gpt-oss":
        return None
    from orcd_gpt_oss.harmony import parser_factory
    return parser_factory(tokenizer)
