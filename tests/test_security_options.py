"""Security options of the services: broker URL schemes, password sources, TLS files and their errors."""

from __future__ import annotations

import argparse
import os
import shutil
import ssl
import stat
import subprocess
import threading

import pytest
from pydantic import SecretStr

from services import config as cfg
from services import security
from services.bus import Bus
from services.topics import load_topics
from tests.secure_broker import make_certificates

SECRET = "s3cret-Pa55word"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdrm scheduler")
    cfg.add_common_options(parser, model=False)
    return parser


def resolve(argv: list[str]) -> argparse.Namespace:
    return cfg.resolve(make_parser(), argv, "scheduler")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in ("SDRM_PASSWORD", "SDRM_USERNAME", "SDRM_PASSWORD_FILE", "SDRM_TLS_CA", "SDRM_TLS_CERT", "SDRM_TLS_KEY", "SDRM_BROKER"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture()
def password_file(tmp_path):
    path = tmp_path / "password"
    path.write_text(SECRET + "\n")
    return path


# Broker URLs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtts://broker.local", ("broker.local", 8883)),
        ("mqtts://10.0.0.5:8884", ("10.0.0.5", 8884)),
        ("ssl://broker.local", ("broker.local", 8883)),
        ("mqtt://broker.local", ("broker.local", 1883)),
    ],
)
def test_parse_broker_default_ports(url, expected):
    assert cfg.parse_broker(url) == expected


def test_broker_uses_tls():
    assert cfg.broker_uses_tls("mqtts://h")
    assert not cfg.broker_uses_tls("mqtt://h")
    assert not cfg.broker_uses_tls("h:1883")


@pytest.mark.parametrize(
    "url",
    [f"mqtt://user:{SECRET}@host:1883", f"mqtts://user:{SECRET}@host", f"user:{SECRET}@host", f"mqtt://u:{SECRET}/x@host"],
)
def test_url_with_credentials_rejected(url):
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.parse_broker(url)
    message = str(caught.value)
    assert "--username" in message
    assert "SDRM_PASSWORD" in message
    assert SECRET not in message
    assert "***@" in message


# Passwords -----------------------------------------------------------------------------------------


def test_password_from_file_first_line(tmp_path):
    path = tmp_path / "password"
    path.write_text(f" {SECRET} \nsecond line\n")
    password = security.read_password(path, environ={})
    assert password.get_secret_value() == f" {SECRET} "


def test_password_from_environment():
    password = security.read_password(None, environ={"SDRM_PASSWORD": SECRET})
    assert password.get_secret_value() == SECRET


def test_no_password():
    assert security.read_password(None, environ={}) is None


def test_password_repr_hides_secret(password_file):
    password = security.read_password(password_file, environ={})
    assert SECRET not in repr(password)
    assert SECRET not in str(password)


def test_password_file_and_environment_conflict(password_file):
    with pytest.raises(cfg.ConfigError, match="unset one of them") as caught:
        security.read_password(password_file, environ={"SDRM_PASSWORD": SECRET})
    assert SECRET not in str(caught.value)


def test_password_file_missing(tmp_path):
    with pytest.raises(cfg.ConfigError, match="not found"):
        security.read_password(tmp_path / "absent", environ={})


def test_password_file_empty(tmp_path):
    path = tmp_path / "empty"
    path.write_text("\n")
    with pytest.raises(cfg.ConfigError, match="is empty"):
        security.read_password(path, environ={})


def test_password_file_unreadable(tmp_path):
    path = tmp_path / "folder"
    path.mkdir()
    with pytest.raises(cfg.ConfigError, match="cannot read --password-file"):
        security.read_password(path, environ={})


def test_password_without_username(password_file):
    config = resolve(["--broker", "mqtt://h", "--password-file", str(password_file)])
    with pytest.raises(cfg.ConfigError, match="add --username"):
        security.bus_security(config)


def test_options_from_environment(password_file, monkeypatch):
    monkeypatch.setenv("SDRM_USERNAME", "dev1")
    monkeypatch.setenv("SDRM_PASSWORD_FILE", str(password_file))
    config = resolve(["--broker", "mqtt://h"])
    kwargs = cfg.bus_connection(config)
    assert kwargs["username"] == "dev1"
    assert kwargs["password"].get_secret_value() == SECRET
    assert kwargs["tls_context"] is None


def test_config_repr_has_no_secret(password_file, monkeypatch):
    monkeypatch.setenv("SDRM_PASSWORD", SECRET)
    config = resolve(["--broker", "mqtt://h", "--username", "dev1"])
    kwargs = cfg.bus_connection(config)
    assert SECRET not in repr(config)
    assert SECRET not in repr(kwargs)


@pytest.mark.parametrize("argv", [["--password", SECRET], [f"--password={SECRET}"], ["--password"]])
def test_password_flag_rejected(argv, capsys):
    with pytest.raises(SystemExit):
        resolve(["--broker", "mqtt://h", *argv])
    error = capsys.readouterr().err
    assert "--password-file" in error
    assert "SDRM_PASSWORD" in error
    assert SECRET not in error


# TLS -----------------------------------------------------------------------------------------------


