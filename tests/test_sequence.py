"""Lost frames are found from gaps in frame numbers, despite reordering and ingest restarts."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sdrm.sequence import MAX_TRACKED_GAP, FrameGaps, LostFrames


def lost_numbers(runs: list[LostFrames]) -> set[int]:
    return {number for run in runs for number in range(run.first, run.last + 1)}


def test_gap_reported_after_grace():
    gaps = FrameGaps(grace_s=2.0)
    assert gaps.observe("cam1", 0, 1000, now=0.0) == []
    assert gaps.observe("cam1", 4, 1400, now=0.1) == []
    assert gaps.expired(now=1.0) == []
    assert gaps.expired(now=2.2) == [LostFrames("cam1", 1, 3)]
    assert gaps.expired(now=9.0) == []


def test_late_frame_within_grace_not_lost():
    gaps = FrameGaps(grace_s=2.0)
    gaps.observe("cam1", 0, 1000, now=0.0)
    gaps.observe("cam1", 2, 1200, now=0.1)
    gaps.observe("cam1", 1, 1100, now=0.5)
    assert gaps.expired(now=5.0) == []


def test_ingest_restart_not_a_loss():
    gaps = FrameGaps(grace_s=1.0)
    gaps.observe("cam1", 50, 5000, now=0.0)
    gaps.observe("cam1", 0, 9000, now=0.1)
    gaps.observe("cam1", 1, 9100, now=0.2)
    assert gaps.expired(now=5.0) == []


def test_cameras_tracked_apart():
    gaps = FrameGaps(grace_s=0.0)
    gaps.observe("cam1", 0, 0, now=0.0)
    gaps.observe("cam2", 7, 0, now=0.0)
    gaps.observe("cam1", 2, 1, now=0.0)
    gaps.observe("cam2", 8, 1, now=0.0)
    assert gaps.expired(now=0.0) == [LostFrames("cam1", 1, 1)]


def test_huge_jump_counted_at_once():
    gaps = FrameGaps(grace_s=1.0)
    gaps.observe("cam1", 0, 0, now=0.0)
    lost = gaps.observe("cam1", MAX_TRACKED_GAP + 5, 1, now=0.0)
    assert lost == [LostFrames("cam1", 1, MAX_TRACKED_GAP + 4)]
    assert lost[0].count == MAX_TRACKED_GAP + 4


@given(
    count=st.integers(2, 200),
    dropped=st.sets(st.integers(1, 198)),
    order=st.randoms(use_true_random=False),
)
def test_exactly_dropped_frames_reported(count, dropped, order):
    """Frames 0..count-1 minus `dropped`, shuffled: every dropped number below the last arrival is found."""
    arrived = [frame for frame in range(count) if frame not in dropped or frame == 0]
    order.shuffle(arrived)
    arrived.remove(0)
    arrived.insert(0, 0)
    gaps = FrameGaps(grace_s=1000.0)
    reported = set()
    for frame in arrived:
        reported |= lost_numbers(gaps.observe("cam1", frame, capture_ms=frame, now=0.0))
    reported |= lost_numbers(gaps.expired(now=2000.0))
    expected = {frame for frame in dropped if 0 < frame < max(arrived)}
    assert reported == expected
