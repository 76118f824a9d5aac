"""Report helpers for `sdrm bench`: Markdown tables, the target table, profiles and plot files."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen before pyplot is imported

from sdrm.bench_timing import format_ms  # noqa: E402

__all__ = ["figure", "format_ratio", "make_target", "markdown_table", "profile_table", "target_table", "plt"]


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    """Return a GitHub Markdown table; cells are converted with str()."""
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines) + "\n"


def format_ratio(value: float | None, unit: str = "x") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "%":
        return f"{value * 100:.1f} %"
    if unit == "ms":
        return f"{format_ms(value)} ms"
    if unit == "fps":
        return f"{value:.1f} frames/s"
    return f"{value:.3g} {unit}"


def make_target(
    section: str,
    name: str,
    goal: str,
    threshold: float,
    measured: float,
    unit: str,
    detail: str,
    lower_is_better: bool = False,
) -> dict:
    """Return one target row; it passes when measured reaches the threshold in the stated direction."""
    passed = measured <= threshold if lower_is_better else measured >= threshold
    return {
        "section": section,
        "name": name,
        "target": goal,
        "threshold": threshold,
        "measured": measured,
        "unit": unit,
        "lower_is_better": lower_is_better,
        "passed": passed,
        "detail": detail,
    }


def target_table(targets: list[dict]) -> str:
    """Return the target table: name, target, measured, pass/miss and, for a miss, by how much."""
    rows = []
    for target in targets:
        measured = target.get("measured")
        passed = target.get("passed")
        if passed is None:
            verdict = "-"
        else:
            verdict = "pass" if passed else "miss"
        rows.append(
            [
                target["name"],
                target["target"],
                format_ratio(measured, target.get("unit", "x")),
                verdict,
                _shortfall(target) if passed is False else "",
                target.get("detail", ""),
            ]
        )
    return markdown_table(["target", "goal", "measured", "result", "missed by", "detail"], rows)


def _shortfall(target: dict) -> str:
    """Describe how far a missed target is from its threshold."""
    measured, threshold = target.get("measured"), target.get("threshold")
    if measured is None or threshold is None:
        return "not measured"
    unit = target.get("unit", "x")
    if target.get("lower_is_better"):
        excess = measured - threshold
        return f"{format_ratio(excess, unit)} over ({measured / threshold:.2f}x the limit)" if threshold else format_ratio(excess, unit)
    if unit == "x":
        return f"{threshold / measured:.2f}x short" if measured > 0 else "no speedup"
    return f"{format_ratio(threshold - measured, unit)} short ({measured / threshold * 100:.0f} % of the goal)"


def profile_table(rows: list[dict]) -> str:
    """Return a profile (from bench_timing.profile_torch) as a Markdown table."""
    body = [[row["name"], row["calls"], format_ms(row["self_ms_per_run"]), f"{row['share'] * 100:.1f} %"] for row in rows]
    return markdown_table(["function or op", "calls per run", "self ms per run", "share"], body)


@contextmanager
def figure(path: Path, rows: int = 1, cols: int = 1, size: tuple[float, float] | None = None) -> Iterator[tuple]:
    """Yield (fig, axes as a flat list) and save the figure as PNG to path on exit."""
    width, height = size or (5.0 * cols, 3.6 * rows)
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
    try:
        yield fig, [axis for row in axes for axis in row]
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
