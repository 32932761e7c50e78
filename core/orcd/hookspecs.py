"""The hooks a plugin may implement.

A plugin is a module (or object) registered with the host, found through the
``orcd`` entry-point group or listed among the built-ins. It declares the plugin
API major version it targets as ``ORCD_PLUGIN_API = 1``; the host refuses any
other. Implement hooks with ``@orcd.hookimpl``. Importing a plugin must never
touch CUDA: kernels are compiled only when a CUDA backend asks for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

    from orcd.arch import ArchSpec
    from orcd.gguf_file import ModelFile
    from orcd.quant import QuantFormat
    from orcd.tokenizer import Tokenizer

PROJECT = "orcd"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def orcd_architectures() -> list[ArchSpec]:
    """Return the architectures this plugin serves.

    Each ``ArchSpec.name`` is a value of the GGUF key ``general.architecture``
    (e.g. ``"qwen2"``). Called once when the host starts. Two plugins returning
    the same name is an error naming both plugins.
    """


@hookspec
def orcd_quant_formats() -> list[QuantFormat]:
    """Return the GGML tensor types this plugin implements.

    Each ``QuantFormat`` carries the GGML type id, block layout and the numpy
    reference dequantizer. Called once when the host starts. Two plugins
    returning the same type id is an error naming both plugins.
    """


@hookspec(firstresult=True)
def orcd_tokenizer(model: ModelFile, tokenizer_path: Path | None) -> Tokenizer | None:
    """Build the tokenizer for ``model``, or return None if this plugin
    cannot.

    ``tokenizer_path`` is an explicit ``tokenizer.json`` (from
    ``--tokenizer`` or found beside the model file); a plugin that handles it
    must prefer it over the GGUF vocabulary. The first non-None result wins.
    Raise ``ModelLoadFailed`` for a vocabulary this plugin recognises but
    finds broken. Called on a thread of its own while the weights upload: read
    ``model``'s metadata and files only (no backend, no process-wide state).
    """


@hookspec(firstresult=True)
def orcd_output_parser(arch: str, tokenizer: Tokenizer) -> Any | None:
    """Return a factory of streaming output parsers for architecture ``arch``,
    or None.

    ``tokenizer`` is the loaded model's tokenizer (e.g. to look up the ids of
    special tokens the parser watches for). A parser turns generated text into
    (channel, text) pieces, e.g. GPT-OSS's harmony format into
    ``reasoning_content`` and ``content``. It is called
    with each new text piece via ``feed(text) -> list[tuple[str, str]]`` and
    ``finish() -> list[tuple[str, str]]``; channel is ``"content"`` or
    ``"reasoning"``, or ``"tool_call"`` with an ``orcd.toolcalls.ToolCall`` as
    the payload (the server shows its ``raw`` text when the request has no
    tools). The factory may offer ``call_grammar(tools, name, tokenizer)``, a
    Lark grammar forcing a call (``tool_choice`` "required" or named).
    Malformed input must degrade to plain content, never raise.
    The first non-None result wins; without one, output is plain content.
    """


@hookspec
def orcd_synth_presets() -> list[Any]:
    """Return ``orcd.devkit.synth.SynthPreset`` rows this plugin offers to
    ``orcd synth``: shape-accurate synthetic models of its architectures.

    Two plugins returning the same preset name is an error naming both.
    """
