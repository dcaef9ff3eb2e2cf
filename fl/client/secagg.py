"""A client's side of a secure-aggregation round, for ``participant.Participant``.

When a MODEL message carries ``secagg`` settings (``secagg_wire.Settings``) the client runs
the four stages of ``secagg.SecAggClient`` on its connection instead of sending an UPDATE:

  MODEL(secagg) ─▶ 0: advertise two public keys ─▶ key list ─▶ 1: shares of its secrets,
  sealed to each group member ─▶ shares routed to it ─▶ **train**, clip, encode, mask ─▶
  2: masked input (+ sample count, metrics and BatchNorm's integer counters in clear)
  ─▶ survivor list ─▶ 3: unmasking shares. Done; the next message is a MODEL or DONE.

**Who trains when**: after the two key stages (small messages, milliseconds), when the
shares routed to it arrive. So a client that drops out before training costs the others
nothing, and the model-sized masked vector exists only between training and sending. In
``worker.py`` the stages run on each client's own thread without the training lock, and
only "train, clip, encode, mask" takes a slot of the host's lock, so the hosted clients
train as in plain rounds (one at a time, or one per process of a ``TrainerPool``) while
all of them take part in the key stages together.

**Clipping**: the delta (local floats minus the model received) is clipped to the L2 norm
the server asks for (``--clip-norm``, and the DP clip norm ``dp_clip_norm`` under
``--dp-clipping client``, the smaller of the two), less the fixed-point rounding margin
sqrt(L) 2^-(f+1) so the encoded vector stays within it; then ``FixedPoint.encode`` clips
each coordinate to ``[-clip, clip]`` (counted, and logged when it bites) and rounds to the
nearest step. 8-bit ``--quantization`` does not apply: masks live in the ring, so a masked
update is 32 bits per coordinate; the client says so once and sends the masked vector.

A message the core refuses (a share that fails authentication, a survivor list that
omits this client...) or an abort the client decides itself makes it leave the round: it
tells the server why (ERROR), hangs up and reconnects for the next round. An ABORT from
the server ends the round quietly; the connection stays.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from fl.common.layout import Layout
from fl.common.vectors import clip_by_norm
from fl.secagg import SecAggAbort, SecAggClient, SecAggError
from fl.secagg.wire import ADVERTISE_KEYS, MASKED_INPUT, SHARE_KEYS, UNMASKING, Settings, decode_server, encode
from fl.wire.errors import ConnectionClosed, ProtocolError
from fl.wire.frames import Connection, MsgType


class Done(Exception):
    """The server said DONE in the middle of a round (it is stopping)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def begin(participant: Any, conn: Connection, round_num: int, model_msg: dict[str, Any]) -> "SecAggSession":
    """Check the round's settings and resolve the model (on the training thread, under the
    host's lock, which the caller holds); ProtocolError for settings this client refuses."""
    settings = Settings.from_dict(model_msg["secagg"])
    if settings.round != round_num:
        raise ProtocolError(f"secagg settings for round {settings.round} in the MODEL of round {round_num}")
    config = participant.training_config(model_msg)
    base = participant.host.compute(participant._base, model_msg)
    layout = Layout.of(base)
    if settings.length != layout.float_numel:
        raise ProtocolError(f"secagg length {settings.length} does not match the model's "
                            f"{layout.float_numel} floating values")
    return SESSION(participant, conn, round_num, settings, config, base, layout)


