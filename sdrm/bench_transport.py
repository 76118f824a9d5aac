"""Section 4 of `sdrm bench`: bytes per frame on the device topics and transfer time through Mosquitto.

Bytes are the length of the BLOCKS message (`sdrm.wire.encode_blocks`, float16 arrays) for all
heads of one board frame, against the raw float16 tokens X (b x t x d, 2 bytes per value). The
"tiles per factorisation" g is the SVD batch: the frame's tiles are factorised in consecutive
groups of g (the line factorises all tiles of a frame together, g = all). Transfer time is the
publish-to-receive time of one BLOCKS message at QoS 1 through a Mosquitto broker that this
section starts on a free port of 127.0.0.1, with the publisher and subscriber in this process.
"""

from __future__ import annotations

import subprocess
import threading
import time

import numpy as np
import torch

from sdrm import bench_data, cost
from sdrm.bench_timing import Timing, format_ms, measure
from sdrm.factors import factorize_heads
from sdrm.wire import Envelope, Kind, decode, encode_blocks

LINE_ID = "bench"
CAMERA_ID = "cam1"
DEVICE_ID = "dev1"
RECEIVE_TIMEOUT_S = 10.0


def _envelope(frame: int) -> Envelope:
    """Return an envelope like the compressor's: ids, frame number, capture time and three stage timings."""
    return Envelope(
        kind=Kind.BLOCKS,
        line=LINE_ID,
        camera=CAMERA_ID,
        device=DEVICE_ID,
        frame=frame,
        capture_ms=int(time.time() * 1000),
        epoch=1,
        width=640,
        height=640,
        timings=[("decode", 1.0), ("embed", 1.0), ("factorize", 1.0)],
    )


@torch.no_grad()
def _frame_bytes(tokens: torch.Tensor, heads: int, phi: float | None, group: int) -> dict:
    """Factorise a frame's tokens in groups of `group` tiles and return bytes, elements and ranks."""
    batch, count, features = tokens.shape
    head_dim = features // heads
    total_bytes = 0
    factor_elements = 0
    head_ratios = []
    ranks = []
    messages = []
    for start in range(0, batch, group):
        part = tokens[start : start + group]
        blocks, _ = factorize_heads(part, heads, phi)
        message = encode_blocks(_envelope(start), blocks)
        messages.append(message)
        total_bytes += len(message)
        for block in blocks:
            dense = phi is None
            factor_elements += cost.block_elements(part.shape[0], count, head_dim, block.rank, dense=dense)
            if not dense:
                head_ratios.append(cost.compression_ratio(part.shape[0], count, head_dim, block.rank))
                ranks.append(block.rank)
    return {
        "bytes": total_bytes,
        "messages": len(messages),
        "factor_elements": factor_elements,
        "compression_ratio": batch * count * features / factor_elements,
        "head_compression_ratio_mean": float(np.mean(head_ratios)) if head_ratios else 1.0,
        "rank_mean": float(np.mean(ranks)) if ranks else float(head_dim),
        "payloads": messages,
    }


