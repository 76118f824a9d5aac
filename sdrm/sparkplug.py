"""Sparkplug B payloads: the protobuf `Payload` message, metric values and sequence numbers.

No protoc is needed: the message classes are built at import from a descriptor written in Python
(the subset in sdrm/sparkplug_b.proto, with the field numbers of Sparkplug B 3.0). They are built
in a private descriptor pool, so a generated sparkplug_b_pb2 module in the same process does not
collide with them.

Sparkplug B rules that this module encodes:
- `seq` runs 0..255 and wraps to 0 after 255 (SequenceNumber). NBIRTH carries seq 0, and NDEATH
  carries no seq.
- `bdSeq` (birth/death sequence) is a UInt64 metric in NBIRTH and NDEATH, 0..255, that pairs an
  NDEATH with the NBIRTH of the same MQTT session.
- All timestamps are epoch milliseconds (UTC): the payload's is the publish time, a metric's the
  time its value was acquired.

This module has no MQTT code. services/sparkplug.py publishes the payloads.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory

SEQ_MODULUS = 256  # seq and bdSeq wrap from 255 to 0
BDSEQ_METRIC = "bdSeq"
REBIRTH_METRIC = "Node Control/Rebirth"
PROTO_PACKAGE = "org.eclipse.tahu.protobuf"


class SparkplugError(ValueError):
    """Raised when bytes are not a valid Sparkplug B payload or a value does not fit its datatype."""


class DataType(enum.IntEnum):
    """Sparkplug B metric datatypes (the `datatype` field of a Metric)."""

    UNKNOWN = 0
    INT8 = 1
    INT16 = 2
    INT32 = 3
    INT64 = 4
    UINT8 = 5
    UINT16 = 6
    UINT32 = 7
    UINT64 = 8
    FLOAT = 9
    DOUBLE = 10
    BOOLEAN = 11
    STRING = 12
    DATETIME = 13  # epoch milliseconds (UTC) in long_value
    TEXT = 14
    UUID = 15
    DATASET = 16
    BYTES = 17
    FILE = 18
    TEMPLATE = 19

    @property
    def spec_name(self) -> str:
        """The datatype's name in the Sparkplug B specification, such as "UInt64" or "DateTime"."""
        return _SPEC_NAMES[self.value]


_SPEC_NAMES = (
    "Unknown", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64", "Float", "Double",
    "Boolean", "String", "DateTime", "Text", "UUID", "DataSet", "Bytes", "File", "Template",
)


# Bit width of the integer datatypes, and whether they are signed.
_INTEGER_BITS = {
    DataType.INT8: (8, True),
    DataType.INT16: (16, True),
    DataType.INT32: (32, True),
    DataType.INT64: (64, True),
    DataType.UINT8: (8, False),
    DataType.UINT16: (16, False),
    DataType.UINT32: (32, False),
    DataType.UINT64: (64, False),
    DataType.DATETIME: (64, False),
}
_VALUE_FIELD = {
    **{datatype: "int_value" for datatype in (DataType.INT8, DataType.INT16, DataType.INT32)},
    **{datatype: "int_value" for datatype in (DataType.UINT8, DataType.UINT16, DataType.UINT32)},
    DataType.INT64: "long_value",
    DataType.UINT64: "long_value",
    DataType.DATETIME: "long_value",
    DataType.FLOAT: "float_value",
    DataType.DOUBLE: "double_value",
    DataType.BOOLEAN: "boolean_value",
    DataType.STRING: "string_value",
    DataType.TEXT: "string_value",
    DataType.UUID: "string_value",
    DataType.BYTES: "bytes_value",
    DataType.FILE: "bytes_value",
}


# ---------------------------------------------------------------------------------------------
# Message classes built from a descriptor


def _field(
    name: str, number: int, kind: int, label: int = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL, **extra: Any
) -> descriptor_pb2.FieldDescriptorProto:
    return descriptor_pb2.FieldDescriptorProto(name=name, number=number, type=kind, label=label, **extra)


