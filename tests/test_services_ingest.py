"""`sdrm ingest` against a real broker: folder and video sources, status, errors and reopen retries."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from sdrm import messages, wire
from tests.broker import REPOSITORY, SAMPLES, Probe, mqtt_broker  # noqa: F401 - pytest fixture


def run_ingest(broker_url: str, line: str, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    return subprocess.run(
        [sys.executable, "-m", "sdrm.cli", "ingest", "--broker", broker_url, "--line", line, *args],
        capture_output=True, text=True, timeout=timeout_s, cwd=REPOSITORY, env=env,
    )


def frames_of(probe: Probe) -> list[wire.FrameMessage]:
    return [wire.decode(item.payload) for item in probe.messages("frame")]


def test_folder_sent_unchanged_in_order(mqtt_broker):
    probe = Probe(mqtt_broker.url, "ing-a", ["frame", "camera_status"])
    result = run_ingest(mqtt_broker.url, "ing-a", "--source", str(SAMPLES), "--camera", "top")
    assert result.returncode == 0, result.stderr[-2000:]

    assert probe.wait_for(lambda: len(probe.messages("frame")) >= 12, 10.0)
    frames = frames_of(probe)
    paths = sorted(SAMPLES.rglob("*.jpg"))
    assert [f.envelope.frame for f in frames] == list(range(12))
    assert [f.image_bytes for f in frames] == [path.read_bytes() for path in paths]
    assert all(f.envelope.camera == "top" for f in frames)
    assert all((f.envelope.width, f.envelope.height) == (640, 640) for f in frames)
    captures = [f.envelope.capture_ms for f in frames]
    assert captures == sorted(captures)
    assert abs(captures[0] - time.time() * 1000) < 60_000

    states = [messages.parse(messages.Status, item.payload).state for item in probe.messages("camera_status")]
    assert states[-1] == "stopped"
    probe.close()


def test_png_reencodes_losslessly(mqtt_broker):
    probe = Probe(mqtt_broker.url, "ing-b", ["frame"])
    board = SAMPLES / "ok" / "00041220_temp.jpg"
    result = run_ingest(mqtt_broker.url, "ing-b", "--source", str(board), "--png")
    assert result.returncode == 0, result.stderr[-2000:]
    assert probe.wait_for(lambda: probe.messages("frame"), 10.0)
    frame = frames_of(probe)[0]
    assert frame.content_type == "png"
    decoded = cv2.imdecode(np.frombuffer(frame.image_bytes, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert np.array_equal(decoded, cv2.imread(str(board), cv2.IMREAD_GRAYSCALE))
    probe.close()


def test_video_file_source(mqtt_broker, tmp_path):
    video = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (160, 120))
    if not writer.isOpened():
        pytest.skip("OpenCV cannot write an MJPG AVI file here")
    for index in range(5):
        writer.write(np.full((120, 160, 3), 40 * index, np.uint8))
    writer.release()

    probe = Probe(mqtt_broker.url, "ing-c", ["frame"])
    result = run_ingest(mqtt_broker.url, "ing-c", "--source", str(video), "--jpeg-quality", "80")
    assert result.returncode == 0, result.stderr[-2000:]
    assert probe.wait_for(lambda: len(probe.messages("frame")) >= 5, 10.0)
    frames = frames_of(probe)
    assert len(frames) == 5
    assert all(f.content_type == "jpeg" for f in frames)
    assert all((f.envelope.width, f.envelope.height) == (160, 120) for f in frames)
    probe.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "/nonexistent/board.mp4"], "is not a camera index, URL, folder, image or video file"),
        (["--source", str(SAMPLES), "--camera", "a/b"], "must not contain '/'"),
        (["--source", str(SAMPLES), "--jpeg-quality", "0"], "invalid --jpeg-quality 0"),
        ([], "missing --source"),
    ],
)
def test_invalid_options_rejected(mqtt_broker, args, message):
    result = run_ingest(mqtt_broker.url, "ing-d", *args)
    assert result.returncode == 2
    assert message in result.stderr


def test_live_source_reopen_retries(mqtt_broker):
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    process = subprocess.Popen(
        [sys.executable, "-m", "sdrm.cli", "ingest", "--broker", mqtt_broker.url, "--line", "ing-e",
         "--source", "rtsp://127.0.0.1:1/absent", "--reopen-max-s", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPOSITORY, env=env,
    )
    time.sleep(8.0)
    process.terminate()
    _, stderr = process.communicate(timeout=20)
    assert process.returncode == 0
    assert stderr.count("source_retry") >= 2
    assert "ingest_stopped" in stderr
