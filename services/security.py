"""Broker authentication and TLS of a service: username, password and the TLS files.

Every service takes `--username`, `--password-file` (a file whose first line is the password),
`--tls-ca`, `--tls-cert` and `--tls-key`, added by `services.config.add_security_options`. The
password can also come from the environment variable SDRM_PASSWORD. There is no `--password`
flag, because the command line of a process is visible to every user of the host (`ps`).

`bus_security(config)` checks these options against the broker URL and returns the keyword
arguments of `services.bus.Bus`: the username, the password as a pydantic `SecretStr` (its str()
and repr() print asterisks) and an `ssl.SSLContext` for an mqtts:// URL. Errors are `ConfigError`s
that name the option, the file and the fix, and never contain the password.
"""

from __future__ import annotations

import argparse
import os
import ssl
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from services.config import ConfigError, broker_uses_tls

PASSWORD_ENV = "SDRM_PASSWORD"
TLS_OPTIONS = ("tls_ca", "tls_cert", "tls_key")


def bus_security(config: argparse.Namespace) -> dict[str, Any]:
    """Return the Bus keyword arguments username, password and tls_context for a resolved config.

    Raises ConfigError for a password without a username, two password sources, an unreadable or
    empty password file, TLS files with a plain mqtt:// URL, a certificate without its key (or
    the reverse) and TLS files that do not load.
    """
    username = getattr(config, "username", None) or None
    password = read_password(getattr(config, "password_file", None))
    if password is not None and username is None:
        raise ConfigError(
            "a password is set (--password-file or SDRM_PASSWORD) but no username: add --username or SDRM_USERNAME"
        )
    tls_files = {name: getattr(config, name, None) for name in TLS_OPTIONS}
    tls = broker_uses_tls(config.broker) if config.broker else False
    if not tls and any(tls_files.values()):
        options = ", ".join("--" + name.replace("_", "-") for name, path in tls_files.items() if path)
        raise ConfigError(
            f"{options} need a TLS broker URL, but --broker is {config.broker!r}: "
            "use mqtts://host:8883, or remove the TLS options"
        )
    context = client_tls_context(**tls_files) if tls else None
    return {"username": username, "password": password, "tls_context": context}


def read_password(password_file: Path | None, environ: dict[str, str] | None = None) -> SecretStr | None:
    """Return the password from password_file (its first line) or SDRM_PASSWORD, or None when neither is set.

    Only the line break ends the first line, so spaces around the password are kept.
    """
    environ = os.environ if environ is None else environ
    from_env = environ.get(PASSWORD_ENV)
    if password_file is None:
        return SecretStr(from_env) if from_env else None
    if from_env:
        raise ConfigError(
            f"both --password-file {password_file} and {PASSWORD_ENV} are set: unset one of them"
        )
    try:
        text = Path(password_file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--password-file {password_file} not found: create it with the password on its first line") from None
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "it is not UTF-8 text"
        raise ConfigError(f"cannot read --password-file {password_file}: {reason}") from None
    lines = text.splitlines()
    if not lines or not lines[0]:
        raise ConfigError(f"--password-file {password_file} is empty: write the password on its first line")
    return SecretStr(lines[0])


def client_tls_context(tls_ca: Path | None = None, tls_cert: Path | None = None, tls_key: Path | None = None) -> ssl.SSLContext:
    """Return a client SSLContext: TLS 1.2 or newer, the broker's certificate and host name verified.

    tls_ca None trusts the system CAs. tls_cert and tls_key, given together, are the client
    certificate and its unencrypted private key.
    """
    if (tls_cert is None) != (tls_key is None):
        present, missing = ("--tls-cert", "--tls-key") if tls_cert is not None else ("--tls-key", "--tls-cert")
        raise ConfigError(
            f"{present} is set without {missing}: a client certificate needs both the certificate and its private key "
            "(both options may name one PEM file that contains the two)"
        )
    for option, path in (("--tls-ca", tls_ca), ("--tls-cert", tls_cert), ("--tls-key", tls_key)):
        if path is not None:
            _check_readable(option, Path(path))

    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls_ca is not None:
        try:
            context.load_verify_locations(cafile=str(tls_ca))
        except ssl.SSLError as error:
            raise ConfigError(f"--tls-ca {tls_ca} is not a PEM CA certificate: {error.reason or error}") from None
    if tls_cert is not None:
        try:
            context.load_cert_chain(str(tls_cert), str(tls_key), password=_reject_key_password)
        except ssl.SSLError as error:
            raise ConfigError(
                f"cannot load the client certificate --tls-cert {tls_cert} with --tls-key {tls_key}: "
                f"{error.reason or error}; give a PEM certificate and its matching, unencrypted private key"
            ) from None
    return context


def _reject_key_password() -> bytes:
    # Called by OpenSSL only for an encrypted key. Without it, OpenSSL would prompt on the terminal.
    raise ConfigError(
        "the --tls-key file is encrypted: decrypt it (openssl pkey -in KEY -out KEY.plain) and keep it readable only by the service"
    )


def _check_readable(option: str, path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"{option} {path} not found: give the path of a PEM file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"cannot read {option} {path}: permission denied for this user")
