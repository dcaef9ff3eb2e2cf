"""Buffered asynchronous aggregation (FedBuff): the buffer's arithmetic against hand-computed
values, the schedule without sockets, and real server and client processes."""
from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

import pytest
import torch
from procs import Worker, client_args, expect_exit, expect_run, log_of, run, server_args, start, stop
from test_federation import body, perturbed, session

from fl import privacy, strategies
from fl.server.app import build_accountant
from fl.server.asynchronous import AsyncFederation
from fl.server.config import ServerConfig
from fl.strategies.staleness import Buffer, Stale, staleness_factor
from fl.wire.frames import decode_payload

# --- the arithmetic --------------------------------------------------------------------------


def test_polynomial_factor_is_one_over_sqrt_of_one_plus_staleness():
    # s = 0: 1; s = 3: 1/sqrt(4) = 0.5; s = 8: 1/sqrt(9) = 1/3; s = 99: 1/10
    assert staleness_factor(0) == 1.0
    assert staleness_factor(3) == 0.5
    assert staleness_factor(8) == pytest.approx(1 / 3)
    assert staleness_factor(99) == pytest.approx(0.1)
    assert staleness_factor(99, "constant") == 1.0
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError):
            staleness_factor(bad)
    with pytest.raises(ValueError, match="staleness rule"):
        staleness_factor(0, "linear")


def test_buffer_weights_are_samples_times_factor():
    buf = Buffer(size=3, version=5, rule="polynomial", weighting="samples")
    fresh = buf.admit(client_id=1, trained_from=5, samples=600)  # staleness 0: 600 x 1
    buf.add(fresh)
    stale = buf.admit(client_id=2, trained_from=2, samples=600)  # staleness 3: 600 x 1/2 = 300
    buf.add(stale)
    assert (fresh.staleness, fresh.factor, fresh.mass, fresh.weight) == (0, 1.0, 600.0, 600.0)
    assert (stale.staleness, stale.factor, stale.mass, stale.weight) == (3, 0.5, 600.0, 300.0)
    uniform = Buffer(size=2, version=8, weighting="uniform").admit(7, 0, samples=600)  # s = 8: 1/3
    assert uniform.mass == 1.0 and uniform.weight == pytest.approx(1 / 3)
    assert buf.clients == [1, 2] and buf.staleness == [0, 3] and not buf.full
    buf.add(buf.admit(3, 4, 10))
    assert buf.full
    with pytest.raises(ValueError, match="already holds"):
        buf.admit(4, 5, 10)


def test_buffer_refuses_stale_repeated_and_future_updates():
    buf = Buffer(size=4, version=10, max_staleness=2)
    buf.add(buf.admit(1, 8, 100))  # staleness 2: at the limit, taken
    with pytest.raises(Stale, match="staleness 3 .*exceeds --max-staleness 2"):
        buf.admit(2, 7, 100)
    with pytest.raises(ValueError, match="already has an update"):
        buf.admit(1, 10, 100)
    with pytest.raises(ValueError, match="newer than"):
        buf.admit(3, 11, 100)
    assert buf.clients == [1]


@pytest.mark.parametrize("settings, message", [
    (dict(mode="fast"), "--mode must be one of"),
    (dict(mode="async", concurrency=0, min_clients=3, buffer_size=2), "--concurrency and --buffer-size"),
    (dict(mode="async", min_clients=3, buffer_size=4), "--buffer-size 4 needs --min-clients >= 4"),
    (dict(mode="async", min_clients=3, buffer_size=2, fraction=0.5), "--fraction samples a synchronous round"),
    (dict(mode="async", min_clients=3, buffer_size=2, secure_aggregation=True), "cannot use --secure-aggregation"),
    (dict(mode="async", min_clients=3, buffer_size=2, dp_noise_multiplier=1.0, clip_norm=1.0),
     "--staleness-weight polynomial cannot scale updates under DP"),
    (dict(mode="async", min_clients=3, buffer_size=2, max_staleness=-1), "--max-staleness must be >= 0"),
])
def test_config_refuses_what_async_cannot_do(settings, message):
    with pytest.raises(ValueError, match=message):
        ServerConfig(**settings)


@pytest.mark.parametrize("flags, message", [
    (["--secure-aggregation"], "--mode async cannot use --secure-aggregation"),
    (["--dp-noise-multiplier", "1", "--clip-norm", "1", "--staleness-weight", "polynomial"],
     "--staleness-weight polynomial cannot scale updates under DP"),
    (["--buffer-size", "0"], "--concurrency and --buffer-size must be at least 1"),
])
def test_server_refuses_what_async_cannot_do_in_one_line(flags, message):
    r = run("server.py", "--mode", "async", "--min-clients", 3, "--buffer-size", 2, *flags, timeout=60)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("server.py: error: ") and message in last, r.stderr[-500:]


