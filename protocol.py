"""The wire protocol: length-prefixed frames between server and clients.

    magic "FLMN" | version u8 | type u8 | flags u16 | payload length u64 | payload | [HMAC tag]

Control messages (HELLO, CHALLENGE, AUTH, WELCOME, DONE, ERROR) are bounded, schema-checked
JSON, so nothing a peer sends before it has authenticated reaches an unpickler. MODEL and
UPDATE carry ``torch.save`` bytes, decoded only behind an allowlist and
``torch.load(weights_only=True)``. After the handshake every frame carries an HMAC-SHA256
tag under a key of its direction.

The code is ``fl/wire/`` (``frames.py``, ``control.py``, ``safe_decode.py``,
``handshake.py``). ``python protocol.py`` prints the message types and frame limits.
"""
from __future__ import annotations

import argparse

from fl.wire.errors import ConnectionClosed, ProtocolError, RemoteError
from fl.wire.frames import CONTROL_TYPES, DEFAULT_MAX_FRAME, HEADER_SIZE, MAGIC, TAG_SIZE, VERSION, Connection, MsgType

__all__ = ["Connection", "ConnectionClosed", "MsgType", "ProtocolError", "RemoteError"]


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    print(f"frame: {HEADER_SIZE}-byte header (magic {MAGIC.decode()}, version {VERSION}), payload, "
          f"{TAG_SIZE}-byte tag once authenticated; payloads up to {DEFAULT_MAX_FRAME >> 20} MiB by default")
    for t in MsgType:
        print(f"  {t.value}  {t.name:<9} {'JSON' if t in CONTROL_TYPES else 'torch.save'}")


if __name__ == "__main__":
    main()
