"""The MQTT connection of a service: the only module that uses paho-mqtt.

A `Bus` owns one paho client and one network thread. It

- connects with a stable client id `sdrm-<line>-<service>-<id>`, MQTT 5 by default (3.1.1 for
  brokers without MQTT 5), and reconnects with exponential backoff, logging every retry;
- authenticates with a username and password when given, and speaks TLS 1.2 or newer to an
  mqtts:// URL (`services.security` checks the options). A broker that refuses the connection,
  for example for a wrong password, is logged and retried with the same backoff;
- publishes a retained `online` Status on every connect, with a new session epoch each time. The
  last will is a retained `offline` Status with the same epoch, so a receiver can discard a will
  that arrives after a newer `online`. `close()` publishes a retained `stopped` Status and
  disconnects cleanly, so the broker does not send the will;
- subscribes by topic name from topics.yaml (never by a hard-coded string) and calls the
  subscriber's handler in the network thread. Handlers must be quick, so services hand messages
  to their worker thread through an `Inbox`;
- publishes with each topic's QoS and retain flag, with a bounded in-flight window and a bounded
  outgoing queue, and counts every dropped message and error by reason. A message larger than the
  broker's maximum packet size is rejected before it is queued, because the broker would close
  the connection and paho would resend the same message after every reconnect;
- reports rejected input on the service's errors topic (`report_error`), rate-limited per kind;
- optionally keeps a persistent session (`session_expiry_s` > 0), so that the broker queues QoS 1
  messages while the service is down and delivers them on its return. With `manual_ack`, a QoS 1
  message is acknowledged only when the service calls `ack` after handling it, so the broker
  redelivers what a stopped or crashed service had received but not handled.
"""

from __future__ import annotations

import itertools
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from pydantic import SecretStr
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

from sdrm import messages
from services.config import broker_uses_tls, mask_url_credentials, parse_broker
from services.inbox import Counters
from services.security import client_tls_context
from services.topics import TopicMap

log = structlog.get_logger("sdrm.bus")

MQTT_MAX_PACKET_BYTES = 268_435_455  # largest packet the MQTT remaining-length field can describe
# CONNACK reasons of a rejected username or password: MQTT 5 "Bad user name or password" and
# "Not authorized" (paho maps the MQTT 3.1.1 return codes 4 and 5 to the same values).
AUTH_FAILURE_CODES = (0x86, 0x87)
AUTH_FAILURE_HINT = (
    "check --username and the password (--password-file or SDRM_PASSWORD) against the broker's password file"
)
ERROR_REPORT_INTERVAL_S = 1.0  # at most one ErrorReport per kind and interval; repeats are counted


def now_ms() -> int:
    """Return the wall-clock time in epoch milliseconds (UTC)."""
    return time.time_ns() // 1_000_000


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
    expiry_s: float | None = None  # MQTT 5 message expiry left at receipt, in seconds; None without one
    user_properties: dict[str, str] = field(default_factory=dict)
    mid: int = 0
    qos: int = 0
    connection: int = 0  # number of the connection that received it; acks are valid only on that one

    def expired(self) -> bool:
        """Return whether the message's MQTT 5 expiry interval has run out since its receipt."""
        return self.expiry_s is not None and time.monotonic() - self.received_monotonic > self.expiry_s


Handler = Callable[[Incoming], None]