def test_config_accepts_async_settings():
    cfg = ServerConfig(mode="async", min_clients=4, buffer_size=3, concurrency=4, max_staleness=5)
    assert cfg.asynchronous and cfg.async_problem() is None
    assert not ServerConfig().asynchronous and math.isfinite(ServerConfig().round_timeout)


# --- the schedule without sockets ------------------------------------------------------------


def federation(**overrides) -> tuple[AsyncFederation, list]:
    config = ServerConfig(**{"mode": "async", "min_clients": 3, "concurrency": 3, "buffer_size": 2, "rounds": 3,
                             "round_timeout": 30.0, "norm_ratio": None, **overrides})
    torch.manual_seed(0)
    fed = AsyncFederation(config, strategies.make("fedavg"))
    sessions = [session(0, 100), session(1, 300), session(2, 50)]
    for s in sessions:
        fed.register(s)
    return fed, sessions


def sent(s):
    """The task queued to a session and its MODEL, as the transport sends it."""
    task = s.tasks.get(timeout=10)
    s.view_id = task.view_id
    return task, decode_payload(task.payload)


def floats(fed, state):
    return fed.layout.flatten(state)[0].double()


def test_a_stale_update_is_folded_with_its_weight_into_the_next_version():
    fed, (a, b, c) = federation()
    step = Worker(fed.run_round, 1)
    (ta, ma), (tb, mb), (tc, mc) = sent(a), sent(b), sent(c)
    assert sorted(m["round"] for m in (ma, mb, mc)) == [1, 2, 3] and {m["version"] for m in (ma, mb, mc)} == {0}
    local_a, local_b, local_c = (perturbed(t.base, 0.01, i) for i, t in enumerate((ta, tb, tc)))
    fed.submit(a, ta, body(local_a, 100, round_num=ta.round), 1, 1)
    fed.submit(b, tb, body(local_b, 300, round_num=tb.round), 1, 1)
    rnd = step.get(timeout=10)
    v0 = floats(fed, fed.global_state)
    assert fed.finish_round(rnd) is fed.global_state and fed.version == 1
    # FedAvg of a and b by samples, both fresh: (100 da + 300 db) / 400
    expected = v0 + (100 * (floats(fed, local_a) - v0) + 300 * (floats(fed, local_b) - v0)) / 400
    v1 = floats(fed, fed.global_state)
    assert torch.allclose(v1, expected, atol=1e-6)

    step = Worker(fed.run_round, 2)
    (ta2, ma2), (_, mb2) = sent(a), sent(b)  # the freed slots refilled with the new version
    assert {ma2["version"], mb2["version"]} == {1} and sorted([ma2["round"], mb2["round"]]) == [4, 5]
    fed.submit(c, tc, body(local_c, 50, round_num=tc.round), 1, 1)  # trained from version 0: staleness 1
    local_a2 = perturbed(ta2.base, 0.01, 7)
    fed.submit(a, ta2, body(local_a2, 100, round_num=ta2.round), 1, 1)
    rnd = step.get(timeout=10)
    fed.finish_round(rnd)
    wc, wa = 50 / 2 ** 0.5, 100.0  # 50 x (1 + 1)^-0.5 and 100 x 1, over their 150 samples
    dc, da = floats(fed, local_c) - v0, floats(fed, local_a2) - v1  # each from the model it trained from
    expected = v1 + (wc * dc + wa * da) / 150
    for e in fed._statistics:  # BatchNorm's statistics: the mean of the clients' own, by samples
        span = slice(e.offset, e.offset + e.numel)
        expected[span] = (50 * floats(fed, local_c)[span] + 100 * floats(fed, local_a2)[span]) / 150
    assert torch.allclose(floats(fed, fed.global_state), expected, atol=1e-5)
    assert rnd.extra == {"version": 2, "staleness": [1, 0], "buffer": [2, 0]}
    assert [c["weight"] for c in rnd.clients] == [pytest.approx(wc), wa]
    fed.stop.set()


def test_the_norm_screen_judges_within_the_buffer():
    fed, sessions = federation(buffer_size=3, norm_ratio=4.0)
    step = Worker(fed.run_round, 1)
    for i, s in enumerate(sessions):
        task, _ = sent(s)
        local = perturbed(task.base, 0.01, i)
        if i == 2:  # client 2 pulls 100x harder (its BatchNorm statistics left as they are)
            local = {k: task.base[k] + 100 * (v - task.base[k]) if "running" not in k and v.is_floating_point()
                     else v for k, v in local.items()}
        fed.submit(s, task, body(local, 50, round_num=task.round), 1, 1)
    rnd = step.get(timeout=10)
    assert [c["client_id"] for c in rnd.clients] == [0, 1] and [r["client_id"] for r in rnd.rejected] == [2]
    assert "median" in rnd.rejected[0]["reason"]


