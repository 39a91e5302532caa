"""Device plugins (NVML, system memory, plugin files) and the device monitor."""

from __future__ import annotations

import os
import textwrap
from types import SimpleNamespace

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from llmnode.devices import (Device, DeviceMonitor, IDevicePlugin, NvmlPlugin, SystemPlugin,
                             default_plugins, load_plugins)
from llmnode.devices import loader
from llmnode.devices.system import cpu_brand
from tests.fake_pynvml import FakeGpu, FakePynvml

PLUGIN_DIR = os.path.join(os.path.dirname(__file__), "plugins")


def capture():
    """A Logger and the list of formatted messages it receives."""
    lines: list[str] = []
    return Logger(observer=lambda e: lines.append(formatEvent(e))), lines


@implementer(IDevicePlugin)
class ScriptedPlugin:
    """A test plugin whose answers are set by the test: a list, or an exception to raise."""

    def __init__(self, name, *devices):
        self.name = name
        self.answer = list(devices)
        self.calls = 0
        self.closed = False

    def devices(self):
        self.calls += 1
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer

    def close(self):
        self.closed = True


def gpu(id="gpu0", name="NVIDIA GeForce RTX 4060", total=8192.0, free=8192.0, plugin=""):
    return Device(id=id, kind="gpu", name=name, total_mb=total, free_mb=free, plugin=plugin)


def sync_runner(f):
    try:
        return succeed(f())
    except Exception as e:
        from twisted.internet.defer import fail
        return fail(e)


class ContractTests(SynchronousTestCase):
    """Every plugin, real or fake, provides IDevicePlugin."""

    def test_real_and_fake_plugins_verify(self):
        plugins = [NvmlPlugin(FakePynvml()), NvmlPlugin(), SystemPlugin(),
                   ScriptedPlugin("scripted")] + load_plugins(PLUGIN_DIR)
        self.assertGreaterEqual(len(plugins), 5)
        for plugin in plugins:
            self.assertTrue(verifyObject(IDevicePlugin, plugin), plugin)


