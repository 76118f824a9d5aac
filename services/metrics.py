"""Prometheus metrics of the services, served over HTTP by `--metrics-port`.

Every endpoint has its own `CollectorRegistry` and never uses prometheus_client's global default
registry, because `sdrm line` runs several services in one process and tests create many.
`sdrm line` serves one endpoint for all its services. Its device subprocesses serve their own
endpoints on free ports of 127.0.0.1, and the line's endpoint reads and merges them at every
scrape.

Every sample carries the labels `line`, `service` and `instance` (the camera id for ingest, the
device id for a device, the `--id` of the other services).

Counters are not incremented here. They are read at scrape time from the Bus's `Counters`, so a
counter that a service adds later appears without more wiring. Its dotted name maps to a family
by the first matching rule:

====================================  ================================================
Counters name                         family {extra labels}
====================================  ================================================
published.<topic>                     sdrm_messages_published_total {topic}
received.unmatched_topic.<topic>      sdrm_messages_unmatched_total (all topics summed)
received.<topic>                      sdrm_messages_received_total {topic}
dropped.<topic>.<reason>              sdrm_messages_dropped_total {topic, reason}
frames_dropped.<reason>               sdrm_messages_dropped_total {topic="frame", reason}
blocks_dropped.<reason>               sdrm_messages_dropped_total {topic="blocks", reason}
connection.lost                       sdrm_mqtt_reconnects_total
connect.<reason>                      sdrm_mqtt_connect_failures_total {reason}
verdicts.<status>.<label>             sdrm_verdicts_published_total {status, label}
errors.<kind>                         sdrm_errors_total {kind} (Bus.report_error)
<part>_<error suffix>[.<reason>]      sdrm_errors_total {kind=<whole name>}
<operation>.<error outcome>           sdrm_errors_total {kind=<whole name>}
any other name                        sdrm_events_total {event=<whole name>}
====================================  ================================================

`ERROR_SUFFIXES` and `ERROR_OUTCOMES` list the error suffixes and outcomes. Names that start
with "verdicts" are never errors, because the cause of an error verdict is counted where it
happened. `received.frame` and `published.frame` also count in sdrm_frames_received_total and
sdrm_frames_published_total.

Gauges are read at scrape time too: sdrm_mqtt_connected (1 or 0), sdrm_queue_depth and
sdrm_queue_capacity (items). The histogram sdrm_stage_latency_seconds {stage} takes the stage
times that the services already measure, converted from milliseconds to seconds.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import structlog
from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

log = structlog.get_logger("sdrm.metrics")

BASE_LABELS = ("line", "service", "instance")
# Seconds, from 1 ms (a decode) to 10 s (a frame that waited for its deadline).
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ERROR_SUFFIXES = ("_invalid", "_failed", "_error", "_missing", "_skipped", "_unacknowledged", "_rejected")
# Last parts of "<operation>.<outcome>" names that count errors, such as "publish.refused".
ERROR_OUTCOMES = ("failed", "refused", "invalid", "error")
# Counters named "<prefix>.<reason>" that count dropped messages of the topic named here.
DROP_PREFIXES = {"frames_dropped": "frame", "blocks_dropped": "blocks"}
REMOTE_TIMEOUT_S = 2.0


class MetricsError(RuntimeError):
    """Raised when the metrics endpoint cannot start, e.g. because its port is in use."""


@dataclass(frozen=True)
class CounterFamily:
    """A counter family derived from Counters names: its name, help text and extra label names."""

    name: str
    documentation: str
    labels: tuple[str, ...] = ()


COUNTER_FAMILIES = {
    "published": CounterFamily("sdrm_messages_published", "MQTT messages handed to the client for publishing, by topic name", ("topic",)),
    "received": CounterFamily("sdrm_messages_received", "MQTT messages received, by topic name", ("topic",)),
    "unmatched": CounterFamily("sdrm_messages_unmatched", "MQTT messages received on a topic that matches no subscription"),
    "dropped": CounterFamily("sdrm_messages_dropped", "messages dropped before processing or publishing, by topic name and reason", ("topic", "reason")),
    "frames_received": CounterFamily("sdrm_frames_received", "camera frames received (the frame topic)"),
    "frames_published": CounterFamily("sdrm_frames_published", "camera frames published (the frame topic)"),
    "verdicts": CounterFamily("sdrm_verdicts_published", "verdicts published, by status and label", ("status", "label")),
    "reconnects": CounterFamily("sdrm_mqtt_reconnects", "times the MQTT connection was lost and reconnecting started"),
    "connect_failures": CounterFamily("sdrm_mqtt_connect_failures", "failed MQTT connection attempts, by reason", ("reason",)),
    "errors": CounterFamily("sdrm_errors", "errors caught and handled, by kind (the service's counter name)", ("kind",)),
    "events": CounterFamily("sdrm_events", "other counted events, by the service's counter name", ("event",)),
}


def map_counter(name: str) -> list[tuple[str, tuple[str, ...]]]:
    """Return the (family key, extra label values) pairs that the Counters entry `name` adds to."""
    head, _, rest = name.partition(".")
    if head == "published" and rest:
        return [("published", (rest,))] + ([("frames_published", ())] if rest == "frame" else [])
    if head == "received" and rest.startswith("unmatched_topic."):
        return [("unmatched", ())]
    if head == "received" and rest and "." not in rest:
        return [("received", (rest,))] + ([("frames_received", ())] if rest == "frame" else [])
    if head == "dropped" and "." in rest:
        topic, _, reason = rest.partition(".")
        return [("dropped", (topic, reason))]
    if head in DROP_PREFIXES and rest:
        return [("dropped", (DROP_PREFIXES[head], rest))]
    if name == "connection.lost":
        return [("reconnects", ())]
    if head == "connect" and rest:
        return [("connect_failures", (rest,))]
    if head == "verdicts" and rest.count(".") == 1:
        status, _, label = rest.partition(".")
        return [("verdicts", (status, label))]
    if head == "errors" and rest:
        return [("errors", (rest,))]
    if head.startswith("verdicts"):
        return [("events", (name,))]
    if head.endswith(ERROR_SUFFIXES) or rest in ERROR_OUTCOMES:
        return [("errors", (name,))]
    return [("events", (name,))]


def counter_families(snapshot: dict[str, int], base: tuple[str, ...]) -> list[Metric]:
    """Build every counter family from a Counters snapshot, with base as the line, service and instance values.

    Every family is returned, empty when no counter maps to it, and sdrm_mqtt_reconnects_total
    is 0 until the first loss, so that dashboards find the series from the start.
    """
    totals: dict[str, dict[tuple[str, ...], float]] = {key: {} for key in COUNTER_FAMILIES}
    totals["reconnects"][()] = 0.0
    for name, value in snapshot.items():
        for key, labels in map_counter(name):
            totals[key][labels] = totals[key].get(labels, 0.0) + value

    families = []
    for key, family in COUNTER_FAMILIES.items():
        metric = CounterMetricFamily(family.name, family.documentation, labels=BASE_LABELS + family.labels)
        for labels, value in sorted(totals[key].items()):
            metric.add_metric(list(base + labels), value)
        families.append(metric)
    return families


class MetricsSource(Protocol):
    def collect(self) -> Iterable[Metric]: ...


class ServiceMetrics:
    """The metrics of one service instance: its Bus counters, connection, queue and stage latencies.

    queue is any object with len(), such as the service's Inbox. Its capacity is queue_capacity,
    else the queue's `maxsize`. Observations are thread-safe.
    """

    def __init__(self, bus: Any, queue: Any = None, queue_capacity: int | None = None) -> None:
        self.labels = (bus.line, bus.service, bus.instance)
        self._bus = bus
        self._queue = queue
        self._queue_capacity = queue_capacity if queue_capacity is not None else getattr(queue, "maxsize", None)
        self._histograms = CollectorRegistry(auto_describe=False)
        self._latency = Histogram(
            "sdrm_stage_latency_seconds",
            "time spent in one processing stage of a frame, in seconds",
            labelnames=(*BASE_LABELS, "stage"),
            buckets=LATENCY_BUCKETS_S,
            registry=self._histograms,
        )

    def observe_ms(self, stage: str, ms: float) -> None:
        """Record `ms` milliseconds for stage. A negative time (clock skew between hosts) counts as 0."""
        self._latency.labels(*self.labels, stage).observe(max(float(ms), 0.0) / 1000)

    def observe_stages(self, timings: Iterable[tuple[str, float]]) -> None:
        """Record (stage, milliseconds) pairs, such as a wire envelope's timings."""
        for stage, ms in timings:
            self.observe_ms(stage, ms)

    def collect(self) -> Iterator[Metric]:
        yield from counter_families(self._bus.counters.snapshot(), self.labels)
        yield from self._gauges()
        yield from self._histograms.collect()

    def _gauges(self) -> list[Metric]:
        connected = GaugeMetricFamily("sdrm_mqtt_connected", "1 while the MQTT connection is up, else 0", labels=BASE_LABELS)
        connected.add_metric(list(self.labels), 1.0 if self._bus.connected else 0.0)
        depth = GaugeMetricFamily("sdrm_queue_depth", "items waiting in the service's input queue", labels=BASE_LABELS)
        capacity = GaugeMetricFamily(
            "sdrm_queue_capacity", "items the input queue holds before it drops the oldest", labels=BASE_LABELS
        )
        if self._queue is not None:
            depth.add_metric(list(self.labels), float(len(self._queue)))
        if self._queue_capacity is not None:
            capacity.add_metric(list(self.labels), float(self._queue_capacity))
        return [connected, depth, capacity]


