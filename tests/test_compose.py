"""The compose files agree with the services, topics.yaml and the broker configuration.

`docker-compose config` (or `docker compose config`) validates and resolves every compose file.
The resolved services are then checked against the code: each `command` must parse with that
service's own parser, each SDRM_<OPTION> variable must name one of its options, each health check
must read the status topic the service publishes, and each port must match a Mosquitto listener
or the service's metrics port. No Docker engine is needed: `config` only reads the files.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from sdrm.cli import SERVICES
from services import config as cfg
from services import health
from services.topics import load_topics

REPOSITORY = Path(__file__).resolve().parent.parent
COMPOSE = REPOSITORY / "compose"
MOSQUITTO_CONF = COMPOSE / "mosquitto" / "mosquitto.conf"
BROKER_SERVICE = "mosquitto"

# Every compose file, alone and with the files it overrides.
COMPOSE_SETS = {
    "docker-compose.yml": ["docker-compose.yml"],
    "docker-compose.jetson.yml": ["docker-compose.jetson.yml"],
    "docker-compose.yml + docker-compose.jetson.yml": ["docker-compose.yml", "docker-compose.jetson.yml"],
}
# The sets that describe a whole line, whose services are checked in depth.
LINE_SETS = ["docker-compose.yml", "docker-compose.yml + docker-compose.jetson.yml"]

# The option whose value is an instance's id, which is also its status topic id and its username.
INSTANCE_OPTIONS = {"device": "device", "ingest": "camera"}
# Environment variables that the services read although no option has their name.
EXTRA_VARIABLES = {cfg.ENV_PREFIX + "CONFIG", cfg.ENV_PREFIX + "PASSWORD"}
# Compose variables that the test leaves unset, so that the files' defaults apply.
COMPOSE_VARIABLES = ("SDRM_BROKER", "SDRM_LINE", "CAM1_URL")


def compose_command() -> list[str] | None:
    """Return the Compose CLI: docker-compose (v1) or the `docker compose` plugin (v2), else None."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def run_config(files: list[str], tmp_path: Path) -> dict:
    command = compose_command()
    if command is None:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed (apt-get install docker-compose)")
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    arguments = [*command, "--env-file", str(env_file)]
    for name in files:
        arguments += ["-f", str(COMPOSE / name)]
    environment = {key: value for key, value in os.environ.items() if key not in COMPOSE_VARIABLES}
    result = subprocess.run(arguments + ["config"], capture_output=True, text=True, env=environment, timeout=120)
    assert result.returncode == 0, f"{' '.join(arguments)} config failed:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def resolved(tmp_path_factory) -> dict[str, dict]:
    """The output of `config` for every entry of COMPOSE_SETS."""
    tmp_path = tmp_path_factory.mktemp("compose")
    return {label: run_config(files, tmp_path) for label, files in COMPOSE_SETS.items()}


def sdrm_services(document: dict) -> dict[str, dict]:
    """Return the services of a resolved compose file that run an `sdrm` command (all but the broker)."""
    return {name: service for name, service in document["services"].items() if name != BROKER_SERVICE}


def parser_of(command: str):
    module = importlib.import_module(SERVICES[command])
    assert hasattr(module, "build_parser"), f"{SERVICES[command]} has no build_parser()"
    return module.build_parser()


def option_variables(parser) -> set[str]:
    """Return SDRM_<DEST> of every option of parser, the names services.config reads."""
    return {
        cfg.ENV_PREFIX + action.dest.upper()
        for action in parser._actions  # noqa: SLF001 - argparse has no public list of actions
        if action.option_strings and action.dest != "help"
    }