class NvmlPluginTests(SynchronousTestCase):

    def two_gpus(self, **kw):
        return FakePynvml([
            FakeGpu("NVIDIA GeForce RTX 4060", 8188, 6000, utilization=35, temperature=61,
                    processes=[(4242, 1500), (4243, None)]),
            FakeGpu("NVIDIA A100-SXM4-80GB", 81920, 81000)], **kw)

    def test_reports_each_gpu(self):
        nvml = self.two_gpus()
        first, second = NvmlPlugin(nvml).devices()
        self.assertEqual(first, Device(
            id="gpu0", kind="gpu", name="NVIDIA GeForce RTX 4060", total_mb=8188,
            free_mb=6000, utilization=35, temperature=61, processes=((4242, 1500), (4243, 0)),
            plugin="nvml"))
        self.assertEqual((second.id, second.name, second.total_mb),
                         ("gpu1", "NVIDIA A100-SXM4-80GB", 81920))

    def test_bytes_names_are_decoded(self):
        [device] = NvmlPlugin(FakePynvml([FakeGpu("Tesla T4", 15360, 15000)],
                                         bytes_names=True)).devices()
        self.assertEqual(device.name, "Tesla T4")

    def test_initialises_lazily_and_once(self):
        nvml = self.two_gpus()
        plugin = NvmlPlugin(nvml)
        self.assertEqual(nvml.calls, [])
        plugin.devices()
        plugin.devices()
        self.assertEqual(nvml.calls.count("nvmlInit"), 1)

    def test_missing_library_means_no_gpus_and_one_log_line(self):
        for error in (FakePynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
                      FakePynvml.NVML_ERROR_DRIVER_NOT_LOADED, OSError("libnvidia-ml.so.1")):
            log, lines = capture()
            nvml = FakePynvml([FakeGpu("x", 1, 1)], init_error=error)
            plugin = NvmlPlugin(nvml, log=log)
            self.assertEqual(plugin.devices(), [])
            self.assertEqual(plugin.devices(), [])
            self.assertEqual(len(lines), 1)
            self.assertIn("NVML unavailable", lines[0])
            self.assertEqual(nvml.calls, ["nvmlInit"])
            plugin.close()
            self.assertNotIn("nvmlShutdown", nvml.calls)

    def test_unsupported_readings_are_none(self):
        code = FakePynvml.NVML_ERROR_NOT_SUPPORTED
        nvml = self.two_gpus(fail={"nvmlDeviceGetUtilizationRates": code,
                                   "nvmlDeviceGetTemperature": code,
                                   "nvmlDeviceGetComputeRunningProcesses": code})
        first = NvmlPlugin(nvml).devices()[0]
        self.assertEqual((first.utilization, first.temperature, first.processes), (None, None, ()))
        self.assertEqual(first.free_mb, 6000)

    def test_lost_gpu_raises_nvml_error_for_the_monitor(self):
        nvml = self.two_gpus(fail={"nvmlDeviceGetMemoryInfo": FakePynvml.NVML_ERROR_GPU_IS_LOST})
        self.assertRaises(FakePynvml.NVMLError, NvmlPlugin(nvml).devices)

    def test_close_shuts_nvml_down(self):
        nvml = self.two_gpus()
        plugin = NvmlPlugin(nvml)
        plugin.devices()
        plugin.close()
        plugin.close()
        self.assertEqual(nvml.calls.count("nvmlShutdown"), 1)
        self.assertEqual(plugin.devices(), [])

    def test_close_before_use_does_not_touch_nvml(self):
        nvml = self.two_gpus()
        NvmlPlugin(nvml).close()
        self.assertEqual(nvml.calls, [])

    def test_real_pynvml_never_raises(self):
        log, lines = capture()
        plugin = NvmlPlugin(log=log)
        try:
            for device in plugin.devices():
                self.assertTrue(device.id.startswith("gpu"))
                self.assertLessEqual(device.free_mb, device.total_mb)
        finally:
            plugin.close()


