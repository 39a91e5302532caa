"""Fake devices for tests and demos, loaded from the device plugin folder.

The environment variable C{LLMNODE_FAKE_DEVICES} may hold a JSON list of objects with
C{id}, C{name}, C{total_mb} and optionally C{free_mb} and C{kind}; without it the plugin
reports one 8 GB GPU, C{fake0} ("Fake GeForce RTX 4060").
"""

import json
import os

from zope.interface import implementer

from llmnode.devices.interfaces import Device, IDevicePlugin

DEFAULT = [{"id": "fake0", "name": "Fake GeForce RTX 4060", "total_mb": 8192}]


@implementer(IDevicePlugin)
class FakeDevices:
    name = "fake-devices"

    def __init__(self, specs):
        self.specs = specs

    def devices(self):
        return [Device(id=s["id"], kind=s.get("kind", "gpu"), name=s["name"],
                       total_mb=float(s["total_mb"]),
                       free_mb=float(s.get("free_mb", s["total_mb"])), plugin=self.name)
                for s in self.specs]


def plugins():
    specs = os.environ.get("LLMNODE_FAKE_DEVICES")
    return [FakeDevices(json.loads(specs) if specs else DEFAULT)]
