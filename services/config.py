"""Configuration and logging shared by every service command.

Each option is resolved from four sources, highest first:

1. a command-line flag (`--target-ms 40`),
2. an environment variable `SDRM_<OPTION>`, upper case with '_' for '-' (`SDRM_TARGET_MS=40`),
3. a YAML file given by `--config FILE` (or `SDRM_CONFIG`),
4. the option's default.

The YAML file is a mapping of option names (either `target-ms` or `target_ms`). Top-level keys
apply to every service. A section named after the service (`device:`, `compressor:` ...) overrides
them for that service, so one file can configure a whole line::

    broker: mqtt://10.0.0.5:1883
    line: line2
    device:
      target-ms: 40

Top-level keys that the current service does not know are logged and skipped, because other
services of the line may read them. Unknown keys inside the service's own section are an error.
`line` is both an option (the line id, a string) and the section of `sdrm line` (a mapping).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog
import yaml

ENV_PREFIX = "SDRM_"
SERVICE_SECTIONS = ("line", "ingest", "compressor", "device", "aggregator", "scheduler")
DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
DEFAULT_LINE = "line1"
# MQTT 3.1.1 brokers do not announce their packet limit; this is the max_packet_size that
# services/broker.py and compose/mosquitto/mosquitto.conf set.
DEFAULT_MQTT311_MAX_PACKET = 64 * 1024 * 1024
PLAIN_SCHEMES = ("mqtt", "tcp")
TLS_SCHEMES = ("mqtts", "ssl")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

log = structlog.get_logger("sdrm.config")


class ConfigError(ValueError):
    """Raised when an option value from any source is invalid."""


def default_model_dir() -> Path:
    """Return the checkpoint shipped with the repository, models/deeppcb-sdrm."""
    return Path(__file__).resolve().parent.parent / "models" / "deeppcb-sdrm"


def add_common_options(parser: argparse.ArgumentParser, model: bool = True) -> None:
    """Add --config, --broker, --line, --mqtt-version, --log-level, the security options and (optionally) --model."""
    parser.add_argument("--config", type=Path, default=None, help="YAML file with option values (see `services.config`)")
    parser.add_argument(
        "--broker", default=DEFAULT_BROKER, help=f"MQTT broker URL mqtt://host:port, or mqtts://host:port for TLS (default {DEFAULT_BROKER})"
    )
    parser.add_argument("--line", default=DEFAULT_LINE, help=f"line id, one topic level (default {DEFAULT_LINE})")
    parser.add_argument(
        "--mqtt-version",
        choices=["5", "3.1.1"],
        default="5",
        help="MQTT protocol version (default 5; use 3.1.1 for brokers without MQTT 5)",
    )
    parser.add_argument(
        "--max-packet-bytes",
        type=int,
        default=0,
        help="largest MQTT packet the broker accepts, in bytes; larger messages are rejected before sending "
        f"(default 0: the broker's limit from its MQTT 5 CONNACK, or {DEFAULT_MQTT311_MAX_PACKET} under MQTT 3.1.1, "
        "the max_packet_size of the project's Mosquitto configurations)",
    )
    parser.add_argument(
        "--keepalive-s", type=int, default=10, help="MQTT keepalive in seconds; a dead link is noticed after 1.5x (default 10)"
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="info",
        help="lowest log level written to stderr (default info)",
    )
    parser.add_argument("--log-json", action="store_true", help="write logs as JSON lines instead of key=value")
    add_security_options(parser)
    if model:
        parser.add_argument(
            "--model",
            type=Path,
            default=default_model_dir(),
            help="checkpoint directory written by `sdrm train` (default models/deeppcb-sdrm)",
        )


def resolve(parser: argparse.ArgumentParser, argv: list[str] | None, service: str) -> argparse.Namespace:
    """Parse argv and fill every option that has no flag from the environment, the file or the default.

    Exits through parser.error (status 2) with a message naming the source and the value when a
    value is invalid.
    """
    explicit = _parse_explicit(parser, argv)
    env = os.environ
    config_path = getattr(explicit, "config", None)
    if config_path is None and env.get(ENV_PREFIX + "CONFIG"):
        config_path = Path(env[ENV_PREFIX + "CONFIG"])
    try:
        file_values = _read_file(config_path, service, parser) if config_path else {}
    except ConfigError as error:
        parser.error(str(error))

    values: dict[str, Any] = {}
    for action in _options(parser):
        dest = action.dest
        if hasattr(explicit, dest):
            values[dest] = getattr(explicit, dest)
            continue
        env_name = ENV_PREFIX + dest.upper()
        try:
            if env_name in env:
                values[dest] = _convert(action, env[env_name], f"environment variable {env_name}")
            elif dest in file_values:
                values[dest] = _convert(action, file_values[dest], f"{config_path}: {action.option_strings[0][2:]}")
            else:
                values[dest] = action.default
        except ConfigError as error:
            parser.error(str(error))
    values["config"] = config_path
    return argparse.Namespace(**values)


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        action
        for action in parser._actions  # noqa: SLF001 - argparse has no public list of actions
        if action.option_strings and action.dest not in ("help", "config")
    ]


def _parse_explicit(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse argv with every default suppressed, so the namespace holds only the given flags."""
    saved = {}
    for action in parser._actions:  # noqa: SLF001
        saved[action] = action.default
        action.default = argparse.SUPPRESS
    try:
        return parser.parse_args(argv)
    finally:
        for action, default in saved.items():
            action.default = default