def run(settings, boards: bench_data.ImageSet, loaded: bench_data.LoadedModel, progress) -> dict:
    """Measure bytes per frame vs phi and group size, encode/decode time, and Mosquitto transfer time."""
    model = loaded.model
    heads = model.config.heads
    frames = [bench_data.model_tokens(loaded, bench_data.read_gray(path)) for path in boards.paths[: settings.byte_frames]]
    batch, count, features = frames[0].shape
    raw = cost.raw_token_bytes(batch, count, features, dtype_bytes=2)
    groups = [group for group in settings.byte_groups if group < batch] + [batch]

    cases = []
    payloads: dict[str, bytes] = {}
    for phi in (*settings.byte_phis, None):
        for group in groups if phi is not None else [batch]:
            per_frame = [_frame_bytes(tokens, heads, phi, group) for tokens in frames]
            label = "NRR dense" if phi is None else f"phi {phi}"
            cases.append(
                {
                    "phi": phi,
                    "group": group,
                    "label": label,
                    "bytes": float(np.median([f["bytes"] for f in per_frame])),
                    "bytes_min": int(min(f["bytes"] for f in per_frame)),
                    "bytes_max": int(max(f["bytes"] for f in per_frame)),
                    "messages": per_frame[0]["messages"],
                    "raw_float16_bytes": raw,
                    "fraction_of_raw": float(np.median([f["bytes"] for f in per_frame])) / raw,
                    "compression_ratio": float(np.median([f["compression_ratio"] for f in per_frame])),
                    "head_compression_ratio_mean": float(np.median([f["head_compression_ratio_mean"] for f in per_frame])),
                    "rank_mean": float(np.mean([f["rank_mean"] for f in per_frame])),
                }
            )
            if group == batch:
                payloads[label] = per_frame[0]["payloads"][0]
        progress(f"bytes {'NRR' if phi is None else f'phi={phi}'}")

    codec = _codec_times(settings, frames[0], heads)
    transfer = _transfer(settings, payloads)
    progress("bytes transfer")

    targets = []
    target = next((c for c in cases if c["phi"] == settings.target_phi and c["group"] == batch), None)
    if target is not None:
        fraction = target["fraction_of_raw"]
        targets.append(
            {
                "section": "bytes",
                "name": f"BLOCKS bytes per board frame / raw float16 tokens, phi {settings.target_phi}, all {batch} tiles together",
                "target": "<= 0.25",
                "threshold": 0.25,
                "measured": fraction,
                "unit": "x",
                "lower_is_better": True,
                "passed": fraction <= 0.25,
                "detail": (
                    f"{target['bytes'] / 1024:.1f} KiB vs {raw / 1024:.1f} KiB raw; CR {target['compression_ratio']:.2f}; "
                    f"mean rank {target['rank_mean']:.1f} of d_h {features // heads}. U (b t x r) is most of the "
                    f"bytes, so the fraction is about r / d_h = {target['rank_mean'] / (features // heads):.2f}"
                ),
            }
        )
    return {
        "status": "done",
        "tiles": batch,
        "tokens": count,
        "features": features,
        "heads": heads,
        "raw_float16_bytes": raw,
        "cases": cases,
        "codec": codec,
        "transfer": transfer,
        "targets": targets,
    }


def _codec_times(settings, tokens: torch.Tensor, heads: int) -> list[dict]:
    rows = []
    for label, phi in ((f"phi {settings.target_phi}", settings.target_phi), ("NRR dense", None)):
        blocks, _ = factorize_heads(tokens, heads, phi)
        envelope = _envelope(0)
        message = encode_blocks(envelope, blocks)
        encode = measure(lambda: encode_blocks(envelope, blocks), settings.repeats, settings.warmup)
        decoded = measure(lambda: decode(message), settings.repeats, settings.warmup)
        rows.append({"label": label, "bytes": len(message), "encode": encode.to_dict(), "decode": decoded.to_dict()})
    return rows


# Mosquitto -----------------------------------------------------------------------------------------


def mosquitto_version() -> str | None:
    """Return the first line of `mosquitto -h` (it names the version), or None when not installed."""
    from services.broker import find_mosquitto

    binary = find_mosquitto()
    if binary is None:
        return None
    try:
        completed = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"{binary} (version unknown: {error})"
    output = (completed.stdout or completed.stderr).strip().splitlines()
    return output[0] if output else binary


