"""A Mosquitto with TLS, a password file and an ACL, started by the tests on 127.0.0.1.

`make_certificates` creates a CA, a server certificate for 127.0.0.1 and localhost (in the
subjectAltName) and a client certificate with the `openssl` command. `make_password_file` hashes
passwords with `mosquitto_passwd -b`. `SecureBroker` runs the local `mosquitto` binary with two
listeners on free ports of 127.0.0.1:

- `tls_url` (mqtts://) requires a client certificate signed by the test CA, and
- `plain_url` (mqtt://) has no TLS.

Both require a username and password (`allow_anonymous false`) and apply the same acl_file.
Import the `secure_broker` fixture into a test module; it skips when mosquitto, mosquitto_passwd
or openssl is missing.
"""

from __future__ import annotations

import getpass
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import SecretStr

from services.broker import (
    MAX_INFLIGHT_MESSAGES,
    MAX_PACKET_BYTES,
    MAX_QUEUED_MESSAGES,
    find_mosquitto,
    free_port,
    wait_for_port,
)
from services.bus import Bus, Incoming
from services.security import client_tls_context
from services.topics import load_topics

REPOSITORY = Path(__file__).resolve().parent.parent
COMPOSE_ACL = REPOSITORY / "compose" / "mosquitto" / "acl"
# The users of the committed compose ACL, each with a random password per test session.
COMPOSE_USERS = ("scheduler", "compressor", "aggregator", "dev1", "dev2", "cam1", "scada", "sparkplug")
# A test-only user that may read and write every SDRM topic, to observe what the broker forwards.
OBSERVER = "observer"
OBSERVER_ACL = f"\nuser {OBSERVER}\ntopic readwrite sdrm/#\ntopic readwrite spBv1.0/#\n"


@dataclass(frozen=True)
class Certificates:
    """PEM files written by make_certificates."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a second CA that signed nothing the broker uses


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")


def _make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.crt"
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key.name, cwd=folder)
    _openssl(
        "req", "-x509", "-new", "-key", key.name, "-sha256", "-days", "2", "-subj", f"/CN=SDRM test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-out", cert.name, cwd=folder,
    )
    return cert, key


def _make_leaf(folder: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    key, cert, request, extfile = (folder / f"{name}{suffix}" for suffix in (".key", ".crt", ".csr", ".ext"))
    extfile.write_text(extensions)
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key.name, cwd=folder)
    _openssl("req", "-new", "-key", key.name, "-subj", f"/CN={name}", "-out", request.name, cwd=folder)
    _openssl(
        "x509", "-req", "-in", request.name, "-CA", ca[0].name, "-CAkey", ca[1].name, "-CAcreateserial",
        "-days", "2", "-sha256", "-extfile", extfile.name, "-out", cert.name, cwd=folder,
    )
    return cert, key


def make_certificates(folder: Path) -> Certificates:
    """Create a test CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = _make_ca(folder, "ca")
    other_ca, _ = _make_ca(folder, "other-ca")
    server = _make_leaf(
        folder, "server", ca,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
    )
    client = _make_leaf(folder, "client", ca, "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n")
    return Certificates(
        ca=ca[0], server_cert=server[0], server_key=server[1], client_cert=client[0], client_key=client[1],
        other_ca=other_ca,
    )


def make_password_file(path: Path, passwords: dict[str, str]) -> Path:
    """Write a Mosquitto password file with one hashed entry per user, by `mosquitto_passwd -b`."""
    path.unlink(missing_ok=True)
    path.touch(mode=0o600)
    for user, password in passwords.items():
        result = subprocess.run(["mosquitto_passwd", "-b", str(path), user, password], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"mosquitto_passwd failed for user {user!r}: {result.stdout}{result.stderr}")
    return path


def secure_config(tls_port: int, plain_port: int, certificates: Certificates, password_file: Path, acl_file: Path) -> str:
    """Return a mosquitto.conf with a TLS listener and a plain listener on 127.0.0.1, both authenticated."""
    lines = [
        # Mosquitto started as root drops to the user `mosquitto`, which cannot read the mode-600
        # files of this test, so it keeps the user that started it.
        f"user {getpass.getuser()}",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {password_file}",
        f"acl_file {acl_file}",
        f"max_packet_size {MAX_PACKET_BYTES}",
        f"max_queued_messages {MAX_QUEUED_MESSAGES}",
        f"max_inflight_messages {MAX_INFLIGHT_MESSAGES}",
        "persistence false",
        "log_dest stdout",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "log_type debug",
        f"listener {plain_port} 127.0.0.1",
        f"listener {tls_port} 127.0.0.1",
        f"cafile {certificates.ca}",
        f"certfile {certificates.server_cert}",
        f"keyfile {certificates.server_key}",
        "tls_version tlsv1.2",
        "require_certificate true",
    ]
    return "\n".join(lines) + "\n"


