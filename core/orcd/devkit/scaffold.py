"""``orcd new-plugin NAME``: a working model-plugin skeleton.

The skeleton is a complete distribution ``orcd-plugin-NAME`` (module
``orcd_NAME``, arch ``NAME``): a llama-style weight table, a forward against
the shared ops, a tiny synth preset, and tests that run ``orcd.devkit.testing`` on
it. It passes its own tests as generated; the author then edits the table and
the forward into their architecture.
"""

from __future__ import annotations

import re
from pathlib import Path

from orcd import PLUGIN_API_VERSION, __version__
from orcd.errors import InvalidRequest

NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")

PYPROJECT = '''\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "orcd-plugin-{dist}"
version = "0.1.0"
description = "orcd model plugin: {arch}"
readme = "README.md"
requires-python = ">=3.10"
# the tokenizer plugin every GGUF model (and orcd.devkit.testing) needs
dependencies = ["orcd>={orcd_version}", "orcd-plugin-tokenizers>=0.1"]

[project.optional-dependencies]
test = ["pytest"]

[project.entry-points.orcd]
{name} = "{module}"

[tool.setuptools]
packages = ["{module}"]
'''

INIT = '''\
"""orcd plugin: the {arch} architecture."""

from orcd import hookimpl
from orcd.arch import ArchSpec

from {module} import arch

ORCD_PLUGIN_API = {api}


def _build(*args, **kwargs):
    from {module}.model import build  # the forward is imported only when a model is built
    return build(*args, **kwargs)


def spec() -> ArchSpec:
    return ArchSpec(name="{arch}", hparams=arch.HPARAMS, tensors=arch.TENSORS,
                    build=_build, derive=arch.derive)


@hookimpl
def orcd_architectures():
    return [spec()]


@hookimpl
def orcd_synth_presets():
    from {module}.synth import PRESETS
    return list(PRESETS)
'''

ARCH = '''\
"""The {arch} hyper-parameters and weight table: GGUF keys and tensor names
as llama.cpp writes them; shapes are numpy's (a linear weight is (n_out, n_in))."""

from orcd.arch import HParam, HParams, TensorSpec

HPARAMS = (
    HParam("n_ctx_train", "{{arch}}.context_length"),
    HParam("n_embd", "{{arch}}.embedding_length"),
    HParam("n_layer", "{{arch}}.block_count"),
    HParam("n_ff", "{{arch}}.feed_forward_length"),
    HParam("n_head", "{{arch}}.attention.head_count"),
    HParam("n_head_kv", "{{arch}}.attention.head_count_kv", None),
    HParam("rope_base", "{{arch}}.rope.freq_base", 10000.0, float),
    HParam("norm_eps", "{{arch}}.attention.layer_norm_rms_epsilon", 1e-5, float),
)


def derive(hp: HParams) -> dict:
    n_head_kv = hp.n_head_kv if hp.n_head_kv is not None else hp.n_head
    head_dim = hp.n_embd // hp.n_head
    return {{"n_head_kv": n_head_kv, "head_dim": head_dim}}


TENSORS = (
    TensorSpec("token_embd.weight", lambda hp: (hp.n_vocab, hp.n_embd)),
    TensorSpec("output_norm.weight", lambda hp: (hp.n_embd,)),
    TensorSpec("output.weight", lambda hp: (hp.n_vocab, hp.n_embd), optional=True),  # else tied
    TensorSpec("blk.{{i}}.attn_norm.weight", lambda hp: (hp.n_embd,)),
    TensorSpec("blk.{{i}}.attn_q.weight", lambda hp: (hp.n_head * hp.head_dim, hp.n_embd)),
    TensorSpec("blk.{{i}}.attn_k.weight", lambda hp: (hp.n_head_kv * hp.head_dim, hp.n_embd)),
    TensorSpec("blk.{{i}}.attn_v.weight", lambda hp: (hp.n_head_kv * hp.head_dim, hp.n_embd)),
    TensorSpec("blk.{{i}}.attn_output.weight", lambda hp: (hp.n_embd, hp.n_head * hp.head_dim)),
    TensorSpec("blk.{{i}}.ffn_norm.weight", lambda hp: (hp.n_embd,)),
    TensorSpec("blk.{{i}}.ffn_gate.weight", lambda hp: (hp.n_ff, hp.n_embd)),
    TensorSpec("blk.{{i}}.ffn_up.weight", lambda hp: (hp.n_ff, hp.n_embd)),
    TensorSpec("blk.{{i}}.ffn_down.weight", lambda hp: (hp.n_embd, hp.n_ff)),
)
'''

