"""Credentials: where secrets come from, and the key ring that says which secret a client
must prove.

A secret given as a command-line flag is visible to every user of the machine in the
process list (``ps``, ``/proc/*/cmdline``); a file only its owner can read, or the
``FL_SECRET`` environment variable, is not. With one shared secret any participant can
claim any client id; a clients file gives each id its own secret, so a participant can
only ever be the client whose secret it holds. Error messages name files and line
numbers, never a secret.
"""
from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from fl.wire.control import MAX_CLIENT_ID

SECRET_ENV = "FL_SECRET"
MAX_SECRET_FILE = 4096
MAX_CLIENTS_FILE = 1 << 20

log = logging.getLogger("credentials")


class CredentialError(ValueError):
    """A secret or clients file that cannot be used."""


@dataclass(frozen=True)
class KeyRing:
    """Answers "which secret must client X prove?" for the server's handshake.

    ``KeyRing()``: an open server, nobody proves anything. ``KeyRing(shared=s)``: every
    client proves ``s``. ``KeyRing(per_client={id: s})``: client ``id`` proves its own
    ``s``, and an id that is not listed cannot join at all.
    """

    shared: bytes | None = None
    per_client: Mapping[int, bytes] | None = None

    def __post_init__(self) -> None:
        if self.shared is not None and self.per_client is not None:
            raise ValueError("a key ring holds a shared secret or per-client secrets, not both")
        if self.shared is not None and not self.shared:
            raise ValueError("empty shared secret")
        if self.per_client is not None and not all(self.per_client.values()):
            raise ValueError("empty per-client secret")

    @property
    def required(self) -> bool:
        """Whether clients must authenticate at all."""
        return self.shared is not None or self.per_client is not None

    def secret_for(self, client_id: int) -> bytes | None:
        """The secret client ``client_id`` must prove; None if it has none (when
        ``required``, such a client is refused)."""
        if self.per_client is not None:
            return self.per_client.get(client_id)
        return self.shared


def read_secret_file(path: str | os.PathLike[str]) -> bytes:
    """The secret in ``path``: one line, surrounding whitespace (the trailing newline)
    stripped. Warns when other users may read the file."""
    data = _read_bounded(path, MAX_SECRET_FILE, "secret file")
    secret = data.strip()
    if not secret:
        raise CredentialError(f"secret file {path} is empty")
    if b"\n" in secret or b"\r" in secret:
        raise CredentialError(f"secret file {path} holds more than one line")
    _warn_if_readable_by_others(path)
    return secret


def resolve_secret(flag: str | None, file: str | os.PathLike[str] | None = None) -> bytes | None:
    """The shared secret from ``--secret``, else ``--secret-file``, else ``$FL_SECRET``;
    None if none is set (an empty value counts as unset)."""
    if flag and file is not None:
        raise CredentialError("give the secret once: --secret or --secret-file, not both")
    if flag:
        return flag.encode()
    if file is not None:
        return read_secret_file(file)
    value = os.environ.get(SECRET_ENV)
    return value.encode() if value else None


def load_clients_file(path: str | os.PathLike[str]) -> dict[int, bytes]:
    """Per-client secrets: one ``client_id secret`` per line; blank lines and lines that
    start with ``#`` are skipped; each id at most once."""
    text = _read_bounded(path, MAX_CLIENTS_FILE, "clients file")
    secrets: dict[int, bytes] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        parts = line.split(None, 1)
        where = f"{path}:{number}"
        if len(parts) != 2 or not parts[1].strip():
            raise CredentialError(f"{where}: expected 'client_id secret'")
        if not parts[0].isdigit() or len(parts[0]) > 7 or int(parts[0]) > MAX_CLIENT_ID:
            raise CredentialError(f"{where}: client id must be an integer 0..{MAX_CLIENT_ID}")
        client_id = int(parts[0])
        if client_id in secrets:
            raise CredentialError(f"{where}: client {client_id} is listed twice")
        secrets[client_id] = parts[1].strip()
    if not secrets:
        raise CredentialError(f"clients file {path} lists no clients")
    _warn_if_readable_by_others(path)
    return secrets


def build_keyring(secret: bytes | None = None, clients_file: str | os.PathLike[str] | None = None) -> KeyRing:
    """The server's key ring from its flags: ``--clients-file``, or the shared secret
    (``resolve_secret``), or neither for an open server."""
    if clients_file is not None:
        if secret is not None:
            raise CredentialError("use a shared secret or --clients-file, not both")
        return KeyRing(per_client=load_clients_file(clients_file))
    return KeyRing(shared=secret) if secret else KeyRing()


def _read_bounded(path: str | os.PathLike[str], limit: int, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise CredentialError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise CredentialError(f"{what} {path} is larger than {limit} bytes")
    return data


def _warn_if_readable_by_others(path: str | os.PathLike[str]) -> None:
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is accessible to other users; restrict it with: chmod 600 %s", path, path)
