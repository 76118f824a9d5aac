"""`sdrm health` and the broker health check of compose, against real Mosquitto brokers.

The status publishers are real `Bus` clients with the status topics that the services use, so
the checks read exactly what a running service leaves on the broker.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from sdrm import messages
from services import health
from services.broker import free_port
from services.bus import Bus, wait_published
from services.topics import load_topics
from tests.broker import mqtt_broker  # noqa: F401 - pytest fixture
from tests.secure_broker import Client, secure_broker  # noqa: F401 - pytest fixture

REPOSITORY = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPOSITORY / "compose" / "docker-compose.yml"


def unique_line() -> str:
    return f"health-{uuid.uuid4().hex[:8]}"


def run_check(*args: str, **variables: str) -> tuple[int, str, str]:
    """Run `sdrm health` as a command with only the given SDRM_* variables; return (status, stdout, stderr)."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("SDRM_")}
    environment.update(variables)
    result = subprocess.run(
        [sys.executable, "-m", "sdrm.cli", "health", *args],
        capture_output=True, text=True, cwd=REPOSITORY, env=environment, timeout=60,
    )
    return result.returncode, result.stdout, result.stderr


def status_bus(broker_url: str, line: str, service: str, instance: str) -> Bus:
    """Return a started Bus that publishes the retained status of one instance, as that service does."""
    topic_name = health.STATUS_TOPICS[service]
    placeholder = [key for key in load_topics().spec(topic_name).placeholders if key != "line"][0]
    bus = Bus(
        topics=load_topics(), broker=broker_url, line=line, service=service, instance=instance,
        status_topic=topic_name, status_ids={placeholder: instance},
    )
    assert bus.start(wait_s=10.0), f"the {service} bus did not connect to {broker_url}"
    return bus


def publish_retained_status(broker_url: str, line: str, payload: bytes, device: str) -> None:
    """Publish payload as the retained status of device, from a client without a status of its own."""
    bus = Bus(
        topics=load_topics(), broker=broker_url, line=line, service="probe", instance=f"probe-{uuid.uuid4().hex[:6]}",
        status_topic=None,
    )
    assert bus.start(wait_s=10.0)
    try:
        info = bus.publish("device_status", payload, device=device)
        assert wait_published([info], 5.0), "the retained status was not acknowledged"
    finally:
        bus.close()


# --- sdrm health on an open broker --------------------------------------------------------------


def test_health_online_device(mqtt_broker):
    line = unique_line()
    bus = status_bus(mqtt_broker.url, line, "device", "dev7")
    try:
        code, out, err = run_check("--broker", mqtt_broker.url, "--line", line, "--service", "device", "--id", "dev7")
    finally:
        bus.close()
    assert code == 0, err
    assert "healthy: device dev7 is online" in out
    assert f"sdrm/v1/{line}/dev/dev7/status" in out


def test_health_stopped_after_clean_exit(mqtt_broker):
    line = unique_line()
    status_bus(mqtt_broker.url, line, "scheduler", "scheduler").close()
    code, out, err = run_check("--broker", mqtt_broker.url, "--line", line, "--service", "scheduler", "--id", "scheduler")
    assert code == 1
    assert "scheduler scheduler is stopped" in err
    assert out == ""


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"not json", "invalid status"),
        (
            messages.to_json(messages.Status(state="offline", service="device", id="dev8", session_epoch=1, ts_ms=1)),
            "device dev8 is offline",
        ),
        (
            messages.to_json(messages.Status(state="online", service="device", id="dev9", session_epoch=1, ts_ms=1)),
            "names device 'dev9', expected device 'dev8'",
        ),
    ],
    ids=["invalid-json", "offline", "other-id"],
)
def test_health_rejects_bad_status(mqtt_broker, payload, expected):
    line = unique_line()
    publish_retained_status(mqtt_broker.url, line, payload, device="dev8")
    code, _, err = run_check("--broker", mqtt_broker.url, "--line", line, "--service", "device", "--id", "dev8")
    assert code == 1
    assert expected in err


def test_health_no_status_times_out(mqtt_broker):
    line = unique_line()
    code, _, err = run_check(
        "--broker", mqtt_broker.url, "--line", line, "--service", "compressor", "--id", "compressor", "--timeout-s", "1"
    )
    assert code == 1
    assert f"no retained status on sdrm/v1/{line}/svc/compressor/status within 1 s" in err


def test_health_broker_unreachable():
    url = f"mqtt://127.0.0.1:{free_port()}"
    code, _, err = run_check("--broker", url, "--service", "aggregator", "--id", "aggregator", "--timeout-s", "1")
    assert code == 1
    assert f"cannot connect to the broker {url} within 1 s" in err


def test_health_invalid_id_exits_2():
    code, _, err = run_check("--broker", f"mqtt://127.0.0.1:{free_port()}", "--service", "device", "--id", "dev/1")
    assert code == 2
    assert "dev/1" in err


