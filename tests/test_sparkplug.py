"""Sparkplug B: the payload codec, the verdict metrics and the `sdrm sparkplug` bridge on a real broker.

The bridge runs as a subprocess (`sdrm sparkplug`) against the module's Mosquitto broker. The
tests publish Verdict and Status JSON themselves, so no model runs, and read the Sparkplug
messages back with a Bus on the same broker. Every test uses its own line id, which is the edge
node id, so messages of one test never reach another.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from google.protobuf import descriptor_pb2

from sdrm import messages, sparkplug
from sdrm.sparkplug_metrics import CAMERA_METRICS, NODE_METRICS, camera_metrics, node_metrics
from services.bus import Bus, Incoming, Will, now_ms
from services.topics import TopicsError, load_topics
from tests.broker import Services, mqtt_broker  # noqa: F401 - pytest fixture

PROTO_FILE = Path(__file__).resolve().parent.parent / "sdrm" / "sparkplug_b.proto"
TOPICS_FILE = Path(__file__).resolve().parent.parent / "topics.yaml"
GROUP = "plant-a"
SPARKPLUG_TOPICS = load_topics(namespaces=("sparkplug",))
NODE_MESSAGES = ("spb_nbirth", "spb_dbirth", "spb_ddata", "spb_ddeath")  # the messages that carry seq
WAIT_S = 15.0


def make_verdict(line: str, camera: str, frame: int, label: str = "ok", score: float = 0.1) -> messages.Verdict:
    return messages.Verdict(
        line=line,
        camera=camera,
        frame=frame,
        capture_ms=1_700_000_000_000 + frame,
        label=label,
        score=score,
        threshold=0.5,
        tiles=[messages.Tile(x=0, y=0, w=224, h=224, score=score)] if label == "defect" else [],
        model_version="test-model",
        latency_ms={"total": 42.5},
        status="complete",
        epoch=3,
    )


def make_status(camera: str, state: str, session_epoch: int) -> messages.Status:
    return messages.Status(state=state, service="camera", id=camera, session_epoch=session_epoch, ts_ms=session_epoch)


# ---------------------------------------------------------------------------------------------
# Sparkplug namespace of topics.yaml


def test_namespace_topics_only_on_request():
    main = load_topics()
    assert not any(name.startswith("spb_") for name in main)
    assert set(SPARKPLUG_TOPICS.names()) - set(main.names()) == {
        "spb_nbirth", "spb_ndeath", "spb_dbirth", "spb_ddata", "spb_ddeath", "spb_ncmd",
    }


@pytest.mark.parametrize(
    "name, topic, qos",
    [
        ("spb_nbirth", "spBv1.0/plant-a/NBIRTH/line1", 0),
        ("spb_ndeath", "spBv1.0/plant-a/NDEATH/line1", 1),
        ("spb_dbirth", "spBv1.0/plant-a/DBIRTH/line1/cam1", 0),
        ("spb_ddata", "spBv1.0/plant-a/DDATA/line1/cam1", 0),
        ("spb_ddeath", "spBv1.0/plant-a/DDEATH/line1/cam1", 0),
        ("spb_ncmd", "spBv1.0/plant-a/NCMD/line1", 0),
    ],
)
def test_sparkplug_topic_fill_and_flags(name, topic, qos):
    ids = {"group": GROUP, "line": "line1", "camera": "cam1"}
    spec = SPARKPLUG_TOPICS.spec(name)
    assert SPARKPLUG_TOPICS.topic(name, **{key: ids[key] for key in spec.placeholders}) == topic
    assert spec.qos == qos
    assert spec.retain is False
    assert spec.payload == "protobuf:sparkplug-b"


def write_namespace_copy(tmp_path: Path, change) -> Path:
    document = yaml.safe_load(TOPICS_FILE.read_text(encoding="utf-8"))
    change(document["namespaces"]["sparkplug"])
    path = tmp_path / "topics.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda tree: tree.update(extra=1), r"namespaces.sparkplug has unknown keys \['extra'\]"),
        (
            lambda tree: tree["topics"]["spb_ncmd"].update(template="other/{group}/NCMD/{line}"),
            "namespaces.sparkplug.topics.spb_ncmd.template .* is not under the root",
        ),
        (
            lambda tree: tree["topics"]["spb_ncmd"].update(template="spBv1.0/{group}/NBIRTH/{line}"),
            "repeats namespaces.sparkplug.topics.spb_nbirth",
        ),
        (lambda tree: tree["topics"]["spb_ncmd"].update(qos=5), "namespaces.sparkplug.topics.spb_ncmd.qos is 5"),
    ],
)
def test_namespace_validated_on_every_load(tmp_path, change, message):
    path = write_namespace_copy(tmp_path, change)
    with pytest.raises(TopicsError, match=message):
        load_topics(path)


def test_namespace_name_clash_rejected(tmp_path):
    def rename(tree):
        tree["topics"]["verdict"] = tree["topics"].pop("spb_ddata")

    path = write_namespace_copy(tmp_path, rename)
    assert "verdict" in load_topics(path)
    with pytest.raises(TopicsError, match="topic name 'verdict' of namespace 'sparkplug' repeats"):
        load_topics(path, namespaces=("sparkplug",))


def test_unknown_namespace_rejected():
    with pytest.raises(TopicsError, match="namespace 'opcua' not found"):
        load_topics(namespaces=("opcua",))


# ---------------------------------------------------------------------------------------------
# Payload codec


def test_encode_known_wire_bytes():
    # Hand-encoded protobuf: field 1 (timestamp) varint 1, field 2 (metrics) a 7-byte message with
    # name "a" (field 1), datatype 11 (field 4) and boolean_value true (field 14), field 3 (seq) 5.
    expected = bytes([0x08, 0x01, 0x12, 0x07, 0x0A, 0x01, 0x61, 0x20, 0x0B, 0x70, 0x01, 0x18, 0x05])
    encoded = sparkplug.encode_payload([sparkplug.Metric("a", sparkplug.DataType.BOOLEAN, True)], 1, seq=5)
    assert encoded == expected


def test_decode_known_wire_bytes():
    # Metric "x" with datatype 10 (Double) and double_value 0.5 (field 13, 64-bit), payload timestamp 7.
    data = bytes([0x08, 0x07, 0x12, 0x0E, 0x0A, 0x01, 0x78, 0x20, 0x0A, 0x69, 0, 0, 0, 0, 0, 0, 0xE0, 0x3F])
    payload = sparkplug.decode_payload(data)
    assert payload.timestamp == 7
    assert not payload.HasField("seq")
    assert sparkplug.metrics_by_name(payload) == {"x": 0.5}


@pytest.mark.parametrize(
    "datatype, value",
    [
        (sparkplug.DataType.INT8, -128),
        (sparkplug.DataType.INT16, -2),
        (sparkplug.DataType.INT32, -(2**31)),
        (sparkplug.DataType.INT64, -5),
        (sparkplug.DataType.UINT8, 255),
        (sparkplug.DataType.UINT32, 2**32 - 1),
        (sparkplug.DataType.UINT64, 2**64 - 1),
        (sparkplug.DataType.DATETIME, 1_700_000_000_123),
        (sparkplug.DataType.FLOAT, 0.5),
        (sparkplug.DataType.DOUBLE, 0.123456789),
        (sparkplug.DataType.BOOLEAN, False),
        (sparkplug.DataType.STRING, "défaut"),
        (sparkplug.DataType.BYTES, b"\x00\xff"),
        (sparkplug.DataType.DOUBLE, None),
    ],
)
def test_metric_round_trip(datatype, value):
    encoded = sparkplug.encode_payload([sparkplug.Metric("m", datatype, value, timestamp_ms=9)], 10, seq=0)
    metric = sparkplug.decode_payload(encoded).metrics[0]
    assert metric.datatype == datatype
    assert metric.timestamp == 9
    assert sparkplug.metric_value(metric) == value
    assert metric.is_null == (value is None)


def test_negative_int_32_bit_complement():
    encoded = sparkplug.encode_payload([sparkplug.Metric("m", sparkplug.DataType.INT8, -2)], 1)
    assert sparkplug.decode_payload(encoded).metrics[0].int_value == 2**32 - 2


def test_narrow_twos_complement_decodes():
    payload = sparkplug.Payload()
    metric = payload.metrics.add(name="m", datatype=int(sparkplug.DataType.INT8), int_value=254)
    assert sparkplug.metric_value(metric) == -2


@pytest.mark.parametrize(
    "metric, message",
    [
        (sparkplug.Metric("m", sparkplug.DataType.UINT8, 256), "outside the UINT8 range"),
        (sparkplug.Metric("m", sparkplug.DataType.INT8, -129), "outside the INT8 range"),
        (sparkplug.Metric("m", sparkplug.DataType.UINT32, True), "must be an int"),
        (sparkplug.Metric("m", sparkplug.DataType.BOOLEAN, 1), "must be a bool"),
        (sparkplug.Metric("m", sparkplug.DataType.STRING, 3), "must be a str"),
        (sparkplug.Metric("m", sparkplug.DataType.DOUBLE, "x"), "must be a number"),
        (sparkplug.Metric("m", sparkplug.DataType.DATASET, 1), "not supported"),
        (sparkplug.Metric("m", sparkplug.DataType.UINT64, 1, timestamp_ms=-1), "timestamp of metric"),
    ],
)
def test_encode_rejects_invalid_value(metric, message):
    with pytest.raises(sparkplug.SparkplugError, match=message):
        sparkplug.encode_payload([metric], 1)


def test_encode_rejects_seq_out_of_range():
    with pytest.raises(sparkplug.SparkplugError, match="seq 256"):
        sparkplug.encode_payload([], 1, seq=256)


def test_decode_rejects_garbage():
    with pytest.raises(sparkplug.SparkplugError, match="invalid Sparkplug B payload"):
        sparkplug.decode_payload(b"\x12\x7f\x00")


def test_unknown_fields_survive_round_trip():
    # A PropertySet (Metric field 9) from another encoder is kept though this subset lacks it.
    metric_bytes = bytes([0x0A, 0x01, 0x61, 0x4A, 0x03, 0x0A, 0x01, 0x6B])
    data = bytes([0x12, len(metric_bytes)]) + metric_bytes
    assert sparkplug.decode_payload(data).SerializeToString() == data


def test_rebirth_requested():
    rebirth = sparkplug.encode_payload([sparkplug.Metric(sparkplug.REBIRTH_METRIC, sparkplug.DataType.BOOLEAN, True)], 1)
    no_rebirth = sparkplug.encode_payload([sparkplug.Metric(sparkplug.REBIRTH_METRIC, sparkplug.DataType.BOOLEAN, False)], 1)
    other = sparkplug.encode_payload([sparkplug.Metric("Node Control/Reboot", sparkplug.DataType.BOOLEAN, True)], 1)
    assert sparkplug.rebirth_requested(sparkplug.decode_payload(rebirth))
    assert not sparkplug.rebirth_requested(sparkplug.decode_payload(no_rebirth))
    assert not sparkplug.rebirth_requested(sparkplug.decode_payload(other))


def test_ndeath_payload_bdseq_only():
    payload = sparkplug.decode_payload(sparkplug.ndeath_payload(17, 1234))
    assert not payload.HasField("seq")
    assert payload.timestamp == 1234
    assert sparkplug.metrics_by_name(payload) == {sparkplug.BDSEQ_METRIC: 17}
    assert payload.metrics[0].datatype == sparkplug.DataType.UINT64


def test_sequence_number_wraps():
    seq = sparkplug.SequenceNumber()
    values = [seq.value] + [seq.advance() for _ in range(257)]
    assert values[:3] == [0, 1, 2]
    assert values[255:258] == [255, 0, 1]
    seq.reset()
    assert seq.value == 0


def test_next_bdseq_wraps():
    assert sparkplug.next_bdseq(None) == 0
    assert sparkplug.next_bdseq(0) == 1
    assert sparkplug.next_bdseq(255) == 0


_PROTO_FIELD = re.compile(r"^\s*(optional|repeated)?\s*(\w+)\s+(\w+)\s*=\s*(\d+);", re.MULTILINE)
_PROTO_TYPES = {
    "string": descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
    "uint64": descriptor_pb2.FieldDescriptorProto.TYPE_UINT64,
    "uint32": descriptor_pb2.FieldDescriptorProto.TYPE_UINT32,
    "bool": descriptor_pb2.FieldDescriptorProto.TYPE_BOOL,
    "float": descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT,
    "double": descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE,
    "bytes": descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
    "Metric": descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
}


def test_descriptor_matches_proto_file():
    text = PROTO_FILE.read_text(encoding="utf-8")
    metric_block, payload_block = text.split("message Metric", 1)[1].split("\n    }\n", 1)
    descriptor = sparkplug.build_file_descriptor()
    payload = descriptor.message_type[0]
    metric = payload.nested_type[0]

    for block, message_descriptor in ((metric_block, metric), (payload_block, payload)):
        declared = {name: (kind, int(number), label) for label, kind, name, number in _PROTO_FIELD.findall(block)}
        built = {field.name: field for field in message_descriptor.field}
        assert set(declared) == set(built), message_descriptor.name
        for name, (kind, number, label) in declared.items():
            assert built[name].number == number, name
            assert built[name].type == _PROTO_TYPES[kind], name
            repeated = built[name].label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
            assert repeated == (label == "repeated"), name
    assert f"package {descriptor.package};" in text


# ---------------------------------------------------------------------------------------------
# Metrics of the line


def test_node_metrics_list_every_spec():
    metrics = node_metrics(7, "line1", "0.1.0")
    assert [metric.name for metric in metrics] == [spec.name for spec in NODE_METRICS]
    values = {metric.name: metric.value for metric in metrics}
    assert values[sparkplug.BDSEQ_METRIC] == 7
    assert values[sparkplug.REBIRTH_METRIC] is False


def test_camera_metrics_from_verdict():
    verdict = make_verdict("line1", "cam1", 12, label="defect", score=0.9)
    metrics = camera_metrics(verdict, timestamp_ms=5)
    assert [metric.name for metric in metrics] == [spec.name for spec in CAMERA_METRICS]
    values = {metric.name: metric.value for metric in metrics}
    assert values["Inspection/Defect"] is True
    assert values["Inspection/Score"] == 0.9
    assert values["Inspection/Frame"] == 12
    assert values["Inspection/Capture Time"] == verdict.capture_ms
    assert values["Inspection/Latency"] == 42.5
    assert values["Inspection/Flagged Tiles"] == 1
    assert values["Inspection/Error"] is None
    assert {metric.timestamp_ms for metric in metrics} == {verdict.capture_ms}


def test_camera_metrics_without_verdict_are_null():
    metrics = camera_metrics(None, timestamp_ms=5)
    assert all(metric.value is None for metric in metrics)
    assert {metric.timestamp_ms for metric in metrics} == {5}
    decoded = sparkplug.decode_payload(sparkplug.encode_payload(metrics, 5, seq=1))
    assert all(metric.is_null for metric in decoded.metrics)


def test_every_camera_metric_encodes():
    verdict = make_verdict("line1", "cam1", 1)
    decoded = sparkplug.decode_payload(sparkplug.encode_payload(camera_metrics(verdict, 1), 1, seq=0))
    assert len(decoded.metrics) == len(CAMERA_METRICS)


# ---------------------------------------------------------------------------------------------
# Bus will


def test_bus_rejects_will_with_status(mqtt_broker):
    with pytest.raises(ValueError, match="status_topic=None"):
        Bus(
            topics=SPARKPLUG_TOPICS, broker=mqtt_broker.url, line="line1", service="sparkplug", instance="x",
            will=lambda: Will("spb_ndeath", b"", {"group": GROUP}),
        )


# ---------------------------------------------------------------------------------------------
# The bridge on a real broker


@dataclass
class Received:
    """One Sparkplug message: the topics.yaml name, the camera (None for node messages), the payload."""

    name: str
    camera: str | None
    payload: object  # decoded sparkplug.Payload

    @property
    def seq(self) -> int | None:
        return self.payload.seq if self.payload.HasField("seq") else None

    def metrics(self) -> dict[str, object]:
        return sparkplug.metrics_by_name(self.payload)


class SparkplugProbe:
    """Collects the Sparkplug messages of one edge node in arrival order and publishes SDRM inputs."""

    def __init__(self, broker_url: str, line: str) -> None:
        self.line = line
        self.received: list[Received] = []
        self._changed = threading.Condition()
        self.bus = Bus(
            topics=SPARKPLUG_TOPICS, broker=broker_url, line=line, service="probe",
            instance=f"probe-{time.time_ns()}", status_topic=None,
        )
        for name in ("spb_nbirth", "spb_ndeath", "spb_dbirth", "spb_ddata", "spb_ddeath"):
            self.bus.subscribe(name, self._collect, group=GROUP)
        if not self.bus.start(wait_s=10.0):
            raise RuntimeError(f"probe could not connect to {broker_url}")

    def _collect(self, incoming: Incoming) -> None:
        item = Received(incoming.name, incoming.ids.get("camera"), sparkplug.decode_payload(incoming.payload))
        with self._changed:
            self.received.append(item)
            self._changed.notify_all()

    def all(self, *names: str) -> list[Received]:
        with self._changed:
            return [item for item in self.received if not names or item.name in names]

    def wait_count(self, name: str, count: int, timeout_s: float = WAIT_S) -> list[Received]:
        """Wait until `count` messages of topic `name` arrived; return them (fewer after a timeout)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while len([item for item in self.received if item.name == name]) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(min(remaining, 0.1))
            return [item for item in self.received if item.name == name]

    def publish_verdict(self, verdict: messages.Verdict):
        return self.bus.publish("verdict", messages.to_json(verdict), camera=verdict.camera)

    def publish_status(self, status: messages.Status):
        return self.bus.publish("camera_status", messages.to_json(status), camera=status.id)

    def publish_rebirth(self):
        payload = sparkplug.encode_payload(
            [sparkplug.Metric(sparkplug.REBIRTH_METRIC, sparkplug.DataType.BOOLEAN, True)], now_ms()
        )
        return self.bus.publish("spb_ncmd", payload, group=GROUP)

    def close(self) -> None:
        for camera in {item.camera for item in self.received if item.camera}:
            self.bus.clear_retained("camera_status", camera=camera)
        self.bus.close()


