"""MQTT topic names, QoS and retain flags, loaded from topics.yaml.

topics.yaml at the repository root is the single source of truth for the topic tree. Services
build every topic and subscription filter through a TopicMap instead of formatting strings
themselves, and every id that goes into a topic passes `validate_id` first.

Namespaces: the optional top-level `namespaces` key contains further topic trees with their own
root, such as the Sparkplug B topics of the `sdrm sparkplug` bridge under `spBv1.0/{group}`.
load_topics() always validates them, but adds a namespace's topics to the returned TopicMap only
when asked to (`load_topics(namespaces=("sparkplug",))`). Topic names and templates are unique
across all namespaces.

Finding topics.yaml when no path is given:
1. `<repository root>/topics.yaml`, found as the parent of this package's folder. This covers a
   source checkout and an editable install (`pip install -e .`).
2. `topics.yaml` inside the installed `services` package, read with importlib.resources.

NOTE: a regular (non-editable) wheel contains only files inside the packages, so the second path
works only if the build copies topics.yaml into services/. pyproject's package-data already
includes `*.yaml` files there.
"""

from __future__ import annotations

import importlib.resources
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel

from sdrm import messages

TOPICS_FILE = "topics.yaml"
PLACEHOLDERS = ("line", "camera", "device", "service", "group")
MAX_ID_LENGTH = 64
PAYLOAD_KINDS = ("binary:frame", "binary:blocks", "binary:partials", "image-or-binary:frame", "protobuf:sparkplug-b")

_REQUIRED_KEYS = {"template", "qos", "retain", "payload", "publishers", "subscribers", "description"}
_OPTIONAL_KEYS = {"shared_group", "will"}
_TOP_LEVEL_KEYS = {"version", "root", "topics"}
_NAMESPACE_KEYS = {"root", "topics"}
_PLACEHOLDER_LEVEL = re.compile(r"\{([^{}]*)\}")
_WILL_STATES = get_args(messages.Status.model_fields["state"].annotation)


class TopicsError(ValueError):
    """Raised when topics.yaml is missing, malformed or inconsistent."""


def validate_id(kind: str, value: str) -> str:
    """Return value if it is safe as one MQTT topic level for a {kind} placeholder.

    Raises ValueError for non-strings, empty values, values longer than MAX_ID_LENGTH
    characters, '/', '+', '#', control characters or a leading '$' (reserved for broker topics).
    """
    if not isinstance(value, str):
        raise ValueError(f"invalid {kind} id {value!r}: it must be a str")
    if not value:
        raise ValueError(f"invalid {kind} id '': it must not be empty; set a name such as '{kind}1'")
    if len(value) > MAX_ID_LENGTH:
        raise ValueError(
            f"invalid {kind} id {value[:20]!r}... ({len(value)} characters): use at most {MAX_ID_LENGTH} characters"
        )
    for char in ("/", "+", "#"):
        if char in value:
            raise ValueError(
                f"invalid {kind} id {value!r}: it must not contain {char!r}, which MQTT treats as a "
                f"level separator or wildcard; use '-' or '_' instead"
            )
    for char in value:
        if unicodedata.category(char) == "Cc":
            raise ValueError(
                f"invalid {kind} id {value!r}: it contains the control character U+{ord(char):04X}; remove it"
            )
    if value.startswith("$"):
        raise ValueError(
            f"invalid {kind} id {value!r}: a leading '$' is reserved for broker topics such as $SYS; remove it"
        )
    return value


@dataclass(frozen=True)
class TopicSpec:
    """One entry of topics.yaml."""

    name: str
    template: str
    qos: int
    retain: bool
    payload: str
    publishers: tuple[str, ...]
    subscribers: tuple[str, ...]
    description: str
    shared_group: str | None = None
    will: str | None = None  # Status state the broker publishes as the publisher's last will

    @property
    def levels(self) -> tuple[str, ...]:
        return tuple(self.template.split("/"))

    @property
    def placeholders(self) -> tuple[str, ...]:
        """Placeholder names in template order, e.g. ("line", "camera")."""
        return tuple(_placeholder(level) for level in self.levels if _placeholder(level) is not None)


