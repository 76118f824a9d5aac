"""Sections 2 and 3 of `sdrm bench`: attention per head, and the RR / MHA / Val phases per frame.

Section 2 times one head's Q, K, V projection and attention from its factor block (SDRM) against
the same from the dense slice (NRR, no rank reduction). Attention runs blocked at several key block
sizes and as PyTorch's scaled_dot_product_attention (SDPA) on 3-D and 4-D inputs. A variant's time
is the time for all heads of one frame divided by the head count.

Section 3 times a whole board frame through the model's three seams as the line runs them. The
phases are Embed (tiling and conv stem) and RR (rank reduction of every head slice, warm-started
from the previous frame as the compressor does). Then come MHA (every head's attention,
`head_forward`) and Val (aggregate, classify and decide). SDRM and NRR frames alternate, so load
changes hit both alike.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from sdrm import bench_data, cost
from sdrm.attention import blocked_attention, factor_qkv
from sdrm.bench_timing import Timing, format_ms, measure_interleaved, profile_torch
from sdrm.factors import FactorBlock, factorize_heads
from sdrm.inference import decide, frame_to_tiles

WEIGHT_SEED = 4321
PHASES = ("embed", "rr", "mha", "val")
PHASE_NAMES = {"embed": "Embed", "rr": "RR", "mha": "MHA", "val": "Val"}
# Published SDRM results against NRR (Du et al., Knowledge-Based Systems 325, 2025): MHA time
# -87.6 %, Val time -50 %, overall -20.4 %.
PAPER_REDUCTION = {"mha": 0.876, "val": 0.50, "total": 0.204}


# Section 2 -----------------------------------------------------------------------------------------


def _attention_variants(block_sizes: tuple[int, ...]) -> dict:
    variants = {"qkv": None}
    for size in block_sizes:
        variants[f"blocked_{size}"] = size
    variants["sdpa"] = "sdpa"
    variants["sdpa_4d"] = "sdpa_4d"
    return variants


def _heads_call(blocks: list[FactorBlock], weights: list[tuple[torch.Tensor, ...]], variant):
    """Return a function that runs Q, K, V (and attention unless variant is None) for every head."""

    def run() -> None:
        for block, (w_q, w_k, w_v) in zip(blocks, weights):
            q, k, v = factor_qkv(block, w_q, w_k, w_v)
            if variant == "sdpa":
                F.scaled_dot_product_attention(q, k, v)
            elif variant == "sdpa_4d":
                F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])
            elif variant is not None:
                blocked_attention(q, k, v, variant)

    return run


def _geometries(settings, boards: bench_data.ImageSet, loaded: bench_data.LoadedModel) -> list[dict]:
    """Return the two measured geometries with their dense and factor blocks and per-head weights."""
    gray = bench_data.read_gray(boards.paths[0])
    model = loaded.model
    tokens = bench_data.model_tokens(loaded, gray)
    weights = [(model.w_q[h].detach(), model.w_k[h].detach(), model.w_v[h].detach()) for h in range(model.config.heads)]
    geometries = [
        {
            "name": "model",
            "title": f"model, {tokens.shape[0]} tiles x {tokens.shape[1]} tokens, d_h {model.config.head_dim}",
            "tokens": tokens,
            "heads": model.config.heads,
            "weights": weights,
        }
    ]

    vit = bench_data.vit_tokens(gray)[None]
    head_dim = bench_data.VIT_DIM // bench_data.VIT_HEADS
    generator = torch.Generator().manual_seed(WEIGHT_SEED)
    bound = 1.0 / math.sqrt(head_dim)
    vit_weights = [
        tuple(torch.empty(head_dim, head_dim).uniform_(-bound, bound, generator=generator) for _ in range(3))
        for _ in range(bench_data.VIT_HEADS)
    ]
    geometries.append(
        {
            "name": "vit",
            "title": f"ViT-B style, 1 image x 196 tokens, d_h {head_dim}",
            "tokens": vit,
            "heads": bench_data.VIT_HEADS,
            "weights": vit_weights,
        }
    )
    return geometries


@torch.no_grad()
def run_attention(settings, boards: bench_data.ImageSet, loaded: bench_data.LoadedModel, progress) -> dict:
    """Time factor-form against dense attention per head at both geometries; return the section's results."""
    phi = settings.target_phi
    rows = []
    for geometry in _geometries(settings, boards, loaded):
        tokens, heads = geometry["tokens"], geometry["heads"]
        factor_blocks, _ = factorize_heads(tokens, heads, phi)
        dense_blocks, _ = factorize_heads(tokens, heads, None)
        batch, count, features = tokens.shape
        head_dim = features // heads
        ranks = [block.rank for block in factor_blocks]
        flops_factor = sum(cost.attention_flops(batch, count, head_dim, rank) for rank in ranks) / heads
        flops_dense = cost.attention_flops(batch, count, head_dim, None)

        for variant, size in _attention_variants(settings.attention_block_sizes).items():
            functions = {
                "sdrm": _heads_call(factor_blocks, geometry["weights"], size),
                "nrr": _heads_call(dense_blocks, geometry["weights"], size),
            }
            timings = measure_interleaved(functions, settings.repeats, settings.warmup)
            per_head = {mode: _per_head(timing, heads) for mode, timing in timings.items()}
            rows.append(
                {
                    "geometry": geometry["name"],
                    "title": geometry["title"],
                    "variant": variant,
                    "phi": phi,
                    "ranks": ranks,
                    "sdrm": per_head["sdrm"],
                    "nrr": per_head["nrr"],
                    "speedup": per_head["nrr"]["median_ms"] / per_head["sdrm"]["median_ms"],
                    "flops_sdrm": flops_factor if variant != "qkv" else flops_factor - 4 * batch * count * count * head_dim,
                    "flops_nrr": flops_dense if variant != "qkv" else flops_dense - 4 * batch * count * count * head_dim,
                }
            )
        progress(f"attention {geometry['name']}")
    return {"status": "done", "phi": phi, "rows": rows}