@pytest.fixture
def bridge(mqtt_broker, tmp_path, request):
    """Start `sdrm sparkplug` for a line named after the test; yields (services, probe, start)."""
    line = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    services = Services(mqtt_broker.url, line, Path("unused"), tmp_path)
    probe = SparkplugProbe(mqtt_broker.url, line)
    bdseq_file = tmp_path / "bdseq"

    def start(name: str = "bridge"):
        return services.start(
            name, "sparkplug", "--group-id", GROUP, "--bdseq-file", str(bdseq_file), "--keepalive-s", "5", model=False
        )

    yield services, probe, start
    services.stop_all()
    probe.close()


def node_sequence(probe: SparkplugProbe) -> list[int | None]:
    return [item.seq for item in probe.all(*NODE_MESSAGES)]


def test_bridge_nbirth_first(bridge):
    services, probe, start = bridge
    start()
    births = probe.wait_count("spb_nbirth", 1)
    assert births, services.log("bridge")

    first = probe.all()[0]
    assert first.name == "spb_nbirth"
    assert first.seq == 0
    metrics = first.metrics()
    assert metrics[sparkplug.BDSEQ_METRIC] == 0
    assert metrics[sparkplug.REBIRTH_METRIC] is False
    assert metrics["Properties/Line"] == probe.line
    assert set(metrics) == {spec.name for spec in NODE_METRICS}
    assert first.payload.timestamp > 0


