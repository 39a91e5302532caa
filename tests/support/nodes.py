"""Run a whole llmnode in the test's reactor, on loopback, over the bundled demo backend."""

from __future__ import annotations

import os
import sys
import tempfile

from treq.client import HTTPClient
import yaml
from twisted.internet import defer, reactor
from twisted.web.client import Agent, HTTPConnectionPool

import llmnode
from llmnode.config import load_config
from llmnode.service import NodeService
from tests.support.net import free_port  # noqa: F401 (the tests import it from here too)

PACKAGE_ROOT = os.path.dirname(os.path.dirname(llmnode.__file__))


def demo_model(port: int, mode: str = "Chat", flags: str = "", memory_mb: int = 64,
               device: str = "cpu", **keys) -> dict:
    """A model mapping served by the demo backend with extra command-line C{flags}."""
    script = (f'"$LLMNODE_PYTHON" -m llmnode.demo.backend --port "$LLMNODE_PORT" '
              f'--alarm 120 {flags}').strip()
    model = {"mode": mode, "port": port,
             "Plan": {"required_devices": [device], "script_path": script,
                      "memory_mb": {device: memory_mb}}}
    model.update(keys)
    return model


def write_config(testcase, models: dict, **program) -> str:
    """Write a config file into a fresh folder (removed after the test); return its path."""
    folder = tempfile.mkdtemp(prefix="llmnode-test-")
    testcase.addCleanup(_remove_tree, folder)
    settings = {"host": "127.0.0.1", "port": 8080, "log_dir": "logs", "health_interval": 0.02}
    settings.update(program)
    path = os.path.join(folder, "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"program": settings, "Local-Models": models}, f)
    return path


def _remove_tree(folder: str) -> None:
    import shutil
    shutil.rmtree(folder, ignore_errors=True)


async def start_node(testcase, models: dict, *, plugins=None, wait_ready: bool = True,
                     **program) -> NodeService:
    """Start a node on a free loopback port; it is stopped (and checked clean) after the test.

    @param wait_ready: return only once the node has read its devices (its health says C{ok}).
    """
    config = load_config(write_config(testcase, models, **program))
    service = NodeService(config, reactor, host="127.0.0.1", port=0, plugins=plugins)
    service.startService()
    testcase.addCleanup(_stop, service)
    if wait_ready:
        await service.when_ready()
    return service


async def _stop(service: NodeService) -> None:
    if service.running:
        await service.stopService()


def base_url(service: NodeService) -> str:
    return f"http://127.0.0.1:{service.listening_port}"


def http_client(testcase) -> HTTPClient:
    """A client with its own pool, closed after the test."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    testcase.addCleanup(pool.closeCachedConnections)
    return HTTPClient(Agent(reactor, pool=pool))


async def post_json(http, url: str, body) -> tuple[int, object, object]:
    """POST C{body} as JSON; return (status, decoded JSON or raw bytes, headers)."""
    import json
    response = await http.post(url, data=json.dumps(body).encode(),
                               headers={b"Content-Type": [b"application/json"]})
    content = await response.content()
    try:
        decoded = json.loads(content)
    except ValueError:
        decoded = content
    return response.code, decoded, response.headers


async def get_json(http, url: str) -> tuple[int, object]:
    import json
    response = await http.get(url)
    return response.code, json.loads(await response.content())


def sleep(seconds: float) -> defer.Deferred:
    d = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


def pids_alive(pids) -> list[int]:
    """Those of C{pids} that still exist (zombies count as gone)."""
    import psutil
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


if sys.platform != "linux":  # pragma: no cover
    raise ImportError("the node's integration helpers need Linux process groups")