MODEL = '''\
"""The {arch} forward: the shared decoder blocks (orcd.blocks) with this
architecture's weight table. They run on the numpy reference (--device cpu) and on
CUDA alike, with the fused decode kernels the built-in models use. A model they do
not fit writes its own ``forward(ops, ids, pos, cache, last_only)`` against the
shared ops (docs/plugins.md, "The op set")."""

from __future__ import annotations

from orcd.arch import HParams
from orcd.blocks import Attention, Decoder, Ffn, Layer
from orcd.ops.rope import RopeConfig
from orcd.weights import Weights


def build(hp: HParams, weights: Weights, backend) -> Decoder:
    layers = [Layer(Attention.take(L), Ffn.take(L)) for L in (weights.layer(i) for i in range(hp.n_layer))]
    rope = RopeConfig(n_rot=hp.head_dim, head_dim=hp.head_dim, base=hp.rope_base, neox=True)
    return Decoder(hp, weights, layers, rope)
'''

SYNTH = '''\
"""A tiny synthetic {arch} model for ``orcd synth`` and the tests."""

from orcd.devkit.synth import F32, Q8_0, SynthPreset
from orcd.devkit.testing import tiny_vocab


def _tensor_type(name: str, shape: tuple[int, ...]) -> int:
    return F32 if len(shape) == 1 else Q8_0


PRESETS = (
    SynthPreset(
        name="{arch}-tiny", arch="{arch}", description="tiny {arch} for tests",
        metadata={{
            "{arch}.block_count": 2, "{arch}.context_length": 256,
            "{arch}.embedding_length": 64, "{arch}.feed_forward_length": 128,
            "{arch}.attention.head_count": 4, "{arch}.attention.head_count_kv": 2,
            "{arch}.rope.freq_base": 10000.0, "{arch}.attention.layer_norm_rms_epsilon": 1e-5,
        }},
        tensor_type=_tensor_type, vocab=tiny_vocab(320)),
)
'''

TEST = '''\
"""The plugin's own tests, through orcd's plugin test kit (orcd.devkit.testing)."""

from pathlib import Path

from orcd.devkit import testing

import {module}


def test_hooks_register():
    host = testing.check_hooks({module})
    assert host.architecture("{arch}").name == "{arch}"


def test_only_public_orcd_api():
    assert testing.private_imports(Path({module}.__file__).parent) == []


def test_tiny_model_end_to_end(tmp_path):
    report = testing.check_plugin({module}, "{arch}-tiny", tmp_path)
    assert report.model.cpu.shape[1] == 320
    if report.cuda is not None:  # on a GPU machine: the CUDA path agrees with the reference
        assert report.cuda_rel_err < 2e-2
'''

README = '''\
# orcd-plugin-{dist}

An orcd model plugin for the `{arch}` architecture, generated by `orcd new-plugin`.

    pip install -e . && pytest tests

Edit `{module}/arch.py` (hyper-parameters and weight table) and `{module}/model.py` (the
forward) into your architecture; see orcd's docs/plugins.md.
'''


def render(name: str) -> dict[str, str]:
    """Relative path -> file text for plugin ``name``."""
    if not NAME_RE.match(name):
        raise InvalidRequest(f"plugin name {name!r} must be lowercase letters, digits and "
                             f"underscores, starting with a letter (e.g. 'mistral')", field="name")
    module = f"orcd_{name}"
    v = dict(name=name, arch=name, module=module, dist=name.replace("_", "-"),
             api=PLUGIN_API_VERSION, orcd_version=__version__.split("+")[0])
    return {
        "pyproject.toml": PYPROJECT.format(**v),
        "README.md": README.format(**v),
        f"{module}/__init__.py": INIT.format(**v),
        f"{module}/arch.py": ARCH.format(**v),
        f"{module}/model.py": MODEL.format(**v),
        f"{module}/synth.py": SYNTH.format(**v),
        f"tests/test_{name}.py": TEST.format(**v),
    }


def write_plugin(name: str, out_dir: str | Path) -> Path:
    """Write the skeleton into ``out_dir/orcd-plugin-NAME`` and return that folder."""
    files = render(name)
    root = Path(out_dir) / f"orcd-plugin-{name.replace('_', '-')}"
    if root.exists() and any(root.iterdir()):
        raise InvalidRequest(f"{root} already exists and is not empty", field="output")
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root
