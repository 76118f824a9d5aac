"""Helpers shared by the service commands: model loading, signal handling and the main entry."""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import structlog

from services import config as cfg
from services.config import configure_logging, resolve
from services.metrics import MetricsError, serve_metrics, stop_metrics

log = structlog.get_logger("sdrm.service")


def parse_topic_message(incoming, model_cls, field: str, bus, event: str, topic_id: str | None = None):
    """Return the pydantic message in incoming, or None after reporting `event` through bus.report_error.

    topic_id names the topic placeholder that `field` must equal (default: the same name as field).

    The message is rejected when its JSON is invalid or when its `field` differs from the id of
    the same name in the topic, because a message published on another device's or camera's topic
    must not be taken for that device's or camera's.
    """
    from sdrm import messages

    try:
        message = messages.parse(model_cls, incoming.payload)
    except messages.MessageError as error:
        bus.report_error(event, str(error), topic=incoming.topic)
        return None

    value = getattr(message, field)
    expected = incoming.ids[topic_id or field]
    if value != expected:
        bus.report_error(
            event,
            f"message names {field} {value!r} but was published on the topic of {topic_id or field} {expected!r}",
            topic=incoming.topic,
        )
        return None
    return message


def service_bus(config: argparse.Namespace, topics, **identity):
    """Return the Bus of a service, connected as its common options set.

    The options fill broker, line, MQTT version, keepalive, credentials, TLS and packet limit.
    identity gives the service kind, instance id, status topic and the service's own Bus settings.
    """
    from services.bus import Bus

    return Bus(
        topics=topics,
        broker=config.broker,
        line=config.line,
        mqtt_version=config.mqtt_version,
        keepalive_s=config.keepalive_s,
        **cfg.bus_connection(config),
        **identity,
    )


class Service(Protocol):
    def run(self) -> int: ...


class StartupError(RuntimeError):
    """Raised when a service cannot start (missing model, invalid option); main exits with status 2."""


def load_model(directory: Path):
    """Return (model, manifest) of an SDRM checkpoint, or raise StartupError that names the fix."""
    from sdrm.checkpoint import load_checkpoint

    try:
        return load_checkpoint(Path(directory))
    except FileNotFoundError as error:
        raise StartupError(f"cannot load model from {directory}: {error}; pass --model DIR or set SDRM_MODEL") from None
    except (ValueError, KeyError, RuntimeError) as error:
        raise StartupError(f"cannot load model from {directory}: {error}") from None


def set_threads(threads: int) -> None:
    """Set torch's intra-op CPU threads when threads > 0 (0 keeps torch's default)."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def install_stop_signals(stop: threading.Event) -> None:
    """Set stop on SIGINT and SIGTERM (only possible from the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handle(signum, frame) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)


def run_main(
    name: str,
    build_parser: Callable[[], argparse.ArgumentParser],
    factory: Callable[[argparse.Namespace, threading.Event], Service],
    argv: list[str] | None,
) -> int:
    """Resolve the configuration, configure logging, build the service and run it until stopped.

    With --metrics-port, the metrics endpoint starts before the service is built, so that a port
    in use ends the command at once with status 2.
    """
    parser = build_parser()
    config = resolve(parser, argv, name)
    configure_logging(config.log_level, config.log_json)
    stop = threading.Event()
    install_stop_signals(stop)
    try:
        endpoint = serve_metrics(config, name)
        service = factory(config, stop)
    except (StartupError, MetricsError, ValueError) as error:
        log.error("start_failed", service=name, error=str(error))
        parser.exit(2, f"sdrm {name}: {error}\n")
    if endpoint is not None and getattr(service, "metrics", None) is not None:
        endpoint.add(service.metrics)
    try:
        return service.run()
    finally:
        stop_metrics(endpoint, config, name)
