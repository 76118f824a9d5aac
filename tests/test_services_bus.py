"""The MQTT bus against a real Mosquitto: liveness status, last will, reconnects and hand-off."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from sdrm import messages
from sdrm.schedule import HeadCost, Scheduler
from services.broker import LocalBroker, find_mosquitto
from services.bus import Bus
from services.inbox import Inbox
from services.topics import load_topics
from tests.broker import REPOSITORY, Probe, mqtt_broker  # noqa: F401 - pytest fixture

TOPICS = load_topics()


def statuses(probe: Probe) -> list[messages.Status]:
    return [messages.parse(messages.Status, item.payload) for item in probe.received if item.payload]


def make_bus(url: str, line: str, instance: str = "c1") -> Bus:
    return Bus(topics=TOPICS, broker=url, line=line, service="compressor", instance=instance, status_ids={"service": instance})


def test_online_then_stopped(mqtt_broker):
    probe = Probe(mqtt_broker.url, "bus-a", ["service_status"])
    bus = make_bus(mqtt_broker.url, "bus-a")
    assert bus.start(wait_s=10.0)
    online = probe.wait_for(lambda: [s for s in statuses(probe) if s.state == "online"], 5.0)
    assert online
    assert online[0].session_epoch == bus.session_epoch
    assert online[0].service == "compressor"

    bus.close()
    stopped = probe.wait_for(lambda: [s for s in statuses(probe) if s.state == "stopped"], 5.0)
    assert stopped
    assert stopped[0].session_epoch == bus.session_epoch
    probe.close()


def test_status_is_retained(mqtt_broker):
    bus = make_bus(mqtt_broker.url, "bus-b")
    assert bus.start(wait_s=10.0)
    time.sleep(0.3)
    late = Probe(mqtt_broker.url, "bus-b", ["service_status"])
    retained = late.wait_for(lambda: [item for item in late.received if item.retain], 5.0)
    assert retained
    assert messages.parse(messages.Status, retained[0].payload).state == "online"
    bus.close()
    late.close()


BUS_SCRIPT = """
import sys, time
from services.bus import Bus
from services.config import configure_logging
from services.topics import load_topics
configure_logging("warning")
bus = Bus(topics=load_topics(), broker=sys.argv[1], line="bus-c", service="device", instance="dk",
          status_topic="device_status", status_ids={"device": "dk"})
bus.start(wait_s=10.0)
print(bus.session_epoch, flush=True)
time.sleep(60)
"""


def test_will_offline_after_kill(mqtt_broker):
    probe = Probe(mqtt_broker.url, "bus-c", ["device_status"])
    process = subprocess.Popen(
        [sys.executable, "-c", BUS_SCRIPT, mqtt_broker.url], stdout=subprocess.PIPE, cwd=REPOSITORY, text=True
    )
    try:
        epoch = int(process.stdout.readline())
        assert probe.wait_for(lambda: [s for s in statuses(probe) if s.state == "online"], 5.0)
        process.kill()
        killed = time.monotonic()
        offline = probe.wait_for(lambda: [s for s in statuses(probe) if s.state == "offline"], 5.0)
        assert offline, "no offline will within 5 s of SIGKILL"
        assert offline[0].session_epoch == epoch
        assert time.monotonic() - killed < 5.0

        # The scheduler orders statuses by (session_epoch, ts_ms): the will must not sort before
        # the online status of the same connection, or it would be discarded as stale.
        online = [s for s in statuses(probe) if s.state == "online"][-1]
        scheduler = Scheduler({0: HeadCost(1.0, 1.0, 1.0)})
        assert scheduler.observe_status_message(online)
        assert scheduler.observe_status_message(offline[0])
        assert scheduler.devices["dk"].online is False
    finally:
        process.kill()
        process.wait()
        probe.close()


@pytest.mark.skipif(find_mosquitto() is None, reason="needs the mosquitto binary to restart a broker on the same port")
def test_reconnect_with_new_epoch():
    broker = LocalBroker().start()
    bus = make_bus(broker.url, "bus-d")
    try:
        assert bus.start(wait_s=10.0)
        first_epoch = bus.session_epoch
        broker.stop()
        broker = LocalBroker(port=broker.port).start()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not (bus.connected and bus.session_epoch > first_epoch):
            time.sleep(0.1)
        assert bus.connected
        assert bus.session_epoch > first_epoch
        assert bus.counters.get("connection.lost") >= 1
    finally:
        bus.close()
        broker.stop()


def test_publish_uses_topic_qos_and_retain(mqtt_broker):
    bus = make_bus(mqtt_broker.url, "bus-e")
    assert bus.start(wait_s=10.0)
    info = bus.publish("verdict_last", b'{"x": 1}', camera="cam9")
    info.wait_for_publish(5.0)
    probe = Probe(mqtt_broker.url, "bus-e", ["verdict_last"], camera="cam9")
    retained = probe.wait_for(lambda: probe.messages("verdict_last"), 5.0)
    assert retained
    assert retained[0].retain
    assert retained[0].ids == {"line": "bus-e", "camera": "cam9"}
    bus.clear_retained("verdict_last", camera="cam9")
    bus.close()
    probe.close()


def test_unmatched_and_failing_handlers_counted(mqtt_broker):
    bus = make_bus(mqtt_broker.url, "bus-f")

    def failing(incoming):
        raise RuntimeError("handler bug")

    bus.subscribe("verdict", failing)
    assert bus.start(wait_s=10.0)
    sender = make_bus(mqtt_broker.url, "bus-f", instance="c2")
    assert sender.start(wait_s=10.0)
    sender.publish("verdict", b"{}", camera="cam1").wait_for_publish(5.0)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not bus.counters.get("handler_error.verdict"):
        time.sleep(0.05)
    assert bus.counters.get("handler_error.verdict") == 1
    assert bus.connected
    bus.close()
    sender.close()


def test_inbox_drops_oldest():
    inbox = Inbox(2)
    assert inbox.put(1) is None
    assert inbox.put(2) is None
    assert inbox.put(3) == 1
    assert inbox.get(0) == 2
    assert inbox.get(0) == 3
    assert inbox.get(0.01) is None


def test_invalid_id_rejected(mqtt_broker):
    with pytest.raises(ValueError, match="must not contain '/'"):
        Bus(topics=TOPICS, broker=mqtt_broker.url, line="a/b", service="compressor", instance="c1", status_ids={"service": "c1"})
