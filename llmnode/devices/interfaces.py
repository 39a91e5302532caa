"""What a device is, and what a device plugin must provide."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from zope.interface import Attribute, Interface


@dataclass(frozen=True)
class Device:
    """One snapshot of a device that models can be placed on.

    @ivar id: stable identifier used in configs and placements (C{"gpu0"}, C{"cpu"}).
    @ivar kind: C{"gpu"}, C{"cpu"} or free text from a plugin.
    @ivar name: the product name, matched case-insensitively by plan requirements.
    @ivar total_mb: total memory in MB.
    @ivar free_mb: memory the device reports free, in MB.
    @ivar utilization: busy percentage, or None when unknown.
    @ivar temperature: degrees Celsius, or None when unknown.
    @ivar processes: C{(pid, used_mb)} pairs of processes using the device.
    @ivar plugin: the name of the plugin that reported the device.
    """

    id: str
    kind: str
    name: str
    total_mb: float
    free_mb: float
    utilization: Optional[float] = None
    temperature: Optional[float] = None
    processes: tuple[tuple[int, float], ...] = ()
    plugin: str = ""


class IDevicePlugin(Interface):
    """A source of devices: NVML, system memory, or a file in the plugin folder."""

    name = Attribute("A short name for logs, e.g. C{'nvml'}.")

    def devices() -> "list[Device]":
        """Return the current list of L{Device} snapshots.

        Called from a worker thread, never the reactor thread; may block briefly.
        May raise: the monitor logs the error and keeps the other plugins' devices.
        """
