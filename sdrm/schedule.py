"""Assignment of attention heads to edge devices: a pure policy and a stateful scheduler.

Head i costs c_i = (block_bytes_i + partial_bytes_i) * frame_rate_i bytes per second on the device
that runs it, because its factor block arrives there and its partial output leaves once per frame.
With x_ij = 1 when head i runs on device j, SDRM (Du et al., Knowledge-Based Systems 325, 2025)
poses

    minimise    sum_i sum_j d_ij x_ij                              (transfer volume, Eq. 12)
    subject to  sum_i c_i x_ij <= B_j   for every device j          (bandwidth, Eq. 13)
                sum_j x_ij = 1          for every head i
                x_ij = 0 unless device j is online with load below the threshold T.

d_ij is the bytes per second that head i moves to and from device j. The devices of a line share
one switch, so d_ij = c_i for every j, and every feasible assignment has the same transfer volume
sum_i c_i. The objective therefore decides nothing, and `place_heads` chooses among feasible
assignments by two further objectives, in this order:

1. balance: the makespan max_j n_j / s_j, the time in seconds that device j needs per frame for its
   n_j heads at a speed of s_j heads per second;
2. stability: the number of heads whose device differs from the current assignment.

`assign_heads` returns None when it finds no feasible assignment, so that the caller waits for the
load to fall and retries (the paper's Algorithm 3). `Scheduler` adds liveness, hysteresis on the
load and a minimum interval between assignments on top of it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace

from sdrm import cost
from sdrm.messages import Assignment, LoadReport, Status

DEFAULT_BALANCE_TOLERANCE = 0.1
# Bandwidth sums are compared with this relative slack, so that float rounding in a sum of
# per-head costs never rejects an assignment that fits exactly.
BANDWIDTH_SLACK = 1e-9
# Maximum nodes of the depth-first search that looks for any feasible packing after the greedy
# placement failed.
SEARCH_NODE_LIMIT = 100_000


@dataclass(frozen=True)
class HeadCost:
    """Per-frame traffic of one head and the frame rate of its camera.

    block_bytes: bytes of the factor block sent to the device per frame. partial_bytes: bytes of
    the partial output sent back per frame. frame_rate: frames per second.
    """

    block_bytes: float
    partial_bytes: float
    frame_rate: float

    def __post_init__(self) -> None:
        for name in ("block_bytes", "partial_bytes", "frame_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    @property
    def bytes_per_s(self) -> float:
        """Bytes per second that the head adds to its device's traffic, received and sent together."""
        return (self.block_bytes + self.partial_bytes) * self.frame_rate

    @classmethod
    def from_shape(
        cls,
        batch: int,
        tokens: int,
        head_dim: int,
        rank: int,
        frame_rate: float,
        dtype_bytes: int = 2,
        dense: bool = False,
    ) -> HeadCost:
        """Build the cost of a head from its block shape, with the per-head wire records included."""
        sent = cost.block_bytes(batch, tokens, head_dim, rank, dtype_bytes, dense) + cost.HEAD_RECORD_BYTES
        returned = cost.partial_bytes(batch, tokens, head_dim, rank, dtype_bytes, dense) + cost.HEAD_RECORD_BYTES
        return cls(block_bytes=sent, partial_bytes=returned, frame_rate=frame_rate)


@dataclass(frozen=True)
class DeviceState:
    """Last known state of one edge device.

    load: busy ratio in [0, 1], the fraction of wall time spent computing. memory_fraction: used
    over total memory in [0, 1], kept for reports but not used by the policy. speed: measured heads
    per second, or a relative speed, None when not measured yet. bandwidth_bytes_per_s: B_j, the
    maximum received plus sent bytes per second (math.inf when unlimited). last_seen_ms: when the
    scheduler last heard from the device, in its own clock.
    """

    device: str
    online: bool = True
    load: float = 0.0
    memory_fraction: float = 0.0
    speed: float | None = None
    bandwidth_bytes_per_s: float = math.inf
    last_seen_ms: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"device id must be a non-empty str, got {self.device!r}")
        for name in ("load", "memory_fraction"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"device {self.device}: {name} must be in [0, 1], got {value!r}")
        if self.speed is not None and not (math.isfinite(self.speed) and self.speed > 0):
            raise ValueError(f"device {self.device}: speed must be a finite number > 0 or None, got {self.speed!r}")
        bandwidth = self.bandwidth_bytes_per_s
        if math.isnan(bandwidth) or bandwidth < 0:
            raise ValueError(f"device {self.device}: bandwidth_bytes_per_s must be >= 0, got {bandwidth!r}")


