"""`sdrm health`: a container health check that reads a service instance's retained status.

Every service publishes a retained Status on its status topic from topics.yaml: `online` on every
connect, `stopped` on a clean exit and `offline` as its last will. This command reads the same
options and SDRM_* environment variables as the services, so in a container it uses that
container's broker URL, line and credentials. It subscribes to the status topic of one instance,
prints one line and exits with

- 0 when the retained status is `online`,
- 1 when it is `offline` or `stopped`, names another instance, is invalid, or does not arrive
  within `--timeout-s`, or when the broker cannot be reached in that time,
- 2 when an option is invalid.

It needs no extra server in the container. It publishes nothing and sets no will.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from dataclasses import dataclass

from sdrm import messages
from services import config as cfg
from services.bus import Bus, Incoming
from services.common import service_bus
from services.topics import TopicMap, load_topics, validate_id

# The topics.yaml entry that each service kind publishes its liveness on.
STATUS_TOPICS = {
    "scheduler": "service_status",
    "compressor": "service_status",
    "aggregator": "service_status",
    "device": "device_status",
    "ingest": "camera_status",
}

EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1


@dataclass(frozen=True)
class HealthResult:
    """Outcome of one check: whether the instance is online, and the line to print."""

    healthy: bool
    message: str


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdrm health",
        description=(
            "Exit 0 when the retained status of one service instance is online, 1 otherwise. "
            "For container health checks."
        ),
    )
    cfg.add_common_options(parser, model=False)
    parser.add_argument(
        "--service", required=True, choices=sorted(STATUS_TOPICS), help="service kind of the instance to check"
    )
    parser.add_argument(
        "--id",
        required=True,
        help="instance id: the --device of a device, the --camera of an ingest, the --id of the other services",
    )
    parser.add_argument(
        "--timeout-s",
        type=cfg.positive_float,
        default=5.0,
        help="maximum wait for the broker connection and the retained status, in seconds (default 5)",
    )
    # Only errors by default, because a health check's output is its one result line.
    parser.set_defaults(log_level="error")
    for action in parser._actions:  # noqa: SLF001 - argparse has no public lookup of an action
        if action.dest == "log_level":
            action.help = "lowest log level written to stderr (default error)"
    return parser


def status_subscription(topics: TopicMap, service: str, instance: str) -> tuple[str, dict[str, str]]:
    """Return the status topic name of a service kind and its ids other than the line.

    Raises ValueError when the instance id is not a valid topic level.
    """
    name = STATUS_TOPICS[service]
    placeholders = [key for key in topics.spec(name).placeholders if key != "line"]
    if len(placeholders) != 1:
        raise ValueError(f"topic {name!r} must have one id placeholder besides {{line}}, found {placeholders}")
    return name, {placeholders[0]: validate_id(placeholders[0], instance)}


def evaluate_status(payload: bytes, service: str, instance: str, topic: str) -> HealthResult:
    """Judge one retained status payload of `service` instance `instance`."""
    try:
        status = messages.parse(messages.Status, payload)
    except messages.MessageError as error:
        return HealthResult(False, f"unhealthy: invalid status on {topic}: {error}")
    if status.service != service or status.id != instance:
        return HealthResult(
            False,
            f"unhealthy: the status on {topic} names {status.service} {status.id!r}, expected {service} {instance!r}",
        )
    if status.state != "online":
        return HealthResult(False, f"unhealthy: {service} {instance} is {status.state} (topic {topic})")
    return HealthResult(
        True, f"healthy: {service} {instance} is online (topic {topic}, session epoch {status.session_epoch})"
    )


def check(config: argparse.Namespace) -> HealthResult:
    """Connect, wait for the retained status of the configured instance and judge it."""
    topics = load_topics()
    name, ids = status_subscription(topics, config.service, config.id)
    topic = topics.topic(name, line=config.line, **ids)
    received: list[bytes] = []
    arrived = threading.Event()

    def on_status(incoming: Incoming) -> None:
        if not arrived.is_set():
            received.append(incoming.payload)
            arrived.set()

    bus = service_bus(
        config,
        topics,
        service="health",
        instance=f"{config.service}-{config.id}-{os.urandom(3).hex()}",  # unique if checks overlap
        status_topic=None,
    )
    bus.subscribe(name, on_status, **ids)
    deadline = time.monotonic() + config.timeout_s
    try:
        if not bus.start(wait_s=config.timeout_s):
            return HealthResult(False, _connect_failure(bus, config))
        arrived.wait(max(0.0, deadline - time.monotonic()))
    finally:
        bus.close(timeout_s=1.0)

    if not received:
        return HealthResult(
            False,
            f"unhealthy: no retained status on {topic} within {config.timeout_s:g} s: the {config.service} "
            f"has not connected to this broker yet, runs under another id or line, or the broker's ACL "
            f"does not let user {config.username or '(anonymous)'} read this topic",
        )
    return evaluate_status(received[0], config.service, config.id, topic)


def _connect_failure(bus: Bus, config: argparse.Namespace) -> str:
    if bus.counters.get("connect.refused"):
        return (
            f"unhealthy: the broker {config.broker} refused the connection: check the username and the "
            "password file (SDRM_USERNAME, SDRM_PASSWORD_FILE)"
        )
    return f"unhealthy: cannot connect to the broker {config.broker} within {config.timeout_s:g} s"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    config = cfg.resolve(parser, argv, "health")
    cfg.configure_logging(config.log_level, config.log_json)
    try:
        result = check(config)
    except ValueError as error:
        parser.error(str(error))
    print(result.message, file=sys.stdout if result.healthy else sys.stderr)
    return EXIT_HEALTHY if result.healthy else EXIT_UNHEALTHY


if __name__ == "__main__":
    raise SystemExit(main())
