"""Source faults at the ingest: a stream that stalls, one that is unreachable, a frozen picture and
a video file cut short. Each is noticed, reported on the errors topic and shown in the camera status.

The stream is an MJPEG-over-HTTP server on 127.0.0.1 that the test runs itself, which OpenCV's
FFmpeg backend reads like an IP camera.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest

from sdrm import messages
from services.broker import free_port
from tests.broker import REPOSITORY, Probe, mqtt_broker  # noqa: F401 - pytest fixture

pytestmark = pytest.mark.slow


def jpeg(value: int) -> bytes:
    image = np.full((64, 64), value, dtype=np.uint8)
    ok, data = cv2.imencode(".jpg", image)
    assert ok
    return data.tobytes()


class MJPEGCamera:
    """An HTTP MJPEG camera: the first connection sends frames for send_s and then stalls, later ones stream."""

    def __init__(self, send_s: float, stall_s: float) -> None:
        self.send_s = send_s
        self.stall_s = stall_s
        self.connections = 0
        camera = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                camera.connections += 1
                first = camera.connections == 1
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                started = time.monotonic()
                value = 0
                try:
                    while not first or time.monotonic() - started < camera.send_s:
                        value = (value + 37) % 256
                        data = jpeg(value)
                        head = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(data)
                        self.wfile.write(head + data + b"\r\n")
                        self.wfile.flush()
                        time.sleep(0.1)
                    time.sleep(camera.stall_s)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/stream.mjpg"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def run_ingest(broker_url: str, line: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    command = [sys.executable, "-m", "sdrm.cli", "ingest", "--broker", broker_url, "--line", line, *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPOSITORY, env=env)


def statuses(probe: Probe) -> list[messages.Status]:
    return [messages.parse(messages.Status, m.payload) for m in probe.messages("camera_status") if m.payload]


def error_kinds(probe: Probe) -> list[str]:
    return [messages.parse(messages.ErrorReport, m.payload).kind for m in probe.messages("errors")]


def stop(process: subprocess.Popen) -> str:
    process.terminate()
    _, stderr = process.communicate(timeout=30)
    return stderr


def test_stalled_stream_offline_then_back(mqtt_broker):
    camera = MJPEGCamera(send_s=2.0, stall_s=8.0)
    probe = Probe(mqtt_broker.url, "src-a", ["camera_status", "errors", "frame"])
    process = run_ingest(mqtt_broker.url, "src-a", "--source", camera.url, "--stall-s", "2", "--reopen-max-s", "1")
    try:
        offline = probe.wait_for(lambda: [s for s in statuses(probe) if s.state == "offline"], 20.0)
        assert offline, f"the camera was not marked offline when the stream stalled\n{stop(process)[-3000:]}"
        assert offline[0].info["source_state"] in ("stalled", "disconnected")
        stalled_at = len(probe.messages("frame"))

        back = probe.wait_for(
            lambda: [s for s in statuses(probe)[len(offline):] if s.state == "online" and s.info.get("source_state") == "ok"],
            30.0,
        )
        assert back, f"the camera did not come back online\n{stop(process)[-3000:]}"
        assert probe.wait_for(lambda: len(probe.messages("frame")) > stalled_at + 5, 15.0), "frames did not resume"
        assert "source_stalled" in error_kinds(probe)
        assert camera.connections >= 2, "the stream was not reopened"
        assert process.poll() is None, "ingest exited"
    finally:
        stderr = stop(process) if process.poll() is None else ""
        probe.close()
        camera.close()
    assert "source_recovered" in stderr


def test_unreachable_stream_offline(mqtt_broker):
    probe = Probe(mqtt_broker.url, "src-b", ["camera_status", "errors"])
    url = f"rtsp://127.0.0.1:{free_port()}/cam"
    process = run_ingest(mqtt_broker.url, "src-b", "--source", url, "--stall-s", "1", "--reopen-max-s", "1")
    try:
        offline = probe.wait_for(lambda: [s for s in statuses(probe) if s.state == "offline"], 20.0)
        assert offline, "an unreachable stream did not mark the camera offline"
        assert offline[0].info["source_state"] == "unavailable"
        assert probe.wait_for(lambda: "source_unavailable" in error_kinds(probe), 5.0)
        time.sleep(4.0)
        assert process.poll() is None, "ingest exited instead of retrying"
    finally:
        stderr = stop(process)
        probe.close()
    assert stderr.count("source_retry") >= 2


def write_video(path: Path, values: list[int]) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 64), isColor=False)
    assert writer.isOpened()
    for value in values:
        writer.write(np.full((64, 64), value, dtype=np.uint8))
    writer.release()


def test_frozen_picture_flagged(mqtt_broker, tmp_path):
    video = tmp_path / "frozen.avi"
    write_video(video, [10, 200] + [120] * 30)
    probe = Probe(mqtt_broker.url, "src-c", ["camera_status", "errors"])
    process = run_ingest(mqtt_broker.url, "src-c", "--source", str(video), "--frozen-frames", "10", "--fps", "50")
    try:
        assert process.wait(60) == 0, process.stderr.read()[-2000:]
        frozen = probe.wait_for(lambda: [s for s in statuses(probe) if (s.info or {}).get("frozen") is True], 5.0)
        assert frozen, "the frozen picture was not flagged in the camera status"
        assert "camera_frozen" in error_kinds(probe)
    finally:
        probe.close()


def test_cut_short_video_reported(mqtt_broker, tmp_path):
    video = tmp_path / "cut.avi"
    write_video(video, [(7 * i) % 256 for i in range(60)])
    data = video.read_bytes()
    video.write_bytes(data[: len(data) // 2])
    probe = Probe(mqtt_broker.url, "src-d", ["errors"])
    process = run_ingest(mqtt_broker.url, "src-d", "--source", str(video), "--fps", "50")
    try:
        assert process.wait(60) == 1, "a cut-short video file must end with status 1"
        assert probe.wait_for(lambda: "source_truncated" in error_kinds(probe), 5.0), process.stderr.read()[-2000:]
    finally:
        probe.close()
