"""Benchmark llmnode's proxy: the same fast backend measured directly and through the node.

Usage: benchmarks/run [--quick] [--reps N]   (the wrapper picks a Python and installs wrk)
       python benchmarks/bench.py [--quick] [--reps N] [--out FILE]

Starts a node (twistd, loopback only) whose one model is L{fast_backend}, and measures, in
several repetitions that alternate direct and proxied runs, throughput and latency of small
chat requests (wrk), SSE timing, 1 MiB bodies, cold starts, a 1,000-request burst on a cold
model and the node's memory with 1,000 open streams. Chat and SSE runs also go through
L{bare_relay}, the least a Twisted relay can do, as a yardstick for this machine. Prints a table and writes it to
benchmarks/results/latest.md (quick.md with --quick; .rst and .json beside it). Everything it
starts is stopped at the end. C{--render JSON} rewrites the tables of an earlier run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass

import psutil
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from httpclient import Connection, fetch, request_bytes  # noqa: E402

MODEL = "bench"
#: Where the chat and SSE runs go: the backend itself, the bare relay, the node.
WITH_BARE = ("direct", "bare", "node")
CHAT_PATH = "/v1/chat/completions"
CHAT_BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()
WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('BENCHJSON {"requests":%%d,"duration_us":%%d,"p50_us":%%.0f,'
    .. '"p99_us":%%.0f,"errors":%%d,"status_errors":%%d}\\n', summary.requests,
    summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
"""


@dataclass(frozen=True)
class Settings:
    reps: int
    wrk_seconds: int
    connections: tuple
    sse_streams: int
    sse_parallel: int
    sse_chunks: int
    sse_interval: float
    big_requests: int
    cold_reps: int
    burst: int
    held_streams: int
    deadline_s: int


FULL = Settings(reps=5, wrk_seconds=3, connections=(1, 16, 64), sse_streams=16, sse_parallel=4,
                sse_chunks=20, sse_interval=0.01, big_requests=10, cold_reps=5, burst=1000,
                held_streams=1000, deadline_s=900)
QUICK = Settings(reps=1, wrk_seconds=1, connections=(1, 16, 64), sse_streams=4, sse_parallel=4,
                 sse_chunks=10, sse_interval=0.01, big_requests=3, cold_reps=1, burst=1000,
                 held_streams=1000, deadline_s=120)


# -- statistics and formatting --------------------------------------------------------------

def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def percentile(values, q: float):
    values = sorted(values)
    if not values:
        return None
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))]


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def spread(values, scale: float = 1.0, digits: int = 3) -> str:
    """'median (min–max)' of per-repetition values; just the value for a single one."""
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    if min(values) == max(values):
        return fmt(values[0], digits)
    low, mid, high = (fmt(v, digits) for v in (min(values), median(values), max(values)))
    return f"{mid} ({low}–{high})"


def ratios(through, direct):
    return [t / d for t, d in zip(through, direct) if t is not None and d]


class Report:
    """Sections of rows, rendered as Markdown and reStructuredText tables."""

    def __init__(self):
        self.preamble: list[str] = []
        self.sections: list[tuple[str, tuple, list, str]] = []

    def section(self, title: str, header: tuple, rows: list, note: str = "") -> None:
        self.sections.append((title, header, rows, note))

    def markdown(self) -> str:
        out = list(self.preamble) + [""]
        for title, header, rows, note in self.sections:
            out += [f"### {title}", ""]
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "|".join("---" for _ in header) + "|")
            out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
            out += ([""] + [note] if note else []) + [""]
        return "\n".join(out)

    def rst(self) -> str:
        out = list(self.preamble) + [""]
        for title, header, rows, note in self.sections:
            out += [title, "-" * len(title), ""]
            table = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
            widths = [max(len(r[i]) for r in table) for i in range(len(header))]
            line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
            out.append(line)
            for index, row in enumerate(table):
                out.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
                out.append(line.replace("-", "=") if index == 0 else line)
            out += ([""] + [note] if note else []) + [""]
        return "\n".join(out)


# -- processes ----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(method: str, port: int, path: str, timeout: float = 30.0):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                     data=b"{}" if method == "POST" else None,
                                     headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=timeout) as response:
        return response.status, json.loads(response.read() or b"null")


