"""C{GET /metrics}: the node's state in Prometheus' text format, through prometheus_client.

Everything is read from the runtimes and the devices report at scrape time by a collector of
our own, registered in a registry of our own (never the process-global one), so two nodes in
one process never mix their numbers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.web.resource import Resource

from llmnode.lifecycle import STATES
from llmnode.scheduler import STOP_REASONS
from llmnode.web.responses import method_not_allowed

if TYPE_CHECKING:
    from prometheus_client import Metric
    from llmnode.web.request import WebRequest

    from llmnode.node import Node

#: Upper bounds (seconds) of the start-duration histogram's buckets.
START_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
#: Upper bounds (seconds) of the queue-wait histogram's buckets.
WAIT_BUCKETS = (0.005, 0.05, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


#: Per-model figures read straight off a runtime: (family, name, help, runtime attribute).
_PER_MODEL = (
    (GaugeMetricFamily, "llmnode_requests_in_flight", "Requests being served (streams included)",
     "in_flight"),
    (GaugeMetricFamily, "llmnode_requests_queued",
     "Requests waiting in the model's queue (for a start, a turn or a concurrency slot)",
     "queued"),
    (CounterMetricFamily, "llmnode_model_starts", "Backend starts begun", "starts"),
    (CounterMetricFamily, "llmnode_model_crashes", "Backends that died while running",
     "crashes"),
    (CounterMetricFamily, "llmnode_model_evictions",
     "Stops made to free memory for another model", "evictions"),
)


class NodeCollector:
    """Collects per-model and per-device figures from a node at scrape time."""

    def __init__(self, node: Node, devices: Callable[[], list[dict[str, Any]]]) -> None:
        self._node = node
        self._devices = devices

    def collect(self) -> Iterator[Metric]:
        runtimes = self._node.runtimes()
        state = GaugeMetricFamily("llmnode_model_state",
                                  "1 for the state the model is in, 0 for the others",
                                  labels=["model", "state"])
        requests = CounterMetricFamily("llmnode_requests",
                                       "Proxied requests that ended, by endpoint and status",
                                       labels=["model", "endpoint", "status"])
        per_model = [(family(name, text, labels=["model"]), attribute)
                     for family, name, text, attribute in _PER_MODEL]
        durations = HistogramMetricFamily("llmnode_model_start_duration_seconds",
                                          "Seconds from the start decision to readiness",
                                          labels=["model"])
        stops = CounterMetricFamily("llmnode_model_stops",
                                    "Backend stops by reason: idle, turn (its turn was over and "
                                    "another model waited), evict (idle, stopped to make room), "
                                    "admin, reload, crash, shutdown",
                                    labels=["model", "reason"])
        peaks = GaugeMetricFamily("llmnode_model_memory_peak_mb",
                                  "Most memory measured in use, per plan and device "
                                  "requirement (learned; kept across restarts)",
                                  labels=["model", "plan", "requirement"])
        loads = GaugeMetricFamily("llmnode_model_load_seconds",
                                  "Last measured load time (spawn to healthy), per plan",
                                  labels=["model", "plan"])
        waits = HistogramMetricFamily("llmnode_queue_wait_seconds",
                                      "Seconds a proxied request waited before it was sent "
                                      "(0 for those sent at once)", labels=["model"])
        for runtime in runtimes:
            model = runtime.model.id
            for name in STATES:
                state.add_metric([model, name], 1 if runtime.state == name else 0)
            for (endpoint, status), count in sorted(runtime.responses.items(),
                                                    key=lambda item: str(item[0])):
                requests.add_metric([model, endpoint or "", str(status)], count)
            for metric, attribute in per_model:
                metric.add_metric([model], getattr(runtime, attribute))
            observed = list(runtime.start_durations)
            buckets = [(str(bound), sum(1 for d in observed if d <= bound))
                       for bound in START_BUCKETS]
            buckets.append(("+Inf", len(observed)))
            durations.add_metric([model], buckets, sum_value=sum(observed))
            slot = runtime.slot
            for reason in STOP_REASONS:
                stops.add_metric([model, reason], slot.stops[reason])
            queued = list(slot.waits)
            at_once = slot.forwarded_at_once
            buckets = [(str(bound), at_once + sum(1 for w in queued if w <= bound))
                       for bound in WAIT_BUCKETS]
            buckets.append(("+Inf", at_once + len(queued)))
            waits.add_metric([model], buckets, sum_value=sum(queued))
            for plan, figures in runtime.node.costs.info(runtime.model).items():
                for requirement, mb in sorted(figures["learned_peak_mb"].items()):
                    peaks.add_metric([model, plan, requirement], mb)
                if figures["learned_load_s"] is not None:
                    loads.add_metric([model, plan], figures["learned_load_s"])
        yield state
        yield requests
        yield from (metric for metric, _ in per_model)
        yield durations
        yield stops
        yield waits
        yield peaks
        yield loads

        total = GaugeMetricFamily("llmnode_device_memory_total_mb", "Device memory, total",
                                  labels=["device", "name"])
        free = GaugeMetricFamily("llmnode_device_memory_free_mb",
                                 "Device memory free, as the device reports it",
                                 labels=["device", "name"])
        reserved = GaugeMetricFamily("llmnode_device_memory_reserved_mb",
                                     "Device memory reserved by llmnode's models",
                                     labels=["device", "name"])
        for device in self._devices():
            labels = [device["id"], device["name"]]
            total.add_metric(labels, device["total_mb"])
            free.add_metric(labels, device["free_mb"])
            reserved.add_metric(labels, device["reserved_mb"])
        yield from (total, free, reserved)


class MetricsResource(Resource):
    """The scrape endpoint."""

    isLeaf = True

    def __init__(self, node: Node, devices: Callable[[], list[dict[str, Any]]]) -> None:
        super().__init__()
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(NodeCollector(node, devices))

    def render_GET(self, request: WebRequest) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self._registry)

    def render(self, request: WebRequest) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            return method_not_allowed(request, ("GET",))
        answer: bytes = super().render(request)
        return answer
