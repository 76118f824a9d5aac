"""`sdrm ingest`: reads a camera, a stream, a video file or an image folder and publishes frames.

Sources (`--source`):
- an integer: a USB camera index, opened with cv2.VideoCapture(index);
- an rtsp://, rtsps://, rtmp:// or http(s):// URL: a network stream;
- a video file;
- a folder: every .jpg, .jpeg, .png, .bmp and .tif image below it, in sorted path order (`--loop`
  repeats it), or a single image file.

Each frame goes out as an SDRM FRAME message (`sdrm.wire`) on the camera's frame topic, with the
camera id, a per-camera frame number that increases from 0, the capture time in epoch
milliseconds (UTC) and the frame size. Frames are converted to grayscale, which the model reads,
and encoded as JPEG (`--jpeg-quality`) or, with `--png`, losslessly. A JPEG or PNG file from a
folder in the requested format is sent byte for byte, so the compressor decodes exactly the
pixels of the file.

Live sources (camera index, URL) keep a bounded queue of `--queue-size` frames and drop the oldest
when it is full, counting each drop. They are reopened with exponential backoff when they fail.
File and folder sources block instead and lose nothing. A folder or file source ends when every
frame is published and acknowledged (QoS 1), and the command then exits with status 0.

A watchdog guards the source:
- a live source that delivers no frame for `--stall-s` seconds is stalled. A stream's read also
  times out after that long (OpenCV's FFmpeg backend), so the source is reopened with backoff;
- a stalled, unreachable or disconnected source marks the camera `offline` on its status topic
  (info `source_state`) until frames flow again;
- a video file that ends before the frame count in its header was cut short. It is reported, and
  `--loop` reopens it with backoff, while a single pass exits with status 1;
- `--frozen-frames` identical frames in a row flag the camera as frozen (status info `frozen`), a
  stuck sensor or a stream that repeats its last picture. Frames still go out.
Each of these is counted and reported on the ingest's errors topic.

The camera's retained status (`online` on connect, `stopped` on exit, `offline` as the will) is
published on its camera status topic.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import structlog

from sdrm import wire
from services import config as cfg
from services.bus import now_ms, published, wait_published
from services.common import run_main, service_bus
from services.metrics import ServiceMetrics
from services.topics import load_topics, validate_id

log = structlog.get_logger("sdrm.ingest")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
_PASSTHROUGH = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdrm ingest",
        description="Publish frames from a camera, a stream, a video file or an image folder.",
    )
    cfg.add_common_options(parser, model=False)
    cfg.add_metrics_options(parser)
    parser.add_argument("--source", required=False, default=None, help="camera index, rtsp/http URL, video file or image folder")
    parser.add_argument("--camera", default="cam1", help="camera id, one topic level (default cam1)")
    parser.add_argument("--fps", type=cfg.non_negative_float, default=0.0, help="maximum frames per second (default 0: no limit)")
    parser.add_argument("--loop", action="store_true", help="repeat a folder or video file until stopped")
    parser.add_argument("--max-frames", type=int, default=0, help="stop after this many frames (default 0: no limit)")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1..100 (default 90)")
    parser.add_argument("--png", action="store_true", help="encode frames as lossless PNG instead of JPEG")
    parser.add_argument(
        "--queue-size", type=cfg.positive_int, default=2, help="frames buffered for a live source; the oldest is dropped (default 2)"
    )
    parser.add_argument(
        "--stall-s",
        type=cfg.positive_float,
        default=5.0,
        help="seconds without a frame before a live source counts as stalled and is reopened (default 5)",
    )
    parser.add_argument(
        "--frozen-frames",
        type=int,
        default=50,
        help="identical frames in a row before the camera is flagged as frozen (default 50; 0: off)",
    )
    parser.add_argument(
        "--frame-expiry-s",
        type=cfg.positive_int,
        default=5,
        help="MQTT 5 message expiry of a live source's frames, in seconds; older frames are skipped (default 5)",
    )
    parser.add_argument(
        "--max-inflight", type=cfg.positive_int, default=8, help="unacknowledged frames before a file source waits (default 8)"
    )
    parser.add_argument(
        "--reopen-max-s", type=cfg.positive_float, default=30.0, help="maximum wait between reopen attempts of a live source, in seconds (default 30)"
    )
    parser.add_argument(
        "--ack-timeout-s", type=cfg.positive_float, default=30.0, help="how long the end of a file source waits for acknowledgements, in seconds (default 30)"
    )
    return parser


@dataclass
class Capture:
    """One captured frame: an image array or encoded file bytes, with its capture time and origin."""

    capture_ms: int
    name: str
    image: np.ndarray | None = None
    encoded: bytes | None = None
    content_type: str | None = None


class SourceError(RuntimeError):
    """Raised when a source cannot be opened or read."""


def describe_source(source: str) -> str:
    """Return "camera", "stream", "folder", "image" or "video" for a --source value."""
    if source.isdigit():
        return "camera"
    if source.split("://", 1)[0].lower() in ("rtsp", "rtsps", "http", "https", "rtmp"):
        return "stream"
    path = Path(source)
    if path.is_dir():
        return "folder"
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return "image"
    return "video"


def folder_images(path: Path) -> list[Path]:
    """Return the image files below path (or path itself when it is a file), sorted by path."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class Ingest:
    def __init__(self, config: argparse.Namespace, stop: threading.Event, on_published: Callable[[int, str], None] | None = None) -> None:
        self.config = config
        self.stop = stop
        self.on_published = on_published
        self.topics = load_topics()
        validate_id("line", config.line)
        validate_id("camera", config.camera)
        if config.source is None:
            raise ValueError("missing --source: pass a camera index, a stream URL, a video file or an image folder")
        if not 1 <= config.jpeg_quality <= 100:
            raise ValueError(f"invalid --jpeg-quality {config.jpeg_quality}: use 1..100")
        self.kind = describe_source(str(config.source))
        self.live = self.kind in ("camera", "stream")
        if self.kind in ("folder", "image") and not folder_images(Path(config.source)):
            raise ValueError(f"no images (.jpg, .png, .bmp, .tif) found in {config.source}: check --source")
        if self.kind == "video" and not Path(config.source).is_file():
            raise ValueError(f"--source {config.source} is not a camera index, URL, folder, image or video file")

        self.frame = 0
        self.published = 0
        self.bus = service_bus(
            config,
            self.topics,
            service="ingest",
            instance=config.camera,
            status_topic="camera_status",
            status_ids={"camera": config.camera},
            max_inflight=config.max_inflight,
            info={"source": self.kind},
        )
        self.counters = self.bus.counters
        self.log = log.bind(line=config.line, camera=config.camera)
        self._queue: collections.deque[Capture] = collections.deque()
        self.metrics = ServiceMetrics(self.bus, queue=self._queue, queue_capacity=config.queue_size)
        self._ready = threading.Condition()
        self._source_done = threading.Event()
        self._source_lock = threading.Lock()
        self._source_state = "ok"  # ok, stalled, unavailable, disconnected or truncated
        self._last_capture = time.monotonic()
        self._last_digest: bytes | None = None
        self._repeats = 0
        self._frozen = False

    # Sources -------------------------------------------------------------------------------------

    def _folder_captures(self) -> Iterator[Capture]:
        paths = folder_images(Path(self.config.source))
        while True:
            for path in paths:
                if self.stop.is_set():
                    return
                content_type = _PASSTHROUGH.get(path.suffix.lower())
                try:
                    data = path.read_bytes()
                except OSError as error:
                    self.bus.report_error("image_unreadable", f"{path}: {error}")
                    continue
                capture_ms = now_ms()
                if content_type is not None and wire.is_plain_image(data) == content_type and not self._needs_reencode(content_type, data):
                    yield Capture(capture_ms, str(path), encoded=data, content_type=content_type)
                    continue
                image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
                if image is None:
                    self.bus.report_error("image_undecodable", f"{path} is not a readable image: skipped")
                    continue
                yield Capture(capture_ms, str(path), image=image)
            if not self.config.loop:
                return

    def _needs_reencode(self, content_type: str, data: bytes) -> bool:
        """Return whether a JPEG/PNG file must be decoded and encoded again (another format was requested).

        A colour file is sent as it is: the compressor decodes it to grayscale, as `read_gray` does.
        """
        return content_type != ("png" if self.config.png else "jpeg")

    # Watchdog ------------------------------------------------------------------------------------

    def _source_down(self, state: str, error: str) -> None:
        """Mark the camera offline for a source problem, once per change of state."""
        with self._source_lock:
            if self._source_state == state:
                return
            self._source_state = state
        self.bus.set_state("offline", source_state=state)
        self.bus.report_error(f"source_{state}", error, source=str(self.config.source))

    def _source_up(self) -> None:
        with self._source_lock:
            if self._source_state == "ok":
                return
            previous, self._source_state = self._source_state, "ok"
        self.bus.set_state("online", source_state="ok")
        self.log.info("source_recovered", source=str(self.config.source), after=previous)

    def _watch(self, capture: Capture) -> None:
        """Record a captured frame: clear a stall and flag or clear a frozen picture."""
        self._last_capture = time.monotonic()
        self._source_up()
        if self.config.frozen_frames <= 0:
            return
        data = capture.encoded if capture.encoded is not None else capture.image.tobytes()
        digest = hashlib.blake2b(data, digest_size=16).digest()
        self._repeats = self._repeats + 1 if digest == self._last_digest else 1
        self._last_digest = digest
        if self._repeats >= self.config.frozen_frames and not self._frozen:
            self._frozen = True
            self.bus.update_info(frozen=True)
            self.bus.report_error("camera_frozen", f"{self._repeats} identical frames in a row from {self.config.source}")
        elif self._repeats == 1 and self._frozen:
            self._frozen = False
            self.bus.update_info(frozen=False)
            self.log.info("camera_unfrozen", frame=self.frame)

    def _check_stall(self) -> None:
        silent_s = time.monotonic() - self._last_capture
        if silent_s > self.config.stall_s:
            self._source_down("stalled", f"no frame from {self.config.source} for {silent_s:.1f} s")

    # Sources -------------------------------------------------------------------------------------

    def _open_video(self) -> cv2.VideoCapture:
        source = str(self.config.source)
        if source.isdigit():
            capture = cv2.VideoCapture(int(source))
        elif self.kind == "stream":
            # Bounded open and read times, so that a stream that stops sending returns from read().
            timeout_ms = int(self.config.stall_s * 1000)
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms]
            capture = cv2.VideoCapture(source, cv2.CAP_FFMPEG, params)
        else:
            capture = cv2.VideoCapture(source)
        if not capture.isOpened():
            capture.release()
            raise SourceError(f"cannot open {self.kind} source {source!r}")
        return capture

    def _video_captures(self) -> Iterator[Capture]:
        """Yield frames of a video file (blocking) or of a live source (reopened on failure)."""
        delay = 1.0
        attempt = 0
        while not self.stop.is_set():
            try:
                capture = self._open_video()
            except SourceError as error:
                if not self.live:
                    raise
                attempt += 1
                self.counters.add("source_reopen")
                self._source_down("unavailable", str(error))
                self.log.warning("source_retry", attempt=attempt, retry_in_s=delay, error=str(error))
                self.stop.wait(delay)
                delay = min(delay * 2, self.config.reopen_max_s)
                continue
            self.log.info("source_opened", source=str(self.config.source), kind=self.kind)
            declared = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if not self.live else 0
            read = 0
            try:
                while not self.stop.is_set():
                    ok, image = capture.read()
                    if not ok or image is None:
                        break
                    delay = 1.0
                    attempt = 0
                    read += 1
                    yield Capture(now_ms(), f"{self.config.source}#{self.frame}", image=image)
            finally:
                capture.release()
            if self.stop.is_set():
                return
            if not self.live:
                if 0 < read < declared:
                    # A file that was cut short: count it, then retry a looped file with backoff.
                    self._source_down("truncated", f"{self.config.source} ended after {read} of its {declared} frames")
                    if not self.config.loop:
                        raise SourceError(f"video file {self.config.source} was cut short after {read} of {declared} frames")
                    self.stop.wait(delay)
                    delay = min(delay * 2, self.config.reopen_max_s)
                if self.config.loop:
                    continue
                return
            self.counters.add("source_failed")
            self._source_down("disconnected", f"{self.config.source} stopped delivering frames")
            self.log.warning("source_failed", source=str(self.config.source), retry_in_s=delay)
            self.stop.wait(delay)
            delay = min(delay * 2, self.config.reopen_max_s)

    def _captures(self) -> Iterator[Capture]:
        if self.kind in ("folder", "image"):
            return self._folder_captures()
        return self._video_captures()

    # Publishing ----------------------------------------------------------------------------------

    def _encode(self, capture: Capture) -> tuple[bytes, str, int, int]:
        if capture.encoded is not None:
            image = cv2.imdecode(np.frombuffer(capture.encoded, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
            height, width = image.shape[:2]
            return capture.encoded, capture.content_type, width, height
        image = capture.image
        if image.ndim == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        height, width = image.shape[:2]
        if self.config.png:
            ok, data = cv2.imencode(".png", image)
            content_type = "png"
        else:
            ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.config.jpeg_quality])
            content_type = "jpeg"
        if not ok:
            raise SourceError(f"cannot encode frame {capture.name} as {content_type}")
        return data.tobytes(), content_type, width, height

    def _publish(self, capture: Capture, inflight: collections.deque) -> None:
        try:
            image_bytes, content_type, width, height = self._encode(capture)
        except SourceError as error:
            self.counters.add("frames_skipped.encode_failed")
            self.log.error("frame_encode_failed", frame=self.frame, error=str(error))
            return
        envelope = wire.Envelope(
            kind=wire.Kind.FRAME,
            line=self.config.line,
            camera=self.config.camera,
            frame=self.frame,
            capture_ms=capture.capture_ms,
            width=min(width, 0xFFFF),
            height=min(height, 0xFFFF),
        )
        payload = wire.encode_frame(envelope, image_bytes, content_type)
        if self.live:
            # Under MQTT 5, the compressor skips a live frame that is superseded or expired.
            info = self.bus.publish(
                "frame", payload, camera=self.config.camera,
                expiry_s=self.config.frame_expiry_s, user_properties={"sdrm-source": "live"},
            )
        else:
            info = self.bus.publish("frame", payload, camera=self.config.camera)
        if info is not None:
            inflight.append(info)
            self.published += 1
            if self.on_published is not None:
                self.on_published(self.frame, capture.name)
        self.log.debug("frame_published", frame=self.frame, bytes=len(payload), name=capture.name)
        self.frame += 1

    def _capture_loop(self) -> None:
        """Live sources: read frames into the bounded queue, dropping the oldest when full."""
        try:
            for capture in self._captures():
                with self._ready:
                    if len(self._queue) >= self.config.queue_size:
                        self._queue.popleft()
                        self.counters.add("frames_dropped.queue_full")
                    self._queue.append(capture)
                    self._ready.notify()
        finally:
            self._source_done.set()
            with self._ready:
                self._ready.notify()

    def _live_captures(self) -> Iterator[Capture]:
        reader = threading.Thread(target=self._capture_loop, name=f"capture-{self.config.camera}", daemon=True)
        reader.start()
        while not self.stop.is_set():
            with self._ready:
                if not self._queue:
                    if self._source_done.is_set():
                        return
                    self._ready.wait(0.2)
                    self._check_stall()
                    continue
                capture = self._queue.popleft()
            yield capture

    def run(self) -> int:
        self.bus.start()
        self.log.info("ingest_started", source=str(self.config.source), kind=self.kind, broker=self.config.broker)
        period = 1.0 / self.config.fps if self.config.fps > 0 else 0.0
        inflight: collections.deque = collections.deque()
        status = 0
        next_time = time.monotonic()
        try:
            captures = self._live_captures() if self.live else self._captures()
            while not self.stop.is_set():
                # Wait before taking the next frame, so that its capture time is its publish time.
                if period:
                    delay = next_time - time.monotonic()
                    if delay > 0 and self.stop.wait(delay):
                        break
                    next_time = max(next_time + period, time.monotonic() - period)
                capture = next(captures, None)
                if capture is None:
                    break
                self._watch(capture)
                if not self.live:
                    # Blocking back-pressure: a file source waits for the oldest acknowledgement.
                    while len(inflight) >= self.config.max_inflight and not self.stop.is_set():
                        if published(inflight[0]):
                            inflight.popleft()
                        else:
                            time.sleep(0.005)
                while inflight and published(inflight[0]):
                    inflight.popleft()
                self._publish(capture, inflight)
                if self.config.max_frames and self.frame >= self.config.max_frames:
                    break
                if self.stop.is_set():
                    break
        except SourceError as error:
            self.log.error("source_failed", source=str(self.config.source), error=str(error))
            status = 1
        finally:
            acked = wait_published(list(inflight), self.config.ack_timeout_s)
            if not acked:
                self.counters.add("frames_unacknowledged")
                self.log.error("ack_timeout", waited_s=self.config.ack_timeout_s, unacknowledged=len(inflight))
                status = status or 1
            self.bus.close(info={"frames": self.published})
            self.log.info("ingest_stopped", frames=self.published, counters=self.counters.snapshot())
        return status


def main(argv: list[str] | None = None) -> int:
    return run_main("ingest", build_parser, Ingest, argv)


if __name__ == "__main__":
    raise SystemExit(main())
