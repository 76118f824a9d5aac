"""Lost frames, found from gaps in each camera's frame numbers.

`sdrm ingest` numbers a camera's frames 0, 1, 2, ... A frame that the broker dropped before any
compressor received it (for example published while no compressor was subscribed, right after a
broker restart without persistence) never gets a FrameInfo, so no verdict names it. A gap in the
numbers shows it. Frames of one camera may arrive out of order when several compressors share the
camera's frames, so a missing number counts as lost only when it has not arrived within a grace
period after a later number arrived.

A camera whose numbers go down while its capture time goes up restarted its numbering (a new
ingest process), which is not a loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_TRACKED_GAP = 10_000  # a larger jump is counted at once instead of tracked number by number


@dataclass
class _Camera:
    last_frame: int
    last_capture_ms: int
    missing: dict[int, float] = field(default_factory=dict)  # frame number -> time it is declared lost


@dataclass(frozen=True)
class LostFrames:
    """Frames first..last (inclusive) of a camera that never arrived."""

    camera: str
    first: int
    last: int

    @property
    def count(self) -> int:
        return self.last - self.first + 1


class FrameGaps:
    """Track each camera's frame numbers and return the runs of numbers that never arrived.

    grace_s: how long a missing number may still arrive after a later one did, in the same time
    unit as the `now` arguments (seconds of a monotonic clock).
    """

    def __init__(self, grace_s: float) -> None:
        if grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {grace_s}")
        self.grace_s = grace_s
        self._cameras: dict[str, _Camera] = {}

    def tracks(self, camera: str) -> bool:
        """Return whether camera's frame numbers are being tracked (it sent a numbered frame)."""
        return camera in self._cameras

    def observe(self, camera: str, frame: int, capture_ms: int, now: float) -> list[LostFrames]:
        """Record that (camera, frame) arrived; return runs lost at once (jumps above MAX_TRACKED_GAP)."""
        state = self._cameras.get(camera)
        if state is None:
            self._cameras[camera] = _Camera(frame, capture_ms)
            return []

        if frame <= state.last_frame:
            if state.missing.pop(frame, None) is None and capture_ms > state.last_capture_ms:
                # A smaller number with a newer capture time: the camera's ingest started again.
                self._cameras[camera] = _Camera(frame, capture_ms)
            return []

        gap = frame - state.last_frame - 1
        lost: list[LostFrames] = []
        if gap > MAX_TRACKED_GAP:
            lost.append(LostFrames(camera, state.last_frame + 1, frame - 1))
        else:
            for number in range(state.last_frame + 1, frame):
                state.missing[number] = now + self.grace_s
        state.last_frame = frame
        state.last_capture_ms = max(state.last_capture_ms, capture_ms)
        return lost

    def expired(self, now: float) -> list[LostFrames]:
        """Return the runs of missing numbers whose grace period has ended, and stop tracking them."""
        lost: list[LostFrames] = []
        for camera, state in self._cameras.items():
            due = sorted(number for number, deadline in state.missing.items() if deadline <= now)
            for number in due:
                del state.missing[number]
            lost += _runs(camera, due)
        return lost


def _runs(camera: str, numbers: list[int]) -> list[LostFrames]:
    """Group sorted numbers into runs of consecutive numbers."""
    runs: list[LostFrames] = []
    for number in numbers:
        if runs and runs[-1].last == number - 1:
            runs[-1] = LostFrames(camera, runs[-1].first, number)
        else:
            runs.append(LostFrames(camera, number, number))
    return runs
