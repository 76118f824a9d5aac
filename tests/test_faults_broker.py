"""Services started before the broker wait for it, and a broker restart mid-stream stops no service.

Each test starts and restarts its own Mosquitto on one fixed loopback port, because the services
must find the restarted broker at the address they were given. The first restarts a broker that
keeps nothing (a crash that loses its state); the second one that keeps its persistence file, as
the compose broker does, with a verdict subscriber on a persistent session.
"""

from __future__ import annotations

import time

import pytest

from sdrm import messages
from services.broker import LocalBroker, find_mosquitto, free_port
from tests.broker import SAMPLES, FrameFeeder, Probe, Services, model_dir  # noqa: F401 - pytest fixtures

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(find_mosquitto() is None, reason="needs the mosquitto binary (apt-get install mosquitto)"),
]

LINE = "restart"
BOARD = SAMPLES / "ok" / "12100036_temp.jpg"
SERVICES = ["scheduler", "aggregator", "compressor", "dev1", "dev2"]


def start_line(services: Services) -> None:
    services.start("scheduler", "scheduler")
    services.start("aggregator", "aggregator", "--deadline-ms", "3000")
    services.start("compressor", "compressor")
    for device in ("dev1", "dev2"):
        services.start(device, "device", "--device", device, "--threads", "1")


def reported_lost(probe: Probe, camera: str) -> set[int]:
    """Return the frame numbers that frames_lost reports of the aggregator name for camera."""
    lost: set[int] = set()
    for message in probe.messages("errors"):
        report = messages.parse(messages.ErrorReport, message.payload)
        if report.kind != "frames_lost" or report.ids.get("camera") != camera:
            continue
        for run in str(report.ids["ranges"]).split(","):
            first, last = (int(value) for value in run.split("-"))
            lost |= set(range(first, last + 1))
    return lost


def cam_verdicts(probe: Probe, after_frame: int = -1) -> list:
    return [v for v in probe.verdicts() if v.camera == "cam1" and v.frame > after_frame]


def stop_all(feeder: FrameFeeder | None, services: Services, probe: Probe | None, broker: LocalBroker | None) -> None:
    """Stop the feeder, the services, the probe and the broker, skipping those not started."""
    if feeder is not None:
        feeder.stop()
    services.stop_all()
    if probe is not None:
        probe.close()
    if broker is not None:
        broker.stop()


def test_broker_late_start_and_restart(model_dir, tmp_path):
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    services = Services(url, LINE, model_dir, tmp_path)
    broker = None
    probe = None
    feeder = None
    try:
        start_line(services)
        time.sleep(4.0)
        for name in SERVICES:
            assert services.alive(name), f"{name} exited while the broker was missing\n{services.log(name)[-2000:]}"

        broker = LocalBroker(port=port).start()
        probe = Probe(url, LINE, ["verdict", "assignment", "errors"])
        feeder = FrameFeeder(probe.bus, LINE, "cam1", BOARD, period_s=0.5).start()
        first = probe.wait_for(lambda: cam_verdicts(probe), 60.0)
        assert first, f"no verdict after the broker came up\n{services.log('compressor')[-2000:]}"

        broker.stop()
        stopped = time.monotonic()
        time.sleep(3.0)
        broker = LocalBroker(port=port).start()
        restarted = time.monotonic()
        last_before = max(v.frame for v in cam_verdicts(probe))

        resumed = probe.wait_for(lambda: cam_verdicts(probe, last_before), 10.0)
        resume_s = time.monotonic() - restarted
        assert resumed, f"no verdict within 10 s of the broker restart\n{services.log('aggregator')[-3000:]}"

        # The restarted broker has no persistence, so every retained message below was published again.
        fresh = Probe(url, LINE, ["assignment", "service_status", "device_status"])
        try:
            retained = fresh.wait_for(lambda: fresh.assignments(), 10.0)

            def online_ids():
                statuses = [messages.parse(messages.Status, m.payload) for m in fresh.received if "status" in m.name and m.payload]
                return {s.id for s in statuses if s.state == "online"}

            fresh.wait_for(lambda: {"scheduler", "aggregator", "compressor", "dev1", "dev2"} <= online_ids(), 10.0)
            online = online_ids()
        finally:
            fresh.close()
        assert retained, "no retained assignment after the restart: the scheduler did not publish it again"
        for name in ("scheduler", "aggregator", "compressor", "dev1", "dev2"):
            assert name in online, f"{name} did not publish its retained online status again"

        for name in SERVICES:
            assert services.alive(name), f"{name} exited during the broker restart\n{services.log(name)[-2000:]}"
        print(f"broker down {restarted - stopped:.1f} s; first verdict {resume_s:.2f} s after the restart")
    finally:
        stop_all(feeder, services, probe, broker)


def test_persistent_restart_accounts_frames(model_dir, tmp_path):
    """Across a restart of a persistent broker, every frame gets a verdict or a frames_lost report.

    The verdict subscriber keeps a persistent session, as docs/integrators.md recommends for SCADA. A
    subscriber without one misses the verdicts that the aggregator sends in the seconds between
    its own reconnect and the subscriber's, because a restarted broker has no subscription for it yet.
    """
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    state = tmp_path / "mosquitto-data"
    services = Services(url, LINE, model_dir, tmp_path)
    broker = LocalBroker(port=port, persistence_dir=state).start()
    probe = None
    feeder = None
    try:
        start_line(services)
        probe = Probe(url, LINE, ["verdict", "errors"], session_expiry_s=600)
        feeder = FrameFeeder(probe.bus, LINE, "cam1", BOARD, period_s=0.5).start()
        first = probe.wait_for(lambda: cam_verdicts(probe), 60.0)
        assert first, f"no verdict after the line started\n{services.log('compressor')[-2000:]}"

        broker.stop()
        time.sleep(3.0)
        broker = LocalBroker(port=port, persistence_dir=state).start()
        restart_frame = len(feeder.sent)
        last_before = max(v.frame for v in cam_verdicts(probe))
        resumed = probe.wait_for(lambda: cam_verdicts(probe, last_before), 10.0)
        assert resumed, f"no verdict within 10 s of the broker restart\n{services.log('aggregator')[-3000:]}"

        # Lost frames are found from gaps in the frame numbers, so frames sent after the restart
        # must reach the aggregator before the feeder stops.
        assert probe.wait_for(lambda: len(cam_verdicts(probe, restart_frame + 3)) > 0, 30.0), (
            f"no verdicts for frames after the restart\n{services.log('aggregator')[-3000:]}"
        )

        # Frames before the first verdict may have found no compressor at the start.
        first_frame = min(v.frame for v in first)
        sent = [frame for frame in feeder.stop() if frame >= first_frame]
        verdicts, missing = probe.settled_verdicts(sent, 30.0, settle_s=8.0)
        lost = reported_lost(probe, "cam1")
        assert set(missing) <= lost, (
            f"frames {sorted(set(missing) - lost)} got no verdict and were not reported lost\n"
            f"{services.log('aggregator')[-3000:]}"
        )
        wrongly_lost = lost & {v.frame for v in verdicts if v.camera == "cam1"}
        assert not wrongly_lost, (
            f"frames {sorted(wrongly_lost)} were reported lost but got a verdict: "
            f"{[(v.frame, v.status, v.error) for v in verdicts if v.frame in wrongly_lost]}"
        )
        statuses = sorted({v.status for v in verdicts if v.camera == "cam1" and v.frame in sent})
        print(f"{len(sent)} frames, {len(missing)} without verdict, {len(lost)} reported lost, statuses {statuses}")
    finally:
        stop_all(feeder, services, probe, broker)
