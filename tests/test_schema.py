"""The committed JSON Schemas in docs/schema/ equal the ones generated from the pydantic models."""

from __future__ import annotations

import json

import pytest

from sdrm import messages
from services import integrator_docs

REGENERATE = "run `python -m services.integrator_docs` to regenerate it"


@pytest.mark.parametrize("name", sorted(integrator_docs.SCHEMAS))
def test_committed_schema_matches_model(name):
    path = integrator_docs.schema_path(name)
    assert path.is_file(), f"{path} is missing: {REGENERATE}"
    committed = json.loads(path.read_text(encoding="utf-8"))
    generated = integrator_docs.schema_document(integrator_docs.SCHEMAS[name])
    assert committed == generated, f"{path} differs from the model: {REGENERATE}"


@pytest.mark.parametrize("name", sorted(integrator_docs.SCHEMAS))
def test_committed_schema_text_is_canonical(name):
    path = integrator_docs.schema_path(name)
    expected = integrator_docs.render_schema(integrator_docs.SCHEMAS[name])
    assert path.read_text(encoding="utf-8") == expected, f"{path} is formatted differently: {REGENERATE}"


def test_verdict_schema_lists_every_field():
    schema = integrator_docs.schema_document(messages.Verdict)
    assert set(schema["properties"]) == set(messages.Verdict.model_fields)
    assert schema["additionalProperties"] is False
    assert schema["$schema"] == integrator_docs.JSON_SCHEMA_DIALECT


def test_verdict_schema_states_enums():
    schema = integrator_docs.schema_document(messages.Verdict)
    assert schema["properties"]["label"]["enum"] == ["ok", "defect"]
    assert "complete" in schema["properties"]["status"]["enum"]
    assert schema["properties"]["score"]["minimum"] == 0.0
    assert schema["properties"]["score"]["maximum"] == 1.0



def test_verdict_schema_requires_fields_without_default():
    schema = integrator_docs.schema_document(messages.Verdict)
    without_default = {name for name, field in messages.Verdict.model_fields.items() if field.is_required()}
    assert set(schema["required"]) == without_default
    assert "capture_ms" in schema["required"]
