"""plot.py: PNG output, overlays, CLI errors, and the metrics schema it relies on."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import plot
from fl.server import checkpoint

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLIENT_KEYS = {"client_id", "samples", "quantized", "bytes_up", "norm", "train_s", "loss", "accuracy"}


def record(rnd: int, accuracy: float = 0.9, loss: float = 0.3) -> dict:
    """One round as evaluator.py writes it."""
    return {
        "round": rnd, "accuracy": accuracy, "loss": loss, "clients": 2, "participants": 3, "connected": 4,
        "sampled": [0, 1, 3], "rejected": [{"client_id": 3, "reason": "update norm exceeds 4 x the median"}],
        "bytes_up": 1_687_000, "bytes_down": 5_061_000, "round_s": 12.5, "train_s_max": 10.0,
        "train_s_sum": 10.0, "overhead": 1.25, "eval_s": 0.8, "lr": 1e-3, "quantized": 1, "samples": 40_000,
        "time": 1.7e9 + rnd, "published": 1.7e9 + rnd - 0.5, "server_peak_rss_mb": 612.5,
        "per_client": [
            {"client_id": 0, "samples": 20_000, "quantized": True, "bytes_up": 421_000, "norm": 3.5,
             "train_s": 10.0, "loss": 0.31, "accuracy": 0.9},
            {"client_id": 1, "samples": 20_000, "quantized": False, "bytes_up": 1_266_000, "norm": 4.0,
             "train_s": None, "loss": None, "accuracy": None},
        ],
    }


def write_run(path: Path, accs: tuple[float, ...] = (0.91, 0.95, 0.97)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    for i, acc in enumerate(accs, 1):
        checkpoint.append_metrics(path, record(i, acc, 1.0 - acc))
    return path


def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_SIGNATURE


def test_single_run_writes_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "out" / "curve.png"
    assert plot.main([str(write_run(tmp_path / "metrics.jsonl")), "-o", str(out), "--title", "t"]) == 0
    assert is_png(out)
    assert str(out) in capsys.readouterr().out


def test_overlay_with_labels(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    a = write_run(tmp_path / "float" / "metrics.jsonl")
    b = write_run(tmp_path / "q8" / "metrics.jsonl", (0.9, 0.94, 0.96))
    out = tmp_path / "cmp.png"
    assert plot.main([str(a), str(b), "--labels", "float", "8-bit", "-o", str(out)]) == 0
    assert is_png(out)
    assert plot.default_label(a) == "float/metrics"


def test_plot_metrics_api(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = plot.plot_metrics([("run", [record(1), record(2)])], tmp_path / "api.png")
    assert out == tmp_path / "api.png" and is_png(out)


def test_label_count_mismatch_exits_2(tmp_path: Path) -> None:
    run = write_run(tmp_path / "metrics.jsonl")
    with pytest.raises(SystemExit) as exc:
        plot.main([str(run), "--labels", "a", "b", "-o", str(tmp_path / "x.png")])
    assert exc.value.code == 2


@pytest.mark.parametrize("content", [None, "", "not json\n", '{"round": 1}\n'])
def test_bad_metrics_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None) -> None:
    path = tmp_path / "metrics.jsonl"
    if content is not None:
        path.write_text(content)
    assert plot.main([str(path), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


def test_missing_matplotlib_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert plot.main([str(write_run(tmp_path / "metrics.jsonl")), "-o", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err == "error: plotting needs matplotlib: pip install matplotlib\n"


def test_metrics_round_trip_keeps_keys_and_types(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    written = [record(1), record(2)]
    for r in written:
        checkpoint.append_metrics(path, r)
    read = checkpoint.read_metrics(path)
    assert read == written
    for before, after in zip(written, read):
        assert list(after) == list(before)
        for key in before:
            assert type(after[key]) is type(before[key]), key
        for c_before, c_after in zip(before["per_client"], after["per_client"]):
            assert set(c_after) == CLIENT_KEYS
            assert {k: type(v) for k, v in c_after.items()} == {k: type(v) for k, v in c_before.items()}
    assert plot.load_run(path) == written


def test_schema_matches_server_record() -> None:
    """The record above must keep the keys the server actually writes, or these tests prove nothing."""
    root = Path(__file__).resolve().parent.parent
    sources = ("fl/server/evaluator.py", "fl/server/federation.py", "fl/server/contribution.py")
    tree = ast.parse("\n".join((root / name).read_text() for name in sources))
    # a ``**extra`` entry has no key (None): the asynchronous schedule's fields, not in a plain round's record
    key_sets = [{k.value for k in node.keys if k is not None} for node in ast.walk(tree) if isinstance(node, ast.Dict)
                and node.keys and all(k is None or isinstance(k, ast.Constant) and isinstance(k.value, str)
                                      for k in node.keys)]
    assert set(record(1)) in key_sets
    assert CLIENT_KEYS in key_sets


def test_a_private_run_gets_an_epsilon_panel(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    records = [{**record(i), "epsilon": 0.5 * i, "delta": 1e-5} for i in (1, 2, 3)]
    plain = plot.plot_metrics([("plain", [record(i) for i in (1, 2, 3)])], tmp_path / "plain.png")
    private = plot.plot_metrics([("dp", records)], tmp_path / "dp.png")
    from matplotlib.image import imread
    assert imread(private).shape[1] > imread(plain).shape[1] * 1.3  # a third panel
