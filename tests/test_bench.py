"""`sdrm bench` on a tiny setting: the report, plots and results.json exist and hold every section.

No test asserts a time: the machines that run the tests are shared and their timings vary.
"""

import json
import math

import pytest

from sdrm import bench_line
from sdrm.bench import SECTIONS, BenchSettings, run_bench
from sdrm.bench_report import target_table
from sdrm.bench_timing import measure, measure_interleaved

MEASURED_SECTIONS = ("rank", "attention", "phases", "bytes", "accuracy")


def tiny_settings() -> BenchSettings:
    """Return the quick preset cut down to one size per section, so that a run takes seconds."""
    settings = BenchSettings.quick_preset()
    settings.phis = (0.9,)
    settings.vit_batches = (1,)
    settings.model_batches = (8,)
    settings.frames_per_stream = 2
    settings.datasets = ("boards",)
    settings.adamatrix_max_elements = 0
    settings.attention_block_sizes = (32,)
    settings.phase_frames = 2
    settings.byte_phis = (0.9,)
    settings.byte_groups = (27,)
    settings.byte_frames = 1
    settings.line_devices = (1,)
    settings.line_frames = 2
    settings.line_timeout_s = 120.0
    return settings


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    results = run_bench(out, quick=True, settings=tiny_settings(), sections=MEASURED_SECTIONS, repeats=2, threads=1, progress=False)
    return out, results


def test_bench_writes_report_plots_and_json(tiny_run):
    out, _ = tiny_run
    report = (out / "report.md").read_text()
    assert report.startswith("# SDRM Line benchmark")
    assert "Torch threads: 1" in report
    assert "## Targets" in report
    for title in ("1. Rank reduction", "2. Attention per head", "3. Phases", "4. Bytes per frame", "6. Accuracy"):
        assert f"## {title}" in report
    for name in ("rank_time_vit.png", "rank_time_model.png", "attention_per_head.png", "phases.png", "bytes.png"):
        assert (out / name).stat().st_size > 1000, name
        assert f"![{name}]({name})" in report


def test_bench_json_has_expected_keys(tiny_run):
    out, returned = tiny_run
    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"meta", "settings", "data", "sections", "targets", "plots"}
    assert results["sections"].keys() == set(MEASURED_SECTIONS)
    assert returned["meta"]["date"] == results["meta"]["date"]

    meta = results["meta"]
    assert set(meta) >= {"date", "cpu", "logical_cpus", "memory_gib", "versions", "blas", "model", "elapsed_s"}
    assert set(meta["versions"]) >= {"python", "torch", "numpy"}
    assert results["settings"]["threads"] == 1
    assert results["settings"]["repeats"] == 2

    for name, section in results["sections"].items():
        assert section["status"] == "done", (name, section.get("reason"), section.get("traceback"))


def test_bench_rank_cases_have_times_and_errors(tiny_run):
    _, results = tiny_run
    rank = results["sections"]["rank"]
    methods = {case["method"] for case in rank["cases"]}
    assert {"exact", "gram", "randomized", "subspace", "auto_cold", "auto_warm", "svd_lowrank_1", "thin_svd"} <= methods
    assert {(info["geometry"], info["batch"]) for info in rank["streams"]} == {("vit", 1), ("model", 8)}
    for case in rank["cases"]:
        assert case["timing"]["repeats"] >= 1
        assert case["timing"]["median_ms"] > 0
        # An error ratio below 1 would beat the optimal rank-r error (Eckart-Young): a bug.
        assert case["error_ratio_median"] >= 1.0 - 1e-3, case
    names = [target["name"] for target in rank["targets"]]
    assert any("thin LAPACK SVD" in name for name in names)


