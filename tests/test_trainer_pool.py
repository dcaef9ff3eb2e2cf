"""trainer_pool.TrainerPool: clients trained on other processes, whichever is free, send
exactly the updates they would send training in the worker itself."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from procs import start, stop, wait_for_line
from test_worker import model_msg, serve_one

from fl.client import participant
from fl.client.config import ClientConfig
from fl.client.host import Host
from fl.client.trainer_pool import TrainerPool
from fl.learning.config import TrainingConfig
from fl.learning.data import load_mnist
from fl.learning.model import ImprovedCNN

TESTS = Path(__file__).resolve().parent


def updates_of(host: Host, clients: dict[int, ClientConfig], state: dict,
               concurrently: bool) -> dict[int, list[dict]]:
    """Each client's UPDATE bodies for two rounds (the second an 8-bit broadcast-free MODEL)."""
    out: dict[int, list[dict]] = {}

    def one(cid: int) -> None:
        p = participant.Participant(cid, host, clients[cid], indices=torch.arange(cid, 60, len(clients)))
        out[cid], _ = serve_one(p, [model_msg(1, state, 1), model_msg(2, state, 2, epochs=2)])

    threads = [threading.Thread(target=one, args=(cid,)) for cid in clients]
    for t in threads:
        t.start()
        if not concurrently:
            t.join()
    for t in threads:
        t.join()
    return out


