"""JSON messages on the MQTT control and result topics: status, load, assignment and verdict.

Every model carries `schema_version`. A receiver accepts only SCHEMA_VERSION, because a new
version means an incompatible change. Adding an optional field does not change the version.

Unknown fields:
- `Status` and `LoadReport` ignore them (extra="ignore"). Devices and services on a line are
  upgraded one host at a time, so the scheduler must keep reading reports from newer senders that
  added optional fields.
- `Assignment`, `Verdict` and `Tile` reject them (extra="forbid"). A misread assignment routes
  heads to the wrong device and a misread verdict changes a quality decision, so the receiver
  fails loudly instead.

All models reject NaN and Inf.
"""

from __future__ import annotations

import unicodedata
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SCHEMA_VERSION = 1

ServiceKind = Literal["camera", "device", "compressor", "aggregator", "scheduler", "ingest"]

MAX_ID_LENGTH = 64


def _check_topic_id(value: str) -> str:
    """Reject ids that cannot be one MQTT topic level: '/', '+', '#', control characters, a leading '$'.

    The same rule as services.topics.validate_id, repeated here because ids in a payload become
    topic levels of later messages (a device id in an assignment names that device's blocks topic).
    """
    if len(value) > MAX_ID_LENGTH:
        raise ValueError(f"id of {len(value)} characters is longer than {MAX_ID_LENGTH}")
    for char in ("/", "+", "#"):
        if char in value:
            raise ValueError(f"id {value!r} contains {char!r}, which MQTT treats as a level separator or wildcard")
    if value.startswith("$") or any(unicodedata.category(char) == "Cc" for char in value):
        raise ValueError(f"id {value!r} starts with '$' or contains a control character")
    return value


TopicId = Annotated[str, Field(min_length=1), AfterValidator(_check_topic_id)]


class MessageError(ValueError):
    """Raised when a JSON payload is not a valid message of the requested model."""


class _Message(BaseModel):
    schema_version: int = SCHEMA_VERSION

    @model_validator(mode="before")
    @classmethod
    def _check_schema_version(cls, data: Any) -> Any:
        # Runs before field validation, so a message from a newer sender reports only the version.
        if isinstance(data, dict) and "schema_version" in data:
            version = data["schema_version"]
            if version != SCHEMA_VERSION or isinstance(version, bool):
                raise ValueError(
                    f"unsupported schema_version {version!r} for {cls.__name__}: this build reads version "
                    f"{SCHEMA_VERSION}; run the same sdrm version on sender and receiver"
                )
        return data


class Status(_Message):
    """Liveness of one service instance, published retained on connect, on clean exit and as the will.

    `session_epoch` increases with every process start (for example epoch ms at start), so a
    receiver can discard a will ("offline") that arrives after a newer "online" of the same id.
    """

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    state: Literal["online", "offline", "stopped"]
    service: ServiceKind
    id: TopicId
    session_epoch: int = Field(ge=0)
    ts_ms: int = Field(ge=0)
    info: dict[str, Any] | None = None  # e.g. a device's {"backend": "cuda", "heads": [0, 1]}


class LoadReport(_Message):
    """Periodic load of one device, sent to the scheduler."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    device: TopicId
    ts_ms: int = Field(ge=0)
    queue_depth: int = Field(ge=0)
    busy_ratio: float = Field(ge=0.0, le=1.0)  # fraction of wall time spent computing
    head_ms: dict[int, float] = Field(default_factory=dict)  # head id -> mean compute time in ms
    memory_mb: float = Field(ge=0.0)
    memory_fraction: float = Field(ge=0.0, le=1.0)  # used / total accelerator or host memory
    block_size: int = Field(ge=0)
    frames_done: int = Field(ge=0)
    speed: float = Field(ge=0.0)  # relative throughput in heads per second
    bandwidth_bytes_per_s: float = Field(ge=0.0)  # measured, or configured when not yet measured

    @field_validator("head_ms")
    @classmethod
    def _check_head_ms(cls, value: dict[int, float]) -> dict[int, float]:
        for head, ms in value.items():
            if head < 0 or ms < 0:
                raise ValueError(f"head_ms entry {head}: {ms} is invalid: head ids and times must be >= 0")
        return value


class Assignment(_Message):
    """Mapping of attention heads to devices, published retained by the scheduler.

    `epoch` increases with every new assignment. Receivers ignore an assignment with an epoch
    lower than the last one they applied.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    epoch: int = Field(ge=0)
    ts_ms: int = Field(ge=0)
    heads: dict[int, TopicId]  # head id -> device id
    devices: list[TopicId]
    reason: str = ""

    @model_validator(mode="after")
    def _check_heads(self) -> Assignment:
        known = set(self.devices)
        if len(known) != len(self.devices):
            raise ValueError(f"devices {self.devices} contains duplicates: list each device once")
        for head, device in self.heads.items():
            if head < 0:
                raise ValueError(f"head id {head} is invalid: head ids must be >= 0")
            if device not in known:
                raise ValueError(f"head {head} is assigned to device {device!r}, which is missing from devices")
        return self


