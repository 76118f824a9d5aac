"""Topic tree from topics.yaml: filling, filters, matching, id checks and YAML validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from services.topics import TopicsError, default_topics_path, format_tree, load_topics, validate_id

REPO_TOPICS = Path(__file__).resolve().parent.parent / "topics.yaml"

# Example ids for every placeholder.
IDS = {"line": "line-1", "camera": "cam-7", "device": "jetson-2", "service": "aggregator-a"}


@pytest.fixture(scope="module")
def topics():
    return load_topics()


def write_topics(tmp_path: Path, change) -> Path:
    """Write a copy of topics.yaml after change(document) edits the loaded document in place."""
    document = yaml.safe_load(REPO_TOPICS.read_text(encoding="utf-8"))
    change(document)
    path = tmp_path / "topics.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# The shipped topics.yaml


def test_default_path_is_repo_file():
    assert Path(default_topics_path()) == REPO_TOPICS


def test_topics_expected_names(topics):
    assert set(topics) == {
        "frame",
        "frame_info",
        "camera_status",
        "blocks",
        "partials",
        "device_status",
        "load",
        "assignment",
        "verdict",
        "verdict_last",
        "service_status",
        "errors",
    }


def test_topics_unique_templates(topics):
    templates = [topics.spec(name).template for name in topics]
    assert len(templates) == len(set(templates))


def test_topics_common_root(topics):
    assert topics.root == "sdrm/v1/{line}"
    for name in topics:
        assert topics.spec(name).template.startswith(topics.root + "/"), name


@pytest.mark.parametrize(
    "name, topic, qos, retain",
    [
        ("frame", "sdrm/v1/line-1/cam/cam-7/frame", 1, False),
        ("camera_status", "sdrm/v1/line-1/cam/cam-7/status", 1, True),
        ("blocks", "sdrm/v1/line-1/dev/jetson-2/blocks", 1, False),
        ("partials", "sdrm/v1/line-1/dev/jetson-2/partials", 1, False),
        ("device_status", "sdrm/v1/line-1/dev/jetson-2/status", 1, True),
        ("load", "sdrm/v1/line-1/dev/jetson-2/load", 0, False),
        ("assignment", "sdrm/v1/line-1/sched/assignment", 1, True),
        ("verdict", "sdrm/v1/line-1/verdict/cam-7", 1, False),
        ("verdict_last", "sdrm/v1/line-1/verdict/cam-7/last", 1, True),
        ("service_status", "sdrm/v1/line-1/svc/aggregator-a/status", 1, True),
    ],
)
def test_topic_fill_and_flags(topics, name, topic, qos, retain):
    ids = {key: IDS[key] for key in topics.spec(name).placeholders}
    assert topics.topic(name, **ids) == topic
    assert topics.qos(name) == qos
    assert topics.retain(name) == retain


def test_topic_payload_kinds(topics):
    assert topics.spec("frame").payload == "image-or-binary:frame"
    assert topics.spec("blocks").payload == "binary:blocks"
    assert topics.spec("partials").payload == "binary:partials"
    assert topics.spec("load").payload == "json:LoadReport"
    assert topics.spec("verdict").payload == "json:Verdict"
    assert topics.spec("device_status").will == "offline"
    assert topics.spec("frame").shared_group == "compressors"


def test_fill_match_round_trip(topics):
    for name in topics:
        ids = {key: IDS[key] for key in topics.spec(name).placeholders}
        assert topics.match(name, topics.topic(name, **ids)) == ids, name


def test_identify_every_topic(topics):
    for name in topics:
        ids = {key: IDS[key] for key in topics.spec(name).placeholders}
        assert topics.identify(topics.topic(name, **ids)) == (name, ids)


@pytest.mark.parametrize(
    "name, topic",
    [
        ("frame", "sdrm/v1/line-1/cam/cam-7/status"),
        ("frame", "sdrm/v1/line-1/cam/cam-7/frame/extra"),
        ("frame", "sdrm/v2/line-1/cam/cam-7/frame"),
        ("frame", "sdrm/v1/line-1/cam//frame"),
        ("frame", "sdrm/v1/line-1/cam/$cam/frame"),
        ("verdict", "sdrm/v1/line-1/verdict/cam-7/last"),
    ],
)
def test_match_rejects_other_topics(topics, name, topic):
    assert topics.match(name, topic) is None


def test_identify_unknown_topic(topics):
    assert topics.identify("other/app/topic") is None


# ---------------------------------------------------------------------------------------------
# Filters


def test_filter_wildcards(topics):
    assert topics.filter("frame") == "sdrm/v1/+/cam/+/frame"
    assert topics.filter("frame", line="line-1") == "sdrm/v1/line-1/cam/+/frame"
    assert topics.filter("assignment", line="line-1") == "sdrm/v1/line-1/sched/assignment"
    assert topics.filter("partials", line="line-1", device="jetson-2") == "sdrm/v1/line-1/dev/jetson-2/partials"


def test_filter_shared_group(topics):
    assert topics.filter("frame", shared=True, line="line-1") == "$share/compressors/sdrm/v1/line-1/cam/+/frame"
    assert topics.filter("partials", shared="aggregators", line="line-1") == (
        "$share/aggregators/sdrm/v1/line-1/dev/+/partials"
    )


def test_filter_shared_without_group(topics):
    with pytest.raises(ValueError, match="topic 'partials' has no shared_group"):
        topics.filter("partials", shared=True)


def test_filter_shared_invalid_group(topics):
    with pytest.raises(ValueError, match="invalid shared group id"):
        topics.filter("frame", shared="a/b")


# ---------------------------------------------------------------------------------------------
# Ids


@pytest.mark.parametrize(
    "value, message",
    [
        ("", "must not be empty"),
        ("a/b", "must not contain '/'"),
        ("cam+1", r"must not contain '\+'"),
        ("cam#1", "must not contain '#'"),
        ("cam\x00", "control character U\\+0000"),
        ("cam\n1", "control character U\\+000A"),
        ("cam\x7f", "control character U\\+007F"),
        ("$SYS", "leading '\\$' is reserved"),
        ("c" * 65, "at most 64 characters"),
        (7, "it must be a str"),
    ],
)
def test_validate_id_rejects(value, message):
    with pytest.raises(ValueError, match=message):
        validate_id("camera", value)


@pytest.mark.parametrize("value", ["cam-7", "Line_1", "c" * 64, "kamera-ü", "a.b", "cam$1"])
def test_validate_id_accepts(value):
    assert validate_id("camera", value) == value


def test_topic_rejects_invalid_id(topics):
    with pytest.raises(ValueError, match="invalid camera id 'a/b'"):
        topics.topic("frame", line="line-1", camera="a/b")


def test_filter_rejects_invalid_id(topics):
    with pytest.raises(ValueError, match="invalid line id '#'"):
        topics.filter("frame", line="#")


def test_topic_missing_id(topics):
    with pytest.raises(ValueError, match="needs ids camera"):
        topics.topic("frame", line="line-1")


def test_topic_unknown_id(topics):
    with pytest.raises(ValueError, match="has no placeholder device"):
        topics.topic("frame", line="line-1", camera="cam-7", device="jetson-2")


def test_topic_unknown_name(topics):
    with pytest.raises(KeyError, match="unknown topic 'frames'"):
        topics.topic("frames", line="line-1")


# ---------------------------------------------------------------------------------------------
# YAML validation


def test_load_copy_from_tmp_path(tmp_path):
    path = write_topics(tmp_path, lambda document: None)
    assert load_topics(path).names() == load_topics().names()


def set_entry(name, key, value):
    def change(document):
        document["topics"][name][key] = value

    return change


def drop_entry_key(name, key):
    def change(document):
        del document["topics"][name][key]

    return change


@pytest.mark.parametrize(
    "change, message",
    [
        (set_entry("frame", "colour", "red"), r"topics.frame has unknown keys \['colour'\]"),
        (drop_entry_key("load", "qos"), r"topics.load is missing required keys \['qos'\]"),
        (set_entry("load", "qos", 3), "topics.load.qos is 3: MQTT QoS must be 0, 1 or 2"),
        (set_entry("load", "qos", True), "topics.load.qos is True"),
        (set_entry("load", "retain", "yes"), "topics.load.retain is 'yes'"),
        (set_entry("frame", "template", "sdrm/v1/{line}/cam/{cam}/frame"), r"unknown placeholder \{cam\}"),
        (set_entry("frame", "template", "sdrm/v1/{line}/cam/+/frame"), "contains an MQTT wildcard"),
        (set_entry("frame", "template", "sdrm/v1/{line}/cam/#"), "contains an MQTT wildcard"),
        (set_entry("frame", "template", "other/{line}/cam/{camera}/frame"), "is not under the root 'sdrm/v1/{line}'"),
        (set_entry("frame", "template", "sdrm/v1/{line}/cam-{camera}/frame"), "mixes a placeholder with text"),
        (set_entry("frame", "template", "sdrm/v1/{line}/cam/{camera}/"), "has an empty level"),
        (set_entry("frame", "template", "sdrm/v1/{line}/{line}/frame"), r"uses \{line\} twice"),
        (
            set_entry("frame", "template", "sdrm/v1/{line}/verdict/{camera}"),
            "topics.verdict.template .* repeats topics.frame",
        ),
        (set_entry("frame", "payload", "binary:video"), "'binary:video' is unknown"),
        (set_entry("frame", "payload", "json:Frame"), "names no model in sdrm.messages"),
        (set_entry("frame", "publishers", []), "topics.frame.publishers must be a non-empty list"),
        (set_entry("frame", "description", ""), "topics.frame.description must be a non-empty str"),
        (set_entry("frame", "shared_group", "a+b"), "topics.frame.shared_group: invalid shared group id"),
        (set_entry("device_status", "will", "gone"), "topics.device_status.will is 'gone'"),
        (lambda document: document.update(extra=1), r"top level has unknown keys \['extra'\]"),
        (lambda document: document.pop("root"), r"top level is missing required keys \['root'\]"),
        (lambda document: document.update(version=2), "unsupported version 2"),
        (lambda document: document.update(topics={}), "topics must be a non-empty mapping"),
        (lambda document: document["topics"].update({"Bad-Name": {}}), "invalid topic name 'Bad-Name'"),
    ],
)
def test_load_rejects_broken_copy(tmp_path, change, message):
    path = write_topics(tmp_path, change)
    with pytest.raises(TopicsError, match=message) as error:
        load_topics(path)
    assert str(path) in str(error.value)


def test_load_rejects_duplicate_key(tmp_path):
    text = REPO_TOPICS.read_text(encoding="utf-8")
    duplicated = text.replace("  camera_status:\n", "  frame:\n", 1)
    path = tmp_path / "topics.yaml"
    path.write_text(duplicated, encoding="utf-8")
    with pytest.raises(TopicsError, match="duplicate key 'frame'"):
        load_topics(path)


def test_load_rejects_invalid_yaml(tmp_path):
    path = tmp_path / "topics.yaml"
    path.write_text("topics: [unclosed\n", encoding="utf-8")
    with pytest.raises(TopicsError, match="invalid YAML"):
        load_topics(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(TopicsError, match="cannot read topics file"):
        load_topics(tmp_path / "absent.yaml")


def test_topics_error_is_value_error():
    assert issubclass(TopicsError, ValueError)


# ---------------------------------------------------------------------------------------------
# Listing


def test_format_tree_lists_every_topic(topics):
    text = format_tree(topics)
    lines = text.splitlines()

    assert lines[0] == "sdrm/v1/{line}"
    for name in topics:
        relative = topics.spec(name).template.removeprefix(topics.root + "/")
        assert any(line.split()[:2] == [relative, name] for line in lines), name
    assert "compressor -> device" in text
    assert "$share/compressors" in text
    assert "will: offline" in text