def test_pooled_clients_send_the_updates_they_would_train_locally(synthetic_mnist_dir):
    images, labels = load_mnist(synthetic_mnist_dir, train=True, download=False)
    state = {k: v.clone() for k, v in ImprovedCNN().state_dict().items()}
    clients = {0: ClientConfig(seed=3, progress=False),
               1: ClientConfig(seed=3, progress=False, quantization=True, stochastic_rounding=True),
               2: ClientConfig(seed=3, progress=False)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the pool's processes: another thread count sums in another order
    try:
        local = updates_of(Host(images, labels, torch.device("cpu")), clients, state, concurrently=False)
    finally:
        torch.set_num_threads(threads)
    pool = TrainerPool(2, str(synthetic_mnist_dir), False, torch.device("cpu"))
    try:
        pooled = updates_of(pool, clients, state, concurrently=True)  # three clients on two processes
        pids = set(pool.executor.submit(_pid).result() for _ in range(8))
    finally:
        pool.close()
    assert len(pids) >= 1 and all(pid != _pid() for pid in pids)  # trained elsewhere
    for cid in clients:
        for got, want in zip(pooled[cid], local[cid], strict=True):
            assert got["num_samples"] == want["num_samples"] == 20
            # 8-bit with stochastic rounding draws from the generator the training left behind
            assert got["quantized"] == (cid == 1) and same(got, want)
    assert not torch.equal(pooled[0][0]["flat"]["float"], pooled[2][0]["flat"]["float"])  # distinct clients


def test_a_pool_whose_processes_cannot_load_the_data_fails_at_once(tmp_path):
    with pytest.raises(RuntimeError, match="training process failed to start"):
        TrainerPool(2, str(tmp_path / "no-mnist-here"), False, torch.device("cpu"))


def test_a_pool_holds_one_slot_per_process():
    pool = TrainerPool.__new__(TrainerPool)
    Host.__init__(pool, None, None, torch.device("cpu"), slots=2)
    assert pool.lock.acquire(blocking=False) and pool.lock.acquire(blocking=False)
    assert not pool.lock.acquire(blocking=False)  # a third client waits for a free process


def test_no_model_is_moved_to_shared_memory_while_other_threads_read_it(synthetic_mnist_dir, tmp_path):
    """Each round a participant publishes a new model and trains it on the pool while the
    other participants compare theirs with it (on the training thread, as ``ViewCache``
    does) and read it on their own threads (as secure aggregation's flatten does). With a
    fixed mmap threshold glibc unmaps every freed model-sized buffer at once, so a buffer
    freed under a reader faults (SIGSEGV) instead of being read stale."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536",
           "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    code = f"import test_trainer_pool as t; t.stress({str(synthetic_mnist_dir)!r}, rounds=20)"
    out = tmp_path / "stress.log"
    with out.open("w") as log:  # a file, not a pipe: a crashed run's training process would hold a pipe open
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=TESTS, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            status = proc.wait(timeout=300)
        finally:  # a crashed run leaves its training process behind: end the session it started
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    text = out.read_text()
    assert status == 0, f"exit status {status}: {text[-2000:]}"
    assert text.strip().splitlines()[-1] == "20 rounds"


class _Client:
    client_id, indices, config = 0, torch.arange(8), ClientConfig(seed=1, progress=False)


def stress(data_dir: str, rounds: int) -> None:
    """Publish and train a new model each round under readers of it (run in its own process)."""
    pool = TrainerPool(1, data_dir, False, torch.device("cpu"))
    state = ImprovedCNN().state_dict()
    config = TrainingConfig(epochs=1, batch_size=8)
    wrong: list[str] = []
    try:
        for r in range(rounds):
            base = pool.compute(pool.views.share, r, {k: v.clone() for k, v in state.items()})
            copy = {k: v.clone() for k, v in state.items()}
            done = threading.Event()

            def compare(r: int = r, copy: dict = copy, base: dict = base) -> None:  # another participant
                while not done.is_set():
                    if pool.compute(pool.views.share, r, copy) is not base:
                        wrong.append(f"round {r}: an equal model was not recognised")

            def read(base: dict = base) -> None:  # a participant's own thread reading the model
                while not done.is_set():
                    if not all(torch.equal(base[k], state[k]) for k in state):
                        wrong.append(f"round {r}: the model read differs from the one published")

            readers = [threading.Thread(target=compare), threading.Thread(target=read)]
            for t in readers:
                t.start()
            pool.fit(_Client, r, config, base)
            done.set()
            for t in readers:
                t.join()
    finally:
        pool.close()
    print(wrong[0] if wrong else f"{rounds} rounds")


def same(a: object, b: object) -> bool:
    """Equal structure and values, tensors bit for bit (metrics' times aside)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a if k not in ("train_s", "samples_per_s"))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def _pid() -> int:
    import os

    return os.getpid()


def _state_and_parent(stat: Path) -> tuple[str, int] | None:
    """(state, ppid) from /proc/<pid>/stat; None once the process is gone."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def children_of(pid: int) -> set[int]:
    """Live processes whose parent is ``pid`` (zombies count as gone)."""
    return {int(stat.parent.name) for stat in Path("/proc").glob("[0-9]*/stat")
            if (sp := _state_and_parent(stat)) is not None and sp[1] == pid and sp[0] != "Z"}


def alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if (sp := _state_and_parent(Path(f"/proc/{pid}/stat"))) is not None and sp[0] != "Z"}


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_or_killed_worker_leaves_no_training_process_behind(sig, synthetic_mnist_dir, free_port, tmp_path):
    """Stopped by the launcher (SIGTERM) the worker shuts its pool down; killed outright
    (SIGKILL) its training processes see their parent gone and exit. Before, each kept
    ~0.8 GB (torch and the dataset) until the machine restarted."""
    log = tmp_path / "worker.log"
    worker = start("worker.py", "--client-ids", 0, "--num-clients", 1, "--port", free_port, "--trainers", 2,
                   "--data-dir", synthetic_mnist_dir, "--no-download", "--no-progress", "--connect-timeout", 300,
                   log=log)  # nobody listens on the port: it waits for a server with its pool started
    trainers: set[int] = set()
    try:
        wait_for_line(log, "training on 2 processes", timeout=120, proc=worker)
        trainers = children_of(worker.pid)
        assert len(trainers) >= 2, trainers  # the two training processes (and spawn's resource tracker)
        worker.send_signal(sig)
        worker.wait(timeout=60)
        end = time.monotonic() + 60
        while alive(trainers) and time.monotonic() < end:
            time.sleep(0.2)
        assert not alive(trainers), f"left behind: {alive(trainers)}"
    finally:
        stop(worker)
        for pid in alive(trainers):
            os.kill(pid, signal.SIGKILL)