class RoundTrip:
    """A publisher and a subscriber on one topic; `send` returns the publish-to-receive time in ms."""

    def __init__(self, port: int, topic: str) -> None:
        import paho.mqtt.client as mqtt

        self.topic = topic
        self.received = threading.Event()
        self.received_at = 0.0
        self.subscribed = threading.Event()
        self.subscriber = self._client(mqtt, "bench-subscriber", port)
        self.subscriber.on_message = self._on_message
        self.subscriber.on_subscribe = lambda *args: self.subscribed.set()
        self.subscriber.subscribe(topic, qos=1)
        if not self.subscribed.wait(RECEIVE_TIMEOUT_S):
            raise TimeoutError(f"no SUBACK for {topic} within {RECEIVE_TIMEOUT_S} s from 127.0.0.1:{port}")
        self.publisher = self._client(mqtt, "bench-publisher", port)

    @staticmethod
    def _client(mqtt, client_id: str, port: int):
        client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        connected = threading.Event()
        client.on_connect = lambda *args: connected.set()
        client.connect("127.0.0.1", port)
        client.loop_start()
        if not connected.wait(RECEIVE_TIMEOUT_S):
            client.loop_stop()
            raise TimeoutError(f"MQTT client {client_id} did not connect to 127.0.0.1:{port} within {RECEIVE_TIMEOUT_S} s")
        return client

    def _on_message(self, client, userdata, message) -> None:
        self.received_at = time.perf_counter()
        self.received.set()

    def send(self, payload: bytes) -> float:
        self.received.clear()
        started = time.perf_counter()
        self.publisher.publish(self.topic, payload, qos=1)
        if not self.received.wait(RECEIVE_TIMEOUT_S):
            raise TimeoutError(f"a {len(payload)}-byte message on {self.topic} was not received within {RECEIVE_TIMEOUT_S} s")
        return (self.received_at - started) * 1000

    def close(self) -> None:
        for client in (self.publisher, self.subscriber):
            client.disconnect()
            client.loop_stop()


def _transfer(settings, payloads: dict[str, bytes]) -> dict:
    """Publish each payload repeatedly through a fresh Mosquitto and time publish -> receive."""
    from services.broker import BrokerError, LocalBroker
    from services.topics import load_topics

    version = mosquitto_version()
    if version is None:
        return {"status": "skipped", "reason": "mosquitto not found on PATH or in /usr/sbin: install Mosquitto 2"}
    topic = load_topics().topic("blocks", line=LINE_ID, device=DEVICE_ID)
    broker = LocalBroker(prefer="mosquitto")
    try:
        broker.start()
    except BrokerError as error:
        return {"status": "failed", "reason": f"Mosquitto did not start: {error}", "mosquitto": version}
    rows = []
    try:
        if broker.kind != "mosquitto":
            return {"status": "skipped", "reason": f"the local broker is {broker.kind}, not Mosquitto", "mosquitto": version}
        probe = RoundTrip(broker.port, topic)
        try:
            for label, payload in sorted(payloads.items(), key=lambda item: len(item[1])):
                samples = [probe.send(payload) for _ in range(settings.warmup + settings.transfer_repeats)][settings.warmup :]
                timing = Timing(samples, warmup=settings.warmup).to_dict()
                rows.append(
                    {
                        "label": label,
                        "bytes": len(payload),
                        "round_trip": timing,
                        "megabytes_per_s": len(payload) / 1e6 / (timing["median_ms"] / 1000),
                    }
                )
        finally:
            probe.close()
    finally:
        broker.stop()
    return {"status": "done", "mosquitto": version, "topic": topic, "qos": 1, "rows": rows}


