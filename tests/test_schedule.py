"""Head-to-device assignment: the pure policy and the stateful scheduler."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdrm.messages import LoadReport, Status
from sdrm.schedule import (
    Decision,
    DeviceState,
    HeadCost,
    Scheduler,
    assign_heads,
    makespan,
    moved_heads,
    place_heads,
    traffic_per_device,
)

THRESHOLD = 0.8


def head_costs(count: int, block: float = 1000.0, partial: float = 3000.0, rate: float = 10.0) -> dict[int, HeadCost]:
    """Equal heads of (block + partial) * rate bytes per second each (40 kB/s by default)."""
    return {head: HeadCost(block_bytes=block, partial_bytes=partial, frame_rate=rate) for head in range(count)}


def report(device: str, ts_ms: int, busy: float = 0.2, speed: float = 100.0, bandwidth: float = 0.0) -> LoadReport:
    return LoadReport(
        device=device,
        ts_ms=ts_ms,
        queue_depth=0,
        busy_ratio=busy,
        memory_mb=512.0,
        memory_fraction=0.3,
        block_size=64,
        frames_done=0,
        speed=speed,
        bandwidth_bytes_per_s=bandwidth,
    )


def check_assignment(heads, devices, threshold, result) -> None:
    """Assert that every head is on exactly one eligible device and every bandwidth holds."""
    by_name = {device.device: device for device in devices}
    assert sorted(result) == sorted(heads)
    for head, name in result.items():
        assert by_name[name].online, f"head {head} on offline device {name}"
        assert by_name[name].load < threshold, f"head {head} on device {name} at load {by_name[name].load}"
    for name, traffic in traffic_per_device(heads, result).items():
        assert traffic <= by_name[name].bandwidth_bytes_per_s * (1 + 1e-9), f"device {name} over bandwidth"


# assign_heads ------------------------------------------------------------------------------------


def test_assign_heads_assigns_each_head_once():
    heads = head_costs(6)
    devices = [DeviceState("a"), DeviceState("b"), DeviceState("c")]

    result = assign_heads(heads, devices, THRESHOLD)

    check_assignment(heads, devices, THRESHOLD, result)
    assert Counter(result.values()) == {"a": 2, "b": 2, "c": 2}


def test_assign_heads_respects_bandwidth():
    heads = head_costs(6)  # 40 kB/s per head
    devices = [DeviceState("a", bandwidth_bytes_per_s=80_000.0), DeviceState("b", bandwidth_bytes_per_s=1e6)]

    result = assign_heads(heads, devices, THRESHOLD)

    check_assignment(heads, devices, THRESHOLD, result)
    assert Counter(result.values()) == {"a": 2, "b": 4}


def test_assign_heads_bandwidth_too_small():
    heads = head_costs(6)
    devices = [DeviceState("a", bandwidth_bytes_per_s=100_000.0), DeviceState("b", bandwidth_bytes_per_s=100_000.0)]

    assert assign_heads(heads, devices, THRESHOLD) is None


def test_assign_heads_bandwidth_zero_takes_free_heads_only():
    heads = {0: HeadCost(1000.0, 3000.0, 0.0), 1: HeadCost(1000.0, 3000.0, 10.0)}
    devices = [DeviceState("a", bandwidth_bytes_per_s=0.0)]

    assert assign_heads({0: heads[0]}, devices, THRESHOLD) == {0: "a"}
    assert assign_heads(heads, devices, THRESHOLD) is None


def test_assign_heads_faster_device_gets_more():
    heads = head_costs(8)
    devices = [DeviceState("fast", speed=300.0), DeviceState("slow", speed=100.0)]

    result = assign_heads(heads, devices, THRESHOLD)

    assert Counter(result.values()) == {"fast": 6, "slow": 2}


def test_assign_heads_unknown_speed_takes_median():
    heads = head_costs(9)
    devices = [DeviceState("a", speed=300.0), DeviceState("b", speed=300.0), DeviceState("new")]

    result = assign_heads(heads, devices, THRESHOLD)

    assert Counter(result.values()) == {"a": 3, "b": 3, "new": 3}


def test_assign_heads_skips_overloaded_and_offline():
    heads = head_costs(4)
    devices = [
        DeviceState("busy", load=0.85),
        DeviceState("at-threshold", load=THRESHOLD),
        DeviceState("gone", online=False),
        DeviceState("free", load=0.4),
    ]

    result = assign_heads(heads, devices, THRESHOLD)

    assert set(result.values()) == {"free"}


def test_assign_heads_all_overloaded():
    heads = head_costs(4)
    devices = [DeviceState("a", load=0.9), DeviceState("b", load=0.95), DeviceState("c", online=False)]

    assert assign_heads(heads, devices, THRESHOLD) is None
    assert assign_heads(heads, [], THRESHOLD) is None


def test_assign_heads_keeps_balanced_current():
    heads = head_costs(6)
    devices = [DeviceState("a"), DeviceState("b"), DeviceState("c")]
    current = {0: "c", 1: "b", 2: "a", 3: "c", 4: "b", 5: "a"}

    assert assign_heads(heads, devices, THRESHOLD, current) == current


def test_assign_heads_moves_few_for_new_device():
    heads = head_costs(6)
    current = {head: "a" for head in heads}
    devices = [DeviceState("a"), DeviceState("b")]

    result = assign_heads(heads, devices, THRESHOLD, current)

    assert Counter(result.values()) == {"a": 3, "b": 3}
    assert len(moved_heads(current, result)) == 3


def test_assign_heads_moves_only_lost_heads():
    heads = head_costs(6)
    current = {0: "a", 1: "b", 2: "c", 3: "a", 4: "b", 5: "c"}
    devices = [DeviceState("a"), DeviceState("b"), DeviceState("c", online=False)]

    result = assign_heads(heads, devices, THRESHOLD, current)

    assert moved_heads(current, result) == [2, 5]
    assert Counter(result.values()) == {"a": 3, "b": 3}


def test_assign_heads_balance_tolerance_prevents_flapping():
    # 5 heads on speeds 100 and 103 heads/s: 3 + 2 gives 0.0300 s, 2 + 3 gives 0.0291 s, 3 % apart.
    heads = head_costs(5)
    devices = [DeviceState("a", speed=100.0), DeviceState("b", speed=103.0)]
    current = {0: "a", 1: "a", 2: "a", 3: "b", 4: "b"}

    assert assign_heads(heads, devices, THRESHOLD, current) == current
    strict = assign_heads(heads, devices, THRESHOLD, current, balance_tolerance=0.0)
    assert Counter(strict.values()) == {"a": 2, "b": 3}


def test_assign_heads_search_finds_tight_packing():
    # Bandwidths 6 and 6 for costs 3, 3, 2, 2, 2: balancing by count puts 3 + 2 on each device and
    # leaves a 2 with room 1 on both; only {3, 3} and {2, 2, 2} fit.
    sizes = [3.0, 3.0, 2.0, 2.0, 2.0]
    heads = {head: HeadCost(block_bytes=size, partial_bytes=0.0, frame_rate=1.0) for head, size in enumerate(sizes)}
    devices = [DeviceState("a", bandwidth_bytes_per_s=6.0), DeviceState("b", bandwidth_bytes_per_s=6.0)]

    result = assign_heads(heads, devices, THRESHOLD)

    check_assignment(heads, devices, THRESHOLD, result)
    assert sorted(traffic_per_device(heads, result).values()) == [6.0, 6.0]


def test_place_heads_hold_only_takes_no_new_heads():
    heads = head_costs(4)
    devices = [DeviceState("spiking", load=0.9), DeviceState("calm")]
    current = {0: "spiking", 1: "spiking"}

    result = place_heads(heads, devices, current, hold_only={"spiking"})

    assert result == {0: "spiking", 1: "spiking", 2: "calm", 3: "calm"}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: assign_heads(head_costs(2), [DeviceState("a")], 0.0), "threshold"),
        (lambda: assign_heads(head_costs(2), [DeviceState("a")], 1.5), "threshold"),
        (lambda: DeviceState("a", bandwidth_bytes_per_s=-1.0), "bandwidth"),
        (lambda: DeviceState("a", load=1.2), "load"),
        (lambda: DeviceState("a", speed=0.0), "speed"),
        (lambda: DeviceState(""), "device id"),
        (lambda: HeadCost(-1.0, 0.0, 10.0), "block_bytes"),
        (lambda: HeadCost(1.0, 0.0, math.nan), "frame_rate"),
        (lambda: assign_heads(head_costs(2), [DeviceState("a")], THRESHOLD, {5: "a"}), "unknown head ids"),
        (lambda: assign_heads({-1: HeadCost(1, 1, 1)}, [DeviceState("a")], THRESHOLD), "head id"),
        (lambda: assign_heads(head_costs(2), [DeviceState("a"), DeviceState("a")], THRESHOLD), "duplicate"),
        (lambda: place_heads(head_costs(2), [DeviceState("a")], balance_tolerance=1.0), "balance_tolerance"),
    ],
)
def test_assign_heads_rejects_invalid_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_assign_heads_no_heads():
    assert assign_heads({}, [DeviceState("a")], THRESHOLD) == {}


device_strategy = st.builds(
    lambda online, load, speed, bandwidth: (online, load, speed, bandwidth),
    st.booleans(),
    st.floats(0.0, 1.0),
    st.one_of(st.none(), st.floats(1.0, 500.0)),
    st.one_of(st.just(math.inf), st.floats(0.0, 400_000.0)),
)


@settings(max_examples=150, deadline=None)
@given(
    costs=st.lists(st.tuples(st.floats(0.0, 20_000.0), st.floats(0.0, 20_000.0), st.floats(0.0, 30.0)), max_size=10),
    specs=st.lists(device_strategy, min_size=1, max_size=5),
    threshold=st.floats(0.05, 1.0),
    current_seed=st.lists(st.integers(0, 5), max_size=10),
)
def test_assign_heads_property_feasible(costs, specs, threshold, current_seed):
    heads = {head: HeadCost(*values) for head, values in enumerate(costs)}
    devices = [
        DeviceState(f"d{index}", online=online, load=load, speed=speed, bandwidth_bytes_per_s=bandwidth)
        for index, (online, load, speed, bandwidth) in enumerate(specs)
    ]
    current = {head: f"d{choice}" for head, choice in zip(heads, current_seed)}

    result = assign_heads(heads, devices, threshold, current)

    eligible = [device for device in devices if device.online and device.load < threshold]
    if result is None:
        # Unlimited bandwidth on every eligible device always admits an assignment.
        assert not (heads and eligible and all(math.isinf(d.bandwidth_bytes_per_s) for d in eligible))
        return
    check_assignment(heads, devices, threshold, result)


@settings(max_examples=100, deadline=None)
@given(count=st.integers(1, 9), speeds=st.lists(st.floats(1.0, 50.0), min_size=1, max_size=4))
def test_place_heads_property_minimum_makespan(count, speeds):
    heads = head_costs(count)
    devices = [DeviceState(f"d{index}", speed=speed) for index, speed in enumerate(speeds)]
    by_name = {device.device: device.speed for device in devices}

    result = place_heads(heads, devices, balance_tolerance=0.0)

    best = min(
        max((n / speed for n, speed in zip(split, speeds) if n), default=0.0)
        for split in itertools.product(range(count + 1), repeat=len(speeds))
        if sum(split) == count
    )
    assert makespan(result, by_name) == pytest.approx(best)


# Scheduler ---------------------------------------------------------------------------------------


def online(scheduler: Scheduler, names, now: int, session: int = 1, speed: float = 100.0, busy: float = 0.2) -> None:
    for name in names:
        scheduler.observe_status(name, True, session_epoch=session, ts_ms=now)
        scheduler.observe_load(report(name, now, busy=busy, speed=speed))


def run(scheduler: Scheduler, start: int, end: int, loads, step: int = 250) -> list[Decision]:
    """Send a load report of every device in `loads` (a load, or a function of time) and tick, every `step` ms."""
    decisions = []
    for now in range(start, end + 1, step):
        for name, load in loads.items():
            busy = load(now) if callable(load) else load
            scheduler.observe_load(report(name, now, busy=busy))
        decision = scheduler.tick(now)
        if decision is not None:
            decisions.append(decision)
    return decisions


def test_scheduler_initial_assignment():
    scheduler = Scheduler(head_costs(6), THRESHOLD)
    online(scheduler, ["a", "b"], now=0)

    decision = scheduler.tick(0)

    assert decision.epoch == 1
    assert Counter(decision.heads.values()) == {"a": 3, "b": 3}
    assert decision.reason == "initial assignment"
    assert decision.moved == tuple(range(6))
    assert decision.devices == ("a", "b")
    assert scheduler.assignment == decision.heads


def test_scheduler_stable_assignment_keeps_epoch():
    scheduler = Scheduler(head_costs(6), THRESHOLD)
    online(scheduler, ["a", "b"], now=0)
    scheduler.tick(0)

    decisions = run(scheduler, 250, 10_000, {"a": 0.3, "b": 0.5})

    assert decisions == []
    assert scheduler.epoch == 1


def test_scheduler_offline_device_moves_heads_at_once():
    scheduler = Scheduler(head_costs(6), THRESHOLD)
    online(scheduler, ["a", "b"], now=0)
    first = scheduler.tick(0)
    on_a = sorted(head for head, device in first.heads.items() if device == "a")

    scheduler.observe_status("a", False, session_epoch=1, ts_ms=100)
    decision = scheduler.tick(100)  # within min_interval_ms of the first decision

    assert decision.epoch == 2
    assert set(decision.heads.values()) == {"b"}
    assert list(decision.moved) == on_a
    assert "device a offline" in decision.reason


def test_scheduler_silent_device_moves_heads():
    scheduler = Scheduler(head_costs(6), THRESHOLD)
    online(scheduler, ["a", "b"], now=0)
    scheduler.tick(0)

    decisions = run(scheduler, 250, 4000, {"b": 0.3})

    assert len(decisions) == 1
    assert decisions[0].ts_ms == 3250  # first tick more than timeout_ms after a's last message
    assert set(decisions[0].heads.values()) == {"b"}
    assert "device a silent for 3250 ms" in decisions[0].reason


def test_scheduler_sustained_overload_moves_heads():
    scheduler = Scheduler(head_costs(6), THRESHOLD)
    online(scheduler, ["a", "b"], now=0)
    scheduler.tick(0)

    decisions = run(scheduler, 250, 5000, {"a": lambda now: 0.95 if now >= 1000 else 0.3, "b": 0.3})

    assert len(decisions) == 1
    assert decisions[0].ts_ms == 3000  # above the threshold from 1000 ms for overload_window_ms
    assert set(decisions[0].heads.values()) == {"b"}
    assert "device a overloaded" in decisions[0].reason


def test_scheduler_brief_spike_keeps_heads():
    scheduler = Scheduler(head_costs(6), THRESHOLD)
    online(scheduler, ["a", "b"], now=0)
    scheduler.tick(0)

    decisions = run(scheduler, 250, 6000, {"a": lambda now: 0.95 if 1000 <= now < 2500 else 0.3, "b": 0.3})

    assert decisions == []
    assert scheduler.epoch == 1


def test_scheduler_recovered_device_waits_below_margin():
    scheduler = Scheduler(head_costs(6), THRESHOLD, hysteresis_margin=0.1, recover_window_ms=2000)
    online(scheduler, ["a", "b"], now=0)
    scheduler.tick(0)

    def load_a(now: int) -> float:
        if now < 3000:
            return 0.95  # above T from the report at 250 ms, so heads move at 2250 ms
        if now < 8000:
            return 0.75  # below T = 0.8 but above T - margin = 0.7: still not usable
        return 0.5  # below T - margin from 8000 ms: usable again at 10000 ms

    decisions = run(scheduler, 250, 12_000, {"a": load_a, "b": 0.3})

    assert [decision.ts_ms for decision in decisions] == [2250, 10_000]
    assert set(decisions[0].heads.values()) == {"b"}
    assert Counter(decisions[1].heads.values()) == {"a": 3, "b": 3}
    assert decisions[1].reason == "device a joined"


def test_scheduler_ignores_stale_will():
    scheduler = Scheduler(head_costs(4), THRESHOLD)
    online(scheduler, ["a", "b"], now=0, session=1)
    scheduler.tick(0)
    scheduler.observe_status("a", True, session_epoch=2, ts_ms=500)  # a restarted and is back

    applied = scheduler.observe_status("a", False, session_epoch=1, ts_ms=10)  # the old session's will

    assert applied is False
    assert scheduler.devices["a"].online
    assert run(scheduler, 500, 2500, {"a": 0.3, "b": 0.3}) == []


def test_scheduler_applies_will_of_current_session():
    scheduler = Scheduler(head_costs(4), THRESHOLD)
    online(scheduler, ["a", "b"], now=100, session=7)
    scheduler.tick(100)

    will = Status(state="offline", service="device", id="a", session_epoch=7, ts_ms=100)
    assert scheduler.observe_status_message(will, received_ms=900) is True
    decision = scheduler.tick(900)

    assert set(decision.heads.values()) == {"b"}


def test_scheduler_new_device_joins_on_rebalance():
    scheduler = Scheduler(head_costs(6), THRESHOLD, min_interval_ms=1000)
    online(scheduler, ["a"], now=0)
    assert set(scheduler.tick(0).heads.values()) == {"a"}

    online(scheduler, ["c"], now=200)
    assert scheduler.tick(500) is None  # sooner than min_interval_ms
    decision = scheduler.tick(1000)

    assert decision.epoch == 2
    assert Counter(decision.heads.values()) == {"a": 3, "c": 3}
    assert len(decision.moved) == 3
    assert decision.reason == "device c joined"


def test_scheduler_device_without_load_report_takes_no_heads():
    scheduler = Scheduler(head_costs(4), THRESHOLD)
    online(scheduler, ["a"], now=0)
    scheduler.observe_status("quiet", True, session_epoch=1, ts_ms=0)

    decision = scheduler.tick(0)

    assert set(decision.heads.values()) == {"a"}
    assert decision.devices == ("a", "quiet")


def test_scheduler_all_overloaded_waits():
    scheduler = Scheduler(head_costs(4), THRESHOLD)
    online(scheduler, ["a", "b"], now=0)
    first = scheduler.tick(0)

    decisions = run(scheduler, 250, 4000, {"a": 0.95, "b": 0.95})

    assert decisions == []
    assert scheduler.assignment == first.heads
    assert "no feasible assignment" in scheduler.waiting_reason
    assert "device a overloaded" in scheduler.waiting_reason

    decisions = run(scheduler, 4250, 8000, {"a": 0.95, "b": 0.2})
    assert len(decisions) == 1
    assert set(decisions[0].heads.values()) == {"b"}
    assert scheduler.waiting_reason is None


def test_scheduler_offline_without_alternative_waits():
    scheduler = Scheduler(head_costs(2), THRESHOLD)
    online(scheduler, ["a"], now=0)
    scheduler.tick(0)
    scheduler.observe_status("a", False, session_epoch=1, ts_ms=10)

    assert scheduler.tick(20) is None
    assert "device a offline" in scheduler.waiting_reason

    online(scheduler, ["b"], now=30)
    decision = scheduler.tick(40)
    assert set(decision.heads.values()) == {"b"}


def test_scheduler_bandwidth_drop_moves_heads():
    scheduler = Scheduler(head_costs(4), THRESHOLD)  # 40 kB/s per head
    online(scheduler, ["a", "b"], now=0)
    scheduler.tick(0)

    scheduler.observe_load(report("a", 1500, bandwidth=50_000.0))
    scheduler.observe_load(report("b", 1500))
    decision = scheduler.tick(1500)

    assert Counter(decision.heads.values()) == {"a": 1, "b": 3}
    assert len(decision.moved) == 1
    assert "bandwidth exceeded on device a" in decision.reason


def test_scheduler_restored_assignment_waits_for_devices():
    restored = {0: "a", 1: "a", 2: "b", 3: "b"}
    scheduler = Scheduler(head_costs(4), THRESHOLD, epoch=7, assignment=restored)

    assert scheduler.tick(0) is None  # devices not heard from yet keep their heads
    online(scheduler, ["b"], now=500)
    decisions = run(scheduler, 500, 3500, {"b": 0.3})

    assert len(decisions) == 1
    assert decisions[0].epoch == 8
    assert decisions[0].ts_ms == 3250  # a is silent timeout_ms after the first tick
    assert set(decisions[0].heads.values()) == {"b"}


def test_scheduler_new_heads_placed_at_once():
    scheduler = Scheduler(head_costs(2), THRESHOLD)
    online(scheduler, ["a", "b"], now=0)
    scheduler.tick(0)

    scheduler.set_heads(head_costs(4))
    decision = scheduler.tick(10)

    assert sorted(decision.heads) == [0, 1, 2, 3]
    assert decision.moved == (2, 3)
    assert "heads 2, 3 unassigned" in decision.reason


def test_decision_to_assignment_message():
    scheduler = Scheduler(head_costs(3), THRESHOLD)
    online(scheduler, ["a", "b"], now=0)
    decision = scheduler.tick(0)

    message = decision.to_assignment()

    assert message.epoch == decision.epoch
    assert message.heads == decision.heads
    assert message.devices == ["a", "b"]
    assert message.reason == "initial assignment"


@pytest.mark.parametrize(
    ("settings_", "message"),
    [
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 0.5, "hysteresis_margin": 0.5}, "hysteresis_margin"),
        ({"timeout_ms": -1}, "timeout_ms"),
        ({"balance_tolerance": -0.1}, "balance_tolerance"),
        ({"default_bandwidth_bytes_per_s": 0.0}, "default_bandwidth"),
        ({"assignment": {9: "a"}}, "unknown head ids"),
    ],
)
def test_scheduler_rejects_invalid_settings(settings_, message):
    with pytest.raises(ValueError, match=message):
        Scheduler(head_costs(2), **settings_)


def test_head_cost_from_shape_matches_cost_model():
    head = HeadCost.from_shape(batch=1, tokens=64, head_dim=16, rank=4, frame_rate=5.0)

    # Block: (64*4 + 4 + 16*4) float16 values + 19-byte record; partial adds Z (64*16 values).
    assert head.block_bytes == 2 * (256 + 4 + 64) + 19
    assert head.partial_bytes == 2 * (256 + 4 + 64 + 1024) + 19
    assert head.bytes_per_s == pytest.approx(5.0 * (head.block_bytes + head.partial_bytes))
