"""`sdrm sparkplug`: publishes the line's verdicts as a Sparkplug B edge node.

The line is the edge node (its edge node id is the line id), each camera is a device, and the
group id is `--group-id`. The bridge subscribes to the SDRM verdict and camera status topics
and publishes on the Sparkplug topics of topics.yaml's `sparkplug` namespace:

- On every connection: NBIRTH with seq 0, the session's bdSeq and all node metrics, then a
  DBIRTH for every live camera. The NCMD subscription is in place before the NBIRTH.
- Per verdict: DDATA with the camera's metrics (sdrm.sparkplug_metrics). A camera's DBIRTH
  always comes before its first DDATA of the session.
- Camera status offline or stopped: DDEATH. Status online: DBIRTH. A status older than the last
  one applied for the camera (by session epoch, then time) is ignored.
- NCMD `Node Control/Rebirth` = true: NBIRTH (seq 0, same bdSeq) and every DBIRTH again.
- The MQTT last will is an NDEATH with the same bdSeq as the session's NBIRTH. On a clean stop
  the bridge publishes that NDEATH itself before it disconnects.

seq runs 0..255 over all NBIRTH, DBIRTH, DDATA and DDEATH messages of the node and wraps after
255. bdSeq increases by one (mod 256) for every connection attempt, and the last value is kept in
`--bdseq-file`, so a restarted bridge continues the count. A message that the bus drops (for
example while disconnected) does not use up a seq value. The bridge publishes no SDRM status,
because MQTT allows one will per client and the NDEATH is that will.

NOTE: the bridge does not read a primary host application's STATE topic, so it publishes whether
or not a host is online, and it ignores DCMD messages and every NCMD metric except the rebirth.
"""

from __future__ import annotations

import argparse
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import structlog

import sdrm
from sdrm import messages, sparkplug
from sdrm.sparkplug_metrics import camera_metrics, node_metrics
from services import config as cfg
from services.bus import Incoming, Will, now_ms
from services.inbox import Inbox
from services.common import parse_topic_message, run_main, service_bus
from services.metrics import ServiceMetrics
from services.topics import load_topics, validate_id

log = structlog.get_logger("sdrm.sparkplug")

NAMESPACE = "sparkplug"
CLOSE_TIMEOUT_S = 3.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdrm sparkplug",
        description="Publish the line's verdicts as a Sparkplug B edge node (the line) with one device per camera.",
    )
    cfg.add_common_options(parser, model=False)
    cfg.add_metrics_options(parser)
    parser.add_argument("--id", default="sparkplug", help="instance id, part of the MQTT client id (default sparkplug)")
    parser.add_argument("--group-id", default="sdrm", help="Sparkplug group id, one topic level (default sdrm)")
    parser.add_argument(
        "--bdseq-file",
        type=Path,
        default=None,
        help="file that keeps the last bdSeq across restarts (default "
        "$XDG_STATE_HOME/sdrm/sparkplug-<group>-<line>.bdseq, with ~/.local/state when XDG_STATE_HOME is unset)",
    )
    parser.add_argument("--queue-size", type=cfg.positive_int, default=1024, help="messages waiting to be processed (default 1024)")
    return parser