# Report --------------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    from sdrm.bench_report import markdown_table

    parts = [
        f"One board frame: {result['tiles']} tiles x {result['tokens']} tokens x d {result['features']} "
        f"({result['heads']} heads); raw float16 tokens {result['raw_float16_bytes']} bytes. Bytes are the whole "
        "BLOCKS message (envelope, per-head records, float16 U, S, V), the median over frames, summed over the "
        "messages of one frame when its tiles are factorised in groups of g. CR = b t d / (b t r + r + r d) over "
        "the whole frame (per-head mean beside it).\n"
    ]
    body = [
        [
            case["label"],
            case["group"],
            case["messages"],
            f"{case['bytes'] / 1024:.1f}",
            f"{case['fraction_of_raw']:.3f}",
            f"{case['compression_ratio']:.2f} ({case['head_compression_ratio_mean']:.2f})",
            f"{case['rank_mean']:.1f}",
        ]
        for case in result["cases"]
    ]
    parts.append(
        markdown_table(["blocks", "tiles per factorisation g", "messages", "KiB per frame", "of raw float16", "CR (per head)", "mean rank"], body)
    )
    codec = [
        [row["label"], row["bytes"], _cell(row["encode"]), _cell(row["decode"])] for row in result["codec"]
    ]
    parts.append("\nEncode and decode of one whole-frame BLOCKS message (ms, median [IQR]):\n")
    parts.append(markdown_table(["blocks", "bytes", "encode_blocks", "decode"], codec))

    transfer = result["transfer"]
    if transfer.get("status") != "done":
        parts.append(f"\nTransfer through Mosquitto: {transfer.get('status')}: {transfer.get('reason')}\n")
    else:
        parts.append(
            f"\nTransfer through {transfer['mosquitto']} on 127.0.0.1, topic `{transfer['topic']}`, QoS 1, one message "
            "in flight; publish -> receive in ms (median [IQR]):\n"
        )
        rows = [
            [row["label"], row["bytes"], _cell(row["round_trip"]), f"{row['megabytes_per_s']:.0f}"]
            for row in transfer["rows"]
        ]
        parts.append(markdown_table(["message", "bytes", "publish -> receive ms", "MB/s"], rows))
    return "\n".join(parts)


def _cell(timing: dict) -> str:
    return f"{format_ms(timing['median_ms'])} [{format_ms(timing['q1_ms'])}-{format_ms(timing['q3_ms'])}] n={timing['repeats']}"


def plots(result: dict, out_dir) -> list[str]:
    from sdrm.bench_report import figure

    name = "bytes.png"
    transfer = result["transfer"]
    columns = 2 if transfer.get("status") == "done" else 1
    with figure(out_dir / name, cols=columns) as (fig, axes):
        axis = axes[0]
        sdrm_cases = [case for case in result["cases"] if case["phi"] is not None]
        for group in sorted({case["group"] for case in sdrm_cases}):
            rows = sorted((c for c in sdrm_cases if c["group"] == group), key=lambda c: c["phi"])
            axis.plot([c["phi"] for c in rows], [c["bytes"] / 1024 for c in rows], marker="o", label=f"SDRM, g = {group} tiles")
        axis.axhline(result["raw_float16_bytes"] / 1024, color="black", linestyle="--", label="raw float16 tokens")
        axis.axhline(result["raw_float16_bytes"] / 4096, color="grey", linestyle=":", label="1/4 of raw (target)")
        dense = next((c for c in result["cases"] if c["phi"] is None), None)
        if dense is not None:
            axis.axhline(dense["bytes"] / 1024, color="red", linestyle="-.", label="NRR dense BLOCKS")
        axis.set_yscale("log")
        axis.set_xlabel("phi (kept energy)")
        axis.set_ylabel("KiB per frame")
        axis.set_title("Bytes per board frame on the device topics", fontsize=9)
        axis.legend(fontsize=6)
        if columns == 2:
            axis = axes[1]
            rows = transfer["rows"]
            axis.errorbar(
                [r["bytes"] / 1024 for r in rows],
                [r["round_trip"]["median_ms"] for r in rows],
                yerr=[
                    [r["round_trip"]["median_ms"] - r["round_trip"]["q1_ms"] for r in rows],
                    [r["round_trip"]["q3_ms"] - r["round_trip"]["median_ms"] for r in rows],
                ],
                marker="o",
                linestyle="-",
            )
            for r in rows:
                axis.annotate(r["label"], (r["bytes"] / 1024, r["round_trip"]["median_ms"]), fontsize=6)
            axis.set_xscale("log")
            axis.set_xlabel("message KiB")
            axis.set_ylabel("publish -> receive ms (QoS 1)")
            axis.set_title("Transfer through Mosquitto on loopback (like SDRM fig. 9)", fontsize=9)
    return [name]