def _per_head(timing: Timing, heads: int) -> dict:
    values = timing.to_dict()
    for key in ("median_ms", "q1_ms", "q3_ms", "iqr_ms"):
        values[key] = values[key] / heads
    values["samples_ms"] = [sample / heads for sample in values["samples_ms"]]
    return values


def attention_markdown(result: dict) -> str:
    from sdrm.bench_report import markdown_table

    parts = [
        f"Per head, phi {result['phi']}: median ms [interquartile range] over all heads of one frame divided by "
        "the head count. `qkv` is the projection alone; `blocked_B` adds online-softmax attention over keys in "
        "blocks of B tokens (one block when B >= t). `sdpa` is torch's scaled_dot_product_attention on (b, t, d_h) "
        "tensors as `head_attention` calls it, and `sdpa_4d` the same on (b, 1, t, d_h): with 3-D inputs torch 2.13 "
        "on CPU takes its math path, with 4-D inputs its fused flash kernel. FLOPs per head from "
        "`sdrm.cost.attention_flops`.\n"
    ]
    for geometry in sorted({row["geometry"] for row in result["rows"]}, key=lambda name: name != "model"):
        rows = [row for row in result["rows"] if row["geometry"] == geometry]
        ranks = rows[0]["ranks"]
        parts.append(f"### {rows[0]['title']} (ranks per head {ranks})\n")
        body = [
            [
                row["variant"],
                _timing_cell(row["sdrm"]),
                _timing_cell(row["nrr"]),
                f"{row['speedup']:.2f}x",
                f"{row['flops_nrr'] / max(row['flops_sdrm'], 1):.2f}x",
            ]
            for row in rows
        ]
        parts.append(markdown_table(["variant", "SDRM factor form ms", "NRR dense ms", "speedup", "FLOP ratio"], body))
    return "\n".join(parts)


def attention_plots(result: dict, out_dir) -> list[str]:
    from sdrm.bench_report import figure

    geometries = sorted({row["geometry"] for row in result["rows"]}, key=lambda name: name != "model")
    name = "attention_per_head.png"
    with figure(out_dir / name, cols=len(geometries)) as (fig, axes):
        for axis, geometry in zip(axes, geometries):
            rows = [row for row in result["rows"] if row["geometry"] == geometry]
            positions = np.arange(len(rows))
            axis.bar(positions - 0.2, [r["sdrm"]["median_ms"] for r in rows], 0.4, label="SDRM (factors)")
            axis.bar(positions + 0.2, [r["nrr"]["median_ms"] for r in rows], 0.4, label="NRR (dense)")
            axis.set_xticks(positions, [r["variant"] for r in rows], rotation=30, fontsize=8)
            axis.set_ylabel("ms per head")
            axis.set_title(rows[0]["title"], fontsize=9)
            axis.legend(fontsize=7)
        fig.suptitle(f"Attention per head, phi {result['phi']}", fontsize=10)
    return [name]


def _timing_cell(timing: dict) -> str:
    return f"{format_ms(timing['median_ms'])} [{format_ms(timing['q1_ms'])}-{format_ms(timing['q3_ms'])}]"


# Section 3 -----------------------------------------------------------------------------------------


