"""List the devices llmnode sees, through its own NVML and system-memory plugins.

Usage: python benchmarks/nvml_probe.py [--plugin-dir DIR]

Prints one row per device and exits 0, also on a machine without a GPU (it says so).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.logger import Logger, formatEvent  # noqa: E402

from llmnode.devices import NvmlPlugin, SystemPlugin, load_plugins  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plugin-dir", help="also load the device plugin files in DIR")
    args = parser.parse_args(argv)
    notes: list[str] = []
    log = Logger(observer=lambda event: notes.append(formatEvent(event)))
    nvml = NvmlPlugin(log=log)
    plugins = [nvml, SystemPlugin()] + load_plugins(args.plugin_dir, log)
    rows = []
    try:
        for plugin in plugins:
            started = time.perf_counter()
            try:
                found = plugin.devices()
            except Exception as e:
                notes.append(f"plugin {plugin.name} failed: {type(e).__name__}: {e}")
                continue
            took = (time.perf_counter() - started) * 1000
            notes.append(f"plugin {plugin.name}: {len(found)} device(s) in {took:.1f} ms")
            rows.extend(found)
    finally:
        nvml.close()

    header = ("id", "kind", "name", "total MB", "free MB", "util %", "temp C", "procs", "plugin")
    table = [header] + [
        (d.id, d.kind, d.name, f"{d.total_mb:.0f}", f"{d.free_mb:.0f}",
         "-" if d.utilization is None else f"{d.utilization:g}",
         "-" if d.temperature is None else f"{d.temperature:g}",
         ", ".join(f"{pid}:{mb:.0f}MB" for pid, mb in d.processes) or "-", d.plugin)
        for d in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    print()
    if not any(d.kind == "gpu" for d in rows):
        print("No GPU found: models can only be placed on the devices above.")
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
