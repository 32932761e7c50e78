"""orcd's developer kit: the tools for plugin authors and orcd's own developers,
installed with orcd but kept apart from the runtime.

    synth.py           synthetic GGUFs with a real model's shapes, quant types and vocabulary
                       (SynthPreset, SynthVocab: what a plugin's orcd_synth_presets returns)
    testing.py         the plugin test kit a plugin's own pytest suite calls
    scaffold.py        the new-plugin skeleton behind ``orcd new-plugin``
    server_testing.py  a real worker on loopback, in-process (tests, benchmarks)
    bench.py           the orcd side of the benchmark behind ``orcd bench``

The rule: no runtime module (the serving path: server, load, engine, scheduler,
backends, the CLI's module) imports ``orcd.devkit``; only the CLI subcommands
``synth``, ``new-plugin`` and ``bench`` do, lazily, when they run
(tests/plugins/test_layering.py checks it). A model plugin builds its
``orcd_synth_presets`` rows from ``orcd.devkit.synth``'s dataclasses, so
``PluginHost`` gathers them only when something asks for ``synth_presets``
(``orcd synth``, ``orcd plugins``, the test kit), never while serving.
"""
