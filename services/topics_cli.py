"""`sdrm topics`: print the MQTT topic tree from topics.yaml."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.topics import TopicsError, format_tree, load_topics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sdrm topics",
        description="Print the MQTT topic tree of an SDRM line: template, QoS, retain, payload, publishers -> subscribers.",
    )
    parser.add_argument("--topics", type=Path, default=None, help="topics file to read (default: the repository's topics.yaml)")
    parser.add_argument("--line", default=None, help="fill {line} with this line id, e.g. line1")
    args = parser.parse_args(argv)
    try:
        topic_map = load_topics(args.topics)
    except TopicsError as error:
        print(f"sdrm topics: {error}", file=sys.stderr)
        return 2
    text = format_tree(topic_map)
    if args.line is not None:
        text = text.replace("{line}", args.line)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
