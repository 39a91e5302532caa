"""Learned costs end to end: demo backends holding real memory on a device that reports it,
a config with no memory_mb at all, and a node restarted over the same runtime folder."""

from __future__ import annotations

import os
import tempfile

from twisted.trial.unittest import TestCase

from tests.support.nodes import (_remove_tree, base_url, demo_model, free_port, get_json,
                                 http_client, post_json, sleep, start_node)

PLUGINS = os.path.join(os.path.dirname(__file__), "plugins_lab")


def lab_model(name: str) -> dict:
    """A demo backend holding 300 MB, on the 1000 MB lab device, with no memory_mb."""
    model = demo_model(free_port(), flags=f"--rss-mb 300 --model-name lab-{name}",
                       device="lab0")
    del model["Plan"]["memory_mb"]
    return model


class LearnedCostsTests(TestCase):
    timeout = 120

    async def node(self, runtime_dir: str):
        self.models = {name: lab_model(name) for name in "abc"}
        self.service = await start_node(self, self.models, device_plugin_dir=PLUGINS,
                                        runtime_dir=runtime_dir)
        self.http = http_client(self)
        self.url = base_url(self.service)

    async def chat(self, model: str) -> int:
        status, body, _ = await post_json(self.http, self.url + "/v1/chat/completions",
                                          {"model": model,
                                           "messages": [{"role": "user", "content": "hi"}]})
        self.assertEqual(status, 200, body)
        return status

    async def info(self, model: str) -> dict:
        return (await get_json(self.http, self.url + f"/api/models/{model}/info"))[1]

    async def learned(self, model: str) -> float:
        """Wait until the node has measured C{model}; its learned peak on lab0."""
        for _ in range(100):
            peak = (await self.info(model))["costs"]["Plan"]["learned_peak_mb"].get("lab0")
            if peak:
                return peak
            await sleep(0.1)
        self.fail(f"{model} was never measured")

    async def reserved(self) -> float:
        _, devices = await get_json(self.http, self.url + "/api/devices")
        [lab] = [d for d in devices["devices"] if d["id"] == "lab0"]
        self.assertLessEqual(lab["reserved_mb"], lab["total_mb"], "never double-booked")
        return lab["reserved_mb"]

    async def settled(self) -> None:
        """Wait until the device reports only what the running models use (a stopped
        model's memory given back), as a real device does some time after a stop."""
        for _ in range(100):
            _, devices = await get_json(self.http, self.url + "/api/devices")
            [lab] = [d for d in devices["devices"] if d["id"] == "lab0"]
            if lab["free_mb"] >= lab["total_mb"] - lab["reserved_mb"] - 50:
                return
            await sleep(0.1)

    async def states(self) -> dict:
        return {m: (await self.info(m))["state"] for m in "abc"}

    async def test_models_without_memory_figures_are_placed_by_what_they_use(self):
        runtime_dir = tempfile.mkdtemp(prefix="llmnode-costs-")
        self.addCleanup(_remove_tree, runtime_dir)
        await self.node(runtime_dir)
        # First starts: nothing known, so each starts alone and is measured.
        for name in "abc":
            await self.chat(name)
            peak = await self.learned(name)
            self.assertGreater(peak, 300, "the 300 MB it holds, and the process around it")
            self.assertLess(peak, 450)
            running = [m for m, state in (await self.states()).items() if state == "running"]
            self.assertEqual(running, [name], "alone while nothing is known")
        # Known now: two fit together by their learned figures, the third does not.
        await self.chat("a")
        await self.settled()
        await self.chat("b")
        a, b = await self.info("a"), await self.info("b")
        self.assertEqual((a["state"], b["state"]), ("running", "running"), (a, b))
        self.assertLess(a["memory_mb"]["lab0"], 500, "placed by its peak plus the margin")
        await self.reserved()
        await self.chat("c")
        states = await self.states()
        self.assertEqual(states["c"], "running")
        self.assertEqual(sorted(states.values()), ["running", "running", "stopped"],
                         "one model was evicted for c, not both")
        await self.reserved()

        # A new node over the same runtime folder places by what this one learned.
        await self.service.stopService()
        await self.node(runtime_dir)
        before = (await self.info("a"))["costs"]["Plan"]["learned_peak_mb"]["lab0"]
        self.assertGreater(before, 300)
        await self.chat("a")
        await self.chat("b")
        self.assertEqual((await self.states())["b"], "running")
        self.assertEqual((await self.states())["a"], "running", "no first start alone again")
