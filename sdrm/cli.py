"""The `sdrm` command: training, evaluation, benchmarks and the line's services.

The service commands (ingest, compressor, device, aggregator, scheduler, line, topics) live in the
`services` package, which contains all MQTT code. They are imported only when called.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

SERVICES = {
    "line": "services.line",
    "ingest": "services.ingest",
    "compressor": "services.compressor",
    "device": "services.device",
    "aggregator": "services.aggregator",
    "scheduler": "services.scheduler",
    "topics": "services.topics_cli",
    "health": "services.health",
    "sparkplug": "services.sparkplug",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SERVICES:
        module = importlib.import_module(SERVICES[argv[0]])
        return int(module.main(argv[1:]) or 0)

    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except (FileNotFoundError, ValueError) as error:
        # User errors (a wrong path, a dataset without labels.csv) need the message, not a traceback.
        print(f"sdrm {argv[0]}: error: {error}", file=sys.stderr)
        return 2


def energy_fraction(text: str) -> float:
    """Parse a kept energy fraction phi in (0, 1] for argparse."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; phi is a fraction in (0, 1], e.g. 0.9") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} must be in (0, 1]; phi is the fraction of energy kept, e.g. 0.9")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdrm",
        usage="sdrm {line,ingest,compressor,device,aggregator,scheduler,topics,health,sparkplug,train,eval,bench} ...",
        description="SDRM Line: visual defect inspection with rank-reduced, distributed attention.",
        epilog="Service commands: " + ", ".join(SERVICES) + " (run `sdrm <command> --help`).",
    )
    commands = parser.add_subparsers(title="commands", prog="sdrm")

    train = commands.add_parser("train", help="train a classifier on a dataset folder")
    train.add_argument("--data", type=Path, required=True, help="dataset folder with labels.csv (DeepPCB crops or ELPV)")
    train.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    train.add_argument("--arch", choices=["sdrm", "cnn"], default="sdrm", help="model: SDRM classifier or plain CNN baseline")
    train.add_argument("--phi", type=energy_fraction, default=0.9, help="kept energy fraction in (0, 1] (default 0.9)")
    train.add_argument("--nrr", action="store_true", help="no rank reduction (dense heads)")
    train.add_argument("--image-size", type=int, default=None, help="model input side in pixels (default: 128 DeepPCB, 192 ELPV)")
    train.add_argument("--epochs", type=int, default=45, help="maximum epochs (default 45)")
    train.add_argument("--patience", type=int, default=25, help="epochs without validation gain before stopping (default 25)")
    train.add_argument("--max-minutes", type=float, default=18.0, help="wall-clock budget in minutes (default 18)")
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--group-size", type=int, default=8, help="images factorised together, the SVD batch (default 8)")
    train.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default 2e-3)")
    train.add_argument("--max-shift", type=int, default=0, help="random shift in augmentation, pixels per axis (default 0)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint on the test split (and whole boards)")
    evaluate.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    evaluate.add_argument("--data", type=Path, required=True, help="dataset folder with labels.csv")
    evaluate.add_argument("--split", default="test", help="split to evaluate (default test)")
    evaluate.add_argument("--phi", type=energy_fraction, default=None, help="override the kept energy fraction at inference")
    evaluate.add_argument("--boards", type=Path, default=None, help="also evaluate whole boards in this folder (annotations.json)")
    evaluate.add_argument("--json", type=Path, default=None, help="write all metrics to this JSON file")
    evaluate.set_defaults(handler=_eval)

    bench = commands.add_parser("bench", help="measure speed and bytes against the baselines; write a report")
    bench.add_argument("--out", type=Path, required=True, help="report directory")
    bench.add_argument("--quick", action="store_true", help="a few minutes: fewer repeats and sizes")
    bench.add_argument("--model", type=Path, default=None, help="checkpoint (default: the shipped model)")
    bench.set_defaults(handler=_bench)
    return parser


def _train(args: argparse.Namespace) -> int:
    from sdrm.train import TrainConfig, train

    config = TrainConfig(
        arch=args.arch,
        phi=None if args.nrr else args.phi,
        image_size=args.image_size,
        epochs=args.epochs,
        patience=args.patience,
        max_minutes=args.max_minutes,
        batch_size=args.batch_size,
        group_size=args.group_size,
        lr=args.lr,
        seed=args.seed,
        threads=args.threads,
        max_shift=args.max_shift,
    )
    manifest = train(args.data, args.out, config, progress=not args.quiet)
    val = manifest["metrics"]["val"]
    print(
        f"wrote {args.out}: best epoch {manifest['training']['best_epoch']}, validation balanced accuracy "
        f"{val['balanced_accuracy'] * 100:.2f} %, threshold {manifest['threshold']:.4f}"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from sdrm.evaluate import evaluate_boards, evaluate_split
    from sdrm.metrics import format_table

    phi = ... if args.phi is None else args.phi
    metrics = evaluate_split(args.model, args.data, args.split, phi=phi)
    print(format_table(metrics, f"{args.data} split {args.split} (phi {metrics['phi']})"))
    report = {"split": metrics}

    if args.boards:
        boards = evaluate_boards(args.model, args.boards)
        report["boards"] = boards
        print(format_table(boards["board_metrics"], f"\nwhole boards in {args.boards}"))
        print(f"  defect boxes in a flagged tile: {boards['boxes_in_flagged_tile']} / {boards['boxes']} "
              f"({boards['box_coverage'] * 100:.1f} %)")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from sdrm.bench import run_bench

    run_bench(args.out, quick=args.quick, model_dir=args.model)
    return 0


def default_model_dir() -> Path:
    """Return $SDRM_MODEL or the model shipped in the repository."""
    configured = os.environ.get("SDRM_MODEL")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parent.parent / "models" / "deeppcb-sdrm"


if __name__ == "__main__":
    raise SystemExit(main())