def test_tls_context_verifies_broker(certificates):
    config = resolve(
        ["--broker", "mqtts://127.0.0.1", "--tls-ca", str(certificates.ca), "--tls-cert", str(certificates.client_cert),
         "--tls-key", str(certificates.client_key)]
    )
    context = cfg.bus_connection(config)["tls_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_mqtts_without_ca_uses_system_store():
    context = cfg.bus_connection(resolve(["--broker", "mqtts://broker.example"]))["tls_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED


def test_tls_files_need_mqtts_url(certificates):
    config = resolve(["--broker", "mqtt://h:1883", "--tls-ca", str(certificates.ca)])
    with pytest.raises(cfg.ConfigError, match="mqtts://host:8883") as caught:
        cfg.bus_connection(config)
    assert "--tls-ca" in str(caught.value)


def test_certificate_without_key(certificates):
    config = resolve(["--broker", "mqtts://h", "--tls-cert", str(certificates.client_cert)])
    with pytest.raises(cfg.ConfigError, match="--tls-cert is set without --tls-key"):
        cfg.bus_connection(config)


def test_key_without_certificate(certificates):
    config = resolve(["--broker", "mqtts://h", "--tls-key", str(certificates.client_key)])
    with pytest.raises(cfg.ConfigError, match="--tls-key is set without --tls-cert"):
        cfg.bus_connection(config)


def test_tls_file_missing(tmp_path):
    config = resolve(["--broker", "mqtts://h", "--tls-ca", str(tmp_path / "absent.crt")])
    with pytest.raises(cfg.ConfigError, match="--tls-ca .*absent.crt not found"):
        cfg.bus_connection(config)


def test_ca_file_not_pem(tmp_path):
    path = tmp_path / "ca.crt"
    path.write_text("not a certificate\n")
    config = resolve(["--broker", "mqtts://h", "--tls-ca", str(path)])
    with pytest.raises(cfg.ConfigError, match="is not a PEM CA certificate"):
        cfg.bus_connection(config)


def test_key_does_not_match_certificate(certificates):
    config = resolve(
        ["--broker", "mqtts://h", "--tls-cert", str(certificates.client_cert), "--tls-key", str(certificates.server_key)]
    )
    with pytest.raises(cfg.ConfigError, match="matching, unencrypted private key"):
        cfg.bus_connection(config)


def test_encrypted_key_rejected(certificates, tmp_path):
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(
        ["openssl", "pkey", "-in", str(certificates.client_key), "-aes256", "-passout", "pass:abcd", "-out", str(encrypted)],
        check=True, capture_output=True,
    )
    config = resolve(["--broker", "mqtts://h", "--tls-cert", str(certificates.client_cert), "--tls-key", str(encrypted)])
    with pytest.raises(cfg.ConfigError, match="encrypted"):
        cfg.bus_connection(config)


def test_tls_file_unreadable(certificates, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads files regardless of their mode")
    path = tmp_path / "ca.crt"
    path.write_bytes(certificates.ca.read_bytes())
    path.chmod(stat.S_IWUSR)
    config = resolve(["--broker", "mqtts://h", "--tls-ca", str(path)])
    with pytest.raises(cfg.ConfigError, match="permission denied"):
        cfg.bus_connection(config)


def test_bus_rejects_context_for_plain_url():
    with pytest.raises(ValueError, match="mqtts://"):
        Bus(
            topics=load_topics(), broker="mqtt://127.0.0.1:1", line="l", service="probe", instance="p", status_topic=None,
            tls_context=ssl.create_default_context(),
        )


def test_bus_repr_hides_password():
    bus = Bus(
        topics=load_topics(), broker="mqtt://127.0.0.1:1", line="l", service="probe", instance="p", status_topic=None,
        username="u", password=SecretStr(SECRET),
    )
    assert SECRET not in repr(bus)
    assert SECRET not in repr(vars(bus))


# sdrm line ----------------------------------------------------------------------------------------


def make_line(argv: list[str]):
    from services import line

    config = cfg.resolve(line.build_parser(), argv, "line")
    return line.Line(config, threading.Event())


def test_line_passes_security_options(password_file, certificates, model_dir_or_skip):
    line = make_line(
        ["--broker", "mqtts://127.0.0.1:8883", "--username", "scheduler", "--password-file", str(password_file),
         "--tls-ca", str(certificates.ca), "--model", str(model_dir_or_skip)]
    )
    argv = line._service_argv("mqtts://127.0.0.1:8883", shared=True)
    assert argv[argv.index("--username") + 1] == "scheduler"
    assert argv[argv.index("--password-file") + 1] == str(password_file)
    assert argv[argv.index("--tls-ca") + 1] == str(certificates.ca)
    assert SECRET not in " ".join(argv)
    assert line.security["tls_context"] is not None


def test_line_own_broker_rejects_tls(certificates, model_dir_or_skip):
    from services.common import StartupError

    with pytest.raises(StartupError, match="no --broker is given"):
        make_line(["--tls-ca", str(certificates.ca), "--model", str(model_dir_or_skip)])


def test_line_rejects_credentials_in_url(model_dir_or_skip):
    with pytest.raises(cfg.ConfigError) as caught:
        make_line(["--broker", f"mqtt://u:{SECRET}@h", "--model", str(model_dir_or_skip)])
    assert SECRET not in str(caught.value)


@pytest.fixture()
def model_dir_or_skip():
    from tests.broker import SHIPPED_MODEL

    if not (SHIPPED_MODEL / "manifest.json").is_file():
        pytest.skip(f"model checkpoint {SHIPPED_MODEL} not found")
    return SHIPPED_MODEL