def default_bdseq_path(group: str, line: str) -> Path:
    """Return $XDG_STATE_HOME/sdrm/sparkplug-<group>-<line>.bdseq (XDG_STATE_HOME defaults to ~/.local/state)."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "sdrm" / f"sparkplug-{group}-{line}.bdseq"


class BdSeqFile:
    """The edge node's last bdSeq, kept in a text file with one integer 0..255.

    A missing or unreadable file starts the count at 0. A failed write is logged and the count
    goes on in memory, so the bridge keeps running but a restart may repeat a bdSeq.
    """

    def __init__(self, path: Path, bridge_log) -> None:
        self.path = path
        self._log = bridge_log
        self.last = self._read()

    def advance(self) -> int:
        """Return the next bdSeq and store it."""
        self.last = sparkplug.next_bdseq(self.last)
        self._write(self.last)
        return self.last

    def _read(self) -> int | None:
        try:
            text = self.path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        except OSError as error:
            self._log.warning("bdseq_read_failed", path=str(self.path), error=str(error))
            return None
        if not text.isdigit() or int(text) >= sparkplug.SEQ_MODULUS:
            self._log.warning("bdseq_invalid", path=str(self.path), content=text[:20])
            return None
        return int(text)

    def _write(self, value: int) -> None:
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(f"{value}\n", encoding="utf-8")
            os.replace(temporary, self.path)
        except OSError as error:
            self._log.warning("bdseq_save_failed", path=str(self.path), bdseq=value, error=str(error))


@dataclass
class _Camera:
    """State of one camera (one Sparkplug device) in the bridge."""

    status_order: tuple[int, int] = (-1, -1)  # (session_epoch, ts_ms) of the last Status applied
    alive: bool = False  # online status, or a verdict since the last offline status
    born_in: int | None = None  # connection whose DBIRTH of this camera was published
    verdict: messages.Verdict | None = None  # latest verdict, the values of the next DBIRTH


@dataclass(frozen=True)
class _Session:
    """One MQTT connection attempt: its number (from 1) and the bdSeq of its NDEATH will."""

    connection: int
    bdseq: int


class SparkplugBridge:
    def __init__(self, config: argparse.Namespace, stop: threading.Event) -> None:
        self.config = config
        self.stop = stop
        self.line = validate_id("line", config.line)
        self.group = validate_id("group", config.group_id)
        validate_id("service", config.id)
        self.topics = load_topics(namespaces=(NAMESPACE,))
        self.log = log.bind(line=self.line, group=self.group, bridge=config.id)

        self.bdseq = BdSeqFile(config.bdseq_file or default_bdseq_path(self.group, self.line), self.log)
        self.seq = sparkplug.SequenceNumber()
        self.cameras: dict[str, _Camera] = {}
        self.inbox = Inbox(config.queue_size)
        # Serialises the session change in the will callback with every publish, so no message of
        # an older session goes out after the next connection's NDEATH will was set.
        self._lock = threading.Lock()
        self._session = _Session(connection=0, bdseq=-1)
        self._born_in: int | None = None  # connection whose NBIRTH was published

        self.bus = service_bus(
            config,
            self.topics,
            service="sparkplug",
            instance=config.id,
            status_topic=None,
            will=self._next_will,
        )
        self.counters = self.bus.counters
        self.metrics = ServiceMetrics(self.bus, queue=self.inbox)

    # Network thread ------------------------------------------------------------------------------

    def _next_will(self) -> Will:
        """Start a new session before a connection attempt and return its NDEATH will."""
        with self._lock:
            session = _Session(self._session.connection + 1, self.bdseq.advance())
            self._session = session
        self.log.info("session_started", connection=session.connection, bdseq=session.bdseq)
        return Will("spb_ndeath", sparkplug.ndeath_payload(session.bdseq, now_ms()), {"group": self.group})

    def _on_message(self, incoming: Incoming) -> None:
        dropped = self.inbox.put(incoming)
        if dropped is not None:
            self.counters.add(f"dropped.{dropped.name}.queue_full")
            self.log.warning("message_dropped", topic=dropped.topic, reason="inbox full")

    # Main loop -----------------------------------------------------------------------------------

    def run(self) -> int:
        self.bus.subscribe("spb_ncmd", self._on_message, group=self.group)
        self.bus.subscribe("camera_status", self._on_message)
        self.bus.subscribe("verdict", self._on_message)
        self.bus.start()
        self.log.info("sparkplug_started", broker=self.config.broker, bdseq_file=str(self.bdseq.path))
        try:
            while not self.stop.is_set():
                incoming = self.inbox.get(timeout=0.1)
                with self._lock:
                    self._ensure_node_birth()
                    if incoming is not None:
                        self._dispatch(incoming)
        finally:
            self._close()
        return 0

    def _close(self) -> None:
        with self._lock:
            if self._born_in == self._session.connection and self.bus.connected:
                self._publish_ndeath(self._session.bdseq)
        self.bus.close(CLOSE_TIMEOUT_S)
        self.log.info("sparkplug_stopped", counters=self.counters.snapshot())

    def _publish_ndeath(self, bdseq: int) -> None:
        """Publish the session's NDEATH itself, because the clean disconnect that follows suppresses the will."""
        info = self.bus.publish("spb_ndeath", sparkplug.ndeath_payload(bdseq, now_ms()), group=self.group)
        if info is None:
            return
        try:
            info.wait_for_publish(CLOSE_TIMEOUT_S)
        except (RuntimeError, ValueError) as error:
            self.log.warning("node_death_failed", bdseq=bdseq, error=str(error))
            return
        self.log.info("node_death_published", bdseq=bdseq)

    def _dispatch(self, incoming: Incoming) -> None:
        if incoming.name == "verdict":
            self._on_verdict(incoming)
        elif incoming.name == "camera_status":
            self._on_status(incoming)
        else:
            self._on_command(incoming)

    # Inputs (worker thread, with the lock held) ----------------------------------------------------

    def _on_verdict(self, incoming: Incoming) -> None:
        verdict = parse_topic_message(incoming, messages.Verdict, "camera", self.bus, "verdict_invalid")
        if verdict is None:
            return
        camera = self.cameras.setdefault(verdict.camera, _Camera())
        camera.verdict = verdict
        camera.alive = True
        self._publish_ddata(verdict.camera, camera)

    def _on_status(self, incoming: Incoming) -> None:
        if not incoming.payload:
            return  # a cleared retained status
        status = parse_topic_message(incoming, messages.Status, "id", self.bus, "status_invalid", topic_id="camera")
        if status is None:
            return
        camera = self.cameras.setdefault(status.id, _Camera())
        order = (status.session_epoch, status.ts_ms)
        if order < camera.status_order:
            self.counters.add("status_stale")
            return
        camera.status_order = order
        camera.alive = status.state == "online"
        self.log.info("camera_status", camera=status.id, state=status.state, session_epoch=status.session_epoch)
        if camera.alive:
            self._ensure_device_birth(status.id, camera)
        else:
            self._publish_ddeath(status.id, camera)

    def _on_command(self, incoming: Incoming) -> None:
        try:
            payload = sparkplug.decode_payload(incoming.payload)
        except sparkplug.SparkplugError as error:
            self.bus.report_error("ncmd_invalid", str(error), topic=incoming.topic)
            return
        if not sparkplug.rebirth_requested(payload):
            names = [metric.name for metric in payload.metrics]
            self.counters.add("ncmd_ignored")
            self.log.warning("ncmd_ignored", topic=incoming.topic, metrics=names[:10])
            return
        self.counters.add("rebirth_requested")
        self.log.info("rebirth_requested", topic=incoming.topic)
        self._born_in = None
        self._ensure_node_birth()

    # Publishing (with the lock held) -------------------------------------------------------------

    def _ensure_node_birth(self) -> None:
        """Publish NBIRTH and the DBIRTH of every live camera once per connection."""
        session = self._session
        if self._born_in == session.connection or not self.bus.connected:
            return
        self.seq.reset()
        metrics = node_metrics(session.bdseq, self.line, sdrm.__version__)
        timestamp = now_ms()
        if self.bus.publish("spb_nbirth", sparkplug.encode_payload(metrics, timestamp, self.seq.value), group=self.group) is None:
            return
        self.seq.advance()
        self._born_in = session.connection
        self.log.info("node_birth_published", connection=session.connection, bdseq=session.bdseq)
        for name, camera in self.cameras.items():
            camera.born_in = None
            if camera.alive:
                self._ensure_device_birth(name, camera)

    def _ensure_device_birth(self, name: str, camera: _Camera) -> bool:
        """Publish the camera's DBIRTH unless this connection has one, and return whether the camera is born now."""
        connection = self._session.connection
        if camera.born_in == connection:
            return True
        if self._born_in != connection:
            return False
        seq = self._publish_node_message("spb_dbirth", camera_metrics(camera.verdict, now_ms()), name)
        if seq is None:
            return False
        camera.born_in = connection
        self.log.info("device_birth_published", camera=name, seq=seq)
        return True

    def _publish_ddata(self, name: str, camera: _Camera) -> None:
        if not self._ensure_device_birth(name, camera):
            self.counters.add("dropped.spb_ddata.not_born")
            return
        self._publish_node_message("spb_ddata", camera_metrics(camera.verdict, now_ms()), name)

    def _publish_ddeath(self, name: str, camera: _Camera) -> None:
        connection = self._session.connection
        born = camera.born_in == connection and self._born_in == connection
        camera.born_in = None
        if born and self._publish_node_message("spb_ddeath", [], name) is not None:
            self.log.info("device_death_published", camera=name)

    def _publish_node_message(self, topic: str, metrics: list[sparkplug.Metric], camera: str) -> int | None:
        """Publish a DBIRTH, DDATA or DDEATH with the next seq and return that seq, or None when dropped.

        seq advances only when the bus took the message.
        """
        seq = self.seq.value
        payload = sparkplug.encode_payload(metrics, now_ms(), seq)
        if self.bus.publish(topic, payload, group=self.group, camera=camera) is None:
            return None
        self.seq.advance()
        return seq


def main(argv: list[str] | None = None) -> int:
    return run_main("sparkplug", build_parser, SparkplugBridge, argv)


if __name__ == "__main__":
    raise SystemExit(main())
