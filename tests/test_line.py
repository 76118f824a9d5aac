"""`sdrm line` end to end on the sample boards: one verdict per board, equal to the local model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdrm.checkpoint import load_checkpoint
from sdrm.data import read_gray
from sdrm.inference import predict_frame
from services.broker import find_mosquitto
from tests.broker import REPOSITORY, SAMPLES, model_dir  # noqa: F401 - pytest fixture

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def line_run(model_dir, tmp_path_factory):
    """Run `sdrm line` once on samples/boards with 2 devices; return (summary, stdout, stderr)."""
    if find_mosquitto() is None:
        pytest.skip("the line starts a local broker and needs the mosquitto binary (apt-get install mosquitto)")
    summary_path = tmp_path_factory.mktemp("line") / "summary.json"
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    result = subprocess.run(
        [
            sys.executable, "-m", "sdrm.cli", "line",
            "--source", str(SAMPLES), "--devices", "2", "--model", str(model_dir),
            "--summary-json", str(summary_path), "--timeout-s", "90",
        ],
        capture_output=True, text=True, timeout=150, cwd=REPOSITORY, env=env,
    )
    assert result.returncode == 0, f"sdrm line exited with {result.returncode}:\n{result.stdout}\n{result.stderr[-3000:]}"
    return json.loads(summary_path.read_text()), result.stdout, result.stderr


def test_line_one_verdict_per_board(line_run):
    summary, stdout, _ = line_run
    boards = sorted(SAMPLES.rglob("*.jpg"))
    assert summary["frames"] == len(boards) == 12
    assert summary["verdicts"] == 12
    assert summary["statuses"]["complete"] == 12
    files = sorted(Path(row["file"]).resolve() for row in summary["results"])
    assert files == [path.resolve() for path in boards]
    assert stdout.count("cam1 frame ") == 12


def test_line_matches_local_model(line_run, model_dir):
    summary, _, _ = line_run
    model, manifest = load_checkpoint(model_dir)
    for row in summary["results"]:
        local = predict_frame(model, manifest, read_gray(Path(row["file"])))
        assert row["label"] == local.label, row["file"]
        assert abs(row["score"] - local.score) <= 1e-3, row["file"]
        assert len(row["flagged"]) == len(local.flagged), row["file"]


def test_line_summary_fields(line_run):
    summary, stdout, _ = line_run
    assert summary["labelled"] == 12
    assert 0.0 <= summary["accuracy"] <= 1.0
    assert summary["throughput_fps"] > 0
    latency = summary["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
    for stage in ("decode", "embed", "factorize", "transfer", "attention", "aggregate", "total"):
        assert stage in summary["stage_mean_ms"], stage
    assert "summary: 12 frames, 12 verdicts" in stdout
    print(f"line latency ms: {latency}, throughput {summary['throughput_fps']:.2f} frames/s")
