"""Service configuration: precedence flag > environment > file > default, and clear errors."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from services import config as cfg

SERVICES_DIR = Path(__file__).resolve().parent.parent / "services"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdrm device")
    cfg.add_common_options(parser)
    parser.add_argument("--target-ms", type=cfg.positive_float, default=50.0)
    parser.add_argument("--backend", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--png", action="store_true")
    return parser


def test_defaults_without_sources(monkeypatch):
    monkeypatch.delenv("SDRM_TARGET_MS", raising=False)
    config = cfg.resolve(make_parser(), [], "device")
    assert config.target_ms == 50.0
    assert config.broker == cfg.DEFAULT_BROKER
    assert config.line == "line1"
    assert config.png is False


def test_precedence_flag_env_file_default(tmp_path, monkeypatch):
    path = tmp_path / "line.yaml"
    path.write_text("line: line-from-file\nbackend: cpu\ndevice:\n  target-ms: 30\n")

    config = cfg.resolve(make_parser(), ["--config", str(path)], "device")
    assert config.target_ms == 30.0
    assert config.line == "line-from-file"
    assert config.backend == "cpu"

    monkeypatch.setenv("SDRM_TARGET_MS", "40")
    config = cfg.resolve(make_parser(), ["--config", str(path)], "device")
    assert config.target_ms == 40.0

    config = cfg.resolve(make_parser(), ["--config", str(path), "--target-ms", "20"], "device")
    assert config.target_ms == 20.0


def test_section_overrides_top_level(tmp_path):
    path = tmp_path / "line.yaml"
    path.write_text("target_ms: 70\ncompressor:\n  line: other\ndevice:\n  target_ms: 35\n")
    config = cfg.resolve(make_parser(), ["--config", str(path)], "device")
    assert config.target_ms == 35.0
    assert config.line == "line1"


def test_config_file_from_environment(tmp_path, monkeypatch):
    path = tmp_path / "line.yaml"
    path.write_text("line: from-env-file\n")
    monkeypatch.setenv("SDRM_CONFIG", str(path))
    assert cfg.resolve(make_parser(), [], "device").line == "from-env-file"


def test_boolean_from_environment(monkeypatch):
    monkeypatch.setenv("SDRM_PNG", "yes")
    assert cfg.resolve(make_parser(), [], "device").png is True
    monkeypatch.setenv("SDRM_PNG", "0")
    assert cfg.resolve(make_parser(), [], "device").png is False


@pytest.mark.parametrize(
    ("env", "value", "expected"),
    [
        ("SDRM_TARGET_MS", "-3", "SDRM_TARGET_MS"),
        ("SDRM_BACKEND", "tpu", "choose one of auto, cpu, cuda"),
        ("SDRM_PNG", "maybe", "use true or false"),
    ],
)
def test_invalid_environment_value(monkeypatch, capsys, env, value, expected):
    monkeypatch.setenv(env, value)
    with pytest.raises(SystemExit) as exit_info:
        cfg.resolve(make_parser(), [], "device")
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert expected in error
    assert repr(value) in error


def test_unknown_key_in_own_section(tmp_path, capsys):
    path = tmp_path / "line.yaml"
    path.write_text("device:\n  target-msec: 30\n")
    with pytest.raises(SystemExit):
        cfg.resolve(make_parser(), ["--config", str(path)], "device")
    assert "unknown option 'target-msec' in section 'device'" in capsys.readouterr().err


def test_unknown_top_level_key_skipped(tmp_path):
    path = tmp_path / "line.yaml"
    path.write_text("deadline-ms: 3000\nline: l2\n")
    assert cfg.resolve(make_parser(), ["--config", str(path)], "device").line == "l2"


def test_missing_and_invalid_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cfg.resolve(make_parser(), ["--config", str(tmp_path / "absent.yaml")], "device")
    assert "cannot read config file" in capsys.readouterr().err

    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(SystemExit):
        cfg.resolve(make_parser(), ["--config", str(path)], "device")
    assert "must contain a mapping" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://127.0.0.1:1883", ("127.0.0.1", 1883)),
        ("mqtt://broker.local", ("broker.local", 1883)),
        ("10.0.0.5:1884", ("10.0.0.5", 1884)),
    ],
)
def test_parse_broker(url, expected):
    assert cfg.parse_broker(url) == expected


@pytest.mark.parametrize(("url", "message"), [("ws://h:1", "not supported"), ("mqtt://h:99999", "port"), ("mqtt://:1883", "host")])
def test_parse_broker_invalid(url, message):
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.parse_broker(url)


def test_services_take_topics_from_yaml():
    """Topic strings come only from topics.yaml: no service module spells the topic prefix."""
    offenders = []
    for path in sorted(SERVICES_DIR.glob("*.py")):
        if path.name == "topics.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"sdrm/v\d", line):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert offenders == []


@pytest.mark.parametrize("service", ["line", "ingest", "compressor", "device", "aggregator", "scheduler", "topics"])
def test_every_command_has_help(service, capsys):
    from sdrm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([service, "--help"])
    assert exit_info.value.code == 0
    assert "usage: sdrm" in capsys.readouterr().out
