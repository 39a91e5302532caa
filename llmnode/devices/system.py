"""System memory (RAM) as the device C{cpu}, through psutil."""

from __future__ import annotations

import platform
from types import ModuleType
from typing import Optional

import psutil as _psutil
from zope.interface import implementer

from llmnode.devices.interfaces import Device, IDevicePlugin

_MB = 1024 * 1024


def cpu_brand(cpuinfo_path: str = "/proc/cpuinfo") -> str:
    """The CPU's product name where the OS tells it, else C{platform.processor()}."""
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


@implementer(IDevicePlugin)
class SystemPlugin:
    """One device C{cpu}: total RAM and what is available to new processes."""

    name = "system"

    def __init__(self, psutil: ModuleType = _psutil, brand: Optional[str] = None) -> None:
        self._psutil = psutil
        self._brand = brand

    def devices(self) -> list[Device]:
        if self._brand is None:
            self._brand = cpu_brand()
        memory = self._psutil.virtual_memory()
        return [Device(id="cpu", kind="cpu", name=f"System RAM ({self._brand})",
                       total_mb=memory.total / _MB, free_mb=memory.available / _MB,
                       utilization=self._psutil.cpu_percent(interval=None),
                       plugin=self.name)]
