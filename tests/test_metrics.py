"""Prometheus endpoints and JSON logs of the services, scraped over HTTP on 127.0.0.1.

The first tests build endpoints in this process from real Bus objects (never connected). The
others run the services as subprocesses on a real Mosquitto broker, feed them sample boards and
scrape every endpoint, and run `sdrm line` with one endpoint for all its services.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.broker import find_mosquitto, free_port
from services.bus import Bus
from services.metrics import MetricsEndpoint, MetricsError, RemoteMetrics, ServiceMetrics, map_counter
from services.topics import load_topics
from tests.broker import REPOSITORY, SAMPLES, Probe, Services, model_dir, mqtt_broker  # noqa: F401 - pytest fixtures

LINE = "obs"
SERVICE_NAMES = ("scheduler", "aggregator", "compressor", "dev1", "ingest")


def scrape(port: int) -> tuple[str, dict]:
    """Return the text of http://127.0.0.1:port/metrics and its families by name."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        text = response.read().decode("utf-8")
    finally:
        connection.close()
    assert response.status == 200, text
    return text, {family.name: family for family in text_string_to_metric_families(text)}


def sample_values(families: dict, sample: str, **labels: str) -> list[float]:
    """Return the values of every sample named `sample` whose labels include `labels`."""
    family_name = sample
    for suffix in ("_total", "_count", "_sum", "_bucket"):
        if sample.endswith(suffix) and sample.removesuffix(suffix) in families:
            family_name = sample.removesuffix(suffix)
    family = families.get(family_name)
    if family is None:
        return []
    return [
        s.value for s in family.samples
        if s.name == sample and all(s.labels.get(key) == value for key, value in labels.items())
    ]


def offline_bus(service: str, instance: str) -> Bus:
    """Return a Bus that is never started, so its counters and connection state stay as the test sets them."""
    return Bus(
        topics=load_topics(), broker="mqtt://127.0.0.1:1", line=LINE, service=service, instance=instance,
        status_topic=None,
    )


# Endpoints in this process --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("published.frame", [("published", ("frame",)), ("frames_published", ())]),
        ("published.verdict", [("published", ("verdict",))]),
        ("received.frame", [("received", ("frame",)), ("frames_received", ())]),
        ("received.unmatched_topic.sdrm/obs/x", [("unmatched", ())]),
        ("dropped.frame_info.queue_full", [("dropped", ("frame_info", "queue_full"))]),
        ("frames_dropped.queue_full", [("dropped", ("frame", "queue_full"))]),
        ("blocks_dropped.queue_full", [("dropped", ("blocks", "queue_full"))]),
        ("connection.lost", [("reconnects", ())]),
        ("connect.refused", [("connect_failures", ("refused",))]),
        ("verdicts.complete.defect", [("verdicts", ("complete", "defect"))]),
        ("errors.frame_invalid", [("errors", ("frame_invalid",))]),
        ("handler_error.frame", [("errors", ("handler_error.frame",))]),
        ("frames_failed.no_assignment", [("errors", ("frames_failed.no_assignment",))]),
        ("subscribe.refused", [("errors", ("subscribe.refused",))]),
        ("verdicts_error", [("events", ("verdicts_error",))]),
        ("drain.unacknowledged", [("events", ("drain.unacknowledged",))]),
        ("partials_duplicate", [("events", ("partials_duplicate",))]),
    ],
)
def test_counter_mapping(name, expected):
    assert map_counter(name) == expected