class TopicMap:
    """Validated topic tree: fills templates, builds subscription filters and parses topics back."""

    def __init__(self, root: str, specs: dict[str, TopicSpec], source: str = "<memory>") -> None:
        self.root = root
        self.source = source
        self._specs = dict(specs)

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def names(self) -> list[str]:
        return list(self._specs)

    def spec(self, name: str) -> TopicSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise KeyError(f"unknown topic {name!r}: {self.source} defines {', '.join(self._specs)}") from None

    def qos(self, name: str) -> int:
        return self.spec(name).qos

    def retain(self, name: str) -> bool:
        return self.spec(name).retain

    def topic(self, name: str, **ids: str) -> str:
        """Fill the template of topic `name` with ids, each checked by validate_id.

        Raises ValueError when an id is invalid, missing or not a placeholder of the template.
        """
        spec = self.spec(name)
        self._check_id_names(spec, ids)
        missing = [key for key in spec.placeholders if key not in ids]
        if missing:
            raise ValueError(
                f"topic {name!r} ({spec.template}) needs ids {', '.join(missing)}: pass them as keyword arguments"
            )
        return "/".join(_fill(level, ids) for level in spec.levels)

    def filter(self, name: str, shared: bool | str = False, **ids: str) -> str:
        """Build a subscription filter for topic `name`; placeholders without an id become '+'.

        shared=True prefixes `$share/<shared_group>/` with the group from topics.yaml, and a str
        names the group directly. Raises ValueError for invalid ids, or for shared=True on a topic
        without a shared_group.
        """
        spec = self.spec(name)
        self._check_id_names(spec, ids)
        levels = [_fill(level, ids) if _placeholder(level) in ids else _wildcard(level) for level in spec.levels]
        topic_filter = "/".join(levels)
        if shared is False:
            return topic_filter

        if shared is True:
            if spec.shared_group is None:
                raise ValueError(
                    f"topic {name!r} has no shared_group in {self.source}: add one or pass shared='<group>'"
                )
            group = spec.shared_group
        else:
            group = validate_id("shared group", shared)
        return f"$share/{group}/{topic_filter}"

    def match(self, name: str, topic: str) -> dict[str, str] | None:
        """Return the ids in a received topic if it matches topic `name`'s template, else None."""
        spec = self.spec(name)
        parts = topic.split("/")
        if len(parts) != len(spec.levels):
            return None

        ids: dict[str, str] = {}
        for level, part in zip(spec.levels, parts):
            key = _placeholder(level)
            if key is None:
                if level != part:
                    return None
                continue
            try:
                ids[key] = validate_id(key, part)
            except ValueError:
                return None
        return ids

    def identify(self, topic: str) -> tuple[str, dict[str, str]] | None:
        """Return (topic name, ids) of the first entry whose template matches topic, else None."""
        for name in self._specs:
            ids = self.match(name, topic)
            if ids is not None:
                return name, ids
        return None

    def _check_id_names(self, spec: TopicSpec, ids: dict[str, str]) -> None:
        unknown = [key for key in ids if key not in spec.placeholders]
        if unknown:
            raise ValueError(
                f"topic {spec.name!r} ({spec.template}) has no placeholder {', '.join(unknown)}; "
                f"its placeholders are {', '.join(spec.placeholders) or 'none'}"
            )
        for key, value in ids.items():
            validate_id(key, value)


def _placeholder(level: str) -> str | None:
    match = _PLACEHOLDER_LEVEL.fullmatch(level)
    return match.group(1) if match else None


def _fill(level: str, ids: dict[str, str]) -> str:
    key = _placeholder(level)
    return level if key is None else ids[key]


def _wildcard(level: str) -> str:
    return level if _placeholder(level) is None else "+"


# ---------------------------------------------------------------------------------------------
# Loading and validation


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys, which PyYAML otherwise silently overwrites."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    keys = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in keys:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        keys.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def default_topics_path() -> Path | Traversable:
    """Return the topics.yaml that load_topics reads when no path is given (see the module docstring)."""
    checkout = Path(__file__).resolve().parent.parent / TOPICS_FILE
    if checkout.is_file():
        return checkout
    packaged = importlib.resources.files("services").joinpath(TOPICS_FILE)
    if packaged.is_file():
        return packaged
    raise TopicsError(
        f"{TOPICS_FILE} not found at {checkout} or inside the installed services package: "
        f"pass its path to load_topics() or install sdrm from a source checkout"
    )