def resolve_in(parser, argv: list[str], service: str, environment: dict[str, str], monkeypatch):
    """Resolve argv with services.config as the container would, with only its SDRM_* variables set."""
    for key in list(os.environ):
        if key.startswith(cfg.ENV_PREFIX):
            monkeypatch.delenv(key)
    for key, value in environment.items():
        monkeypatch.setenv(key, str(value))
    try:
        return cfg.resolve(parser, argv, service)
    except SystemExit as error:
        pytest.fail(f"`sdrm {service} {' '.join(argv)}` does not parse with its environment {environment} (exit {error.code})")


def resolve_service(service: dict, monkeypatch):
    """Return (command name, resolved options) of a compose service's `command` and environment."""
    command = [str(word) for word in service["command"]]
    assert command[0] in SERVICES, f"command {command} is not an sdrm command: use one of {', '.join(SERVICES)}"
    environment = service.get("environment") or {}
    return command[0], resolve_in(parser_of(command[0]), command[1:], command[0], environment, monkeypatch)


def instance_id(command: str, config) -> str:
    return getattr(config, INSTANCE_OPTIONS.get(command, "id"))


def health_argv(service: dict) -> list[str]:
    test = [str(word) for word in service["healthcheck"]["test"]]
    assert test[:3] == ["CMD", "sdrm", "health"], f"health check {test} is not `sdrm health`"
    return test[3:]