@dataclass(frozen=True)
class Will:
    """Last will of a client without status: the topics.yaml topic name, its ids and the payload."""

    name: str
    payload: bytes
    ids: dict[str, str] = field(default_factory=dict)


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

    will gives a client without status its own last will: Bus calls it before every connection
    attempt and sets the returned Will with the QoS and retain flag of its topic, so the payload
    may change per session (the Sparkplug bridge's NDEATH carries a new bdSeq each time).
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
        backoff_max_s: float = 5.0,
        info: dict[str, Any] | None = None,
        will: Callable[[], Will] | None = None,
        session_expiry_s: int = 0,
        max_packet_bytes: int | None = None,
        manual_ack: bool = False,
        username: str | None = None,
        password: SecretStr | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        if will is not None and status_topic is not None:
            raise ValueError("a Bus with a status topic uses the offline Status as its will: pass status_topic=None with will")
        self._will = will
        self.topics = topics
        self.host, self.port = parse_broker(broker)
        self.tls = broker_uses_tls(broker)
        if tls_context is not None and not self.tls:
            raise ValueError(f"a TLS context was given for the plain broker URL {broker!r}: use mqtts://host:port")
        self.username = username
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
        self.session_expiry_s = session_expiry_s
        # Lowered to the broker's Maximum Packet Size when its MQTT 5 CONNACK carries one.
        self.max_packet_bytes = min(max_packet_bytes or MQTT_MAX_PACKET_BYTES, MQTT_MAX_PACKET_BYTES)
        self._configured_max_packet = self.max_packet_bytes
        self._error_reports: dict[str, tuple[float, int]] = {}  # kind -> (last report monotonic s, suppressed)

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
        self._refused = False
        self._subscribing: dict[int, str] = {}  # SUBSCRIBE packet id -> topic filter, until its SUBACK
        self._subscribing_lock = threading.Lock()
        # A device's or camera's own id (its status topic id) goes into every event as `device` or `camera`.
        own_ids = {key: value for key, value in (status_ids or {}).items() if key != "service"}
        self._log = log.bind(
            line=line, service=service, instance=instance, **own_ids, client_id=self.client_id, broker=broker
        )

        protocol = MQTTProtocolVersion.MQTTv5 if mqtt_version == "5" else MQTTProtocolVersion.MQTTv311
        kwargs: dict[str, Any] = {}
        if protocol == MQTTProtocolVersion.MQTTv311:
            kwargs["clean_session"] = session_expiry_s <= 0
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=protocol,
            reconnect_on_failure=False,
            manual_ack=manual_ack,
            **kwargs,
        )
        self.manual_ack = manual_ack
        self._connection = 0
        self._state = "online"
        self._connect_hooks: list[Callable[[], None]] = []
        self._client.max_inflight_messages_set(max_inflight)
        self._client.max_queued_messages_set(max_queued)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_publish = self._on_publish
        self._set_credentials(username, password, tls_context)

    def _set_credentials(self, username: str | None, password: SecretStr | None, tls_context: ssl.SSLContext | None) -> None:
        """Give paho the username, password and TLS context; an mqtts:// URL without a context trusts the system CAs."""
        if username is not None:
            self._client.username_pw_set(username, password.get_secret_value() if password is not None else None)
        if self.tls:
            self._client.tls_set_context(tls_context if tls_context is not None else client_tls_context())

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
            elif self._will is not None:
                will = self._will()
                will_topic = self.topics.topic(will.name, **{"line": self.line, **will.ids})
                self._client.will_set(will_topic, will.payload, self.topics.qos(will.name), self.topics.retain(will.name))
            try:
                if self.mqtt_version == "5":
                    properties = None
                    if self.session_expiry_s > 0:
                        properties = Properties(PacketTypes.CONNECT)
                        properties.SessionExpiryInterval = int(self.session_expiry_s)
                    self._client.connect(
                        self.host, self.port, self.keepalive_s,
                        clean_start=self.session_expiry_s <= 0, properties=properties,
                    )
                else:
                    self._client.connect(self.host, self.port, self.keepalive_s)
            except OSError as error:
                self.counters.add("connect.failed")
                self._log.warning("connect_retry", attempt=attempt, retry_in_s=round(delay, 2), error=str(error))
                self._closing.wait(delay)
                delay = min(delay * 2, self.backoff_max_s)
                continue

            self._accepted = False
            self._refused = False
            self._client.loop_forever()
            self._connected.clear()
            if self._closing.is_set():
                break
            if self._accepted:
                # The broker accepted this connection, so the next loss starts a fresh backoff.
                delay = self.backoff_min_s
            if self._refused:
                self._log.warning("connect_retry", attempt=attempt, retry_in_s=round(delay, 2), error="refused by the broker")
            else:
                self.counters.add("connection.lost")
                self._log.warning("reconnect_retry", attempt=attempt, retry_in_s=round(delay, 2))
            self._closing.wait(delay)
            delay = min(delay * 2, self.backoff_max_s)

    # paho callbacks (network thread) --------------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refused = True
            count = self.counters.add("connect.refused")
            hint = AUTH_FAILURE_HINT if reason_code.value in AUTH_FAILURE_CODES else None
            # Retries repeat every few seconds, so only the first and every 60th refusal are errors.
            log_event = self._log.error if count == 1 or count % 60 == 0 else self._log.debug
            log_event("connect_refused", reason=str(reason_code), username=self.username, hint=hint, count=count)
            return
        self._accepted = True
        self._connection += 1
        broker_max = getattr(properties, "MaximumPacketSize", None) if properties is not None else None
        self.max_packet_bytes = min(self._configured_max_packet, broker_max or MQTT_MAX_PACKET_BYTES)
        if self._status_topic is not None:
            client.publish(self._status_topic, self._status_payload(self._state), self._status_qos, self._status_retain)
        with self._lock:
            subscriptions = list(self._subscriptions)
        for subscription in subscriptions:
            self._send_subscribe(subscription.topic_filter, subscription.qos)
        self._connected.set()
        self._log.info("connected", session_epoch=self.session_epoch, subscriptions=len(subscriptions))
        for hook in list(self._connect_hooks):
            try:
                hook()
            except Exception as error:  # noqa: BLE001 - a hook bug must not stop the network thread
                self.counters.add("handler_error.connect_hook")
                self._log.exception("connect_hook_failed", error=str(error))

    def on_connect(self, hook: Callable[[], None]) -> None:
        """Call hook in the network thread after every accepted connection, once the subscriptions are sent.

        A service republishes its own retained state there (the scheduler its assignment), because
        a broker restarted without persistence has lost it.
        """
        self._connect_hooks.append(hook)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        if not self._closing.is_set() and not self._refused:
            self._log.warning("disconnected", reason=str(reason_code))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        # NOTE: no test covers a rejected SUBSCRIBE, because Mosquitto 2.0.11 grants every SUBSCRIBE under an acl_file.
        with self._subscribing_lock:
            topic_filter = self._subscribing.pop(mid, None)
        for reason_code in reason_codes:
            if reason_code.is_failure:
                self.counters.add("subscribe.rejected")
                self._log.error("subscribe_rejected", topic_filter=topic_filter, reason=str(reason_code), username=self.username)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        # Only MQTT 5 brokers report a rejected PUBLISH (in the PUBACK or PUBREC). Mosquitto 2.0.11
        # replies to a QoS 1 PUBLISH that the ACL denies with PUBACK "Not authorized" under MQTT 5,
        # and with a plain PUBACK under MQTT 3.1.1, while it drops the message in both cases.
        if not reason_code.is_failure:
            return
        error = f"the broker rejected a PUBLISH (packet id {mid}): {reason_code}; check the ACL for user {self.username!r}"
        self.report_error("publish_rejected", error)

    def _send_subscribe(self, topic_filter: str, qos: int) -> None:
        # The lock is held across subscribe() so that the SUBACK cannot arrive before its packet id is stored.
        with self._subscribing_lock:
            result, mid = self._client.subscribe(topic_filter, qos)
            if mid is not None:
                self._subscribing[mid] = topic_filter

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
                mid=message.mid,
                qos=message.qos,
                connection=self._connection,
                **_message_properties(message),
            )
            self.counters.add(f"received.{subscription.name}")
            try:
                subscription.handler(incoming)
            except Exception as error:  # noqa: BLE001 - a handler bug must not stop the network thread
                self.counters.add(f"handler_error.{subscription.name}")
                self._log.exception("handler_failed", topic=topic, error=str(error))
                self.ack(incoming)
            return
        self._ack_message(message)
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
            self._send_subscribe(topic_filter, subscription.qos)
        return topic_filter

    def publish(
        self,
        name: str,
        payload: bytes,
        expiry_s: int | None = None,
        retain: bool | None = None,
        user_properties: dict[str, str] | None = None,
        **ids: str,
    ) -> mqtt.MQTTMessageInfo | None:
        """Publish payload on topic `name` with its QoS and retain flag from topics.yaml.

        Returns the paho message info, or None when the message was dropped (counted under
        "dropped.<name>.<reason>"). QoS 1 and 2 messages published while disconnected wait in the
        bounded outgoing queue and are sent on reconnect. expiry_s sets the MQTT 5 message expiry
        in seconds and user_properties the MQTT 5 user properties; MQTT 3.1.1 sends neither.
        A message above `max_packet_bytes` is dropped as "too_large" and reported on the errors topic.
        """
        topic = self.topics.topic(name, **{"line": self.line, **ids})
        properties = None
        if self.mqtt_version == "5" and (expiry_s is not None or user_properties):
            properties = Properties(PacketTypes.PUBLISH)
            if expiry_s is not None:
                properties.MessageExpiryInterval = int(expiry_s)
            for key, value in (user_properties or {}).items():
                properties.UserProperty = (key, value)
        qos = self.topics.qos(name)
        flag = self.topics.retain(name) if retain is None else retain
        size = packet_bytes(topic, payload, qos, properties, mqtt5=self.mqtt_version == "5")
        if size > self.max_packet_bytes:
            self.counters.add(f"dropped.{name}.too_large")
            self.report_error(
                "payload_too_large",
                f"message of {size} bytes on {topic} exceeds the broker's maximum packet size of "
                f"{self.max_packet_bytes} bytes, so it was not sent: raise max_packet_size in the broker "
                f"configuration and --max-packet-bytes, or send smaller frames (lower resolution or fewer heads per device)",
                topic=topic,
            )
            return None
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

    def ack(self, incoming: Incoming) -> None:
        """Acknowledge a QoS 1 or 2 message received with manual_ack; a no-op otherwise.

        A message received on an earlier connection is not acknowledged, because the broker
        redelivers it on the new connection under another packet id.
        """
        if self.manual_ack and incoming.qos > 0 and incoming.connection == self._connection:
            self._client.ack(incoming.mid, incoming.qos)

    def _ack_message(self, message: mqtt.MQTTMessage) -> None:
        if self.manual_ack and message.qos > 0:
            self._client.ack(message.mid, message.qos)

    def report_error(self, kind: str, error: str, topic: str | None = None, **ids: Any) -> None:
        """Count, log and publish one rejected input or failed step as an ErrorReport.

        The counter is "errors.<kind>". Each kind is published at most once per
        ERROR_REPORT_INTERVAL_S, and the report counts the repeats suppressed since the last one.
        Nothing is published without a status topic (a monitor client) or while disconnected, but
        the count still grows, so the next report carries it.
        """
        count = self.counters.add(f"errors.{kind}")
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._error_reports.get(kind, (-ERROR_REPORT_INTERVAL_S, 0))
            due = now - last >= ERROR_REPORT_INTERVAL_S
            self._error_reports[kind] = (now, 0) if due else (last, suppressed + 1)
        # Repeats within the interval are logged at debug, so a flood of bad input cannot flood the log.
        log_event = self._log.warning if due else self._log.debug
        log_event(kind, topic=topic, error=error, count=count, **ids)
        if not due or self._status_topic is None or not self._connected.is_set():
            return

        # Reports leave the process, so credentials in URLs (an RTSP source) are masked as in the logs.
        report_ids = {
            key: mask_url_credentials(value) if isinstance(value, str) else value
            for key, value in ids.items()
            if isinstance(value, (str, int)) and not isinstance(value, bool)
        }
        report = messages.ErrorReport(
            service=self.service,
            id=self.instance,
            kind=kind,
            error=mask_url_credentials(error[:2000]),
            topic=topic,
            ts_ms=now_ms(),
            count=count,
            suppressed=suppressed,
            ids=report_ids,
        )
        error_topic = self.topics.topic("errors", line=self.line, service=self.instance)
        self._client.publish(error_topic, messages.to_json(report), self.topics.qos("errors"), self.topics.retain("errors"))

    def clear_retained(self, name: str, **ids: str) -> None:
        """Delete a retained message by publishing an empty retained payload on topic `name`."""
        topic = self.topics.topic(name, **{"line": self.line, **ids})
        self._client.publish(topic, b"", self.topics.qos(name), True)

    def update_info(self, **info: Any) -> None:
        """Merge info into the status info and republish the current state when connected."""
        self.info.update(info)
        if self._status_topic is not None and self._connected.is_set():
            self._client.publish(self._status_topic, self._status_payload(self._state), self._status_qos, self._status_retain)

    def set_state(self, state: str, **info: Any) -> None:
        """Publish `online` or `offline` for what this client stands for while it stays connected.

        An ingest marks its camera offline while the source is stalled or unavailable. The state
        is published again on every reconnect. It carries the session's (session_epoch, ts_ms), as
        `online` and the will do, so receivers apply statuses of one session in arrival order and a
        later will still counts.
        """
        if state not in ("online", "offline"):
            raise ValueError(f"invalid state {state!r}: use 'online' or 'offline'")
        self._state = state
        self.update_info(**info)

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


