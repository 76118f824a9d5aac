"""Timing and profiling helpers for `sdrm bench`: medians with interquartile range, hot-path profiles.

Every time is the median of repeated samples after warm-up calls. A call that takes less than
`MIN_SAMPLE_MS` is repeated inside one sample (as `timeit` does) and the sample is divided by the
call count, so that the clock's resolution and Python's call overhead do not dominate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

MIN_SAMPLE_MS = 2.0
MAX_CALLS_PER_SAMPLE = 1000


@dataclass
class Timing:
    """Per-call times in milliseconds of one measured function.

    `samples_ms` contains one value per timed sample (each the mean of `calls_per_sample` calls).
    `truncated` is True when a time budget stopped the sampling before the requested repeats.
    """

    samples_ms: list[float]
    calls_per_sample: int = 1
    warmup: int = 0
    truncated: bool = False

    @property
    def repeats(self) -> int:
        return len(self.samples_ms)

    @property
    def median_ms(self) -> float:
        return float(np.median(self.samples_ms)) if self.samples_ms else float("nan")

    @property
    def q1_ms(self) -> float:
        return float(np.percentile(self.samples_ms, 25)) if self.samples_ms else float("nan")

    @property
    def q3_ms(self) -> float:
        return float(np.percentile(self.samples_ms, 75)) if self.samples_ms else float("nan")

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms

    def to_dict(self) -> dict:
        return {
            "median_ms": self.median_ms,
            "q1_ms": self.q1_ms,
            "q3_ms": self.q3_ms,
            "iqr_ms": self.iqr_ms,
            "repeats": self.repeats,
            "calls_per_sample": self.calls_per_sample,
            "warmup": self.warmup,
            "truncated": self.truncated,
            "samples_ms": [round(value, 6) for value in self.samples_ms],
        }


def measure(
    function: Callable[[], object],
    repeats: int,
    warmup: int = 1,
    budget_s: float | None = None,
    calibrate: bool = True,
) -> Timing:
    """Time `function` and return its per-call times.

    Runs `warmup` untimed calls, then `repeats` samples. With `calibrate`, a call shorter than
    MIN_SAMPLE_MS is repeated within each sample. `budget_s` stops the sampling once the timed
    samples have used that many seconds; at least one sample is always taken. When the first
    warm-up call alone exceeds the budget, the other warm-up calls are skipped.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    first_ms = None
    for index in range(warmup):
        call_started = time.perf_counter()
        function()
        if index == 0:
            first_ms = (time.perf_counter() - call_started) * 1000
            if budget_s is not None and first_ms > budget_s * 1000:
                break

    calls = 1
    if calibrate and first_ms is not None and first_ms < MIN_SAMPLE_MS:
        calls = int(min(MAX_CALLS_PER_SAMPLE, max(1, MIN_SAMPLE_MS / max(first_ms, 1e-3))))

    samples: list[float] = []
    truncated = False
    sampling_started = time.perf_counter()
    for _ in range(repeats):
        call_started = time.perf_counter()
        for _ in range(calls):
            function()
        samples.append((time.perf_counter() - call_started) * 1000 / calls)
        if budget_s is not None and time.perf_counter() - sampling_started > budget_s and len(samples) < repeats:
            truncated = True
            break
    return Timing(samples_ms=samples, calls_per_sample=calls, warmup=warmup, truncated=truncated)


def measure_interleaved(
    functions: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, Timing]:
    """Time several functions round-robin (A, B, A, B, ...) so that load changes hit all of them alike.

    Each function gets `warmup` untimed calls first. Calls shorter than MIN_SAMPLE_MS are repeated
    within a sample as in `measure`; the count is chosen per function.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    calls: dict[str, int] = {}
    for name, function in functions.items():
        first_ms = None
        for index in range(max(warmup, 1)):
            call_started = time.perf_counter()
            function()
            if index == 0:
                first_ms = (time.perf_counter() - call_started) * 1000
        calls[name] = int(min(MAX_CALLS_PER_SAMPLE, max(1, MIN_SAMPLE_MS / max(first_ms or 0.0, 1e-3))))

    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            call_started = time.perf_counter()
            for _ in range(calls[name]):
                function()
            samples[name].append((time.perf_counter() - call_started) * 1000 / calls[name])
    return {
        name: Timing(samples_ms=samples[name], calls_per_sample=calls[name], warmup=max(warmup, 1))
        for name in functions
    }


def profile_torch(function: Callable[[], object], runs: int = 3, count: int = 8) -> list[dict]:
    """Profile `runs` calls with torch.profiler and return the `count` ops with the most self CPU time.

    Each row: op name, calls, self CPU time in ms per run, and its share of the profiled self time.
    """
    function()
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, record_shapes=False) as profiler:
        for _ in range(runs):
            function()
    events = profiler.key_averages()
    total_us = sum(event.self_cpu_time_total for event in events) or 1.0
    ranked = sorted(events, key=lambda event: event.self_cpu_time_total, reverse=True)[:count]
    return [
        {
            "name": event.key,
            "calls": int(event.count // runs) if runs else int(event.count),
            "self_ms_per_run": event.self_cpu_time_total / 1000 / runs,
            "share": event.self_cpu_time_total / total_us,
        }
        for event in ranked
    ]


def format_ms(value: float) -> str:
    """Format a duration in milliseconds with about three significant digits."""
    if value != value:  # NaN
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"
