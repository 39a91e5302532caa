"""The deployment files agree with each other and with the node (no container engine needed).

The image itself is built and run by .ci/container-check; the Kubernetes schemas are checked by
.ci/validate-manifests.
"""

from __future__ import annotations

import json
import os
import re

import yaml
from twisted.trial import unittest

from llmnode.config import ConfigError, parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def _dockerfile() -> dict:
    """The Dockerfile's last USER, EXPOSE, CMD and HEALTHCHECK URL."""
    text = _read("Dockerfile").replace("\\\n", " ")
    last = lambda word: re.findall(rf"^{word}\s+(.+)$", text, re.M)[-1].strip()  # noqa: E731
    return {"user": last("USER"), "expose": int(last("EXPOSE")), "cmd": json.loads(last("CMD")),
            "health": re.search(r"http://127\.0\.0\.1:(\d+)(/\S+?)'", text).groups()}


def _manifests() -> dict:
    docs = {}
    folder = os.path.join(ROOT, "deploy", "kubernetes")
    for name in sorted(os.listdir(folder)):
        for doc in yaml.safe_load_all(_read("deploy", "kubernetes", name)):
            if doc:
                docs[doc["kind"]] = doc
    return docs


def _option(args: list, name: str) -> str:
    return args[args.index(name) + 1]


class ImageTests(unittest.TestCase):
    def test_commandServesOnTheExposedPortOnEveryInterface(self):
        image = _dockerfile()
        self.assertEqual(_option(image["cmd"], "--host"), "0.0.0.0")
        self.assertEqual(int(_option(image["cmd"], "--port")), image["expose"])
        self.assertEqual(image["health"], (str(image["expose"]), "/api/health"))

    def test_runsAsNonRoot(self):
        self.assertNotIn(_dockerfile()["user"], ("0", "root"))

    def test_composeMountsTheConfigWhereTheImageReadsIt(self):
        image = _dockerfile()
        service = yaml.safe_load(_read("docker-compose.yml"))["services"]["llmnode"]
        targets = [re.sub(r":(ro|rw)$", "", v).rsplit(":", 1)[1] for v in service["volumes"]]
        self.assertIn(_option(image["cmd"], "--config"), targets)
        self.assertIn(_option(image["cmd"], "--log-dir"), targets)
        self.assertIn(f"8080:{image['expose']}", service["ports"])


class KubernetesTests(unittest.TestCase):
    def setUp(self):
        self.docs = _manifests()
        self.pod = self.docs["DaemonSet"]["spec"]["template"]["spec"]
        self.container = self.pod["containers"][0]
        self.text = self.docs["ConfigMap"]["data"]["config.yaml"]

    def config(self):
        return parse_config(self.text, base_dir="/etc/llmnode",
                            environ={"LLMNODE_API_KEY": "a-key"})

    def test_configListensOnTheContainerPort(self):
        program = self.config().program
        self.assertEqual(program.host, "0.0.0.0")
        ports = [p["containerPort"] for p in self.container["ports"]]
        self.assertEqual(ports, [program.port])
        self.assertEqual(_option(self.container["args"], "--port"), str(program.port))

    def test_configRefusesToStartWithoutTheApiKey(self):
        self.assertRaises(ConfigError, parse_config, self.text, base_dir="/etc/llmnode",
                          environ={})

    def test_logsAndStateAreOnWritableVolumes(self):
        program = self.config().program
        writable = [m["mountPath"] for m in self.container["volumeMounts"]
                    if not m.get("readOnly")]
        for folder in (program.log_dir, program.runtime_dir,
                       _option(self.container["args"], "--log-dir")):
            self.assertTrue(any(folder == m or folder.startswith(m + "/") for m in writable),
                            f"{folder} is not on a writable volume: {writable}")
        self.assertTrue(self.container["securityContext"]["readOnlyRootFilesystem"])

    def test_podRunsAsTheImageUserOnGpuMachines(self):
        self.assertEqual(str(self.pod["securityContext"]["runAsUser"]), _dockerfile()["user"])
        self.assertIs(self.pod["securityContext"]["runAsNonRoot"], True)
        self.assertEqual(self.pod["nodeSelector"], {"nvidia.com/gpu.present": "true"})
        self.assertIn("nvidia.com/gpu", self.container["resources"]["limits"])

    def test_probesAskTheHealthEndpoint(self):
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            self.assertEqual(self.container[probe]["httpGet"]["path"], "/api/health")
            self.assertEqual(self.container[probe]["httpGet"]["port"], "http")

    def test_serviceReachesThePods(self):
        service = self.docs["Service"]["spec"]
        labels = self.docs["DaemonSet"]["spec"]["template"]["metadata"]["labels"]
        self.assertLessEqual(service["selector"].items(), labels.items())
        self.assertEqual(service["ports"][0]["targetPort"], "http")


class LiteLLMTests(unittest.TestCase):
    def setUp(self):
        self.config = yaml.safe_load(_read("deploy", "litellm", "config.yaml"))
        self.entries = self.config["model_list"]

    def test_everyDeploymentIsAnOpenAIEndpointOfANode(self):
        for entry in self.entries:
            params = entry["litellm_params"]
            self.assertEqual(params["model"], "openai/" + entry["model_name"])
            self.assertRegex(params["api_base"], r"^http://[^/]+:\d+/v1$")
            self.assertGreaterEqual(params["timeout"], 60, "too short for a cold start")

    def test_fallbacksNameExistingGroups(self):
        groups = {e["model_name"] for e in self.entries}
        fallbacks = self.config["router_settings"]["fallbacks"]
        self.assertTrue(fallbacks)
        for rule in fallbacks:
            for source, targets in rule.items():
                self.assertLessEqual({source, *targets}, groups)

    def test_someGroupSpansTwoNodes(self):
        nodes = {}
        for entry in self.entries:
            nodes.setdefault(entry["model_name"], set()).add(entry["litellm_params"]["api_base"])
        self.assertTrue(any(len(bases) > 1 for bases in nodes.values()))
