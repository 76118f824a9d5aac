"""`sdrm topics`: print the MQTT topic tree from topics.yaml; `sdrm topics acl` writes a Mosquitto acl_file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.acl import ROLES, generate_acl
from services.topics import TopicsError, format_tree, load_topics


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["acl"]:
        return acl_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="sdrm topics",
        description="Print the MQTT topic tree of an SDRM line: template, QoS, retain, payload, publishers -> subscribers.",
        epilog="`sdrm topics acl --help` shows how to write a Mosquitto ACL for the roles of a line.",
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



class _AppendUser(argparse.Action):
    """Append (role, username) to namespace.users, keeping the order of the command line."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        users = list(getattr(namespace, "users", None) or [])
        users.append((self.const, value))
        namespace.users = users


def build_acl_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdrm topics acl",
        description="Write a Mosquitto acl_file with one user section per instance, granting exactly the "
        "topics of its role in topics.yaml. Every instance logs in with its id as username.",
    )
    roles_help = {
        "camera": "camera id whose ingest (or smart camera) publishes its frames and status",
        "device": "device id that reads its blocks and publishes its partials, load and status",
        "compressor": "compressor id, the service's --id (the service's default id is compressor)",
        "aggregator": "aggregator id, the service's --id (the service's default id is aggregator)",
        "scheduler": "scheduler id, the service's --id (the service's default id is scheduler)",
        "scada": "username of a read-only verdict reader (SCADA, MES, Node-RED)",
        "sparkplug": "username of the Sparkplug B bridge: reads verdicts and camera status, readwrite spBv1.0/#",
    }
    for role in ROLES:
        parser.add_argument(
            f"--{role}", dest="users", action=_AppendUser, const=role, metavar="USER", default=[],
            help=f"{roles_help[role]}; repeat for more",
        )
    parser.add_argument("--line", default=None, help="grant only this line id (default: every line, '+')")
    parser.add_argument("--topics", type=Path, default=None, help="topics file to read (default: the repository's topics.yaml)")
    parser.add_argument("--out", type=Path, default=None, help="file to write (default: standard output)")
    return parser


def acl_command(users: list[tuple[str, str]], line: str | None) -> str:
    """Return the `sdrm topics acl` command line that regenerates an acl_file, for its header."""
    words = ["sdrm topics acl"] + [f"--{role} {user}" for role, user in users]
    if line is not None:
        words.append(f"--line {line}")
    return " ".join(words)


def acl_main(argv: list[str]) -> int:
    parser = build_acl_parser()
    args = parser.parse_args(argv)
    if not args.users:
        parser.error(f"no users: give at least one of {', '.join('--' + role for role in ROLES)}")
    try:
        topic_map = load_topics(args.topics)
        text = generate_acl(topic_map, args.users, args.line, command=acl_command(args.users, args.line))
    except ValueError as error:  # TopicsError, AclError, or an invalid --line id
        print(f"sdrm topics acl: {error}", file=sys.stderr)
        return 2
    if args.out is None:
        sys.stdout.write(text)
        return 0
    try:
        args.out.write_text(text)
    except OSError as error:
        print(f"sdrm topics acl: cannot write {args.out}: {error.strerror}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {len(args.users)} users", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
