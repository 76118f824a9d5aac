"""A Mosquitto acl_file for the instances of a line, generated from topics.yaml.

Each instance logs in with a username equal to its id (a camera id, a device id, or the --id of
the compressor, aggregator or scheduler) and gets one `user` section that grants exactly the
topics of its role. topics.yaml lists the publisher and subscriber kinds of every topic, and a
role acts as one or more of these kinds (`ROLES`):

- write: the topics its kinds publish. The instance's own id fills the role's placeholder
  ({camera} or {device}) and {service}, the id of its status and errors topics. Other
  placeholders become '+'.
- read: the topics its kinds subscribe to. The own id fills the role's placeholder, so a device
  reads only its own blocks. Other placeholders become '+'.
- readwrite: a retained topic that the role publishes, so that an instance can read its last
  state back after a restart (the scheduler continues the assignment epoch this way, and a health
  check reads the instance's own retained status).

{line} becomes '+' (every line) unless a line id is given. The `sparkplug` role also gets
readwrite on the Sparkplug B namespace `spBv1.0/#`, which lies outside topics.yaml.

Mosquitto denies every topic that no line of a user's section grants. Mosquitto 2.0.11 checks
the acl_file when a client publishes and when it delivers a message to a subscriber, but
grants every SUBSCRIBE: a client that subscribes outside its role gets a successful SUBACK and
no messages.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from services.topics import TopicMap, validate_id

# Topic filter of the Sparkplug B namespace (Eclipse Sparkplug 3.0, "spBv1.0/<group>/<type>/...").
SPARKPLUG_NAMESPACE = "spBv1.0/#"
ACCESS_ORDER = ("read", "write", "readwrite")


class AclError(ValueError):
    """Raised for an invalid or duplicate username or an unknown role."""


@dataclass(frozen=True)
class Role:
    """A kind of service instance, defined by the topics.yaml publisher and subscriber kinds it acts as."""

    name: str
    kinds: tuple[str, ...]
    own_placeholder: str | None = None  # filled with the instance id in read and write filters
    extra_reads: tuple[str, ...] = ()  # topics.yaml names read although the kinds do not subscribe
    extra_readwrite: tuple[str, ...] = ()  # filters outside topics.yaml
    extra_read_filters: tuple[str, ...] = ()  # read-only filters outside topics.yaml


# A camera user is the ingest of that camera or a smart camera that publishes by itself. The
# sparkplug role is the Sparkplug B bridge: it reads what SCADA reads plus the camera status.
ROLES = {
    "scheduler": Role("scheduler", ("scheduler",)),
    "compressor": Role("compressor", ("compressor",)),
    "aggregator": Role("aggregator", ("aggregator",)),
    "device": Role("device", ("device",), own_placeholder="device"),
    "camera": Role("camera", ("ingest", "camera"), own_placeholder="camera"),
    # The broker's container health check logs in as scada and reads the broker's uptime.
    "scada": Role("scada", ("scada",), extra_read_filters=("$SYS/broker/uptime",)),
    "sparkplug": Role(
        "sparkplug", ("sparkplug", "scada"), extra_reads=("camera_status",), extra_readwrite=(SPARKPLUG_NAMESPACE,)
    ),
}


def grants(topic_map: TopicMap, role: Role, user: str, line: str | None = None) -> dict[str, str]:
    """Return {topic filter: access} for one user of a role; access is read, write or readwrite."""
    access: dict[str, set[str]] = {}
    line_ids = {"line": line} if line is not None else {}
    for name in topic_map:
        spec = topic_map.spec(name)
        publishes = bool(set(spec.publishers) & set(role.kinds))
        subscribes = bool(set(spec.subscribers) & set(role.kinds)) or name in role.extra_reads
        if publishes:
            ids = _own_ids(spec.placeholders, (role.own_placeholder, "service"), user)
            modes = {"read", "write"} if spec.retain else {"write"}
            access.setdefault(topic_map.filter(name, **line_ids, **ids), set()).update(modes)
        if subscribes:
            ids = _own_ids(spec.placeholders, (role.own_placeholder,), user)
            access.setdefault(topic_map.filter(name, **line_ids, **ids), set()).add("read")
    for topic_filter in role.extra_readwrite:
        access.setdefault(topic_filter, set()).update({"read", "write"})
    for topic_filter in role.extra_read_filters:
        access.setdefault(topic_filter, set()).add("read")
    return {topic_filter: _access_word(modes) for topic_filter, modes in access.items()}


def _own_ids(placeholders: Iterable[str], own_keys: tuple[str | None, ...], user: str) -> dict[str, str]:
    return {key: user for key in placeholders if key in own_keys}


def _access_word(modes: set[str]) -> str:
    if modes == {"read", "write"}:
        return "readwrite"
    return next(iter(modes))


def check_username(user: str) -> str:
    """Return user if it can be both a Mosquitto username and a topic level, else raise AclError."""
    try:
        validate_id("user", user)
    except ValueError as error:
        raise AclError(str(error)) from None
    if any(char.isspace() for char in user):
        raise AclError(f"invalid user {user!r}: it must not contain spaces, because it is also a topic level")
    return user


def generate_acl(topic_map: TopicMap, users: list[tuple[str, str]], line: str | None = None, command: str = "") -> str:
    """Return the text of a Mosquitto acl_file with one `user` section per (role, user) pair.

    Sections follow the order of `users`, and the lines of a section the order of topics.yaml.
    command, when given, is written into the header as the way to regenerate the file. Raises
    AclError for an unknown role, an invalid username or a username given twice.
    """
    if line is not None:
        validate_id("line", line)
    lines = [
        "# Mosquitto acl_file of an SDRM line, generated from topics.yaml by `sdrm topics acl`.",
        "# Do not edit it by hand: change topics.yaml or the users, then regenerate it with",
        f"#   {command}" if command else "#   sdrm topics acl --help",
        "# Each user may use only the topics listed in its section; Mosquitto denies all others.",
    ]
    seen: set[str] = set()
    for role_name, user in users:
        role = ROLES.get(role_name)
        if role is None:
            raise AclError(f"unknown role {role_name!r}: use one of {', '.join(ROLES)}")
        check_username(user)
        if user in seen:
            raise AclError(f"user {user!r} is given twice: every instance needs its own username")
        seen.add(user)
        lines += ["", f"# {role.name} {user}", f"user {user}"]
        for topic_filter, access in grants(topic_map, role, user, line).items():
            lines.append(f"topic {access} {topic_filter}")
    return "\n".join(lines) + "\n"