class SystemPluginTests(SynchronousTestCase):

    def test_reports_ram_as_cpu(self):
        fake = SimpleNamespace(
            virtual_memory=lambda: SimpleNamespace(total=32768 * 2**20, available=20000 * 2**20),
            cpu_percent=lambda interval: 12.5)
        [device] = SystemPlugin(fake, brand="AMD Ryzen 9 7950X").devices()
        self.assertEqual(device, Device(id="cpu", kind="cpu",
                                        name="System RAM (AMD Ryzen 9 7950X)", total_mb=32768,
                                        free_mb=20000, utilization=12.5, plugin="system"))

    def test_real_machine(self):
        [device] = SystemPlugin().devices()
        self.assertEqual((device.id, device.kind), ("cpu", "cpu"))
        self.assertTrue(device.name.startswith("System RAM ("))
        self.assertGreater(device.total_mb, 0)
        self.assertTrue(0 <= device.free_mb <= device.total_mb)

    def test_cpu_brand_from_cpuinfo(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("processor\t: 0\nvendor_id\t: GenuineIntel\n"
                    "model name\t: Intel(R) Xeon(R) Gold 6338\n")
        self.assertEqual(cpu_brand(path), "Intel(R) Xeon(R) Gold 6338")
        self.assertTrue(cpu_brand(self.mktemp()))


class LoaderTests(SynchronousTestCase):

    def folder(self, **files):
        path = self.mktemp()
        os.makedirs(path)
        for name, text in files.items():
            with open(os.path.join(path, name + ".py"), "w") as f:
                f.write(textwrap.dedent(text))
        return path

    GOOD = """
        from zope.interface import implementer
        from llmnode.devices.interfaces import Device, IDevicePlugin

        @implementer(IDevicePlugin)
        class P:
            name = "good"
            def devices(self):
                return [Device("acc0", "accelerator", "Good Accelerator", 100, 90)]

        def plugins():
            return [P()]
        """

    def test_docstring_example_is_a_working_plugin(self):
        example = loader.__doc__.split("Example (", 1)[1].split("::\n", 1)[1]
        path = self.folder(example=textwrap.dedent(example))
        [plugin] = load_plugins(path)
        [device] = plugin.devices()
        self.assertEqual((device.id, device.name), ("acc0", "Stub Accelerator 16GB"))

    def test_broken_files_are_logged_and_skipped(self):
        path = self.folder(
            a_good=self.GOOD,
            b_syntax="def plugins(:\n",
            c_raises="raise RuntimeError('no hardware here')\n",
            d_not_list="def plugins():\n    return 42\n",
            e_no_interface="class P:\n    name = 'x'\n    def devices(self): return []\n"
                           "PLUGINS = [P()]\n",
            f_nothing="X = 1\n",
            g_exits="import sys\nsys.exit(3)\n",
            h_plugins_raises="def plugins():\n    raise ValueError('bad config')\n",
        )
        with open(os.path.join(path, "notes.txt"), "w") as f:
            f.write("not python")
        log, lines = capture()
        plugins = load_plugins(path, log)
        self.assertEqual([p.name for p in plugins], ["good"])
        errors = [line for line in lines if "skipped" in line]
        self.assertEqual(len(errors), 7, lines)
        for name, words in [("b_syntax", "SyntaxError"), ("c_raises", "no hardware here"),
                            ("d_not_list", "int"), ("e_no_interface", "IDevicePlugin"),
                            ("f_nothing", "neither plugins() nor PLUGINS"),
                            ("g_exits", "SystemExit"), ("h_plugins_raises", "bad config")]:
            [line] = [e for e in errors if os.path.join(path, name + ".py") in e]
            self.assertIn(words, line)

    def test_plugins_list_is_accepted(self):
        text = self.GOOD.replace("def plugins():\n            return [P()]", "PLUGINS = [P()]")
        self.assertEqual([p.name for p in load_plugins(self.folder(only=text))], ["good"])

    def test_same_file_name_in_two_folders_does_not_clash(self):
        one = load_plugins(self.folder(plugin=self.GOOD))
        two = load_plugins(self.folder(plugin=self.GOOD.replace('"good"', '"other"')))
        self.assertEqual([p.name for p in one + two], ["good", "other"])

    def test_missing_or_unset_folder(self):
        log, lines = capture()
        self.assertEqual(load_plugins(None, log), [])
        self.assertEqual(lines, [])
        self.assertEqual(load_plugins(self.mktemp(), log), [])
        self.assertEqual(len(lines), 1)
        self.assertIn("unreadable", lines[0])

    def test_default_plugins(self):
        plugins = default_plugins(PLUGIN_DIR, capture()[0])
        self.assertIsInstance(plugins[0], NvmlPlugin)
        self.assertIsInstance(plugins[1], SystemPlugin)
        self.assertEqual([d.id for d in plugins[2].devices()], ["fake0"])
        self.assertEqual(len(default_plugins(None)), 2)

    def test_fake_devices_plugin_reads_environment(self):
        self.patch(os, "environ", {"LLMNODE_FAKE_DEVICES":
                                   '[{"id": "g0", "name": "Fake H100", "total_mb": 81920, '
                                   '"free_mb": 1000}]'})
        [plugin] = load_plugins(PLUGIN_DIR)
        self.assertEqual(plugin.devices(), [Device("g0", "gpu", "Fake H100", 81920, 1000,
                                                   plugin="fake-devices")])


class MonitorTests(SynchronousTestCase):

    def setUp(self):
        self.clock = Clock()
        self.log, self.lines = capture()

    def monitor(self, *plugins, runner=sync_runner, **kw):
        monitor = DeviceMonitor(self.clock, list(plugins), interval=1.0, log=self.log,
                                run_in_thread=runner, **kw)
        self.addCleanup(monitor.stop)
        return monitor

    def test_start_polls_every_interval_until_stopped(self):
        plugin = ScriptedPlugin("p", gpu(free=8000))
        monitor = self.monitor(plugin)
        monitor.start()
        self.assertEqual(monitor.devices["gpu0"].free_mb, 8000)
        self.assertEqual(monitor.devices["gpu0"].plugin, "p")
        plugin.answer = [gpu(free=100)]
        self.clock.advance(1.0)
        self.assertEqual(monitor.devices["gpu0"].free_mb, 100)
        monitor.stop()
        calls = plugin.calls
        self.clock.advance(10)
        self.assertEqual(plugin.calls, calls)

    def test_refresh_returns_the_fresh_snapshot(self):
        monitor = self.monitor(ScriptedPlugin("a", gpu()), ScriptedPlugin("b", gpu("gpu1")))
        self.assertEqual(monitor.devices, {})
        snapshot = self.successResultOf(monitor.refresh())
        self.assertEqual(list(snapshot), ["gpu0", "gpu1"])

    def test_failing_plugin_keeps_last_devices_then_drops_them(self):
        good = ScriptedPlugin("good", gpu("cpu", "System RAM"))
        flaky = ScriptedPlugin("flaky", gpu())
        monitor = self.monitor(good, flaky, stale_after=30)
        self.successResultOf(monitor.refresh())
        flaky.answer = RuntimeError("GPU is lost")
        for _ in range(3):
            self.clock.advance(10)
            self.assertEqual(sorted(self.successResultOf(monitor.refresh())), ["cpu", "gpu0"])
        self.assertEqual(sum("GPU is lost" in line for line in self.lines), 1)
        self.clock.advance(1)
        self.assertEqual(list(self.successResultOf(monitor.refresh())), ["cpu"])
        flaky.answer = [gpu()]
        self.assertEqual(sorted(self.successResultOf(monitor.refresh())), ["cpu", "gpu0"])
        self.assertTrue(any("answers again" in line for line in self.lines))

    def test_plugin_failing_from_the_start_reports_nothing(self):
        bad = ScriptedPlugin("bad")
        bad.answer = ValueError("boom")
        monitor = self.monitor(bad, ScriptedPlugin("ok", gpu()))
        self.assertEqual(list(self.successResultOf(monitor.refresh())), ["gpu0"])

    def test_wrong_answers_count_as_failures(self):
        odd = ScriptedPlugin("odd")
        monitor = self.monitor(odd)
        for answer in ({"gpu0": gpu()}, [gpu(), "gpu1"], None):
            odd.answer = answer
            self.assertEqual(dict(self.successResultOf(monitor.refresh())), {})
        self.assertTrue(any("expected a list of Device" in line for line in self.lines))

    def test_hung_plugin_is_waited_for_once_and_not_called_again(self):
        hung = ScriptedPlugin("hung", gpu())
        quick = ScriptedPlugin("quick", gpu("cpu", "RAM"))
        pending = Deferred()

        def runner(f):
            if f == hung.devices:
                hung.calls += 1
                return pending
            return sync_runner(f)

        monitor = self.monitor(hung, quick, runner=runner, plugin_timeout=5)
        first = monitor.refresh()
        self.assertNoResult(first)
        self.clock.advance(5)
        self.assertEqual(list(self.successResultOf(first)), ["cpu"])
        self.assertTrue(any("no answer within 5 s" in line for line in self.lines))
        self.assertEqual(list(self.successResultOf(monitor.refresh())), ["cpu"])
        self.assertEqual(hung.calls, 1)
        pending.callback([gpu()])
        self.assertEqual(sorted(self.successResultOf(monitor.refresh())), ["cpu", "gpu0"])
        self.assertEqual(hung.calls, 2)

    def test_known_once_the_first_read_ends(self):
        """Before the first read ends an empty snapshot means "not read yet", not "no devices";
        a hung plugin delays that by at most the plugin timeout."""
        pending = Deferred()
        monitor = self.monitor(ScriptedPlugin("hung", gpu()), runner=lambda f: pending,
                               plugin_timeout=5)
        known = monitor.when_known()
        monitor.start()
        self.assertFalse(monitor.known)
        self.assertNoResult(known)
        self.clock.advance(5)
        self.assertTrue(monitor.known)
        self.assertEqual(dict(self.successResultOf(known)), {})
        self.assertEqual(dict(self.successResultOf(monitor.when_known())), {})

    def test_callers_during_a_read_get_a_later_read(self):
        plugin = ScriptedPlugin("p", gpu(free=1))
        answers: list[Deferred] = []

        def runner(f):
            answers.append(Deferred())
            return answers[-1]

        monitor = self.monitor(plugin, runner=runner)
        early = monitor.refresh()
        late1, late2 = monitor.refresh(), monitor.refresh()
        self.assertEqual(len(answers), 1)
        answers[0].callback([gpu(free=1)])
        self.assertEqual(self.successResultOf(early)["gpu0"].free_mb, 1)
        self.assertNoResult(late1)
        self.assertEqual(len(answers), 2)
        answers[1].callback([gpu(free=2)])
        self.assertEqual(self.successResultOf(late1)["gpu0"].free_mb, 2)
        self.assertEqual(self.successResultOf(late2)["gpu0"].free_mb, 2)

    def test_duplicate_ids_first_plugin_wins(self):
        monitor = self.monitor(ScriptedPlugin("nvml", gpu(name="A")),
                               ScriptedPlugin("extra", gpu(name="B")))
        for _ in range(3):
            self.assertEqual(self.successResultOf(monitor.refresh())["gpu0"].name, "A")
        self.assertEqual(sum("already reported by nvml" in line for line in self.lines), 1)

    def test_close_closes_plugins(self):
        plugin = ScriptedPlugin("p", gpu())
        monitor = self.monitor(plugin, SystemPlugin())
        monitor.start()
        self.successResultOf(monitor.close())
        self.assertTrue(plugin.closed)
        calls = plugin.calls
        self.clock.advance(5)
        self.assertEqual(plugin.calls, calls)

    def test_close_waits_for_a_query_still_running_and_leaves_no_timer(self):
        slow = ScriptedPlugin("slow", gpu())
        pending = Deferred()
        monitor = self.monitor(slow, plugin_timeout=5, runner=lambda f: (
            pending if f == slow.devices else sync_runner(f)))
        refreshed = monitor.refresh()
        closed = monitor.close()
        self.assertNoResult(closed)
        pending.callback([gpu()])
        self.assertIsNone(self.successResultOf(closed))
        self.assertEqual(list(self.successResultOf(refreshed)), ["gpu0"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_close_gives_up_on_a_hung_query_after_the_plugin_timeout(self):
        hung = ScriptedPlugin("hung", gpu())
        monitor = self.monitor(hung, plugin_timeout=5, runner=lambda f: (
            Deferred() if f == hung.devices else sync_runner(f)))
        monitor.refresh()
        closed = monitor.close()
        self.clock.advance(4.9)
        self.assertNoResult(closed)
        self.clock.advance(0.1)
        self.assertIsNone(self.successResultOf(closed))
        self.assertTrue(hung.closed)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class MonitorThreadTests(TestCase):
    """The default runner reads plugins in the reactor's thread pool."""

    async def test_reads_real_system_memory_in_a_thread(self):
        import threading
        threads = []

        @implementer(IDevicePlugin)
        class Recording(SystemPlugin):
            def devices(self):
                threads.append(threading.current_thread())
                return super().devices()

        monitor = DeviceMonitor(reactor, [Recording()], log=capture()[0])
        snapshot = await monitor.refresh()
        self.assertGreater(snapshot["cpu"].total_mb, 0)
        self.assertIsNot(threads[0], threading.main_thread())
