"""NVIDIA GPUs through NVML (the C{pynvml} module of nvidia-ml-py)."""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional, TypeVar

from twisted.logger import Logger
from zope.interface import implementer

from llmnode.devices.interfaces import Device, IDevicePlugin

T = TypeVar("T")

_MB = 1024 * 1024


def _text(value: str | bytes) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


@implementer(IDevicePlugin)
class NvmlPlugin:
    """One L{Device} per GPU NVML sees, with ids C{gpu<index>}.

    NVML is initialised on the first call. Where the library or the driver is missing the
    plugin reports no devices and says why in a single log line.
    """

    name = "nvml"

    def __init__(self, pynvml: Any = None, log: Optional[Logger] = None) -> None:
        """
        @param pynvml: the NVML module; None imports the real C{pynvml} when first needed.
        """
        self._nvml = pynvml
        self._log = log or Logger()
        self._lock = threading.Lock()
        self._state = "new"  # new | ready | unavailable | closed

    def _init(self) -> bool:
        if self._state == "new":
            try:
                if self._nvml is None:
                    import pynvml
                    self._nvml = pynvml
                self._nvml.nvmlInit()
            except Exception as e:
                self._state = "unavailable"
                self._log.info("NVML unavailable, no GPUs will be used: {error}",
                               error=f"{type(e).__name__}: {e}"[:300])
            else:
                self._state = "ready"
        return self._state == "ready"

    def devices(self) -> list[Device]:
        with self._lock:
            if not self._init():
                return []
            nvml = self._nvml
            return [self._device(nvml, index) for index in range(nvml.nvmlDeviceGetCount())]

    def _device(self, nvml: Any, index: int) -> Device:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        return Device(
            id=f"gpu{index}", kind="gpu", name=_text(nvml.nvmlDeviceGetName(handle)),
            total_mb=memory.total / _MB, free_mb=memory.free / _MB,
            utilization=self._optional(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
            temperature=self._optional(
                lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
            processes=self._processes(nvml, handle), plugin=self.name)

    def _optional(self, query: Callable[[], T]) -> Optional[T]:
        """A reading some GPUs don't support: None instead of an error."""
        try:
            return query()
        except self._nvml.NVMLError:
            return None

    def _processes(self, nvml: Any, handle: Any) -> tuple[tuple[int, float], ...]:
        try:
            running = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except nvml.NVMLError:
            return ()
        return tuple((int(p.pid), (p.usedGpuMemory or 0) / _MB) for p in running)

    def close(self) -> None:
        """Shut NVML down if it was initialised; later calls report no devices."""
        with self._lock:
            if self._state == "ready":
                try:
                    self._nvml.nvmlShutdown()
                except Exception as e:
                    self._log.warn("nvmlShutdown failed: {error}", error=str(e)[:300])
            self._state = "closed"
