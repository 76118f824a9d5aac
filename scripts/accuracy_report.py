"""Rebuild docs/accuracy.md from the `sdrm eval --json` files in docs/results/."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"

ROWS = [
    ("SDRM, phi 0.9", "{d}-sdrm"),
    ("NRR (no rank reduction)", "{d}-nrr"),
    ("plain CNN, same budget", "{d}-cnn"),
    ("SDRM trained at phi 0.7", "{d}-sdrm-phi0.7"),
    ("SDRM trained at phi 0.8", "{d}-sdrm-phi0.8"),
    ("SDRM trained at phi 0.85", "{d}-sdrm-phi0.85"),
    ("SDRM trained at phi 0.95", "{d}-sdrm-phi0.95"),
    ("SDRM 0.9 model run at phi 0.7", "{d}-sdrm-at0.7"),
    ("SDRM 0.9 model run at phi 0.8", "{d}-sdrm-at0.8"),
    ("SDRM 0.9 model run at phi 0.85", "{d}-sdrm-at0.85"),
    ("SDRM 0.9 model run at phi 0.95", "{d}-sdrm-at0.95"),
]


def percent(value: float) -> str:
    return f"{value * 100:.2f}"


def table(dataset: str) -> list[str]:
    lines = [
        "| model | accuracy % | balanced accuracy % | precision % | recall % | F1 % | AUROC | confusion [[tn, fp], [fn, tp]] |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    majority = None
    for label, pattern in ROWS:
        path = RESULTS / (pattern.format(d=dataset) + ".json")
        if not path.is_file():
            continue
        m = json.loads(path.read_text())["split"]
        majority = m["majority_accuracy"]
        lines.append(
            f"| {label} | {percent(m['accuracy'])} | {percent(m['balanced_accuracy'])} | {percent(m['precision'])} "
            f"| {percent(m['recall'])} | {percent(m['f1'])} | {m['auroc']:.4f} | {m['confusion']} |"
        )
    if majority is not None:
        lines.append(f"| majority class baseline | {percent(majority)} | 50.00 | | | | 0.5 | |")
    return lines


def boards() -> list[str]:
    path = RESULTS / "deeppcb-boards.json"
    if not path.is_file():
        return ["(not run)"]
    report = json.loads(path.read_text())["boards"]
    m = report["board_metrics"]
    lines = [
        f"- boards right: {percent(m['accuracy'])} % of {report['boards']} "
        f"(confusion [[tn, fp], [fn, tp]] = {m['confusion']}, tile stride {report['tile_stride']} px)",
        f"- defect boxes whose centre lies in a flagged tile: {report['boxes_in_flagged_tile']} of "
        f"{report['boxes']} ({percent(report['box_coverage'])} %)",
        "",
        "| board | label | predicted | score | boxes found | flagged tiles (x, y, w, h, score) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["results"]:
        tiles = "; ".join(f"{t[0]},{t[1]},{t[2]},{t[3]},{t[4]:.2f}" for t in r["flagged_tiles"][:6])
        more = f" (+{len(r['flagged_tiles']) - 6})" if len(r["flagged_tiles"]) > 6 else ""
        lines.append(
            f"| {r['file']} | {r['label']} | {r['predicted']} | {r['score']:.3f} | "
            f"{r['boxes_in_flagged_tile']}/{r['boxes']} | {tiles}{more} |"
        )
    return lines


def main() -> None:
    template = (ROOT / "docs" / "accuracy.template.md").read_text()
    page = (
        template.replace("{{deeppcb}}", "\n".join(table("deeppcb")))
        .replace("{{elpv}}", "\n".join(table("elpv")))
        .replace("{{boards}}", "\n".join(boards()))
    )
    (ROOT / "docs" / "accuracy.md").write_text(page)
    print(f"wrote {ROOT / 'docs' / 'accuracy.md'}")


if __name__ == "__main__":
    main()