class SecAggSession:
    """One client's part in one round: fresh keys, never reused. Subclasses (tests) may
    override :meth:`before_masked` and :meth:`after_masked`."""

    def __init__(self, participant: Any, conn: Connection, round_num: int, settings: Settings,
                 config: dict[str, Any], base: dict[str, torch.Tensor], layout: Layout) -> None:
        self.participant = participant
        self.conn = conn
        self.round = round_num
        self.settings = settings
        self.config = config
        self.base = base
        self.layout = layout
        self.log = participant.log

    # --- hooks for tests ----------------------------------------------------------------

    def before_masked(self, x: torch.Tensor, body: dict[str, Any]) -> None:
        """Called with the encoded (unmasked) ring vector and the body about to be sent."""

    def after_masked(self) -> None:
        """Called once the masked input is sent."""

    # --- the round ------------------------------------------------------------------------

    def run(self) -> str | None:
        """Run the stages; None when this client's part is over, or the DONE reason."""
        p, s = self.participant, self.settings
        if p.config.quantization and not getattr(p, "_secagg_quantization_warned", False):
            p._secagg_quantization_warned = True
            self.log.warning("the server requires secure aggregation: sending 32-bit masked updates "
                             "(8-bit --quantization cannot be masked in the ring)")
        client = SecAggClient(p.client_id, s.config(), s.round)
        try:
            self.send(ADVERTISE_KEYS, client.advertise_keys())
            keys = self.receive(ADVERTISE_KEYS)
            if isinstance(keys, str):
                return self.left(keys)
            self.send(SHARE_KEYS, client.share_keys(keys))
            routed = self.receive(SHARE_KEYS)
            if isinstance(routed, str):
                return self.left(routed)
            with p.host.lock:  # as many clients of this process train at once as it has models
                fitted = p.host.fit(p, self.round, self.config, self.base)
                x, body, result = p.host.compute(self.masked_input, client, routed, fitted)
                del fitted
            self.before_masked(x, body)
            del x
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
        p.rounds_trained += 1
        self.log.info("round %d: loss %.4f acc %.2f%% | %.1f s, %.0f img/s | secure aggregation with %d others",
                      self.round, result.loss, 100 * result.accuracy, result.seconds,
                      result.samples / max(result.seconds, 1e-9), len(survivors["survivors"]) - 1)
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

    def masked_input(self, client: SecAggClient, routed: dict[str, Any],
                     fitted: tuple[dict[str, torch.Tensor], Any, Any, int]) -> tuple[torch.Tensor, dict[str, Any], Any]:
        """Clip, encode and mask the trained model; on the host's training thread. (x, body, result)."""
        from fl.client.participant import train_metrics  # noqa: PLC0415 - participant imports this module

        s = self.settings
        local, result, _, num_samples = fitted
        floats, ints = self.layout.flatten(local)
        delta = floats - self.layout.flatten(self.base)[0]
        del local, floats
        fp = s.fixed_point()
        norm = self.l2_bound()
        if norm is not None:
            margin = math.sqrt(s.length) * fp.step / 2  # rounding to the grid may add this much
            delta, before = clip_by_norm(delta, norm - margin if norm > 2 * margin else norm)
            if before > norm:
                self.log.debug("round %d: delta norm %.4g clipped to %.4g", self.round, before, norm)
        clipped = fp.clipped(delta)
        if clipped:
            self.log.warning("round %d: %d coordinates of the update exceed the secure-aggregation range "
                             "+-%g and were clipped", self.round, clipped, s.clip)
        x = fp.encode(delta)
        msg = client.masked_input(routed, x)
        body = encode(MASKED_INPUT, msg, num_samples=num_samples, metrics=train_metrics(result), ints=ints.tolist())
        return x, body, result

    def l2_bound(self) -> float | None:
        """The L2 norm to clip the delta to: the server's --clip-norm and DP clip norm, the smaller."""
        bounds = [self.settings.l2_clip] if self.settings.l2_clip else []
        dp = self.config.get("dp_clip_norm")
        if dp is not None:
            if isinstance(dp, bool) or not isinstance(dp, (int, float)) or not (math.isfinite(dp) and dp > 0):
                raise ProtocolError("dp_clip_norm must be a positive number")
            bounds.append(float(dp))
        return min(bounds) if bounds else None


SESSION = SecAggSession  # what begin() builds; the tests' helper swaps in a subclass
