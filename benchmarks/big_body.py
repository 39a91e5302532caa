"""How long /api/health takes to answer while the node routes a 50 MB JSON body.

Usage: python benchmarks/big_body.py [--mb 50] [--out FILE]

Starts a node (twistd, loopback only) with two models served by L{fast_backend} (one of them
with C{upstream_model}, so that the node rewrites the body), then, for each kind of body below,
sends one body of small JSON objects to C{/v1/chat/completions} while another connection asks
C{GET /api/health} every 5 ms. Prints, per kind: the health answers' worst and 99th-percentile
latency while the body was being sent and routed, how long the request took, and how much the
node's resident memory grew over its level before the request. Everything it starts is
stopped at the end.

Bodies (C{messages} is the bulk, about 35 bytes an object):
- model first, stream last (the usual client);
- model first, no stream;
- an unknown model;
- the model with C{upstream_model} (the node rewrites the model field);
- stream between two large members (the node must scan the middle of the body);
- four bodies of the first kind at once, on four connections.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def body_of(kind: str, megabytes: float) -> bytes:
    """A JSON body of about C{megabytes} MB, shaped as C{kind} says."""
    item = b'{"role":"user","content":"hi"},'
    count = int(megabytes * 1e6) // len(item)
    messages = b"[" + item * (count - 1) + item[:-1] + b"]"
    if kind in ("model first, stream last", "four at once"):
        return b'{"model":"bench","messages":' + messages + b',"stream":false}'
    if kind == "model first, no stream":
        return b'{"model":"bench","messages":' + messages + b',"max_tokens":5}'
    if kind == "unknown model":
        return b'{"model":"nobody","messages":' + messages + b"}"
    if kind == "upstream_model rewrite":
        return b'{"model":"renamed","messages":' + messages + b',"stream":false}'
    if kind == "stream in the middle":
        half = messages[:len(messages) // 2].rpartition(b"},")[0] + b"}]"
        return (b'{"model":"bench","messages":' + half + b',"stream":false,"tools":' + half
                + b"}")
    raise ValueError(kind)


KINDS = ("model first, stream last", "model first, no stream", "unknown model",
         "upstream_model rewrite", "stream in the middle", "four at once")


class Prober(threading.Thread):
    """Asks /api/health every 5 ms on one keep-alive connection; keeps each latency and the
    node's RSS."""

    def __init__(self, port: int, node: psutil.Process):
        super().__init__(daemon=True)
        self.port = port
        self.node = node
        self.latencies: list[float] = []
        self.rss: list[int] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        while not self.stopping.is_set():
            began = time.perf_counter()
            connection.request("GET", "/api/health")
            response = connection.getresponse()
            response.read()
            self.latencies.append(time.perf_counter() - began)
            self.rss.append(self.node.memory_info().rss)
            time.sleep(0.005)
        connection.close()


def measure(port: int, node: psutil.Process, kind: str, megabytes: float) -> dict:
    body = body_of(kind, megabytes)
    baseline = node.memory_info().rss
    prober = Prober(port, node)
    prober.start()
    time.sleep(0.2)
    skip = len(prober.latencies)
    began = time.perf_counter()
    statuses: list[int] = []
    senders = [threading.Thread(target=post, args=(port, body, statuses))
               for _ in range(4 if kind == "four at once" else 1)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    took = time.perf_counter() - began
    time.sleep(0.1)
    prober.stopping.set()
    prober.join()
    during = prober.latencies[skip:]
    return {"kind": kind, "body_mb": round(len(body) / 1e6, 1), "status": max(statuses),
            "request_s": round(took, 3), "health_answers": len(during),
            "health_max_ms": round(max(during) * 1000, 1),
            "health_p99_ms": round(statistics.quantiles(during, n=100, method="inclusive")[98] * 1000, 1)
            if len(during) >= 2 else None,
            "rss_growth_mb": round((max(prober.rss) - baseline) / 2**20, 1)}


def post(port: int, body: bytes, statuses: list) -> None:
    """POST C{body} to the chat endpoint; add the answer's status to C{statuses}."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.request("POST", "/v1/chat/completions", body=body,
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    connection.close()
    statuses.append(response.status)


def start_node(workdir: str) -> tuple[subprocess.Popen, int]:
    port, model_port, renamed_port = free_port(), free_port(), free_port()
    script = (f'exec "$LLMNODE_PYTHON" {os.path.join(HERE, "fast_backend.py")} '
              f'--port "$LLMNODE_PORT" --alarm 900')
    plan = {"required_devices": ["cpu"], "script_path": script, "memory_mb": {"cpu": 64}}
    config = {
        "program": {"host": "127.0.0.1", "port": port, "log_level": "INFO",
                    "log_dir": os.path.join(workdir, "logs"), "alive_time": 0,
                    "max_body_mb": 200},
        "Local-Models": {
            "bench": {"mode": "Chat", "port": model_port, "auto_start": True, "CPU": plan},
            "renamed": {"mode": "Chat", "port": renamed_port, "auto_start": True,
                        "upstream_model": "bench", "CPU": plan}},
    }
    path = os.path.join(workdir, "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    env = dict(os.environ, PYTHONPATH=ROOT)
    log = open(os.path.join(workdir, "node.log"), "wb")
    node = subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
         "--pidfile=", "llmnode", "--config", path], cwd=workdir, env=env, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if node.poll() is not None:
            raise RuntimeError(f"the node exited with {node.returncode}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/api/health")
            health = json.loads(connection.getresponse().read())
            connection.close()
            if health["models"].get("running") == 2:
                return node, port
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the node and its two models were not up within 60 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=50.0)
    parser.add_argument("--out", default=None, help="also write the results (text) here")
    args = parser.parse_args()
    signal.alarm(600)
    workdir = tempfile.mkdtemp(prefix="llmnode-big-body-")
    node, port = start_node(workdir)
    try:
        process = psutil.Process(node.pid)
        results = [measure(port, process, kind, args.mb) for kind in KINDS]
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
        shutil.rmtree(workdir, ignore_errors=True)
    commit = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip()
    lines = [f"big_body: {args.mb:g} MB bodies, commit {commit}, {os.cpu_count()} CPUs, "
             f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}, "
             f"Python {platform.python_version()}",
             "",
             f"{'body':<26} {'status':>6} {'request s':>9} {'health max ms':>13} "
             f"{'health p99 ms':>13} {'answers':>7} {'RSS +MB':>7}"]
    for r in results:
        lines.append(f"{r['kind']:<26} {r['status']:>6} {r['request_s']:>9} "
                     f"{r['health_max_ms']:>13} {str(r['health_p99_ms']):>13} "
                     f"{r['health_answers']:>7} {r['rss_growth_mb']:>7}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
