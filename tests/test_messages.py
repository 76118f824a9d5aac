"""JSON message models: round trips, forward compatibility and parse errors."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from sdrm.messages import (
    SCHEMA_VERSION,
    Assignment,
    LoadReport,
    MessageError,
    Status,
    Tile,
    Verdict,
    parse,
    to_json,
)


def make_status(**changes) -> Status:
    fields = {
        "state": "online",
        "service": "device",
        "id": "jetson-2",
        "session_epoch": 1_733_000_000_000,
        "ts_ms": 1_733_000_000_500,
        "info": {"backend": "cuda", "heads": [0, 1, 2]},
    }
    fields.update(changes)
    return Status(**fields)


def make_load(**changes) -> LoadReport:
    fields = {
        "device": "jetson-2",
        "ts_ms": 1_733_000_001_000,
        "queue_depth": 2,
        "busy_ratio": 0.4,
        "head_ms": {0: 1.5, 3: 2.25},
        "memory_mb": 812.5,
        "memory_fraction": 0.21,
        "block_size": 4,
        "frames_done": 1200,
        "speed": 310.0,
        "bandwidth_bytes_per_s": 12_500_000.0,
    }
    fields.update(changes)
    return LoadReport(**fields)


def make_assignment(**changes) -> Assignment:
    fields = {
        "epoch": 7,
        "ts_ms": 1_733_000_002_000,
        "heads": {0: "jetson-1", 1: "jetson-2", 2: "jetson-1"},
        "devices": ["jetson-1", "jetson-2"],
        "reason": "jetson-2 came online",
    }
    fields.update(changes)
    return Assignment(**fields)


def make_verdict(**changes) -> Verdict:
    fields = {
        "line": "line-1",
        "camera": "cam-7",
        "frame": 991,
        "capture_ms": 1_733_000_003_000,
        "label": "defect",
        "score": 0.93,
        "threshold": 0.5,
        "tiles": [{"x": 224, "y": 0, "w": 224, "h": 224, "score": 0.93}],
        "model_version": "padim-2024-12-01",
        "phi": 0.9,
        "ranks": {0: 12, 1: 9},
        "latency_ms": {"compress": 3.1, "attention": 4.2, "total": 18.5},
        "status": "complete",
        "missing_heads": [],
        "error": None,
        "epoch": 7,
    }
    fields.update(changes)
    return Verdict(**fields)


def payload_with(model, **changes) -> bytes:
    """JSON of model with fields replaced, added or (value ...) removed."""
    data = json.loads(to_json(model))
    for key, value in changes.items():
        if value is ...:
            del data[key]
        else:
            data[key] = value
    return json.dumps(data).encode()


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize(
    "model",
    [make_status(), make_status(info=None, state="offline"), make_load(), make_assignment(), make_verdict()],
    ids=["status", "status-offline", "load", "assignment", "verdict"],
)
def test_model_round_trip(model):
    payload = to_json(model)

    assert isinstance(payload, bytes)
    assert json.loads(payload)["schema_version"] == SCHEMA_VERSION
    assert parse(type(model), payload) == model


def test_load_head_ids_stay_int():
    parsed = parse(LoadReport, to_json(make_load()))
    assert parsed.head_ms == {0: 1.5, 3: 2.25}


def test_assignment_head_ids_stay_int():
    parsed = parse(Assignment, to_json(make_assignment()))
    assert parsed.heads == {0: "jetson-1", 1: "jetson-2", 2: "jetson-1"}


def test_verdict_nrr_and_error():
    verdict = make_verdict(phi=None, status="error", error="no partials before the deadline", label="defect")
    assert parse(Verdict, to_json(verdict)).phi is None


def test_verdict_incomplete():
    verdict = make_verdict(status="incomplete", missing_heads=[3, 4])
    assert parse(Verdict, to_json(verdict)).missing_heads == [3, 4]


def test_parse_accepts_str_and_bytearray():
    payload = to_json(make_status())
    assert parse(Status, payload.decode()) == make_status()
    assert parse(Status, bytearray(payload)) == make_status()


def test_schema_version_default():
    payload = payload_with(make_status(), schema_version=...)
    assert parse(Status, payload).schema_version == SCHEMA_VERSION


# ---------------------------------------------------------------------------------------------
# Unknown fields


@pytest.mark.parametrize("model", [make_status(), make_load()], ids=["status", "load"])
def test_extra_field_ignored(model):
    parsed = parse(type(model), payload_with(model, added_in_a_later_release=3))
    assert parsed == model


@pytest.mark.parametrize("model", [make_assignment(), make_verdict()], ids=["assignment", "verdict"])
def test_extra_field_rejected(model):
    with pytest.raises(MessageError, match="unexpected_field: Extra inputs are not permitted"):
        parse(type(model), payload_with(model, unexpected_field=1))


def test_tile_extra_field_rejected():
    with pytest.raises(ValidationError):
        Tile(x=0, y=0, w=1, h=1, score=0.5, label="scratch")


# ---------------------------------------------------------------------------------------------
# Parse errors


@pytest.mark.parametrize("model_cls", [Status, LoadReport, Assignment, Verdict])
def test_parse_malformed_json(model_cls):
    with pytest.raises(MessageError, match=f"invalid {model_cls.__name__} message: Invalid JSON"):
        parse(model_cls, b'{"state": ')


def test_parse_not_an_object():
    with pytest.raises(MessageError, match="invalid Status message: Input should be an object"):
        parse(Status, b"[1, 2]")


@pytest.mark.parametrize("model", [make_status(), make_load(), make_assignment(), make_verdict()])
def test_parse_unsupported_schema_version(model):
    name = type(model).__name__
    with pytest.raises(MessageError, match=f"unsupported schema_version 2 for {name}: this build reads version 1"):
        parse(type(model), payload_with(model, schema_version=2))


def test_parse_schema_version_reported_alone():
    with pytest.raises(MessageError) as error:
        parse(LoadReport, b'{"schema_version": 2, "device": 5}')
    assert "device" not in str(error.value)


def test_parse_missing_field():
    with pytest.raises(MessageError, match="invalid Status message: session_epoch: Field required"):
        parse(Status, payload_with(make_status(), session_epoch=...))


@pytest.mark.parametrize(
    "model, changes, message",
    [
        (make_status(), {"state": "sleeping"}, r"state: Input should be 'online', 'offline' or 'stopped'"),
        (make_status(), {"service": "printer"}, "service: Input should be 'camera'"),
        (make_status(), {"id": ""}, "id: String should have at least 1 character"),
        (make_status(), {"ts_ms": "soon"}, "ts_ms: Input should be a valid integer"),
        (make_load(), {"busy_ratio": 1.5}, r"busy_ratio: Input should be less than or equal to 1 \(got 1.5\)"),
        (make_load(), {"memory_fraction": -0.1}, "memory_fraction: Input should be greater than or equal to 0"),
        (make_load(), {"queue_depth": -1}, "queue_depth: Input should be greater than or equal to 0"),
        (make_load(), {"head_ms": {"x": 1.0}}, "head_ms.x"),
        (make_load(), {"head_ms": {"-1": 1.0}}, "head_ms entry -1"),
        (make_assignment(), {"epoch": -1}, "epoch: Input should be greater than or equal to 0"),
        (make_assignment(), {"heads": {"0": "ghost"}}, "head 0 is assigned to device 'ghost', which is missing"),
        (make_assignment(), {"devices": ["a", "a"]}, "contains duplicates"),
        (make_verdict(), {"label": "maybe"}, "label: Input should be 'ok' or 'defect'"),
        (make_verdict(), {"score": 2.0}, "score: Input should be less than or equal to 1"),
        (make_verdict(), {"phi": 0.0}, "phi: Input should be greater than 0"),
        (make_verdict(), {"tiles": [{"x": 0, "y": 0, "w": 0, "h": 5, "score": 0.1}]}, "tiles.0.w"),
        (make_verdict(), {"missing_heads": [2]}, "status 'complete' with missing_heads"),
        (make_verdict(), {"status": "incomplete"}, "status 'incomplete' without missing_heads"),
        (make_verdict(), {"status": "error"}, "status 'error' without an error message"),
        (make_verdict(), {"error": "boom"}, "error 'boom' set with status 'complete'"),
        (make_verdict(), {"latency_ms": {"total": -1.0}}, r"latency_ms\['total'\] is -1.0"),
        (make_verdict(), {"ranks": {"0": -2}}, "ranks entry 0: -2"),
    ],
)
def test_parse_invalid_values(model, changes, message):
    with pytest.raises(MessageError, match=message):
        parse(type(model), payload_with(model, **changes))


def test_parse_nan_rejected():
    payload = to_json(make_load()).replace(b'"speed":310.0', b'"speed":NaN')
    with pytest.raises(MessageError, match="speed: Input should be a finite number"):
        parse(LoadReport, payload)


def test_message_error_is_value_error():
    assert issubclass(MessageError, ValueError)
