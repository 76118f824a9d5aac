"""`sdrm bench`: measure SDRM against its baselines and write report.md, PNG plots and results.json.

Sections:

1. rank: rank-reduction methods on real token matrices (`sdrm.bench_rank`).
2. attention: factor-form against dense attention per head (`sdrm.bench_attention`).
3. phases: Embed, RR, MHA and Val per board frame, SDRM against NRR (`sdrm.bench_attention`).
4. bytes: bytes per frame on the device topics and Mosquitto transfer time (`sdrm.bench_transport`).
5. line: the whole line through Mosquitto (`sdrm.bench_line`).
6. accuracy: `sdrm eval --json` results in docs/results and the energy estimate of `sdrm.cost`.

Times are medians after warm-up with the interquartile range (IQR). Every comparison is a ratio of
two times measured in the same run, interleaved where possible. No test asserts a time.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sdrm import bench_attention, bench_data, bench_line, bench_rank, bench_transport, cost
from sdrm.bench_report import markdown_table, profile_table, target_table
from sdrm.factors import factorize_heads

SECTIONS = ("rank", "attention", "phases", "bytes", "line", "accuracy")
SECTION_TITLES = {
    "rank": "1. Rank reduction",
    "attention": "2. Attention per head",
    "phases": "3. Phases RR, MHA and Val per frame",
    "bytes": "4. Bytes per frame and transfer through Mosquitto",
    "line": "5. End to end through Mosquitto",
    "accuracy": "6. Accuracy and energy estimate",
}
THREADS_ENV = "SDRM_BENCH_THREADS"
# Published accuracy in % (train / val / test), SDRM paper table 2 (Du et al., Knowledge-Based
# Systems 325, 2025).
PAPER_ACCURACY = {
    "NRR": (95.24, 92.13, 91.73),
    "DeiT-B": (94.70, 92.84, 91.53),
    "CoNoT": (92.35, 89.5, 89.39),
    "FLORA": (94.75, 91.50, 90.27),
    "SDRM": (92.87, 91.43, 90.59),
}


class BenchError(RuntimeError):
    """Raised after the report is written when one or more sections failed."""


@dataclass
class BenchSettings:
    """Sizes, repeat counts and limits of one benchmark run. `quick()` and `full()` give the presets."""

    quick: bool
    repeats: int
    warmup: int
    sections: tuple[str, ...] = SECTIONS
    target_phi: float = 0.9
    # Section 1
    phis: tuple[float, ...] = (0.7, 0.8, 0.85, 0.9, 0.95)
    vit_batches: tuple[int, ...] = (1, 8, 16, 32)
    model_batches: tuple[int, ...] = (8, 16, 32)
    frames_per_stream: int = 8
    datasets: tuple[str, ...] = ("boards", "elpv")
    adamatrix_max_elements: int = 1568 * 768
    adamatrix_phis: tuple[float, ...] = (0.7, 0.8, 0.85, 0.9, 0.95)
    slow_budget_s: float = 15.0
    equal_error_slack: float = 0.01
    # Section 2
    attention_block_sizes: tuple[int, ...] = (16, 32, 64, 128)
    # Section 3
    phase_phis: tuple[float, ...] = (0.7, 0.8, 0.85, 0.9, 0.95)
    phase_frames: int = 20
    phase_repeats: int = 20
    # Section 4
    byte_phis: tuple[float, ...] = (0.7, 0.8, 0.85, 0.9, 0.95)
    byte_groups: tuple[int, ...] = (8, 16, 32)
    byte_frames: int = 8
    transfer_repeats: int = 50
    # Section 5
    line_devices: tuple[int, ...] = (1, 2, 4)
    line_frames: int = 0
    line_timeout_s: float = 600.0
    line_verdict_timeout_s: float = 60.0
    threads: int = 0

    @classmethod
    def full(cls) -> BenchSettings:
        return cls(quick=False, repeats=15, warmup=2)

    @classmethod
    def quick_preset(cls) -> BenchSettings:
        """Return the `--quick` preset: about 3 minutes on 2 CPU cores (fewer repeats, sizes and phis)."""
        return cls(
            quick=True,
            repeats=5,
            warmup=1,
            phis=(0.8, 0.9, 0.95),
            vit_batches=(1, 8),
            model_batches=(8,),
            frames_per_stream=4,
            adamatrix_max_elements=196 * 768,
            adamatrix_phis=(0.9,),
            slow_budget_s=5.0,
            phase_phis=(0.9,),
            phase_frames=6,
            phase_repeats=6,
            byte_phis=(0.8, 0.9, 0.95),
            byte_groups=(8, 32),
            byte_frames=2,
            transfer_repeats=15,
            line_devices=(1, 2),
            line_frames=20,
            line_timeout_s=180.0,
            line_verdict_timeout_s=30.0,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def run_bench(
    out: Path,
    quick: bool = False,
    model_dir: Path | None = None,
    sections: tuple[str, ...] | list[str] | None = None,
    repeats: int | None = None,
    threads: int | None = None,
    settings: BenchSettings | None = None,
    progress: bool = True,
) -> dict:
    """Run the benchmark and write report.md, the PNG plots and results.json into `out`.

    quick selects the `--quick` preset, else the full one; `settings` replaces the preset. sections
    (names from SECTIONS) and repeats override the preset's. threads sets torch's intra-op threads
    for the run and is restored afterwards. It defaults to $SDRM_BENCH_THREADS, else 1 for quick
    runs and the CPU cores this process may use otherwise. Returns the results dict. Raises BenchError after writing the report when
    a section failed, and ValueError for an unknown section name.
    """
    out = Path(out)
    settings = settings or (BenchSettings.quick_preset() if quick else BenchSettings.full())
    if sections is not None:
        unknown = [name for name in sections if name not in SECTIONS]
        if unknown:
            raise ValueError(f"unknown bench sections {unknown}; choose from {', '.join(SECTIONS)}")
        settings.sections = tuple(sections)
    if repeats is not None:
        settings.repeats = repeats
        settings.phase_repeats = repeats
        settings.transfer_repeats = repeats
    settings.threads = _thread_count(threads, settings.quick)
    out.mkdir(parents=True, exist_ok=True)

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    started = time.monotonic()
    try:
        results = _run_sections(out, settings, model_dir, progress)
    finally:
        torch.set_num_threads(previous_threads)
    results["meta"]["elapsed_s"] = time.monotonic() - started
    results["meta"]["load_average_end"] = list(os.getloadavg())

    (out / "results.json").write_text(json.dumps(results, indent=2, default=_json_default) + "\n")
    (out / "report.md").write_text(_report(results, settings))
    failed = [name for name, section in results["sections"].items() if section.get("status") == "failed"]
    if failed:
        raise BenchError(f"bench sections failed: {', '.join(failed)}; see {out / 'report.md'}")
    return results


def _thread_count(threads: int | None, quick: bool) -> int:
    """Return the torch thread count: the argument, else $SDRM_BENCH_THREADS, else 1 for quick runs and all usable cores otherwise.

    Quick runs take one thread because they run in CI on shared machines. When other processes
    hold the cores, OpenMP threads wait for each other: on a busy 2-core machine (load average 5),
    the same rank cases took 100 s with 2 threads and 10 s with 1.
    """
    if threads is None and os.environ.get(THREADS_ENV):
        try:
            threads = int(os.environ[THREADS_ENV])
        except ValueError:
            raise ValueError(f"invalid {THREADS_ENV}={os.environ[THREADS_ENV]!r}: set it to a thread count such as 2") from None
    if threads is None and quick:
        threads = 1
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return threads


def _run_sections(out: Path, settings: BenchSettings, model_dir: Path | None, progress: bool) -> dict:
    loaded = bench_data.load_model(model_dir)
    boards = bench_data.board_images()
    elpv = bench_data.elpv_images() if "elpv" in settings.datasets else None
    images = [image_set for image_set in (boards, elpv) if image_set is not None]
    results = {
        "meta": machine_info() | {"model": loaded.description, "model_shipped": loaded.shipped},
        "settings": settings.to_dict(),
        "data": {
            image_set.name: {"root": str(image_set.root), "images": len(image_set.paths), "note": image_set.note}
            for image_set in images
        },
        "sections": {},
        "targets": [],
        "plots": [],
    }
    if elpv is None and "elpv" in settings.datasets:
        results["data"]["elpv"] = {"note": f"{bench_data.default_data_root() / 'elpv'} not found: ELPV cells skipped"}

    bar = tqdm(settings.sections, desc="bench", unit="section", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)

        def step(message: str) -> None:
            bar.set_postfix_str(message)

        section_started = time.monotonic()
        try:
            section = _run_section(name, settings, loaded, boards, images, step, results)
        except Exception as error:  # noqa: BLE001 - one failed section must not lose the others' results
            section = {"status": "failed", "reason": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        section["elapsed_s"] = time.monotonic() - section_started
        results["sections"][name] = section
        results["targets"].extend(section.get("targets", []))
        if section.get("status") == "done":
            try:
                results["plots"].extend(_plots(name, section, out))
            except Exception as error:  # noqa: BLE001 - a broken plot is reported, the numbers are kept
                section["plot_error"] = f"{type(error).__name__}: {error}"
    bar.close()
    return results


def _run_section(name, settings, loaded, boards, images, step, results) -> dict:
    if boards is None and name in ("attention", "phases", "bytes", "line"):
        return {"status": "skipped", "reason": "no board images found (shared data or samples/boards)"}
    if name == "rank":
        return bench_rank.run(settings, images, loaded, step)
    if name == "attention":
        return bench_attention.run_attention(settings, boards, loaded, step)
    if name == "phases":
        return bench_attention.run_phases(settings, boards, loaded, step)
    if name == "bytes":
        return bench_transport.run(settings, boards, loaded, step)
    if name == "line":
        return bench_line.run(settings, boards, loaded, step)
    return run_accuracy(settings, boards, loaded, results)


def _plots(name: str, section: dict, out: Path) -> list[str]:
    if name == "rank":
        return bench_rank.plots(section, out)
    if name == "attention":
        return bench_attention.attention_plots(section, out)
    if name == "phases":
        return bench_attention.phases_plots(section, out)
    if name == "bytes":
        return bench_transport.plots(section, out)
    if name == "line":
        return bench_line.plots(section, out)
    return []


# Section 6 -----------------------------------------------------------------------------------------


def run_accuracy(settings: BenchSettings, boards, loaded: bench_data.LoadedModel, results: dict) -> dict:
    """Collect docs/results/*.json evaluation outputs and the energy and FLOP estimates per board frame."""
    evaluations = []
    for path in sorted((bench_data.REPOSITORY / "docs" / "results").glob("*.json")):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            evaluations.append({"file": path.name, "error": f"unreadable: {error}"})
            continue
        split = report.get("split") if isinstance(report, dict) else None
        if not isinstance(split, dict):
            evaluations.append({"file": path.name, "error": "no 'split' metrics (not an `sdrm eval --json` output)"})
            continue
        boards_metrics = (report.get("boards") or {}).get("board_metrics") or {}
        evaluations.append({"file": path.name, "split": split, "boards": boards_metrics})

    energy = _energy(settings, boards, loaded) if boards is not None else {"status": "skipped", "reason": "no board images"}
    return {"status": "done", "evaluations": evaluations, "energy": energy}


@torch.no_grad()
def _energy(settings: BenchSettings, boards, loaded: bench_data.LoadedModel) -> dict:
    """Return the sdrm.cost energy estimate and FLOPs of one board frame, per phi, with the constants used."""
    model = loaded.model
    config = model.config
    tokens = bench_data.model_tokens(loaded, bench_data.read_gray(boards.paths[0]))
    batch, count, features = tokens.shape
    heads, head_dim = config.heads, config.head_dim
    rows = []
    for phi in settings.phase_phis:
        blocks, results = factorize_heads(tokens, heads, phi, method=config.rank_method)
        ranks = [block.rank for block in blocks]
        iterations = [result.iterations for result in results]
        terms = {"compute_j": 0.0, "transfer_j": 0.0, "memory_j": 0.0, "total_j": 0.0}
        for rank, steps in zip(ranks, iterations):
            words = cost.block_elements(batch, count, head_dim, rank)
            side = math.ceil(math.sqrt(words))
            estimate = cost.energy_estimate(batch * count, head_dim, rank, steps, devices=1, block_side=side)
            for key in terms:
                terms[key] += estimate[key]
        flops = {
            "rr": cost.rank_reduction_flops(batch, count, features, heads, ranks, method=config.rank_method),
            "mha": sum(cost.attention_flops(batch, count, head_dim, rank) for rank in ranks),
            "val": cost.rest_flops(batch, count, features, heads, ranks, config.mlp_ratio, config.local_blocks, config.num_classes, config.pool),
        }
        rows.append({"phi": phi, "ranks": ranks, "iterations": iterations, "energy": terms, "flops": flops})
    nrr_flops = {
        "rr": 0,
        "mha": heads * cost.attention_flops(batch, count, head_dim, None),
        "val": cost.rest_flops(batch, count, features, heads, None, config.mlp_ratio, config.local_blocks, config.num_classes, config.pool),
    }
    return {
        "status": "done",
        "tiles": batch,
        "tokens": count,
        "head_dim": head_dim,
        "constants": {
            "alpha_flop_j": cost.EXAMPLE_ALPHA_FLOP_J,
            "gamma_bit_j": cost.EXAMPLE_GAMMA_BIT_J,
            "delta_access_j": cost.EXAMPLE_DELTA_ACCESS_J,
            "bits_per_word": 16,
        },
        "rows": rows,
        "nrr_flops": nrr_flops,
    }


def _accuracy_markdown(section: dict) -> str:
    parts = []
    evaluations = section["evaluations"]
    if not evaluations:
        parts.append("No `sdrm eval --json` outputs under docs/results/*.json yet.\n")
    else:
        body = []
        for entry in evaluations:
            if "error" in entry:
                body.append([entry["file"], entry["error"]] + [""] * 7)
                continue
            split, board = entry["split"], entry["boards"]
            body.append(
                [
                    entry["file"],
                    f"{split.get('split', '-')} (phi {split.get('phi')})",
                    _percent(split.get("accuracy")),
                    _percent(split.get("balanced_accuracy")),
                    _percent(split.get("precision")),
                    _percent(split.get("recall")),
                    _percent(split.get("f1")),
                    "-" if split.get("auroc") is None else f"{split['auroc']:.4f}",
                    _percent(board.get("accuracy")) if board else "-",
                ]
            )
        parts.append(
            markdown_table(
                ["file", "split", "accuracy", "balanced accuracy", "precision", "recall", "F1", "AUROC", "whole boards accuracy"],
                body,
            )
        )
    paper = [[name, *values] for name, values in PAPER_ACCURACY.items()]
    parts.append("\nPaper anchors (SDRM paper table 2, accuracy %, its own data set):\n")
    parts.append(markdown_table(["model", "train", "val", "test"], paper))

    energy = section["energy"]
    if energy.get("status") != "done":
        parts.append(f"\nEnergy estimate: {energy.get('status')}: {energy.get('reason')}\n")
        return "\n".join(parts)
    constants = energy["constants"]
    parts.append(
        f"\nEnergy estimate per board frame ({energy['tiles']} tiles, m = {energy['tiles'] * energy['tokens']}, "
        f"n = d_h = {energy['head_dim']}), `sdrm.cost.energy_estimate` summed over heads, each head one device "
        f"receiving one block of s = ceil(sqrt(block words)). Constants (order-of-magnitude examples from "
        f"sdrm.cost, not measurements): alpha_flop {constants['alpha_flop_j']:.0e} J/FLOP, gamma_bit "
        f"{constants['gamma_bit_j']:.0e} J/bit, delta_access {constants['delta_access_j']:.0e} J/word, "
        f"{constants['bits_per_word']} bits per word. T is the iteration count the rank method reported.\n"
    )
    body = []
    for row in energy["rows"]:
        terms = row["energy"]
        body.append(
            [
                row["phi"],
                f"{np.mean(row['ranks']):.1f}",
                f"{np.mean(row['iterations']):.1f}",
                f"{terms['compute_j'] * 1e6:.2f}",
                f"{terms['transfer_j'] * 1e6:.2f}",
                f"{terms['memory_j'] * 1e6:.2f}",
                f"{terms['total_j'] * 1e6:.2f}",
                f"{row['flops']['rr'] / 1e6:.1f}",
                f"{row['flops']['mha'] / 1e6:.1f}",
                f"{row['flops']['val'] / 1e6:.1f}",
            ]
        )
    nrr = energy["nrr_flops"]
    body.append(["NRR", "-", "-", "-", "-", "-", "-", "0", f"{nrr['mha'] / 1e6:.1f}", f"{nrr['val'] / 1e6:.1f}"])
    parts.append(
        markdown_table(
            ["phi", "mean rank", "mean T", "compute uJ", "transfer uJ", "memory uJ", "total uJ", "RR MFLOP", "MHA MFLOP", "Val MFLOP"],
            body,
        )
    )
    return "\n".join(parts)


def _percent(value) -> str:
    return "-" if value is None else f"{value * 100:.2f} %"


# Machine and report ------------------------------------------------------------------------------


def machine_info() -> dict:
    """Return the CPU, cores, memory, load, library versions and BLAS of this run."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    memory_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = int(line.split()[1]) / 1024 / 1024
                break
    except OSError:
        pass

    config = torch.__config__.show()
    blas = _config_value(config, "BLAS_INFO")
    lapack = _config_value(config, "LAPACK_INFO")
    mkl = next((line.strip(" -") for line in config.splitlines() if "Math Kernel Library" in line), None)

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for module in ("scipy", "matplotlib", "cv2", "paho.mqtt"):
        versions[module] = _module_version(module)
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": memory_gib,
        "load_average_start": list(os.getloadavg()),
        "platform": platform.platform(),
        "versions": versions,
        "blas": {"blas": blas, "lapack": lapack, "mkl": mkl, "torch_parallel": torch.__config__.parallel_info().splitlines()[:3]},
        "mosquitto": bench_transport.mosquitto_version() if bench_line.line_available() else None,
        "git_commit": _git_commit(),
        "command": " ".join(sys.argv),
    }


def _config_value(config: str, key: str) -> str | None:
    """Return the value of KEY=value in torch.__config__.show() output, or None."""
    match = re.search(rf"\b{key}=([^,\s]+)", config)
    return match.group(1) if match else None


def _module_version(name: str) -> str | None:
    try:
        module = __import__(name, fromlist=["__version__"])
    except ImportError:
        return None
    return getattr(module, "__version__", None)


def _git_commit() -> str | None:
    try:
        completed = subprocess.run(
            ["git", "-C", str(bench_data.REPOSITORY), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return completed.stdout.strip() or None


def _report(results: dict, settings: BenchSettings) -> str:
    meta = results["meta"]
    versions = ", ".join(f"{name} {version}" for name, version in meta["versions"].items() if version)
    blas = meta["blas"]
    lines = [
        "# SDRM Line benchmark",
        "",
        f"- Date: {meta['date']}; mode: {'quick' if settings.quick else 'full'}; elapsed {meta['elapsed_s']:.0f} s; "
        f"git {meta['git_commit']}",
        f"- Machine: {meta['cpu']}, {meta['usable_cpus']} usable of {meta['logical_cpus']} logical CPUs, "
        f"{meta['memory_gib']:.1f} GiB memory; load average at start {_load(meta['load_average_start'])}, "
        f"at end {_load(meta['load_average_end'])} (1, 5, 15 min)",
        f"- Versions: {versions}; BLAS {blas['blas']}, LAPACK {blas['lapack']} ({blas['mkl'] or 'no MKL'}); "
        f"{meta['mosquitto'] or 'mosquitto not checked'}",
        f"- Torch threads: {settings.threads} (set with torch.set_num_threads; ${THREADS_ENV} overrides)",
        f"- Settings: {settings.repeats} timed repeats after {settings.warmup} warm-up calls; phis {list(settings.phis)}; "
        f"target phi {settings.target_phi}; sections {', '.join(settings.sections)}",
        f"- Model: {meta['model']}",
        "- Data: " + "; ".join(f"{name}: {info.get('images', 0)} images in {info.get('root', '-')} {info.get('note', '')}".strip() for name, info in results["data"].items()),
        "",
        "Times are medians in ms with the interquartile range [q1-q3]; ratios compare times from this run.",
        "",
        "## Targets",
        "",
    ]
    if results["targets"]:
        lines.append(target_table(results["targets"]))
    else:
        lines.append("No target was measured in this run.\n")
    for name in settings.sections:
        section = results["sections"].get(name, {})
        lines += ["", f"## {SECTION_TITLES[name]}", ""]
        if "elapsed_s" in section:
            lines += [f"Section run time {section['elapsed_s']:.0f} s.", ""]
        lines.append(_section_markdown(name, section, settings))
        section_targets = section.get("targets", [])
        if section_targets:
            lines += ["", "Targets of this section:", "", target_table(section_targets)]
        for key, profile in (section.get("profiles") or {}).items():
            lines += ["", f"Profile of the hot path ({profile['what']}):", "", profile_table(profile["rows"])]
        if section.get("plot_error"):
            lines.append(f"\nPlot failed: {section['plot_error']}\n")
    plots = results["plots"]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def _section_markdown(name: str, section: dict, settings: BenchSettings) -> str:
    status = section.get("status")
    if status == "failed":
        return f"Failed: {section['reason']}\n\n```\n{section.get('traceback', '')[-2000:]}\n```\n"
    if name == "line":
        return bench_line.markdown(section)
    if status != "done":
        return f"{status}: {section.get('reason', '')}\n"
    if name == "rank":
        return bench_rank.markdown(section, settings)
    if name == "attention":
        return bench_attention.attention_markdown(section)
    if name == "phases":
        return bench_attention.phases_markdown(section)
    if name == "bytes":
        return bench_transport.markdown(section)
    return _accuracy_markdown(section)


def _load(values: list[float]) -> str:
    return ", ".join(f"{value:.2f}" for value in values)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to results.json")
