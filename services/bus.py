"""The MQTT connection of a service: the only module that uses paho-mqtt.

A `Bus` owns one paho client and one network thread. It

- connects with a stable client id `sdrm-<line>-<service>-<id>`, MQTT 5 by default (3.1.1 for
  brokers without MQTT 5), and reconnects with exponential backoff, logging every retry;
- publishes a retained `online` Status on every connect, with a new session epoch each time. The
  last will is a retained `offline` Status with the same epoch, so a receiver can discard a will
  that arrives after a newer `online`. `close()` publishes a retained `stopped` Status and
  disconnects cleanly, so the broker does not send the will;
- subscribes by topic name from topics.yaml (never by a hard-coded string) and calls the
  subscriber's handler in the network thread. Handlers must be quick, so services hand messages
  to their worker thread through an `Inbox`;
- publishes with each topic's QoS and retain flag, with a bounded in-flight window and a bounded
  outgoing queue, and counts every dropped message and error by reason.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

from sdrm import messages
from services.config import parse_broker
from services.topics import TopicMap

log = structlog.get_logger("sdrm.bus")


def now_ms() -> int:
    """Return the wall-clock time in epoch milliseconds (UTC)."""
    return time.time_ns() // 1_000_000


class Counters:
    """Thread-safe event counters by reason, e.g. counters.add("dropped.queue_full")."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: collections.Counter[str] = collections.Counter()

    def add(self, name: str, amount: int = 1) -> int:
        with self._lock:
            self._values[name] += amount
            return self._values[name]

    def get(self, name: str) -> int:
        with self._lock:
            return self._values[name]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(sorted(self._values.items()))


class Inbox:
    """Bounded hand-off queue from the network thread to a worker thread.

    `put` waits only for the inbox's lock, never for room: when the inbox is full it drops the
    oldest item and returns it, so the caller can count it and report the loss downstream.
    """

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"inbox size must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self._items: collections.deque = collections.deque()
        self._ready = threading.Condition()

    def put(self, item: Any) -> Any | None:
        """Append item; return the dropped oldest item when the inbox was full, else None."""
        with self._ready:
            dropped = self._items.popleft() if len(self._items) >= self.maxsize else None
            self._items.append(item)
            self._ready.notify()
            return dropped

    def get(self, timeout: float | None = None) -> Any | None:
        """Return the oldest item, or None when none arrives within timeout seconds."""
        with self._ready:
            if not self._items:
                self._ready.wait(timeout)
            return self._items.popleft() if self._items else None

    def __len__(self) -> int:
        with self._ready:
            return len(self._items)


@dataclass
class Incoming:
    """A received message: the topic name from topics.yaml, the ids parsed from the topic, the payload."""

    name: str
    ids: dict[str, str]
    topic: str
    payload: bytes
    retain: bool
    received_ms: int
    received_monotonic: float = field(default_factory=time.monotonic)


Handler = Callable[[Incoming], None]


@dataclass
class _Subscription:
    name: str
    topic_filter: str
    qos: int
    handler: Handler


