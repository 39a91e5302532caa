"""Two checks of issue 17's "done when": a large upload through the node, and a followed log.

Usage: python benchmarks/upload_and_logs.py [--mb 200] [--out FILE]

Starts a node (twistd, loopback only) with an Audio model served by the bundled demo backend
and a "ticker" model whose script prints the time five times a second (it never becomes
healthy, which does not matter: its output is logged while it starts). Then:

- sends one SIZE MB multipart upload to /v1/audio/transcriptions, model field first, twice:
  with the model already running (warm) and stopped (cold: the upload waits for its start),
  sampling the node's resident memory every 20 ms; prints the status, the time and the
  node's RSS growth (peak during the upload minus the level just before);
- follows /api/models/ticker/logs?follow=1 while the ticker starts and prints how long each
  printed time took to reach the follower (median and worst of the lines seen in 3 s).

Everything it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import yaml

BOUNDARY = "llmnode-bench-boundary"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_node(folder: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    demo = '"$LLMNODE_PYTHON" -m llmnode.demo.backend --port "$LLMNODE_PORT" --alarm 300'
    config = {
        "program": {"host": "127.0.0.1", "port": port, "log_dir": os.path.join(folder, "logs"),
                    "max_body_mb": 1024},
        "Local-Models": {
            "whisper": {"mode": "Audio", "port": free_port(),
                        "CPU": {"required_devices": ["cpu"], "script_path": demo}},
            "ticker": {"mode": "Chat", "port": free_port(), "start_timeout": 60,
                       "CPU": {"required_devices": ["cpu"],
                               "script_path": "while true; do date +%s.%N; sleep 0.2; done"}},
        },
    }
    path = os.path.join(folder, "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    node = subprocess.Popen([twistd, "-n", "--pidfile=", "llmnode", "--config", path],
                            stdout=open(os.path.join(folder, "node.out"), "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            return node, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the node did not listen")


def call(port: int, method: str, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                     f"Connection: close\r\n\r\n".encode())
        answer = b""
        while data := sock.recv(65536):
            answer += data
    return answer


def upload(port: int, node: psutil.Process, megabytes: int) -> str:
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"'
            f'\r\nContent-Type: audio/wav\r\n\r\n').encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    length = len(head) + megabytes * 2**20 + len(tail)
    time.sleep(0.5)
    before = node.memory_info().rss
    peak, done = [before], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], node.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n"
                     f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
                     f"Content-Length: {length}\r\nConnection: close\r\n\r\n".encode() + head)
        block = b"\x01" * 2**20
        for _ in range(megabytes):
            sock.sendall(block)
        sock.sendall(tail)
        answer = b""
        while data := sock.recv(65536):
            answer += data
    took = time.monotonic() - began
    done.set()
    sampler.join()
    status = answer.split(b"\r\n", 1)[0].decode()
    intact = f"{megabytes * 2**20} bytes".encode() in answer
    return (f"{status}, {took:.2f} s, body intact: {intact}; node RSS {before / 2**20:.1f} MiB "
            f"before, growth {(peak[0] - before) / 2**20:.1f} MiB")


def follow(port: int) -> str:
    delays = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /api/models/ticker/logs?follow=1&lines=0 HTTP/1.1\r\nHost: x\r\n\r\n")
        threading.Thread(target=call, args=(port, "POST", "/api/models/ticker/start?wait=false"),
                         daemon=True).start()
        sock.settimeout(0.5)
        buffered, end = b"", time.time() + 3
        while time.time() < end:
            try:
                buffered += sock.recv(65536)
            except socket.timeout:
                continue
            now = time.time()
            while b"\n\n" in buffered:
                event, buffered = buffered.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if b"data: " not in line:
                        continue
                    text = line.split(b"data: ", 1)[1].rsplit(b" ", 1)[-1]
                    try:
                        printed = float(text)
                    except ValueError:
                        continue
                    if now - 60 < printed <= now:  # a printed time, not the node's own note
                        delays.append((now - printed) * 1000)
    if not delays:
        return "no line reached the follower"
    return (f"{len(delays)} lines; from print to follower: median "
            f"{statistics.median(delays):.2f} ms, worst {max(delays):.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--out")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="llmnode-bench-")
    node, port = start_node(folder)
    lines = [f"upload_and_logs: {platform.python_version()}, {os.cpu_count()} CPUs, load "
             f"average {', '.join(f'{x:.2f}' for x in os.getloadavg())}"]
    try:
        process = psutil.Process(node.pid)
        call(port, "POST", "/api/models/whisper/start")
        lines.append(f"{args.mb} MB upload, model running: {upload(port, process, args.mb)}")
        call(port, "POST", "/api/models/whisper/stop")
        lines.append(f"{args.mb} MB upload, model stopped: {upload(port, process, args.mb)}")
        lines.append(f"log follow: {follow(port)}")
    finally:
        node.terminate()
        node.wait(60)
        shutil.rmtree(folder, ignore_errors=True)
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