class FramePipeline:
    """One mode (SDRM at phi, or NRR) of the per-frame model path, timed phase by phase."""

    def __init__(self, loaded: bench_data.LoadedModel, phi: float | None) -> None:
        self.loaded = loaded
        self.phi = phi
        self.warm = None
        self.ranks: list[list[int]] = []

    @torch.no_grad()
    def run(self, gray: np.ndarray) -> dict[str, float]:
        model, manifest = self.loaded.model, self.loaded.manifest
        heads = model.config.heads
        started = time.perf_counter()
        tiles, boxes = frame_to_tiles(gray, manifest)
        tokens = model.embed(tiles)
        embedded = time.perf_counter()
        blocks, results = factorize_heads(
            tokens, heads, self.phi, method=model.config.rank_method, warm_starts=self.warm, min_rank=model.config.min_rank
        )
        self.warm = results
        reduced = time.perf_counter()
        partials = [model.head_forward(block) for block in blocks]
        attended = time.perf_counter()
        logits = model.aggregate(blocks, partials)
        scores = torch.softmax(logits, dim=-1)[:, 1].numpy()
        decide(scores, boxes, float(manifest.get("frame_threshold", manifest["threshold"])))
        finished = time.perf_counter()
        if self.phi is not None:
            self.ranks.append([block.rank for block in blocks])
        return {
            "embed": (embedded - started) * 1000,
            "rr": (reduced - embedded) * 1000,
            "mha": (attended - reduced) * 1000,
            "val": (finished - attended) * 1000,
            "total": (finished - started) * 1000,
            "tiles": int(tiles.shape[0]),
        }

    def mha_only(self, gray: np.ndarray):
        """Return a function that runs only the MHA phase of one prepared frame (for profiling)."""
        model = self.loaded.model
        with torch.no_grad():
            tiles, _ = frame_to_tiles(gray, self.loaded.manifest)
            blocks, _ = factorize_heads(model.embed(tiles), model.config.heads, self.phi, method=model.config.rank_method)

        def run() -> None:
            for block in blocks:
                model.head_forward(block)

        return run


def run_phases(settings, boards: bench_data.ImageSet, loaded: bench_data.LoadedModel, progress) -> dict:
    """Time Embed, RR, MHA and Val per board frame for SDRM at each phi and NRR; return the results."""
    frames = [bench_data.read_gray(path) for path in boards.paths[: settings.phase_frames]]
    cases = []
    profiles = {}
    for phi in settings.phase_phis:
        pipelines = {"sdrm": FramePipeline(loaded, phi), "nrr": FramePipeline(loaded, None)}
        samples: dict[str, dict[str, list[float]]] = {mode: {p: [] for p in (*PHASES, "total")} for mode in pipelines}
        tiles = 0
        for repeat in range(settings.warmup + settings.phase_repeats):
            gray = frames[repeat % len(frames)]
            for mode, pipeline in pipelines.items():
                phases = pipeline.run(gray)
                tiles = phases.pop("tiles")
                if repeat >= settings.warmup:
                    for name, value in phases.items():
                        samples[mode][name].append(value)
        ranks = np.array(pipelines["sdrm"].ranks[settings.warmup :] or pipelines["sdrm"].ranks)
        config = loaded.model.config
        mean_ranks = ranks.mean(axis=0)
        flops_sdrm = sum(cost.attention_flops(tiles, config.tokens, config.head_dim, max(1, round(r))) for r in mean_ranks)
        flops_nrr = config.heads * cost.attention_flops(tiles, config.tokens, config.head_dim, None)
        case = {
            "phi": phi,
            "tiles": tiles,
            "frames": len(frames),
            "rank_mean": float(ranks.mean()),
            "rank_per_head_mean": mean_ranks.round(2).tolist(),
            "mha_flops_sdrm": flops_sdrm,
            "mha_flops_nrr": flops_nrr,
        }
        for mode in pipelines:
            case[mode] = {name: Timing(values, warmup=settings.warmup).to_dict() for name, values in samples[mode].items()}
        case["ratios"] = {
            name: case["nrr"][name]["median_ms"] / case["sdrm"][name]["median_ms"] for name in (*PHASES, "total")
        }
        cases.append(case)
        progress(f"phases phi={phi}")

    targets = []
    target_case = next((case for case in cases if case["phi"] == settings.target_phi), None)
    if target_case is not None:
        ratio = target_case["ratios"]["mha"]
        reduction = 1 - 1 / ratio
        flop_ratio = target_case["mha_flops_nrr"] / target_case["mha_flops_sdrm"]
        targets.append(
            {
                "section": "phases",
                "name": f"MHA per board frame ({target_case['tiles']} tiles), NRR / SDRM at phi {settings.target_phi}",
                "target": ">= 7x faster (paper: -87.6 %)",
                "threshold": 7.0,
                "measured": ratio,
                "unit": "x",
                "passed": ratio >= 7.0,
                "detail": (
                    f"SDRM {format_ms(target_case['sdrm']['mha']['median_ms'])} ms, NRR "
                    f"{format_ms(target_case['nrr']['mha']['median_ms'])} ms ({reduction * -100:.1f} %); "
                    f"mean rank {target_case['rank_mean']:.1f} of d_h {loaded.model.config.head_dim}; the MHA FLOP "
                    f"ratio (sdrm.cost.attention_flops) is only {flop_ratio:.2f}x because the scores and the weighted "
                    "sum, 4 b t^2 d_h per head, do not shrink with the rank"
                ),
            }
        )
        if ratio < 7.0:
            gray = frames[0]
            profiles["mha_sdrm"] = {
                "what": f"SDRM MHA of one board frame at phi {settings.target_phi} (torch.profiler, self CPU time)",
                "rows": profile_torch(FramePipeline(loaded, settings.target_phi).mha_only(gray), runs=3),
            }
            profiles["mha_nrr"] = {
                "what": "NRR MHA of the same frame",
                "rows": profile_torch(FramePipeline(loaded, None).mha_only(gray), runs=3),
            }
    config = loaded.model.config
    model = {
        "input_size": loaded.manifest["input_size"],
        "tokens": config.tokens,
        "dim": config.dim,
        "heads": config.heads,
        "head_dim": config.head_dim,
        "rank_method": config.rank_method,
    }
    return {"status": "done", "model": model, "cases": cases, "targets": targets, "profiles": profiles}


