"""Python function calls the node makes per proxied request (cProfile), a figure that does not
depend on the machine's speed or load: a change on the hot path shows in it at once.

Usage: python benchmarks/calls_per_request.py [--requests N] [--connections C] [--repo PATH]

Runs a node in this process (its one model is L{fast_backend}), warms it, then profiles N
small chat requests sent by C clients in a separate process (keep-alive, http.client), and
prints the calls per request (and the req/s under the profiler, which only compares runs made
back to back). C{--repo} measures another checkout (an older commit's worktree) with this
script and this Python. Everything it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

#: What each client process runs: argv = url, requests, connections.
_CLIENT = r"""
import http.client, json, sys, threading, urllib.parse
url, n, c = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
u = urllib.parse.urlsplit(url)
body = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "hi"}]}).encode()
def run(k):
    conn = http.client.HTTPConnection(u.hostname, u.port)
    for _ in range(k):
        conn.request("POST", u.path, body, {"Content-Type": "application/json"})
        answer = conn.getresponse(); answer.read()
        if answer.status != 200:
            sys.exit(f"status {answer.status}")
    conn.close()
threads = [threading.Thread(target=run, args=(n // c,)) for _ in range(c)]
[t.start() for t in threads]; [t.join() for t in threads]
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--repo", default=os.path.dirname(HERE),
                        help="the checkout to measure (default: this one)")
    options = parser.parse_args()
    repo = os.path.abspath(options.repo)
    sys.path.insert(0, repo)
    os.environ["PYTHONPATH"] = repo  # the backend's and the client's Python too

    import yaml
    from twisted.internet import defer, reactor, threads

    import llmnode
    from llmnode.config import load_config
    from llmnode.service import NodeService

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        backend_port = sock.getsockname()[1]
    folder = tempfile.mkdtemp(prefix="llmnode-calls-")
    backend = os.path.join(HERE, "fast_backend.py")
    config = {"host": "127.0.0.1", "port": 8080, "log_dir": "logs", "Local-Models": {
        "bench": {"mode": "Chat", "port": backend_port, "CPU": {
            "required_devices": ["cpu"], "memory_mb": {"cpu": 16},
            "script_path": f'"$LLMNODE_PYTHON" {backend} --port "$LLMNODE_PORT"'}}}}
    path = os.path.join(folder, "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    service = NodeService(load_config(path), reactor, host="127.0.0.1", port=0)
    profile = cProfile.Profile()

    def clients(count: int) -> None:
        url = f"http://127.0.0.1:{service.listening_port}/v1/chat/completions"
        subprocess.run([sys.executable, "-c", _CLIENT, url, str(count),
                        str(options.connections)], check=True)

    async def measure() -> None:
        service.startService()
        try:
            await service.when_ready()
            await threads.deferToThread(clients, 100)  # starts the model, warms the pools
            profile.enable()
            began = time.perf_counter()
            await threads.deferToThread(clients, options.requests)
            profile.disable()
            wall = time.perf_counter() - began
            calls = pstats.Stats(profile).total_calls  # type: ignore[attr-defined]
            print(f"{llmnode.__file__.rsplit('/llmnode/', 1)[0]}: "
                  f"{calls / options.requests:.1f} Python calls/request, "
                  f"{options.requests / wall:.0f} req/s under the profiler "
                  f"({options.requests} requests, {options.connections} connections)")
        finally:
            await service.stopService()

    done = defer.Deferred.fromCoroutine(measure())
    failed: list[object] = []

    def report(failure: object) -> None:
        failure.printTraceback()  # type: ignore[attr-defined]
        failed.append(failure)

    done.addErrback(report)
    done.addBoth(lambda _: reactor.stop())
    reactor.run()
    shutil.rmtree(folder, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