def test_bridge_dbirth_before_ddata(bridge):
    services, probe, start = bridge
    start()
    assert probe.wait_count("spb_nbirth", 1), services.log("bridge")

    sent = [make_verdict(probe.line, camera, frame) for frame in range(3) for camera in ("cam-a", "cam-b")]
    sent.append(make_verdict(probe.line, "cam-a", 3, label="defect", score=0.875))
    for verdict in sent:
        probe.publish_verdict(verdict)
    data = probe.wait_count("spb_ddata", len(sent))
    assert len(data) == len(sent), services.log("bridge")

    for camera in ("cam-a", "cam-b"):
        messages_of_camera = [item for item in probe.all() if item.camera == camera]
        assert messages_of_camera[0].name == "spb_dbirth", camera
        assert [item.name for item in messages_of_camera[1:]] == ["spb_ddata"] * (len(messages_of_camera) - 1), camera
        assert set(messages_of_camera[0].metrics()) == {spec.name for spec in CAMERA_METRICS}, camera
    assert len(probe.all("spb_dbirth")) == 2

    last = data[-1]
    assert last.camera == "cam-a"
    values = last.metrics()
    assert values["Inspection/Defect"] is True
    assert values["Inspection/Score"] == 0.875
    assert values["Inspection/Frame"] == 3
    assert values["Inspection/Flagged Tiles"] == 1
    assert values["Inspection/Capture Time"] == sent[-1].capture_ms
    assert [item.metrics()["Inspection/Frame"] for item in data if item.camera == "cam-b"] == [0, 1, 2]