# Pure policy -------------------------------------------------------------------------------------


def eligible_devices(devices: Sequence[DeviceState], threshold: float) -> list[DeviceState]:
    """Return the devices that may run heads: online, with load strictly below `threshold`."""
    _check_threshold(threshold)
    return [device for device in devices if device.online and device.load < threshold]


def assign_heads(
    heads: Mapping[int, HeadCost],
    devices: Sequence[DeviceState],
    threshold: float,
    current: Mapping[int, str] | None = None,
    balance_tolerance: float = DEFAULT_BALANCE_TOLERANCE,
) -> dict[int, str] | None:
    """Assign every head to an online device with load below `threshold`, or return None.

    Devices offline or at load >= threshold take no heads. Among feasible assignments, the result
    has a small makespan and keeps heads on their `current` device where balance allows (see
    `place_heads`). Returns None when no feasible assignment is found: every device is offline or
    above the threshold, or the bandwidths B_j cannot carry the heads. Raises ValueError for a
    threshold outside (0, 1], duplicate device ids, or head ids in `current` that are not in
    `heads`.
    """
    _check_threshold(threshold)
    _check_devices(devices)
    return place_heads(heads, eligible_devices(devices, threshold), current, balance_tolerance=balance_tolerance)


def place_heads(
    heads: Mapping[int, HeadCost],
    devices: Sequence[DeviceState],
    current: Mapping[int, str] | None = None,
    *,
    hold_only: Collection[str] = (),
    balance_tolerance: float = DEFAULT_BALANCE_TOLERANCE,
) -> dict[int, str] | None:
    """Assign every head to one of `devices`, all taken as eligible, or return None.

    Devices in `hold_only` keep the heads they have in `current` but take no new ones. A device of
    unknown speed counts as the median speed of the devices with a measured speed (1.0 when none
    is measured), so relative and absolute speeds do not mix. The heuristic:

    1. Keep each head on its current device while that device's bandwidth allows, in head order.
    2. Place the other heads, largest c_i first, on the device with the earliest finish time
       (n_j + 1) / s_j and room for c_i. Ties go to the lower load, then to the lower device id.
    3. Move one head at a time from a device j to a device k while (n_k + 1) / s_k is below
       (1 - balance_tolerance) * n_j / s_j. A head whose current device is k moves first, then a
       head already moved, then a head on its current device. Each move lowers the sorted vector
       of finish times, so the loop ends.
    4. When step 2 cannot place a head, repeat steps 2 and 3 with no head kept. When that fails
       too, search depth-first for any packing that fits the bandwidths, then balance it.

    For heads of equal cost, unlimited bandwidth, no hold-only devices and balance_tolerance 0,
    step 3 reaches the minimum makespan. Raises ValueError for head ids in `current` that are not in `heads`, for
    invalid head ids, duplicate device ids or a balance_tolerance outside [0, 1).
    """
    _check_heads(heads)
    _check_devices(devices)
    if not 0.0 <= balance_tolerance < 1.0:
        raise ValueError(f"balance_tolerance must be in [0, 1), got {balance_tolerance!r}")
    current = dict(current or {})
    unknown = sorted(set(current) - set(heads))
    if unknown:
        raise ValueError(f"current assignment names unknown head ids {unknown}: heads are {sorted(heads)}")
    if not heads:
        return {}
    if not devices:
        return None

    problem = _Problem(heads, devices, current, frozenset(hold_only), balance_tolerance)
    if problem.total_cost() > problem.total_bandwidth() * (1 + BANDWIDTH_SLACK):
        return None

    for keep_current in (True, False):
        packing = problem.new_packing(keep_current)
        if problem.place_greedy(packing):
            problem.balance(packing)
            return packing.assignment

    packing = problem.new_packing(keep_current=False)
    if problem.search_feasible(packing):
        problem.balance(packing)
        return packing.assignment
    return None


def traffic_per_device(heads: Mapping[int, HeadCost], assignment: Mapping[int, str]) -> dict[str, float]:
    """Return the received plus sent bytes per second of every device in `assignment`."""
    traffic: dict[str, float] = {}
    for head, device in assignment.items():
        traffic[device] = traffic.get(device, 0.0) + heads[head].bytes_per_s
    return traffic


