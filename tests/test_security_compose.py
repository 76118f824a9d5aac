"""compose/make-secrets.sh and compose/mosquitto/mosquitto.conf, run with the local Mosquitto.

The compose broker configuration is started with its container paths mapped to a temporary
folder and its listeners moved to free ports of 127.0.0.1; everything else is used as committed.
"""

from __future__ import annotations

import getpass
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from pydantic import SecretStr

from services.broker import find_mosquitto, free_port, wait_for_port
from services.bus import Bus, wait_published
from services.security import client_tls_context
from services.topics import load_topics
from tests.secure_broker import COMPOSE_ACL, COMPOSE_USERS, missing_tools, wait_until

REPOSITORY = Path(__file__).resolve().parent.parent
MAKE_SECRETS = REPOSITORY / "compose" / "make-secrets.sh"
COMPOSE_CONFIG = REPOSITORY / "compose" / "mosquitto" / "mosquitto.conf"


@pytest.fixture(scope="module")
def compose_dir(tmp_path_factory):
    """A copy of make-secrets.sh in a temporary compose folder, after one run of it."""
    missing = missing_tools()
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    folder = tmp_path_factory.mktemp("compose")
    (folder / "mosquitto").mkdir()
    shutil.copy(MAKE_SECRETS, folder / "make-secrets.sh")
    shutil.copy(COMPOSE_ACL, folder / "mosquitto" / "acl")
    run_make_secrets(folder)
    return folder


def run_make_secrets(folder: Path, *args: str) -> str:
    result = subprocess.run(["sh", str(folder / "make-secrets.sh"), *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def read_password(folder: Path, user: str) -> str:
    return (folder / "secrets" / f"{user}.password").read_text().splitlines()[0]


def test_secrets_created_private(compose_dir):
    for user in COMPOSE_USERS:
        path = compose_dir / "secrets" / f"{user}.password"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, user
        assert len(read_password(compose_dir, user)) == 32
    passwords = {read_password(compose_dir, user) for user in COMPOSE_USERS}
    assert len(passwords) == len(COMPOSE_USERS)


def test_passwd_has_hashes_only(compose_dir):
    passwd = (compose_dir / "mosquitto" / "passwd").read_text()
    users = [line.split(":", 1)[0] for line in passwd.splitlines()]
    assert sorted(users) == sorted(COMPOSE_USERS)
    for user in COMPOSE_USERS:
        assert read_password(compose_dir, user) not in passwd
    assert all(line.split(":", 1)[1].startswith("$7$") for line in passwd.splitlines())


def test_rerun_keeps_passwords_force_replaces(compose_dir):
    before = {user: read_password(compose_dir, user) for user in COMPOSE_USERS}
    run_make_secrets(compose_dir)
    assert {user: read_password(compose_dir, user) for user in COMPOSE_USERS} == before

    run_make_secrets(compose_dir, "--force", "dev2")
    assert read_password(compose_dir, "dev2") != before["dev2"]
    assert read_password(compose_dir, "dev1") == before["dev1"]


def test_make_secrets_rejects_bad_user(compose_dir):
    result = subprocess.run(["sh", str(compose_dir / "make-secrets.sh"), "a/b"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "invalid user 'a/b'" in result.stderr


def test_ca_key_not_in_certs(compose_dir):
    certs = compose_dir / "mosquitto" / "certs"
    assert sorted(path.name for path in certs.iterdir()) == ["ca.crt", "server.crt", "server.key"]
    assert (compose_dir / "secrets" / "ca.key").is_file()


def compose_config(compose_dir: Path, plain_port: int, tls_port: int) -> str:
    """Return the committed compose mosquitto.conf with paths and listeners mapped to this test."""
    text = COMPOSE_CONFIG.read_text()
    replacements = {
        "/mosquitto/config/": f"{compose_dir}/mosquitto/",
        "/mosquitto/certs/": f"{compose_dir}/mosquitto/certs/",
        "/mosquitto/data/": f"{compose_dir}/data/",
        "\nlistener 1883\n": f"\nlistener {plain_port} 127.0.0.1\n",
        "\nlistener 8883\n": f"\nlistener {tls_port} 127.0.0.1\n",
    }
    for old, new in replacements.items():
        assert old in text, f"{COMPOSE_CONFIG} no longer contains {old!r}"
        text = text.replace(old, new)
    # Mosquitto started as root would switch to the user `mosquitto`, which cannot read these files.
    return f"user {getpass.getuser()}\n" + text


@pytest.fixture(scope="module")
def compose_broker(compose_dir):
    (compose_dir / "data").mkdir(exist_ok=True)
    plain_port, tls_port = free_port(), free_port()
    config = compose_dir / "mosquitto.conf"
    config.write_text(compose_config(compose_dir, plain_port, tls_port))
    log_path = compose_dir / "mosquitto.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([find_mosquitto(), "-c", str(config)], stdout=log_file, stderr=subprocess.STDOUT)
    try:
        assert wait_for_port(plain_port, 10.0), log_path.read_text()
        assert wait_for_port(tls_port, 10.0), log_path.read_text()
        yield plain_port, tls_port
    finally:
        process.terminate()
        process.wait(10)


def compose_bus(compose_dir: Path, url: str, user: str | None, **kwargs) -> Bus:
    tls = url.startswith("mqtts://")
    return Bus(
        topics=load_topics(), broker=url, line="line1", status_topic=None, backoff_min_s=0.1, backoff_max_s=0.5,
        username=user, password=SecretStr(read_password(compose_dir, user)) if user else None,
        tls_context=client_tls_context(compose_dir / "mosquitto" / "certs" / "ca.crt") if tls else None,
        **kwargs,
    )


def test_compose_broker_tls_login(compose_dir, compose_broker):
    plain_port, tls_port = compose_broker
    bus = compose_bus(compose_dir, f"mqtts://127.0.0.1:{tls_port}", "scheduler", service="probe", instance="tls")
    try:
        assert bus.start(wait_s=10.0), bus.counters.snapshot()
    finally:
        bus.close()


def test_compose_broker_refuses_anonymous(compose_dir, compose_broker):
    plain_port, tls_port = compose_broker
    bus = compose_bus(compose_dir, f"mqtt://127.0.0.1:{plain_port}", None, service="probe", instance="anonymous")
    bus.start()
    try:
        assert wait_until(lambda: bus.counters.get("connect.refused") >= 1, 10.0)
        assert not bus.connected
    finally:
        bus.close()


def test_compose_broker_applies_acl(compose_dir, compose_broker):
    plain_port, tls_port = compose_broker
    bus = compose_bus(compose_dir, f"mqtts://127.0.0.1:{tls_port}", "cam1", service="probe", instance="cam")
    try:
        assert bus.start(wait_s=10.0)
        assert wait_published([bus.publish("frame", b"own", camera="cam1")], 5.0)
        assert wait_published([bus.publish("frame", b"other", camera="cam2")], 5.0)
        assert wait_until(lambda: bus.counters.get("errors.publish_rejected") == 1, 5.0)
    finally:
        bus.close()
