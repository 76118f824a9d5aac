"""`sdrm compressor`: frames in, one BLOCKS message per device and one FrameInfo per frame out.

For every frame on a camera's frame topic (subscribed through the shared group from topics.yaml,
so several compressors split the cameras' frames) the compressor

1. decodes the image: an SDRM FRAME message from `sdrm ingest`, or plain JPEG/PNG bytes that a
   smart camera published without any header (`mosquitto_pub -t <frame topic> -f board.jpg`). A
   plain image gets its frame number and capture time on arrival;
2. cuts it into tiles (`frame_to_tiles`), embeds them and factorises each head's token slice,
   keeping `--phi` of its energy (`--nrr` sends dense blocks), warm-started from the camera's
   previous frame;
3. publishes a FrameInfo announcement to the aggregator, then one BLOCKS message to each device
   with the blocks of the heads that the current assignment gives it. The envelope's epoch is the
   assignment's epoch.

Every frame that reaches the compressor gets exactly one FrameInfo. A frame that cannot be decoded
or processed, and a frame dropped because the inbox was full, gets one with `error` set, and the
aggregator turns it into an "error" verdict. Frames that arrive before any assignment wait up to
`--assignment-wait-ms` for one.

Frames of live cameras are dropped, oldest first, when the compressor falls behind: a live frame
is skipped when a newer frame of the same camera already waits in the inbox, or when its MQTT 5
message expiry has run out. A frame counts as live when it is a plain JPEG/PNG (a smart camera)
or carries the user property `sdrm-source: live` (`sdrm ingest` of a camera or stream). Skipped
frames get a FrameInfo with `expired` set, so each still gets one verdict, and latency stays near
the processing time instead of growing with the backlog. Folder and video-file replays are never
skipped.
"""

from __future__ import annotations

import argparse
import itertools
import threading
import time
from dataclasses import dataclass

import numpy as np
import structlog
import torch

from sdrm import images, messages, wire
from sdrm.factors import factorize_heads
from sdrm.inference import frame_to_tiles
from sdrm.lowrank import METHODS
from services import config as cfg
from services.bus import Incoming, now_ms
from services.inbox import Inbox
from services.common import load_model, run_main, service_bus, set_threads
from services.metrics import ServiceMetrics
from services.topics import load_topics, validate_id

log = structlog.get_logger("sdrm.compressor")

LIVE_PROPERTY = "sdrm-source"  # MQTT 5 user property; the value "live" marks a live camera's frame


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdrm compressor",
        description="Decode camera frames, factorise each attention head's tokens and send the blocks to the devices.",
    )
    cfg.add_common_options(parser)
    cfg.add_metrics_options(parser)
    parser.add_argument("--id", default="compressor", help="instance id, unique per line (default compressor)")
    parser.add_argument("--phi", type=cfg.fraction, default=None, help="kept energy fraction in (0, 1] (default: the model's)")
    parser.add_argument("--nrr", action="store_true", help="no rank reduction: send dense blocks")
    parser.add_argument("--method", choices=METHODS, default=None, help="truncated SVD method (default: the model's)")
    parser.add_argument(
        "--wire-dtype", choices=["float16", "float32"], default="float32", help="array type of the blocks (default float32)"
    )
    parser.add_argument(
        "--no-shared", action="store_true", help="subscribe without $share (for brokers without shared subscriptions)"
    )
    # Live cameras already drop their oldest frame at the ingest side, so this bound only protects
    # memory. It must hold a folder or video replay that is published faster than frames are
    # compressed, because those sources must lose nothing.
    parser.add_argument(
        "--queue-size",
        type=cfg.positive_int,
        default=512,
        help="maximum frames waiting to be compressed; when full the oldest gets an error verdict (default 512)",
    )
    parser.add_argument(
        "--assignment-wait-ms",
        type=cfg.positive_int,
        default=10000,
        help="how long a frame waits for the first assignment, in milliseconds (default 10000)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's choice)")
    return parser


@dataclass
class _Arrival:
    """A frame message with the identity it was given on arrival."""

    incoming: Incoming
    camera: str
    frame: int
    capture_ms: int
    plain: str | None  # "jpeg" or "png" for a plain image, None for an SDRM message or garbage
    live: bool = False
    sequence: int = 0  # arrival order, to find the newest waiting frame of a live camera
    numbered_by_source: bool = False  # the frame number came from the sender's FRAME envelope