def test_bridge_seq_increments_and_wraps(bridge):
    services, probe, start = bridge
    start()
    assert probe.wait_count("spb_nbirth", 1), services.log("bridge")

    verdict_count = 300
    infos = [probe.publish_verdict(make_verdict(probe.line, "cam-w", frame)) for frame in range(verdict_count)]
    assert all(info is not None for info in infos)
    data = probe.wait_count("spb_ddata", verdict_count, timeout_s=60.0)
    assert len(data) == verdict_count, services.log("bridge")

    sequence = node_sequence(probe)
    assert sequence[0] == 0
    assert len(sequence) == verdict_count + 2  # NBIRTH, DBIRTH, then one DDATA per verdict
    for index in range(1, len(sequence)):
        assert sequence[index] == (sequence[index - 1] + 1) % 256, (index, sequence[index - 1 : index + 1])
    assert sequence[255:258] == [255, 0, 1]
    frames = [item.metrics()["Inspection/Frame"] for item in data]
    assert frames == list(range(verdict_count))


def test_bridge_kill_then_restart(bridge):
    services, probe, start = bridge
    process = start()
    births = probe.wait_count("spb_nbirth", 1)
    assert births, services.log("bridge")
    bdseq = births[0].metrics()[sparkplug.BDSEQ_METRIC]

    process.send_signal(signal.SIGKILL)
    process.wait(10)
    deaths = probe.wait_count("spb_ndeath", 1)
    assert deaths, "the broker published no NDEATH will after kill -9"
    assert deaths[0].metrics() == {sparkplug.BDSEQ_METRIC: bdseq}
    assert deaths[0].seq is None

    start("bridge-restarted")
    births = probe.wait_count("spb_nbirth", 2)
    assert len(births) == 2, services.log("bridge-restarted")
    assert births[1].metrics()[sparkplug.BDSEQ_METRIC] == (bdseq + 1) % 256
    assert births[1].seq == 0


