"""A compressor stopped with a backlog: every frame in its inbox still gets exactly one verdict."""

from __future__ import annotations

import time

import pytest

from sdrm import wire
from tests.broker import SAMPLES, Probe, Services, model_dir, mqtt_broker  # noqa: F401 - pytest fixtures

pytestmark = pytest.mark.slow

LINE = "cstop"
BOARD = SAMPLES / "ok" / "12100036_temp.jpg"
FRAMES = 30


def test_stopped_compressor_accounts_backlog(mqtt_broker, model_dir, tmp_path):
    services = Services(mqtt_broker.url, LINE, model_dir, tmp_path)
    probe = Probe(mqtt_broker.url, LINE, ["verdict", "assignment"])
    try:
        services.start("scheduler", "scheduler")
        services.start("aggregator", "aggregator", "--deadline-ms", "3000")
        services.start("compressor", "compressor", "--threads", "1")
        services.start("dev1", "device", "--device", "dev1", "--threads", "1")
        assert probe.wait_for(lambda: probe.assignments(), 60.0), "no assignment within 60 s"

        image = BOARD.read_bytes()
        for frame in range(FRAMES):
            envelope = wire.Envelope(kind=wire.Kind.FRAME, line=LINE, camera="cam1", frame=frame, capture_ms=time.time_ns() // 1_000_000)
            probe.bus.publish("frame", wire.encode_frame(envelope, image, "jpeg"), camera="cam1").wait_for_publish(5.0)
        assert probe.wait_for(lambda: probe.verdicts(), 60.0), "no verdict before the stop"
        services.processes["compressor"].terminate()
        services.processes["compressor"].wait(30)

        verdicts, missing = probe.settled_verdicts(list(range(FRAMES)), 30.0)
        frames = [v.frame for v in verdicts]
        assert not missing, f"frames {missing} got no verdict\n{services.log('compressor')[-2000:]}"
        assert len(frames) == len(set(frames)), "a frame got more than one verdict"
        stopped = [v for v in verdicts if v.status == "error" and "stopped before it inspected" in (v.error or "")]
        assert stopped, "the stop found no backlog: publish more frames"
        assert all(v.label == "defect" for v in stopped)
        print(f"{FRAMES} frames: {len(stopped)} rejected at the stop, {sum(v.status == 'complete' for v in verdicts)} complete")
    finally:
        services.stop_all()
        probe.close()
