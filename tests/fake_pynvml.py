"""A stand-in for the C{pynvml} module: scripted GPUs, real NVMLError types."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pynvml as _real

MB = 1024 * 1024


@dataclass
class FakeGpu:
    name: str
    total_mb: int
    free_mb: int
    utilization: int = 0
    temperature: int = 40
    processes: list = field(default_factory=list)  # [(pid, used_mb or None)]


class FakePynvml:
    """Enough of pynvml for L{llmnode.devices.nvml.NvmlPlugin}.

    C{fail} maps a function name to an NVML error code raised on every call;
    C{init_error} is raised by C{nvmlInit} (an NVML code or an exception instance).
    """

    NVMLError = _real.NVMLError
    NVMLError_NotSupported = _real.NVMLError_NotSupported
    NVML_TEMPERATURE_GPU = _real.NVML_TEMPERATURE_GPU
    NVML_ERROR_NOT_SUPPORTED = _real.NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_LIBRARY_NOT_FOUND = _real.NVML_ERROR_LIBRARY_NOT_FOUND
    NVML_ERROR_DRIVER_NOT_LOADED = _real.NVML_ERROR_DRIVER_NOT_LOADED
    NVML_ERROR_GPU_IS_LOST = _real.NVML_ERROR_GPU_IS_LOST

    def __init__(self, gpus=(), init_error=None, fail=None, bytes_names=False):
        self.gpus = list(gpus)
        self.init_error = init_error
        self.fail = dict(fail or {})
        self.bytes_names = bytes_names
        self.calls: list[str] = []
        self.initialised = False

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail:
            raise _real.NVMLError(self.fail[name])
        if name not in ("nvmlInit", "nvmlShutdown") and not self.initialised:
            raise _real.NVMLError(_real.NVML_ERROR_UNINITIALIZED)

    def nvmlInit(self):
        self._call("nvmlInit")
        if isinstance(self.init_error, BaseException):
            raise self.init_error
        if self.init_error is not None:
            raise _real.NVMLError(self.init_error)
        self.initialised = True

    def nvmlShutdown(self):
        self._call("nvmlShutdown")
        self.initialised = False

    def nvmlDeviceGetCount(self):
        self._call("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        self._call("nvmlDeviceGetHandleByIndex")
        return self.gpus[index]

    def nvmlDeviceGetName(self, gpu):
        self._call("nvmlDeviceGetName")
        return gpu.name.encode() if self.bytes_names else gpu.name

    def nvmlDeviceGetMemoryInfo(self, gpu):
        self._call("nvmlDeviceGetMemoryInfo")
        return SimpleNamespace(total=gpu.total_mb * MB, free=gpu.free_mb * MB,
                               used=(gpu.total_mb - gpu.free_mb) * MB)

    def nvmlDeviceGetUtilizationRates(self, gpu):
        self._call("nvmlDeviceGetUtilizationRates")
        return SimpleNamespace(gpu=gpu.utilization, memory=0)

    def nvmlDeviceGetTemperature(self, gpu, sensor):
        self._call("nvmlDeviceGetTemperature")
        assert sensor == _real.NVML_TEMPERATURE_GPU
        return gpu.temperature

    def nvmlDeviceGetComputeRunningProcesses(self, gpu):
        self._call("nvmlDeviceGetComputeRunningProcesses")
        return [SimpleNamespace(pid=pid, usedGpuMemory=None if used is None else used * MB)
                for pid, used in gpu.processes]
