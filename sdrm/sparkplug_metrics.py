"""Sparkplug B metrics of an SDRM line: the edge node's metrics and each camera device's metrics.

The line is the edge node and each camera a device. A camera's metrics carry its latest verdict:
DBIRTH lists all of them (null before the camera's first verdict) and every DDATA carries all of
them again for one new verdict. Metric timestamps are the frame's capture time in epoch
milliseconds (UTC), because Sparkplug defines a metric's timestamp as its acquisition time.

CAMERA_METRICS and NODE_METRICS give every metric name with its datatype and meaning.
docs/integrators.md prints them as tables, which services/integrator_docs.py writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

from sdrm import messages
from sdrm.sparkplug import BDSEQ_METRIC, REBIRTH_METRIC, DataType, Metric


@dataclass(frozen=True)
class MetricSpec:
    """Name, datatype and meaning of one metric that the bridge publishes."""

    name: str
    datatype: DataType
    description: str


VERDICT_STATUSES = get_args(messages.Verdict.model_fields["status"].annotation)

NODE_LINE = "Properties/Line"
NODE_VERSION = "Properties/SDRM Version"

NODE_METRICS = (
    MetricSpec(BDSEQ_METRIC, DataType.UINT64, "birth/death sequence of the MQTT session, 0..255, which the NDEATH repeats"),
    MetricSpec(REBIRTH_METRIC, DataType.BOOLEAN, "always false. A host writes true in an NCMD to request NBIRTH and all DBIRTHs again"),
    MetricSpec(NODE_LINE, DataType.STRING, "line id, also the edge node id"),
    MetricSpec(NODE_VERSION, DataType.STRING, "version of the sdrm package that runs the bridge"),
)

CAMERA_METRICS = (
    MetricSpec("Inspection/Defect", DataType.BOOLEAN, "true when the verdict's label is defect. Verdicts that are not complete are labelled defect (fail-safe)"),
    MetricSpec("Inspection/Score", DataType.DOUBLE, "highest tile defect probability of the frame, in [0, 1]"),
    MetricSpec("Inspection/Threshold", DataType.DOUBLE, "tile score in [0, 1] at or above which a tile is flagged"),
    MetricSpec("Inspection/Frame", DataType.UINT64, "frame number from the camera or ingest"),
    MetricSpec("Inspection/Capture Time", DataType.DATETIME, "frame capture time, epoch milliseconds (UTC)"),
    MetricSpec("Inspection/Latency", DataType.DOUBLE, "capture to verdict time in milliseconds (latency_ms.total), null when absent"),
    MetricSpec("Inspection/Flagged Tiles", DataType.UINT32, "number of flagged tiles in the verdict"),
    MetricSpec("Inspection/Status", DataType.STRING, "verdict status: " + ", ".join(VERDICT_STATUSES)),
    MetricSpec("Inspection/Missing Heads", DataType.UINT32, "number of attention heads that did not arrive"),
    MetricSpec("Inspection/Error", DataType.STRING, "why the frame got no regular result (the verdict's error field), null otherwise"),
    MetricSpec("Inspection/Model Version", DataType.STRING, "version of the model that computed the verdict"),
    MetricSpec("Inspection/Assignment Epoch", DataType.UINT64, "epoch of the head-to-device assignment used for the frame"),
)


def node_metrics(bdseq: int, line: str, version: str) -> list[Metric]:
    """Return the NBIRTH metrics, in NODE_METRICS order."""
    values = {BDSEQ_METRIC: bdseq, REBIRTH_METRIC: False, NODE_LINE: line, NODE_VERSION: version}
    return [Metric(spec.name, spec.datatype, values[spec.name]) for spec in NODE_METRICS]


def camera_metrics(verdict: messages.Verdict | None, timestamp_ms: int) -> list[Metric]:
    """Return a camera's metrics, in CAMERA_METRICS order, for its latest verdict.

    verdict None (no verdict yet) gives every metric as null with timestamp_ms. With a verdict
    every metric is timestamped with its capture time.
    """
    if verdict is None:
        return [Metric(spec.name, spec.datatype, None, timestamp_ms) for spec in CAMERA_METRICS]
    values = _verdict_values(verdict)
    return [Metric(spec.name, spec.datatype, values[spec.name], verdict.capture_ms) for spec in CAMERA_METRICS]


def _verdict_values(verdict: messages.Verdict) -> dict[str, object]:
    return {
        "Inspection/Defect": verdict.label == "defect",
        "Inspection/Score": verdict.score,
        "Inspection/Threshold": verdict.threshold,
        "Inspection/Frame": verdict.frame,
        "Inspection/Capture Time": verdict.capture_ms,
        "Inspection/Latency": verdict.latency_ms.get("total"),
        "Inspection/Flagged Tiles": len(verdict.tiles),
        "Inspection/Status": verdict.status,
        "Inspection/Missing Heads": len(verdict.missing_heads),
        "Inspection/Error": verdict.error,
        "Inspection/Model Version": verdict.model_version,
        "Inspection/Assignment Epoch": verdict.epoch,
    }