class RemoteMetrics:
    """The families of another process's endpoint (a device subprocess), read over HTTP at every scrape.

    The URL must be plain http://host:port/path. A failed read returns no families and is
    logged: at debug until the first successful read, because the process may still be starting,
    then the first failure in a row at warning and repeats at debug.
    """

    def __init__(self, url: str, timeout_s: float = REMOTE_TIMEOUT_S) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"invalid metrics URL {url!r}: use http://host:port/metrics")
        self.url = url
        self._host = parts.hostname
        self._port = parts.port
        self._path = parts.path or "/metrics"
        self._timeout_s = timeout_s
        self._failures = 0
        self._reached = False

    def collect(self) -> list[Metric]:
        try:
            families = list(text_string_to_metric_families(self._read()))
        except (OSError, http.client.HTTPException, ValueError) as error:
            self._failures += 1
            report = log.warning if self._reached and self._failures == 1 else log.debug
            report("metrics_source_failed", url=self.url, failures=self._failures, error=str(error))
            return []
        if self._failures and self._reached:
            log.info("metrics_source_recovered", url=self.url, failures=self._failures)
        self._failures = 0
        self._reached = True
        return families

    def _read(self) -> str:
        connection = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout_s)
        try:
            connection.request("GET", self._path)
            response = connection.getresponse()
            body = response.read().decode("utf-8")
        finally:
            connection.close()
        if response.status != 200:
            raise ValueError(f"{self.url} returned HTTP status {response.status}, expected 200")
        return body


