"""The plugin host: registers built-ins and entry-point plugins alike.

Built-ins are module names in ``BUILTIN_PLUGINS``; external plugins are found
through the ``orcd`` entry-point group. Both pass the same API-version check.
``ORCD_BLOCK_PLUGINS=name1,name2`` blocks plugins by registered name.
There is no module-level registry: each ``PluginHost`` owns its manager.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from types import ModuleType
from typing import Any, Iterable

import pluggy

from orcd import PLUGIN_API_VERSION, hookspecs
from orcd.arch import ArchSpec
from orcd.errors import ModelLoadFailed, OrcdError
from orcd.quant import FormatTable, QuantFormat

ENTRY_POINT_GROUP = "orcd"
BLOCK_ENV = "ORCD_BLOCK_PLUGINS"
BUILTIN_PLUGINS: tuple[str, ...] = ("orcd.quant.builtin",)
#: First-party distributions, so "unknown architecture" can name the package to install.
KNOWN_DISTRIBUTIONS = {"qwen2": "orcd-plugin-qwen", "phi3": "orcd-plugin-phi3",
                       "gpt-oss": "orcd-plugin-gpt-oss"}
#: Hooks that return rows collected into the host's tables (called once, no arguments).
TABLE_HOOKS = ("orcd_architectures", "orcd_quant_formats", "orcd_synth_presets")


class PluginError(OrcdError):
    """A plugin could not be registered or two plugins conflict."""

    code = "INTERNAL"


@dataclass
class PluginInfo:
    name: str
    version: str
    module: str
    builtin: bool
    provides: dict[str, list[str]] = field(default_factory=dict)


class PluginHost:
    def __init__(self, *, builtins: Iterable[str] = BUILTIN_PLUGINS,
                 entry_points: bool = True, extra: Iterable[ModuleType | Any] = (),
                 blocked: Iterable[str] | None = None) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        if blocked is None:
            blocked = [b.strip() for b in os.environ.get(BLOCK_ENV, "").split(",") if b.strip()]
        self.blocked = set(blocked)
        self.skipped: list[str] = []  # installed plugins that ``blocked`` kept out
        self.infos: dict[str, PluginInfo] = {}
        for modname in builtins:
            self.register(importlib.import_module(modname), name=modname.rsplit(".", 1)[-1],
                          version=_dist_version("orcd"), builtin=True)
        if entry_points:
            self._load_entry_points()
        for obj in extra:
            self.register(obj, name=getattr(obj, "__name__", type(obj).__name__))
        try:  # a hookimpl whose name matches no hookspec (a typo) would be silently ignored
            self.pm.check_pending()
        except pluggy.PluginValidationError as e:
            raise PluginError(f"plugin {self._owner(e.plugin)!r}: {_one_line(e)}") from None
        self._collect()

    # -- registration -------------------------------------------------------
    def register(self, plugin: Any, *, name: str, version: str = "0", builtin: bool = False) -> None:
        if name in self.blocked:
            self.skipped.append(name)
            return
        _check_api(plugin, name)
        if self.pm.get_plugin(name) is not None:
            raise PluginError(f"two plugins are both named {name!r}")
        if self.pm.is_registered(plugin):
            raise PluginError(f"plugin {name!r} is the same object as plugin "
                              f"{self.pm.get_name(plugin)!r}; register it once")
        try:
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as e:  # a hookimpl with the wrong arguments
            raise PluginError(f"plugin {name!r} is invalid: {_one_line(e)}") from None
        module = getattr(plugin, "__name__", type(plugin).__name__)
        self.infos[name] = PluginInfo(name, version, module, builtin)

    def _load_entry_points(self) -> None:
        for ep in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in self.blocked:
                self.skipped.append(ep.name)
                continue
            try:
                plugin = ep.load()
            except Exception as e:  # a broken plugin must be loud, never silent
                raise PluginError(f"plugin {ep.name!r} ({ep.value}) failed to import: "
                                  f"{type(e).__name__}: {e}") from e
            version = ep.dist.version if ep.dist is not None else "0"
            self.register(plugin, name=ep.name, version=version)

    # -- what the plugins provide -------------------------------------------
    def _owner(self, impl_plugin: Any) -> str:
        return self.pm.get_name(impl_plugin) or repr(impl_plugin)

    def _gather(self, hook_name: str) -> list[tuple[str, Any]]:
        """(plugin name, item) for every item every plugin's hook returned."""
        out = []
        hook = getattr(self.pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            owner = self._owner(impl.plugin)
            try:
                items = impl.function()
            except Exception as e:  # loud, and naming the plugin that broke
                raise PluginError(f"plugin {owner!r}: hook {hook_name} failed: "
                                  f"{type(e).__name__}: {e}") from e
            if items is None:
                continue
            if not isinstance(items, (list, tuple)):
                raise PluginError(f"plugin {owner!r}: hook {hook_name} must return a list, "
                                  f"got {type(items).__name__}")
            out.extend((owner, item) for item in items)
        return out

    def _collect(self) -> None:
        self.architectures: dict[str, ArchSpec] = {}
        arch_owners: dict[str, str] = {}
        for owner, spec in self._gather("orcd_architectures"):
            _claim(self.architectures, arch_owners, spec.name, owner, "architecture",
                   lambda s=spec, o=owner: _with_plugin(s, o))
            self.infos[owner].provides.setdefault("architectures", []).append(spec.name)
        formats: dict[int, QuantFormat] = {}
        owners: dict[int, str] = {}
        for owner, fmt in self._gather("orcd_quant_formats"):
            if fmt.type_id in formats:
                raise PluginError(f"quant type id {fmt.type_id} ({fmt.name}) is claimed by both "
                                  f"plugin {owners[fmt.type_id]!r} and plugin {owner!r}")
            formats[fmt.type_id], owners[fmt.type_id] = fmt, owner
            self.infos[owner].provides.setdefault("quant_formats", []).append(fmt.name)
        self.formats = FormatTable(formats.values())
        self._synth_presets: dict[str, Any] | None = None
        for hook_name in sorted(self.pm.hook.__dict__):  # the per-call hooks, e.g. orcd_tokenizer
            if hook_name in TABLE_HOOKS:
                continue
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                self.infos[self._owner(impl.plugin)].provides.setdefault("hooks", []).append(hook_name)

    @property
    def synth_presets(self) -> dict[str, Any]:
        """name -> SynthPreset from every plugin's ``orcd_synth_presets``, gathered at
        first use (conflicts refused then): the rows are orcd.devkit.synth's, which a
        serving worker never needs, so it never loads them."""
        if self._synth_presets is None:
            presets: dict[str, Any] = {}
            owners: dict[str, str] = {}
            for owner, preset in self._gather("orcd_synth_presets"):
                _claim(presets, owners, preset.name, owner, "synth preset", lambda p=preset: p)
                self.infos[owner].provides.setdefault("synth_presets", []).append(preset.name)
            self._synth_presets = presets
        return self._synth_presets

    def architecture(self, name: str, source: str = "model") -> ArchSpec:
        """The ArchSpec for ``general.architecture == name`` or a clear error."""
        try:
            return self.architectures[name]
        except KeyError:
            installed = ", ".join(sorted(self.architectures)) or "none"
            dist = KNOWN_DISTRIBUTIONS.get(name, "orcd-plugin-" + name.replace("_", "-").replace(".", "-"))
            blocked = (f"; {BLOCK_ENV} keeps out installed plugin(s) {', '.join(self.skipped)}"
                       if self.skipped else "")
            raise ModelLoadFailed(
                f"{source}: architecture {name!r} is not supported by any installed plugin "
                f"(installed architectures: {installed}); install a plugin that provides it, "
                f"e.g. `pip install {dist}`{blocked}") from None

    def tokenizer(self, model: Any, tokenizer_path: Any = None) -> Any:
        tok = self.pm.hook.orcd_tokenizer(model=model, tokenizer_path=tokenizer_path)
        if tok is None:
            raise ModelLoadFailed(f"{getattr(model, 'path', 'model')}: no installed tokenizer "
                                  f"backend can load this model's vocabulary "
                                  f"(install orcd-plugin-tokenizers)")
        return tok

    def output_parser(self, arch: str, tokenizer: Any) -> Any | None:
        return self.pm.hook.orcd_output_parser(arch=arch, tokenizer=tokenizer)

    def plugins(self) -> list[PluginInfo]:
        self.synth_presets   # what each provides includes its presets
        return sorted(self.infos.values(), key=lambda i: (not i.builtin, i.name))


def _check_api(plugin: Any, name: str) -> None:
    """Refuse a plugin written against another plugin API major version."""
    if not hasattr(plugin, "ORCD_PLUGIN_API"):
        raise PluginError(
            f"plugin {name!r} does not declare ORCD_PLUGIN_API; a plugin must set "
            f"ORCD_PLUGIN_API = {PLUGIN_API_VERSION} (the orcd plugin API it targets)")
    api = plugin.ORCD_PLUGIN_API
    if type(api) is not int or api != PLUGIN_API_VERSION:  # type(): True == 1 must not pass
        raise PluginError(
            f"plugin {name!r} targets orcd plugin API {api!r}, but this orcd "
            f"provides API {PLUGIN_API_VERSION}; install a version of the plugin built for it "
            f"(ORCD_PLUGIN_API = {PLUGIN_API_VERSION}) or an orcd that provides API {api!r}")


def _one_line(e: Exception) -> str:
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip())


def _claim(table: dict, owners: dict, key: str, owner: str, what: str, make) -> None:
    if key in table:
        raise PluginError(f"{what} {key!r} is claimed by both plugin {owners[key]!r} "
                          f"and plugin {owner!r}")
    table[key], owners[key] = make(), owner


def _with_plugin(spec: ArchSpec, owner: str) -> ArchSpec:
    from dataclasses import replace
    return replace(spec, plugin=owner)


def _dist_version(dist: str) -> str:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return "0+unknown"
