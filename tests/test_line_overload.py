"""A device whose load stays above the threshold, or that is slow, loses its heads and the epoch rises."""

from __future__ import annotations

import time

import pytest

from sdrm import messages
from tests.broker import SAMPLES, FrameFeeder, Probe, Services, model_dir, mqtt_broker  # noqa: F401 - pytest fixtures

pytestmark = pytest.mark.slow

BOARD = SAMPLES / "ok" / "12100036_temp.jpg"


def run_with_loaded_device(broker_url, model_dir, log_dir, line: str, load_args: list[str]):
    """Start a line with devices "fast" and "loaded", feed 1 frame/s and return the first assignment without "loaded".

    Returns (assignment before, assignment after, seconds from the first frame, later assignments).
    """
    services = Services(broker_url, line, model_dir, log_dir)
    probe = Probe(broker_url, line, ["assignment"])
    feeder = None
    try:
        services.start(
            "scheduler", "scheduler",
            "--threshold", "0.6", "--overload-window-ms", "1500", "--recover-window-ms", "60000", "--min-interval-ms", "500",
        )
        services.start("aggregator", "aggregator", "--deadline-ms", "4000")
        services.start("compressor", "compressor")
        services.start("fast", "device", "--device", "fast", "--threads", "1", "--report-ms", "250")
        services.start("loaded", "device", "--device", "loaded", "--threads", "1", "--report-ms", "250", *load_args)
        ready = probe.wait_for(lambda: [a for a in probe.assignments() if set(a.heads.values()) == {"fast", "loaded"}], 60.0)
        assert ready, f"no assignment over both devices within 60 s\n{services.log('scheduler')[-2000:]}"
        before = ready[-1]

        feeder = FrameFeeder(probe.bus, line, "cam1", BOARD, period_s=1.0).start()
        started = time.monotonic()
        moved = probe.wait_for(
            lambda: [a for a in probe.assignments() if a.epoch > before.epoch and "loaded" not in a.heads.values()], 45.0
        )
        assert moved, f"heads stayed on the loaded device\n{services.log('scheduler')[-3000:]}"
        elapsed = time.monotonic() - started
        time.sleep(3.0)
        later = [a for a in probe.assignments() if a.epoch > moved[0].epoch]
        assert services.alive("loaded")
        return before, moved[0], elapsed, later
    finally:
        if feeder is not None:
            feeder.stop()
        services.stop_all()
        probe.close()


def check_moved(before: messages.Assignment, after: messages.Assignment, later: list[messages.Assignment]) -> None:
    assert after.epoch > before.epoch
    assert len(after.heads) == 6
    assert set(after.heads.values()) == {"fast"}
    assert all("loaded" not in a.heads.values() for a in later), "heads flapped back to the loaded device"


def test_busy_device_above_threshold(mqtt_broker, model_dir, tmp_path):
    before, after, elapsed, later = run_with_loaded_device(
        mqtt_broker.url, model_dir, tmp_path, "overload", ["--simulated-load", "0.95"]
    )
    check_moved(before, after, later)
    assert "overloaded" in after.reason
    print(f"heads left the device at load 0.95 > 0.6 after {elapsed:.1f} s: {after.reason}")


def test_slow_device_with_extra_load(mqtt_broker, model_dir, tmp_path):
    before, after, elapsed, later = run_with_loaded_device(
        mqtt_broker.url, model_dir, tmp_path, "slow", ["--extra-load-ms", "2500"]
    )
    check_moved(before, after, later)
    # A sleep per frame raises the busy ratio and lowers the measured speed, so the heads can move
    # for either reason, whichever the scheduler detects first.
    assert "overloaded" in after.reason or "rebalance by device speed" in after.reason
    print(f"heads left the device with 2500 ms extra load per frame after {elapsed:.1f} s: {after.reason}")