def test_bridge_clean_stop_publishes_ndeath(bridge):
    services, probe, start = bridge
    process = start()
    births = probe.wait_count("spb_nbirth", 1)
    assert births, services.log("bridge")

    process.terminate()
    assert process.wait(10) == 0, services.log("bridge")
    deaths = probe.wait_count("spb_ndeath", 1)
    assert deaths, services.log("bridge")
    assert deaths[0].metrics() == {sparkplug.BDSEQ_METRIC: births[0].metrics()[sparkplug.BDSEQ_METRIC]}


def test_bridge_bdseq_wraps_after_255(bridge, tmp_path):
    services, probe, start = bridge
    (tmp_path / "bdseq").write_text("255\n")
    start()
    births = probe.wait_count("spb_nbirth", 1)
    assert births, services.log("bridge")
    assert births[0].metrics()[sparkplug.BDSEQ_METRIC] == 0
    assert (tmp_path / "bdseq").read_text().strip() == "0"


def test_bridge_rebirth_command(bridge):
    services, probe, start = bridge
    start()
    assert probe.wait_count("spb_nbirth", 1), services.log("bridge")
    probe.publish_verdict(make_verdict(probe.line, "cam-r", 7, label="defect", score=0.75))
    assert probe.wait_count("spb_ddata", 1), services.log("bridge")
    before = len(probe.all())

    probe.publish_rebirth()
    births = probe.wait_count("spb_nbirth", 2)
    assert len(births) == 2, services.log("bridge")
    device_births = probe.wait_count("spb_dbirth", 2)
    assert len(device_births) == 2, services.log("bridge")

    after = probe.all()[before:]
    assert [item.name for item in after[:2]] == ["spb_nbirth", "spb_dbirth"]
    assert after[0].seq == 0
    assert after[1].seq == 1
    assert births[1].metrics()[sparkplug.BDSEQ_METRIC] == births[0].metrics()[sparkplug.BDSEQ_METRIC]
    reborn = after[1].metrics()
    assert after[1].camera == "cam-r"
    assert reborn["Inspection/Frame"] == 7
    assert reborn["Inspection/Score"] == 0.75


