"""`sdrm topics acl`: the Mosquitto ACL generated from topics.yaml, and the committed compose ACL."""

from __future__ import annotations

import shlex

import pytest

from services import acl
from services.topics import load_topics
from services.topics_cli import acl_main
from tests.secure_broker import COMPOSE_ACL, COMPOSE_USERS

TOPICS = load_topics()


def sections(text: str) -> dict[str, dict[str, str]]:
    """Parse an acl_file into {user: {topic filter: access}}."""
    result: dict[str, dict[str, str]] = {}
    user = None
    for line in text.splitlines():
        if line.startswith("user "):
            user = line.removeprefix("user ")
            result[user] = {}
        elif line.startswith("topic "):
            _, access, topic_filter = line.split(" ", 2)
            result[user][topic_filter] = access
    return result


def grants(role: str, user: str, line: str | None = None) -> dict[str, str]:
    return acl.grants(TOPICS, acl.ROLES[role], user, line)


# The committed compose ACL ------------------------------------------------------------------------


def committed_command() -> list[str]:
    for line in COMPOSE_ACL.read_text().splitlines():
        if line.startswith("#   sdrm topics acl "):
            return shlex.split(line.removeprefix("#   sdrm topics acl "))
    raise AssertionError(f"{COMPOSE_ACL} has no '#   sdrm topics acl' line in its header")


def test_committed_acl_matches_topics(tmp_path):
    out = tmp_path / "acl"
    assert acl_main([*committed_command(), "--out", str(out)]) == 0
    assert out.read_text() == COMPOSE_ACL.read_text(), (
        "compose/mosquitto/acl is out of date with topics.yaml: regenerate it with the command in its header "
        "and --out compose/mosquitto/acl"
    )


def test_committed_acl_covers_compose_users():
    assert set(sections(COMPOSE_ACL.read_text())) == set(COMPOSE_USERS)


# Grants per role -----------------------------------------------------------------------------------


def test_camera_grants():
    assert grants("camera", "cam1") == {
        "sdrm/v1/+/cam/cam1/frame": "write",
        "sdrm/v1/+/cam/cam1/status": "readwrite",
        "sdrm/v1/+/svc/cam1/status": "readwrite",
        "sdrm/v1/+/errors/cam1": "write",
    }


def test_device_grants():
    assert grants("device", "dev2") == {
        "sdrm/v1/+/dev/dev2/blocks": "read",
        "sdrm/v1/+/dev/dev2/partials": "write",
        "sdrm/v1/+/dev/dev2/status": "readwrite",
        "sdrm/v1/+/dev/dev2/load": "write",
        "sdrm/v1/+/sched/assignment": "read",
        "sdrm/v1/+/errors/dev2": "write",
    }


def test_scada_reads_only_verdicts():
    # The broker uptime is there for the broker's container health check, which logs in as scada.
    assert grants("scada", "scada") == {
        "sdrm/v1/+/verdict/+": "read",
        "sdrm/v1/+/verdict/+/last": "read",
        "$SYS/broker/uptime": "read",
    }


def test_sparkplug_grants():
    assert grants("sparkplug", "sparkplug") == {
        "sdrm/v1/+/cam/+/status": "read",
        "sdrm/v1/+/verdict/+": "read",
        "sdrm/v1/+/verdict/+/last": "read",
        "spBv1.0/#": "readwrite",
    }


def test_compressor_grants():
    granted = grants("compressor", "compressor")
    assert granted["sdrm/v1/+/cam/+/frame"] == "read"
    assert granted["sdrm/v1/+/dev/+/blocks"] == "write"
    assert granted["sdrm/v1/+/cam/+/frame_info"] == "write"
    assert granted["sdrm/v1/+/svc/compressor/status"] == "readwrite"
    assert "sdrm/v1/+/verdict/+" not in granted


def test_scheduler_reads_back_its_assignment():
    assert grants("scheduler", "scheduler")["sdrm/v1/+/sched/assignment"] == "readwrite"


# The instance of each publisher kind in topics.yaml: (role, username, ids of the topics it publishes).
PUBLISHERS = {
    "ingest": ("camera", "cam1", {"camera": "cam1", "service": "cam1"}),
    "device": ("device", "dev1", {"device": "dev1", "service": "dev1"}),
    "compressor": ("compressor", "compressor", {"camera": "cam1", "device": "dev1", "service": "compressor"}),
    "aggregator": ("aggregator", "aggregator", {"camera": "cam1", "service": "aggregator"}),
    "scheduler": ("scheduler", "scheduler", {"service": "scheduler"}),
}


def filter_matches(topic_filter: str, topic: str) -> bool:
    """Return whether an MQTT filter with '+' and a trailing '#' matches a topic."""
    levels, parts = topic_filter.split("/"), topic.split("/")
    if levels[-1] == "#":
        prefix = levels[:-1]
        return len(parts) >= len(prefix) and all(level in ("+", part) for level, part in zip(prefix, parts))
    return len(levels) == len(parts) and all(level in ("+", part) for level, part in zip(levels, parts))


def test_every_published_topic_is_writable():
    """Every line service may publish each topic that topics.yaml lists it as a publisher of."""
    for name in TOPICS:
        spec = TOPICS.spec(name)
        for kind in spec.publishers:
            if kind not in PUBLISHERS:
                continue
            role, user, ids = PUBLISHERS[kind]
            topic = TOPICS.topic(name, line="line1", **{key: ids[key] for key in spec.placeholders if key != "line"})
            writable = [f for f, access in grants(role, user).items() if "write" in access and filter_matches(f, topic)]
            assert writable, f"{kind} {user} may not publish {topic}"


def test_line_restricts_grants():
    granted = grants("camera", "cam1", line="line7")
    assert "sdrm/v1/line7/cam/cam1/frame" in granted
    assert all(topic_filter.startswith("sdrm/v1/line7/") for topic_filter in granted)


# Errors and the command ----------------------------------------------------------------------------


def test_unknown_role():
    with pytest.raises(acl.AclError, match="unknown role 'robot'"):
        acl.generate_acl(TOPICS, [("robot", "r1")])


def test_duplicate_user():
    with pytest.raises(acl.AclError, match="given twice"):
        acl.generate_acl(TOPICS, [("camera", "x1"), ("device", "x1")])


@pytest.mark.parametrize("user", ["a/b", "cam+", "#", "", "a b", "$admin"])
def test_invalid_username(user):
    with pytest.raises(acl.AclError):
        acl.generate_acl(TOPICS, [("camera", user)])


def test_command_writes_sections_in_order(tmp_path, capsys):
    out = tmp_path / "acl"
    assert acl_main(["--device", "dev9", "--camera", "cam9", "--line", "l1", "--out", str(out)]) == 0
    text = out.read_text()
    assert list(sections(text)) == ["dev9", "cam9"]
    assert "#   sdrm topics acl --device dev9 --camera cam9 --line l1" in text
    assert "wrote" in capsys.readouterr().err


def test_command_without_users(capsys):
    with pytest.raises(SystemExit) as caught:
        acl_main([])
    assert caught.value.code == 2
    assert "give at least one of" in capsys.readouterr().err


def test_command_invalid_user(capsys):
    assert acl_main(["--camera", "cam/1"]) == 2
    assert "invalid user id 'cam/1'" in capsys.readouterr().err