class SecureBroker:
    """Mosquitto with TLS, passwords and an ACL, as a subprocess: start(), tls_url, plain_url, stop()."""

    def __init__(self, folder: Path, passwords: dict[str, str], acl_text: str) -> None:
        self.folder = folder
        self.passwords = dict(passwords)
        self.certificates = make_certificates(folder / "certs")
        self.password_file = make_password_file(folder / "passwd", self.passwords)
        self.acl_file = folder / "acl"
        self.acl_file.write_text(acl_text)
        self.tls_port = free_port()
        self.plain_port = free_port()
        self.log_path = folder / "mosquitto.log"
        self.process: subprocess.Popen | None = None

    @property
    def tls_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.tls_port}"

    @property
    def plain_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.plain_port}"

    def start(self, timeout_s: float = 10.0) -> SecureBroker:
        config = self.folder / "mosquitto.conf"
        config.write_text(
            secure_config(self.tls_port, self.plain_port, self.certificates, self.password_file, self.acl_file)
        )
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen([find_mosquitto(), "-c", str(config)], stdout=log_file, stderr=subprocess.STDOUT)
        ready = wait_for_port(self.plain_port, timeout_s) and wait_for_port(self.tls_port, timeout_s)
        if not ready:
            self.stop()
            raise RuntimeError(f"mosquitto did not open ports {self.plain_port} and {self.tls_port}: {self.log()[-2000:]}")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def missing_tools() -> list[str]:
    """Return the names of the programs the secure broker needs and this machine lacks."""
    missing = [name for name in ("mosquitto_passwd", "openssl") if shutil.which(name) is None]
    if find_mosquitto() is None:
        missing.append("mosquitto")
    return missing


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory):
    """A SecureBroker for the test module with the committed compose ACL plus the observer user.

    Every user of COMPOSE_USERS, and OBSERVER, gets a random password (in .passwords).
    """
    missing = missing_tools()
    if missing:
        pytest.skip(f"the secure broker needs {', '.join(missing)}: apt-get install mosquitto mosquitto-clients openssl")
    passwords = {user: secrets.token_urlsafe(18) for user in (*COMPOSE_USERS, OBSERVER)}
    acl_text = COMPOSE_ACL.read_text() + OBSERVER_ACL
    broker = SecureBroker(tmp_path_factory.mktemp("secure-broker"), passwords, acl_text).start()
    yield broker
    broker.stop()


def wait_until(predicate: Callable[[], object], timeout_s: float) -> object:
    """Return predicate()'s first truthy value, polling every 20 ms, or None after timeout_s seconds."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value or None
        time.sleep(0.02)


class Client:
    """A Bus that logs in as one user of a SecureBroker and collects what its subscriptions receive."""

    def __init__(
        self,
        broker: SecureBroker,
        user: str | None,
        line: str,
        *,
        tls: bool = False,
        password: str | None = None,
        service: str = "probe",
        instance: str | None = None,
        status_topic: str | None = None,
        status_ids: dict[str, str] | None = None,
        mqtt_version: str = "5",
    ) -> None:
        password = password if password is not None else broker.passwords.get(user or "")
        context = None
        if tls:
            certificates = broker.certificates
            context = client_tls_context(certificates.ca, certificates.client_cert, certificates.client_key)
        self.bus = Bus(
            topics=load_topics(),
            broker=broker.tls_url if tls else broker.plain_url,
            line=line,
            service=service,
            instance=instance or f"{user or 'anonymous'}-{time.time_ns()}",
            status_topic=status_topic,
            status_ids=status_ids,
            mqtt_version=mqtt_version,
            backoff_min_s=0.1,
            backoff_max_s=0.5,
            username=user,
            password=SecretStr(password) if password is not None else None,
            tls_context=context,
        )
        self.received: list[Incoming] = []
        self._lock = threading.Lock()

    def subscribe(self, name: str, **ids: str) -> Client:
        self.bus.subscribe(name, self._collect, **ids)
        return self

    def _collect(self, incoming: Incoming) -> None:
        with self._lock:
            self.received.append(incoming)

    def topics(self) -> list[str]:
        """Return the topics of the messages received so far, in order of arrival."""
        with self._lock:
            return [item.topic for item in self.received]

    def payloads(self, topic: str) -> list[bytes]:
        with self._lock:
            return [item.payload for item in self.received if item.topic == topic]

    def start(self, wait_s: float = 10.0) -> Client:
        if not self.bus.start(wait_s=wait_s):
            raise RuntimeError(f"{self.bus.client_id} did not connect within {wait_s} s: {self.bus.counters.snapshot()}")
        return self

    def close(self) -> None:
        self.bus.close(timeout_s=2.0)
