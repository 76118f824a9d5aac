"""`sdrm aggregator`: joins every frame's partial outputs and publishes its verdict.

The aggregator learns about each frame from the compressor's FrameInfo and collects the devices'
PARTIALS messages for it by (camera, frame, epoch, capture time). When all h heads are present, it runs the rest
of the model (`model.aggregate`) and applies the threshold to every tile (`decide`). It publishes
the Verdict at QoS 1 on the camera's verdict topic and retained on its `/last` topic.

Every FrameInfo gets exactly one verdict:

- "complete": all heads arrived before `--deadline-ms` (counted from the FrameInfo's arrival).
- "incomplete": some heads were still missing at the deadline. The verdict names them and is
  fail-safe: label "defect" with score 1.0, because a board that was not inspected must not pass.
- "error": the compressor could not decode or process the frame (FrameInfo.error), or the heads
  could not be joined. Also fail-safe: label "defect", score 1.0.
- "expired": the compressor skipped a live camera's frame under overload (FrameInfo.expired), or
  the FrameInfo reached the aggregator more than `--deadline-ms` after the compressor sent it, for example when the broker delivers the messages it queued while the aggregator was
  down. Such a frame is not inspected late as if it were fresh, and it gets the same fail-safe
  label. The aggregator keeps a persistent MQTT session (`--session-expiry-s`), so the broker
  queues its QoS 1 messages during an outage and every frame of that time is accounted for.

Messages are acknowledged only after they are handled (MQTT manual acknowledgement), so what
waits in the inbox when the process dies is redelivered by the broker. On SIGTERM the aggregator
first drains: for up to `--deadline-ms` it finishes the frames it is collecting, leaves messages
of new frames unacknowledged for its next start, and then gives the frames still missing heads
an "incomplete" verdict.
NOTE: after a SIGKILL, frames that were collecting heads at that moment get no verdict, because
their acknowledged messages lived only in the dead process.

A frame that never reached a compressor (the broker dropped it, for example right after a restart
without persistence, before the compressors subscribed again) has no FrameInfo, so it cannot get a
verdict. The aggregator finds such frames from gaps in the frame numbers that `sdrm ingest` gives
each camera (`sdrm.sequence`), and counts and reports them as `frames_lost` on its errors topic.

Partials that arrive without a FrameInfo wait until the deadline and then give an "error" verdict
(the announcement was lost). QoS 1 duplicates (the same head of the same frame and epoch twice)
and partials that arrive after the frame's verdict are counted and dropped.

Latency stages in the verdict (milliseconds): decode, embed and factorize (compressor), attention
(the slowest device's compute), transfer (compressor publish to aggregator receipt, less the
device's own time), aggregate, and total (verdict time less capture time).
NOTE: transfer and total compare wall clocks of different hosts when the services run on several
machines; they are accurate only with synchronised clocks (NTP/PTP).
"""

from __future__ import annotations

import argparse
import collections
import threading
import time
from dataclasses import dataclass, field

import structlog
import torch

from sdrm import messages, wire
from sdrm.inference import decide
from sdrm.sequence import FrameGaps
from services import config as cfg
from services.bus import Incoming, now_ms
from services.inbox import Inbox
from services.common import load_model, parse_topic_message, run_main, service_bus, set_threads
from services.metrics import ServiceMetrics
from services.topics import load_topics, validate_id

log = structlog.get_logger("sdrm.aggregator")

DONE_MEMORY = 10_000  # verdicts remembered to recognise late partials
LOST_GRACE_S = 10.0  # minimum wait before a missing frame number counts as lost

# (camera, frame, epoch, capture_ms). The capture time keeps frames apart when a restarted ingest
# counts its frame numbers from 0 again under the same assignment epoch.
FrameKey = tuple[str, int, int, int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdrm aggregator",
        description="Join the devices' partial outputs of every frame and publish the inspection verdict.",
    )
    cfg.add_common_options(parser)
    cfg.add_metrics_options(parser)
    parser.add_argument("--id", default="aggregator", help="instance id, unique per line (default aggregator)")
    parser.add_argument(
        "--deadline-ms",
        type=cfg.positive_int,
        default=2000,
        help="time a frame waits for all its heads after its FrameInfo, in milliseconds (default 2000)",
    )
    parser.add_argument("--queue-size", type=cfg.positive_int, default=512, help="messages waiting to be processed (default 512)")
    parser.add_argument(
        "--session-expiry-s",
        type=int,
        default=3600,
        help="how long the broker keeps this aggregator's session and queues its messages while it is "
        "disconnected, in seconds (default 3600; 0: no persistent session)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's choice)")
    return parser


