"""A device killed with SIGKILL: its heads move within 5 s, every frame in flight gets a verdict,
and the restarted device gets heads again while the old session's will cannot mark it offline."""

from __future__ import annotations

import time

import pytest

from sdrm import messages
from tests.broker import SAMPLES, FrameFeeder, Probe, Services, model_dir, mqtt_broker  # noqa: F401 - pytest fixtures

pytestmark = pytest.mark.slow

LINE = "kill"
BOARD = SAMPLES / "ok" / "12100036_temp.jpg"
DEVICES = {"dev1", "dev2", "dev3"}


def test_killed_device_heads_move(mqtt_broker, model_dir, tmp_path):
    services = Services(mqtt_broker.url, LINE, model_dir, tmp_path)
    probe = Probe(mqtt_broker.url, LINE, ["verdict", "assignment", "device_status"])
    feeder = None
    try:
        services.start("scheduler", "scheduler")
        services.start("aggregator", "aggregator", "--deadline-ms", "3000")
        services.start("compressor", "compressor")
        for device in sorted(DEVICES):
            services.start(device, "device", "--device", device, "--threads", "1")
        ready = probe.wait_for(lambda: [a for a in probe.assignments() if set(a.heads.values()) == DEVICES], 60.0)
        assert ready, f"no assignment over {sorted(DEVICES)} within 60 s\n{services.log('scheduler')[-2000:]}"

        feeder = FrameFeeder(probe.bus, LINE, "cam1", BOARD, period_s=1.0).start()
        time.sleep(3.0)
        before = max(a.epoch for a in probe.assignments())
        services.processes["dev2"].kill()
        killed = time.monotonic()

        moved = probe.wait_for(
            lambda: [a for a in probe.assignments() if a.epoch > before and "dev2" not in a.heads.values()], 10.0
        )
        reassign_s = time.monotonic() - killed
        assert moved, f"heads of dev2 did not move within 10 s\n{services.log('scheduler')[-2000:]}"
        assert reassign_s < 5.0
        assert len(moved[0].heads) == 6
        assert set(moved[0].heads.values()) <= {"dev1", "dev3"}

        time.sleep(3.0)
        sent = feeder.stop()

        def all_verdicts():
            frames = [v.frame for v in probe.verdicts() if v.camera == "cam1"]
            return frames if set(sent) <= set(frames) else None

        assert probe.wait_for(all_verdicts, 60.0), f"frames without verdict\n{services.log('aggregator')[-2000:]}"
        time.sleep(1.0)
        verdicts = [v for v in probe.verdicts() if v.camera == "cam1"]
        frames = [v.frame for v in verdicts]
        assert sorted(frames) == sorted(set(frames)), "a frame got more than one verdict"
        assert set(frames) == set(sent)
        statuses = {v.status for v in verdicts}
        assert statuses <= {"complete", "incomplete"}

        wills = [
            messages.parse(messages.Status, m.payload)
            for m in probe.messages("device_status")
            if m.ids["device"] == "dev2" and m.payload
        ]
        old_will = [status for status in wills if status.state == "offline"]
        assert old_will, "the broker did not publish dev2's will after SIGKILL"

        services.start("dev2-return", "device", "--device", "dev2", "--threads", "1")
        returned = time.monotonic()
        back = probe.wait_for(lambda: [a for a in probe.assignments() if a.epoch > moved[0].epoch and "dev2" in a.heads.values()], 30.0)
        rejoin_s = time.monotonic() - returned
        assert back, f"the restarted dev2 got no heads within 30 s\n{services.log('scheduler')[-2000:]}"

        # A will of the killed session that arrives late must not mark the new session offline.
        probe.bus.publish("device_status", messages.to_json(old_will[-1]), device="dev2")
        time.sleep(3.0)
        latest = max(probe.assignments(), key=lambda a: a.epoch)
        assert "dev2" in latest.heads.values(), "a stale will took dev2's heads away"
        assert "status_stale" in services.log("scheduler") or "applied=False" in services.log("scheduler")
        print(
            f"reassigned {reassign_s:.2f} s after SIGKILL; {len(sent)} frames, "
            f"{sum(v.status == 'incomplete' for v in verdicts)} incomplete, "
            f"missing heads {[v.missing_heads for v in verdicts if v.missing_heads]}; "
            f"restarted dev2 had heads again after {rejoin_s:.2f} s"
        )
    finally:
        if feeder is not None:
            feeder.stop()
        services.stop_all()
        probe.close()
