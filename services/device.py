"""`sdrm device`: an edge device (a Jetson, a PC) that computes attention heads from factor blocks.

The device subscribes to its own blocks topic, computes Z_i = attention(Q_i, K_i, V_i) for every
head block it receives (`model.head_forward`), and publishes one PARTIALS message per BLOCKS
message, carrying the factor blocks and their partial outputs to the aggregator. It computes what
it receives: the compressor routes heads by the current assignment.

Head weights: the device loads the whole checkpoint from `--model` (the same directory the
compressor and aggregator read) and uses only W_i^Q, W_i^K, W_i^V of the heads it receives, so any
head can move to it at once.
NOTE: distributing the head weights as retained MQTT messages, so that devices need no copy of the
checkpoint, is not implemented.

It runs on CUDA when `torch.cuda.is_available()` (`--backend auto`), else on the CPU. It publishes
a retained `online` status on every connect (will: `offline`, `stopped` on clean exit) and a load
report every `--report-ms`. It adapts the key/value block size of the attention with a
BlockSizeController towards `--target-ms` per head.

Two options emulate a loaded device, for tests and demos only. `--extra-load-ms` adds a sleep
after every frame, like a slow device: the sleep counts as busy time and lowers the measured
speed. `--simulated-load` reports at least the given busy ratio while blocks arrive, without
slowing down, like a device busy with other work.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import threading
import time

import structlog
import torch

from sdrm import messages, wire
from sdrm.blocksize import BlockSizeController
from services import config as cfg
from services.bus import Incoming, now_ms
from services.inbox import Inbox
from services.common import StartupError, load_model, run_main, service_bus, set_threads
from services.metrics import ServiceMetrics
from services.topics import load_topics, validate_id

log = structlog.get_logger("sdrm.device")

SPEED_SMOOTHING = 0.2  # weight of the newest window in the reported speed (heads per busy second)
SIMULATED_LOAD_HOLD_S = 3.0  # --simulated-load applies this long after the last frame, in seconds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdrm device",
        description="Compute attention heads from factor blocks and send the partial outputs to the aggregator.",
    )
    cfg.add_common_options(parser)
    cfg.add_metrics_options(parser)
    parser.add_argument("--device", default="dev1", help="device id, unique per line (default dev1)")
    parser.add_argument(
        "--backend", choices=["auto", "cpu", "cuda"], default="auto", help="compute backend (default auto: CUDA when available)"
    )
    parser.add_argument(
        "--require-gpu",
        action="store_true",
        help="exit with status 2 at start when no CUDA GPU is available, instead of computing on the CPU",
    )

    parser.add_argument(
        "--report-ms", type=cfg.positive_int, default=500, help="load report period in milliseconds (default 500)"
    )
    parser.add_argument(
        "--target-ms", type=cfg.positive_float, default=50.0, help="target attention time per head in milliseconds (default 50)"
    )

    parser.add_argument(
        "--extra-load-ms",
        type=cfg.non_negative_float,
        default=0.0,
        help="sleep this many milliseconds per frame to emulate a slow device (tests and demos; default 0)",
    )
    parser.add_argument(
        "--simulated-load",
        type=cfg.fraction,
        default=None,
        help="report at least this busy ratio in (0, 1] while blocks arrive, without slowing down, for tests and demos (default: off)",
    )

    parser.add_argument("--queue-size", type=cfg.positive_int, default=8, help="maximum BLOCKS messages waiting for compute; when full the oldest is dropped and counted (default 8)")
    parser.add_argument(
        "--wire-dtype", choices=["float16", "float32"], default="float32", help="array type of the partials (default float32)"
    )
    parser.add_argument(
        "--bandwidth-bytes-per-s",
        type=cfg.non_negative_float,
        default=0.0,
        help="link capacity reported to the scheduler, in bytes per second (default 0: unknown, no limit)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's choice)")
    return parser


class _Window:
    """Statistics of the frames done since the last load report."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.busy_s = 0.0
        self.heads = 0
        self.head_ms: dict[int, list[float]] = collections.defaultdict(list)