class Tile(BaseModel):
    """Flagged region of a frame, in frame pixels, with its anomaly score."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    x: int = Field(ge=0)
    y: int = Field(ge=0)
    w: int = Field(gt=0)
    h: int = Field(gt=0)
    score: float = Field(ge=0.0, le=1.0)


class Verdict(_Message):
    """Inspection result for one frame, sent to SCADA/MES.

    `status` is "complete" when every head arrived, "incomplete" when the verdict was computed
    without `missing_heads`, "error" when no verdict could be computed, and "expired" when the
    frame was already older than the aggregator's deadline on arrival (after an outage), so it was
    not inspected. `error` contains the reason for "error" and "expired". Every status except
    "complete" carries the fail-safe label "defect" with score 1.0.
    `latency_ms` maps stage names to milliseconds; the aggregator adds "total".
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    line: TopicId
    camera: TopicId
    frame: int = Field(ge=0)
    capture_ms: int = Field(ge=0)
    label: Literal["ok", "defect"]
    score: float = Field(ge=0.0, le=1.0)
    threshold: float = Field(ge=0.0, le=1.0)
    tiles: list[Tile] = Field(default_factory=list)
    model_version: str
    phi: float | None = Field(default=None, gt=0.0, le=1.0)  # energy fraction, None without rank reduction
    ranks: dict[int, int] = Field(default_factory=dict)  # head id -> rank
    latency_ms: dict[str, float] = Field(default_factory=dict)
    status: Literal["complete", "incomplete", "error", "expired"]
    missing_heads: list[int] = Field(default_factory=list)
    error: str | None = None
    epoch: int = Field(ge=0)

    @model_validator(mode="after")
    def _check_status(self) -> Verdict:
        if self.status == "complete" and self.missing_heads:
            raise ValueError(f"status 'complete' with missing_heads {self.missing_heads}: use 'incomplete'")
        if self.status == "incomplete" and not self.missing_heads:
            raise ValueError("status 'incomplete' without missing_heads: list the heads that did not arrive")
        if self.status in ("error", "expired") and not self.error:
            raise ValueError(f"status {self.status!r} without an error message: set error")
        if self.status in ("complete", "incomplete") and self.error is not None:
            raise ValueError(f"error {self.error!r} set with status {self.status!r}: use status 'error'")
        for head, rank in self.ranks.items():
            if head < 0 or rank < 0:
                raise ValueError(f"ranks entry {head}: {rank} is invalid: head ids and ranks must be >= 0")
        for stage, ms in self.latency_ms.items():
            if ms < 0:
                raise ValueError(f"latency_ms[{stage!r}] is {ms}: durations must be >= 0")
        return self


class FrameInfo(_Message):
    """Announcement of one frame from the compressor to the aggregator, sent before its blocks.

    The aggregator learns about every frame from this message, so it can give each frame exactly
    one verdict even when some or all of its partials are lost. `heads` maps each head id to the
    device that received its block; heads missing from it had no device. `boxes` lists each tile's
    (x, y, w, h) in frame pixels, in the order of the model's batch. `error` is set, and `boxes`
    and `heads` are empty, when the frame could not be decoded or processed.
    """

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    line: TopicId
    camera: TopicId
    frame: int = Field(ge=0)
    capture_ms: int = Field(ge=0)
    epoch: int = Field(ge=0)
    width: int = Field(ge=0)
    height: int = Field(ge=0)
    boxes: list[tuple[int, int, int, int]] = Field(default_factory=list)
    heads: dict[int, TopicId] = Field(default_factory=dict)  # head id -> device id
    head_count: int = Field(ge=0)  # heads of the model; a verdict needs all of them
    ranks: dict[int, int] = Field(default_factory=dict)  # head id -> rank
    phi: float | None = Field(default=None, gt=0.0, le=1.0)
    latency_ms: dict[str, float] = Field(default_factory=dict)  # stage name -> milliseconds
    sent_ms: int = Field(ge=0)  # epoch ms when the compressor published the blocks
    compressor: str = ""
    error: str | None = None
    expired: bool = False  # with error: skipped as too old (overload or message expiry), not invalid
    # True when `frame` comes from the sender (sdrm ingest counts 0, 1, 2, ...), so a gap means a
    # lost frame. Plain images and unreadable payloads are numbered by the compressor instead.
    numbered_by_source: bool = False


class ErrorReport(_Message):
    """One rejected input or failed step of a service, published on its errors topic.

    Repeats of one `kind` are rate-limited by the sender: `count` is the total of that kind since
    the service started, and `suppressed` the number not reported since the previous report.
    """

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    service: ServiceKind
    id: TopicId
    kind: str = Field(min_length=1)  # e.g. "frame_invalid", "blocks_invalid", "payload_too_large"
    error: str
    topic: str | None = None  # topic of the rejected message, when there is one
    ts_ms: int = Field(ge=0)
    count: int = Field(ge=1)
    suppressed: int = Field(default=0, ge=0)
    ids: dict[str, str | int] = Field(default_factory=dict)  # camera, frame, device, head, epoch


ModelT = TypeVar("ModelT", bound=BaseModel)


def to_json(model: BaseModel) -> bytes:
    """Serialise a model to compact UTF-8 JSON bytes for an MQTT payload."""
    return model.model_dump_json().encode("utf-8")


def parse(model_cls: type[ModelT], payload: bytes | bytearray | str) -> ModelT:
    """Parse and validate a JSON payload as model_cls.

    Raises MessageError naming the model and every invalid field, for malformed JSON, wrong
    types, out-of-range values or an unsupported schema_version.
    """
    try:
        return model_cls.model_validate_json(payload)
    except ValidationError as error:
        raise MessageError(f"invalid {model_cls.__name__} message: {_describe(error)}") from None


def _describe(error: ValidationError) -> str:
    problems = []
    for item in error.errors(include_url=False):
        message = item["msg"].removeprefix("Value error, ")
        if not item["loc"]:
            # Whole-payload errors (invalid JSON, wrong schema_version) describe themselves.
            problems.append(message)
            continue
        location = ".".join(str(part) for part in item["loc"])
        if item["type"] == "missing":
            problems.append(f"{location}: {message}")
            continue
        value = repr(item.get("input"))
        if len(value) > 60:
            value = value[:57] + "..."
        problems.append(f"{location}: {message} (got {value})")
    return "; ".join(problems)
