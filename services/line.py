"""`sdrm line`: a whole inspection line on one machine, for demos, tests and benchmarks.

It starts, in this order:

1. an MQTT broker on a free port of 127.0.0.1, unless `--broker` names one: the `mosquitto`
   binary when found (on PATH or in /usr/sbin), else the embedded amqtt broker when installed.
   amqtt 0.12 has neither MQTT 5 nor shared subscriptions, so on it every service uses MQTT 3.1.1
   and the compressor subscribes without `$share`;
2. the scheduler, the aggregator and the compressor as threads of this process (torch is
   imported once);
3. `--devices` device workers as subprocesses (dev1, dev2, ...), so that one can be killed;
4. the ingest of `--source`, once the scheduler has assigned the heads to all devices. The source
   is an image folder, a video file, a stream URL or a camera index, samples/boards by default.

It prints one line per verdict as it arrives and a summary at the end: frames, verdicts by status,
defects, accuracy, throughput and latency percentiles. Accuracy needs the true labels, which come
from `ok/` and `defective/` folders or an annotations.json in the source folder. `--summary-json`
writes the summary with every verdict. A folder or video source ends the line once every
published frame has its verdict, or `--timeout-s` after the source ended; Ctrl-C ends it at once.

`--metrics-port` serves one Prometheus endpoint for all the parts: the services in this process
directly, and each device through its own endpoint on a free port of 127.0.0.1, which the line
reads at every scrape (`services.metrics`).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import structlog

from sdrm import messages
from services import config as cfg
from services.broker import BrokerError, LocalBroker, free_port
from services.bus import Bus, Incoming, now_ms
from services.common import StartupError
from services.metrics import MetricsGroup, RemoteMetrics
from services.topics import load_topics, validate_id

log = structlog.get_logger("sdrm.line")

REPOSITORY = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = REPOSITORY / "samples" / "boards"
TLS_OPTIONS = ("tls_ca", "tls_cert", "tls_key")
SECURITY_OPTIONS = ("username", "password_file", *TLS_OPTIONS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdrm line",
        description="Run a whole inspection line locally: broker, scheduler, devices, compressor, aggregator and ingest.",
    )
    cfg.add_common_options(parser)
    cfg.add_metrics_options(parser)
    parser.set_defaults(broker=None, log_level="warning")
    for action in parser._actions:  # noqa: SLF001 - adjust the shared help texts to the line's defaults
        if action.dest == "broker":
            action.help = (
                "use this MQTT broker (mqtt://host:port or mqtts://host:port) instead of starting an anonymous one on 127.0.0.1"
            )
        if action.dest == "log_level":
            action.help = "lowest log level of the services, written to stderr (default warning)"
        if action.dest == "metrics_port":
            action.help = "serve the Prometheus metrics of all the line's services, devices included, on this TCP port (default 0: off)"
    parser.add_argument(
        "--source", default=str(DEFAULT_SOURCE), help="image folder, video file, stream URL or camera index (default samples/boards)"
    )
    parser.add_argument("--devices", type=cfg.positive_int, default=2, help="device workers to start (default 2)")

    parser.add_argument("--camera", default="cam1", help="camera id of the source (default cam1)")
    parser.add_argument("--phi", type=cfg.fraction, default=None, help="kept energy fraction in (0, 1] (default: the model's)")
    parser.add_argument("--nrr", action="store_true", help="no rank reduction: dense blocks")
    parser.add_argument("--fps", type=cfg.non_negative_float, default=0.0, help="maximum frames per second of the source (default 0: no limit)")
    parser.add_argument("--loop", action="store_true", help="repeat a folder or video source until Ctrl-C")
    parser.add_argument("--max-frames", type=int, default=0, help="stop the source after this many frames (default 0: no limit)")

    parser.add_argument("--deadline-ms", type=cfg.positive_int, default=2000, help="aggregator deadline per frame in milliseconds (default 2000)")
    parser.add_argument("--threshold", type=cfg.fraction, default=0.8, help="scheduler load threshold T in (0, 1]: a device whose busy ratio stays above it loses its heads (default 0.8); the defect threshold comes from the model")
    parser.add_argument("--no-shared", action="store_true", help="subscribe without $share (for brokers without shared subscriptions)")

    parser.add_argument("--summary-json", type=Path, default=None, help="write the summary and every verdict to this JSON file")
    parser.add_argument(
        "--timeout-s", type=cfg.positive_float, default=120.0, help="how long to wait for missing verdicts after the source ended, in seconds (default 120)"
    )
    parser.add_argument(
        "--startup-timeout-s", type=cfg.positive_float, default=60.0, help="how long to wait for the devices' first assignment, in seconds (default 60)"
    )
    parser.add_argument("--quiet", action="store_true", help="print only the summary, not every verdict")
    return parser


def known_labels(source: str) -> dict[str, str]:
    """Return the true label ("ok" or "defect") of every image below a source folder, by resolved path.

    Labels come from annotations.json ({"file", "label"} entries) when present, else from the
    name of a parent folder: ok/ or good/ for "ok", defective/, defect/ or bad/ for "defect".
    """
    root = Path(source)
    if not root.is_dir():
        return {}
    labels: dict[str, str] = {}
    annotations = root / "annotations.json"
    if annotations.is_file():
        try:
            for entry in json.loads(annotations.read_text()):
                labels[str((root / entry["file"]).resolve())] = "defect" if entry["label"] == "defect" else "ok"
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("annotations_invalid", file=str(annotations), error=str(error))
    if labels:
        return labels
    folders = {"ok": "ok", "good": "ok", "defective": "defect", "defect": "defect", "bad": "defect"}
    for path in root.rglob("*"):
        for parent in path.relative_to(root).parents:
            label = folders.get(parent.name.lower())
            if label:
                labels[str(path.resolve())] = label
                break
    return labels


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


class Line:
    def __init__(self, config: argparse.Namespace, stop: threading.Event) -> None:
        self.config = config
        self.stop = stop
        self.topics = load_topics()
        validate_id("line", config.line)
        validate_id("camera", config.camera)
        if not Path(config.model, "manifest.json").is_file():
            raise StartupError(f"model not found: {config.model}/manifest.json is missing; pass --model DIR or set SDRM_MODEL")
        self.security = broker_security(config)
        self.broker: LocalBroker | None = None
        self.devices: dict[str, subprocess.Popen] = {}
        self.threads: list[tuple[str, threading.Thread, threading.Event]] = []
        self.assignment: messages.Assignment | None = None
        self.assignment_changed = threading.Condition()
        self.sent: dict[int, str] = {}
        self.sent_ms: dict[int, int] = {}
        self.verdicts: dict[tuple[str, int], messages.Verdict] = {}
        self.verdict_ms: dict[tuple[str, int], int] = {}
        self.all_in = threading.Event()
        self.source_done = threading.Event()
        self._lock = threading.Lock()
        self.failures: list[str] = []
        self.metrics = MetricsGroup()

    # Parts ---------------------------------------------------------------------------------------

    def _service_argv(self, broker: str, shared: bool) -> list[str]:
        argv = [
            "--broker", broker,
            "--line", self.config.line,
            "--mqtt-version", self.config.mqtt_version,
            "--log-level", self.config.log_level,
        ]
        if self.config.log_json:
            argv.append("--log-json")
        # The password itself reaches the services through SDRM_PASSWORD in the inherited environment, never argv.
        for option in SECURITY_OPTIONS:
            value = getattr(self.config, option, None)
            if value:
                argv += ["--" + option.replace("_", "-"), str(value)]
        return argv

    def _start_thread(self, name: str, module, argv: list[str]) -> None:
        parser = module.build_parser()
        config = cfg.resolve(parser, argv, name)
        stop = threading.Event()
        factory = {
            "scheduler": lambda: module.SchedulerService(config, stop),
            "aggregator": lambda: module.Aggregator(config, stop),
            "compressor": lambda: module.Compressor(config, stop),
        }[name]
        service = factory()
        self.metrics.add(service.metrics)

        def target() -> None:
            try:
                service.run()
            except Exception as error:  # noqa: BLE001 - report any crash of a service thread and stop the line
                log.exception("service_failed", service=name, error=str(error))
                self.failures.append(f"{name}: {error}")
                self.stop.set()

        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self.threads.append((name, thread, stop))

    def _start_device(self, device: str, broker: str, shared: bool) -> None:
        command = [
            sys.executable, "-m", "sdrm.cli", "device",
            *self._service_argv(broker, shared),
            "--device", device,
            "--model", str(self.config.model),
            "--threads", "1",
            *self._device_metrics_argv(),
        ]
        self.devices[device] = subprocess.Popen(command, cwd=REPOSITORY)
        log.info("device_started", device=device, pid=self.devices[device].pid)

    def _device_metrics_argv(self) -> list[str]:
        """Return a device's metrics options: a free port of 127.0.0.1 that the line's endpoint reads, or port 0.

        Port 0 is passed explicitly so that SDRM_METRICS_PORT, which the line itself reads, does not
        make every device try the line's port.
        NOTE: the port is free when chosen but could be taken before the device binds it; the
        device then exits with status 2.
        """
        if not self.config.metrics_port:
            return ["--metrics-port", "0"]
        port = free_port()
        self.metrics.add(RemoteMetrics(f"http://127.0.0.1:{port}/metrics"))
        return ["--metrics-port", str(port), "--metrics-host", "127.0.0.1"]

    def _on_assignment(self, incoming: Incoming) -> None:
        if not incoming.payload:
            return
        try:
            assignment = messages.parse(messages.Assignment, incoming.payload)
        except messages.MessageError:
            return
        with self.assignment_changed:
            self.assignment = assignment
            self.assignment_changed.notify_all()

    def _on_verdict(self, incoming: Incoming) -> None:
        try:
            verdict = messages.parse(messages.Verdict, incoming.payload)
        except messages.MessageError as error:
            log.warning("verdict_invalid", topic=incoming.topic, error=str(error))
            return
        key = (verdict.camera, verdict.frame)
        with self._lock:
            if verdict.camera != self.config.camera or key in self.verdicts:
                return
            self.verdicts[key] = verdict
            self.verdict_ms[key] = incoming.received_ms
            complete = self.source_done.is_set() and all((self.config.camera, f) in self.verdicts for f in self.sent)
        if not self.config.quiet:
            with self._lock:
                name = self.sent.get(verdict.frame, "")
            print(self._verdict_line(verdict, name), flush=True)
        if complete:
            self.all_in.set()

    @staticmethod
    def _verdict_line(verdict: messages.Verdict, name: str = "") -> str:
        latency = verdict.latency_ms.get("total")
        text = (
            f"{verdict.camera} frame {verdict.frame}: {verdict.label:<6} score {verdict.score:.4f} "
            f"flagged {len(verdict.tiles):>2} tiles  latency {latency:.0f} ms  {verdict.status}"
        )
        if name:
            text += f"  {name}"
        if verdict.missing_heads:
            text += f" (missing heads {verdict.missing_heads})"
        if verdict.error:
            text += f" ({verdict.error})"
        return text

    def _on_published(self, frame: int, name: str) -> None:
        with self._lock:
            self.sent[frame] = name
            self.sent_ms[frame] = now_ms()

    def _wait_for_devices(self) -> bool:
        wanted = set(self.devices)
        deadline = time.monotonic() + self.config.startup_timeout_s
        with self.assignment_changed:
            while not self.stop.is_set():
                current = self.assignment
                if current is not None and set(current.heads.values()) >= wanted:
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.assignment_changed.wait(min(remaining, 0.2))
        return False

    # Run -----------------------------------------------------------------------------------------

    def run(self) -> int:
        from services import aggregator, compressor, ingest, scheduler

        started = time.monotonic()
        config = self.config
        problem = source_problem(str(config.source))
        if problem:
            print(f"sdrm line: error: {problem}", file=sys.stderr)
            return 2
        shared = not config.no_shared
        broker_url = config.broker
        if broker_url is None:
            try:
                self.broker = LocalBroker().start()
            except BrokerError as error:
                print(f"sdrm line: {error}", file=sys.stderr)
                return 2
            broker_url = self.broker.url
            if not self.broker.supports_shared:
                shared = False
            if not self.broker.supports_mqtt5:
                config.mqtt_version = "3.1.1"
        print(f"broker {broker_url} ({self.broker.kind if self.broker else 'external'})", flush=True)

        common = self._service_argv(broker_url, shared)
        model = ["--model", str(config.model)]
        monitor = Bus(
            topics=self.topics, broker=broker_url, line=config.line, service="line", instance=f"monitor-{now_ms()}",
            status_topic=None, mqtt_version=config.mqtt_version, **self.security,
        )
        monitor.subscribe("assignment", self._on_assignment)
        monitor.subscribe("verdict", self._on_verdict, camera=config.camera)
        monitor.start(wait_s=10.0)
        status = 0
        try:
            self._start_thread("scheduler", scheduler, common + model + ["--threshold", str(config.threshold)])
            self._start_thread("aggregator", aggregator, common + model + ["--deadline-ms", str(config.deadline_ms)])
            compressor_argv = common + model
            if config.nrr:
                compressor_argv.append("--nrr")
            elif config.phi is not None:
                compressor_argv += ["--phi", str(config.phi)]
            if not shared:
                compressor_argv.append("--no-shared")
            self._start_thread("compressor", compressor, compressor_argv)
            for index in range(1, config.devices + 1):
                self._start_device(f"dev{index}", broker_url, shared)

            if not self._wait_for_devices():
                if self.stop.is_set():
                    return 130
                print(
                    f"sdrm line: the scheduler did not assign heads to all {config.devices} devices within "
                    f"{config.startup_timeout_s:.0f} s; starting the source with the assignment it has",
                    file=sys.stderr,
                )
            print(f"ready in {time.monotonic() - started:.1f} s: assignment epoch "
                  f"{self.assignment.epoch if self.assignment else '-'} {self.assignment.heads if self.assignment else {}}",
                  flush=True)
            status = self._run_source(ingest, common)
        finally:
            summary = self.summary()
            self._shutdown(monitor)
        self._report(summary)
        if self.failures:
            return 1
        return status

    def _run_source(self, ingest_module, common: list[str]) -> int:
        config = self.config
        argv = common + ["--source", str(config.source), "--camera", config.camera, "--fps", str(config.fps)]
        if config.loop:
            argv.append("--loop")
        if config.max_frames:
            argv += ["--max-frames", str(config.max_frames)]
        ingest_config = cfg.resolve(ingest_module.build_parser(), argv, "ingest")
        source_stop = threading.Event()
        try:
            source = ingest_module.Ingest(ingest_config, source_stop, on_published=self._on_published)
        except ValueError as error:
            print(f"sdrm line: {error}", file=sys.stderr)
            return 2
        self.metrics.add(source.metrics)

        self.first_frame_ms = now_ms()
        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(source.run()), name="ingest", daemon=True)
        thread.start()
        while thread.is_alive():
            if self.stop.wait(0.1):
                source_stop.set()
        thread.join()
        self.source_done.set()
        with self._lock:
            if all((config.camera, frame) in self.verdicts for frame in self.sent):
                self.all_in.set()
        if self.stop.is_set():
            # Ctrl-C: frames already published still get their verdicts, up to the aggregator deadline.
            self.all_in.wait(config.deadline_ms / 1000 + 2.0)
            return 130

        deadline = time.monotonic() + config.timeout_s
        while not self.all_in.is_set() and not self.stop.is_set() and time.monotonic() < deadline:
            self.all_in.wait(0.1)
        if not self.all_in.is_set() and not self.stop.is_set():
            with self._lock:
                missing = sorted(frame for frame in self.sent if (config.camera, frame) not in self.verdicts)
            print(f"sdrm line: no verdict for frames {missing} within {config.timeout_s:.0f} s", file=sys.stderr)
            return 1
        return result[0] if result else 1

    def _shutdown(self, monitor: Bus) -> None:
        for device, process in self.devices.items():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for name, thread, stop in reversed(self.threads):
            stop.set()
        for name, thread, stop in reversed(self.threads):
            thread.join(10.0)
        for device, process in self.devices.items():
            try:
                process.wait(10.0)
            except subprocess.TimeoutExpired:
                log.warning("device_kill", device=device, pid=process.pid, reason="no exit within 10 s of SIGTERM")
                process.kill()
                process.wait(5.0)
        monitor.close()
        if self.broker is not None:
            self.broker.stop()

    # Summary -------------------------------------------------------------------------------------

    def summary(self) -> dict:
        with self._lock:
            sent = dict(self.sent)
            verdicts = dict(self.verdicts)
            verdict_ms = dict(self.verdict_ms)
        labels = known_labels(str(self.config.source))
        rows = []
        correct = 0
        labelled = 0
        for frame, name in sorted(sent.items()):
            verdict = verdicts.get((self.config.camera, frame))
            expected = labels.get(str(Path(name).resolve())) if name else None
            row = {"camera": self.config.camera, "frame": frame, "file": name, "expected": expected}
            if verdict is not None:
                row.update(
                    label=verdict.label,
                    score=verdict.score,
                    status=verdict.status,
                    flagged=[[t.x, t.y, t.w, t.h, t.score] for t in verdict.tiles],
                    latency_ms=verdict.latency_ms,
                    missing_heads=verdict.missing_heads,
                    error=verdict.error,
                    epoch=verdict.epoch,
                )
                if expected is not None:
                    labelled += 1
                    correct += int(verdict.label == expected)
            rows.append(row)

        totals = [v.latency_ms["total"] for v in verdicts.values() if "total" in v.latency_ms]
        stages = sorted({stage for v in verdicts.values() for stage in v.latency_ms})
        stage_means = {
            stage: float(np.mean([v.latency_ms[stage] for v in verdicts.values() if stage in v.latency_ms])) for stage in stages
        }
        elapsed_s = None
        if verdict_ms and getattr(self, "first_frame_ms", None):
            elapsed_s = max(verdict_ms.values()) - self.first_frame_ms
            elapsed_s = elapsed_s / 1000 if elapsed_s > 0 else None
        statuses = {
            status: sum(1 for v in verdicts.values() if v.status == status)
            for status in ("complete", "incomplete", "error", "expired")
        }
        return {
            "source": str(self.config.source),
            "devices": self.config.devices,
            "broker": self.broker.kind if self.broker else "external",
            "frames": len(sent),
            "verdicts": len(verdicts),
            "statuses": statuses,
            "defects": sum(1 for v in verdicts.values() if v.label == "defect"),
            "accuracy": correct / labelled if labelled else None,
            "labelled": labelled,
            "throughput_fps": len(verdicts) / elapsed_s if elapsed_s else None,
            "latency_ms": {"p50": percentile(totals, 50), "p95": percentile(totals, 95), "p99": percentile(totals, 99)},
            "stage_mean_ms": stage_means,
            "final_epoch": self.assignment.epoch if self.assignment else None,
            "results": rows,
        }

    def _report(self, summary: dict) -> None:
        latency = summary["latency_ms"]

        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value:.0f}"

        accuracy = "-" if summary["accuracy"] is None else f"{summary['accuracy'] * 100:.1f} % of {summary['labelled']} labelled"
        throughput = "-" if summary["throughput_fps"] is None else f"{summary['throughput_fps']:.2f} frames/s"
        statuses = ", ".join(f"{count} {status}" for status, count in summary["statuses"].items())
        print(
            f"\nsummary: {summary['frames']} frames, {summary['verdicts']} verdicts ({statuses}), "
            f"{summary['defects']} defects\n"
            f"  accuracy {accuracy}\n"
            f"  throughput {throughput}\n"
            f"  latency p50 {ms(latency['p50'])} ms, p95 {ms(latency['p95'])} ms, p99 {ms(latency['p99'])} ms",
            flush=True,
        )
        if self.config.summary_json:
            self.config.summary_json.parent.mkdir(parents=True, exist_ok=True)
            self.config.summary_json.write_text(json.dumps(summary, indent=2) + "\n")
            print(f"  wrote {self.config.summary_json}", flush=True)


def broker_security(config: argparse.Namespace) -> dict:
    """Check the security options and return the Bus keyword arguments of the line's own clients.

    The line's own broker listens on 127.0.0.1 without TLS and accepts any client, so TLS options
    without --broker are an error. A username and password are passed on, and Mosquitto 2.0.11
    without a password file accepts and ignores them.
    NOTE: not checked with the amqtt fallback broker.
    """
    if config.broker is None:
        tls_options = ["--" + option.replace("_", "-") for option in TLS_OPTIONS if getattr(config, option, None)]
        if tls_options:
            raise StartupError(
                f"{', '.join(tls_options)} apply to an external broker, but no --broker is given and the line's own "
                "broker has no TLS: pass --broker mqtts://host:8883, or unset them (SDRM_TLS_CA, SDRM_TLS_CERT, SDRM_TLS_KEY)"
            )
    return cfg.bus_connection(config)


def source_problem(source: str) -> str | None:
    """Return why a --source cannot work before anything starts, or None when it may work.

    A camera index or a URL can only be tried by opening it, so only file and folder paths are
    checked here.
    """
    if source.isdigit() or "://" in source:
        return None
    path = Path(source)
    if not path.exists():
        return f"--source {source} not found: give an image folder, a video file, a stream URL or a camera index"
    return None


def main(argv: list[str] | None = None) -> int:
    from services.common import run_main

    return run_main("line", build_parser, Line, argv)


if __name__ == "__main__":
    raise SystemExit(main())
