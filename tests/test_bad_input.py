"""Malformed messages on every input topic: each is rejected, counted and reported on the errors
topic of the service that read it, and the next good frame still gets a complete verdict.
"""

from __future__ import annotations

import json
import math
import struct
import time
import zlib

import cv2
import numpy as np
import pytest
import torch

from sdrm import messages, wire
from sdrm.factors import FactorBlock
from tests.broker import SAMPLES, Probe, Services, model_dir, mqtt_broker  # noqa: F401 - pytest fixtures

pytestmark = pytest.mark.slow

LINE = "badin"
BOARD = SAMPLES / "ok" / "12100036_temp.jpg"
REPORT_INTERVAL_S = 1.1  # ErrorReports of one kind are rate-limited to one per second


@pytest.fixture(scope="module")
def line(mqtt_broker, model_dir, tmp_path_factory):
    services = Services(mqtt_broker.url, LINE, model_dir, tmp_path_factory.mktemp("badin"))
    probe = Probe(mqtt_broker.url, LINE, ["verdict", "assignment", "errors"])
    services.start("scheduler", "scheduler")
    services.start("aggregator", "aggregator", "--deadline-ms", "3000")
    services.start("compressor", "compressor")
    services.start("dev1", "device", "--device", "dev1", "--threads", "1")
    assert probe.wait_for(lambda: probe.assignments(), 60.0), "no assignment within 60 s"
    yield services, probe
    services.stop_all()
    probe.close()


def frame_message(frame: int, image: bytes, camera: str = "cam1", width: int = 0, height: int = 0) -> bytes:
    envelope = wire.Envelope(
        kind=wire.Kind.FRAME, line=LINE, camera=camera, frame=frame, capture_ms=time.time_ns() // 1_000_000,
        width=width, height=height,
    )
    content_type = "png" if image[:4] == b"\x89PNG" else "jpeg"
    return wire.encode_frame(envelope, image, content_type)


def blocks_message(head: int = 0) -> bytes:
    generator = torch.Generator().manual_seed(0)
    block = FactorBlock(
        head=head, batch=1, tokens=64,
        U=torch.linalg.qr(torch.randn(64, 2, generator=generator))[0], S=torch.tensor([3.0, 1.0]),
        V=torch.linalg.qr(torch.randn(16, 2, generator=generator))[0], energy=0.9,
    )
    envelope = wire.Envelope(kind=wire.Kind.BLOCKS, line=LINE, camera="cam1", device="dev1", frame=10**6, capture_ms=1, epoch=1)
    return wire.encode_blocks(envelope, [block], dtype="float32")


def with_nan_in_payload(data: bytes) -> bytes:
    """Overwrite the last float32 of the payload with NaN and fix the CRC, so only the NaN is wrong."""
    header = wire._read_header(data)  # noqa: SLF001 - the test needs the payload offset
    payload = bytearray(data[header.payload_start :])
    payload[-4:] = struct.pack("<f", math.nan)
    crc_at = header.payload_start - 4
    return data[:crc_at] + struct.pack("<I", zlib.crc32(payload)) + bytes(payload)