def build_file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """Return the descriptor of the subset in sdrm/sparkplug_b.proto (proto2)."""
    types = descriptor_pb2.FieldDescriptorProto
    metric = descriptor_pb2.DescriptorProto(
        name="Metric",
        field=[
            _field("name", 1, types.TYPE_STRING),
            _field("alias", 2, types.TYPE_UINT64),
            _field("timestamp", 3, types.TYPE_UINT64),
            _field("datatype", 4, types.TYPE_UINT32),
            _field("is_historical", 5, types.TYPE_BOOL),
            _field("is_transient", 6, types.TYPE_BOOL),
            _field("is_null", 7, types.TYPE_BOOL),
            _field("int_value", 10, types.TYPE_UINT32, oneof_index=0),
            _field("long_value", 11, types.TYPE_UINT64, oneof_index=0),
            _field("float_value", 12, types.TYPE_FLOAT, oneof_index=0),
            _field("double_value", 13, types.TYPE_DOUBLE, oneof_index=0),
            _field("boolean_value", 14, types.TYPE_BOOL, oneof_index=0),
            _field("string_value", 15, types.TYPE_STRING, oneof_index=0),
            _field("bytes_value", 16, types.TYPE_BYTES, oneof_index=0),
        ],
        oneof_decl=[descriptor_pb2.OneofDescriptorProto(name="value")],
    )
    payload = descriptor_pb2.DescriptorProto(
        name="Payload",
        field=[
            _field("timestamp", 1, types.TYPE_UINT64),
            _field(
                "metrics", 2, types.TYPE_MESSAGE, label=types.LABEL_REPEATED, type_name=f".{PROTO_PACKAGE}.Payload.Metric"
            ),
            _field("seq", 3, types.TYPE_UINT64),
            _field("uuid", 4, types.TYPE_STRING),
            _field("body", 5, types.TYPE_BYTES),
        ],
        nested_type=[metric],
    )
    return descriptor_pb2.FileDescriptorProto(
        name="sdrm/sparkplug_b.proto", package=PROTO_PACKAGE, syntax="proto2", message_type=[payload]
    )


def _build_payload_class() -> type[message.Message]:
    pool = descriptor_pool.DescriptorPool()
    pool.Add(build_file_descriptor())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PROTO_PACKAGE}.Payload"))


Payload = _build_payload_class()


# ---------------------------------------------------------------------------------------------
# Metrics and payloads


@dataclass(frozen=True)
class Metric:
    """One metric to encode: name, datatype and value (None encodes is_null), with its time.

    timestamp_ms is the acquisition time in epoch milliseconds (UTC), and None leaves it out.
    """

    name: str
    datatype: DataType
    value: Any = None
    timestamp_ms: int | None = None


def encode_payload(metrics: Iterable[Metric], timestamp_ms: int, seq: int | None = None) -> bytes:
    """Encode a Sparkplug B payload. seq None leaves the seq field out, as NDEATH requires.

    Raises SparkplugError when seq is outside 0..255 or a value does not fit its datatype.
    """
    payload = Payload()
    payload.timestamp = _check_unsigned("payload timestamp", timestamp_ms, 64)
    if seq is not None:
        if not 0 <= seq < SEQ_MODULUS:
            raise SparkplugError(f"seq {seq} is outside 0..{SEQ_MODULUS - 1}")
        payload.seq = seq
    for metric in metrics:
        _fill_metric(payload.metrics.add(), metric)
    return payload.SerializeToString()


def decode_payload(data: bytes) -> message.Message:
    """Decode a Sparkplug B payload. Raises SparkplugError for bytes that are not one."""
    payload = Payload()
    try:
        payload.ParseFromString(bytes(data))
    except message.DecodeError as error:
        raise SparkplugError(f"invalid Sparkplug B payload of {len(data)} bytes: {error}") from None
    return payload


def metric_value(metric: message.Message) -> Any:
    """Return the Python value of a decoded metric: None when it is null or has no value.

    A signed integer is read from the low bits of its datatype's width, so both the 32-bit two's
    complement that encode_payload writes and a narrower one from another encoder decode.
    """
    if metric.is_null:
        return None
    field = metric.WhichOneof("value")
    if field is None:
        return None
    value = getattr(metric, field)
    width = _INTEGER_BITS.get(metric.datatype)
    if width is not None and width[1]:
        bits = width[0]
        value &= (1 << bits) - 1
        if value >= 1 << (bits - 1):
            value -= 1 << bits
    return value


