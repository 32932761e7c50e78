"""The bundled model plugins pass the same orcd.devkit.testing kit a third party uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from orcd.devkit import testing

# module, tiny preset, keys a real file carries that the model does not need
BUNDLED = [
    ("orcd_qwen", "qwen2-tiny", ()),
    ("orcd_phi3", "phi3-tiny", ()),
    # gpt-oss files carry the dense feed_forward_length; the experts use their own
    ("orcd_gpt_oss", "gpt-oss-tiny", ("{arch}.feed_forward_length",)),
]


@pytest.mark.parametrize("module,preset,ignore", BUNDLED, ids=[b[0] for b in BUNDLED])
def test_bundled_plugin_passes_the_kit(module, preset, ignore, tmp_path):
    plugin = pytest.importorskip(module)
    report = testing.check_plugin(plugin, preset, tmp_path, ignore_keys=ignore)
    assert report.model.decode_rel_err < 1e-4
    if report.cuda is not None:
        assert report.cuda_rel_err < 2e-2 and report.cuda_top1_agree >= 0.9
    assert testing.private_imports(Path(plugin.__file__).parent) == []
