"""Train a worker's sampled clients on several processes, each client on whichever is free.

Workers that each train their own clients one after another leave cores idle whenever the
server's sample falls unevenly across them: 10 of 100 clients over two workers of 50 is 6
and 4 (or worse) more often than 5 and 5, and the round waits for the busier worker. A
``TrainerPool`` is a ``host.Host`` whose ``fit`` sends the training to the next free
process of a pool, so one worker can hold every connection while all cores train.

What travels per job: the model the client was sent, its shard's indices and the round's
config out; the trained state, the training result and the generator's state back (the
generator feeds stochastic rounding of an 8-bit update). Everything protocol-side (reading
the MODEL, building the UPDATE, secure aggregation's stages) stays in the worker, so a
pooled client is the same client to the server. Training is seeded from (seed, client id,
round) alone (``local.fit``): which process trains a client changes nothing.

Each process loads the run's dataset once, holds one model of the run's and uses
``threads`` intra-op threads. The
processes are spawned, not forked: forking a process whose torch thread pools are running
can deadlock. Each ends with its worker: a worker killed outright cannot shut its pool down,
and a process blocked on the pool's queue would otherwise wait forever, holding a dataset
and a model.

The model travels in shared memory. Pickling a tensor for a process moves its storage into
shared memory in place, on the executor's feeder thread, and frees the old buffer: done to
a model other participants are reading, that is a use-after-free. So the host's
``ViewCache`` shares each new model before publishing it (one copy per model a worker
receives, as before, just on the thread that owns it), and ``fit`` sends a private copy of
any tensor not yet shared (none on the participant's path). A private copy per job instead
would cost two copies of the model for each client trained.
"""
from __future__ import annotations

import multiprocessing
import os
import queue
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, NamedTuple

import torch

from fl.client.host import Host, Shard, ViewCache
from fl.client.local import Fitted, fit
from fl.learning import augment, models
from fl.learning.config import Split, TrainingConfig
from fl.wire.handshake import Terms

_trainer: dict[str, Any] = {}  # this training process's data and model (set by start_trainer)


class Task(NamedTuple):
    """What a training process trains: the model's name on the dataset's images (picklable)."""

    model: str = models.DEFAULT
    dataset: str = Split.dataset
    test_fraction: float = Split.test_fraction


DEFAULT_TASK = Task()


class TrainerPool(Host):
    """A Host that trains on ``processes`` spawned processes, as many clients at once."""

    def __init__(self, processes: int, data_dir: str, download: bool, device: torch.device, threads: int = 1,
                 task: Task = DEFAULT_TASK, terms: Terms | None = None) -> None:
        if processes < 1:
            raise ValueError(f"a trainer pool needs at least one process, got {processes}")
        super().__init__(None, None, device, slots=processes, model=task_model(task, data_dir), terms=terms)
        self.views = ViewCache(shared_memory=True)
        self.processes = processes
        self.executor = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=start_pooled_trainer,
                                            initargs=(os.getpid(), data_dir, download, str(device), threads, task))
        # Start every process now (each imports torch and loads the dataset), so the first round
        # does not wait for them and a process that cannot start fails the worker here.
        try:
            for started in [self.executor.submit(os.getpid) for _ in range(processes)]:
                started.result()
        except BrokenProcessPool:
            self.executor.shutdown(wait=False, cancel_futures=True)
            raise RuntimeError("a training process failed to start (its error is above)") from None

    def fit(self, client: Shard, round_num: int, config: TrainingConfig,
            base: dict[str, torch.Tensor], attempt: int = 0) -> Fitted:
        base = {k: v if v.is_shared() else v.clone() for k, v in base.items()}  # see the module's docstring
        future = self.executor.submit(fit_job, client.indices, client.client_id, client.config.seed,
                                      round_num, config, base, attempt)
        return _fitted(*future.result())

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


class RayTrainers(Host):
    """A Host that trains on Ray actors (``simulate.RayTrainer``: ``start_trainer`` and
    ``fit_job`` in an actor), wherever Ray placed them, each client on whichever is free."""

    def __init__(self, actors: list[Any], device: torch.device, model: torch.nn.Module | None = None,
                 terms: Terms | None = None) -> None:
        import ray  # noqa: PLC0415 - an optional extra, needed only here

        super().__init__(None, None, device, slots=len(actors), model=model, terms=terms)
        self.ray = ray
        self.idle: queue.SimpleQueue[Any] = queue.SimpleQueue()  # never waits: a slot of lock is held
        for actor in actors:
            self.idle.put(actor)
        try:  # wait for every actor to have loaded the data, as TrainerPool does
            ray.get([actor.ready.remote() for actor in actors])
        except ray.exceptions.RayError as exc:
            raise RuntimeError(f"a Ray training actor failed to start: {str(exc).strip().splitlines()[0]}") from None

    def fit(self, client: Shard, round_num: int, config: TrainingConfig,
            base: dict[str, torch.Tensor], attempt: int = 0) -> Fitted:
        actor = self.idle.get()
        try:
            job = actor.fit.remote(client.indices, client.client_id, client.config.seed,
                                   round_num, config, base, attempt)
            return _fitted(*self.ray.get(job))
        finally:
            self.idle.put(actor)


def _fitted(local: dict[str, torch.Tensor], result: Any, generator_state: torch.Tensor, samples: int) -> Fitted:
    generator = torch.Generator()
    generator.set_state(generator_state)
    return local, result, generator, samples


def task_model(task: Task, data_dir: str) -> torch.nn.Module:
    """A fresh model of the task's, for its dataset's images (ValueError or DataError)."""
    return models.for_dataset(task.model, task.dataset, data_dir)


def start_trainer(data_dir: str, download: bool, device: str, threads: int, task: Task = DEFAULT_TASK) -> None:
    """Set up a training process: its thread count, the task's dataset, its model and augmentation."""
    from fl.learning.datasets import load_dataset  # noqa: PLC0415 - only the training processes need it

    torch.set_num_threads(threads)
    images, labels = load_dataset(task.dataset, data_dir, train=True, download=download,
                                  test_fraction=task.test_fraction)
    _trainer.update(images=images, labels=labels, model=task_model(task, data_dir).to(device),
                    augment=augment.for_dataset(task.dataset))


def start_pooled_trainer(worker: int, *args: Any) -> None:
    """``start_trainer`` in a pool's process, which exits once its worker is gone. The
    worker's pid comes from the worker: one killed while this process was still starting
    is no longer its parent when this runs."""

    def watch() -> None:
        while os.getppid() == worker:  # else reparented: the worker died
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="worker-watch", daemon=True).start()
    start_trainer(*args)


def fit_job(indices: torch.Tensor, client_id: int, seed: int, round_num: int, config: TrainingConfig,
            base: dict[str, torch.Tensor], attempt: int = 0) -> tuple[dict[str, torch.Tensor], Any, torch.Tensor, int]:
    """One client's training in a training process; the generator travels as its state."""
    local, result, generator, samples = fit(_trainer["model"], _trainer["images"], _trainer["labels"], indices,
                                            client_id, seed, round_num, config, base, attempt=attempt,
                                            augment=_trainer["augment"])
    return local, result, generator.get_state(), samples
