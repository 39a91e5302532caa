"""Backend processes: spawn in their own process group, wait until healthy, stop, log output.

Names are loaded lazily, so that C{python -m llmnode.launcher.supervisor} imports no Twisted.
"""

_EXPORTS = {
    "Backend": "llmnode.launcher.backend",
    "StartError": "llmnode.launcher.backend",
    "ModelLog": "llmnode.launcher.logfile",
    "reclaim": "llmnode.launcher.runtime",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(module), name)