def makespan(assignment: Mapping[int, str], speeds: Mapping[str, float]) -> float:
    """Return max_j n_j / s_j in seconds per frame, for speeds s_j in heads per second (0.0 when empty)."""
    counts: dict[str, int] = {}
    for device in assignment.values():
        counts[device] = counts.get(device, 0) + 1
    return max((count / speeds[device] for device, count in counts.items()), default=0.0)


def moved_heads(previous: Mapping[int, str] | None, assignment: Mapping[int, str]) -> list[int]:
    """Return the heads whose device differs from `previous`, including heads it did not assign."""
    previous = previous or {}
    return sorted(head for head, device in assignment.items() if previous.get(head) != device)


@dataclass
class _Packing:
    """Heads per device, bandwidth in use and the assignment built so far."""

    assignment: dict[int, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    used: dict[str, float] = field(default_factory=dict)


class _Problem:
    """One call of `place_heads`: fixed inputs and the steps that fill a `_Packing`."""

    def __init__(
        self,
        heads: Mapping[int, HeadCost],
        devices: Sequence[DeviceState],
        current: dict[int, str],
        hold_only: frozenset[str],
        tolerance: float,
    ) -> None:
        self.costs = {head: heads[head].bytes_per_s for head in heads}
        self.devices = {device.device: device for device in devices}
        self.current = current
        self.hold_only = hold_only
        self.tolerance = tolerance
        self.receivers = [name for name in sorted(self.devices) if name not in hold_only]

        measured = [device.speed for device in devices if device.speed is not None]
        fallback = statistics.median(measured) if measured else 1.0
        self.speeds = {
            device.device: device.speed if device.speed is not None else fallback for device in devices
        }
        # Largest cost first packs bandwidth best; the head id keeps the order deterministic.
        self.order = sorted(self.costs, key=lambda head: (-self.costs[head], head))

    def total_cost(self) -> float:
        return sum(self.costs.values())

    def total_bandwidth(self) -> float:
        return sum(device.bandwidth_bytes_per_s for device in self.devices.values())

    def fits(self, packing: _Packing, head: int, device: str) -> bool:
        bandwidth = self.devices[device].bandwidth_bytes_per_s
        return packing.used.get(device, 0.0) + self.costs[head] <= bandwidth * (1 + BANDWIDTH_SLACK)

    def finish_time(self, packing: _Packing, device: str, extra: int = 0) -> float:
        return (packing.counts.get(device, 0) + extra) / self.speeds[device]

    def add(self, packing: _Packing, head: int, device: str) -> None:
        packing.assignment[head] = device
        packing.counts[device] = packing.counts.get(device, 0) + 1
        packing.used[device] = packing.used.get(device, 0.0) + self.costs[head]

    def remove(self, packing: _Packing, head: int) -> None:
        device = packing.assignment.pop(head)
        packing.counts[device] -= 1
        packing.used[device] -= self.costs[head]

    def new_packing(self, keep_current: bool) -> _Packing:
        """Start a packing with the current heads kept: all of them, or only those on hold-only devices."""
        packing = _Packing()
        for head in sorted(self.current):
            device = self.current[head]
            if device not in self.devices:
                continue
            if not keep_current and device not in self.hold_only:
                continue
            if self.fits(packing, head, device):
                self.add(packing, head, device)
        return packing

    def place_greedy(self, packing: _Packing) -> bool:
        """Place every unplaced head on the receiver that finishes it earliest; False when one does not fit."""
        for head in self.order:
            if head in packing.assignment:
                continue
            options = [device for device in self.receivers if self.fits(packing, head, device)]
            if not options:
                return False
            best = min(
                options,
                key=lambda device: (self.finish_time(packing, device, 1), self.devices[device].load, device),
            )
            self.add(packing, head, best)
        return True

    def balance(self, packing: _Packing) -> None:
        """Move single heads from slower-finishing to faster-finishing devices until no move helps."""
        while True:
            move = self._find_move(packing)
            if move is None:
                return
            head, target = move
            self.remove(packing, head)
            self.add(packing, head, target)

    def _find_move(self, packing: _Packing) -> tuple[int, str] | None:
        sources = sorted(
            (device for device, count in packing.counts.items() if count > 0),
            key=lambda device: (-self.finish_time(packing, device), device),
        )
        targets = sorted(self.receivers, key=lambda device: (self.finish_time(packing, device, 1), device))
        for source in sources:
            limit = (1.0 - self.tolerance) * self.finish_time(packing, source)
            for target in targets:
                if target == source:
                    continue
                if self.finish_time(packing, target, 1) >= limit:
                    break
                head = self._pick_head(packing, source, target)
                if head is not None:
                    return head, target
        return None

    def _pick_head(self, packing: _Packing, source: str, target: str) -> int | None:
        candidates = [
            head
            for head, device in packing.assignment.items()
            if device == source and self.fits(packing, head, target)
        ]
        if not candidates:
            return None

        def preference(head: int) -> tuple[int, int]:
            home = self.current.get(head)
            if home == target:
                return (0, head)  # returns to its current device: one move fewer
            if home != source:
                return (1, head)  # already moved: moving it again adds no move
            return (2, head)

        return min(candidates, key=preference)

    def search_feasible(self, packing: _Packing) -> bool:
        """Search depth-first for a placement of the unplaced heads that fits every bandwidth.

        Returns False when none exists or when the search exceeds SEARCH_NODE_LIMIT nodes.
        """
        # NOTE: past SEARCH_NODE_LIMIT nodes the search gives up, so a feasible but hard packing
        # (many heads of very different costs on tight bandwidths) can still return None.
        pending = [head for head in self.order if head not in packing.assignment]
        budget = [SEARCH_NODE_LIMIT]

        def room(device: str) -> float:
            return self.devices[device].bandwidth_bytes_per_s * (1 + BANDWIDTH_SLACK) - packing.used.get(device, 0.0)

        def place(index: int) -> bool:
            if index == len(pending):
                return True
            budget[0] -= 1
            if budget[0] < 0:
                return False
            remaining = sum(self.costs[head] for head in pending[index:])
            if remaining > sum(max(room(device), 0.0) for device in self.receivers):
                return False

            head = pending[index]
            tried: set[float] = set()
            for device in sorted(self.receivers, key=lambda name: (-room(name), name)):
                # Two devices with the same room left lead to the same subproblem.
                if room(device) in tried or not self.fits(packing, head, device):
                    continue
                tried.add(room(device))
                self.add(packing, head, device)
                if place(index + 1):
                    return True
                self.remove(packing, head)
            return False

        return place(0)


# Stateful scheduler ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """A new assignment to publish.

    epoch: increases by one with every decision. heads: head id -> device id. reason: why the
    assignment changed, in words. moved: heads whose device changed, including heads that had none.
    devices: every device that may run heads at ts_ms, the scheduler's time of the decision.
    """

    epoch: int
    heads: dict[int, str]
    reason: str
    moved: tuple[int, ...]
    devices: tuple[str, ...]
    ts_ms: int

    def to_assignment(self) -> Assignment:
        """Return the decision as the retained `Assignment` message of the scheduler."""
        return Assignment(
            epoch=self.epoch, ts_ms=self.ts_ms, heads=dict(self.heads), devices=list(self.devices), reason=self.reason
        )


@dataclass
class _Tracked:
    """A device as the scheduler follows it: its state, session and load history."""

    state: DeviceState
    session_epoch: int = -1
    status_ts_ms: int = -1
    reported: bool = False  # a load report has arrived in the current session
    above_since_ms: int | None = None  # start of the current run of reports at load >= T
    below_since_ms: int | None = None  # start of the current run of reports at load < T - margin
    overloaded: bool = False
    awaiting_first_tick: bool = False  # restored from a previous assignment, not heard from yet


class Scheduler:
    """Decides when to publish a new head assignment from device status and load reports.

    Rules, with T the load threshold and times in the scheduler's clock (milliseconds):
    - A device is offline after a will or "stopped" status, and silent when nothing arrived from it
      for more than `timeout_ms`. Its heads move on the next `tick`, without waiting for
      `min_interval_ms`.
    - A device is overloaded once its load reports have stayed at or above T for
      `overload_window_ms`, and its heads then move. A shorter spike changes nothing, but while a
      device's last load is at or above T it takes no new heads.
    - An overloaded device takes heads again only after its reports have stayed below
      T - `hysteresis_margin` for `recover_window_ms`.
    - A device takes new heads only after its first load report of the current session. New and
      recovered devices join at the next rebalance, when they shorten the makespan by more than
      `balance_tolerance` (see `place_heads`).
    - Other changes than offline or silent devices wait `min_interval_ms` after the last decision.
    - When no feasible assignment exists, the current one stays and `waiting_reason` contains the
      reason, so the caller retries on the next tick.

    `epoch` and `assignment` restore the state of a scheduler that restarted: the devices of the
    restored assignment count as online until `timeout_ms` after the first tick, so that heads do
    not move before the retained status messages arrive.
    """

    def __init__(
        self,
        heads: Mapping[int, HeadCost],
        threshold: float = 0.8,
        *,
        timeout_ms: int = 3000,
        overload_window_ms: int = 2000,
        recover_window_ms: int = 2000,
        hysteresis_margin: float = 0.1,
        min_interval_ms: int = 1000,
        balance_tolerance: float = DEFAULT_BALANCE_TOLERANCE,
        default_bandwidth_bytes_per_s: float = math.inf,
        epoch: int = 0,
        assignment: Mapping[int, str] | None = None,
    ) -> None:
        _check_threshold(threshold)
        _check_heads(heads)
        for name, value in (
            ("timeout_ms", timeout_ms),
            ("overload_window_ms", overload_window_ms),
            ("recover_window_ms", recover_window_ms),
            ("min_interval_ms", min_interval_ms),
            ("epoch", epoch),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if not 0.0 <= hysteresis_margin < threshold:
            raise ValueError(f"hysteresis_margin must be in [0, threshold {threshold}), got {hysteresis_margin!r}")
        if not 0.0 <= balance_tolerance < 1.0:
            raise ValueError(f"balance_tolerance must be in [0, 1), got {balance_tolerance!r}")
        if math.isnan(default_bandwidth_bytes_per_s) or default_bandwidth_bytes_per_s <= 0:
            raise ValueError(f"default_bandwidth_bytes_per_s must be > 0, got {default_bandwidth_bytes_per_s!r}")

        self.threshold = threshold
        self.timeout_ms = timeout_ms
        self.overload_window_ms = overload_window_ms
        self.recover_window_ms = recover_window_ms
        self.hysteresis_margin = hysteresis_margin
        self.min_interval_ms = min_interval_ms
        self.balance_tolerance = balance_tolerance
        self.default_bandwidth_bytes_per_s = default_bandwidth_bytes_per_s
        self.epoch = epoch
        self.waiting_reason: str | None = None

        self._heads = dict(heads)
        self._devices: dict[str, _Tracked] = {}
        self._assignment: dict[int, str] | None = None
        self._last_decision_ms: int | None = None
        if assignment is not None:
            unknown = sorted(set(assignment) - set(heads))
            if unknown:
                raise ValueError(f"restored assignment names unknown head ids {unknown}: heads are {sorted(heads)}")
            self._assignment = dict(assignment)
            for device in sorted(set(assignment.values())):
                self._devices[device] = _Tracked(state=DeviceState(device), awaiting_first_tick=True)

    # Inputs --------------------------------------------------------------------------------------

    @property
    def assignment(self) -> dict[int, str] | None:
        """The assignment of the last decision (or the restored one), None before the first."""
        return None if self._assignment is None else dict(self._assignment)

    @property
    def devices(self) -> dict[str, DeviceState]:
        """The last known state of every device, by id."""
        return {name: tracked.state for name, tracked in self._devices.items()}

    def set_heads(self, heads: Mapping[int, HeadCost]) -> None:
        """Replace the head costs, for example when the ranks or the frame rate changed.

        Heads no longer listed leave the assignment at the next tick, and new heads are placed then.
        """
        _check_heads(heads)
        self._heads = dict(heads)

    def observe_status(
        self, device: str, online: bool, session_epoch: int, ts_ms: int, received_ms: int | None = None
    ) -> bool:
        """Apply a device's status message; return False when it is older than the last one applied.

        A status is older when (session_epoch, ts_ms) is lower than that of the last status applied,
        so a will ("offline") from an earlier session or connection that arrives after a newer
        "online" is ignored. A newer session resets the device's load history, speed and
        overload state. received_ms: the scheduler's clock at receipt (defaults to ts_ms).
        """
        if not isinstance(device, str) or not device:
            raise ValueError(f"device id must be a non-empty str, got {device!r}")
        if session_epoch < 0 or ts_ms < 0:
            raise ValueError(f"session_epoch and ts_ms must be >= 0, got {session_epoch} and {ts_ms}")
        received = ts_ms if received_ms is None else received_ms
        tracked = self._devices.get(device)
        if tracked is None:
            tracked = self._devices[device] = _Tracked(state=DeviceState(device, online=False))
        if (session_epoch, ts_ms) < (tracked.session_epoch, tracked.status_ts_ms):
            return False

        # A restarted process starts with no load history. The first status of a device
        # (session_epoch -1 before it) keeps the load reports that arrived ahead of it.
        if tracked.session_epoch >= 0 and session_epoch > tracked.session_epoch:
            tracked.reported = False
            tracked.above_since_ms = None
            tracked.below_since_ms = None
            tracked.overloaded = False
            tracked.state = replace(tracked.state, speed=None, load=0.0)
        tracked.session_epoch = session_epoch
        tracked.status_ts_ms = ts_ms
        tracked.awaiting_first_tick = False
        tracked.state = replace(tracked.state, online=bool(online), last_seen_ms=received)
        return True

    def observe_status_message(self, status: Status, received_ms: int | None = None) -> bool:
        """Apply a `Status` message of a device: "online" is online, "offline" and "stopped" are not."""
        return self.observe_status(status.id, status.state == "online", status.session_epoch, status.ts_ms, received_ms)

    def observe_load(self, report: LoadReport, received_ms: int | None = None) -> None:
        """Record a device's load report.

        load is the report's busy_ratio. A speed of 0 means not measured yet, and a bandwidth of 0
        means not known, which takes `default_bandwidth_bytes_per_s`. A report does not bring an
        offline device back online, because a late report can arrive after the device's will.
        received_ms: the scheduler's clock at receipt (defaults to the report's ts_ms), so that
        clock skew between hosts does not make a device look silent.
        """
        received = report.ts_ms if received_ms is None else received_ms
        tracked = self._devices.get(report.device)
        if tracked is None:
            tracked = self._devices[report.device] = _Tracked(state=DeviceState(report.device, online=False))

        bandwidth = report.bandwidth_bytes_per_s or self.default_bandwidth_bytes_per_s
        tracked.state = replace(
            tracked.state,
            load=float(report.busy_ratio),
            memory_fraction=float(report.memory_fraction),
            speed=float(report.speed) if report.speed > 0 else tracked.state.speed,
            bandwidth_bytes_per_s=float(bandwidth),
            last_seen_ms=max(tracked.state.last_seen_ms, received),
        )
        tracked.reported = True

        load = tracked.state.load
        if load >= self.threshold:
            tracked.above_since_ms = received if tracked.above_since_ms is None else tracked.above_since_ms
        else:
            tracked.above_since_ms = None
        if load < self.threshold - self.hysteresis_margin:
            tracked.below_since_ms = received if tracked.below_since_ms is None else tracked.below_since_ms
        else:
            tracked.below_since_ms = None

    # Decision ------------------------------------------------------------------------------------

    def tick(self, now_ms: int) -> Decision | None:
        """Return a new assignment when one is due, else None.

        Returns None when the assignment would not change, when a change other than an offline or
        silent device comes sooner than `min_interval_ms` after the last decision, and when no
        feasible assignment exists (then `waiting_reason` is set).
        """
        self._update_device_states(now_ms)
        usable = self._usable(now_ms)
        receivers = {name for name in usable if self._can_receive(name)}
        previous = self._assignment or {}

        urgent, reasons = self._change_reasons(now_ms, usable, previous)
        recent = self._last_decision_ms is not None and now_ms - self._last_decision_ms < self.min_interval_ms
        if recent and not urgent:
            return None

        candidates = [self._devices[name].state for name in sorted(usable)]
        on_usable = {head: device for head, device in previous.items() if head in self._heads and device in usable}
        heads = place_heads(
            self._heads,
            candidates,
            on_usable,
            hold_only=usable - receivers,
            balance_tolerance=self.balance_tolerance,
        )
        if heads is None:
            self.waiting_reason = self._waiting_reason(reasons, usable, receivers)
            return None
        self.waiting_reason = None
        if self._assignment is not None and heads == self._assignment:
            return None

        if not reasons:
            reasons = self._rebalance_reasons(heads, previous)
        self.epoch += 1
        self._assignment = heads
        self._last_decision_ms = now_ms
        return Decision(
            epoch=self.epoch,
            heads=dict(heads),
            reason="; ".join(reasons),
            moved=tuple(moved_heads(previous, heads)),
            devices=tuple(sorted(usable)),
            ts_ms=now_ms,
        )

    def _update_device_states(self, now_ms: int) -> None:
        for tracked in self._devices.values():
            if tracked.awaiting_first_tick:
                tracked.state = replace(tracked.state, last_seen_ms=now_ms)
                tracked.awaiting_first_tick = False
            if (
                not tracked.overloaded
                and tracked.above_since_ms is not None
                and now_ms - tracked.above_since_ms >= self.overload_window_ms
            ):
                tracked.overloaded = True
            if (
                tracked.overloaded
                and tracked.below_since_ms is not None
                and now_ms - tracked.below_since_ms >= self.recover_window_ms
            ):
                tracked.overloaded = False

    def _silent_for(self, tracked: _Tracked, now_ms: int) -> int | None:
        silence = now_ms - tracked.state.last_seen_ms
        return silence if silence > self.timeout_ms else None

    def _usable(self, now_ms: int) -> set[str]:
        """Devices that may keep heads: online, heard from within timeout_ms and not overloaded."""
        return {
            name
            for name, tracked in self._devices.items()
            if tracked.state.online and self._silent_for(tracked, now_ms) is None and not tracked.overloaded
        }

    def _can_receive(self, name: str) -> bool:
        tracked = self._devices[name]
        return tracked.reported and tracked.state.load < self.threshold

    def _change_reasons(self, now_ms: int, usable: set[str], previous: dict[int, str]) -> tuple[bool, list[str]]:
        """Return whether the change is urgent, and the reasons that force one."""
        urgent = False
        reasons: list[str] = []
        if self._assignment is None:
            reasons.append("initial assignment")

        for device in sorted(set(previous.values()) - usable):
            tracked = self._devices.get(device)
            silence = None if tracked is None else self._silent_for(tracked, now_ms)
            if tracked is None or not tracked.state.online:
                reasons.append(f"device {device} offline")
                urgent = True
            elif silence is not None:
                reasons.append(f"device {device} silent for {silence} ms")
                urgent = True
            else:
                window = self.overload_window_ms
                reasons.append(f"device {device} overloaded (load >= {self.threshold} for {window} ms)")

        unassigned = sorted(set(self._heads) - set(previous))
        if unassigned and self._assignment is not None:
            reasons.append(f"heads {_join(unassigned)} unassigned")
            urgent = True
        removed = sorted(set(previous) - set(self._heads))
        if removed:
            reasons.append(f"heads {_join(removed)} removed")

        still_listed = {head: device for head, device in previous.items() if head in self._heads}
        traffic = traffic_per_device(self._heads, still_listed)
        for device in sorted(traffic):
            if device not in usable:
                continue
            bandwidth = self._devices[device].state.bandwidth_bytes_per_s
            if traffic[device] > bandwidth * (1 + BANDWIDTH_SLACK):
                reasons.append(f"bandwidth exceeded on device {device} ({traffic[device]:.0f} > {bandwidth:.0f} B/s)")
        return urgent, reasons

    def _rebalance_reasons(self, heads: dict[int, str], previous: dict[int, str]) -> list[str]:
        joined = sorted(set(heads.values()) - set(previous.values()))
        if joined:
            return [f"device {device} joined" for device in joined]
        return ["rebalance by device speed"]

    def _waiting_reason(self, reasons: list[str], usable: set[str], receivers: set[str]) -> str:
        cause = "no feasible assignment"
        if not receivers:
            cause += f": no device is online with load below {self.threshold}"
        else:
            cause += f": the bandwidth of devices {_join(sorted(usable))} cannot carry every head"
        return "; ".join(reasons + [cause])


def _join(values: Sequence[object]) -> str:
    return ", ".join(str(value) for value in values)


def _check_threshold(threshold: float) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be a load in (0, 1], got {threshold!r}")


def _check_heads(heads: Mapping[int, HeadCost]) -> None:
    for head, head_cost in heads.items():
        if isinstance(head, bool) or not isinstance(head, int) or head < 0:
            raise ValueError(f"head id {head!r} is invalid: head ids must be integers >= 0")
        if not isinstance(head_cost, HeadCost):
            raise ValueError(f"head {head}: expected a HeadCost, got {type(head_cost).__name__}")


def _check_devices(devices: Sequence[DeviceState]) -> None:
    names = [device.device for device in devices]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"duplicate device ids {duplicates}: list each device once")
