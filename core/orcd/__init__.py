"""orcd: serve one GGUF language model from one NVIDIA GPU over HTTP.

Importing orcd (or any plugin) never touches CUDA: the GPU runtime is imported
only when a CUDA backend is created.
"""

__version__ = "0.1.0"

#: Major version of the plugin API (hookspecs and the objects they exchange).
#: A plugin declares the version it was written against as the module attribute
#: ``ORCD_PLUGIN_API``; the host refuses a plugin whose major version differs.
PLUGIN_API_VERSION = 1

from orcd.hookspecs import hookimpl  # noqa: E402  (re-exported for plugins)

__all__ = ["__version__", "PLUGIN_API_VERSION", "hookimpl"]
