"""A local MQTT broker for `sdrm line` and the tests: Mosquitto when installed, else amqtt.

Mosquitto runs as a subprocess with a generated configuration that listens on 127.0.0.1 only and
sets the limits that matter for SDRM traffic explicitly (see `mosquitto_config`).

The embedded amqtt broker (`services.amqtt_broker`) is the fallback when no `mosquitto` binary is
found. It runs in a subprocess too, so that a line's Ctrl-C stops it like any other child. It
speaks MQTT 3.1.1 only and has no shared subscriptions; see `supports_mqtt5` and
`supports_shared`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import structlog

log = structlog.get_logger("sdrm.broker")

MOSQUITTO_SEARCH = ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin")
# A 640 x 640 board at float32 gives about 2 MB of partials per device message, so 64 MiB leaves
# room for larger frames and more heads per device.
MAX_PACKET_BYTES = 64 * 1024 * 1024
MAX_QUEUED_MESSAGES = 1000
MAX_INFLIGHT_MESSAGES = 20


class BrokerError(RuntimeError):
    """Raised when no broker can be started."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, timeout_s: float, host: str = "127.0.0.1") -> bool:
    """Return True once host:port accepts TCP connections, False after timeout_s seconds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def find_mosquitto() -> str | None:
    """Return the path of the mosquitto binary on PATH or in the usual sbin folders, else None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for folder in MOSQUITTO_SEARCH:
        candidate = Path(folder) / "mosquitto"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def amqtt_available() -> bool:
    try:
        import amqtt  # noqa: F401
    except ImportError:
        return False
    return True


def mosquitto_config(port: int, persistence_dir: Path | None = None, max_packet_bytes: int = MAX_PACKET_BYTES) -> str:
    """Return a mosquitto.conf for Mosquitto 2 listening on 127.0.0.1:port without authentication.

    With persistence_dir, the broker saves retained messages, persistent sessions and their queued
    QoS 1 and 2 messages there when it stops, and loads them when it starts again.
    """
    if persistence_dir is None:
        persistence = ["persistence false"]
    else:
        persistence = ["persistence true", f"persistence_location {persistence_dir.resolve()}/"]
        if os.geteuid() == 0:
            # Started as root, Mosquitto switches to the user "mosquitto", which cannot write a
            # folder that root made under a private temporary folder.
            persistence.append("user root")
    lines = [
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        "# Largest MQTT packet accepted, in bytes. Partials of a 640 x 640 board are about 2 MB.",
        f"max_packet_size {max_packet_bytes}",
        "# QoS 1 and 2 messages queued per client beyond the in-flight ones, in messages.",
        f"max_queued_messages {MAX_QUEUED_MESSAGES}",
        "# QoS 1 and 2 messages in flight to one client at a time, in messages.",
        f"max_inflight_messages {MAX_INFLIGHT_MESSAGES}",
        *persistence,
        "log_type error",
        "log_type warning",
    ]
    return "\n".join(lines) + "\n"


class LocalBroker:
    """A broker subprocess on 127.0.0.1: start(), url, stop().

    persistence_dir (Mosquitto only) keeps retained messages and persistent sessions across a
    stop and a start of a new LocalBroker on the same folder, as a production broker does.
    """

    def __init__(
        self,
        port: int | None = None,
        prefer: str = "mosquitto",
        max_packet_bytes: int = MAX_PACKET_BYTES,
        persistence_dir: Path | None = None,
    ) -> None:
        self.port = port or free_port()
        self.prefer = prefer
        self.max_packet_bytes = max_packet_bytes
        self.persistence_dir = persistence_dir
        self.kind: str | None = None
        self.process: subprocess.Popen | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="sdrm-broker-")

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def supports_shared(self) -> bool:
        """Whether the broker supports $share subscriptions (Mosquitto 2 does, amqtt 0.12 does not)."""
        return self.kind == "mosquitto"

    @property
    def supports_mqtt5(self) -> bool:
        """Whether the broker accepts MQTT 5 (Mosquitto 2 does, amqtt 0.12 does not)."""
        return self.kind == "mosquitto"

    def start(self, timeout_s: float = 10.0) -> LocalBroker:
        mosquitto = find_mosquitto()
        if mosquitto and self.prefer != "amqtt":
            config = Path(self._tmp.name) / "mosquitto.conf"
            if self.persistence_dir is not None:
                self.persistence_dir.mkdir(parents=True, exist_ok=True)
            config.write_text(mosquitto_config(self.port, self.persistence_dir, self.max_packet_bytes))
            command = [mosquitto, "-c", str(config)]
            self.kind = "mosquitto"
        elif amqtt_available():
            command = [sys.executable, "-m", "services.amqtt_broker", str(self.port)]
            self.kind = "amqtt"
        else:
            raise BrokerError(
                "no MQTT broker found: install Mosquitto 2 (apt-get install mosquitto) or amqtt "
                "(pip install 'sdrm-line[broker]'), or pass --broker mqtt://host:port"
            )
        log_path = Path(self._tmp.name) / "broker.log"
        self._log_file = open(log_path, "wb")
        self.process = subprocess.Popen(
            command, stdout=self._log_file, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent
        )
        if not wait_for_port(self.port, timeout_s):
            self.stop()
            output = log_path.read_text(errors="replace")[-2000:]
            raise BrokerError(f"{self.kind} did not accept connections on port {self.port} within {timeout_s} s: {output}")
        log.info("broker_started", kind=self.kind, url=self.url, pid=self.process.pid)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
            log.info("broker_stopped", kind=self.kind, url=self.url)
        if getattr(self, "_log_file", None) is not None:
            self._log_file.close()
        self._tmp.cleanup()

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