def test_health_reads_environment(mqtt_broker):
    line = unique_line()
    bus = status_bus(mqtt_broker.url, line, "ingest", "cam9")
    try:
        code, out, err = run_check("--service", "ingest", "--id", "cam9", SDRM_BROKER=mqtt_broker.url, SDRM_LINE=line)
    finally:
        bus.close()
    assert code == 0, err
    assert f"sdrm/v1/{line}/cam/cam9/status" in out


def test_status_topics_match_publishers():
    topics = load_topics()
    for service, topic_name in health.STATUS_TOPICS.items():
        spec = topics.spec(topic_name)
        assert service in spec.publishers, f"topics.yaml lists no {service} as publisher of {topic_name}"
        assert spec.retain, f"{topic_name} is not retained"
        assert spec.will == "offline", f"{topic_name} has no offline will, so a dead instance would stay online"


# --- with the compose ACL and passwords ---------------------------------------------------------


@pytest.mark.parametrize(
    ("service", "user"),
    [("scheduler", "scheduler"), ("compressor", "compressor"), ("aggregator", "aggregator"), ("device", "dev1"), ("ingest", "cam1")],
)
def test_health_reads_own_status_under_acl(secure_broker, tmp_path, service, user):  # noqa: F811
    line = unique_line()
    topic_name = health.STATUS_TOPICS[service]
    placeholder = [key for key in load_topics().spec(topic_name).placeholders if key != "line"][0]
    client = Client(
        secure_broker, user, line, service=service, instance=user, status_topic=topic_name, status_ids={placeholder: user}
    ).start()
    password_file = tmp_path / f"{user}.password"
    password_file.write_text(secure_broker.passwords[user] + "\n")
    try:
        code, out, err = run_check(
            "--broker", secure_broker.plain_url, "--line", line, "--service", service, "--id", user,
            "--username", user, "--password-file", str(password_file),
        )
    finally:
        client.close()
    assert code == 0, err
    assert f"{service} {user} is online" in out


def test_health_wrong_password_refused(secure_broker, tmp_path):  # noqa: F811
    password_file = tmp_path / "wrong.password"
    password_file.write_text("not-the-password\n")
    code, _, err = run_check(
        "--broker", secure_broker.plain_url, "--service", "device", "--id", "dev1",
        "--username", "dev1", "--password-file", str(password_file), "--timeout-s", "2",
    )
    assert code == 1
    assert "refused the connection" in err


# --- the broker's own health check in docker-compose.yml -----------------------------------------


def broker_health_script(port: int, password_file: Path) -> str:
    """Return the mosquitto health check of docker-compose.yml, pointed at a local broker and password file."""
    service = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["mosquitto"]
    kind, script = service["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    script = script.replace("$$", "$")  # compose's escape of a literal '$'
    assert "-p 1883" in script, "the broker health check no longer connects to port 1883"
    assert "/run/secrets/scada" in script, "the broker health check no longer reads the scada secret"
    return script.replace("-p 1883", f"-p {port}").replace("/run/secrets/scada", str(password_file))


def run_script(script: str, temporary: Path) -> subprocess.CompletedProcess:
    """Run a health check script with TMPDIR=temporary, so that its leftovers can be inspected."""
    temporary.mkdir()
    environment = {**os.environ, "TMPDIR": str(temporary)}
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=environment, timeout=30)


@pytest.mark.skipif(shutil.which("mosquitto_sub") is None, reason="mosquitto_sub is not installed (apt-get install mosquitto-clients)")
def test_broker_health_check_script(secure_broker, tmp_path):  # noqa: F811
    password_file = tmp_path / "scada.password"
    password_file.write_text(secure_broker.passwords["scada"] + "\n")
    script = broker_health_script(secure_broker.plain_port, password_file)
    result = run_script(script, tmp_path / "tmp")
    assert result.returncode == 0, (
        f"the broker health check failed ({result.returncode}): {result.stdout}{result.stderr}; "
        "the ACL must let user scada read $SYS/broker/uptime"
    )
    assert "seconds" in result.stdout
    assert not list((tmp_path / "tmp").iterdir()), "the options file with the password was left behind"


@pytest.mark.skipif(shutil.which("mosquitto_sub") is None, reason="mosquitto_sub is not installed (apt-get install mosquitto-clients)")
def test_broker_health_check_wrong_password(secure_broker, tmp_path):  # noqa: F811
    password_file = tmp_path / "scada.password"
    password_file.write_text("not-the-password\n")
    script = broker_health_script(secure_broker.plain_port, password_file)
    result = run_script(script, tmp_path / "tmp")
    assert result.returncode != 0
    assert not list((tmp_path / "tmp").iterdir()), "the options file with the password was left behind"
