"""Scheduling under memory pressure, as a user sees it: a trace replayer with five scenarios.

Each scenario starts a fresh node (twistd, loopback only) whose models each need 60 % of one
fixed 10,000 MB device (so only one fits at a time), take 1 s to load, and stream answers from
the bundled demo backend. Clients are threads speaking plain HTTP/1.1.

  starve      4 clients keep A busy with back-to-back 0.5 s streams; one request for B
              arrives 3 s in (repeated --runs times)
  duel        2 clients on A and 2 on B loop 0.3 s streams for 20 s
  interleave  12 requests A B C A B C ... 20 ms apart
  herd        200 concurrent requests to a cold model whose backend is Python's http.server
              (listen backlog 5)
  mixed       2 clients loop chat streams, 2 clients loop embeddings, for 15 s

Prints, per scenario: served, starts, p50/p99/max wait (request sent -> answer complete),
failed (non-200 or connection error), cut (a stream that ended without [DONE]); and writes
the table to benchmarks/results/scheduling.md.

    .venv/bin/python benchmarks/scheduling.py [--runs 3] [--only starve,duel]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import yaml

#: Program settings added to every scenario's node (--set KEY=VALUE); none: node defaults.
EXTRA: dict = {}

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

PLUGIN = '''
from zope.interface import implementer
from llmnode.devices.interfaces import Device, IDevicePlugin

@implementer(IDevicePlugin)
class Fixed:
    """One 10,000 MB device: memory as the node reserves it, not as the host has it."""
    name = "bench"
    def devices(self):
        return [Device(id="bench0", kind="cpu", name="Bench device", total_mb=10000,
                       free_mb=10000, plugin=self.name)]

def plugins():
    return [Fixed()]
'''


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo(port: int, mode: str = "Chat", load: float = 1.0) -> dict:
    script = (f'"$LLMNODE_PYTHON" -m llmnode.demo.backend --port "$LLMNODE_PORT" '
              f'--alarm 600 --start-delay {load} --chunk-interval 0.05')
    return {"mode": mode, "port": port,
            "Plan": {"required_devices": ["bench0"], "script_path": script,
                     "memory_mb": {"bench0": 6000}}}


class Node:
    """A node in a subprocess, on a temporary folder."""

    def __init__(self, models: dict, **program):
        self.folder = tempfile.mkdtemp(prefix="llmnode-sched-")
        os.makedirs(os.path.join(self.folder, "plugins"))
        with open(os.path.join(self.folder, "plugins", "fixed.py"), "w") as f:
            f.write(PLUGIN)
        self.port = free_port()
        settings = {"host": "127.0.0.1", "port": self.port, "log_dir": "logs",
                    "device_plugin_dir": "plugins", "health_interval": 0.02}
        settings.update(program)
        settings.update(EXTRA)
        self.config = os.path.join(self.folder, "config.yaml")
        with open(self.config, "w") as f:
            yaml.safe_dump({"program": settings, "Local-Models": models}, f)
        self.log = open(os.path.join(self.folder, "node.out"), "wb")
        env = dict(os.environ, PYTHONPATH=ROOT)
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
             "--pidfile=", "llmnode", "--config", self.config],
            cwd=self.folder, env=env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if self.get("/api/health")["status"]:
                    break
            except (OSError, ValueError, KeyError):
                time.sleep(0.05)
        else:
            raise RuntimeError("the node did not start:\n" + self.tail())
        # The first device reading arrives within a second.
        while not self.get("/api/health").get("devices"):
            time.sleep(0.05)

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
            return json.loads(r.read())

    def starts(self) -> int:
        return sum(m["starts"] for m in self.get("/api/models")["models"])

    def tail(self) -> str:
        with open(os.path.join(self.folder, "node.out"), "rb") as f:
            return f.read()[-3000:].decode("utf-8", "replace")

    def close(self) -> None:
        if os.environ.get("BENCH_KEEP"):
            print(self.tail())
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)


class Results:
    """Every request's outcome, thread-safe."""

    def __init__(self):
        self.lock = threading.Lock()
        self.records: list[dict] = []

    def add(self, **record) -> None:
        with self.lock:
            self.records.append(record)


