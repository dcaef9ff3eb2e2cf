"""What the clients of one process share: the training images, ONE model, a lock so
that they train one after another, one training thread, and the last model received
(``ViewCache``). A participant owns only its connection, its shard's indices and a
reference to the model it was last sent."""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Protocol, TypeVar

import torch

from fl.client.config import ClientConfig
from fl.client.local import Fitted, fit
from fl.common.layout import Layout
from fl.learning import models
from fl.learning.augment import Augment, augment_batch
from fl.learning.config import TrainingConfig
from fl.wire.handshake import Terms

T = TypeVar("T")


class Shard(Protocol):
    """Who a host trains: a client's id, its shard (None: all the host's data) and settings."""

    client_id: int
    indices: torch.Tensor | None
    config: ClientConfig


class ViewCache:
    """The clients of one worker are sent the same model each round: keep one copy of it.

    Every participant decodes its own MODEL (each frame is authenticated with its own
    session key), then swaps the result for the copy already held if it is the same view
    with equal tensors, so N idle clients keep one model alive, not N. Equality is checked,
    not assumed from the view id, because a restarted server numbers its views anew.

    With ``shared_memory`` (a ``TrainerPool``), a new state is moved into shared memory
    here, before any other thread can see it. Pickling it for a training process would
    otherwise do that move in place on the pool's feeder thread, freeing each tensor's old
    buffer while other participants read it (``torch.equal`` below, an 8-bit delta, secure
    aggregation's flatten): a use-after-free."""

    def __init__(self, shared_memory: bool = False) -> None:
        self._lock = threading.Lock()
        self._last: tuple[Any, dict[str, torch.Tensor]] | None = None
        self.shared_memory = shared_memory

    def share(self, view_id: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with self._lock:
            if self._last is not None and self._last[0] == view_id and _same_state(self._last[1], state):
                return self._last[1]
            if self.shared_memory:  # still private to the caller: nobody else reads it yet
                for tensor in state.values():
                    tensor.share_memory_()
            self._last = (view_id, state)
            return state


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def build_task(model: str, dataset: str, data_dir: Any) -> tuple[torch.nn.Module, Terms]:
    """The model a client process trains on ``dataset``, and the terms its participants
    check the server's WELCOME against; ValueError or DataError, one line."""
    net = models.for_dataset(model, dataset, data_dir)
    return net, Terms(model, Layout.of(net.state_dict()).fingerprint, dataset)


class Host:
    """The training images, one model, one lock and one training thread, shared by a
    process's participants.

    ``images``/``labels`` are the whole training set (a worker: participants hold indices
    into it) or one client's shard already on its device (client.py). All the tensor work
    runs on the one training thread: oneDNN and the allocators keep per-thread scratch
    buffers (~15 MB a thread here), which would otherwise grow with the number of clients.

    ``model`` is the run's (default: ImprovedCNN for MNIST), ``augment`` its dataset's;
    ``terms`` what its participants check the server's WELCOME against (None: nothing)."""

    def __init__(self, images: torch.Tensor | None, labels: torch.Tensor | None, device: torch.device,
                 slots: int = 1, model: torch.nn.Module | None = None, terms: Terms | None = None,
                 augment: Augment = augment_batch) -> None:
        self.images, self.labels = images, labels
        self.device = device
        model = model if model is not None else models.build(models.DEFAULT, (1, 28, 28), 10)
        self.layout = Layout.of(model.state_dict())  # sizes the connection's limits (frames.frame_limit)
        self.terms, self.augment = terms, augment
        self.model = model.to(device) if images is not None else None
        # How many participants may read, train and encode at once: one model here, one
        # per training process in a TrainerPool.
        self.lock = threading.BoundedSemaphore(slots)
        self.views = ViewCache()
        self._jobs: queue.SimpleQueue[tuple[Future, Callable[..., Any], tuple]] = queue.SimpleQueue()
        # A daemon thread, so Ctrl-C or a failure ends the process at once rather than
        # after the training under way.
        threading.Thread(target=self._train_loop, name="train", daemon=True).start()

    def compute(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the training thread and return its result (or raise its error)."""
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future.result()

    def fit(self, client: Shard, round_num: int, config: TrainingConfig, base: dict[str, torch.Tensor],
            attempt: int = 0) -> Fitted:
        """Train ``client`` from ``base``; called by a participant holding a slot of
        ``lock``. The extension point: ``trainer_pool.TrainerPool`` trains in other processes."""
        return self.compute(fit, self.model, self.images, self.labels, client.indices, client.client_id,
                            client.config.seed, round_num, config, base, client.config.progress, attempt,
                            self.augment)

    def _train_loop(self) -> None:
        while True:
            future, fn, args = self._jobs.get()
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting participant
                future.set_exception(exc)
            del future, fn, args  # hold nothing between jobs