def load_topics(path: str | Path | None = None, namespaces: tuple[str, ...] = ()) -> TopicMap:
    """Load and validate topics.yaml; path None reads default_topics_path().

    The returned map contains the topics of the main tree plus those of each named namespace.

    Raises TopicsError naming the file and the offending key for unreadable YAML, unknown or
    missing keys, QoS outside 0..2, unknown placeholders, wildcards, templates outside the root or
    duplicate templates.
    """
    source: Path | Traversable = Path(path) if path is not None else default_topics_path()
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as error:
        raise TopicsError(f"cannot read topics file {source}: {error}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        raise TopicsError(f"{source}: invalid YAML: {error}") from None
    return parse_topics(data, str(source), namespaces)


def parse_topics(data: Any, source: str = "<memory>", namespaces: tuple[str, ...] = ()) -> TopicMap:
    """Validate the loaded YAML document of a topics file and build its TopicMap.

    Raises TopicsError when a requested namespace is missing from the document.
    """
    if not isinstance(data, dict):
        raise TopicsError(
            f"{source}: expected a mapping with keys {sorted(_TOP_LEVEL_KEYS)}, got {type(data).__name__}"
        )
    _check_keys(source, "top level", data, _TOP_LEVEL_KEYS, _TOP_LEVEL_KEYS | {"namespaces"})
    if data["version"] != 1 or isinstance(data["version"], bool):
        raise TopicsError(f"{source}: unsupported version {data['version']!r}: this build reads version 1")

    templates: dict[str, str] = {}
    root, specs = _parse_tree(source, "", data, templates)

    extra = data.get("namespaces", {})
    if not isinstance(extra, dict):
        raise TopicsError(f"{source}: namespaces must be a mapping of namespace name -> {{root, topics}}")
    trees: dict[str, dict[str, TopicSpec]] = {}
    for namespace, tree in extra.items():
        where = f"namespaces.{namespace}"
        if not isinstance(tree, dict):
            raise TopicsError(f"{source}: {where} must be a mapping with keys {sorted(_NAMESPACE_KEYS)}")
        _check_keys(source, where, tree, _NAMESPACE_KEYS, _NAMESPACE_KEYS)
        _, trees[namespace] = _parse_tree(source, where + ".", tree, templates)

    for namespace in namespaces:
        if namespace not in trees:
            raise TopicsError(
                f"{source}: namespace {namespace!r} not found: the namespaces are {', '.join(trees) or 'none'}"
            )
        for name, spec in trees[namespace].items():
            if name in specs:
                raise TopicsError(
                    f"{source}: topic name {name!r} of namespace {namespace!r} repeats a topic name of the main tree"
                )
            specs[name] = spec
    return TopicMap(root, specs, source)


def _parse_tree(source: str, prefix: str, data: dict, templates: dict[str, str]) -> tuple[str, dict[str, TopicSpec]]:
    """Parse the root and topics of one tree; prefix is "" for the main tree or "namespaces.<name>.".

    templates maps every template parsed so far to the key path of its entry, and gains this tree's.
    """
    root = data["root"]
    if not isinstance(root, str):
        raise TopicsError(f"{source}: {prefix}root must be a str such as 'sdrm/v1/{{line}}', got {root!r}")
    _check_template(source, f"{prefix}root", root)

    topics = data["topics"]
    if not isinstance(topics, dict) or not topics:
        raise TopicsError(f"{source}: {prefix}topics must be a non-empty mapping of topic name -> entry")

    specs: dict[str, TopicSpec] = {}
    for name, entry in topics.items():
        spec = _parse_entry(source, root, name, entry, prefix)
        if spec.template in templates:
            raise TopicsError(
                f"{source}: {prefix}topics.{name}.template {spec.template!r} repeats {templates[spec.template]}; "
                f"every topic needs its own template"
            )
        templates[spec.template] = f"{prefix}topics.{name}"
        specs[name] = spec
    return root, specs


def _parse_entry(source: str, root: str, name: Any, entry: Any, prefix: str = "") -> TopicSpec:
    where = f"{prefix}topics.{name}"
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise TopicsError(f"{source}: invalid topic name {name!r}: use lower_snake_case")
    if not isinstance(entry, dict):
        raise TopicsError(f"{source}: {where} must be a mapping, got {type(entry).__name__}")
    _check_keys(source, where, entry, _REQUIRED_KEYS, _REQUIRED_KEYS | _OPTIONAL_KEYS)

    template = _require_str(source, f"{where}.template", entry["template"])
    _check_template(source, f"{where}.template", template)
    if not template.startswith(root + "/"):
        raise TopicsError(
            f"{source}: {where}.template {template!r} is not under the root {root!r}: prefix it with the root"
        )

    qos = entry["qos"]
    if isinstance(qos, bool) or qos not in (0, 1, 2):
        raise TopicsError(f"{source}: {where}.qos is {qos!r}: MQTT QoS must be 0, 1 or 2")
    retain = entry["retain"]
    if not isinstance(retain, bool):
        raise TopicsError(f"{source}: {where}.retain is {retain!r}: use true or false")

    payload = _require_str(source, f"{where}.payload", entry["payload"])
    _check_payload(source, f"{where}.payload", payload)

    shared_group = entry.get("shared_group")
    if shared_group is not None:
        try:
            validate_id("shared group", shared_group)
        except ValueError as error:
            raise TopicsError(f"{source}: {where}.shared_group: {error}") from None
    will = entry.get("will")
    if will is not None and will not in _WILL_STATES:
        raise TopicsError(f"{source}: {where}.will is {will!r}: use one of the Status states {', '.join(_WILL_STATES)}")

    return TopicSpec(
        name=name,
        template=template,
        qos=qos,
        retain=retain,
        payload=payload,
        publishers=_require_names(source, f"{where}.publishers", entry["publishers"]),
        subscribers=_require_names(source, f"{where}.subscribers", entry["subscribers"]),
        description=_require_str(source, f"{where}.description", entry["description"]).strip(),
        shared_group=shared_group,
        will=will,
    )


def _check_keys(source: str, where: str, mapping: dict, required: set[str], allowed: set[str]) -> None:
    unknown = sorted(str(key) for key in mapping if key not in allowed)
    if unknown:
        raise TopicsError(f"{source}: {where} has unknown keys {unknown}; allowed keys are {sorted(allowed)}")
    missing = sorted(required - set(mapping))
    if missing:
        raise TopicsError(f"{source}: {where} is missing required keys {missing}")


def _check_template(source: str, where: str, template: str) -> None:
    if "+" in template or "#" in template:
        raise TopicsError(
            f"{source}: {where} {template!r} contains an MQTT wildcard ('+' or '#'); "
            f"templates name concrete topics, and TopicMap.filter() adds wildcards"
        )
    if template.startswith("$"):
        raise TopicsError(f"{source}: {where} {template!r} starts with '$', which is reserved for broker topics")

    seen: set[str] = set()
    for level in template.split("/"):
        if not level:
            raise TopicsError(f"{source}: {where} {template!r} has an empty level (leading, trailing or double '/')")
        key = _placeholder(level)
        if key is None:
            if "{" in level or "}" in level:
                raise TopicsError(
                    f"{source}: {where} {template!r}: level {level!r} mixes a placeholder with text; "
                    f"a placeholder must fill a whole level, such as 'cam/{{camera}}'"
                )
            continue
        if key not in PLACEHOLDERS:
            raise TopicsError(
                f"{source}: {where} {template!r} has unknown placeholder {{{key}}}; use one of "
                f"{', '.join('{' + name + '}' for name in PLACEHOLDERS)}"
            )
        if key in seen:
            raise TopicsError(f"{source}: {where} {template!r} uses {{{key}}} twice")
        seen.add(key)


def _check_payload(source: str, where: str, payload: str) -> None:
    if payload in PAYLOAD_KINDS:
        return
    if payload.startswith("json:"):
        model = getattr(messages, payload[len("json:") :], None)
        if isinstance(model, type) and issubclass(model, BaseModel):
            return
        raise TopicsError(f"{source}: {where} {payload!r} names no model in sdrm.messages, such as json:Status")
    raise TopicsError(
        f"{source}: {where} {payload!r} is unknown: use one of {', '.join(PAYLOAD_KINDS)} or json:<Model>"
    )


def _require_str(source: str, where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise TopicsError(f"{source}: {where} must be a non-empty str, got {value!r}")
    return value


def _require_names(source: str, where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(item, str) and item for item in value):
        raise TopicsError(f"{source}: {where} must be a non-empty list of names, got {value!r}")
    return tuple(value)


# ---------------------------------------------------------------------------------------------
# Listing


def format_tree(topic_map: TopicMap) -> str:
    """Format the topic tree for `sdrm topics`: one line per topic, grouped by first level under the root.

    Each line shows the template below the root, the topic name, QoS, retain, payload kind,
    publishers -> subscribers and, where set, the shared group and will.
    """
    specs = sorted((topic_map.spec(name) for name in topic_map), key=lambda spec: spec.template)
    prefix = topic_map.root + "/"
    rows = []
    for spec in specs:
        extras = []
        if spec.shared_group:
            extras.append(f"shared: $share/{spec.shared_group}")
        if spec.will:
            extras.append(f"will: {spec.will}")
        rows.append(
            (
                spec.template.removeprefix(prefix),
                spec.name,
                f"qos {spec.qos}",
                "retained" if spec.retain else "-",
                spec.payload,
                f"{', '.join(spec.publishers)} -> {', '.join(spec.subscribers)}"
                + (f"  [{'; '.join(extras)}]" if extras else ""),
            )
        )

    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)] if rows else []
    lines = [topic_map.root]
    group = None
    for row in rows:
        first_level = row[0].split("/")[0]
        if group is not None and first_level != group:
            lines.append("")
        group = first_level
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        lines.append("  " + "  ".join(cells + [row[-1]]))
    return "\n".join(lines)