class Device:
    def __init__(self, config: argparse.Namespace, stop: threading.Event) -> None:
        self.config = config
        self.stop = stop
        self.topics = load_topics()
        validate_id("line", config.line)
        validate_id("device", config.device)
        set_threads(config.threads)
        self.torch_device = self._select_backend(config.backend, config.require_gpu)
        log.info("device_selected", device=config.device, **describe_torch_device(self.torch_device))
        model, self.manifest = load_model(config.model)
        self.model = model.to(self.torch_device)
        self.inbox = Inbox(config.queue_size)
        self.controller: BlockSizeController | None = None
        self.frames_done = 0
        self._window = _Window()
        self._window_lock = threading.Lock()
        self._last_head_ms: dict[int, float] = {}
        self._speed = 0.0
        self._last_frame: float | None = None  # time.monotonic() of the last BLOCKS message computed

        info = {"backend": self.torch_device.type, "threads": torch.get_num_threads()}
        if self.torch_device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(self.torch_device)
        self.bus = service_bus(
            config,
            self.topics,
            service="device",
            instance=config.device,
            status_topic="device_status",
            status_ids={"device": config.device},
            info=info,
        )
        self.counters = self.bus.counters
        self.metrics = ServiceMetrics(self.bus, queue=self.inbox)
        self.log = log.bind(line=config.line, device=config.device)

    @staticmethod
    def _select_backend(backend: str, require_gpu: bool = False) -> torch.device:
        """Return the torch device to compute on, or raise StartupError when the options cannot be met."""
        # NOTE: the CUDA path (weights, blocks and synchronisation on the GPU) has only run on CPU
        # machines so far, where it is never taken.
        cuda = torch.cuda.is_available()
        if require_gpu and backend == "cpu":
            raise StartupError("--require-gpu contradicts --backend cpu: drop one of the two options")
        if require_gpu and not cuda:
            raise StartupError(_missing_gpu_message())
        if backend == "cuda" and not cuda:
            raise StartupError("--backend cuda was requested but torch.cuda.is_available() is False: use --backend cpu or auto")
        if backend == "cpu" or not cuda:
            return torch.device("cpu")
        return torch.device("cuda", torch.cuda.current_device())

    # Network thread ------------------------------------------------------------------------------

    def _on_blocks(self, incoming: Incoming) -> None:
        dropped = self.inbox.put(incoming)
        if dropped is not None:
            self.counters.add("blocks_dropped.queue_full")
            ids = _envelope_ids(dropped.payload)
            self.log.warning("blocks_dropped", reason="inbox full", queue_size=self.inbox.maxsize, **ids)

    # Worker threads ------------------------------------------------------------------------------

    def run(self) -> int:
        self.bus.subscribe("blocks", self._on_blocks, device=self.config.device)
        self.bus.start()
        reporter = threading.Thread(target=self._report_loop, name=f"load-{self.config.device}", daemon=True)
        reporter.start()
        self.log.info(
            "device_started",
            broker=self.config.broker,
            backend=self.torch_device.type,
            extra_load_ms=self.config.extra_load_ms,
        )
        try:
            while not self.stop.is_set():
                incoming = self.inbox.get(timeout=0.2)
                if incoming is None:
                    continue
                self._handle(incoming)
        finally:
            self.stop.set()
            reporter.join(2.0)
            self.bus.close(info={"counters": self.counters.snapshot(), "frames_done": self.frames_done})
            self.log.info("device_stopped", frames_done=self.frames_done, counters=self.counters.snapshot())
        return 0

    def _handle(self, incoming: Incoming) -> None:
        started = time.monotonic()
        queue_ms = (started - incoming.received_monotonic) * 1000
        try:
            message = wire.decode(incoming.payload)
        except wire.WireError as error:
            self.bus.report_error("blocks_invalid", f"{len(incoming.payload)} bytes: {error}", topic=incoming.topic)
            return
        if not isinstance(message, wire.BlocksMessage):
            kind = wire.Kind(message.envelope.kind).name
            self.bus.report_error("blocks_invalid", f"got a {kind} message on a blocks topic", topic=incoming.topic)
            return
        envelope = message.envelope
        ids = {"camera": envelope.camera, "frame": envelope.frame, "epoch": envelope.epoch}
        heads = self.model.config.heads
        invalid = [block.head for block in message.blocks if not 0 <= block.head < heads]
        if invalid:
            self.bus.report_error("blocks_invalid", f"head ids {invalid} are outside 0..{heads - 1}", topic=incoming.topic, **ids)
            return
        head_dim = self.model.config.head_dim
        wrong = [block.head for block in message.blocks if block.head_dim != head_dim]
        if wrong:
            error = f"blocks of heads {wrong} have head_dim other than the model's {head_dim}: the compressor runs another model"
            self.bus.report_error("blocks_invalid", error, topic=incoming.topic, **ids)
            return

        try:
            partials, compute_ms = self._compute(message.blocks)
        except (RuntimeError, ValueError) as error:
            self.bus.report_error("attention_failed", str(error), topic=incoming.topic, **ids)
            return
        if self.config.extra_load_ms > 0:
            time.sleep(self.config.extra_load_ms / 1000)

        device_ms = (time.monotonic() - started) * 1000 + queue_ms
        timings = list(envelope.timings) + [
            ("device_queue", queue_ms),
            ("attention", compute_ms),
            ("device", device_ms),
        ]
        self.metrics.observe_stages([("device_queue", queue_ms), ("attention", compute_ms)])
        out_envelope = wire.Envelope(
            kind=wire.Kind.PARTIALS,
            line=envelope.line,
            camera=envelope.camera,
            device=self.config.device,
            frame=envelope.frame,
            capture_ms=envelope.capture_ms,
            epoch=envelope.epoch,
            width=envelope.width,
            height=envelope.height,
            timings=timings[-wire.MAX_TIMINGS :],
        )
        try:
            payload = wire.encode_partials(out_envelope, message.blocks, partials, dtype=self.config.wire_dtype)
        except wire.WireError as error:
            self.bus.report_error("partials_encode_failed", str(error), **ids)
            return
        self.bus.publish("partials", payload, device=self.config.device)
        self.frames_done += 1
        self._last_frame = time.monotonic()
        busy_s = self._last_frame - started
        with self._window_lock:
            self._window.busy_s += busy_s
        self.log.debug("partials_sent", **ids, heads=[b.head for b in message.blocks], ms=round(busy_s * 1000, 2))

    @torch.no_grad()
    def _compute(self, blocks: list) -> tuple[list[torch.Tensor], float]:
        """Return each block's attention output on the CPU and the total compute time in ms."""
        partials = []
        total_ms = 0.0
        for block in blocks:
            if self.controller is None:
                tokens = block.tokens
                self.controller = BlockSizeController(
                    target_ms=self.config.target_ms,
                    max_block=tokens,
                    block_size=tokens,
                    min_block=min(16, tokens),
                )
            on_device = _to_device(block, self.torch_device)
            started = time.perf_counter()
            z = self.model.head_forward(on_device, self.controller.block_size)
            if self.torch_device.type == "cuda":
                torch.cuda.synchronize(self.torch_device)
            elapsed_ms = (time.perf_counter() - started) * 1000
            total_ms += elapsed_ms
            self.controller.update(elapsed_ms, self._memory()[1])
            partials.append(z.cpu())
            with self._window_lock:
                self._window.head_ms[block.head].append(elapsed_ms)
                self._window.heads += 1
        return partials, total_ms

    def _report_loop(self) -> None:
        period = self.config.report_ms / 1000
        while not self.stop.wait(period):
            try:
                report = self._load_report()
            except (OSError, ValueError) as error:
                self.counters.add("load_report_failed")
                self.log.error("load_report_failed", error=str(error))
                continue
            self.bus.publish("load", messages.to_json(report), device=self.config.device)

    def _load_report(self) -> messages.LoadReport:
        with self._window_lock:
            window, self._window = self._window, _Window()
        elapsed = max(time.monotonic() - window.started, 1e-6)
        for head, times in window.head_ms.items():
            self._last_head_ms[head] = sum(times) / len(times)
        memory_mb, memory_fraction = self._memory()
        if window.busy_s > 0:
            # An exponential average keeps one noisy window from moving heads back and forth.
            measured = window.heads / window.busy_s
            self._speed = measured if self._speed == 0 else SPEED_SMOOTHING * measured + (1 - SPEED_SMOOTHING) * self._speed
        speed = self._speed
        return messages.LoadReport(
            device=self.config.device,
            ts_ms=now_ms(),
            queue_depth=len(self.inbox),
            busy_ratio=self._busy_ratio(window, elapsed),
            head_ms=dict(self._last_head_ms),
            memory_mb=memory_mb,
            memory_fraction=min(1.0, memory_fraction),
            block_size=self.controller.block_size if self.controller else 0,
            frames_done=self.frames_done,
            speed=speed,
            # NOTE: the link capacity is configured, not measured: traffic alone cannot reveal it.
            bandwidth_bytes_per_s=self.config.bandwidth_bytes_per_s,
        )

    def _busy_ratio(self, window: _Window, elapsed: float) -> float:
        busy = min(1.0, window.busy_s / elapsed)
        if self.config.simulated_load is not None and self._last_frame is not None:
            # Frames arrive less often than reports, so "while blocks arrive" spans a few periods.
            active_s = max(SIMULATED_LOAD_HOLD_S, 4 * self.config.report_ms / 1000)
            if time.monotonic() - self._last_frame < active_s:
                busy = max(busy, self.config.simulated_load)
        return busy

    def _memory(self) -> tuple[float, float]:
        """Return (MB in use, fraction of the total): CUDA memory on CUDA, else this process's RSS."""
        if self.torch_device.type == "cuda":
            used = torch.cuda.memory_allocated(self.torch_device)
            total = torch.cuda.get_device_properties(self.torch_device).total_memory
            return used / 2**20, used / total
        return _rss_memory()