def duration_seconds(text: str) -> float:
    """Return the seconds of a compose duration such as '45s', '1m30s' or '1h'."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", str(text))
    assert parts and "".join(number + unit for number, unit in parts) == str(text), f"invalid duration {text!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def secret_names(service: dict) -> list[str]:
    return [entry["source"] if isinstance(entry, dict) else entry for entry in service.get("secrets", [])]


def filter_fits_template(topic_filter: str, template: str) -> bool:
    """Return whether a topic or filter can match a template of topics.yaml, placeholders being any level."""
    levels = topic_filter.split("/")
    template_levels = template.split("/")
    for index, level in enumerate(levels):
        if level == "#":
            return True
        if index >= len(template_levels):
            return False
        expected = template_levels[index]
        if level != "+" and not expected.startswith("{") and level != expected:
            return False
    return len(levels) == len(template_levels)


def mosquitto_listeners() -> dict[int, bool]:
    """Return {port: uses TLS} of every `listener` in compose/mosquitto/mosquitto.conf."""
    listeners: dict[int, bool] = {}
    current = None
    for raw in MOSQUITTO_CONF.read_text().splitlines():
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        if words[0] == "listener":
            current = int(words[1])
            listeners[current] = False
        elif words[0] in ("certfile", "keyfile") and current is not None:
            listeners[current] = True
    return listeners


def mosquitto_paths() -> list[str]:
    """Return the container paths that mosquitto.conf reads or writes (files and folders)."""
    keys = {"password_file", "acl_file", "cafile", "certfile", "keyfile", "persistence_location"}
    paths = []
    for raw in MOSQUITTO_CONF.read_text().splitlines():
        words = raw.split("#", 1)[0].split()
        if len(words) == 2 and words[0] in keys:
            paths.append(words[1])
    return paths


def container_ports(entries: list) -> list[tuple[str | None, int]]:
    """Return (host address or None, container port) of compose `ports` in short or long syntax."""
    ports = []
    for entry in entries:
        if isinstance(entry, dict):
            ports.append((entry.get("host_ip"), int(entry["target"])))
            continue
        parts = str(entry).split("/")[0].split(":")
        host_ip = parts[0] if len(parts) == 3 else None
        ports.append((host_ip, int(parts[-1])))
    return ports


# --- the files themselves ---------------------------------------------------------------------


def test_every_compose_file_is_checked():
    files = {path.name for path in COMPOSE.glob("docker-compose*.yml")}
    covered = {name for names in COMPOSE_SETS.values() for name in names}
    assert files <= covered, f"add {sorted(files - covered)} to COMPOSE_SETS"


@pytest.mark.parametrize("label", list(COMPOSE_SETS))
def test_compose_config_accepts_files(resolved, label):
    assert resolved[label]["services"], f"{label} defines no services"


@pytest.mark.parametrize("label", LINE_SETS)
def test_services_restart_and_no_start_order(resolved, label):
    for name, service in resolved[label]["services"].items():
        assert service.get("restart") in ("unless-stopped", "always"), f"{name} has no restart policy"
        assert "depends_on" not in service, f"{name} depends on start order; services retry the broker instead"


@pytest.mark.parametrize("label", LINE_SETS)
def test_services_with_status_have_health_checks(resolved, label):
    document = resolved[label]
    assert "healthcheck" in document["services"][BROKER_SERVICE], "the broker has no health check"
    for name, service in sdrm_services(document).items():
        if str(service["command"][0]) in health.STATUS_TOPICS:
            assert "healthcheck" in service, f"{name} publishes a retained status but has no health check"


def test_line_has_every_service_kind(resolved):
    commands = {str(service["command"][0]) for service in sdrm_services(resolved["docker-compose.yml"]).values()}
    for kind in ("scheduler", "compressor", "aggregator", "device", "ingest"):
        assert kind in commands, f"docker-compose.yml runs no {kind}"


def test_dockerfiles_run_as_non_root():
    for path in COMPOSE.glob("Dockerfile*"):
        stages = path.read_text().split("\nFROM ")
        users = re.findall(r"^USER\s+(\S+)", stages[-1], flags=re.MULTILINE)
        assert users, f"the last stage of {path.name} sets no USER, so it runs as root"
        assert users[-1].split(":")[0] not in ("root", "0"), f"{path.name} runs as {users[-1]}"


def test_build_context_excludes_secrets():
    patterns = [line for line in (REPOSITORY / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert patterns[0] == "*", ".dockerignore must exclude everything first and then list what the images copy"
    reincluded = [line for line in patterns if line.startswith("!compose") or line.startswith("!.venv")]
    assert not reincluded, f".dockerignore lets {reincluded} into the build context"


# --- commands, variables, health checks -------------------------------------------------------


@pytest.mark.parametrize("label", LINE_SETS)
def test_commands_parse_with_own_parser(resolved, label, monkeypatch):
    for name, service in sdrm_services(resolved[label]).items():
        command, config = resolve_service(service, monkeypatch)
        assert config.line == "line1", f"{name}: line {config.line!r}"
        assert instance_id(command, config), f"{name}: empty instance id"


@pytest.mark.parametrize("label", LINE_SETS)
def test_variables_name_service_options(resolved, label):
    for name, service in sdrm_services(resolved[label]).items():
        command = str(service["command"][0])
        known = option_variables(parser_of(command)) | EXTRA_VARIABLES
        for variable in service.get("environment") or {}:
            if variable.startswith(cfg.ENV_PREFIX):
                assert variable in known, f"{name}: {variable} is no option of `sdrm {command}`"


@pytest.mark.parametrize("label", LINE_SETS)
def test_health_checks_read_own_status(resolved, label, monkeypatch):
    topics = load_topics()
    for name, service in sdrm_services(resolved[label]).items():
        command, config = resolve_service(service, monkeypatch)
        if command not in health.STATUS_TOPICS:
            continue
        environment = service.get("environment") or {}
        check = resolve_in(health.build_parser(), health_argv(service), "health", environment, monkeypatch)

        assert check.service == command, f"{name}: the health check reads a {check.service}, the command is {command}"
        assert check.id == instance_id(command, config), f"{name}: the health check reads id {check.id!r}"
        assert check.broker == config.broker, f"{name}: the health check uses broker {check.broker}"
        assert check.line == config.line, f"{name}: the health check uses line {check.line}"
        assert check.username == config.username, f"{name}: the health check logs in as {check.username}"

        topic_name, ids = health.status_subscription(topics, check.service, check.id)
        spec = topics.spec(topic_name)
        assert command in spec.publishers, f"{name}: topics.yaml lists no {command} as publisher of {topic_name}"
        assert spec.retain, f"{name}: {topic_name} is not retained, so a health check cannot read it"


@pytest.mark.parametrize("label", LINE_SETS)
def test_credentials_one_user_per_instance(resolved, label, monkeypatch):
    document = resolved[label]
    users = []
    for name, service in sdrm_services(document).items():
        command, config = resolve_service(service, monkeypatch)
        user = config.username
        users.append(user)
        assert user == instance_id(command, config), f"{name}: username {user!r} differs from its id"

        assert user in secret_names(service), f"{name}: no compose secret named {user!r}"
        assert str(config.password_file) == f"/run/secrets/{user}", f"{name}: password file {config.password_file}"
        secret_file = Path(document["secrets"][user]["file"])
        assert secret_file == COMPOSE / "secrets" / f"{user}.password", f"secret {user} reads {secret_file}"
    assert len(users) == len(set(users)), f"usernames repeat: {users}"


def test_commented_camera_examples_parse(monkeypatch):
    text = (COMPOSE / "docker-compose.yml").read_text()
    examples = re.findall(r"^\s*#\s*command:\s*(\[.*\])\s*$", text, flags=re.MULTILINE)
    assert len(examples) >= 2, "the USB and RTSP camera examples are missing"
    for example in examples:
        words = yaml.safe_load(example.replace("${CAM1_URL}", "rtsp://camera-host:554/stream"))
        assert words[0] in SERVICES, f"example {words} is not an sdrm command"
        config = resolve_in(parser_of(words[0]), words[1:], words[0], {}, monkeypatch)
        assert config.source, f"example {words} sets no --source"


def test_ingest_stop_grace_exceeds_ack_timeout(resolved, monkeypatch):
    for name, service in sdrm_services(resolved["docker-compose.yml"]).items():
        if str(service["command"][0]) != "ingest":
            continue
        _, config = resolve_service(service, monkeypatch)
        grace_s = duration_seconds(service.get("stop_grace_period", "10s"))
        assert grace_s > config.ack_timeout_s, f"{name}: Docker kills ingest before its {config.ack_timeout_s} s acknowledgement wait"


def test_sparkplug_is_optional(resolved):
    for name, service in sdrm_services(resolved["docker-compose.yml"]).items():
        if str(service["command"][0]) == "sparkplug":
            assert service.get("profiles") == ["sparkplug"], f"{name} starts without --profile sparkplug"


def test_jetson_devices_require_gpu(resolved, monkeypatch):
    devices = {
        name: service
        for name, service in sdrm_services(resolved["docker-compose.yml + docker-compose.jetson.yml"]).items()
        if str(service["command"][0]) == "device"
    }
    assert devices, "the Jetson override leaves no device"
    for name, service in devices.items():
        assert service.get("runtime") == "nvidia", f"{name} does not use the NVIDIA runtime"
        assert service["build"]["dockerfile"] == "compose/Dockerfile.jetson", f"{name} builds {service['build']}"
        _, config = resolve_service(service, monkeypatch)
        assert config.require_gpu, f"{name} would fall back to the CPU"


# --- ports and topics -------------------------------------------------------------------------


@pytest.mark.parametrize("label", LINE_SETS)
def test_broker_urls_match_listeners(resolved, label, monkeypatch):
    listeners = mosquitto_listeners()
    for name, service in sdrm_services(resolved[label]).items():
        _, config = resolve_service(service, monkeypatch)
        host, port = cfg.parse_broker(config.broker)
        assert host == BROKER_SERVICE, f"{name}: broker host {host}, expected the compose service {BROKER_SERVICE}"
        assert port in listeners, f"{name}: port {port} is no listener of {MOSQUITTO_CONF.name}: {sorted(listeners)}"
        assert cfg.broker_uses_tls(config.broker) == listeners[port], f"{name}: {config.broker} and the listener disagree on TLS"


def test_published_broker_ports_are_listeners(resolved):
    listeners = mosquitto_listeners()
    broker = resolved["docker-compose.yml"]["services"][BROKER_SERVICE]
    for host_ip, port in container_ports(broker.get("ports", [])):
        assert port in listeners, f"published port {port} is no listener: {sorted(listeners)}"
        if not listeners[port]:
            assert host_ip == "127.0.0.1", f"plain MQTT port {port} is published beyond 127.0.0.1"


def test_broker_health_check_uses_plain_listener(resolved):
    broker = resolved["docker-compose.yml"]["services"][BROKER_SERVICE]
    script = " ".join(str(word) for word in broker["healthcheck"]["test"]).replace("$$", "$")
    port = int(re.search(r"mosquitto_sub .*-p (\d+)", script).group(1))
    assert mosquitto_listeners().get(port) is False, f"the broker health check connects to {port}, no plain listener"
    assert "$SYS/broker/uptime" in script, "the broker health check reads no $SYS topic"
    user = re.search(r"-u (\S+?)'", script).group(1)
    assert user in secret_names(broker), f"the broker container has no secret {user!r} for its health check"
    assert f"/run/secrets/{user}" in script, "the broker health check does not read its user's password from a secret"


def test_broker_files_are_mounted(resolved):
    broker = resolved["docker-compose.yml"]["services"][BROKER_SERVICE]
    targets = [str(volume).split(":")[1] if isinstance(volume, str) else volume["target"] for volume in broker["volumes"]]
    assert "/mosquitto/config/mosquitto.conf" in targets, "mosquitto.conf is not mounted"
    for path in mosquitto_paths():
        assert any(path == target or path.startswith(target.rstrip("/") + "/") for target in targets), (
            f"{MOSQUITTO_CONF.name} uses {path}, which no volume of {BROKER_SERVICE} provides"
        )


@pytest.mark.parametrize("label", LINE_SETS)
def test_metrics_ports_are_exposed(resolved, label, monkeypatch):
    for name, service in sdrm_services(resolved[label]).items():
        _, config = resolve_service(service, monkeypatch)
        port = getattr(config, "metrics_port", 0)
        exposed = {int(str(entry).split("/")[0]) for entry in service.get("expose", [])}
        exposed |= {target for _, target in container_ports(service.get("ports", []))}
        if port:
            assert port in exposed, f"{name}: metrics port {port} is not exposed ({sorted(exposed)})"
            assert config.metrics_host == "0.0.0.0", f"{name}: metrics listen on {config.metrics_host}, unreachable from other containers"
        assert exposed <= {port}, f"{name}: exposes {sorted(exposed)} but serves only metrics port {port}"


def test_topics_in_compose_files_exist():
    templates = [spec.template for spec in map(load_topics().spec, load_topics())]
    for path in COMPOSE.glob("docker-compose*.yml"):
        for topic in re.findall(r"\bsdrm/v1/[^\s'\"\]]+", path.read_text()):
            assert any(filter_fits_template(topic, template) for template in templates), (
                f"{path.name}: topic {topic} fits no template of topics.yaml"
            )


def test_duration_seconds_cases():
    assert duration_seconds("45s") == 45
    assert duration_seconds("1m30s") == 90
    assert duration_seconds("1m") == 60


def test_filter_fits_template_cases():
    assert filter_fits_template("sdrm/v1/line1/verdict/+", "sdrm/v1/{line}/verdict/{camera}")
    assert filter_fits_template("sdrm/v1/+/verdict/#", "sdrm/v1/{line}/verdict/{camera}/last")
    assert not filter_fits_template("sdrm/v1/line1/verdicts/+", "sdrm/v1/{line}/verdict/{camera}")
    assert not filter_fits_template("sdrm/v1/line1/verdict", "sdrm/v1/{line}/verdict/{camera}")