@dataclass
class _Pending:
    """One frame being collected."""

    camera: str
    frame: int
    epoch: int
    deadline: float  # time.monotonic() seconds
    info: messages.FrameInfo | None = None
    capture_ms: int = 0
    blocks: dict[int, object] = field(default_factory=dict)
    partials: dict[int, torch.Tensor] = field(default_factory=dict)
    devices: dict[int, str] = field(default_factory=dict)
    device_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    transfer_ms: float = 0.0


class Aggregator:
    def __init__(self, config: argparse.Namespace, stop: threading.Event) -> None:
        self.config = config
        self.stop = stop
        self.topics = load_topics()
        validate_id("line", config.line)
        validate_id("service", config.id)
        set_threads(config.threads)
        self.model, self.manifest = load_model(config.model)
        self.heads = self.model.config.heads
        self.threshold = float(self.manifest.get("frame_threshold", self.manifest["threshold"]))
        self.model_version = str(self.manifest.get("version", "unknown"))
        self.inbox = Inbox(config.queue_size)
        self.pending: dict[FrameKey, _Pending] = {}
        # A frame resent by a publisher after a reconnect may come seconds after its successors,
        # so a number counts as lost only after a grace period well beyond one deadline.
        self.gaps = FrameGaps(grace_s=max(LOST_GRACE_S, 3 * config.deadline_ms / 1000))
        self.done: collections.OrderedDict[FrameKey, str] = collections.OrderedDict()
        self.verdicts = 0

        self.bus = service_bus(
            config,
            self.topics,
            service="aggregator",
            instance=config.id,
            status_ids={"service": config.id},
            info={"deadline_ms": config.deadline_ms, "model_version": self.model_version},
            session_expiry_s=max(config.session_expiry_s, 0),
            manual_ack=True,
        )
        self.counters = self.bus.counters
        self.metrics = ServiceMetrics(self.bus, queue=self.inbox)
        self.log = log.bind(line=config.line, aggregator=config.id)

    def _on_message(self, incoming: Incoming) -> None:
        dropped = self.inbox.put(incoming)
        if dropped is not None:
            self.bus.ack(dropped)
            self.counters.add(f"dropped.{dropped.name}.queue_full")
            self.log.warning("message_dropped", topic=dropped.topic, reason="inbox full", **dropped.ids)

    def run(self) -> int:
        self.bus.subscribe("frame_info", self._on_message)
        self.bus.subscribe("partials", self._on_message)
        self.bus.start()
        self.log.info("aggregator_started", broker=self.config.broker, deadline_ms=self.config.deadline_ms)
        try:
            while not self.stop.is_set():
                incoming = self.inbox.get(timeout=self._wait_s())
                if incoming is not None:
                    self._handle(incoming)
                self._expire()
            self._drain()
        finally:
            self.bus.close(info={"counters": self.counters.snapshot(), "verdicts": self.verdicts})
            self.log.info("aggregator_stopped", verdicts=self.verdicts, counters=self.counters.snapshot())
        return 0

    def _handle(self, incoming: Incoming) -> None:
        if incoming.name == "frame_info":
            self._on_frame_info(incoming)
        else:
            self._on_partials(incoming)
        self.bus.ack(incoming)

    def _drain(self) -> None:
        """Finish the frames being collected, for up to one deadline, before the process exits.

        Messages of frames that are not being collected stay unacknowledged, so the broker
        redelivers them to the next start (persistent session). Frames still missing heads at the
        end get an "incomplete" verdict.
        """
        if not self.pending and not len(self.inbox):
            return
        self.log.info("aggregator_draining", pending=len(self.pending), inbox=len(self.inbox))
        end = time.monotonic() + self.config.deadline_ms / 1000
        left = 0
        while self.pending and time.monotonic() < end:
            incoming = self.inbox.get(timeout=0.05)
            if incoming is None:
                continue
            if self._frame_key(incoming) in self.pending:
                self._handle(incoming)
            else:
                left += 1
        for item in self.pending.values():
            item.deadline = 0.0
        self._expire()
        self.counters.add("drain.unacknowledged", left + len(self.inbox))

    @staticmethod
    def _frame_key(incoming: Incoming) -> FrameKey | None:
        """Return the frame key of a FrameInfo or PARTIALS message, or None when it cannot be read."""
        try:
            if incoming.name == "frame_info":
                info = messages.parse(messages.FrameInfo, incoming.payload)
                return (info.camera, info.frame, info.epoch, info.capture_ms)
            envelope = wire.peek_envelope(incoming.payload)
            return (envelope.camera, envelope.frame, envelope.epoch, envelope.capture_ms)
        except (messages.MessageError, wire.WireError):
            return None

    def _wait_s(self) -> float:
        if not self.pending:
            return 0.2
        nearest = min(item.deadline for item in self.pending.values())
        return min(0.2, max(0.0, nearest - time.monotonic()))

    # Inputs --------------------------------------------------------------------------------------

    def _on_frame_info(self, incoming: Incoming) -> None:
        info = parse_topic_message(incoming, messages.FrameInfo, "camera", self.bus, "frame_info_invalid")
        if info is None:
            return
        key = (info.camera, info.frame, info.epoch, info.capture_ms)
        if info.numbered_by_source:
            self._report_lost(self.gaps.observe(info.camera, info.frame, info.capture_ms, time.monotonic()))
        if key in self.done:
            self.counters.add("frame_info_duplicate")
            return
        if info.error is not None:
            status = "expired" if info.expired else "error"
            self._publish_error(info.camera, info.frame, info.capture_ms, info.epoch, info.error, info, status=status)
            self.pending.pop(key, None)
            return
        # NOTE: sent_ms comes from the compressor's clock, so this age is only right with
        # synchronised clocks (NTP/PTP) when the two run on different hosts.
        age_ms = incoming.received_ms - info.sent_ms
        if age_ms > self.config.deadline_ms:
            error = (
                f"FrameInfo arrived {age_ms} ms after the compressor sent it, beyond the {self.config.deadline_ms} ms "
                f"deadline (aggregator outage or backlog), so the frame was not inspected"
            )
            self.pending.pop(key, None)
            self._publish_error(info.camera, info.frame, info.capture_ms, info.epoch, error, info, status="expired")
            return
        item = self.pending.get(key)
        if item is None:
            item = self.pending[key] = _Pending(info.camera, info.frame, info.epoch, self._deadline())
        else:
            item.deadline = self._deadline()
        item.info = item.info or info
        item.capture_ms = info.capture_ms
        self._try_finish(key, item)

    def _on_partials(self, incoming: Incoming) -> None:
        try:
            message = wire.decode(incoming.payload)
        except wire.WireError as error:
            self.bus.report_error("partials_invalid", f"{len(incoming.payload)} bytes: {error}", topic=incoming.topic)
            return
        if not isinstance(message, wire.PartialsMessage):
            kind = wire.Kind(message.envelope.kind).name
            self.bus.report_error("partials_invalid", f"got a {kind} message on a partials topic", topic=incoming.topic)
            return
        envelope = message.envelope
        device = incoming.ids["device"]
        key = (envelope.camera, envelope.frame, envelope.epoch, envelope.capture_ms)
        ids = {"camera": envelope.camera, "frame": envelope.frame, "epoch": envelope.epoch, "device": device}
        if key in self.done:
            self.counters.add("partials_late")
            self.log.info("partials_late", **ids, verdict=self.done[key])
            return
        if envelope.device != device:
            error = f"envelope names device {envelope.device!r} but was published on the topic of device {device!r}"
            self.bus.report_error("partials_invalid", error, topic=incoming.topic, **ids)
            return
        invalid = [block.head for block in message.blocks if not 0 <= block.head < self.heads]
        if invalid:
            error = f"head ids {invalid} are outside 0..{self.heads - 1}"
            self.bus.report_error("partials_invalid", error, topic=incoming.topic, **ids)
            return

        item = self.pending.get(key)
        if item is None:
            item = self.pending[key] = _Pending(envelope.camera, envelope.frame, envelope.epoch, self._deadline())
            item.capture_ms = envelope.capture_ms
        for block, partial in zip(message.blocks, message.partials):
            if block.head in item.partials:
                self.counters.add("partials_duplicate")
                self.log.info("partials_duplicate", **ids, head=block.head, first_device=item.devices[block.head])
                continue
            item.blocks[block.head] = block
            item.partials[block.head] = partial
            item.devices[block.head] = device
        timings = dict(envelope.timings)
        item.device_ms[device] = timings
        device_total = timings.get("device", 0.0)
        sent_ms = item.info.sent_ms if item.info else incoming.received_ms
        transfer = incoming.received_ms - sent_ms - device_total
        item.transfer_ms = max(item.transfer_ms, transfer, 0.0)
        self._try_finish(key, item)

    def _deadline(self) -> float:
        return time.monotonic() + self.config.deadline_ms / 1000

    # Verdicts ------------------------------------------------------------------------------------

    def _try_finish(self, key: FrameKey, item: _Pending) -> None:
        if item.info is None or len(item.partials) < self.heads:
            return
        del self.pending[key]
        started = time.perf_counter()
        heads = sorted(item.partials)
        try:
            with torch.no_grad():
                logits = self.model.aggregate([item.blocks[h] for h in heads], [item.partials[h] for h in heads])
                scores = torch.softmax(logits, dim=-1)[:, 1].numpy()
            if len(scores) != len(item.info.boxes):
                raise ValueError(f"the model returned {len(scores)} tile scores for {len(item.info.boxes)} tile boxes")
        except (ValueError, RuntimeError) as error:
            self.counters.add("aggregate_failed")
            self.log.error("aggregate_failed", camera=item.camera, frame=item.frame, epoch=item.epoch, error=str(error))
            self._publish_error(item.camera, item.frame, item.capture_ms, item.epoch, f"aggregation failed: {error}", item.info)
            return
        prediction = decide(scores, [tuple(box) for box in item.info.boxes], self.threshold)
        aggregate_ms = (time.perf_counter() - started) * 1000
        self.metrics.observe_ms("aggregate", aggregate_ms)
        tiles = [
            messages.Tile(x=t.x, y=t.y, w=t.w, h=t.h, score=min(max(t.score, 0.0), 1.0)) for t in prediction.flagged
        ]
        verdict = self._verdict(
            item.info,
            label=prediction.label,
            score=min(max(prediction.score, 0.0), 1.0),
            tiles=tiles,
            status="complete",
            latency=self._latency(item, aggregate_ms),
        )
        self._publish(key, verdict)

    def _report_lost(self, runs: list) -> None:
        """Count lost frames and report them in one ErrorReport per camera, with ranges "first-last,...".

        One report per call, because reports of one kind are rate-limited and separate runs found at
        the same time would otherwise hide each other.
        """
        by_camera: dict[str, list] = collections.defaultdict(list)
        for run in runs:
            by_camera[run.camera].append(run)
        for camera, camera_runs in by_camera.items():
            count = sum(run.count for run in camera_runs)
            self.counters.add("frames_lost", count)
            ranges = ",".join(f"{run.first}-{run.last}" for run in camera_runs)
            error = (
                f"{count} frames of camera {camera} ({ranges}) never reached a compressor, so they got no verdict: "
                f"the broker dropped them (a restart without persistence, or no compressor subscribed)"
            )
            self.bus.report_error("frames_lost", error, camera=camera, frames=count, ranges=ranges)

    def _expire(self) -> None:
        now = time.monotonic()
        self._report_lost(self.gaps.expired(now))
        for key, item in list(self.pending.items()):
            if item.deadline > now:
                continue
            del self.pending[key]
            if item.info is None:
                self.counters.add("frame_info_missing")
                # The frame reached a compressor and gets a verdict here, so its number is no gap.
                if self.gaps.tracks(item.camera):
                    self.gaps.observe(item.camera, item.frame, item.capture_ms, now)
                self._publish_error(
                    item.camera,
                    item.frame,
                    item.capture_ms,
                    item.epoch,
                    f"partials arrived but the frame's FrameInfo did not within {self.config.deadline_ms} ms",
                    None,
                )
                continue
            missing = [head for head in range(self.heads) if head not in item.partials]
            self.counters.add("verdicts_incomplete")
            self.log.warning(
                "frame_incomplete",
                camera=item.camera,
                frame=item.frame,
                epoch=item.epoch,
                missing_heads=missing,
                missing_devices=sorted({item.info.heads.get(h, "unassigned") for h in missing}),
            )
            verdict = self._verdict(
                item.info,
                label="defect",
                score=1.0,
                tiles=[],
                status="incomplete",
                latency=self._latency(item, 0.0),
                missing_heads=missing,
            )
            self._publish(key, verdict)

    def _latency(self, item: _Pending, aggregate_ms: float) -> dict[str, float]:
        latency = dict(item.info.latency_ms) if item.info else {}
        if item.device_ms:
            latency["attention"] = max(t.get("attention", 0.0) for t in item.device_ms.values())
            latency["device_queue"] = max(t.get("device_queue", 0.0) for t in item.device_ms.values())
            latency["transfer"] = item.transfer_ms
        latency["aggregate"] = aggregate_ms
        latency["total"] = max(0.0, float(now_ms() - item.capture_ms))
        return {name: round(max(ms, 0.0), 3) for name, ms in latency.items()}

    def _verdict(
        self,
        info: messages.FrameInfo,
        *,
        label: str,
        score: float,
        tiles: list,
        status: str,
        latency: dict[str, float],
        missing_heads: list[int] | None = None,
    ) -> messages.Verdict:
        return messages.Verdict(
            line=self.config.line,
            camera=info.camera,
            frame=info.frame,
            capture_ms=info.capture_ms,
            label=label,
            score=score,
            threshold=self.threshold,
            tiles=tiles,
            model_version=self.model_version,
            phi=info.phi,
            ranks=info.ranks,
            latency_ms=latency,
            status=status,
            missing_heads=missing_heads or [],
            epoch=info.epoch,
        )

    def _publish_error(
        self,
        camera: str,
        frame: int,
        capture_ms: int,
        epoch: int,
        error: str,
        info: messages.FrameInfo | None,
        status: str = "error",
    ) -> None:
        latency = dict(info.latency_ms) if info else {}
        latency["total"] = max(0.0, float(now_ms() - capture_ms))
        verdict = messages.Verdict(
            line=self.config.line,
            camera=camera,
            frame=frame,
            capture_ms=capture_ms,
            label="defect",
            score=1.0,
            threshold=self.threshold,
            model_version=self.model_version,
            phi=info.phi if info else None,
            latency_ms={name: round(max(ms, 0.0), 3) for name, ms in latency.items()},
            status=status,
            error=error,
            epoch=epoch,
        )
        self.counters.add(f"verdicts_{status}")
        self.log.warning(f"frame_{status}", camera=camera, frame=frame, epoch=epoch, error=error)
        self._publish((camera, frame, epoch, capture_ms), verdict)

    def _publish(self, key: FrameKey, verdict: messages.Verdict) -> None:
        payload = messages.to_json(verdict)
        self.bus.publish("verdict", payload, camera=verdict.camera)
        self.bus.publish("verdict_last", payload, camera=verdict.camera)
        self.done[key] = verdict.status
        while len(self.done) > DONE_MEMORY:
            self.done.popitem(last=False)
        self.verdicts += 1
        self.counters.add(f"verdicts.{verdict.status}.{verdict.label}")
        self.metrics.observe_ms("end_to_end", verdict.latency_ms.get("total", 0.0))
        self.log.info(
            "verdict_published",
            camera=verdict.camera,
            frame=verdict.frame,
            epoch=verdict.epoch,
            label=verdict.label,
            score=round(verdict.score, 4),
            status=verdict.status,
            total_ms=verdict.latency_ms.get("total"),
        )


def main(argv: list[str] | None = None) -> int:
    return run_main("aggregator", build_parser, Aggregator, argv)


if __name__ == "__main__":
    raise SystemExit(main())