def phases_markdown(result: dict) -> str:
    from sdrm.bench_report import markdown_table

    config = result["model"]
    parts = [
        f"One board frame per repeat ({result['cases'][0]['tiles']} tiles of {config['input_size']} px, "
        f"{config['tokens']} tokens per tile, d {config['dim']}, {config['heads']} heads of d_h {config['head_dim']}; "
        f"rank method `{config['rank_method']}`). Median ms [interquartile range] over "
        f"{result['cases'][0]['sdrm']['total']['repeats']} frames; SDRM and NRR alternate frame by frame. Paper "
        f"anchors (SDRM vs NRR): MHA -{PAPER_REDUCTION['mha'] * 100:.1f} %, Val -{PAPER_REDUCTION['val'] * 100:.0f} %, "
        f"overall -{PAPER_REDUCTION['total'] * 100:.1f} %.\n"
    ]
    body = []
    for case in result["cases"]:
        for mode in ("sdrm", "nrr"):
            label = f"SDRM phi {case['phi']}" if mode == "sdrm" else f"NRR (next to phi {case['phi']})"
            row = [label] + [_timing_cell(case[mode][name]) for name in (*PHASES, "total")]
            row.append(f"{case['rank_mean']:.1f}" if mode == "sdrm" else f"{config['head_dim']} (dense)")
            body.append(row)
        change = [f"{(1 / case['ratios'][name] - 1) * 100:+.1f} %" for name in (*PHASES, "total")]
        body.append([f"SDRM vs NRR, phi {case['phi']}"] + change + [""])
    headers = ["mode"] + [PHASE_NAMES[name] for name in PHASES] + ["total", "mean rank"]
    parts.append(markdown_table(headers, body))
    return "\n".join(parts)


def phases_plots(result: dict, out_dir) -> list[str]:
    from sdrm.bench_report import figure

    name = "phases.png"
    cases = result["cases"]
    with figure(out_dir / name, size=(max(6.0, 2.2 * (len(cases) + 1)), 3.8)) as (fig, axes):
        axis = axes[0]
        labels = ["NRR"] + [f"SDRM phi {case['phi']}" for case in cases]
        columns = [cases[0]["nrr"]] + [case["sdrm"] for case in cases]
        positions = np.arange(len(PHASES))
        width = 0.8 / len(columns)
        for index, (label, column) in enumerate(zip(labels, columns)):
            axis.bar(
                positions + (index - (len(columns) - 1) / 2) * width,
                [column[phase]["median_ms"] for phase in PHASES],
                width,
                label=label,
            )
        axis.set_xticks(positions, [PHASE_NAMES[phase] for phase in PHASES])
        axis.set_ylabel("ms per frame")
        axis.set_title("Phase times per board frame (like SDRM fig. 8)", fontsize=10)
        axis.legend(fontsize=7)
    return [name]
