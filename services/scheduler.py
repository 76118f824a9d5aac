"""`sdrm scheduler`: assigns the model's attention heads to the online devices.

The scheduler follows every device's retained status (online, offline as the will, stopped) and
its periodic load reports, feeds them to `sdrm.schedule.Scheduler`, and calls its `tick` every
`--tick-ms` for a decision. A new decision is published as the retained Assignment with an epoch one higher
than the last. Heads move at once when a device goes offline or falls silent for `--timeout-ms`,
and when a device's load (its busy ratio) stays at or above `--threshold` for
`--overload-window-ms`. An overloaded device takes heads again only after its load stayed below
threshold - `--hysteresis` for `--recover-window-ms`, so the assignment does not flap.

On start the scheduler reads the retained assignment, if any, and continues its epoch, so a
restart never publishes an epoch lower than the one the receivers already applied.
"""

from __future__ import annotations

import argparse
import math
import threading
import time

import structlog

from sdrm import messages
from sdrm.schedule import HeadCost, Scheduler
from services import config as cfg
from services.bus import Incoming, now_ms
from services.common import StartupError, parse_topic_message, run_main, service_bus
from services.metrics import ServiceMetrics
from services.topics import load_topics, validate_id

log = structlog.get_logger("sdrm.scheduler")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdrm scheduler",
        description="Assign attention heads to the online devices from their status and load reports.",
    )
    cfg.add_common_options(parser)
    cfg.add_metrics_options(parser)
    parser.add_argument("--id", default="scheduler", help="instance id (default scheduler)")
    parser.add_argument(
        "--threshold", type=cfg.fraction, default=0.8, help="load (busy ratio) at which a device is overloaded, in (0, 1] (default 0.8)"
    )
    parser.add_argument(
        "--hysteresis", type=float, default=0.1, help="an overloaded device recovers below threshold minus this (default 0.1)"
    )

    parser.add_argument(
        "--overload-window-ms", type=int, default=2000, help="how long the load must stay above the threshold, in ms (default 2000)"
    )
    parser.add_argument(
        "--recover-window-ms", type=int, default=3000, help="how long the load must stay below the recovery level, in ms (default 3000)"
    )
    parser.add_argument(
        "--timeout-ms", type=int, default=3000, help="a device without status or load report for this long is silent, in ms (default 3000)"
    )
    parser.add_argument(
        "--min-interval-ms", type=int, default=1000, help="minimum time between rebalancing decisions, in ms (default 1000)"
    )

    parser.add_argument(
        "--balance-tolerance",
        type=float,
        default=0.25,
        help="rebalance by speed only when it shortens the slowest device's time per frame by more than this fraction (default 0.25)",
    )
    parser.add_argument("--tick-ms", type=cfg.positive_int, default=200, help="decision period in milliseconds (default 200)")

    parser.add_argument(
        "--frame-rate", type=cfg.positive_float, default=5.0, help="frames per second per camera, for the head traffic (default 5)"
    )
    parser.add_argument(
        "--tiles", type=cfg.positive_int, default=81, help="tiles per frame, for the head traffic (default 81: a 640 x 640 board)"
    )
    parser.add_argument(
        "--restore-wait-ms",
        type=int,
        default=1000,
        help="how long to wait for the retained assignment at start, in milliseconds (default 1000)",
    )
    return parser


def head_costs(model_dir, tiles: int, frame_rate: float) -> dict[int, HeadCost]:
    """Return every head's traffic at full rank (the upper bound) from the checkpoint's architecture."""
    from sdrm.checkpoint import load_manifest
    from sdrm.model import ModelConfig

    try:
        manifest = load_manifest(model_dir)
    except (FileNotFoundError, ValueError) as error:
        raise StartupError(f"cannot read the model manifest in {model_dir}: {error}") from None
    architecture = {k: v for k, v in manifest["architecture"].items() if k != "kind"}
    config = ModelConfig.from_dict(architecture)
    return {
        head: HeadCost.from_shape(
            tiles, config.tokens, config.head_dim, config.head_dim, frame_rate, dtype_bytes=4, dense=config.phi is None
        )
        for head in range(config.heads)
    }