def test_bridge_ddeath_on_camera_offline(bridge):
    services, probe, start = bridge
    start()
    assert probe.wait_count("spb_nbirth", 1), services.log("bridge")

    probe.publish_status(make_status("cam-s", "online", session_epoch=1_000))
    births = probe.wait_count("spb_dbirth", 1)
    assert births, services.log("bridge")
    assert all(value is None for value in births[0].metrics().values())

    probe.publish_status(make_status("cam-s", "offline", session_epoch=999))  # will of an older session
    probe.publish_verdict(make_verdict(probe.line, "cam-s", 0))
    assert probe.wait_count("spb_ddata", 1), services.log("bridge")
    assert probe.all("spb_ddeath") == []

    probe.publish_status(make_status("cam-s", "offline", session_epoch=1_000))
    deaths = probe.wait_count("spb_ddeath", 1)
    assert deaths, services.log("bridge")
    assert deaths[0].camera == "cam-s"
    assert deaths[0].metrics() == {}

    sequence = node_sequence(probe)
    assert sequence == list(range(len(sequence)))  # NBIRTH 0, DBIRTH 1, DDATA 2, DDEATH 3

    probe.publish_status(make_status("cam-s", "online", session_epoch=2_000))
    assert len(probe.wait_count("spb_dbirth", 2)) == 2, services.log("bridge")