def test_endpoint_merges_services():
    compressor_bus = offline_bus("compressor", "comp1")
    aggregator_bus = offline_bus("aggregator", "agg1")
    compressor = ServiceMetrics(compressor_bus, queue=[1, 2, 3], queue_capacity=8)
    aggregator = ServiceMetrics(aggregator_bus)
    compressor_bus.counters.add("received.frame", 5)
    compressor_bus.counters.add("dropped.frame_info.queue_full", 2)
    aggregator_bus.counters.add("verdicts.complete.ok", 4)
    aggregator_bus.counters.add("errors.partials_invalid")
    compressor.observe_stages([("decode", 3.0), ("embed", 40.0)])
    aggregator.observe_ms("end_to_end", 250.0)
    aggregator.observe_ms("end_to_end", -5.0)

    endpoint = MetricsEndpoint("127.0.0.1", free_port()).start()
    endpoint.add(compressor)
    endpoint.add(aggregator)
    try:
        text, families = scrape(endpoint.port)
    finally:
        endpoint.close()

    for family in ("sdrm_messages_received_total", "sdrm_stage_latency_seconds", "sdrm_mqtt_connected", "sdrm_queue_depth"):
        assert text.count(f"# TYPE {family} ") == 1, family
    assert sample_values(families, "sdrm_frames_received_total", service="compressor", instance="comp1", line=LINE) == [5.0]
    assert sample_values(families, "sdrm_messages_dropped_total", topic="frame_info", reason="queue_full") == [2.0]
    assert sample_values(families, "sdrm_verdicts_published_total", status="complete", label="ok") == [4.0]
    assert sample_values(families, "sdrm_errors_total", kind="partials_invalid", service="aggregator") == [1.0]
    assert sample_values(families, "sdrm_mqtt_reconnects_total", service="compressor") == [0.0]
    assert sample_values(families, "sdrm_mqtt_reconnects_total", service="aggregator") == [0.0]
    assert sample_values(families, "sdrm_mqtt_connected", service="aggregator") == [0.0]
    assert sample_values(families, "sdrm_queue_depth", service="compressor") == [3.0]
    assert sample_values(families, "sdrm_queue_capacity", service="compressor") == [8.0]
    assert sample_values(families, "sdrm_queue_depth", service="aggregator") == []
    assert sample_values(families, "sdrm_stage_latency_seconds_count", stage="decode") == [1.0]
    assert sample_values(families, "sdrm_stage_latency_seconds_sum", stage="embed") == [pytest.approx(0.04)]
    assert sample_values(families, "sdrm_stage_latency_seconds_count", stage="end_to_end") == [2.0]
    assert sample_values(families, "sdrm_stage_latency_seconds_bucket", stage="end_to_end", le="0.001") == [1.0]
    assert sample_values(families, "sdrm_stage_latency_seconds_bucket", stage="end_to_end", le="0.25") == [2.0]


def test_endpoint_merges_remote_endpoint():
    device_bus = offline_bus("device", "dev7")
    device_bus.counters.add("published.partials", 3)
    device_endpoint = MetricsEndpoint("127.0.0.1", free_port()).start()
    device_endpoint.add(ServiceMetrics(device_bus))
    line_bus = offline_bus("compressor", "comp1")
    line_endpoint = MetricsEndpoint("127.0.0.1", free_port()).start()
    line_endpoint.add(ServiceMetrics(line_bus))
    line_endpoint.add(RemoteMetrics(device_endpoint.url))
    try:
        text, families = scrape(line_endpoint.port)
        device_endpoint.close()
        _, without_device = scrape(line_endpoint.port)
    finally:
        line_endpoint.close()
        device_endpoint.close()

    assert text.count("# TYPE sdrm_messages_published_total counter") == 1
    assert sample_values(families, "sdrm_messages_published_total", service="device", instance="dev7", topic="partials") == [3.0]
    assert sample_values(families, "sdrm_mqtt_connected", service="compressor") == [0.0]
    assert sample_values(without_device, "sdrm_mqtt_connected", service="device") == []
    assert sample_values(without_device, "sdrm_mqtt_connected", service="compressor") == [0.0]


def test_endpoint_port_in_use():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(MetricsError) as raised:
            MetricsEndpoint("127.0.0.1", port).start()
    assert f"127.0.0.1:{port}" in str(raised.value)
    assert "--metrics-port" in str(raised.value)


