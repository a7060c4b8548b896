"""Who may open the page: the loopback address by default; any other address only with a user and password
(`--auth USER:PASSWORD` or a file holding that line). Checked before Gradio is imported. TF-free."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from ..errors import ConfigError

LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_auth(text: str, where: str = "--auth") -> tuple[str, str]:
    """'USER:PASSWORD' -> (user, password); ConfigError when either is empty."""
    user, sep, password = (text or "").strip().partition(":")
    if not sep or not user or not password:
        raise ConfigError(f"{where}: expected USER:PASSWORD (both non-empty)")
    return user, password


def read_auth_file(path: Path) -> tuple[str, str]:
    """The USER:PASSWORD on the first non-empty line of a file (so the password is not in the shell history)."""
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--auth-file {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    return parse_auth(lines[0] if lines else "", f"--auth-file {path}")


def access(listen: str | None, auth: str | None, auth_file: Path | None) -> tuple[str, tuple[str, str] | None]:
    """(host to bind, (user, password) or None). Another address than the loopback without a password is a
    ConfigError (exit 2) saying why."""
    credentials = parse_auth(auth) if auth else read_auth_file(auth_file) if auth_file else None
    host = listen or LOOPBACK
    if not is_loopback(host) and credentials is None:
        raise ConfigError(f"--listen {host}: the page would be open to anyone who can reach this address (it "
                          "starts trainings and reads your runs); add --auth USER:PASSWORD or --auth-file FILE")
    return host, credentials