def _missing_gpu_message() -> str:
    build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (
        f"--require-gpu is set but no CUDA GPU is available (torch {torch.__version__}, {build}). "
        "On a Jetson, run the container with the NVIDIA runtime (`runtime: nvidia`, see "
        "compose/docker-compose.jetson.yml) from an image with a CUDA build of torch. Elsewhere, check "
        "`nvidia-smi` and the NVIDIA Container Toolkit. To compute on the CPU instead, drop --require-gpu "
        "(or unset SDRM_REQUIRE_GPU)."
    )


def describe_torch_device(device: torch.device) -> dict[str, object]:
    """Return the torch device, its name and its total memory in MiB, for the start log.

    The memory is the GPU's total memory on CUDA and the machine's physical memory on the CPU
    (on a Jetson both are the same shared memory).
    """
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return {"torch_device": str(device), "name": properties.name, "memory_mb": round(properties.total_memory / 2**20)}
    return {"torch_device": str(device), "name": _cpu_name(), "memory_mb": round(_physical_memory_bytes() / 2**20)}


def _cpu_name() -> str:
    """Return the CPU model from /proc/cpuinfo (Linux), else the machine type such as 'x86_64'."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.machine() or "unknown"


def _physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _envelope_ids(payload: bytes) -> dict[str, object]:
    """Return the camera, frame and epoch of a wire message for a log event, or {} when its envelope is invalid."""
    try:
        envelope = wire.peek_envelope(payload)
    except wire.WireError:
        return {}
    return {"camera": envelope.camera, "frame": envelope.frame, "epoch": envelope.epoch}


def _to_device(block, device: torch.device):
    if device.type == "cpu":
        return block
    from dataclasses import replace

    return replace(block, U=block.U.to(device), S=block.S.to(device), V=block.V.to(device))


def _rss_memory() -> tuple[float, float]:
    """Return this process's resident set size in MB and as a fraction of MemTotal (Linux /proc)."""
    try:
        with open("/proc/self/statm") as statm:
            rss_pages = int(statm.read().split()[1])
        rss = rss_pages * os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0.0, 0.0
    return rss / 2**20, rss / total if total else 0.0


def main(argv: list[str] | None = None) -> int:
    return run_main("device", build_parser, Device, argv)


if __name__ == "__main__":
    raise SystemExit(main())