def test_the_8bit_broadcast_is_a_delta_from_the_view_the_client_holds():
    fed, (a, b, c) = federation(quantize_broadcast=True)
    step = Worker(fed.run_round, 1)
    tasks = {s.client_id: sent(s)[0] for s in (a, b, c)}
    for s in (a, b):
        fed.submit(s, tasks[s.client_id], body(perturbed(tasks[s.client_id].base, 0.01, s.client_id),
                                                100, round_num=tasks[s.client_id].round), 1, 1)
    fed.finish_round(step.get(timeout=10))
    step = Worker(fed.run_round, 2)
    held = a.view_id
    task, model = sent(a)  # a holds version 0's model: sent the 8-bit delta from it to version 1
    assert "state" not in model and model["base_view"] == held and model["view_id"] == task.view_id != held
    assert len(task.payload) < 0.3 * len(tasks[0].payload)
    # It trains from what it rebuilds, within half a quantization step of version 1.
    assert max((task.base[k] - fed.global_state[k]).abs().max().item()
               for k in task.base if task.base[k].is_floating_point()) < 0.01
    fed.stop.set()
    step.get(timeout=10)


def test_under_dp_each_step_clips_every_update_and_divides_by_the_buffer_size():
    config = ServerConfig(mode="async", min_clients=3, concurrency=3, buffer_size=2, norm_ratio=None,
                          dp_noise_multiplier=0.0, clip_norm=1.0, weighting="uniform", staleness_weight="constant")
    strategy = privacy.DPFixedClipping(strategies.make("fedavg"), 0.0, 1.0, torch.Generator().manual_seed(0))
    assert build_accountant(config, strategy).clients_per_round == 2  # planned: K of --dp-population
    fed = AsyncFederation(config, strategy)
    sessions = [session(0, 100), session(1, 300), session(2, 50)]
    for s in sessions:
        fed.register(s)
    step = Worker(fed.run_round, 1)
    tasks = [sent(s)[0] for s in sessions]
    v0 = floats(fed, fed.global_state)
    deltas = []
    for s, t in zip(sessions[:2], tasks):
        local = perturbed(t.base, 0.05, s.client_id)
        deltas.append(floats(fed, local) - v0)
        fed.submit(s, t, body(local, s.peer.num_samples, round_num=t.round), 1, 1)
    rnd = step.get(timeout=10)
    assert (rnd.connected, len(rnd.participants)) == (3, 2)  # what the accountant charges: K of n
    fed.finish_round(rnd)
    clipped = [d / max(1.0, float(d.norm())) for d in deltas]  # each to norm 1, whatever its samples
    got, want = floats(fed, fed.global_state), v0 + (clipped[0] + clipped[1]) / 2
    weights = [e for e in fed.layout.entries if e.name.endswith("weight")]
    assert all(torch.allclose(got[e.offset:e.offset + e.numel], want[e.offset:e.offset + e.numel], atol=1e-5)
               for e in weights)
    fed.stop.set()


def test_a_checkpoint_schedule_that_does_not_match_its_step_is_refused():
    fed, _ = federation()
    fed.start_round = 4
    fed.restore_schedule({"mode": "async", "version": 4, "dispatched": 11})
    assert (fed.version, fed.dispatched) == (4, 11)
    fed.restore_schedule(None)  # a synchronous checkpoint: one dispatch number per round it ran
    assert (fed.version, fed.dispatched) == (4, 4)
    for bad in ({"version": 3, "dispatched": 11}, {"version": 4, "dispatched": 2}, {"version": 4}):
        with pytest.raises(ValueError, match="does not match its step 4"):
            fed.restore_schedule(bad)


# --- real processes: three clients and one 20x slower -----------------------------------------

SLOW = 3  # the straggler's id


def metrics(tmp: Path) -> list[dict]:
    path = tmp / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def start_federation(tmp: Path, port: int, data: Path, rounds: int, *extra: object) -> list:
    """An async server (4 clients all training at once, buffers of 2) and clients 0-2 at full
    speed, client 3 at --speed 20; the server first."""
    server = start("server.py", *server_args(port, tmp, data, rounds, 4, "--mode", "async", "--concurrency", 4,
                                             "--buffer-size", 2, "--test-limit", 200, "--round-timeout", 60, *extra),
                   log=tmp / "server.log")
    clients = [start("client.py", *client_args(port, i, 4, data, "--limit", 100,
                                                *(["--speed", 20] if i == SLOW else [])), log=tmp / f"c{i}.log")
               for i in range(4)]
    return [server, *clients]


