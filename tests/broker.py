"""Test helpers for the MQTT services: a real broker, service subprocesses and a message probe.

Import the fixtures into a test module (`from tests.broker import mqtt_broker, model_dir`), since
pytest loads fixtures automatically only from conftest.py.

The broker is an eclipse-mosquitto:2 container when a Docker engine responds, else the local
`mosquitto` binary. Either listens on a free port of 127.0.0.1 only. Tests skip when neither
exists.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sdrm import messages
from services.broker import LocalBroker, find_mosquitto, free_port, mosquitto_config, wait_for_port
from services.bus import Bus, Incoming, wait_published
from services.topics import load_topics

REPOSITORY = Path(__file__).resolve().parent.parent
SHIPPED_MODEL = REPOSITORY / "models" / "deeppcb-sdrm"
SAMPLES = REPOSITORY / "samples" / "boards"


def docker_available(timeout_s: float = 3.0) -> bool:
    """Return whether `docker info` succeeds within timeout_s seconds, so that a Docker engine runs."""
    if shutil.which("docker") is None:
        return False
    try:
        result = subprocess.run(["docker", "info"], capture_output=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


class _ContainerBroker:
    """eclipse-mosquitto:2 in a container, published on a free port of 127.0.0.1."""

    def __init__(self, tmp: Path) -> None:
        from testcontainers.core.container import DockerContainer

        self.port = free_port()
        config = tmp / "mosquitto.conf"
        config.write_text(mosquitto_config(1883).replace("listener 1883 127.0.0.1", "listener 1883"))
        self.container = (
            DockerContainer("eclipse-mosquitto:2")
            .with_bind_ports(1883, ("127.0.0.1", self.port))
            .with_volume_mapping(str(config), "/mosquitto/config/mosquitto.conf", "ro")
        )
        self.kind = "mosquitto-container"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> _ContainerBroker:
        self.container.start()
        if not wait_for_port(self.port, 30.0):
            self.container.stop()
            raise RuntimeError(f"the mosquitto container did not open port {self.port} within 30 s")
        return self

    def stop(self) -> None:
        self.container.stop()


@pytest.fixture(scope="module")
def mqtt_broker(tmp_path_factory):
    """A Mosquitto 2 broker on 127.0.0.1 for the test module; yields an object with .url."""
    if docker_available():
        broker = _ContainerBroker(tmp_path_factory.mktemp("broker")).start()
    elif find_mosquitto():
        broker = LocalBroker().start()
    else:
        pytest.skip("no MQTT broker: no Docker engine answers and no mosquitto binary is installed (apt-get install mosquitto)")
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The shipped checkpoint models/deeppcb-sdrm; skips when it has not been trained yet.

    SDRM_TEST_MODEL overrides the path, for example to a random-init checkpoint during development.
    """
    override = os.environ.get("SDRM_TEST_MODEL")
    path = Path(override) if override else SHIPPED_MODEL
    if not (path / "manifest.json").is_file():
        pytest.skip(f"model checkpoint {path} not found: train it with `sdrm train` or set SDRM_TEST_MODEL")
    return path


class Probe:
    """A Bus without status that collects messages of the named topics, for assertions."""

    def __init__(self, broker_url: str, line: str, names: list[str], session_expiry_s: int = 0, **ids: str) -> None:
        # With session_expiry_s > 0 the probe keeps a persistent session, as SCADA should. The broker
        # then queues the QoS 1 messages published while the probe reconnects.
        self.bus = Bus(
            topics=load_topics(), broker=broker_url, line=line, service="probe", instance=f"probe-{time.time_ns()}",
            status_topic=None, session_expiry_s=session_expiry_s,
        )
        self.received: list[Incoming] = []
        self._changed = threading.Condition()
        for name in names:
            self.bus.subscribe(name, self._collect, **ids)
        if not self.bus.start(wait_s=10.0):
            raise RuntimeError(f"probe could not connect to {broker_url}")

    def _collect(self, incoming: Incoming) -> None:
        with self._changed:
            self.received.append(incoming)
            self._changed.notify_all()

    def messages(self, name: str) -> list[Incoming]:
        with self._changed:
            return [item for item in self.received if item.name == name]

    def wait_for(self, predicate: Callable[[], object], timeout_s: float) -> object:
        """Return predicate()'s first truthy value, or None after timeout_s seconds."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                value = predicate()
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._changed.wait(min(remaining, 0.1))

    def verdicts(self) -> list[messages.Verdict]:
        return [messages.parse(messages.Verdict, item.payload) for item in self.messages("verdict")]

    def settled_verdicts(self, sent: list[int], timeout_s: float, settle_s: float = 1.0) -> tuple[list, list[int]]:
        """Wait until every frame in sent has a verdict, then settle_s more for duplicates.

        Returns (all verdicts received, frames of sent still without a verdict).
        """
        self.wait_for(lambda: set(sent) <= {v.frame for v in self.verdicts()}, timeout_s)
        time.sleep(settle_s)
        verdicts = self.verdicts()
        return verdicts, sorted(set(sent) - {v.frame for v in verdicts})

    def assignments(self) -> list[messages.Assignment]:
        return [messages.parse(messages.Assignment, item.payload) for item in self.messages("assignment") if item.payload]

    def close(self) -> None:
        self.bus.close()


class Services:
    """Service commands (`sdrm <service> ...`) as subprocesses, each logging to its own file."""

    def __init__(self, broker_url: str, line: str, model: Path, log_dir: Path) -> None:
        self.broker_url = broker_url
        self.line = line
        self.model = model
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, name: str, service: str, *args: str, model: bool = True) -> subprocess.Popen:
        command = [
            sys.executable, "-m", "sdrm.cli", service,
            "--broker", self.broker_url, "--line", self.line, "--log-level", "info", *args,
        ]
        if model:
            command += ["--model", str(self.model)]
        log_file = open(self.log_dir / f"{name}.log", "wb")
        env = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPOSITORY, env=env)
        log_file.close()
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def alive(self, name: str) -> bool:
        return self.processes[name].poll() is None

    def stop_all(self, timeout_s: float = 10.0) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


class FrameFeeder:
    """Publishes SDRM FRAME messages of one image at a fixed rate from a thread, recording frame numbers."""

    def __init__(self, bus: Bus, line: str, camera: str, image: Path, period_s: float, live: bool = False) -> None:
        from sdrm import wire

        self._wire = wire
        self.bus = bus
        self.line = line
        self.camera = camera
        self.image_bytes = image.read_bytes()
        self.period_s = period_s
        # A live feeder marks its frames as ingest does for a camera, so the compressor may skip them.
        self.properties = {"expiry_s": 5, "user_properties": {"sdrm-source": "live"}} if live else {}
        self.sent: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"feeder-{camera}", daemon=True)

    def start(self) -> FrameFeeder:
        self._thread.start()
        return self

    def _run(self) -> None:
        frame = 0
        while not self._stop.is_set():
            envelope = self._wire.Envelope(
                kind=self._wire.Kind.FRAME, line=self.line, camera=self.camera, frame=frame,
                capture_ms=time.time_ns() // 1_000_000,
            )
            payload = self._wire.encode_frame(envelope, self.image_bytes, "jpeg")
            info = self.bus.publish("frame", payload, camera=self.camera, **self.properties)
            if info is not None:
                # wait_published, unlike paho's wait_for_publish, tolerates a broker that is down.
                wait_published([info], 5.0)
                self.sent.append(frame)
            frame += 1
            self._stop.wait(self.period_s)

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join(10.0)
        return list(self.sent)