class Bench:
    """The node and its backend, in a scratch folder, and the measurements against them."""

    def __init__(self, settings: Settings, workdir: str, pidfile: str | None):
        self.settings = settings
        self.workdir = workdir
        self.pidfile = pidfile
        self.events_path = os.path.join(workdir, "backend-events.txt")
        self.node_port = free_port()
        self.model_port = free_port()
        self.bare_port = free_port()
        self.node: subprocess.Popen | None = None
        self.bare: subprocess.Popen | None = None
        self.node_log = None
        self.backend_pids: set[int] = set()
        self.results: dict = {}

    # node lifecycle

    def write_config(self) -> str:
        script = (f'exec "$LLMNODE_PYTHON" {os.path.join(HERE, "fast_backend.py")} '
                  f'--port "$LLMNODE_PORT" --events {self.events_path} --alarm 1800')
        config = {
            "program": {"host": "127.0.0.1", "port": self.node_port, "log_level": "INFO",
                        "log_dir": os.path.join(self.workdir, "logs"), "alive_time": 0},
            "Local-Models": {MODEL: {
                "mode": "Chat", "port": self.model_port, "start_timeout": 60,
                "CPU": {"required_devices": ["cpu"], "script_path": script,
                        "memory_mb": {"cpu": 64}}}},
        }
        path = os.path.join(self.workdir, "config.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(config, f)
        return path

    def start_node(self) -> None:
        config = self.write_config()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        env.pop("http_proxy", None)
        self.node_log = open(os.path.join(self.workdir, "node.log"), "wb")
        command = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                   "-n", "--pidfile=", "llmnode", "--config", config,
                   "--port", str(self.node_port)]
        self.node = subprocess.Popen(command, cwd=self.workdir, env=env, stdout=self.node_log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        if self.pidfile:
            with open(self.pidfile, "a") as f:
                f.write(f"{self.node.pid}\n")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.node.poll() is not None:
                raise RuntimeError(f"the node exited with {self.node.returncode}:\n"
                                   + self.node_log_tail())
            try:
                if http_json("GET", self.node_port, "/api/health", 2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the node did not answer /api/health within 60 s:\n"
                           + self.node_log_tail())

    def start_bare(self) -> None:
        """The yardstick: L{bare_relay} in front of the same backend."""
        path = os.path.join(self.workdir, "bare-relay.log")
        with open(path, "wb") as log:
            self.bare = subprocess.Popen(
                [sys.executable, os.path.join(HERE, "bare_relay.py"), "--port",
                 str(self.bare_port), "--backend-port", str(self.model_port), "--alarm", "1800"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if self.pidfile:
            with open(self.pidfile, "a") as f:
                f.write(f"{self.bare.pid}\n")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.bare.poll() is None:
            with open(path, "rb") as log:
                if log.readline().startswith(b"listening"):
                    return
            time.sleep(0.05)
        with open(path, "rb") as log:
            raise RuntimeError(f"bare_relay.py did not start: {log.read()[-2000:]!r}")

    def node_log_tail(self) -> str:
        try:
            with open(os.path.join(self.workdir, "node.log"), "rb") as f:
                return f.read()[-3000:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop_node(self) -> None:
        """SIGTERM the node (it stops its backends), then make sure nothing of ours is left."""
        bare = self.bare
        if bare is not None and bare.poll() is None:
            bare.kill()
            bare.wait(5)
        node = self.node
        if node is not None and node.poll() is None:
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait(5)
        for pid in self.backend_pids | {pid for pid, _ in self.read_events("start")}:
            try:
                process = psutil.Process(pid)
                if "fast_backend.py" in " ".join(process.cmdline()):
                    process.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        if self.node_log is not None:
            self.node_log.close()

    def read_events(self, kind: str, since: int = 0):
        """(pid-or-0, time) of the backend's event lines of C{kind} from byte C{since}."""
        try:
            with open(self.events_path) as f:
                f.seek(since)
                lines = f.read().splitlines()
        except OSError:
            return []
        found = []
        for line in lines:
            parts = line.split()
            if parts and parts[0] == kind:
                found.append((int(parts[2]) if kind == "start" else 0, float(parts[1])))
        return found

    def events_offset(self) -> int:
        try:
            return os.path.getsize(self.events_path)
        except OSError:
            return 0

    def backend_process(self) -> psutil.Process:
        starts = self.read_events("start")
        pid = starts[-1][0]
        self.backend_pids.add(pid)
        return psutil.Process(pid)

    def node_process(self) -> psutil.Process:
        return psutil.Process(self.node.pid)

    def ensure_started(self) -> None:
        status, info = http_json("POST", self.node_port, f"/api/models/{MODEL}/start", 60)
        if status != 200 or info.get("state") != "running":
            raise RuntimeError(f"could not start the model: {status} {info}")

    def stop_model(self) -> None:
        http_json("POST", self.node_port, f"/api/models/{MODEL}/stop", 60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if http_json("GET", self.node_port, f"/api/models/{MODEL}/info")[1]["state"] \
                    == "stopped":
                return
            time.sleep(0.05)
        raise RuntimeError("the model did not stop within 30 s")

    def starts(self) -> int:
        return http_json("GET", self.node_port, f"/api/models/{MODEL}/info")[1]["starts"]

    def target_port(self, target: str) -> int:
        return {"direct": self.model_port, "bare": self.bare_port}.get(target, self.node_port)

    @staticmethod
    def order(rep: int, targets: tuple = ("direct", "node")) -> tuple:
        """C{targets} in a different order in each repetition."""
        shift = rep % len(targets)
        return targets[shift:] + targets[:shift]

    # measurements

    async def wrk(self, port: int, connections: int, seconds: int) -> dict:
        script = os.path.join(self.workdir, "post.lua")
        if not os.path.exists(script):
            with open(script, "w") as f:
                f.write(WRK_SCRIPT % CHAT_BODY.decode())
        process = await asyncio.create_subprocess_exec(
            "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "-s", script,
            f"http://127.0.0.1:{port}{CHAT_PATH}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            output, _ = await asyncio.wait_for(process.communicate(), seconds + 20)
        except BaseException:
            process.kill()
            await process.wait()
            raise
        for line in output.decode(errors="replace").splitlines():
            if line.startswith("BENCHJSON "):
                return json.loads(line[len("BENCHJSON "):])
        raise RuntimeError(f"wrk printed no result:\n{output[-2000:].decode(errors='replace')}")

    async def small_chat(self) -> None:
        s = self.settings
        data = {c: {t: [] for t in WITH_BARE} for c in s.connections}
        node, backend = self.node_process(), self.backend_process()
        bare = psutil.Process(self.bare.pid)
        for rep in range(s.reps):
            for connections in s.connections:
                for target in self.order(rep, WITH_BARE):
                    proxy = bare if target == "bare" else node
                    node_cpu, backend_cpu = cpu(proxy), cpu(backend)
                    result = await self.wrk(self.target_port(target), connections, s.wrk_seconds)
                    result["node_cpu_s"] = cpu(proxy) - node_cpu
                    result["backend_cpu_s"] = cpu(backend) - backend_cpu
                    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
                    data[connections][target].append(result)
                    progress(f"chat c={connections} {target}: {result['rps']:.0f} req/s "
                             f"p99 {result['p99_us'] / 1000:.2f} ms errors "
                             f"{result['errors'] + result['status_errors']}")
        self.results["small_chat"] = data

    async def sse_round(self, port: int) -> list:
        s = self.settings
        body = json.dumps({"model": MODEL, "stream": True, "bench_chunks": s.sse_chunks,
                           "bench_interval": s.sse_interval,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        raw = request_bytes(CHAT_PATH, body, port)
        results = []

        async def one_client(count: int):
            connection = await Connection.open(port)
            try:
                for _ in range(count):
                    results.append(await asyncio.wait_for(connection.send(raw), 30))
            finally:
                connection.close()

        per_client = max(1, s.sse_streams // s.sse_parallel)
        await asyncio.gather(*(one_client(per_client) for _ in range(s.sse_parallel)))
        return results

    async def sse(self) -> None:
        data = {target: [] for target in WITH_BARE}
        for rep in range(self.settings.reps):
            for target in self.order(rep, WITH_BARE):
                responses = await self.sse_round(self.target_port(target))
                ttfb, first, delays, coalesced, events, bad = [], [], [], 0, 0, 0
                for r in responses:
                    if r.status != 200 or not r.events or r.events[-1][1] != b"data: [DONE]":
                        bad += 1
                        continue
                    ttfb.append(r.first_byte - r.sent)
                    first.append(r.first_event - r.sent)
                    for received, event in r.events[:-1]:
                        delays.append(received - json.loads(event[6:])["t"])
                    events += len(r.events)
                    coalesced += sum(n for n in r.read_sizes if n > 1)
                data[target].append({
                    "ttfb": median(ttfb), "first_event": median(first),
                    "delay_p50": median(delays), "delay_p99": percentile(delays, 99),
                    "coalesced": coalesced / events if events else None, "bad": bad,
                    "streams": len(responses)})
                progress(f"sse {target}: ttfb {median(ttfb) * 1000:.2f} ms, chunk delay p50 "
                         f"{median(delays) * 1000:.3f} ms, coalesced "
                         f"{100 * coalesced / max(1, events):.1f}%, failed {bad}")
        self.results["sse"] = data

    async def big_bodies(self) -> None:
        size = 1 << 20
        filler = "x" * (size - 100)
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": filler}]})
        body = body.encode()
        data = {"direct": [], "node": []}
        for rep in range(self.settings.reps):
            for target in self.order(rep):
                port = self.target_port(target)
                raw = request_bytes(CHAT_PATH, body, port)
                connection = await Connection.open(port)
                times, bad = [], 0
                try:
                    for _ in range(self.settings.big_requests):
                        r = await asyncio.wait_for(connection.send(raw), 30)
                        if r.status != 200 or r.headers.get("x-body-bytes") != str(len(body)):
                            bad += 1
                        times.append(r.end - r.sent)
                finally:
                    connection.close()
                data[target].append({"rtt": median(times), "bad": bad, "bytes": len(body)})
                progress(f"1 MiB {target}: {median(times) * 1000:.2f} ms, bad {bad}")
        self.results["big"] = data

    async def cold_starts(self) -> None:
        rows = []
        raw = request_bytes(CHAT_PATH, CHAT_BODY, self.node_port)
        for _ in range(self.settings.cold_reps):
            self.stop_model()
            since = self.events_offset()
            response = await fetch(self.node_port, raw, 60)
            marks = {kind: self.read_events(kind, since)
                     for kind in ("start", "listening", "health200", "v1")}
            if response.status != 200 or not all(marks.values()):
                raise RuntimeError(f"cold request: {response.status}, events {marks}")
            started, listening = marks["start"][0][1], marks["listening"][0][1]
            healthy, forwarded = marks["health200"][0][1], marks["v1"][0][1]
            self.backend_pids.add(marks["start"][0][0])
            rows.append({"spawn": started - response.sent, "listen": listening - started,
                         "noticed": healthy - listening, "lag": forwarded - healthy,
                         "answer": response.end - forwarded, "total": response.end - response.sent})
            progress(f"cold start: {rows[-1]['total'] * 1000:.1f} ms, health->forward "
                     f"{rows[-1]['lag'] * 1000:.2f} ms")
        self.results["cold"] = rows

    async def burst_once(self, port: int) -> dict:
        raw = request_bytes(CHAT_PATH, CHAT_BODY, port)
        node = self.node_process()
        node_before = cpu(node)
        cpu_before, wall_before = time.process_time(), time.monotonic()

        async def one():
            started = time.monotonic()
            try:
                response = await fetch(port, raw, 60)
            except (OSError, asyncio.TimeoutError):
                return None
            return response.end - started if response.status == 200 else None

        latencies = await asyncio.gather(*(one() for _ in range(self.settings.burst)))
        wall = time.monotonic() - wall_before
        ok = [t for t in latencies if t is not None]
        return {"answered": len(ok), "p50": median(ok), "p99": percentile(ok, 99),
                "max": max(ok) if ok else None, "wall": wall,
                "client_cpu_share": (time.process_time() - cpu_before) / wall,
                "node_cpu_us": (cpu(node) - node_before) / max(1, len(ok)) * 1e6}

    async def bursts(self) -> None:
        data = {"direct": [], "node": [], "cold": []}
        for rep in range(self.settings.reps):
            for target in self.order(rep):
                data[target].append(await self.burst_once(self.target_port(target)))
            self.stop_model()
            since, starts = self.events_offset(), self.starts()
            result = await self.burst_once(self.node_port)
            result["spawns"] = len(self.read_events("start", since))
            result["starts"] = self.starts() - starts
            data["cold"].append(result)
            for pid, _ in self.read_events("start", since):
                self.backend_pids.add(pid)
            for name in ("direct", "node", "cold"):
                r = data[name][-1]
                progress(f"burst {name}: {r['answered']}/{self.settings.burst} answered, p99 "
                         f"{(r['p99'] or 0) * 1000:.0f} ms, client cpu "
                         f"{r['client_cpu_share'] * 100:.0f}%"
                         + (f", spawns {r['spawns']}" if name == "cold" else ""))
        self.results["burst"] = data

    async def held_streams(self, when: str) -> None:
        """RSS of the node idle and with many SSE streams held open, then after they close."""
        count = self.settings.held_streams
        self.ensure_started()
        node = self.node_process()
        await asyncio.sleep(0.5)
        idle = node.memory_info().rss
        body = json.dumps({"model": MODEL, "stream": True, "bench_chunks": 2,
                           "bench_hold": 120, "messages": []}).encode()
        raw = request_bytes(CHAT_PATH, body, self.node_port)
        connections, pending = [], []
        try:
            for _ in range(count):
                connections.append(await Connection.open(self.node_port))
            pending = [c.send(raw) for c in connections]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if all(c._response.events for c in connections):
                    break
                await asyncio.sleep(0.05)
            opened = sum(1 for c in connections if c._response.events)
            await asyncio.sleep(0.5)
            held = node.memory_info().rss
            in_flight_open = http_json("GET", self.node_port,
                                       f"/api/models/{MODEL}/info")[1]["in_flight"]
        finally:
            for c in connections:
                c.close()
        await asyncio.gather(*pending, return_exceptions=True)
        in_flight = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            in_flight = http_json("GET", self.node_port, f"/api/models/{MODEL}/info")[1][
                "in_flight"]
            if in_flight == 0:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        after = node.memory_info().rss
        self.results.setdefault("memory", {})[when] = {
            "idle": idle, "held": held,
            "opened": opened, "in_flight_open": in_flight_open, "after": after,
            "in_flight_after": in_flight, "per_stream": (held - idle) / max(1, opened)}
        progress(f"memory {when}: idle {idle / 2**20:.1f} MiB, {opened} streams "
                 f"{held / 2**20:.1f} MiB, after close {after / 2**20:.1f} MiB")

    async def run(self) -> None:
        self.start_node()
        self.start_bare()
        self.results["started"] = time.time()
        self.results["load_before"] = os.getloadavg()
        self.results["commit"] = subprocess.run(
            ["git", "-C", ROOT, "describe", "--always", "--dirty"],
            capture_output=True, text=True).stdout.strip() or "?"
        await self.held_streams("fresh")
        await self.small_chat()
        await self.sse()
        await self.big_bodies()
        await self.cold_starts()
        await self.bursts()
        await self.held_streams("after")
        self.results["load_after"] = os.getloadavg()
        self.results["node_log_bytes"] = os.path.getsize(os.path.join(self.workdir, "node.log"))


def cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def progress(text: str) -> None:
    print(f"  {text}", file=sys.stderr, flush=True)


# -- the report -----------------------------------------------------------------------------

def build_report(results: dict, settings: Settings, quick: bool) -> Report:
    report = Report()
    commit = results["commit"]
    load = ", ".join(f"{x:.2f}" for x in results["load_after"])
    load_before = ", ".join(f"{x:.2f}" for x in results["load_before"])
    report.preamble = [
        f"llmnode benchmark ({'quick' if quick else 'full'}): commit {commit}, "
        f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(results['started']))}, "
        f"{os.cpu_count()} CPUs, load average at start {load_before}, at end {load}, Python "
        f"{platform.python_version()}, {platform.system()} {platform.release()}.",
        "",
        f"Figures: median over {settings.reps} repetition(s) (min–max in brackets); direct, "
        "bare-relay (chat and SSE) and through-llmnode runs take turns within each repetition; "
        "'ratio' is the median of the per-repetition ratios through/direct. 'direct' is the "
        "benchmark backend alone.",
        results.get("run_line", ""),
    ]

    chat = results["small_chat"]
    rows = []
    for connections, runs in chat.items():
        d, b, n = runs["direct"], runs.get("bare", []), runs["node"]
        get = lambda rs, k: [r[k] for r in rs]  # noqa: E731
        rows.append((connections, "req/s", spread(get(d, "rps")), spread(get(b, "rps")),
                     spread(get(n, "rps")),
                     spread(ratios(get(b, "rps"), get(d, "rps")), digits=2),
                     spread(ratios(get(n, "rps"), get(d, "rps")), digits=2)))
        for key, label in (("p50_us", "p50 latency ms"), ("p99_us", "p99 latency ms")):
            rows.append((connections, label, spread(get(d, key), 1e-3),
                         spread(get(b, key), 1e-3), spread(get(n, key), 1e-3),
                         spread(ratios(get(b, key), get(d, key)), digits=2),
                         spread(ratios(get(n, key), get(d, key)), digits=2)))
        per_request = lambda rs, k: [r[k] / r["requests"] * 1e6  # noqa: E731
                                     for r in rs if r["requests"]]
        rows.append((connections, "CPU µs/request",
                     f"backend {spread(per_request(d, 'backend_cpu_s'))}",
                     f"relay {spread(per_request(b, 'node_cpu_s'))}",
                     f"node {spread(per_request(n, 'node_cpu_s'))}", "", ""))
        errors = sum(r["errors"] + r["status_errors"] for r in d + b + n)
        if errors:
            rows.append((connections, "errors (all reps)", "", "", str(errors), "", ""))
    report.section(f"Small non-streaming chat (wrk, {settings.wrk_seconds} s per run)",
                   ("connections", "metric", "direct", "bare relay", "through llmnode",
                    "bare relay ratio", "llmnode ratio"), rows,
                   "'bare relay' is benchmarks/bare_relay.py: the least a Twisted relay does "
                   "(bytes passed as they are, no routing, checks or accounting); a yardstick "
                   "for what Python and Twisted cost on this machine.")

    sse = results["sse"]
    d, b, n = sse["direct"], sse.get("bare", []), sse["node"]
    rows = []
    for key, label, scale in (("ttfb", "time to first byte ms", 1e3),
                              ("first_event", "time to first event ms", 1e3),
                              ("delay_p50", "per-chunk one-way latency p50 ms", 1e3),
                              ("delay_p99", "per-chunk one-way latency p99 ms", 1e3),
                              ("coalesced", "events coalesced into a multi-event read %", 100)):
        dv, bv, nv = [r[key] for r in d], [r[key] for r in b], [r[key] for r in n]
        added = lambda through: [(t - a) * scale for a, t in zip(dv, through)  # noqa: E731
                                 if a is not None and t is not None]
        rows.append((label, spread(dv, scale), spread(bv, scale), spread(nv, scale),
                     spread(added(bv)), spread(added(nv))))
    failed = sum(r["bad"] for r in d + b + n)
    report.section(
        f"SSE ({settings.sse_streams} streams x {settings.sse_chunks} events, "
        f"{settings.sse_interval * 1000:g} ms apart, {settings.sse_parallel} at a time)",
        ("metric", "direct", "bare relay", "through llmnode", "added by the bare relay",
         "added by llmnode"), rows,
        f"One-way latency: backend send stamp to client read. Failed streams: {failed}.")

    big = results["big"]
    dv, nv = [r["rtt"] for r in big["direct"]], [r["rtt"] for r in big["node"]]
    bad = sum(r["bad"] for r in big["direct"] + big["node"])
    report.section(
        f"1 MiB request bodies ({settings.big_requests} per run, one keep-alive connection)",
        ("metric", "direct", "through llmnode", "added by llmnode"),
        [("round trip ms", spread(dv, 1e3), spread(nv, 1e3),
          spread([(b - a) * 1e3 for a, b in zip(dv, nv)]))],
        f"Wrong or failed answers: {bad}.")

    cold = results["cold"]
    rows = [(label, spread([r[key] for r in cold], 1e3)) for key, label in (
        ("spawn", "request sent → backend process running (sh + Python start)"),
        ("listen", "backend running → listening"),
        ("noticed", "listening → first 200 on /health (node's poll)"),
        ("lag", "first 200 on /health → request forwarded (node lag)"),
        ("answer", "forwarded → answer at the client"),
        ("total", "whole cold request"))]
    report.section(f"Cold start through llmnode ({len(cold)} starts)", ("step", "ms"), rows)

    burst = results["burst"]
    rows = []
    for key, label, scale in (("answered", "answered (200)", 1), ("p50", "p50 ms", 1e3),
                              ("p99", "p99 ms", 1e3), ("max", "max ms", 1e3),
                              ("wall", "all answered after ms", 1e3),
                              ("client_cpu_share", "client CPU / wall %", 100),
                              ("node_cpu_us", "node CPU µs/request", 1)):
        rows.append((label,) + tuple(
            "-" if (name, key) == ("direct", "node_cpu_us")
            else spread([r[key] for r in burst[name]], scale)
            for name in ("direct", "node", "cold")))
    rows.append(("backend spawns (events log / info starts)", "-", "-",
                 f"{spread([r['spawns'] for r in burst['cold']])} / "
                 f"{spread([r['starts'] for r in burst['cold']])}"))
    report.section(
        f"{settings.burst} concurrent requests (one connection each)",
        ("metric", "direct (warm)", "through llmnode, warm", "through llmnode, cold model"),
        rows, "The client is one asyncio process with raw sockets; its CPU share shows it "
              "was not the limit.")

    memory = results["memory"]
    fresh, after = memory["fresh"], memory["after"]
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    rows = [("idle, model running", mib(fresh["idle"]), mib(after["idle"])),
            (f"{fresh['opened']} / {after['opened']} open SSE streams", mib(fresh["held"]),
             mib(after["held"])),
            ("growth per open stream (KiB)", f"{fresh['per_stream'] / 1024:.1f}",
             f"{after['per_stream'] / 1024:.1f}"),
            ("after the clients closed them", mib(fresh["after"]), mib(after["after"])),
            ("in-flight requests: while open / after close",
             f"{fresh['in_flight_open']} / {fresh['in_flight_after']}",
             f"{after['in_flight_open']} / {after['in_flight_after']}")]
    report.section("Node memory (RSS, MiB)",
                   ("state", "freshly started node", "after all the runs above"), rows,
                   "Streams: one event, then held open by the backend until the client "
                   "closes; node-side growth only.")
    return report


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 8192 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


async def main_async(bench: Bench, settings: Settings) -> None:
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    signal.alarm(settings.deadline_s)
    try:
        await bench.run()
    finally:
        signal.alarm(0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run, under a minute")
    parser.add_argument("--reps", type=int, help="repetitions (default 5, quick 1)")
    parser.add_argument("--out", help="where to write the Markdown table (.rst and .json beside "
                        "it); default benchmarks/results/latest.md, or quick.md with --quick")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--render", metavar="JSON",
                        help="only rewrite the tables from the raw results of an earlier run")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    args.out = args.out or os.path.join(HERE, "results", "quick.md" if args.quick else "latest.md")
    if args.reps:
        settings = Settings(**{**settings.__dict__, "reps": args.reps})
    if args.render:
        with open(args.render) as f:
            results = json.load(f)
        settings = Settings(**{**results["settings"], "connections": ()})
        write_report(build_report(results, settings, results["quick"]), results, args.out)
        return 0
    if shutil.which("wrk") is None:
        print("wrk is not installed (benchmarks/run installs it)", file=sys.stderr)
        return 2
    raise_fd_limit()
    workdir = tempfile.mkdtemp(prefix="llmnode-bench-")
    bench = Bench(settings, workdir, os.environ.get("LLMNODE_BENCH_PIDFILE"))
    started = time.monotonic()
    print(f"benchmarking in {workdir} (node :{bench.node_port}, backend :{bench.model_port})",
          file=sys.stderr, flush=True)
    try:
        asyncio.run(main_async(bench, settings))
    except asyncio.CancelledError:
        print("benchmark cancelled (deadline or signal)", file=sys.stderr)
        return 1
    finally:
        bench.stop_node()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report = build_report(bench.results, settings, args.quick)
    bench.results["settings"] = settings.__dict__
    bench.results["quick"] = args.quick
    bench.results["run_line"] = (f"Run time {time.monotonic() - started:.0f} s; command: "
                                 f"benchmarks/run{' --quick' if args.quick else ''}"
                                 f"{f' --reps {args.reps}' if args.reps else ''}.")
    report = build_report(bench.results, settings, args.quick)
    print(report.markdown())
    write_report(report, bench.results, args.out)
    return 0


def write_report(report: Report, results: dict, out: str) -> None:
    """The Markdown table at C{out}; the reST table and the raw results beside it."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    stem = os.path.splitext(out)[0]
    with open(out, "w") as f:
        f.write(report.markdown())
    with open(stem + ".rst", "w") as f:
        f.write(report.rst())
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    sys.exit(main())
