"""Evaluate, checkpoint and log finished rounds on a background thread, in order, so the
next round's training is not held up by the test set.

Under DP a round's record keeps only :data:`DP_RECORD_KEYS`: what it says of the clients is
counted over the round (how many were connected, sampled, accepted; bytes), never per
client, since nothing of it is noised."""
from __future__ import annotations

import logging
import queue
import resource
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm import tqdm

from fl.learning.model import ImprovedCNN
from fl.learning.training import evaluate
from fl.server import checkpoint as ckpt
from fl.server.config import ServerConfig
from fl.server.federation import RoundState
from fl.server.tensorboard import RoundScalars
from fl.wire.frames import MIB

log = logging.getLogger("server")

# The fields of a round's record that are released under DP (metrics file, checkpoint,
# log): counts, the server's own timings and the test scores of the noised model. Left out:
# ``per_client`` (each update's norm, loss, accuracy, sample count), the sampled ids (the
# accountant's amplification assumes nobody knows them), rejection reasons, the summed
# sample counts and clients' training times.
DP_RECORD_KEYS = ("round", "accuracy", "loss", "clients", "participants", "connected", "bytes_up", "bytes_down",
                  "round_s", "eval_s", "lr", "time", "published", "server_peak_rss_mb", "version",
                  "staleness")


@dataclass
class Finished:
    """A committed round and what the checkpoint needs of the moment it was committed."""

    round: RoundState
    state: dict[str, torch.Tensor]
    strategy_state: dict[str, Any]  # a snapshot: the strategy steps on in the main thread
    extra: dict[str, Any] = field(default_factory=dict)  # more keys for the record (epsilon, delta)
    privacy: dict[str, Any] | None = None  # the accountant's state after this round (DP only)
    schedule: dict[str, Any] | None = None  # the asynchronous schedule's version and dispatch count


def round_record(rnd: RoundState, loss: float, accuracy: float, eval_s: float, dp: bool) -> dict[str, Any]:
    """One line of the metrics file; under ``dp`` only its :data:`DP_RECORD_KEYS`."""
    slowest = max((c["train_s"] for c in rnd.clients if c["train_s"] is not None), default=None)
    record = {
        "round": rnd.number, "accuracy": accuracy, "loss": loss, "clients": len(rnd.clients),
        "participants": len(rnd.participants), "connected": rnd.connected,
        "sampled": sorted(rnd.participants), "rejected": rnd.rejected,
        "bytes_up": rnd.bytes_up, "bytes_down": rnd.bytes_down,
        "round_s": rnd.seconds, "train_s_max": slowest,
        "train_s_sum": sum(c["train_s"] for c in rnd.clients if c["train_s"] is not None),
        "overhead": rnd.seconds / slowest if slowest else None, "eval_s": eval_s,
        "lr": rnd.lr, "quantized": sum(c["quantized"] for c in rnd.clients),
        "samples": sum(c["samples"] for c in rnd.clients), "time": time.time(), "published": rnd.published,
        "server_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "per_client": sorted(rnd.clients, key=lambda c: c["client_id"]), **rnd.extra,
    }
    return {k: record[k] for k in DP_RECORD_KEYS if k in record} if dp else record


class Evaluator:
    def __init__(self, config: ServerConfig, test_set: tuple[torch.Tensor, torch.Tensor], history: ckpt.History,
                 bar: tqdm, on_failure: Callable[[], None]) -> None:
        self.config, self.history, self.bar, self.on_failure = config, history, bar, on_failure
        self.test_images, self.test_labels = test_set
        self.model = ImprovedCNN()
        self.reached: tuple[int, float] | None = None  # (round, accuracy %) that met --target-accuracy
        first = history[-1]["round"] + 1 if history else 1
        self.scalars = RoundScalars(config.tensorboard, first) if config.tensorboard else None
        self.jobs: "queue.Queue[Finished | None]" = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="evaluator", daemon=True)
        self.thread.start()

    def submit(self, job: Finished) -> None:
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()
        if self.scalars is not None:
            self.scalars.close()

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                self._finish(job)
            except Exception:  # a full disk must not kill the federation silently
                log.exception("round %d: could not evaluate/checkpoint", job.round.number)
                self.on_failure()

    def _finish(self, job: Finished) -> None:
        cfg, rnd = self.config, job.round
        t0 = time.monotonic()
        self.model.load_state_dict(job.state)
        loss, accuracy = evaluate(self.model, self.test_images, self.test_labels)
        record = {**round_record(rnd, loss, accuracy, time.monotonic() - t0, cfg.dp), **job.extra}
        self.history.append(record)
        if cfg.target_accuracy is not None and accuracy >= cfg.target_accuracy and self.reached is None:
            self.reached = (rnd.number, 100 * accuracy)
        ckpt.save(cfg.checkpoint, job.state, rnd.number, self.history, cfg.public(), strategy=job.strategy_state,
                  privacy=job.privacy, schedule=job.schedule)
        ckpt.append_metrics(cfg.metrics, record)
        if self.scalars is not None:
            self.scalars.write(record)
        rejected = f" | {len(rnd.rejected)} rejected" if rnd.rejected else ""
        if "epsilon" in record:
            rejected += f" | epsilon {record['epsilon']:.3f}"
        log.info("%s %d/%d: accuracy %.2f%% loss %.4f | %d of %d clients%s | up %.2f MB down %.2f MB | %.1f s",
                 "step" if cfg.asynchronous else "round", rnd.number, cfg.rounds, 100 * accuracy, loss,
                 record["clients"], rnd.connected, rejected, rnd.bytes_up / 1e6, rnd.bytes_down / 1e6, rnd.seconds)
        self.bar.set_postfix(acc=f"{accuracy:.2%}", loss=f"{loss:.4f}", clients=record["clients"],
                             MB=f"{sum(m['bytes_up'] + m['bytes_down'] for m in self.history) / 1e6:.1f}")
        self.bar.update(1)


def summary(history: ckpt.History, elapsed: float, config: ServerConfig) -> str:
    """The table printed at the end of a run."""
    if not history:
        return "no round completed"
    best = max(history, key=lambda m: m["accuracy"])
    up = sum(m["bytes_up"] for m in history) / MIB
    down = sum(m["bytes_down"] for m in history) / MIB
    rows = [("rounds", f"{history[-1]['round']}"),
            ("strategy", config.strategy + (" with DP" if config.dp else "")),
            ("final accuracy", f"{history[-1]['accuracy']:.2%} (loss {history[-1]['loss']:.4f})"),
            ("best accuracy", f"{best['accuracy']:.2%} (round {best['round']})"),
            ("bytes up / down", f"{up:.1f} MiB / {down:.1f} MiB"),
            ("time", f"{elapsed:.1f} s"),
            *([("privacy", f"epsilon {history[-1]['epsilon']:.3f} at delta {history[-1]['delta']:.3g}")]
              if "epsilon" in history[-1] else []),
            ("checkpoint", str(config.checkpoint)), ("metrics", str(config.metrics))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
