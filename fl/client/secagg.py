"""A client's side of a secure-aggregation round. It is handed what it needs (the checked
training config, the model received, a ``train`` callback, the client id and a logger)
and reaches into nothing else: like Flower's ``secaggplus_mod``, it trains through the
callback, with a ``steps.mask.Mask`` as the update chain.

When a MODEL message carries ``secagg`` settings (``fl.secagg.wire.Settings``) the client runs
the four stages of ``secagg.SecAggClient`` on its connection instead of sending an UPDATE:

  MODEL(secagg) ─▶ 0: advertise two public keys ─▶ key list ─▶ 1: shares of its secrets,
  sealed to each group member ─▶ shares routed to it ─▶ **train**, clip, encode, mask ─▶
  2: masked input (+ sample count, metrics and BatchNorm's integer counters in clear)
  ─▶ survivor list ─▶ 3: unmasking shares. Done; the next message is a MODEL or DONE.

**Who trains when**: after the two key stages (small messages, milliseconds), when the
shares routed to it arrive. So a client that drops out before training costs the others
nothing, and the model-sized masked vector exists only between training and sending. In
``worker.py`` the stages run on each client's own thread without the training lock, and
only "train, clip, encode, mask" (the ``train`` callback) takes a slot of the host's lock, so the hosted clients
train as in plain rounds (one at a time, or one per process of a ``TrainerPool``) while
all of them take part in the key stages together.

**Clipping**: the delta (local floats minus the model received) is clipped to the L2 norm
the server asks for (``--clip-norm``, and the DP clip norm ``dp_clip_norm`` under
``--dp-clipping client``, the smaller of the two), less the fixed-point rounding margin
sqrt(L) 2^-(f+1) so the encoded vector stays within it; then ``FixedPoint.encode`` clips
each coordinate to ``[-clip, clip]`` (counted, and logged when it bites) and rounds to the
nearest step. 8-bit ``--quantization`` does not apply: masks live in the ring, so a masked
update is 32 bits per coordinate; the client says so once and sends the masked vector.

**Retries**: the settings carry the round's attempt, and the ``train`` callback seeds the
training with it (``local.round_seed``): a retried round gets a freshly trained update, never
the same one again, so the sums of two attempts never differ by exactly one update.

A message the core refuses (a share that fails authentication or its dealer's digest, a
survivor list that omits this client...) or an abort the client decides itself makes it leave the round: it
tells the server why (ERROR), hangs up and reconnects for the next round. An ABORT from
the server ends the round quietly; the connection stays.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from fl.client.local import log_round
from fl.client.steps.base import Step
from fl.client.steps.mask import Mask
from fl.common.layout import Layout
from fl.learning.config import TrainingConfig
from fl.learning.training import TrainResult
from fl.secagg import SecAggAbort, SecAggClient, SecAggError
from fl.secagg.wire import ADVERTISE_KEYS, MASKED_INPUT, SHARE_KEYS, UNMASKING, Settings, decode_server, encode
from fl.wire.errors import ConnectionClosed, ProtocolError
from fl.wire.frames import Connection, MsgType

Train = Callable[[Sequence[Step]], tuple[dict[str, Any], TrainResult]]
"""Train (holding a slot of the host's lock) and run the steps: (body, result)."""

QUANTIZATION_WARNING = ("the server requires secure aggregation: sending 32-bit masked updates "
                        "(8-bit --quantization cannot be masked in the ring)")


class Done(Exception):
    """The server said DONE in the middle of a round (it is stopping)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def settings_of(model_msg: dict[str, Any], round_num: int) -> Settings:
    """The round's secure-aggregation settings; ProtocolError for settings this client refuses."""
    settings = Settings.from_dict(model_msg["secagg"])
    if settings.round != round_num:
        raise ProtocolError(f"secagg settings for round {settings.round} in the MODEL of round {round_num}")
    return settings


def begin(conn: Connection, settings: Settings, training: TrainingConfig, base: dict[str, torch.Tensor], *,
          client_id: int, train: Train, log: logging.Logger | logging.LoggerAdapter) -> "SecAggSession":
    """A session for the round, once the model received matches the settings' length."""
    layout = Layout.of(base)
    if settings.length != layout.float_numel:
        raise ProtocolError(f"secagg length {settings.length} does not match the model's "
                            f"{layout.float_numel} floating values")
    return SESSION(conn, settings, training, base, layout, client_id=client_id, train=train, log=log)


@dataclass(eq=False)
class SecAggSession:
    """One client's part in one round: fresh keys, never reused. Subclasses (tests) may
    override :meth:`before_masked`, :meth:`after_masked` and :meth:`mask_step`. ``result`` is the training's
    once the masked input went out and the round ended well."""

    conn: Connection
    settings: Settings
    training: TrainingConfig
    base: dict[str, torch.Tensor]
    layout: Layout
    client_id: int
    train: Train
    log: logging.Logger | logging.LoggerAdapter
    result: TrainResult | None = None

    @property
    def round(self) -> int:
        return self.settings.round

    # --- hooks for tests ----------------------------------------------------------------

    def before_masked(self, x: torch.Tensor, body: dict[str, Any]) -> None:
        """Called with the encoded (unmasked) ring vector and the body about to be sent."""

    def after_masked(self) -> None:
        """Called once the masked input is sent."""

    def mask_step(self, client: SecAggClient, routed: dict[str, Any]) -> Mask:
        """The step that clips, encodes and masks this client's delta."""
        return Mask(client, routed, self.settings, self.layout, self.l2_bound(), self.log)

    # --- the round ------------------------------------------------------------------------

    def run(self) -> str | None:
        """Run the stages; None when this client's part is over, or the DONE reason."""
        client = SecAggClient(self.client_id, self.settings.config(), self.round)
        try:
            self.send(ADVERTISE_KEYS, client.advertise_keys())
            keys = self.receive(ADVERTISE_KEYS)
            if isinstance(keys, str):
                return self.left(keys)
            self.send(SHARE_KEYS, client.share_keys(keys))
            routed = self.receive(SHARE_KEYS)
            if isinstance(routed, str):
                return self.left(routed)
            mask = self.mask_step(client, routed)
            body, result = self.train([mask])
            if client.unopened:
                self.log.warning("round %d: could not open the shares client(s) %s dealt to this client (they fail "
                                 "authentication or their digest); going on without them", self.round,
                                 ", ".join(map(str, client.unopened)))
            self.before_masked(mask.encoded, body)
            del mask
            self.conn.send(MsgType.SECAGG, body)
            del body
            self.after_masked()
            survivors = self.receive(MASKED_INPUT)
            if isinstance(survivors, str):
                return self.left(survivors)
            self.send(UNMASKING, client.unmask(survivors))
        except Done as done:
            return done.reason
        except (SecAggError, SecAggAbort) as exc:
            reason = f"secure aggregation, round {self.round}: {exc}"
            self.conn.send_error(reason)
            raise ConnectionClosed(f"left the round ({reason})") from None
        self.result = result
        log_round(self.log, self.round, result, f"secure aggregation with {len(survivors['survivors']) - 1} others")
        return None

    def left(self, reason: str) -> None:
        self.log.warning("round %d: the server ended this client's part in the round: %s", self.round, reason)
        return None

    def send(self, stage: int, msg: dict[str, Any]) -> None:
        self.conn.send(MsgType.SECAGG, encode(stage, msg))

    def receive(self, stage: int) -> dict[str, Any] | str:
        """The server's answer to ``stage`` (no timeout: the server answers or hangs up at
        its deadlines), or the reason of an ABORT."""
        msg = self.conn.recv({MsgType.SECAGG, MsgType.DONE})
        if msg.type == MsgType.DONE:
            raise Done(str(msg.body.get("reason", "done")))
        return decode_server(msg.body, stage)

    def l2_bound(self) -> float | None:
        """The L2 norm to clip the delta to: the server's --clip-norm and DP clip norm, the smaller."""
        bounds = [self.settings.l2_clip] if self.settings.l2_clip else []
        if self.training.dp_clip_norm is not None:  # checked by TrainingConfig.from_wire
            bounds.append(self.training.dp_clip_norm)
        return min(bounds) if bounds else None


SESSION = SecAggSession  # what begin() builds; the tests' helper swaps in a subclass
