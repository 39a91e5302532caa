"""Devices the node can place models on: interfaces, built-in plugins, loader, monitor."""

from llmnode.devices.interfaces import Device, IDevicePlugin
from llmnode.devices.loader import default_plugins, load_plugins
from llmnode.devices.monitor import DeviceMonitor
from llmnode.devices.nvml import NvmlPlugin
from llmnode.devices.system import SystemPlugin

__all__ = ["Device", "IDevicePlugin", "DeviceMonitor", "NvmlPlugin", "SystemPlugin",
           "default_plugins", "load_plugins"]
