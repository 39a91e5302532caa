'''Extra device plugins: every C{*.py} file in C{program.device_plugin_dir}.

Contract for a plugin file
==========================

A plugin file is a plain Python file (not a package; it may not import its neighbours).
It must define either a function C{plugins()} returning a list of objects that provide
L{llmnode.devices.interfaces.IDevicePlugin}, or a list named C{PLUGINS} of such objects.
Each object has a C{name} attribute and a C{devices()} method returning a list of
L{llmnode.devices.interfaces.Device}. C{devices()} runs in a worker thread about once a
second; it may block briefly and may raise (the error is logged and the node carries on).
Device ids must be unique across all plugins; a plan requirement matches a device whose id
equals it or whose product name contains it (case-insensitive).

A file that fails to import, raises, or returns something else is logged with its path and
the error, then skipped; the node still starts.

Example (C{plugins/devices/tpu_stub.py})::

    from zope.interface import implementer

    from llmnode.devices.interfaces import Device, IDevicePlugin


    @implementer(IDevicePlugin)
    class StubAccelerator:
        """A fixed 16 GB accelerator, for trying placement without the hardware."""

        name = "stub-accelerator"

        def devices(self):
            return [Device(id="acc0", kind="accelerator", name="Stub Accelerator 16GB",
                           total_mb=16384, free_mb=16384, plugin=self.name)]


    def plugins():
        return [StubAccelerator()]
'''

from __future__ import annotations

import hashlib
import importlib.util
import os
from typing import Optional

from twisted.logger import Logger
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from llmnode.devices.interfaces import IDevicePlugin
from llmnode.devices.nvml import NvmlPlugin
from llmnode.devices.system import SystemPlugin


class PluginFileError(Exception):
    """A plugin file does not keep the contract."""


def _module_name(path: str) -> str:
    stem = "".join(c if c.isalnum() else "_" for c in os.path.splitext(os.path.basename(path))[0])
    digest = hashlib.sha1(os.path.abspath(path).encode("utf-8")).hexdigest()[:10]
    return f"llmnode_device_plugin_{stem}_{digest}"


def _load_file(path: str) -> list[IDevicePlugin]:
    spec = importlib.util.spec_from_file_location(_module_name(path), path)
    if spec is None or spec.loader is None:
        raise PluginFileError("not a loadable Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if callable(getattr(module, "plugins", None)):
        found = module.plugins()
    elif hasattr(module, "PLUGINS"):
        found = module.PLUGINS
    else:
        raise PluginFileError("defines neither plugins() nor PLUGINS")
    if not isinstance(found, (list, tuple)):
        raise PluginFileError(f"expected a list of device plugins, got {type(found).__name__}")
    for plugin in found:
        try:
            verifyObject(IDevicePlugin, plugin)
        except Invalid as e:
            raise PluginFileError(f"{plugin!r:.80} does not provide IDevicePlugin: {e}") from e
    return list(found)


def load_plugins(directory: Optional[str], log: Optional[Logger] = None) -> list[IDevicePlugin]:
    """The device plugins of every C{*.py} file in C{directory}, in file-name order.

    Broken files are logged and skipped. A missing directory is logged and yields none.
    """
    log = log or Logger()
    if not directory:
        return []
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".py"))
    except OSError as e:
        log.warn("device plugin folder {path} unreadable: {error}", path=directory,
                 error=str(e)[:300])
        return []
    plugins = []
    for name in names:
        path = os.path.join(directory, name)
        try:
            found = _load_file(path)
        except (Exception, SystemExit) as e:
            log.error("device plugin {path} skipped: {error}", path=path,
                      error=f"{type(e).__name__}: {e}"[:500])
            continue
        log.info("device plugin {path} loaded: {names}", path=path,
                 names=", ".join(str(getattr(p, "name", "?")) for p in found) or "(none)")
        plugins.extend(found)
    return plugins


def default_plugins(device_plugin_dir: Optional[str],
                    log: Optional[Logger] = None) -> list[IDevicePlugin]:
    """NVML, system memory, then the plugin folder's files."""
    log = log or Logger()
    return [NvmlPlugin(log=log), SystemPlugin()] + load_plugins(device_plugin_dir, log)