def call(port: int, model: str, results: Results, *, stream: bool = True, chunks: int = 10,
         endpoint: str = "/v1/chat/completions", timeout: float = 120.0) -> dict:
    """One request; records model, sent, done, status, cut."""
    if endpoint.endswith("embeddings"):
        body = {"model": model, "input": "hello"}
        stream = False
    else:
        # The demo backend streams one chunk per 0.05 s (chunk_interval below).
        body = {"model": model, "stream": stream, "chunks": chunks,
                "messages": [{"role": "user", "content": "x " * chunks}]}
    sent = time.monotonic()
    status, cut, error = 0, False, ""
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        connection.request("POST", endpoint, json.dumps(body),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        status = response.status
        data = response.read()
        if stream and status == 200:
            cut = b"data: [DONE]" not in data
        connection.close()
    except (OSError, http.client.HTTPException) as e:
        error = str(e) or type(e).__name__
    record = dict(model=model, sent=sent, done=time.monotonic(), status=status, cut=cut,
                  error=error)
    results.add(**record)
    return record


def loop(port: int, model: str, results: Results, until: float, **kw) -> None:
    while time.monotonic() < until:
        call(port, model, results, **kw)


def percentile(values: list, q: float):
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary(name: str, records: list, starts: int, note: str = "") -> dict:
    waits = [r["done"] - r["sent"] for r in records]
    ok = [r for r in records if r["status"] == 200 and not r["cut"]]
    return {"scenario": name, "served": len(ok), "starts": starts,
            "p50": percentile(waits, 0.5), "p99": percentile(waits, 0.99),
            "max": max(waits) if waits else None,
            "failed": sum(1 for r in records if r["status"] != 200),
            "cut": sum(1 for r in records if r["cut"]), "note": note}


def threads(targets) -> None:
    running = [threading.Thread(target=t, daemon=True) for t in targets]
    for t in running:
        t.start()
    for t in running:
        t.join()


# -- scenarios -------------------------------------------------------------------------------

def starve(runs: int) -> list:
    rows = []
    for run in range(runs):
        node = Node({"sa": demo(free_port()), "sb": demo(free_port())})
        try:
            results = Results()
            began = time.monotonic()
            stop_at = [began + 60]
            b_record: dict = {}

            def b_client():
                time.sleep(3)
                b_record.update(call(node.port, "sb", results, chunks=6))
                stop_at[0] = time.monotonic() + 3

            def a_client():
                while time.monotonic() < stop_at[0]:
                    call(node.port, "sa", results, chunks=10)

            threads([a_client] * 4 + [b_client])
            a_after = [r for r in results.records if r["model"] == "sa"
                       and b_record and r["sent"] > b_record["done"] and r["status"] == 200]
            b_wait = b_record["done"] - b_record["sent"] if b_record else float("nan")
            row = summary(f"starve #{run + 1}", results.records, node.starts(),
                          f"B answered in {b_wait:.2f} s (status {b_record.get('status')}); "
                          f"A served {len(a_after)} after B")
            row["b_wait"] = b_wait
            rows.append(row)
        finally:
            node.close()
    return rows


def duel() -> list:
    node = Node({"sa": demo(free_port()), "sb": demo(free_port())})
    try:
        results = Results()
        until = time.monotonic() + 20
        threads([lambda m=m: loop(node.port, m, results, until, chunks=6)
                 for m in ("sa", "sa", "sb", "sb")])
        return [summary("duel (20 s)", results.records, node.starts())]
    finally:
        node.close()


def interleave() -> list:
    node = Node({"sa": demo(free_port()), "sb": demo(free_port()), "sc": demo(free_port())})
    try:
        results = Results()
        targets = []
        for i in range(12):
            model = ("sa", "sb", "sc")[i % 3]

            def one(model=model, delay=i * 0.02):
                time.sleep(delay)
                call(node.port, model, results, chunks=6)

            targets.append(one)
        threads(targets)
        return [summary("interleave (12)", results.records, node.starts())]
    finally:
        node.close()


def herd() -> list:
    script = (f'"$LLMNODE_PYTHON" {os.path.join(HERE, "backlog_backend.py")} '
              f'--port "$LLMNODE_PORT" --start-delay 1 --delay 0.05')
    node = Node({"herd": {"mode": "Chat", "port": free_port(),
                          "Plan": {"required_devices": ["bench0"], "script_path": script,
                                   "memory_mb": {"bench0": 6000}}}})
    try:
        results = Results()
        threads([lambda: call(node.port, "herd", results, stream=False, timeout=90)] * 200)
        return [summary("herd (200 cold)", results.records, node.starts(),
                        "backend: http.server, listen backlog 5")]
    finally:
        node.close()


def mixed() -> list:
    node = Node({"chat": demo(free_port()), "embed": demo(free_port(), mode="Embedding")})
    try:
        results = Results()
        until = time.monotonic() + 15
        threads([lambda: loop(node.port, "chat", results, until, chunks=8)] * 2
                + [lambda: loop(node.port, "embed", results, until,
                                endpoint="/v1/embeddings")] * 2)
        chat = [r for r in results.records if r["model"] == "chat"]
        embed = [r for r in results.records if r["model"] == "embed"]
        return [summary("mixed chat+embed (15 s)", results.records, node.starts(),
                        f"chat {sum(r['status'] == 200 for r in chat)}, "
                        f"embeddings {sum(r['status'] == 200 for r in embed)}")]
    finally:
        node.close()


def fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(rows: list) -> str:
    lines = ["| scenario | served | starts | p50 wait s | p99 wait s | max wait s | failed | cut |"
             " note |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scenario']} | {r['served']} | {r['starts']} | {fmt(r['p50'])} | "
                     f"{fmt(r['p99'])} | {fmt(r['max'])} | {r['failed']} | {r['cut']} | "
                     f"{r['note']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="repetitions of starve")
    parser.add_argument("--only", default="starve,duel,interleave,herd,mixed")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "scheduling.md"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a program setting for the nodes (default: node defaults)")
    args = parser.parse_args()
    for item in args.set:
        key, _, value = item.partition("=")
        EXTRA[key] = yaml.safe_load(value)
    chosen = args.only.split(",")
    rows = []
    for name in chosen:
        found = {"starve": lambda: starve(args.runs), "duel": duel, "interleave": interleave,
                 "herd": herd, "mixed": mixed}[name]()
        for row in found:
            print(table([row]).splitlines()[-1], flush=True)
        rows += found
    text = table(rows)
    print()
    print(text)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    with open(args.out, "w") as f:
        f.write(f"# Scheduling benchmark ({commit}, `benchmarks/scheduling.py --runs "
                f"{args.runs}`)\n\nModels need 60 % of one device each (only one fits), load "
                f"in 1 s; node defaults.\n\n{text}\n")


if __name__ == "__main__":
    main()