class Bus:
    """One service's MQTT client with liveness status, per-topic handlers and counters.

    status_topic names the topics.yaml entry of this instance's liveness status
    ("service_status", "device_status" or "camera_status") and status_ids fills its placeholders;
    None gives a client without status and without will (a monitor).
    """

    def __init__(
        self,
        *,
        topics: TopicMap,
        broker: str,
        line: str,
        service: str,
        instance: str,
        status_topic: str | None = "service_status",
        status_ids: dict[str, str] | None = None,
        mqtt_version: str = "5",
        keepalive_s: int = 10,
        max_inflight: int = 20,
        max_queued: int = 1000,
        backoff_min_s: float = 0.2,
        backoff_max_s: float = 30.0,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.topics = topics
        self.host, self.port = parse_broker(broker)
        self.broker = broker
        self.line = line
        self.service = service
        self.instance = instance
        self.client_id = f"sdrm-{line}-{service}-{instance}"
        self.counters = Counters()
        self.info = dict(info or {})
        self.session_epoch = 0
        self.keepalive_s = keepalive_s
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.mqtt_version = mqtt_version

        self._status_topic = None
        if status_topic is not None:
            self._status_topic = topics.topic(status_topic, **{"line": line, **(status_ids or {})})
            self._status_qos = topics.qos(status_topic)
            self._status_retain = topics.retain(status_topic)
        self._subscriptions: list[_Subscription] = []
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._connections = itertools.count(1)
        self._accepted = False
        self._log = log.bind(client_id=self.client_id, broker=broker)

        protocol = MQTTProtocolVersion.MQTTv5 if mqtt_version == "5" else MQTTProtocolVersion.MQTTv311
        kwargs: dict[str, Any] = {"clean_session": True} if protocol == MQTTProtocolVersion.MQTTv311 else {}
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=protocol,
            reconnect_on_failure=False,
            **kwargs,
        )
        self._client.max_inflight_messages_set(max_inflight)
        self._client.max_queued_messages_set(max_queued)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    # Lifecycle ------------------------------------------------------------------------------------

    def start(self, wait_s: float | None = None) -> bool:
        """Start the network thread; with wait_s, wait that long for the first connection.

        Returns whether the client is connected.
        """
        self._thread = threading.Thread(target=self._run, name=f"mqtt-{self.client_id}", daemon=True)
        self._thread.start()
        if wait_s is not None:
            return self._connected.wait(wait_s)
        return self._connected.is_set()

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def close(self, timeout_s: float = 3.0, info: dict[str, Any] | None = None) -> None:
        """Publish the retained `stopped` status, disconnect cleanly and join the network thread."""
        if self._closing.is_set():
            return
        if self._status_topic is not None and self._connected.is_set():
            payload = self._status_payload("stopped", info)
            message = self._client.publish(self._status_topic, payload, self._status_qos, self._status_retain)
            try:
                message.wait_for_publish(timeout_s)
            except (RuntimeError, ValueError) as error:
                self._log.warning("status_publish_failed", state="stopped", error=str(error))
        self._closing.set()
        self._client.disconnect()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._log.info("bus_closed", counters=self.counters.snapshot())

    def _run(self) -> None:
        delay = self.backoff_min_s
        while not self._closing.is_set():
            attempt = next(self._connections)
            self.session_epoch = max(self.session_epoch + 1, now_ms())
            if self._status_topic is not None:
                self._client.will_set(
                    self._status_topic, self._status_payload("offline"), self._status_qos, self._status_retain
                )
            try:
                if self.mqtt_version == "5":
                    self._client.connect(self.host, self.port, self.keepalive_s, clean_start=True)
                else:
                    self._client.connect(self.host, self.port, self.keepalive_s)
            except OSError as error:
                self.counters.add("connect.failed")
                self._log.warning("connect_retry", attempt=attempt, retry_in_s=round(delay, 2), error=str(error))
                self._closing.wait(delay)
                delay = min(delay * 2, self.backoff_max_s)
                continue

            self._accepted = False
            self._client.loop_forever()
            self._connected.clear()
            if self._closing.is_set():
                break
            if self._accepted:
                # The broker accepted this connection, so the next loss starts a fresh backoff.
                delay = self.backoff_min_s
            self.counters.add("connection.lost")
            self._log.warning("reconnect_retry", attempt=attempt, retry_in_s=round(delay, 2))
            self._closing.wait(delay)
            delay = min(delay * 2, self.backoff_max_s)

    # paho callbacks (network thread) --------------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.counters.add("connect.refused")
            self._log.error("connect_refused", reason=str(reason_code))
            return
        self._accepted = True
        if self._status_topic is not None:
            client.publish(self._status_topic, self._status_payload("online"), self._status_qos, self._status_retain)
        with self._lock:
            subscriptions = list(self._subscriptions)
        for subscription in subscriptions:
            client.subscribe(subscription.topic_filter, subscription.qos)
        self._connected.set()
        self._log.info("connected", session_epoch=self.session_epoch, subscriptions=len(subscriptions))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        if not self._closing.is_set():
            self._log.warning("disconnected", reason=str(reason_code))

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            subscriptions = list(self._subscriptions)
        topic = message.topic
        for subscription in subscriptions:
            ids = self.topics.match(subscription.name, topic)
            if ids is None:
                continue
            incoming = Incoming(
                name=subscription.name,
                ids=ids,
                topic=topic,
                payload=message.payload,
                retain=bool(message.retain),
                received_ms=now_ms(),
            )
            try:
                subscription.handler(incoming)
            except Exception as error:  # noqa: BLE001 - a handler bug must not stop the network thread
                self.counters.add(f"handler_error.{subscription.name}")
                self._log.exception("handler_failed", topic=topic, error=str(error))
            return
        # Some brokers (amqtt 0.12) deliver retained messages that match no subscription, so the
        # first one per topic is logged at warning and repeats only at debug.
        count = self.counters.add(f"received.unmatched_topic.{topic}")
        log_event = self._log.warning if count == 1 else self._log.debug
        log_event("message_unmatched", topic=topic, count=count)

    # Subscribing and publishing -------------------------------------------------------------------

    def subscribe(self, name: str, handler: Handler, shared: bool = False, **ids: str) -> str:
        """Subscribe to topic `name` (placeholders without an id become '+'); return the filter.

        shared=True subscribes through the topic's shared group ($share/<group>/...). Takes effect
        at once when connected, and again on every reconnect.
        """
        ids = {"line": self.line, **ids}
        topic_filter = self.topics.filter(name, shared=shared, **ids)
        subscription = _Subscription(name, topic_filter, self.topics.qos(name), handler)
        with self._lock:
            self._subscriptions.append(subscription)
        if self._connected.is_set():
            self._client.subscribe(topic_filter, subscription.qos)
        return topic_filter

    def publish(
        self,
        name: str,
        payload: bytes,
        expiry_s: int | None = None,
        retain: bool | None = None,
        **ids: str,
    ) -> mqtt.MQTTMessageInfo | None:
        """Publish payload on topic `name` with its QoS and retain flag from topics.yaml.

        Returns the paho message info, or None when the message was dropped (counted under
        "dropped.<name>.<reason>"). QoS 1 and 2 messages published while disconnected wait in the
        bounded outgoing queue and are sent on reconnect. expiry_s sets the MQTT 5 message expiry.
        """
        topic = self.topics.topic(name, **{"line": self.line, **ids})
        properties = None
        if expiry_s is not None and self.mqtt_version == "5":
            properties = Properties(PacketTypes.PUBLISH)
            properties.MessageExpiryInterval = int(expiry_s)
        qos = self.topics.qos(name)
        flag = self.topics.retain(name) if retain is None else retain
        try:
            info = self._client.publish(topic, payload, qos, flag, properties)
        except ValueError as error:
            self.counters.add(f"dropped.{name}.invalid")
            self._log.error("publish_failed", topic=topic, error=str(error))
            return None
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            self.counters.add(f"dropped.{name}.queue_full")
            self._log.warning("publish_dropped", topic=topic, reason="outgoing queue full")
            return None
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos == 0:
            self.counters.add(f"dropped.{name}.disconnected")
            return None
        self.counters.add(f"published.{name}")
        return info

    def clear_retained(self, name: str, **ids: str) -> None:
        """Delete a retained message by publishing an empty retained payload on topic `name`."""
        topic = self.topics.topic(name, **{"line": self.line, **ids})
        self._client.publish(topic, b"", self.topics.qos(name), True)

    def update_info(self, **info: Any) -> None:
        """Merge info into the status info and republish `online` when connected."""
        self.info.update(info)
        if self._status_topic is not None and self._connected.is_set():
            self._client.publish(self._status_topic, self._status_payload("online"), self._status_qos, self._status_retain)

    def _status_payload(self, state: str, info: dict[str, Any] | None = None) -> bytes:
        # Receivers order statuses by (session_epoch, ts_ms). The will is fixed at connect time,
        # so `online` and the will both carry the connection time, and the will never sorts
        # before the `online` of its own connection. `stopped` carries the time of the exit.
        status = messages.Status(
            state=state,
            service=self.service,
            id=self.instance,
            session_epoch=self.session_epoch,
            ts_ms=now_ms() if state == "stopped" else self.session_epoch,
            info={**self.info, **(info or {})} or None,
        )
        return messages.to_json(status)


def wait_published(infos: list[mqtt.MQTTMessageInfo | None], timeout_s: float) -> bool:
    """Wait until every message in infos is acknowledged (QoS 1 and 2) or sent (QoS 0).

    Returns False on timeout. A message published while disconnected is still queued and counts
    once paho resends it after the reconnect.
    """
    deadline = time.monotonic() + timeout_s
    for info in infos:
        if info is None:
            continue
        while not published(info):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
    return True


def published(info: mqtt.MQTTMessageInfo) -> bool:
    """Return whether paho has finished the message.

    NOTE: reads paho's private `_published` flag, because `is_published()` raises for a message
    that was queued while disconnected (rc MQTT_ERR_NO_CONN) even after paho resent it.
    """
    if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
        return True
    with info._condition:  # noqa: SLF001
        return bool(info._published)  # noqa: SLF001