class SchedulerService:
    def __init__(self, config: argparse.Namespace, stop: threading.Event) -> None:
        self.config = config
        self.stop = stop
        self.topics = load_topics()
        validate_id("line", config.line)
        validate_id("service", config.id)
        self.costs = head_costs(config.model, config.tiles, config.frame_rate)
        self._make_scheduler(epoch=0, assignment=None)  # raises ValueError for invalid option values now
        self.scheduler: Scheduler | None = None
        self._lock = threading.Lock()
        self._restored: messages.Assignment | None = None
        self._restored_event = threading.Event()
        self._last_waiting: str | None = None
        # Status messages that arrive before the scheduler exists (while the retained assignment is read).
        self._early_status: list[tuple[messages.Status, int]] = []

        self.bus = service_bus(
            config,
            self.topics,
            service="scheduler",
            instance=config.id,
            status_ids={"service": config.id},
            info={"threshold": config.threshold, "heads": len(self.costs)},
        )
        self.counters = self.bus.counters
        self._assignment_payload: bytes | None = None  # the last published assignment, republished on reconnect
        self.metrics = ServiceMetrics(self.bus)
        self.log = log.bind(line=config.line, scheduler=config.id)

    # Network thread ------------------------------------------------------------------------------

    def _on_assignment(self, incoming: Incoming) -> None:
        if not incoming.payload or self._restored_event.is_set():
            return
        try:
            self._restored = messages.parse(messages.Assignment, incoming.payload)
        except messages.MessageError as error:
            self.bus.report_error("assignment_invalid", str(error), topic=incoming.topic)
            return
        self._assignment_payload = bytes(incoming.payload)
        self._restored_event.set()

    def _on_status(self, incoming: Incoming) -> None:
        if not incoming.payload:
            return
        status = parse_topic_message(incoming, messages.Status, "id", self.bus, "status_invalid", topic_id="device")
        if status is None:
            return
        device = status.id
        with self._lock:
            if self.scheduler is None:
                self._early_status.append((status, incoming.received_ms))
                return
            applied = self.scheduler.observe_status_message(status, received_ms=incoming.received_ms)
        if not applied:
            self.counters.add("status_stale")
        self.log.info(
            "device_status", device=device, state=status.state, session_epoch=status.session_epoch, applied=applied
        )

    def _on_load(self, incoming: Incoming) -> None:
        report = parse_topic_message(incoming, messages.LoadReport, "device", self.bus, "load_invalid")
        if report is None:
            return
        with self._lock:
            if self.scheduler is not None:
                self.scheduler.observe_load(report, received_ms=incoming.received_ms)

    def _republish_assignment(self) -> None:
        payload = self._assignment_payload
        if payload is not None:
            self.bus.publish("assignment", payload)
            self.log.info("assignment_republished", bytes=len(payload))

    # Main loop -----------------------------------------------------------------------------------

    def run(self) -> int:
        self.bus.subscribe("assignment", self._on_assignment)
        self.bus.on_connect(self._republish_assignment)
        self.bus.subscribe("device_status", self._on_status)
        self.bus.subscribe("load", self._on_load)
        self.bus.start()
        try:
            # Wait for the first connection in short steps, so that SIGTERM is honoured meanwhile.
            deadline = time.monotonic() + 10.0
            while not self.stop.is_set() and time.monotonic() < deadline and not self.bus.wait_connected(0.2):
                pass
            self._restored_event.wait(self.config.restore_wait_ms / 1000)
            self._restored_event.set()
            self._create_scheduler()
            while not self.stop.wait(self.config.tick_ms / 1000):
                self._tick()
        finally:
            self.bus.close(info={"counters": self.counters.snapshot()})
            self.log.info("scheduler_stopped", counters=self.counters.snapshot())
        return 0

    def _create_scheduler(self) -> None:
        restored = self._restored
        with self._lock:
            assignment = None
            epoch = 0
            if restored is not None:
                epoch = restored.epoch
                assignment = {head: device for head, device in restored.heads.items() if head in self.costs}
            self.scheduler = self._make_scheduler(epoch, assignment or None)
            for status, received_ms in self._early_status:
                self.scheduler.observe_status_message(status, received_ms=received_ms)
            self._early_status.clear()
        self.bus.update_info(epoch=epoch)
        self.log.info("scheduler_started", broker=self.config.broker, restored_epoch=epoch, threshold=self.config.threshold)

    def _make_scheduler(self, epoch: int, assignment: dict[int, str] | None) -> Scheduler:
        return Scheduler(
            self.costs,
            self.config.threshold,
            timeout_ms=self.config.timeout_ms,
            overload_window_ms=self.config.overload_window_ms,
            recover_window_ms=self.config.recover_window_ms,
            hysteresis_margin=self.config.hysteresis,
            min_interval_ms=self.config.min_interval_ms,
            balance_tolerance=self.config.balance_tolerance,
            default_bandwidth_bytes_per_s=math.inf,
            epoch=epoch,
            assignment=assignment,
        )

    def _tick(self) -> None:
        with self._lock:
            decision = self.scheduler.tick(now_ms())
            waiting = self.scheduler.waiting_reason
        if waiting != self._last_waiting:
            if waiting:
                # Before the first assignment, waiting for the devices' first load reports is normal.
                level = self.log.warning if self.scheduler.assignment is not None else self.log.info
                level("assignment_waiting", reason=waiting)
            self._last_waiting = waiting
        if decision is None:
            return
        assignment = decision.to_assignment()
        self._assignment_payload = messages.to_json(assignment)
        self.bus.publish("assignment", self._assignment_payload)
        self.bus.update_info(epoch=decision.epoch)
        self.counters.add("assignments_published")
        self.log.info(
            "assignment_published",
            epoch=decision.epoch,
            heads=decision.heads,
            moved=list(decision.moved),
            devices=list(decision.devices),
            reason=decision.reason,
        )


def main(argv: list[str] | None = None) -> int:
    return run_main("scheduler", build_parser, SchedulerService, argv)


if __name__ == "__main__":
    raise SystemExit(main())