class MetricsGroup:
    """Metrics sources that are added while the services start, collected in the order of adding."""

    def __init__(self) -> None:
        self._sources: list[MetricsSource] = []
        self._lock = threading.Lock()

    def add(self, source: MetricsSource) -> None:
        with self._lock:
            self._sources.append(source)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            sources = list(self._sources)
        for source in sources:
            yield from source.collect()


def merge_families(families: Iterable[Metric]) -> list[Metric]:
    """Merge families of the same name into one, so that each name is exposed once.

    A family whose type differs from the first one of its name is skipped and logged, because
    the text format allows one type per name.
    """
    merged: dict[str, Metric] = {}
    for family in families:
        first = merged.get(family.name)
        if first is None:
            merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            merged[family.name].samples = list(family.samples)
        elif first.type != family.type:
            log.warning("metrics_family_skipped", family=family.name, type=family.type, expected=first.type)
        else:
            first.samples.extend(family.samples)
    return list(merged.values())


class _MergingCollector:
    def __init__(self, source: MetricsSource) -> None:
        self._source = source

    def collect(self) -> list[Metric]:
        return merge_families(self._source.collect())


class MetricsEndpoint:
    """An HTTP endpoint at http://host:port/metrics that serves the merged families of its sources."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.sources = MetricsGroup()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_MergingCollector(self.sources))
        self._server = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def add(self, source: MetricsSource) -> None:
        self.sources.add(source)

    def start(self) -> MetricsEndpoint:
        """Start serving in a daemon thread.

        Raises MetricsError, which names the port and the fix, when the port cannot be bound.
        """
        try:
            self._server, _thread = start_http_server(self.port, addr=self.host, registry=self.registry)
        except OSError as error:
            raise MetricsError(
                f"cannot serve metrics on {self.host}:{self.port}: {error.strerror or error}; "
                f"pass another --metrics-port, or 0 to turn the endpoint off"
            ) from None
        return self

    def close(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None


def serve_metrics(config: Any, service: str) -> MetricsEndpoint | None:
    """Start the endpoint that config.metrics_port and config.metrics_host request, or return None for port 0.

    Raises MetricsError when the port cannot be used.
    """
    port = getattr(config, "metrics_port", 0)
    if not port:
        return None
    endpoint = MetricsEndpoint(config.metrics_host, port).start()
    log.info("metrics_started", service=service, line=getattr(config, "line", None), url=endpoint.url)
    return endpoint


def stop_metrics(endpoint: MetricsEndpoint | None, config: Any, service: str) -> None:
    """Stop an endpoint that serve_metrics started. None does nothing."""
    if endpoint is None:
        return
    endpoint.close()
    log.info("metrics_stopped", service=service, line=getattr(config, "line", None), url=endpoint.url)