def test_bench_sections_report_ratios(tiny_run):
    _, results = tiny_run
    sections = results["sections"]
    variants = {row["variant"] for row in sections["attention"]["rows"]}
    assert variants == {"qkv", "blocked_32", "sdpa", "sdpa_4d"}
    assert {row["geometry"] for row in sections["attention"]["rows"]} == {"model", "vit"}

    phase = sections["phases"]["cases"][0]
    assert set(phase["ratios"]) == {"embed", "rr", "mha", "val", "total"}
    assert all(math.isfinite(value) and value > 0 for value in phase["ratios"].values())

    bytes_section = sections["bytes"]
    groups = {(case["phi"], case["group"]) for case in bytes_section["cases"]}
    tiles = bytes_section["tiles"]
    assert groups == {(0.9, 27), (0.9, tiles), (None, tiles)}
    dense = next(case for case in bytes_section["cases"] if case["phi"] is None)
    assert dense["fraction_of_raw"] >= 1.0
    assert bytes_section["transfer"]["status"] in ("done", "skipped")

    energy = sections["accuracy"]["energy"]
    assert set(energy["constants"]) == {"alpha_flop_j", "gamma_bit_j", "delta_access_j", "bits_per_word"}
    assert energy["rows"][0]["energy"]["total_j"] > 0

    target_sections = {target["section"] for target in results["targets"]}
    assert {"rank", "phases", "bytes"} <= target_sections


@pytest.mark.slow
def test_bench_line_section_runs(tmp_path):
    results = run_bench(tmp_path, quick=True, settings=tiny_settings(), sections=["line"], threads=1, progress=False)
    line = results["sections"]["line"]
    report = (tmp_path / "report.md").read_text()
    if not bench_line.line_available():
        assert line["status"] == "not available yet"
        assert "not available yet" in report
        return
    assert line["status"] in ("done", "skipped"), line
    if line["status"] == "done":
        modes = {(run["mode"], run["devices"]) for run in line["runs"]}
        assert modes == {("sdrm", 1), ("nrr", 1), ("sdrm-paced", 1)}
        assert all(run["status"] == "done" for run in line["runs"]), line["runs"]
        assert (tmp_path / "line.png").is_file()


def test_bench_rejects_unknown_section(tmp_path):
    with pytest.raises(ValueError, match="unknown bench sections"):
        run_bench(tmp_path, quick=True, sections=["rank", "speed"])
    assert set(SECTIONS) == {"rank", "attention", "phases", "bytes", "line", "accuracy"}


def test_measure_takes_requested_repeats():
    calls = []
    timing = measure(lambda: calls.append(1), repeats=4, warmup=2, calibrate=False)
    assert timing.repeats == 4
    assert len(calls) == 6
    assert not timing.truncated
    assert timing.q1_ms <= timing.median_ms <= timing.q3_ms


def test_measure_stops_at_budget():
    timing = measure(lambda: sum(range(20_000)), repeats=10_000, warmup=0, budget_s=0.05, calibrate=False)
    assert timing.truncated
    assert 1 <= timing.repeats < 10_000


def test_measure_interleaved_alternates_functions():
    order = []
    timings = measure_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3, warmup=1)
    assert {name: timing.repeats for name, timing in timings.items()} == {"a": 3, "b": 3}
    calls_a = timings["a"].calls_per_sample
    calls_b = timings["b"].calls_per_sample
    timed = order[2:]
    assert len(timed) == 3 * (calls_a + calls_b)
    assert timed[:calls_a] == ["a"] * calls_a
    assert timed[calls_a : calls_a + calls_b] == ["b"] * calls_b


def test_target_table_states_shortfall():
    targets = [
        {"name": "speed", "target": ">= 10x", "threshold": 10.0, "measured": 4.0, "unit": "x", "passed": False},
        {"name": "bytes", "target": "<= 0.25", "threshold": 0.25, "measured": 0.5, "unit": "x", "lower_is_better": True, "passed": False},
        {"name": "latency", "target": "<= 150 ms", "threshold": 150.0, "measured": 90.0, "unit": "ms", "lower_is_better": True, "passed": True},
    ]
    table = target_table(targets)
    rows = table.splitlines()[2:]
    assert "| miss | 2.50x short |" in rows[0]
    assert "| miss | 0.25x over (2.00x the limit) |" in rows[1]
    assert "| pass |" in rows[2]