def wait_for(condition, tmp: Path, server, timeout: float = 240.0):
    """Poll the metrics until ``condition(records)`` holds (the timeout only guards a hang)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        records = metrics(tmp)
        if condition(records):
            return records
        assert server.poll() is None, log_of(tmp / "server.log")[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"condition not met: {metrics(tmp)[-3:]}\n{log_of(tmp / 'server.log')[-3000:]}")


def slow_update(records: list[dict]) -> tuple[dict, dict] | None:
    """The first step that folded the straggler's update, and its entry there."""
    for r in records:
        for c in r["per_client"]:
            if c["client_id"] == SLOW:
                return r, c
    return None


def test_steps_go_on_while_a_slow_client_trains_and_its_update_is_down_weighted(tmp_path, mnist_dir, free_port):
    procs = start_federation(tmp_path, free_port, mnist_dir, 100)
    server = procs[0]
    try:
        records = wait_for(lambda m: (found := slow_update(m)) is not None and len(m) >= found[0]["round"] + 1,
                           tmp_path, server)
        server.send_signal(signal.SIGTERM)  # stop after the step under way: checkpoint and exit 0
        expect_exit(server, tmp_path / "server.log", timeout=90)
    finally:
        stop(*procs)
    step, entry = slow_update(records)
    s = entry["staleness"]
    # Trained from version 0 (all four sent the first model at once); s steps were published meanwhile.
    assert entry["version"] == 0 and s == step["round"] - 1 and s >= 1
    assert [r["round"] for r in records[:s]] == list(range(1, s + 1))
    assert all(SLOW not in r["buffer"] for r in records[:s])  # those steps came from the fast clients
    assert entry["factor"] == pytest.approx((1 + s) ** -0.5)
    assert entry["weight"] == pytest.approx(entry["samples"] * (1 + s) ** -0.5)
    assert step["staleness"][step["buffer"].index(SLOW)] == s and step["version"] == step["round"]
    assert all(r["version"] == r["round"] and len(r["buffer"]) == 2 for r in records)
    assert all(c["weight"] == pytest.approx(c["samples"] * (1 + c["staleness"]) ** -0.5)
               for r in records for c in r["per_client"])

    # A resumed run continues from the checkpoint's version, its dispatches numbered after the last.
    # It ends while the straggler still sleeps off its training: it is told DONE then and exits
    # without sending what nobody would use (the run does not wait out its --round-timeout 600).
    last = metrics(tmp_path)[-1]["round"]
    procs = start_federation(tmp_path, free_port, mnist_dir, last + 2, "--resume", "--round-timeout", 600)
    try:
        expect_run(procs[0], tmp_path / "server.log", [(c, tmp_path / f"c{i}.log") for i, c in enumerate(procs[1:])],
                   timeout=180)
    finally:
        stop(*procs)
    slow_log = log_of(tmp_path / f"c{SLOW}.log")
    assert "trained, but the federation ended meanwhile: update not sent" in slow_log, slow_log[-2000:]
    assert "reconnecting" not in slow_log and "still busy" not in log_of(tmp_path / "server.log")
    resumed = metrics(tmp_path)
    assert [r["round"] for r in resumed] == list(range(1, last + 3))
    assert [r["version"] for r in resumed[last:]] == [last + 1, last + 2]
    assert all(c["version"] >= last for r in resumed[last:] for c in r["per_client"])
    assert f"resumed from {tmp_path / 'ckpt.pt'} after round {last}" in log_of(tmp_path / "server.log")


def test_an_update_past_max_staleness_is_refused_with_one_line(tmp_path, mnist_dir, free_port):
    procs = start_federation(tmp_path, free_port, mnist_dir, 100, "--max-staleness", 3)
    server = procs[0]
    refused = f"rejected update from client {SLOW}: staleness "
    try:
        wait_for(lambda m: any(SLOW in [x["client_id"] for x in r["rejected"]] for r in m), tmp_path, server)
        server.send_signal(signal.SIGTERM)
        expect_exit(server, tmp_path / "server.log", timeout=90)
    finally:
        stop(*procs)
    text = log_of(tmp_path / "server.log")
    lines = [line for line in text.splitlines() if "rejected update" in line]
    assert any(refused in line for line in lines), text[-3000:]
    assert all("exceeds --max-staleness 3" in line for line in lines)
    records = metrics(tmp_path)
    assert all(c["staleness"] <= 3 for r in records for c in r["per_client"])
    reasons = [x["reason"] for r in records for x in r["rejected"] if x["client_id"] == SLOW]
    assert reasons and all("exceeds --max-staleness 3" in x for x in reasons)
