"""A message above the broker's maximum packet size is rejected before sending, counted and reported once."""

from __future__ import annotations

import time

import pytest

from sdrm import messages
from services.broker import LocalBroker, find_mosquitto
from services.bus import Bus, wait_published
from services.topics import load_topics
from tests.broker import Probe

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="needs the mosquitto binary (apt-get install mosquitto)")

LINE = "oversize"
MAX_PACKET = 100_000


@pytest.fixture(scope="module")
def small_broker():
    broker = LocalBroker(max_packet_bytes=MAX_PACKET).start()
    yield broker
    broker.stop()


def make_bus(url: str, **kwargs) -> Bus:
    bus = Bus(
        topics=load_topics(), broker=url, line=LINE, service="compressor", instance="c1", status_ids={"service": "c1"},
        **kwargs,
    )
    assert bus.start(wait_s=10.0)
    return bus


def test_limit_taken_from_connack(small_broker):
    bus = make_bus(small_broker.url)
    try:
        assert bus.max_packet_bytes == MAX_PACKET
    finally:
        bus.close()


def test_oversize_rejected_not_resent(small_broker):
    probe = Probe(small_broker.url, LINE, ["errors", "frame"])
    bus = make_bus(small_broker.url)
    try:
        assert bus.publish("frame", b"x" * (MAX_PACKET + 1), camera="cam1") is None
        assert bus.counters.get("dropped.frame.too_large") == 1
        assert bus.counters.get("errors.payload_too_large") == 1

        reports = probe.wait_for(lambda: probe.messages("errors"), 5.0)
        assert reports, "no ErrorReport on the errors topic"
        report = messages.parse(messages.ErrorReport, reports[0].payload)
        assert report.kind == "payload_too_large"
        assert str(MAX_PACKET) in report.error
        assert report.topic.endswith("/cam/cam1/frame")

        small = bus.publish("frame", b"y" * 1000, camera="cam1")
        assert wait_published([small], 5.0)
        assert probe.wait_for(lambda: probe.messages("frame"), 5.0)
        time.sleep(2.0)
        assert bus.connected
        assert bus.counters.get("connection.lost") == 0, "the broker closed the connection"
        assert [m.payload for m in probe.messages("frame")] == [b"y" * 1000], "the oversized message reached the broker"
    finally:
        bus.close()
        probe.close()


def test_configured_limit_without_connack(small_broker):
    """MQTT 3.1.1 has no Maximum Packet Size in CONNACK, so the configured limit applies."""
    bus = make_bus(small_broker.url, mqtt_version="3.1.1", max_packet_bytes=MAX_PACKET)
    try:
        assert bus.publish("frame", b"x" * MAX_PACKET, camera="cam1") is None
        time.sleep(1.0)
        assert bus.connected
        assert bus.counters.get("connection.lost") == 0
    finally:
        bus.close()


def test_error_reports_rate_limited(small_broker):
    probe = Probe(small_broker.url, LINE, ["errors"])
    bus = make_bus(small_broker.url)
    try:
        for _ in range(20):
            bus.report_error("frame_invalid", "bad frame", topic="t")
        time.sleep(1.2)
        bus.report_error("frame_invalid", "bad frame", topic="t")
        assert probe.wait_for(lambda: len(probe.messages("errors")) >= 2, 5.0)
        time.sleep(0.5)
        reports = [messages.parse(messages.ErrorReport, m.payload) for m in probe.messages("errors")]
        assert len(reports) == 2
        assert reports[0].count == 1
        assert reports[1].count == 21
        assert reports[1].suppressed == 19
        assert bus.counters.get("errors.frame_invalid") == 21
    finally:
        bus.close()
        probe.close()