def packet_bytes(topic: str, payload: bytes, qos: int, properties: Properties | None, mqtt5: bool) -> int:
    """Return the size in bytes of the PUBLISH packet that carries payload on topic.

    Fixed header (1 byte plus a 1 to 4 byte remaining length), topic with its 2-byte length,
    2-byte packet id for QoS > 0, the MQTT 5 properties with their length prefix, then the payload.
    """
    remaining = 2 + len(topic.encode("utf-8")) + (2 if qos > 0 else 0) + len(payload)
    if properties is not None:
        remaining += len(properties.pack())
    elif mqtt5:
        remaining += 1
    return 1 + _varint_bytes(remaining) + remaining


def _varint_bytes(value: int) -> int:
    size = 1
    while value >= 128:
        value //= 128
        size += 1
    return size


def _message_properties(message: mqtt.MQTTMessage) -> dict[str, Any]:
    """Return the Incoming fields read from a message's MQTT 5 properties (expiry, user properties)."""
    properties = getattr(message, "properties", None)
    if properties is None:
        return {}
    fields: dict[str, Any] = {}
    expiry = getattr(properties, "MessageExpiryInterval", None)
    if expiry is not None:
        fields["expiry_s"] = float(expiry)
    user = getattr(properties, "UserProperty", None)
    if user:
        fields["user_properties"] = {str(key): str(value) for key, value in user}
    return fields


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
