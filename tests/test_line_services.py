"""The services as separate processes on a real broker: smart-camera frames and malformed input."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from sdrm import messages, wire
from sdrm.checkpoint import load_checkpoint
from sdrm.data import read_gray
from sdrm.inference import frame_to_tiles, predict_frame
from services.topics import load_topics
from tests.broker import SAMPLES, Probe, Services, model_dir, mqtt_broker  # noqa: F401 - pytest fixtures

pytestmark = pytest.mark.slow

LINE = "svc"
BOARD = SAMPLES / "defective" / "12300239_test.jpg"


@pytest.fixture(scope="module")
def line(mqtt_broker, model_dir, tmp_path_factory):
    """Scheduler, aggregator, compressor and two devices as subprocesses, with heads assigned."""
    services = Services(mqtt_broker.url, LINE, model_dir, tmp_path_factory.mktemp("logs"))
    probe = Probe(mqtt_broker.url, LINE, ["verdict", "assignment"])
    services.start("scheduler", "scheduler")
    services.start("aggregator", "aggregator", "--deadline-ms", "5000")
    services.start("compressor", "compressor")
    services.start("dev1", "device", "--device", "dev1", "--threads", "1")
    services.start("dev2", "device", "--device", "dev2", "--threads", "1")
    ready = probe.wait_for(
        lambda: [a for a in probe.assignments() if set(a.heads.values()) == {"dev1", "dev2"} and len(a.heads) == 6], 60.0
    )
    if not ready:
        services.stop_all()
        pytest.fail(f"no assignment over dev1 and dev2 within 60 s\n{services.log('scheduler')[-2000:]}")
    yield services, probe
    services.stop_all()
    probe.close()


def verdicts_of(probe: Probe, camera: str) -> list[messages.Verdict]:
    return [verdict for verdict in probe.verdicts() if verdict.camera == camera]


def test_plain_jpeg_from_mosquitto_pub(line, mqtt_broker, model_dir):
    services, probe = line
    topic = load_topics().topic("frame", line=LINE, camera="smart1")
    host, port = mqtt_broker.url.removeprefix("mqtt://").split(":")
    if shutil.which("mosquitto_pub"):
        subprocess.run(["mosquitto_pub", "-h", host, "-p", port, "-q", "1", "-t", topic, "-f", str(BOARD)], check=True, timeout=10)
    else:
        probe.bus.publish("frame", BOARD.read_bytes(), camera="smart1").wait_for_publish(5.0)

    verdicts = probe.wait_for(lambda: verdicts_of(probe, "smart1"), 60.0)
    assert verdicts, f"no verdict for a plain JPEG\n{services.log('compressor')[-2000:]}"
    verdict = verdicts[0]
    assert verdict.status == "complete"
    model, manifest = load_checkpoint(model_dir)
    local = predict_frame(model, manifest, read_gray(BOARD))
    assert verdict.label == local.label
    assert abs(verdict.score - local.score) <= 1e-3
    assert verdict.capture_ms > 0


def test_malformed_frame_gets_error_verdict(line):
    services, probe = line
    probe.bus.publish("frame", b"this is not an image", camera="bad1").wait_for_publish(5.0)
    verdicts = probe.wait_for(lambda: verdicts_of(probe, "bad1"), 30.0)
    assert verdicts, "no verdict for an undecodable frame"
    assert verdicts[0].status == "error"
    assert verdicts[0].label == "defect"
    assert "neither a JPEG/PNG image nor an SDRM FRAME message" in verdicts[0].error

    envelope = wire.Envelope(kind=wire.Kind.FRAME, line=LINE, camera="bad2", frame=7, capture_ms=1)
    corrupted = bytearray(wire.encode_frame(envelope, BOARD.read_bytes(), "jpeg"))
    corrupted[-10] ^= 0xFF
    probe.bus.publish("frame", bytes(corrupted), camera="bad2").wait_for_publish(5.0)
    verdicts = probe.wait_for(lambda: verdicts_of(probe, "bad2"), 30.0)
    assert verdicts, "no verdict for a frame with a bad checksum"
    assert verdicts[0].status == "error"
    assert verdicts[0].frame == 7
    assert "checksum" in verdicts[0].error

    probe.bus.publish("frame", b"\xff\xd8\xff\xe0" + bytes(200), camera="bad3").wait_for_publish(5.0)
    verdicts = probe.wait_for(lambda: verdicts_of(probe, "bad3"), 30.0)
    assert verdicts, "no verdict for a broken JPEG"
    assert verdicts[0].status == "error"
    assert "no end-of-image marker" in verdicts[0].error

    assert services.alive("compressor")
    assert "frame_invalid" in services.log("compressor")


def test_malformed_device_input_survives(line):
    services, probe = line
    probe.bus.publish("blocks", b"\x00garbage", device="dev1").wait_for_publish(5.0)
    probe.bus.publish("partials", b"SDRM\x01\x03", device="dev2").wait_for_publish(5.0)
    probe.bus.publish("frame_info", b'{"camera": 5}', camera="cam1").wait_for_publish(5.0)

    envelope = wire.Envelope(kind=wire.Kind.FRAME, line=LINE, camera="after1", frame=1, capture_ms=int(time.time() * 1000))
    probe.bus.publish("frame", wire.encode_frame(envelope, BOARD.read_bytes(), "jpeg"), camera="after1").wait_for_publish(5.0)
    verdicts = probe.wait_for(lambda: verdicts_of(probe, "after1"), 60.0)
    assert verdicts, "no verdict after malformed device input"
    assert verdicts[0].status == "complete"

    for name in ("dev1", "dev2", "aggregator"):
        assert services.alive(name), name
    assert "blocks_invalid" in services.log("dev1")
    aggregator_log = services.log("aggregator")
    assert "partials_invalid" in aggregator_log
    assert "frame_info_invalid" in aggregator_log


def test_every_frame_one_verdict(line):
    services, probe = line
    for frame in range(4):
        envelope = wire.Envelope(kind=wire.Kind.FRAME, line=LINE, camera="seq1", frame=frame, capture_ms=int(time.time() * 1000))
        probe.bus.publish("frame", wire.encode_frame(envelope, BOARD.read_bytes(), "jpeg"), camera="seq1")
    verdicts = probe.wait_for(lambda: len(verdicts_of(probe, "seq1")) >= 4 and verdicts_of(probe, "seq1"), 90.0)
    assert verdicts, "fewer than 4 verdicts for 4 frames"
    time.sleep(1.0)
    frames = sorted(verdict.frame for verdict in verdicts_of(probe, "seq1"))
    assert frames == [0, 1, 2, 3]
    latencies = [verdict.latency_ms["total"] for verdict in verdicts_of(probe, "seq1")]
    print(f"verdict latency ms for 4 frames sent at once: {latencies}")


def test_duplicate_and_late_partials_dropped(line, model_dir):
    services, probe = line
    model, manifest = load_checkpoint(model_dir)
    inputs, boxes = frame_to_tiles(read_gray(BOARD), manifest)
    blocks, _ = model.compress(inputs)
    partials = [model.head_forward(block) for block in blocks]
    capture_ms = int(time.time() * 1000)
    info = messages.FrameInfo(
        line=LINE, camera="dup1", frame=3, capture_ms=capture_ms, epoch=77, width=640, height=640,
        boxes=boxes, heads={block.head: "devx" for block in blocks}, head_count=len(blocks),
        ranks={block.head: block.rank for block in blocks}, phi=model.config.phi, sent_ms=capture_ms,
    )
    envelope = wire.Envelope(kind=wire.Kind.PARTIALS, line=LINE, camera="dup1", device="devx", frame=3, capture_ms=capture_ms, epoch=77)
    payload = wire.encode_partials(envelope, blocks, partials, dtype="float32")

    probe.bus.publish("partials", payload, device="devx").wait_for_publish(5.0)
    probe.bus.publish("partials", payload, device="devx").wait_for_publish(5.0)
    probe.bus.publish("frame_info", messages.to_json(info), camera="dup1").wait_for_publish(5.0)
    verdicts = probe.wait_for(lambda: verdicts_of(probe, "dup1"), 30.0)
    assert verdicts, "no verdict for announced partials"
    probe.bus.publish("partials", payload, device="devx").wait_for_publish(5.0)
    time.sleep(2.0)

    verdicts = verdicts_of(probe, "dup1")
    assert len(verdicts) == 1
    assert verdicts[0].status == "complete"
    local = predict_frame(model, manifest, read_gray(BOARD))
    assert abs(verdicts[0].score - local.score) <= 1e-3
    aggregator_log = services.log("aggregator")
    assert "partials_duplicate" in aggregator_log
    assert "partials_late" in aggregator_log

    last = Probe(probe.bus.broker, LINE, ["verdict_last"], camera="dup1")
    retained = last.wait_for(lambda: last.messages("verdict_last"), 5.0)
    assert retained
    assert retained[0].retain
    assert messages.parse(messages.Verdict, retained[0].payload).frame == 3
    last.close()


def test_frame_info_without_partials_incomplete(line):
    services, probe = line
    capture_ms = int(time.time() * 1000)
    info = messages.FrameInfo(
        line=LINE, camera="lost1", frame=1, capture_ms=capture_ms, epoch=78, width=640, height=640,
        boxes=[(0, 0, 128, 128)], heads={0: "gone"}, head_count=6, sent_ms=capture_ms,
    )
    probe.bus.publish("frame_info", messages.to_json(info), camera="lost1").wait_for_publish(5.0)
    verdicts = probe.wait_for(lambda: verdicts_of(probe, "lost1"), 15.0)
    assert verdicts, "no verdict when every partial is lost"
    assert verdicts[0].status == "incomplete"
    assert verdicts[0].label == "defect"
    assert verdicts[0].missing_heads == [0, 1, 2, 3, 4, 5]
