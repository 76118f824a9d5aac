"""Authentication, TLS and the per-role ACL against a real Mosquitto with a password file.

The broker (tests/secure_broker.py) has a TLS listener that requires a client certificate, a
plain listener, `allow_anonymous false` and the committed compose ACL, compose/mosquitto/acl,
plus a test user `observer` that may read every SDRM topic.

Checks of what a user must not receive follow one pattern: a first allowed message shows that
the subscription is active, then the denied message is published, then an allowed message from
the same publisher. The broker forwards one publisher's messages in order, so once the last
allowed message has arrived, the denied one would have arrived too.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import SecretStr

from sdrm import messages
from services.bus import Bus, wait_published
from services.security import client_tls_context
from services.topics import load_topics
from tests.broker import REPOSITORY, Services, model_dir  # noqa: F401 - pytest fixture
from tests.secure_broker import OBSERVER, Client, secure_broker, wait_until  # noqa: F401 - pytest fixture


def statuses(client: Client) -> list[messages.Status]:
    return [messages.parse(messages.Status, item.payload) for item in client.received if item.payload]


def publish_and_wait(client: Client, name: str, payload: bytes, **ids: str) -> None:
    info = client.bus.publish(name, payload, **ids)
    assert info is not None
    assert wait_published([info], 5.0)


def verdict_payload(camera: str, frame: int) -> bytes:
    verdict = messages.Verdict(
        line="line-acl", camera=camera, frame=frame, capture_ms=1, epoch=1, label="ok", score=0.1, threshold=0.5,
        model_version="test", status="complete", latency_ms={"total": 1.0},
    )
    return messages.to_json(verdict)


def verdict_frames(client: Client, topic: str) -> list[int]:
    return [messages.parse(messages.Verdict, payload).frame for payload in client.payloads(topic)]


# Services over TLS with a password ---------------------------------------------------------------


def service_security_args(broker, user: str, password_file) -> list[str]:
    certificates = broker.certificates
    return [
        "--username", user,
        "--password-file", str(password_file),
        "--tls-ca", str(certificates.ca),
        "--tls-cert", str(certificates.client_cert),
        "--tls-key", str(certificates.client_key),
    ]


def test_scheduler_over_tls_publishes_online(secure_broker, model_dir, tmp_path):
    password = secure_broker.passwords["scheduler"]
    password_file = tmp_path / "scheduler.password"
    password_file.write_text(password + "\n")
    observer = Client(secure_broker, OBSERVER, "line-tls").subscribe("service_status", service="scheduler").start()
    services = Services(secure_broker.tls_url, "line-tls", model_dir, tmp_path)
    try:
        services.start("scheduler", "scheduler", "--log-level", "debug", *service_security_args(secure_broker, "scheduler", password_file))
        online = wait_until(lambda: [s for s in statuses(observer) if s.state == "online"], 60.0)
        assert online, services.log("scheduler")
        assert online[0].service == "scheduler"
        for item in observer.received:
            assert password.encode() not in item.payload
    finally:
        services.stop_all()
        observer.close()

    log = services.log("scheduler")
    assert "connected" in log
    assert password not in log


def test_wrong_password_retries_without_secret(secure_broker, model_dir, tmp_path, monkeypatch):
    wrong = "wrong-" + secure_broker.passwords["scheduler"]
    monkeypatch.setenv("SDRM_PASSWORD", wrong)
    services = Services(secure_broker.plain_url, "line-badpw", model_dir, tmp_path)
    try:
        services.start("scheduler", "scheduler", "--log-level", "debug", "--username", "scheduler")
        refused = wait_until(lambda: services.log("scheduler").count("connect_refused") >= 3, 60.0)
        assert refused, services.log("scheduler")
        assert services.alive("scheduler")
    finally:
        services.stop_all()

    log = services.log("scheduler")
    assert "connect_retry" in log
    assert "Not authorized" in log
    assert "client_id='sdrm-line-badpw-scheduler-scheduler'" in log
    assert wrong not in log
    assert secure_broker.passwords["scheduler"] not in log


def test_stream_password_masked_in_logs(secure_broker, tmp_path, monkeypatch):
    """An RTSP source URL with a password (here to a closed port of 127.0.0.1) is logged masked."""
    stream_password = "Stream-Secret-42"
    monkeypatch.setenv("SDRM_PASSWORD", secure_broker.passwords["cam1"])
    services = Services(secure_broker.plain_url, "line-rtsp", REPOSITORY, tmp_path)
    try:
        services.start(
            "ingest", "ingest", "--username", "cam1", "--camera", "cam1",
            "--source", f"rtsp://admin:{stream_password}@127.0.0.1:9/stream", model=False,
        )
        assert wait_until(lambda: "source_retry" in services.log("ingest"), 60.0), services.log("ingest")
    finally:
        services.stop_all()

    log = services.log("ingest")
    assert "rtsp://***@127.0.0.1:9/stream" in log
    assert stream_password not in log
    assert secure_broker.passwords["cam1"] not in log


def test_service_rejects_credentials_in_url(secure_broker, model_dir, tmp_path):
    password = secure_broker.passwords["scheduler"]
    services = Services(f"mqtt://scheduler:{password}@127.0.0.1:{secure_broker.plain_port}", "line-url", model_dir, tmp_path)
    process = services.start("scheduler", "scheduler")
    assert process.wait(60) == 2
    log = services.log("scheduler")
    assert "must not contain a user name or password" in log
    assert password not in log


def test_line_over_tls_with_password(secure_broker, model_dir, tmp_path):
    """`sdrm line` hands the TLS files and the username to its services and to the device subprocess.

    All services of a line log in as one user, so it runs as the observer, which may use every topic.
    """
    password = secure_broker.passwords[OBSERVER]
    certificates = secure_broker.certificates
    command = [
        sys.executable, "-m", "sdrm.cli", "line", "--broker", secure_broker.tls_url, "--line", "line-sdrm",
        "--username", OBSERVER, "--tls-ca", str(certificates.ca), "--tls-cert", str(certificates.client_cert),
        "--tls-key", str(certificates.client_key), "--model", str(model_dir), "--devices", "1", "--max-frames", "2",
        "--log-level", "debug", "--timeout-s", "60", "--deadline-ms", "10000",
    ]
    env = {**os.environ, "SDRM_PASSWORD": password, "PYTHONPATH": str(REPOSITORY)}
    result = subprocess.run(command, env=env, cwd=REPOSITORY, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 verdicts (2 complete" in result.stdout
    assert password not in result.stdout
    assert password not in result.stderr


# Authentication ------------------------------------------------------------------------------------


def test_anonymous_client_refused(secure_broker):
    client = Client(secure_broker, None, "line-anon")
    client.bus.start()
    try:
        assert wait_until(lambda: client.bus.counters.get("connect.refused") >= 2, 10.0)
        assert not client.bus.connected
    finally:
        client.close()


def test_wrong_password_refused(secure_broker):
    client = Client(secure_broker, "cam1", "line-anon", password="not-the-password")
    client.bus.start()
    try:
        assert wait_until(lambda: client.bus.counters.get("connect.refused") >= 1, 10.0)
        assert not client.bus.connected
    finally:
        client.close()


@pytest.mark.parametrize("mqtt_version", ["5", "3.1.1"])
def test_password_over_tls_accepted(secure_broker, mqtt_version):
    client = Client(secure_broker, "cam1", "line-tls2", tls=True, mqtt_version=mqtt_version)
    try:
        client.start()
        assert client.bus.connected
    finally:
        client.close()


def test_tls_without_client_certificate_fails(secure_broker):
    bus = Bus(
        topics=load_topics(), broker=secure_broker.tls_url, line="line-tls3", service="probe", instance="nocert",
        status_topic=None, backoff_min_s=0.1, backoff_max_s=0.5, username="cam1",
        password=SecretStr(secure_broker.passwords["cam1"]), tls_context=client_tls_context(secure_broker.certificates.ca),
    )
    bus.start()
    try:
        assert wait_until(lambda: bus.counters.get("connect.failed") + bus.counters.get("connection.lost") >= 2, 10.0)
        assert not bus.connected
    finally:
        bus.close()


def test_tls_with_unknown_ca_fails(secure_broker):
    certificates = secure_broker.certificates
    context = client_tls_context(certificates.other_ca, certificates.client_cert, certificates.client_key)
    bus = Bus(
        topics=load_topics(), broker=secure_broker.tls_url, line="line-tls4", service="probe", instance="otherca",
        status_topic=None, backoff_min_s=0.1, backoff_max_s=0.5, username="cam1",
        password=SecretStr(secure_broker.passwords["cam1"]), tls_context=context,
    )
    bus.start()
    try:
        assert wait_until(lambda: bus.counters.get("connect.failed") >= 2, 10.0)
        assert not bus.connected
    finally:
        bus.close()


# ACL per role -------------------------------------------------------------------------------------


def test_camera_cannot_publish_other_camera(secure_broker):
    line = "line-acl-cam"
    observer = Client(secure_broker, OBSERVER, line).subscribe("frame").start()
    camera = Client(
        secure_broker, "cam1", line, service="ingest", instance="cam1", status_topic="camera_status",
        status_ids={"camera": "cam1"},
    ).start()
    try:
        publish_and_wait(camera, "frame", b"first", camera="cam1")
        assert wait_until(lambda: observer.payloads(f"sdrm/v1/{line}/cam/cam1/frame"), 5.0)

        publish_and_wait(camera, "frame", b"denied", camera="cam2")
        publish_and_wait(camera, "frame", b"last", camera="cam1")
        assert wait_until(lambda: b"last" in observer.payloads(f"sdrm/v1/{line}/cam/cam1/frame"), 5.0)
        assert observer.payloads(f"sdrm/v1/{line}/cam/cam2/frame") == []
        # Mosquitto 2.0.11 replies to the denied QoS 1 PUBLISH with PUBACK "Not authorized" under MQTT 5.
        assert wait_until(lambda: camera.bus.counters.get("errors.publish_rejected") == 1, 5.0)
    finally:
        camera.close()
        observer.close()


def test_camera_denied_silently_under_mqtt311(secure_broker):
    line = "line-acl-311"
    observer = Client(secure_broker, OBSERVER, line).subscribe("frame").start()
    camera = Client(secure_broker, "cam1", line, mqtt_version="3.1.1").start()
    try:
        publish_and_wait(camera, "frame", b"first", camera="cam1")
        assert wait_until(lambda: observer.payloads(f"sdrm/v1/{line}/cam/cam1/frame"), 5.0)

        publish_and_wait(camera, "frame", b"denied", camera="cam2")
        publish_and_wait(camera, "frame", b"last", camera="cam1")
        assert wait_until(lambda: b"last" in observer.payloads(f"sdrm/v1/{line}/cam/cam1/frame"), 5.0)
        assert observer.payloads(f"sdrm/v1/{line}/cam/cam2/frame") == []
        # MQTT 3.1.1 has no reason code in PUBACK, so the refusal is invisible to the publisher.
        assert camera.bus.counters.get("errors.publish_rejected") == 0
    finally:
        camera.close()
        observer.close()


def test_camera_status_and_will_allowed(secure_broker):
    line = "line-acl-status"
    observer = Client(secure_broker, OBSERVER, line).subscribe("camera_status", camera="cam1").start()
    camera = Client(
        secure_broker, "cam1", line, service="ingest", instance="cam1", status_topic="camera_status",
        status_ids={"camera": "cam1"},
    ).start()
    camera.close()
    try:
        assert wait_until(lambda: len(statuses(observer)) >= 2, 5.0)
        assert [status.state for status in statuses(observer)] == ["online", "stopped"]
    finally:
        observer.close()


def test_device_cannot_publish_other_device(secure_broker):
    line = "line-acl-dev"
    observer = Client(secure_broker, OBSERVER, line).subscribe("partials").start()
    device = Client(
        secure_broker, "dev1", line, service="device", instance="dev1", status_topic="device_status",
        status_ids={"device": "dev1"},
    ).start()
    try:
        publish_and_wait(device, "partials", b"first", device="dev1")
        assert wait_until(lambda: observer.payloads(f"sdrm/v1/{line}/dev/dev1/partials"), 5.0)

        publish_and_wait(device, "partials", b"denied", device="dev2")
        publish_and_wait(device, "partials", b"last", device="dev1")
        assert wait_until(lambda: b"last" in observer.payloads(f"sdrm/v1/{line}/dev/dev1/partials"), 5.0)
        assert observer.payloads(f"sdrm/v1/{line}/dev/dev2/partials") == []
        assert wait_until(lambda: device.bus.counters.get("errors.publish_rejected") == 1, 5.0)
    finally:
        device.close()
        observer.close()


def test_device_reads_only_own_blocks(secure_broker):
    line = "line-acl-blocks"
    device = Client(secure_broker, "dev1", line).subscribe("blocks").start()
    compressor = Client(secure_broker, "compressor", line).start()
    try:
        publish_and_wait(compressor, "blocks", b"first", device="dev1")
        assert wait_until(lambda: device.payloads(f"sdrm/v1/{line}/dev/dev1/blocks"), 5.0)

        publish_and_wait(compressor, "blocks", b"other", device="dev2")
        publish_and_wait(compressor, "blocks", b"last", device="dev1")
        assert wait_until(lambda: b"last" in device.payloads(f"sdrm/v1/{line}/dev/dev1/blocks"), 5.0)
        assert device.payloads(f"sdrm/v1/{line}/dev/dev2/blocks") == []
        assert compressor.bus.counters.get("errors.publish_rejected") == 0
    finally:
        compressor.close()
        device.close()


def test_scada_reads_verdicts_cannot_publish(secure_broker):
    line = "line-acl-scada"
    scada = Client(secure_broker, "scada", line).subscribe("verdict").subscribe("verdict_last").start()
    aggregator = Client(secure_broker, "aggregator", line).start()
    try:
        publish_and_wait(aggregator, "verdict", verdict_payload("cam1", 1), camera="cam1")
        assert wait_until(lambda: scada.payloads(f"sdrm/v1/{line}/verdict/cam1"), 5.0)

        publish_and_wait(scada, "verdict", verdict_payload("cam1", 99), camera="cam1")
        assert wait_until(lambda: scada.bus.counters.get("errors.publish_rejected") == 1, 5.0)
        publish_and_wait(aggregator, "verdict", verdict_payload("cam1", 2), camera="cam1")
        topic = f"sdrm/v1/{line}/verdict/cam1"
        assert wait_until(lambda: len(verdict_frames(scada, topic)) >= 2, 5.0)
        assert verdict_frames(scada, topic) == [1, 2]
    finally:
        aggregator.close()
        scada.close()


def test_scada_receives_no_frames(secure_broker):
    line = "line-acl-scada2"
    scada = Client(secure_broker, "scada", line).subscribe("frame").subscribe("verdict").start()
    camera = Client(secure_broker, "cam1", line).start()
    aggregator = Client(secure_broker, "aggregator", line).start()
    try:
        publish_and_wait(aggregator, "verdict", verdict_payload("cam1", 1), camera="cam1")
        assert wait_until(lambda: scada.payloads(f"sdrm/v1/{line}/verdict/cam1"), 5.0)

        publish_and_wait(camera, "frame", b"frame", camera="cam1")
        publish_and_wait(aggregator, "verdict", verdict_payload("cam1", 2), camera="cam1")
        assert wait_until(lambda: len(scada.payloads(f"sdrm/v1/{line}/verdict/cam1")) >= 2, 5.0)
        # Mosquitto 2.0.11 grants the SUBSCRIBE (SUBACK success) and drops each frame at delivery.
        assert scada.payloads(f"sdrm/v1/{line}/cam/cam1/frame") == []
    finally:
        aggregator.close()
        camera.close()
        scada.close()


def test_compressor_shared_subscription_allowed(secure_broker):
    line = "line-acl-share"
    compressor = Client(secure_broker, "compressor", line)
    compressor.bus.subscribe("frame", compressor._collect, shared=True)
    compressor.start()
    camera = Client(secure_broker, "cam1", line).start()
    try:
        publish_and_wait(camera, "frame", b"frame", camera="cam1")
        assert wait_until(lambda: compressor.payloads(f"sdrm/v1/{line}/cam/cam1/frame"), 5.0)
    finally:
        camera.close()
        compressor.close()


def test_scheduler_reads_back_assignment(secure_broker):
    line = "line-acl-sched"
    scheduler = Client(secure_broker, "scheduler", line).subscribe("assignment").start()
    try:
        assignment = messages.Assignment(epoch=3, heads={0: "dev1"}, devices=["dev1"], ts_ms=1)
        publish_and_wait(scheduler, "assignment", messages.to_json(assignment))
        assert wait_until(lambda: scheduler.payloads(f"sdrm/v1/{line}/sched/assignment"), 5.0)
        assert scheduler.bus.counters.get("errors.publish_rejected") == 0
    finally:
        scheduler.bus.clear_retained("assignment")
        scheduler.close()


def test_sparkplug_reads_status_not_frames(secure_broker):
    line = "line-acl-spb"
    bridge = Client(secure_broker, "sparkplug", line).subscribe("camera_status").subscribe("frame").start()
    camera = Client(
        secure_broker, "cam1", line, service="ingest", instance="cam1", status_topic="camera_status",
        status_ids={"camera": "cam1"},
    )
    camera.start()
    try:
        assert wait_until(lambda: bridge.payloads(f"sdrm/v1/{line}/cam/cam1/status"), 5.0)
        publish_and_wait(camera, "frame", b"frame", camera="cam1")
        camera.close()
        assert wait_until(lambda: len(bridge.payloads(f"sdrm/v1/{line}/cam/cam1/status")) >= 2, 5.0)
        assert bridge.payloads(f"sdrm/v1/{line}/cam/cam1/frame") == []
    finally:
        camera.close()
        bridge.close()
