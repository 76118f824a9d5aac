"""docs/integrators.md and docs/node-red-flow.json agree with topics.yaml and the message models."""

from __future__ import annotations

import json
import re
from typing import get_args

import pytest

from sdrm import messages
from services import integrator_docs
from services.topics import load_topics

PAGE = integrator_docs.INTEGRATORS_PAGE
FLOW = integrator_docs.DOCS / "node-red-flow.json"
ALL_TOPICS = load_topics(namespaces=(integrator_docs.SPARKPLUG_NAMESPACE,))
REGENERATE = "run `python -m services.integrator_docs` to regenerate it"


@pytest.fixture(scope="module")
def page() -> str:
    return PAGE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def flow() -> list[dict]:
    return json.loads(FLOW.read_text(encoding="utf-8"))


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, re.DOTALL | re.MULTILINE)


def matches_filter(template: str, topic_filter: str) -> bool:
    """Return whether the MQTT filter (or concrete topic) can match topics of the template."""
    template_levels = template.split("/")
    filter_levels = topic_filter.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(template_levels):
            return False
        expected = template_levels[index]
        placeholder = expected.startswith("{") and expected.endswith("}")
        if level != "+" and not placeholder and level != expected:
            return False
    return len(filter_levels) == len(template_levels)


# ---------------------------------------------------------------------------------------------
# Generated parts


def test_generated_files_are_current():
    stale = [str(path) for path in integrator_docs.stale_files()]
    assert stale == [], f"out of date: {stale}; {REGENERATE}"


def test_check_command_passes():
    assert integrator_docs.main(["--check"]) == 0


def test_replace_blocks_is_idempotent(page):
    blocks = integrator_docs.generated_blocks(load_topics(), ALL_TOPICS)
    once = integrator_docs.replace_blocks(page, blocks)
    assert integrator_docs.replace_blocks(once, blocks) == once


def test_replace_blocks_fills_empty_block():
    text = "a\n<!-- generated:x -->\n<!-- end generated:x -->\nb\n"
    assert integrator_docs.replace_blocks(text, {"x": "TABLE"}) == "a\n<!-- generated:x -->\nTABLE\n<!-- end generated:x -->\nb\n"


def test_replace_blocks_missing_markers():
    with pytest.raises(ValueError, match="markers of block 'x' not found"):
        integrator_docs.replace_blocks("no markers here\n", {"x": "TABLE"})


def test_page_tables_list_every_topic(page):
    for name in ALL_TOPICS:
        spec = ALL_TOPICS.spec(name)
        retain = "yes" if spec.retain else "no"
        row = f"| `{name}` | `{spec.template}` | {spec.qos} | {retain} |"
        assert row in page, name


# ---------------------------------------------------------------------------------------------
# Hand-written text


def test_topic_strings_in_page_exist(page):
    filters = set(re.findall(r"(?:sdrm/v1|spBv1\.0)/[\w\-+#./{}]*[\w+#}]", page))
    assert "sdrm/v1/line1/verdict/+" in filters
    templates = [ALL_TOPICS.spec(name).template for name in ALL_TOPICS]
    for topic_filter in sorted(filters):
        assert any(matches_filter(template, topic_filter) for template in templates), topic_filter


def test_stated_qos_and_retain_match(page):
    statements = re.findall(r"\*\*((?:`\w+`(?:, )?)+)\*\* \(QoS (\d), (retained|not retained)\)", page)
    assert len(statements) >= 3
    stated_names = set()
    for names, qos, retain in statements:
        for name in re.findall(r"`(\w+)`", names):
            stated_names.add(name)
            assert name in ALL_TOPICS, name
            assert ALL_TOPICS.qos(name) == int(qos), name
            assert ALL_TOPICS.retain(name) == (retain == "retained"), name
    assert {"verdict", "verdict_last", "camera_status"} <= stated_names


def test_verdict_field_table_lists_model_fields(page):
    section = page.split("## Verdict message", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `(\w+)` \|", section, re.MULTILINE)
    assert sorted(documented) == sorted(messages.Verdict.model_fields)


def test_verdict_statuses_documented(page):
    section = page.split("## Verdict message", 1)[1].split("\n## ", 1)[0]
    for status in get_args(messages.Verdict.model_fields["status"].annotation):
        assert f"`{status}`" in section, status


def test_json_examples_are_valid_verdicts(page):
    examples = code_blocks(page, "json")
    assert examples
    for example in examples:
        messages.parse(messages.Verdict, example)


def test_python_examples_compile(page):
    examples = code_blocks(page, "python")
    assert len(examples) >= 2
    for index, example in enumerate(examples):
        compile(example, f"integrators.md python example {index}", "exec")


def test_schema_links_exist(page):
    for link in re.findall(r"\]\((schema/[\w.]+)\)", page):
        assert (integrator_docs.DOCS / link).is_file(), link


# ---------------------------------------------------------------------------------------------
# Node-RED flow


def nodes_by_type(flow: list[dict], kind: str) -> list[dict]:
    return [node for node in flow if node["type"] == kind]


def test_flow_subscribes_to_verdicts(flow):
    (subscriber,) = nodes_by_type(flow, "mqtt in")
    assert subscriber["topic"] == load_topics().filter("verdict", line="line1")
    assert int(subscriber["qos"]) == load_topics().qos("verdict")
    assert subscriber["datatype"] == "json"
    brokers = {node["id"] for node in nodes_by_type(flow, "mqtt-broker")}
    assert subscriber["broker"] in brokers


def test_flow_wires_point_to_nodes(flow):
    ids = [node["id"] for node in flow]
    assert len(ids) == len(set(ids))
    tab = nodes_by_type(flow, "tab")[0]["id"]
    for node in flow:
        if node["type"] not in ("tab", "mqtt-broker"):
            assert node["z"] == tab, node["id"]
        for output in node.get("wires", []):
            for target in output:
                assert target in ids, (node["id"], target)


def test_flow_routes_defects(flow):
    by_id = {node["id"]: node for node in flow}
    (subscriber,) = nodes_by_type(flow, "mqtt in")
    label_switch = by_id[subscriber["wires"][0][0]]
    assert label_switch["type"] == "switch"
    assert label_switch["property"] == "payload.label"
    assert label_switch["outputs"] == len(label_switch["rules"]) == len(label_switch["wires"])

    labels = get_args(messages.Verdict.model_fields["label"].annotation)
    values = [rule["v"] for rule in label_switch["rules"]]
    assert values == ["defect", "ok"]
    assert set(values) <= set(labels)

    status_switch = by_id[label_switch["wires"][0][0]]
    assert status_switch["property"] == "payload.status"
    statuses = get_args(messages.Verdict.model_fields["status"].annotation)
    assert status_switch["rules"][0] == {"t": "eq", "v": "complete", "vt": "str"}
    assert "complete" in statuses
    assert status_switch["rules"][1]["t"] == "else"
