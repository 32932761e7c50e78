"""What the subcommands share: the one device flag, its check, and UsageError.

Every subcommand that runs a model takes ``--device cuda:N|cpu`` (default
``cuda:0``). A GPU device is checked before anything loads, so a machine
without a usable GPU gets one line that says to use ``--device cpu``, never a
traceback from deep inside the driver bindings.
"""

from __future__ import annotations

import argparse
import re
import sys

DEFAULT_DEVICE = "cuda:0"
DEVICE_HELP = ("cuda:N for GPU N, or cpu for the numpy reference backend "
               "(slow; for machines without a GPU)")


class UsageError(Exception):
    """A bad argument or an unusable device: one line on stderr, exit code 1."""


def parse_device(text: str) -> str:
    """``cpu``, ``cuda`` (GPU 0) or ``cuda:N`` → its canonical spelling (argparse type)."""
    t = text.strip().lower()
    if t == "cpu":
        return "cpu"
    if t == "cuda":
        return DEFAULT_DEVICE
    m = re.fullmatch(r"cuda:(\d+)", t)
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not cpu, cuda or cuda:N")
    return f"cuda:{int(m.group(1))}"


def add_device_argument(p: argparse.ArgumentParser, *, gpu_device_alias: bool = False) -> None:
    """``--device`` (and, for ``serve``, the deprecated ``--gpu-device N``)."""
    group = p.add_mutually_exclusive_group() if gpu_device_alias else p
    group.add_argument("--device", type=parse_device, default=None, metavar="cuda:N|cpu",
                       help=f"{DEVICE_HELP} (default: {DEFAULT_DEVICE})")
    if gpu_device_alias:
        group.add_argument("--gpu-device", type=int, default=None, metavar="N",
                           help="deprecated alias of --device cuda:N (default: unset)")


def device_from_args(args: argparse.Namespace, prog: str = "orcd") -> str:
    """The device the arguments ask for, checked: a GPU must be usable."""
    device = getattr(args, "device", None)
    alias = getattr(args, "gpu_device", None)
    if alias is not None:
        if alias < 0:
            raise UsageError(f"--gpu-device must be 0 or more, got {alias}")
        print(f"{prog}: warning: --gpu-device is deprecated; use --device cuda:{alias}",
              file=sys.stderr)
        device = f"cuda:{alias}"
    return check_device(device or DEFAULT_DEVICE)


def check_device(device: str) -> str:
    """``device`` if it can run here; else UsageError saying what to do instead."""
    if device == "cpu":
        return device
    index = int(device.split(":")[1])
    try:
        from orcd.backends.cuda.device import device_info
        device_info(index)
    except Exception as e:  # noqa: BLE001 - no bindings, no driver library, no device: one line
        reason = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
        raise UsageError(f"--device {device}: no usable NVIDIA GPU ({reason.rstrip('.')}); "
                         f"use --device cpu for the numpy reference backend") from None
    return device


#: the CUDA backend's tuning options ``--cuda-option NAME=VALUE`` sets, and what each takes
#: (the defaults are the measured ones; the others are there to be measured against them)
CUDA_OPTIONS = {
    "prefill_graphs": ("on", "off"),     # a request's prompt chunks replayed from CUDA graphs
    "moe_tc": ("on", "off"),             # a prompt's grouped experts on the tensor cores
    "gemm": ("cublaslt", "nvmath", "simt"),   # the prompt's GEMM on fp16 copies of the weights
    "int8": ("auto", "off", "all"),      # int8 activations in the decode GEMVs
    "pipelined_steps": ("on", "off"),    # batch step k+1 queued before step k's ids reach the host
    "fold_prompts": ("off", "on"),       # on: prompt chunks ride in the decode batch, not prefill graphs
    "prompt_step": ("256", "512", "1024", "2048"),   # prompt tokens a batch step may run in all
    "mma": ("off", "on"),                # on: a decode batch's GEMVs on the int8 tensor cores
    "pdl": ("on", "off"),                # on: kernels start while the one before them finishes (sm_90+)
    "self_quantize": ("off", "on"),      # on: one token's int8 GEMVs norm and quantize their own input
    "prompt_gemv": ("32", "16", "8"),    # prompt chunks of up to N rows through the int8 GEMVs, not the GEMM
}


def _cuda_option_names() -> str:
    return ", ".join(f"{k}={'|'.join(v)}" for k, v in CUDA_OPTIONS.items())


def add_cuda_option_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cuda-option", action="append", default=[], metavar="NAME=VALUE",
                   help=f"a CUDA backend tuning option, repeatable, for measuring: {_cuda_option_names()} "
                        f"(default: none, the measured defaults)")


def cuda_options_of(ap: argparse.ArgumentParser, pairs: list[str], device: str = "cuda:0") -> dict:
    """``cuda_options`` of a script's NAME=VALUE pairs; a bad one is the parser's usage
    error (exit 2)."""
    try:
        return cuda_options(pairs, device)
    except UsageError as e:
        ap.error(str(e))


def cuda_options(pairs: list[str], device: str) -> dict:
    """--cuda-option NAME=VALUE pairs -> the CudaBackend keyword arguments. Raises UsageError."""
    out: dict = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in CUDA_OPTIONS or value not in CUDA_OPTIONS[name]:
            raise UsageError(f"--cuda-option {pair!r}: expected one of {_cuda_option_names()}")
        switch = set(CUDA_OPTIONS[name]) == {"on", "off"}   # a switch is a bool; int8=off is a mode
        out[name] = {"on": True, "off": False}[value] if switch else value
    if out and not device.startswith("cuda"):
        raise UsageError(f"--cuda-option needs a cuda device, not --device {device}")
    return out

