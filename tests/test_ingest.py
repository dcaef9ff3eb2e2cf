"""ingest.py: one thread decodes and submits, survives garbage and failing submits, lends bounded buffers."""
from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace

import pytest
import torch
from updates import update_message

from fl.server.ingest import Ingest
from fl.wire.errors import ProtocolError
from fl.wire.frames import encode_payload


def make(submit=None, slots=2):
    got = []
    ingest = Ingest(submit or (lambda *a: got.append(a)), slots, 1024)
    return ingest, got


SESSION, TASK = SimpleNamespace(client_id=3), SimpleNamespace(round=1)


def test_decodes_and_submits_then_survives_garbage():
    ingest, got = make()
    with pytest.raises(ProtocolError, match="undecodable"):
        ingest.process(SESSION, TASK, bytearray(b"PK\x03\x04 not a zip"), 1, 1)
    assert got == []
    base = {"w": torch.zeros(3)}
    payload = encode_payload(update_message({"w": torch.ones(3)}, base, 1, 30, {"train_s": 1.5}))
    ingest.process(SESSION, TASK, memoryview(bytearray(payload)), len(payload), 7)  # the thread is still there
    (session, task, body, up, down), = got
    assert session is SESSION and body["num_samples"] == 30 and (up, down) == (len(payload), 7)


def test_a_failing_submit_is_reported_and_the_thread_goes_on():
    calls = []

    def submit(*args):
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("boom")

    ingest, _ = make(submit)
    payload = encode_payload({"round": 1})
    with pytest.raises(ProtocolError, match="internal error: RuntimeError"):
        ingest.process(SESSION, TASK, payload, 1, 1)
    ingest.process(SESSION, TASK, payload, 1, 1)
    assert len(calls) == 2


def test_lends_at_most_its_slots_of_buffers():
    ingest, _ = make(slots=2)
    held = [ingest.buffer(timeout=0.01) for _ in range(2)]
    assert all(isinstance(b, bytearray) and len(b) == 1024 for b in held) and held[0] is not held[1]
    assert ingest.buffer(timeout=0.01) is None  # the caller then reads into its own memory
    ingest.give_back(held.pop())
    assert ingest.buffer(timeout=0.01) is not None


def test_a_refused_update_is_freed_at_once_without_the_garbage_collector():
    """The refusal must not sit in a reference cycle (error -> traceback -> frame -> error):
    an idle server runs no garbage collection, and 16.8 MB updates stayed in memory."""
    class Payload(bytearray):  # a bytearray that can be watched
        pass

    ingest, _ = make()
    payload = Payload(b"PK\x03\x04" + bytes(1 << 20))
    ref = weakref.ref(payload)

    def handler(p):  # like transport's: the update is only in this frame and the call
        try:
            ingest.process(SESSION, TASK, p, 1, 1)
        except ProtocolError:
            return "refused"

    gc.disable()
    try:
        assert handler(payload) == "refused"
        del payload
        assert ref() is None
    finally:
        gc.enable()