def test_command_port_in_use_exits_2(model_dir):
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable, "-m", "sdrm.cli", "scheduler", "--broker", "mqtt://127.0.0.1:1",
                "--model", str(model_dir), "--metrics-port", str(port),
            ],
            capture_output=True, text=True, timeout=60, cwd=REPOSITORY, env=env,
        )
    assert result.returncode == 2, result.stderr
    assert f"sdrm scheduler: cannot serve metrics on 127.0.0.1:{port}" in result.stderr
    assert "pass another --metrics-port, or 0" in result.stderr
    assert "Traceback" not in result.stderr


# Services on a real broker --------------------------------------------------------------------


@pytest.fixture(scope="module")
def running_line(mqtt_broker, model_dir, tmp_path_factory):
    """Every service as a subprocess with a metrics endpoint and JSON logs, after 3 verdicts."""
    ports = {name: free_port() for name in SERVICE_NAMES}
    services = Services(mqtt_broker.url, LINE, model_dir, tmp_path_factory.mktemp("logs"))
    probe = Probe(mqtt_broker.url, LINE, ["verdict", "assignment"])

    def options(name: str) -> list[str]:
        return ["--metrics-port", str(ports[name]), "--log-json", "--log-level", "debug"]

    services.start("scheduler", "scheduler", *options("scheduler"))
    services.start("aggregator", "aggregator", "--deadline-ms", "10000", "--threads", "1", *options("aggregator"))
    services.start("compressor", "compressor", "--threads", "1", *options("compressor"))
    services.start("dev1", "device", "--device", "dev1", "--threads", "1", *options("dev1"))
    try:
        assigned = probe.wait_for(lambda: [a for a in probe.assignments() if set(a.heads.values()) == {"dev1"}], 90.0)
        assert assigned, f"no assignment to dev1 within 90 s\n{services.log('scheduler')[-2000:]}"
        services.start(
            "ingest", "ingest", "--source", str(SAMPLES), "--camera", "cam1", "--loop", "--fps", "0.5",
            *options("ingest"), model=False,
        )
        verdicts = probe.wait_for(lambda: len(probe.verdicts()) >= 3, 120.0)
        assert verdicts, f"fewer than 3 verdicts within 120 s\n{services.log('compressor')[-2000:]}"
        yield services, ports
    finally:
        services.stop_all()
        probe.close()


@pytest.mark.slow
def test_every_endpoint_has_families(running_line):
    services, ports = running_line
    expected_service = {"scheduler": "scheduler", "aggregator": "aggregator", "compressor": "compressor", "dev1": "device", "ingest": "ingest"}
    for name, port in ports.items():
        _, families = scrape(port)
        labels = {"line": LINE, "service": expected_service[name]}
        assert sample_values(families, "sdrm_mqtt_connected", **labels) == [1.0], name
        assert sample_values(families, "sdrm_mqtt_reconnects_total", **labels) == [0.0], name
        for family in ("sdrm_messages_published", "sdrm_messages_dropped", "sdrm_errors", "sdrm_stage_latency_seconds", "sdrm_queue_depth"):
            assert family in families, f"{name}: {family}"


@pytest.mark.slow
def test_counters_move_with_frames(running_line):
    _, ports = running_line
    _, ingest = scrape(ports["ingest"])
    _, compressor = scrape(ports["compressor"])
    _, device = scrape(ports["dev1"])
    _, aggregator = scrape(ports["aggregator"])
    _, scheduler = scrape(ports["scheduler"])

    assert sample_values(ingest, "sdrm_frames_published_total", instance="cam1")[0] >= 3
    assert sample_values(compressor, "sdrm_frames_received_total")[0] >= 3
    assert sample_values(compressor, "sdrm_messages_published_total", topic="frame_info")[0] >= 3
    assert sample_values(device, "sdrm_messages_received_total", topic="blocks", instance="dev1")[0] >= 3
    assert sample_values(device, "sdrm_messages_published_total", topic="partials")[0] >= 3
    assert sum(sample_values(aggregator, "sdrm_verdicts_published_total")) >= 3
    assert sample_values(scheduler, "sdrm_events_total", event="assignments_published")[0] >= 1