def _read_file(path: Path, service: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must contain a mapping of option: value, got {type(data).__name__}")

    known = {action.dest for action in _options(parser)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in SERVICE_SECTIONS and isinstance(value, dict):
            continue
        if name in known:
            values[name] = value
        else:
            log.debug("config_key_skipped", file=str(path), key=key, service=service)

    section = data.get(service)
    if isinstance(section, dict):
        for key, value in section.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise ConfigError(
                    f"config file {path}: unknown option {key!r} in section {service!r}; "
                    f"run `sdrm {service} --help` for the options"
                )
            values[name] = value
    return values


def _convert(action: argparse.Action, raw: Any, source: str) -> Any:
    """Convert a value from the environment or the file with the action's type, and check choices."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):  # noqa: SLF001
        if isinstance(raw, bool):
            flag = raw
        elif str(raw).strip().lower() in _TRUE:
            flag = True
        elif str(raw).strip().lower() in _FALSE:
            flag = False
        else:
            raise ConfigError(f"invalid value {raw!r} in {source}: use true or false")
        return flag if isinstance(action, argparse._StoreTrueAction) else not flag  # noqa: SLF001

    converter = action.type or str
    if raw is None:
        return None
    text = raw if isinstance(raw, str) else str(raw)
    try:
        value = converter(text)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
        raise ConfigError(f"invalid value {raw!r} in {source}: {error}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(str(choice) for choice in action.choices)
        raise ConfigError(f"invalid value {raw!r} in {source}: choose one of {choices}")
    return value


def parse_broker(url: str) -> tuple[str, int]:
    """Return (host, port) of an mqtt://host:port or mqtts://host:port URL.

    The port defaults to 1883 for mqtt:// and 8883 for mqtts://. Raises ConfigError for other
    schemes, a missing host or a URL with a user name or password, naming the value (with any
    password masked) and the expected form.
    """
    if "@" in url:
        raise ConfigError(
            f"invalid broker URL {_mask_credentials(url)!r}: the URL must not contain a user name or password; "
            "use --username and SDRM_PASSWORD or --password-file"
        )
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in PLAIN_SCHEMES + TLS_SCHEMES:
        raise ConfigError(
            f"invalid broker URL {url!r}: scheme {parts.scheme!r} is not supported; use mqtt://host:port or mqtts://host:port"
        )
    default_port = 8883 if parts.scheme in TLS_SCHEMES else 1883
    try:
        port = parts.port or default_port
    except ValueError:
        raise ConfigError(f"invalid broker URL {url!r}: the port must be a number in 1..65535") from None
    if not parts.hostname:
        raise ConfigError(f"invalid broker URL {url!r}: the host is missing; use mqtt://host:port")
    return parts.hostname, port


def broker_uses_tls(url: str) -> bool:
    """Return whether a broker URL selects TLS (mqtts:// or ssl://); raises ConfigError like parse_broker."""
    parse_broker(url)
    return urlsplit(url if "://" in url else f"mqtt://{url}").scheme in TLS_SCHEMES


def _mask_credentials(url: str) -> str:
    """Return url with everything between the scheme and the last '@' replaced by '***'.

    The last '@' is used because a password may itself contain '@', '/' or ':'.
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest = "", url
    return f"{scheme}{separator}***@{rest.rpartition('@')[2]}"


def bus_connection(config: argparse.Namespace) -> dict[str, Any]:
    """Return the Bus keyword arguments of the common connection options of a resolved config.

    They are username, password and tls_context (see `services.security`) and max_packet_bytes.
    Raises ConfigError for inconsistent or unreadable security options.
    """
    from services import security  # imported here because services.security imports this module

    max_packet = getattr(config, "max_packet_bytes", 0) or 0
    if max_packet <= 0 and getattr(config, "mqtt_version", "5") == "3.1.1":
        max_packet = DEFAULT_MQTT311_MAX_PACKET
    return {**security.bus_security(config), "max_packet_bytes": max_packet or None}


def add_security_options(parser: argparse.ArgumentParser) -> None:
    """Add --username, --password-file, --tls-ca, --tls-cert and --tls-key; `services.security` reads them."""
    parser.add_argument("--username", default=None, help="MQTT username (default: none, an anonymous client)")
    parser.add_argument(
        "--password-file",
        type=Path,
        default=None,
        help="file whose first line is the MQTT password; the environment variable SDRM_PASSWORD may give "
        "the password instead (there is no --password flag, so the password never shows in ps)",
    )
    parser.add_argument(
        "--tls-ca", type=Path, default=None, help="PEM file of the CA that signed the broker's certificate (default: the system CAs)"
    )
    parser.add_argument("--tls-cert", type=Path, default=None, help="PEM client certificate, for brokers that require one")
    parser.add_argument("--tls-key", type=Path, default=None, help="unencrypted PEM private key of --tls-cert")
    # Without this hidden option, argparse would take `--password X` as an abbreviation of --password-file.
    parser.add_argument("--password", dest="password_flag", nargs="?", action=_RejectPasswordFlag, help=argparse.SUPPRESS)


class _RejectPasswordFlag(argparse.Action):
    """Reject --password without echoing its value."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(
            "there is no --password option, because `ps` shows every command line: write the password to a file "
            "and pass --password-file FILE, or set the environment variable SDRM_PASSWORD"
        )


def positive_float(text: str) -> float:
    """argparse type: a float > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a float >= 0."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def fraction(text: str) -> float:
    """argparse type: a float in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be in (0, 1]")
    return value


def port_number(text: str) -> int:
    """argparse type: a TCP port in 0..65535."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} must be a TCP port in 0..65535")
    return value


def add_metrics_options(parser: argparse.ArgumentParser) -> None:
    """Add --metrics-port and --metrics-host, the Prometheus endpoint of `services.metrics`."""
    parser.add_argument(
        "--metrics-port",
        type=port_number,
        default=0,
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default 0: no endpoint, so that "
        "services on one host never collide; give each service its own port)",
    )
    parser.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address the metrics endpoint listens on (default 127.0.0.1; 0.0.0.0 for all interfaces, e.g. in a container)",
    )


_LOGGING_CONFIGURED = False


# A URL's user name and password: from the scheme to the last '@' of the same word, because a
# password may contain '/', ':' or '@'. This masks more than the credentials when a later '@'
# follows in the path or query.
_URL_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)\S*@")


def mask_url_credentials(text: str) -> str:
    """Return text with the user name and password of every URL in it replaced by '***'."""
    return _URL_CREDENTIALS.sub(r"\1***@", text)


def mask_logged_credentials(logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: mask URL credentials in the event's string values, such as an RTSP --source."""
    for key, value in event_dict.items():
        if isinstance(value, str) and "@" in value:
            event_dict[key] = mask_url_credentials(value)
    return event_dict


def configure_logging(level: str = "info", json_lines: bool = False) -> None:
    """Configure structlog to write one line per event to stderr, at `level` and above.

    The first call in a process wins, so services that run as threads of `sdrm line` share it.
    """
    global _LOGGING_CONFIGURED
    if _LOGGING_CONFIGURED:
        return
    _LOGGING_CONFIGURED = True
    renderer = structlog.processors.JSONRenderer() if json_lines else structlog.processors.KeyValueRenderer(
        key_order=["timestamp", "level", "event"], drop_missing=True
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            mask_logged_credentials,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
