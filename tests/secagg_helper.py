"""Test-only: ``worker.py`` whose hosted clients run a test subclass of
``secagg_client.SecAggSession``, with hooks chosen by environment variables that only this
helper reads (the shipped client never looks at them):

- ``FL_TEST_SECAGG_RECORD=DIR``: for every masked input a client sends, ``DIR/client<ID>.pt``
  holds the round, the encoded (unmasked) ring vector ``x``, the masked vector ``y`` as
  sent, the clear integer counters, the floats of the model it trained from and the
  fixed-point parameters (a later round or attempt overwrites it), and
  ``DIR/client<ID>-r<ROUND>-a<ATTEMPT>.pt`` the same, kept for each attempt.
- ``FL_TEST_SECAGG_FAULT``:
  ``exit-after-masked``: the process dies (``os._exit``) as soon as every hosted client has
  sent its masked input, before any of them answers the unmasking request;
  ``drop-before-masked``: each hosted client hangs up once, right before sending its masked
  input (in its first round), then reconnects like any client that lost its connection;
  ``boost-once``: each hosted client skips its clip once, in its first masked input: it
  sends its encoded delta times 1000 (ring arithmetic: no clamp), honest ones after that;
  ``bad-shares``: each hosted client, in every unmasking answer, flips a bit of the share
  of another client's self-mask seed it reveals;
  ``garbage-shares``: each hosted client seals zeros instead of its shares (stage 1).

    python tests/secagg_helper.py <worker.py flags>
"""
from __future__ import annotations

import dataclasses
import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import worker  # noqa: E402
from fl.client import secagg as secagg_client  # noqa: E402
from fl.client.steps.mask import Mask  # noqa: E402
from fl.secagg.wire import MASKED_INPUT, SHARE_KEYS, UNMASKING, encode  # noqa: E402
from fl.wire.errors import ConnectionClosed  # noqa: E402

RECORD = os.environ.get("FL_TEST_SECAGG_RECORD")
FAULT = os.environ.get("FL_TEST_SECAGG_FAULT", "")
HOSTED = len(worker.parse_args(sys.argv[1:]).client_ids)
_lock = threading.Lock()
_sent: set[int] = set()
_dropped: set[int] = set()
_boosted: set[int] = set()
BOOST = 1000


class BoostedMask(Mask):
    """A client that skips its clip: its encoded delta times BOOST, in ring arithmetic (so
    never clamped to the encoding's range), masked and sent as the honest step would."""

    def apply(self, update):
        s = self.settings
        floats, ints = self.layout.flatten(update.local)
        delta = floats - self.layout.flatten(update.base)[0]
        self.encoded = x = (s.fixed_point().encode(delta) * BOOST) & ((1 << s.bits) - 1)
        body = encode(MASKED_INPUT, self.client.masked_input(self.routed, x), num_samples=update.num_samples,
                      metrics=update.metrics, ints=ints.tolist())
        return dataclasses.replace(update, body=body)


class TestSession(secagg_client.SecAggSession):
    def mask_step(self, client, routed):
        if FAULT == "boost-once":
            with _lock:
                first = self.client_id not in _boosted
                _boosted.add(self.client_id)
            if first:
                self.log.warning("test: skipping the clip of this masked input")
                return BoostedMask(client, routed, self.settings, self.layout, None, self.log)
        return super().mask_step(client, routed)

    def send(self, stage, msg):
        if FAULT == "bad-shares" and stage == UNMASKING:
            owners = msg["b_owners"].tolist()
            i = next(i for i, u in enumerate(owners) if u != self.client_id)
            shares = msg["b_shares"].clone()
            shares[32 * i] ^= 1
            msg = {**msg, "b_shares": shares}
            self.log.warning("test: revealing a wrong share of client %d's self-mask seed", owners[i])
        if FAULT == "garbage-shares" and stage == SHARE_KEYS:
            msg = {**msg, "ciphertexts": torch.zeros_like(msg["ciphertexts"])}
            self.log.warning("test: sealing garbage instead of shares")
        super().send(stage, msg)
    def before_masked(self, x: torch.Tensor, body: dict) -> None:
        cid = self.client_id
        if FAULT == "drop-before-masked":
            with _lock:
                first = cid not in _dropped
                _dropped.add(cid)
            if first:
                self.log.warning("test: hanging up before sending the masked input")
                self.conn.close()
                raise ConnectionClosed("test: hung up before the masked input")
        fp = self.settings.fixed_point()
        self._record = {"round": self.round, "attempt": self.settings.attempt, "x": x.clone(),
                        "y": body["masked"].view(torch.uint32).to(torch.int64),
                        "ints": list(body["ints"]), "base": self.layout.flatten(self.base)[0],
                        "bits": fp.bits, "frac_bits": fp.frac_bits, "max_clients": fp.max_clients}

    def after_masked(self) -> None:
        cid = self.client_id
        if RECORD:
            torch.save(self._record, Path(RECORD) / f"client{cid}.pt")
            torch.save(self._record, Path(RECORD) / f"client{cid}-r{self.round}-a{self.settings.attempt}.pt")
        if FAULT == "exit-after-masked":
            with _lock:
                _sent.add(cid)
                if len(_sent) == HOSTED:
                    self.log.warning("test: exiting after every hosted client sent its masked input")
                    os._exit(0)
            threading.Event().wait()  # never read the survivor list: the process dies first


secagg_client.SESSION = TestSession

if __name__ == "__main__":
    sys.exit(worker.main())