@pytest.mark.slow
def test_latency_and_queue_observed(running_line):
    _, ports = running_line
    _, compressor = scrape(ports["compressor"])
    _, device = scrape(ports["dev1"])
    _, aggregator = scrape(ports["aggregator"])

    for stage in ("compressor_queue", "decode", "embed", "factorize"):
        assert sample_values(compressor, "sdrm_stage_latency_seconds_count", stage=stage)[0] >= 3, stage
    for stage in ("device_queue", "attention"):
        assert sample_values(device, "sdrm_stage_latency_seconds_count", stage=stage)[0] >= 3, stage
    assert sample_values(aggregator, "sdrm_stage_latency_seconds_count", stage="end_to_end")[0] >= 3
    assert sample_values(aggregator, "sdrm_stage_latency_seconds_sum", stage="end_to_end")[0] > 0
    assert sample_values(compressor, "sdrm_queue_capacity") == [512.0]
    assert len(sample_values(compressor, "sdrm_queue_depth")) == 1
    assert len(sample_values(device, "sdrm_queue_depth")) == 1
    assert len(sample_values(aggregator, "sdrm_queue_depth")) == 1


@pytest.mark.slow
def test_json_logs_carry_ids(running_line):
    services, _ = running_line
    for name in SERVICE_NAMES:
        records = []
        for number, text in enumerate(services.log(name).splitlines(), start=1):
            if not text.strip():
                continue
            try:
                records.append(json.loads(text))
            except json.JSONDecodeError:
                pytest.fail(f"{name} log line {number} is not JSON: {text[:300]}")
        assert any(record["event"] == "metrics_started" for record in records), name
        if name == "scheduler":
            continue
        frame_records = [record for record in records if "frame" in record]
        assert frame_records, f"{name}: no event with a frame id"
        for record in frame_records:
            assert record.get("line") == LINE, f"{name}: {record}"
            assert "camera" in record, f"{name}: {record}"
            if name == "dev1":
                assert record.get("device") == "dev1", record

    aggregator = [json.loads(text) for text in services.log("aggregator").splitlines() if text.strip()]
    verdicts = [record for record in aggregator if record["event"] == "verdict_published"]
    assert verdicts
    assert {"line", "camera", "frame", "epoch"} <= set(verdicts[0])


# sdrm line ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_line_serves_one_endpoint(model_dir, tmp_path):
    if find_mosquitto() is None:
        pytest.skip("the line starts a local broker and needs the mosquitto binary (apt-get install mosquitto)")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    command = [
        sys.executable, "-m", "sdrm.cli", "line", "--source", str(SAMPLES), "--devices", "1", "--model", str(model_dir),
        "--loop", "--fps", "0.5", "--quiet", "--metrics-port", str(port),
    ]
    with open(tmp_path / "line.log", "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=REPOSITORY, env=env)
    text, families = "", {}
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and process.poll() is None:
            try:
                text, families = scrape(port)
            except OSError:
                pass
            if sum(sample_values(families, "sdrm_verdicts_published_total")) >= 1 and sample_values(
                families, "sdrm_mqtt_connected", service="device"
            ):
                break
            time.sleep(1.0)
        log_text = (tmp_path / "line.log").read_text(errors="replace")[-3000:]
        assert process.poll() is None, f"sdrm line exited with {process.returncode}\n{log_text}"
        assert sum(sample_values(families, "sdrm_verdicts_published_total")) >= 1, log_text
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    services = {sample.labels["service"] for sample in families["sdrm_mqtt_connected"].samples}
    assert services == {"scheduler", "aggregator", "compressor", "ingest", "device"}
    assert sample_values(families, "sdrm_mqtt_connected", service="device", instance="dev1") == [1.0]
    assert text.count("# TYPE sdrm_mqtt_connected gauge") == 1
    assert text.count("# TYPE sdrm_stage_latency_seconds histogram") == 1
    assert sample_values(families, "sdrm_stage_latency_seconds_count", service="device", stage="attention")[0] >= 1
    assert sample_values(families, "sdrm_stage_latency_seconds_count", service="aggregator", stage="end_to_end")[0] >= 1
