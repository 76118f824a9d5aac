"""An aggregator that is down for 60 s: on return, the frames of the outage are reported as expired.

The aggregator keeps a persistent MQTT session, so the broker queues the FrameInfo and PARTIALS
messages of the outage. None of them may be inspected as if fresh, and none may be lost.
"""

from __future__ import annotations

import time

import pytest

from tests.broker import SAMPLES, FrameFeeder, Probe, Services, model_dir, mqtt_broker  # noqa: F401 - pytest fixtures

pytestmark = pytest.mark.slow

LINE = "outage"
BOARD = SAMPLES / "ok" / "12100036_temp.jpg"
OUTAGE_S = 60.0
DEADLINE_MS = 2000
COMPRESSOR_STAGES = ("compressor_queue", "decode", "embed", "factorize")


def test_aggregator_outage_frames_expire(mqtt_broker, model_dir, tmp_path):
    services = Services(mqtt_broker.url, LINE, model_dir, tmp_path)
    probe = Probe(mqtt_broker.url, LINE, ["verdict", "assignment"])
    feeder = None
    aggregator_args = ["--deadline-ms", str(DEADLINE_MS)]
    try:
        services.start("scheduler", "scheduler")
        services.start("compressor", "compressor")
        services.start("dev1", "device", "--device", "dev1", "--threads", "1")
        services.start("aggregator", "aggregator", *aggregator_args)
        assert probe.wait_for(lambda: probe.assignments(), 60.0), "no assignment within 60 s"

        feeder = FrameFeeder(probe.bus, LINE, "cam1", BOARD, period_s=1.0).start()
        assert probe.wait_for(lambda: probe.verdicts(), 60.0), f"no verdict\n{services.log('aggregator')[-2000:]}"

        services.processes["aggregator"].terminate()
        services.processes["aggregator"].wait(30)
        down_from_frame = feeder.sent[-1]
        time.sleep(OUTAGE_S)
        services.start("aggregator-return", "aggregator", *aggregator_args)
        back_from_frame = feeder.sent[-1]
        # Frames sent while the new process loads its model are old when it connects, so they may
        # expire too. The first complete verdict marks the time the aggregator runs again.
        returned = probe.wait_for(
            lambda: [v for v in probe.verdicts() if v.frame > back_from_frame and v.status == "complete"], 90.0
        )
        assert returned, f"the returned aggregator gave no complete verdict\n{services.log('aggregator-return')[-3000:]}"
        first_fresh = min(v.frame for v in returned)
        time.sleep(8.0)
        sent = feeder.stop()

        verdicts, missing = probe.settled_verdicts(sent, 90.0, settle_s=2.0)
        frames = [v.frame for v in verdicts]
        assert not missing, f"frames {missing} got no verdict\n{services.log('aggregator-return')[-3000:]}"
        assert len(frames) == len(set(frames)), "a frame got more than one verdict"

        by_frame = {v.frame: v for v in verdicts}
        outage = [f for f in sent if down_from_frame + 2 < f < back_from_frame - 2]
        expired = [f for f in outage if by_frame[f].status == "expired"]
        assert len(outage) >= OUTAGE_S * 0.8
        assert expired == outage, f"outage frames not expired: {[(f, by_frame[f].status) for f in outage if f not in expired]}"
        assert all(by_frame[f].label == "defect" for f in expired), "an expired frame did not get the fail-safe label"

        fresh = [v for v in verdicts if v.status == "complete"]
        # Time from the compressor's send to the verdict; the compressor's own time depends on the CPU load.
        after_send = {v.frame: v.latency_ms["total"] - sum(v.latency_ms.get(stage, 0.0) for stage in COMPRESSOR_STAGES) for v in fresh}
        late = {frame: ms for frame, ms in after_send.items() if ms > 2 * DEADLINE_MS}
        assert not late, f"frames processed as fresh long after the compressor sent them (ms): {late}"
        after = [f for f in sent if f > first_fresh + 2]
        assert after, "no frames were sent after the aggregator returned"
        assert all(by_frame[f].status == "complete" for f in after), [(f, by_frame[f].status) for f in after]
        print(
            f"{len(sent)} frames, {len(outage)} in the outage, {len(expired)} expired, {len(fresh)} complete; "
            f"the first fresh frame came {first_fresh - back_from_frame} frames after the restart"
        )
    finally:
        if feeder is not None:
            feeder.stop()
        services.stop_all()
        probe.close()