def test_bridge_stopped_status_gives_ddeath(bridge):
    services, probe, start = bridge
    start()
    assert probe.wait_count("spb_nbirth", 1), services.log("bridge")
    probe.publish_verdict(make_verdict(probe.line, "cam-t", 0))
    assert probe.wait_count("spb_ddata", 1), services.log("bridge")

    probe.publish_status(make_status("cam-t", "stopped", session_epoch=5))
    deaths = probe.wait_count("spb_ddeath", 1)
    assert deaths, services.log("bridge")
    assert deaths[0].camera == "cam-t"


def test_bridge_rejects_invalid_verdict(bridge):
    services, probe, start = bridge
    start()
    assert probe.wait_count("spb_nbirth", 1), services.log("bridge")

    probe.bus.publish("verdict", b"{not json", camera="cam-x")
    wrong_camera = make_verdict(probe.line, "cam-other", 0)
    probe.bus.publish("verdict", messages.to_json(wrong_camera), camera="cam-x")
    probe.publish_verdict(make_verdict(probe.line, "cam-x", 1))
    data = probe.wait_count("spb_ddata", 1)
    assert len(data) == 1, services.log("bridge")
    assert data[0].metrics()["Inspection/Frame"] == 1
    assert "verdict_invalid" in services.log("bridge")
    assert services.alive("bridge")