class FrameError(ValueError):
    """Raised when one frame cannot be processed; the frame gets an error FrameInfo."""


class Compressor:
    def __init__(self, config: argparse.Namespace, stop: threading.Event) -> None:
        self.config = config
        self.stop = stop
        self.topics = load_topics()
        validate_id("line", config.line)
        validate_id("service", config.id)
        set_threads(config.threads)
        self.model, self.manifest = load_model(config.model)
        model_config = self.model.config
        self.heads = model_config.heads
        if config.nrr:
            self.phi = None
        else:
            self.phi = config.phi if config.phi is not None else model_config.phi
        self.method = config.method or model_config.rank_method
        self.inbox = Inbox(config.queue_size)
        self.assignment: messages.Assignment | None = None
        self.assignment_ready = threading.Event()
        self._assignment_lock = threading.Lock()
        self._warm: dict[str, tuple[int, list]] = {}
        # Plain images have no frame number. Counting from the start time in epoch ms keeps their
        # numbers increasing across restarts of this compressor.
        self._plain_counter = itertools.count(now_ms())
        self._plain_lock = threading.Lock()
        self._arrivals = itertools.count()
        self._newest_live: dict[str, int] = {}  # camera -> sequence of its newest live arrival

        self.bus = service_bus(
            config,
            self.topics,
            service="compressor",
            instance=config.id,
            status_ids={"service": config.id},
            info={"phi": self.phi, "method": self.method, "heads": self.heads},
        )
        self.counters = self.bus.counters
        self.metrics = ServiceMetrics(self.bus, queue=self.inbox)
        self.log = log.bind(line=config.line, compressor=config.id)

    # Network thread ------------------------------------------------------------------------------

    def _on_frame(self, incoming: Incoming) -> None:
        arrival = self._identify(incoming)
        arrival.live = arrival.plain is not None or incoming.user_properties.get(LIVE_PROPERTY) == "live"
        arrival.sequence = next(self._arrivals)
        if arrival.live:
            self._newest_live[arrival.camera] = arrival.sequence
        dropped = self.inbox.put(arrival)
        if dropped is not None:
            self.counters.add("dropped.frame.queue_full")
            self.log.warning("frame_dropped", camera=dropped.camera, frame=dropped.frame, reason="inbox full")
            self._publish_error(dropped, f"dropped by compressor {self.config.id}: its inbox of {self.inbox.maxsize} frames was full")

    def _identify(self, incoming: Incoming) -> _Arrival:
        camera = incoming.ids["camera"]
        payload = incoming.payload
        plain = wire.is_plain_image(payload)
        if plain is None:
            try:
                envelope = wire.peek_envelope(payload)
                capture_ms = envelope.capture_ms or incoming.received_ms
                return _Arrival(incoming, camera, envelope.frame, capture_ms, None, numbered_by_source=True)
            except wire.WireError:
                pass
        with self._plain_lock:
            frame = next(self._plain_counter)
        return _Arrival(incoming, camera, frame, incoming.received_ms, plain)

    def _on_assignment(self, incoming: Incoming) -> None:
        if not incoming.payload:
            return
        try:
            assignment = messages.parse(messages.Assignment, incoming.payload)
        except messages.MessageError as error:
            self.bus.report_error("assignment_invalid", str(error), topic=incoming.topic)
            return
        with self._assignment_lock:
            current = self.assignment
            if current is not None and assignment.epoch < current.epoch:
                self.counters.add("assignments_stale")
                return
            self.assignment = assignment
        self.assignment_ready.set()
        self.log.info("assignment_applied", epoch=assignment.epoch, heads=assignment.heads)

    # Worker thread -------------------------------------------------------------------------------

    def run(self) -> int:
        self.bus.subscribe("assignment", self._on_assignment)
        frame_filter = self.bus.subscribe("frame", self._on_frame, shared=not self.config.no_shared)
        self.bus.start()
        self.log.info(
            "compressor_started", broker=self.config.broker, subscription=frame_filter, phi=self.phi, method=self.method
        )
        try:
            while not self.stop.is_set():
                arrival = self.inbox.get(timeout=0.2)
                if arrival is None:
                    continue
                self._handle(arrival)
            self._reject_waiting()
        finally:
            self.bus.close(info={"counters": self.counters.snapshot()})
            self.log.info("compressor_stopped", counters=self.counters.snapshot())
        return 0

    def _reject_waiting(self) -> None:
        """Give every frame still in the inbox at a stop an error FrameInfo, so each still gets its verdict."""
        rejected = 0
        while (arrival := self.inbox.get(timeout=0)) is not None:
            self._publish_error(arrival, f"compressor {self.config.id} stopped before it inspected this frame")
            rejected += 1
        if rejected:
            self.counters.add("dropped.frame.stopped", rejected)
            self.log.warning("frames_rejected_at_stop", frames=rejected)

    def _handle(self, arrival: _Arrival) -> None:
        stale = self._stale_reason(arrival)
        if stale is not None:
            self.counters.add(f"dropped.frame.{stale[0]}")
            self.log.info("frame_skipped", camera=arrival.camera, frame=arrival.frame, reason=stale[0])
            self._publish_error(arrival, stale[1], expired=True)
            return
        if not self.assignment_ready.is_set():
            self.log.info("assignment_waiting", camera=arrival.camera, frame=arrival.frame)
            waited = self.assignment_ready.wait(self.config.assignment_wait_ms / 1000)
            if not waited:
                self.counters.add("frames_failed.no_assignment")
                self._publish_error(
                    arrival,
                    f"no head assignment within {self.config.assignment_wait_ms} ms: check that the scheduler "
                    f"and at least one device are running",
                )
                return
        try:
            self._process(arrival)
        except FrameError as error:
            ids = {"camera": arrival.camera, "frame": arrival.frame}
            self.bus.report_error("frame_invalid", str(error), topic=arrival.incoming.topic, **ids)
            self._publish_error(arrival, str(error))
        except (ValueError, RuntimeError, wire.WireError) as error:
            self.log.exception("frame_failed", camera=arrival.camera, frame=arrival.frame, error=str(error))
            ids = {"camera": arrival.camera, "frame": arrival.frame}
            self.bus.report_error("frame_failed", str(error), topic=arrival.incoming.topic, **ids)
            self._publish_error(arrival, f"compressor failed: {error}")

    def _decode(self, arrival: _Arrival) -> tuple[np.ndarray, int, int]:
        """Return the grayscale image of a frame, and its capture time and frame number."""
        payload = arrival.incoming.payload
        if arrival.plain is not None:
            image_bytes = payload
        else:
            try:
                message = wire.decode(payload)
            except wire.WireError as error:
                if payload[:4] != wire.MAGIC:
                    raise FrameError(
                        f"frame of {len(payload)} bytes on {arrival.incoming.topic} is neither a JPEG/PNG image nor "
                        f"an SDRM FRAME message ({error})"
                    ) from None
                raise FrameError(f"invalid frame message on {arrival.incoming.topic}: {error}") from None
            if not isinstance(message, wire.FrameMessage):
                raise FrameError(
                    f"invalid frame message on {arrival.incoming.topic}: got a {wire.Kind(message.envelope.kind).name} "
                    f"message; publish FRAME messages or plain JPEG/PNG bytes"
                )
            if message.envelope.camera != arrival.camera:
                raise FrameError(
                    f"frame envelope names camera {message.envelope.camera!r} but was published on the topic of "
                    f"camera {arrival.camera!r}: publish each camera's frames on its own topic"
                )
            image_bytes = message.image_bytes
        try:
            gray = images.decode_gray(image_bytes)
        except images.ImageError as error:
            raise FrameError(f"invalid frame on {arrival.incoming.topic}: {error}") from None
        if arrival.plain is None:
            envelope = message.envelope
            height, width = gray.shape
            if (envelope.width, envelope.height) not in ((0, 0), (min(width, 0xFFFF), min(height, 0xFFFF))):
                raise FrameError(
                    f"invalid frame header: it gives {envelope.width} x {envelope.height} pixels but the image is {width} x {height}: "
                    f"the sender wrote a wrong header"
                )
        return gray, arrival.capture_ms, arrival.frame

    @torch.no_grad()
    def _process(self, arrival: _Arrival) -> None:
        queued_ms = (time.monotonic() - arrival.incoming.received_monotonic) * 1000
        started = time.perf_counter()
        gray, capture_ms, frame = self._decode(arrival)
        height, width = gray.shape
        inputs, boxes = frame_to_tiles(gray, self.manifest)
        decoded = time.perf_counter()

        tokens = self.model.embed(inputs)
        embedded = time.perf_counter()

        batch = int(inputs.shape[0])
        warm_batch, warm_results = self._warm.get(arrival.camera, (None, None))
        warm = warm_results if warm_batch == batch else None
        blocks, results = factorize_heads(
            tokens, self.heads, self.phi, method=self.method, warm_starts=warm, min_rank=self.model.config.min_rank
        )
        self._warm[arrival.camera] = (batch, results)
        factorized = time.perf_counter()

        with self._assignment_lock:
            assignment = self.assignment
        epoch = assignment.epoch if assignment else 0
        routes: dict[str, list] = {}
        heads: dict[int, str] = {}
        for block in blocks:
            device = assignment.heads.get(block.head) if assignment else None
            if device is None:
                continue
            routes.setdefault(device, []).append(block)
            heads[block.head] = device
        if len(heads) < self.heads:
            self.counters.add("frames_with_unassigned_heads")

        timings = [
            ("compressor_queue", max(queued_ms, 0.0)),
            ("decode", (decoded - started) * 1000),
            ("embed", (embedded - decoded) * 1000),
            ("factorize", (factorized - embedded) * 1000),
        ]
        self.metrics.observe_stages(timings)
        payloads = {}
        for device, device_blocks in routes.items():
            envelope = wire.Envelope(
                kind=wire.Kind.BLOCKS,
                line=self.config.line,
                camera=arrival.camera,
                device=device,
                frame=frame,
                capture_ms=capture_ms,
                epoch=epoch,
                width=min(width, 0xFFFF),
                height=min(height, 0xFFFF),
                timings=timings,
            )
            payloads[device] = wire.encode_blocks(envelope, device_blocks, dtype=self.config.wire_dtype)

        info = messages.FrameInfo(
            line=self.config.line,
            camera=arrival.camera,
            frame=frame,
            capture_ms=capture_ms,
            epoch=epoch,
            width=width,
            height=height,
            boxes=[tuple(int(v) for v in box) for box in boxes],
            heads=heads,
            head_count=self.heads,
            ranks={block.head: block.rank for block in blocks},
            phi=self.phi,
            latency_ms={name: round(ms, 3) for name, ms in timings},
            sent_ms=now_ms(),
            compressor=self.config.id,
            numbered_by_source=arrival.numbered_by_source,
        )
        self.bus.publish("frame_info", messages.to_json(info), camera=arrival.camera)
        for device, payload in payloads.items():
            self.bus.publish("blocks", payload, device=device)
        self.counters.add("frames_processed")
        self.log.debug(
            "frame_sent",
            camera=arrival.camera,
            frame=frame,
            epoch=epoch,
            devices=sorted(routes),
            ranks=info.ranks,
            ms=round((time.perf_counter() - started) * 1000, 2),
        )

    def _stale_reason(self, arrival: _Arrival) -> tuple[str, str] | None:
        """Return (counter reason, message) when a live frame should be skipped, else None."""
        if not arrival.live:
            return None
        if self._newest_live.get(arrival.camera, arrival.sequence) != arrival.sequence:
            return "superseded", "skipped under overload: a newer frame of this live camera was already waiting"
        if arrival.incoming.expired():
            expiry = arrival.incoming.expiry_s
            return "expired", f"skipped: the frame's message expiry of {expiry:g} s ran out before compression"
        return None

    def _publish_error(self, arrival: _Arrival, error: str, expired: bool = False) -> None:
        with self._assignment_lock:
            epoch = self.assignment.epoch if self.assignment else 0
        info = messages.FrameInfo(
            line=self.config.line,
            camera=arrival.camera,
            frame=arrival.frame,
            capture_ms=arrival.capture_ms,
            epoch=epoch,
            width=0,
            height=0,
            head_count=self.heads,
            phi=self.phi,
            sent_ms=now_ms(),
            compressor=self.config.id,
            numbered_by_source=arrival.numbered_by_source,
            error=error,
            expired=expired,
        )
        self.bus.publish("frame_info", messages.to_json(info), camera=arrival.camera)


def main(argv: list[str] | None = None) -> int:
    return run_main("compressor", build_parser, Compressor, argv)


if __name__ == "__main__":
    raise SystemExit(main())
