"""Backend processes: spawn in their own process group, wait until healthy, stop, log output.

Names are loaded lazily, so that C{python -m llmnode.launcher.supervisor} imports no Twisted.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the type checker sees the names the lazy loader gives
    from llmnode.launcher.backend import Backend as Backend, StartError as StartError
    from llmnode.launcher.logfile import ModelLog as ModelLog
    from llmnode.launcher.runtime import reclaim as reclaim

_EXPORTS = {
    "Backend": "llmnode.launcher.backend",
    "StartError": "llmnode.launcher.backend",
    "ModelLog": "llmnode.launcher.logfile",
    "reclaim": "llmnode.launcher.runtime",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(module), name)
