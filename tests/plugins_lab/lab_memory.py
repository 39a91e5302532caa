"""A 1000 MB device whose use is the real memory of the demo backends started for it (those
run with --model-name lab-...): it reports each of their processes with its resident memory,
as NVML reports GPU processes."""

import psutil
from zope.interface import implementer

from llmnode.devices.interfaces import Device, IDevicePlugin

TOTAL_MB = 1000


@implementer(IDevicePlugin)
class LabMemory:
    name = "lab-memory"

    def devices(self):
        processes = []
        for process in psutil.process_iter(["pid", "cmdline", "memory_info"]):
            cmdline = " ".join(process.info["cmdline"] or ())
            if "--model-name lab-" in cmdline and process.info["memory_info"] is not None:
                processes.append((process.info["pid"],
                                  process.info["memory_info"].rss / (1024 * 1024)))
        used = sum(mb for _, mb in processes)
        return [Device(id="lab0", kind="lab", name="Lab memory", total_mb=TOTAL_MB,
                       free_mb=max(0.0, TOTAL_MB - used), processes=tuple(processes),
                       plugin=self.name)]


def plugins():
    return [LabMemory()]