def metrics_by_name(payload: message.Message) -> dict[str, Any]:
    """Return {metric name: value} of a decoded payload (see metric_value)."""
    return {metric.name: metric_value(metric) for metric in payload.metrics}


def rebirth_requested(payload: message.Message) -> bool:
    """Return whether an NCMD payload sets `Node Control/Rebirth` to true."""
    return any(metric.name == REBIRTH_METRIC and metric_value(metric) is True for metric in payload.metrics)


def ndeath_payload(bdseq: int, timestamp_ms: int) -> bytes:
    """Encode an NDEATH payload: only the bdSeq metric and no seq."""
    return encode_payload([Metric(BDSEQ_METRIC, DataType.UINT64, bdseq)], timestamp_ms)


def _fill_metric(target: message.Message, metric: Metric) -> None:
    target.name = metric.name
    target.datatype = int(metric.datatype)
    if metric.timestamp_ms is not None:
        target.timestamp = _check_unsigned(f"timestamp of metric {metric.name!r}", metric.timestamp_ms, 64)
    if metric.value is None:
        target.is_null = True
        return

    field = _VALUE_FIELD.get(metric.datatype)
    if field is None:
        raise SparkplugError(f"metric {metric.name!r}: datatype {metric.datatype.name} is not supported by this encoder")
    setattr(target, field, _convert(metric, field))


def _convert(metric: Metric, field: str) -> Any:
    value = metric.value
    if field == "boolean_value":
        if not isinstance(value, bool):
            raise SparkplugError(f"metric {metric.name!r}: Boolean value must be a bool, got {value!r}")
        return value
    if field in ("float_value", "double_value"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SparkplugError(f"metric {metric.name!r}: {metric.datatype.name} value must be a number, got {value!r}")
        return float(value)
    if field == "string_value":
        if not isinstance(value, str):
            raise SparkplugError(f"metric {metric.name!r}: {metric.datatype.name} value must be a str, got {value!r}")
        return value
    if field == "bytes_value":
        if not isinstance(value, (bytes, bytearray)):
            raise SparkplugError(f"metric {metric.name!r}: {metric.datatype.name} value must be bytes, got {value!r}")
        return bytes(value)
    return _integer(metric)


def _integer(metric: Metric) -> int:
    """Return an integer value in its wire form, with a negative value as the two's complement of its field.

    The field is the uint32 int_value for Int8 to Int32 and the uint64 long_value for Int64, so
    -2 as Int8 becomes 0xFFFFFFFE, which a decoder that casts to the datatype's width reads as -2.
    """
    value = metric.value
    if isinstance(value, bool) or not isinstance(value, int):
        raise SparkplugError(f"metric {metric.name!r}: {metric.datatype.name} value must be an int, got {value!r}")
    bits, signed = _INTEGER_BITS[metric.datatype]
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if not low <= value <= high:
        raise SparkplugError(f"metric {metric.name!r}: value {value} is outside the {metric.datatype.name} range {low}..{high}")
    field_bits = 64 if bits == 64 else 32
    return value + (1 << field_bits) if value < 0 else value


def _check_unsigned(what: str, value: int, bits: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise SparkplugError(f"{what} {value!r} must be an int in 0..2^{bits}-1")
    return value


# ---------------------------------------------------------------------------------------------
# Sequence numbers


class SequenceNumber:
    """Sparkplug seq of one edge node: 0..255, reset to 0 by every NBIRTH, wrapping after 255.

    `value` is the seq of the next message. Call advance() only after that message was sent, so a
    message that was dropped before the broker saw it leaves no gap.
    """

    def __init__(self) -> None:
        self.value = 0

    def reset(self) -> None:
        self.value = 0

    def advance(self) -> int:
        """Move to the next seq and return it."""
        self.value = (self.value + 1) % SEQ_MODULUS
        return self.value


def next_bdseq(previous: int | None) -> int:
    """Return the bdSeq of a new MQTT session: 0 without a previous one, else previous + 1 mod 256."""
    return 0 if previous is None else (previous + 1) % SEQ_MODULUS