def png(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


def bad_cases() -> dict[str, tuple[str, dict, object, str, str]]:
    """Return case -> (topic name, topic ids, payload, reporting instance, error kind)."""
    jpeg = BOARD.read_bytes()
    gray = cv2.imread(str(BOARD), cv2.IMREAD_GRAYSCALE)
    good = frame_message(1, jpeg)
    header = wire._read_header(good)  # noqa: SLF001
    wrong_length = bytearray(good)
    struct.pack_into("<I", wrong_length, header.payload_start - 8, header.payload_len + 10)
    wrong_version = bytearray(good)
    wrong_version[4] = 9
    frame_ids = {"camera": "cam1"}
    return {
        "truncated_jpeg": ("frame", frame_ids, jpeg[: len(jpeg) // 2], "compressor", "frame_invalid"),
        "jpeg_without_eoi": ("frame", frame_ids, jpeg[:-2], "compressor", "frame_invalid"),
        "zero_bytes": ("frame", frame_ids, b"", "compressor", "frame_invalid"),
        "wrong_magic": ("frame", frame_ids, b"SDRX" + good[4:], "compressor", "frame_invalid"),
        "wrong_version": ("frame", frame_ids, bytes(wrong_version), "compressor", "frame_invalid"),
        "length_disagrees": ("frame", frame_ids, bytes(wrong_length), "compressor", "frame_invalid"),
        "shape_disagrees": ("frame", frame_ids, frame_message(2, jpeg, width=100, height=100), "compressor", "frame_invalid"),
        "tiny_image": ("frame", frame_ids, frame_message(3, png(gray[:8, :8])), "compressor", "frame_invalid"),
        "four_channels": (
            "frame", frame_ids, frame_message(4, png(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGRA))), "compressor", "frame_invalid",
        ),
        "camera_id_with_hash": ("frame", frame_ids, frame_message(5, jpeg, camera="cam#1"), "compressor", "frame_invalid"),
        "nan_in_factors": ("blocks", {"device": "dev1"}, with_nan_in_payload(blocks_message()), "dev1", "blocks_invalid"),
        "unknown_head": ("blocks", {"device": "dev1"}, blocks_message(head=17), "dev1", "blocks_invalid"),
        "blocks_cut_short": ("blocks", {"device": "dev1"}, blocks_message()[:-100], "dev1", "blocks_invalid"),
        "partials_garbage": ("partials", {"device": "dev1"}, b"\x00" * 64, "aggregator", "partials_invalid"),
        "frame_info_wrong_types": (
            "frame_info", frame_ids, json.dumps({"camera": "cam1", "frame": "seven"}).encode(), "aggregator", "frame_info_invalid",
        ),
        "load_wrong_types": (
            "load", {"device": "dev1"}, json.dumps({"device": "dev1", "queue_depth": "many"}).encode(), "scheduler", "load_invalid",
        ),
        "status_id_with_plus": (
            "device_status", {"device": "dev1"},
            json.dumps({"state": "online", "service": "device", "id": "dev+1", "session_epoch": 1, "ts_ms": 1}).encode(),
            "scheduler", "status_invalid",
        ),
        "assignment_id_with_slash": (
            "assignment", {},
            json.dumps({"epoch": 10**9, "ts_ms": 1, "heads": {"0": "dev/1"}, "devices": ["dev/1"]}).encode(),
            "compressor", "assignment_invalid",
        ),
    }


CASES = bad_cases()


def send_good_frame(probe: Probe, frame: int) -> messages.Verdict | None:
    probe.bus.publish("frame", frame_message(frame, BOARD.read_bytes()), camera="cam1")
    found = probe.wait_for(lambda: [v for v in probe.verdicts() if v.frame == frame], 60.0)
    return found[0] if found else None


@pytest.mark.parametrize("case", list(CASES))
def test_bad_message_rejected_and_reported(line, case):
    services, probe = line
    name, ids, payload, instance, kind = CASES[case]
    time.sleep(REPORT_INTERVAL_S)
    before = len(probe.messages("errors"))

    # Not retained, so a bad assignment or status cannot outlive the test on the broker.
    probe.bus.publish(name, payload, retain=False, **ids)

    def report():
        for message in probe.messages("errors")[before:]:
            parsed = messages.parse(messages.ErrorReport, message.payload)
            if message.ids["service"] == instance and parsed.kind == kind:
                return parsed
        return None

    found = probe.wait_for(report, 20.0)
    assert found, f"no {kind} report from {instance}\n{services.log(instance)[-2000:]}"
    assert found.error, "the report has no error text"

    frame = 10_000 + list(CASES).index(case)
    verdict = send_good_frame(probe, frame)
    assert verdict is not None, f"the good frame after {case} got no verdict\n{services.log('aggregator')[-2000:]}"
    assert verdict.status == "complete"
    for service in ("scheduler", "aggregator", "compressor", "dev1"):
        assert services.alive(service), f"{service} exited after {case}\n{services.log(service)[-2000:]}"


def test_invalid_frames_get_error_verdicts(line):
    _, probe = line
    frames = {v.frame: v for v in probe.verdicts() if v.camera == "cam1"}
    for frame in (2, 3, 4):
        assert frame in frames, f"bad frame {frame} got no verdict"
        assert frames[frame].status == "error"
        assert frames[frame].label == "defect"


def test_lost_frames_reported(line):
    """Frames 2 and 3 of a camera never arrive: the aggregator reports them from the gap in the numbers."""
    services, probe = line
    for frame in (0, 1, 4):
        probe.bus.publish("frame", frame_message(frame, BOARD.read_bytes(), camera="cam9"), camera="cam9")

    def lost_report():
        for message in probe.messages("errors"):
            report = messages.parse(messages.ErrorReport, message.payload)
            if report.kind == "frames_lost" and report.ids.get("camera") == "cam9":
                return report
        return None

    report = probe.wait_for(lost_report, 30.0)
    assert report, f"no frames_lost report for cam9\n{services.log('aggregator')[-2000:]}"
    assert report.ids["ranges"] == "2-3"
    assert report.ids["frames"] == 2
