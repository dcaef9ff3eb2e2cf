"""The ingest pipeline: decode, validate and fold the updates one at a time, on one thread.

Handlers only move bytes: each receives its client's UPDATE frame into one of a few
reusable buffers and hands it over. A socket read so overlaps the previous update's
decoding, memory holds at most ``slots`` frames however many clients report, and
``torch.load``'s pure-Python unpickling runs on one thread rather than on fifty that fight
for the GIL (and each grow a stack for it).
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable

from fl.wire.errors import ProtocolError
from fl.wire.frames import decode_payload
from fl.wire.safe_decode import STRICT, Limits

log = logging.getLogger("server")

# submit(session, task, body, bytes_up, bytes_down): Federation.submit
Submit = Callable[[Any, Any, dict[str, Any], int, int], None]


class Ingest:
    def __init__(self, submit: Submit, slots: int, frame_size: int, limits: Limits = STRICT) -> None:
        self.submit = submit
        self.limits = limits
        self.buffers: "queue.Queue[bytearray]" = queue.Queue()
        for _ in range(slots):
            self.buffers.put(bytearray(frame_size))
        self.jobs: "queue.SimpleQueue[tuple[Any, ...]]" = queue.SimpleQueue()
        threading.Thread(target=self._run, name="ingest", daemon=True).start()

    def buffer(self, timeout: float) -> bytearray | None:
        """A free receive buffer, or None if slow uploads hold them all for ``timeout``."""
        try:
            return self.buffers.get(timeout=timeout)
        except queue.Empty:
            return None

    def give_back(self, buffer: bytearray) -> None:
        self.buffers.put(buffer)

    def process(self, session: Any, task: Any, payload: bytes | bytearray | memoryview, up: int, down: int) -> None:
        """Decode and fold one update on the ingest thread; returns when it is done (the
        payload's buffer is free again). Raises ProtocolError if it cannot be decoded."""
        done, failure = threading.Event(), []
        self.jobs.put((session, task, payload, up, down, done, failure))
        del payload  # the traceback of the raise below must not keep the update alive
        done.wait()
        if failure:
            error = failure.pop()  # no cycle (list -> error -> traceback -> this frame -> list) that
            try:  # only the garbage collector could free, with the caller's frame and its payload
                raise error
            finally:
                del error

    def _run(self) -> None:
        while True:
            session, task, payload, up, down, done, failure = self.jobs.get()
            try:
                self._one(session, task, payload, up, down, failure)
            finally:
                del payload, task
                done.set()

    def _one(self, session: Any, task: Any, payload: Any, up: int, down: int, failure: list) -> None:
        """Kept apart from the loop so no frame of it (and no exception traceback) outlives
        the update: a failed decode must not keep its objects alive."""
        try:
            body = decode_payload(payload, self.limits)
        except ProtocolError as exc:
            failure.append(ProtocolError(str(exc)))
            return
        try:
            self.submit(session, task, body, up, down)
        except Exception as exc:  # never let one update stop the ingest thread
            log.exception("round %d: unexpected error ingesting client %d's update", task.round, session.client_id)
            failure.append(ProtocolError(f"internal error: {type(exc).__name__}"))
        finally:
            del body
