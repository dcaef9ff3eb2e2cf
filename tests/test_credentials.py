from __future__ import annotations

import logging
import os

import pytest

import client
from fl.wire.credentials import (
    MAX_SECRET_FILE,
    SECRET_ENV,
    CredentialError,
    KeyRing,
    build_keyring,
    load_clients_file,
    read_secret_file,
    resolve_secret,
)


def write(path, text: str | bytes, mode: int = 0o600):
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    os.chmod(path, mode)
    return path


# --- secret files ---------------------------------------------------------------------------

@pytest.mark.parametrize("content", ["s3cret\n", "s3cret", "  s3cret \r\n", "s3cret\n\n"])
def test_secret_file_is_one_stripped_line(tmp_path, content):
    assert read_secret_file(write(tmp_path / "secret", content)) == b"s3cret"


@pytest.mark.parametrize("content,needle", [
    ("", "empty"), ("\n  \n", "empty"), ("one\ntwo\n", "more than one line"),
    ("x" * (MAX_SECRET_FILE + 1), "larger than"),
])
def test_unusable_secret_file(tmp_path, content, needle):
    with pytest.raises(CredentialError, match=needle):
        read_secret_file(write(tmp_path / "secret", content))


def test_missing_secret_file(tmp_path):
    with pytest.raises(CredentialError, match="cannot read secret file"):
        read_secret_file(tmp_path / "nope")


def test_secret_file_readable_by_others_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="credentials"):
        read_secret_file(write(tmp_path / "private", "x\n", 0o600))
        assert not caplog.records
        read_secret_file(write(tmp_path / "shared", "x\n", 0o644))
    assert len(caplog.records) == 1 and "chmod 600" in caplog.records[0].getMessage()


def test_resolve_secret_order(tmp_path, monkeypatch):
    path = write(tmp_path / "secret", "from-file\n")
    monkeypatch.delenv(SECRET_ENV, raising=False)
    assert resolve_secret(None) is None
    assert resolve_secret(None, path) == b"from-file"
    monkeypatch.setenv(SECRET_ENV, "from-env")
    assert resolve_secret(None) == b"from-env"
    assert resolve_secret(None, path) == b"from-file"  # an explicit file beats the environment
    assert resolve_secret("from-flag") == b"from-flag"
    with pytest.raises(CredentialError, match="not both"):
        resolve_secret("from-flag", path)


# --- clients files ---------------------------------------------------------------------------

def test_clients_file(tmp_path):
    path = write(tmp_path / "clients", "# id secret\n\n0 zero-secret\n  1\tone secret with spaces  \n"
                                       "999999 last\n")
    assert load_clients_file(path) == {0: b"zero-secret", 1: b"one secret with spaces", 999999: b"last"}


@pytest.mark.parametrize("content,needle", [
    ("0 a\n0 b\n", ":2: client 0 is listed twice"),
    ("x hunter2\n", ":1: client id"),
    ("-1 hunter2\n", ":1: client id"),
    ("1000000 hunter2\n", ":1: client id"),
    ("1\n", ":1: expected"),
    ("# nothing\n\n", "lists no clients"),
])
def test_bad_clients_file(tmp_path, content, needle):
    with pytest.raises(CredentialError, match=needle) as info:
        load_clients_file(write(tmp_path / "clients", content))
    assert "hunter2" not in str(info.value)  # never echo a secret


# --- key rings ------------------------------------------------------------------------------

def test_key_rings():
    open_ring = KeyRing()
    assert not open_ring.required and open_ring.secret_for(3) is None
    shared = KeyRing(shared=b"s")
    assert shared.required and shared.secret_for(0) == shared.secret_for(5) == b"s"
    per = KeyRing(per_client={1: b"a", 2: b"b"})
    assert per.required and per.secret_for(1) == b"a" and per.secret_for(2) == b"b"
    assert per.secret_for(3) is None  # an unlisted id has no secret: it cannot join
    with pytest.raises(ValueError):
        KeyRing(shared=b"s", per_client={1: b"a"})
    with pytest.raises(ValueError):
        KeyRing(shared=b"")
    with pytest.raises(ValueError):
        KeyRing(per_client={1: b""})


def test_build_keyring(tmp_path):
    path = write(tmp_path / "clients", "4 four\n")
    assert build_keyring() == KeyRing()
    assert build_keyring(b"s") == KeyRing(shared=b"s")
    assert build_keyring(None, path).secret_for(4) == b"four"
    with pytest.raises(CredentialError, match="not both"):
        build_keyring(b"s", path)


# --- client.py flags ------------------------------------------------------------------------

def test_client_secret_flags(tmp_path, capsys):
    path = write(tmp_path / "secret", "s\n")
    assert client.parse_args(["--secret-file", str(path)]).secret_file == str(path)
    with pytest.raises(SystemExit) as info:
        client.parse_args(["--secret-file", str(path), "--secret", "x"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        client.parse_args(["--help"])
    assert "process list" in capsys.readouterr().out


def test_client_exits_2_on_unreadable_secret_file(tmp_path):
    assert client.main(["--secret-file", str(tmp_path / "missing"), "--no-download",
                        "--data-dir", str(tmp_path)]) == 2
