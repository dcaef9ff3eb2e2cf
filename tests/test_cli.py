"""The command lines tell the truth and keep runs apart: one default per flag in every
``--help``, a TLS certificate in one command that a real client accepts (and refuses for
another name), simulate.py's secret read like the server's, and a run that will not
replace a previous run's files unless told to."""
from __future__ import annotations

import argparse
import importlib.util
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from procs import REPO, client_args, env, expect_exit, log_of, run, server_args, start, stop, wait_for_line

import simulate
from fl.server.outputs import OutputsError, check_outputs
from fl.wire.credentials import CredentialError


def make_cli():
    spec = importlib.util.spec_from_file_location("make_cli", REPO / "docs" / "make_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- --help: one default per flag -------------------------------------------------------------

def help_texts() -> dict[str, str]:
    """Every flag of every command, as its --help line reads (the default included)."""
    texts = {}
    for command, parser in make_cli().parsers().items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.help and action.help != argparse.SUPPRESS:
                texts[f"{command} {'/'.join(action.option_strings) or action.dest}"] = formatter._expand_help(action)
    return texts


def test_no_help_line_states_two_defaults():
    texts = help_texts()
    assert len(texts) > 150  # every command's flags were read
    twice = [f"{flag}: {text}" for flag, text in texts.items() if text.count("default") > 1]
    assert not twice, "\n".join(twice)


def test_help_shows_the_default_the_command_uses():
    texts = help_texts()
    assert texts["python worker.py --threads"].endswith("(default: 1)")  # set_defaults, not client.py's
    assert texts["python client.py --threads"].endswith("(default: torch's choice)")
    assert texts["python server.py --rounds"].endswith("(default: 3)")
    assert "(default: None)" not in "\n".join(texts.values())
    assert "weight x delta norm" in texts["python server.py --norm-ratio"]


# --- a certificate in one command -------------------------------------------------------------

def tls_command(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fl.wire.tls", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=env())


def make_cert(folder: Path, *hosts: str) -> tuple[Path, Path, str]:
    r = tls_command(*(a for h in hosts for a in ("--host", h)), "--out", folder)
    assert r.returncode == 0, r.stderr
    return folder / "cert.pem", folder / "key.pem", r.stdout


def test_the_certificate_names_every_host_and_only_its_owner_reads_the_key(tmp_path):
    cert, key, out = make_cert(tmp_path / "tls", "server.example", "10.0.0.5", "::1")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    sans = loaded.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["server.example"]
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5", "::1"]
    assert loaded.fingerprint(hashes.SHA256()).hex(":").upper() in out
    again = tls_command("--host", "server.example", "--out", tmp_path / "tls")
    assert again.returncode == 2 and again.stderr.strip() == f"error: {cert} exists: remove it or choose another --out"


@pytest.mark.parametrize("host", ["", "a b", "x..y"])
def test_a_host_that_is_no_name_is_one_line(tmp_path, host):
    r = tls_command("--host", host, "--out", tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == f"error: --host {host!r} is neither an IP address nor a DNS name"
    assert not (tmp_path / "key.pem").exists()


def test_a_client_trusts_the_certificate_for_its_host_and_refuses_another(tmp_path, synthetic_mnist_dir, free_port):
    """A real server with the command's certificate, a real client with --tls-ca: one
    round completes; a certificate for another name is refused by the client in one line."""
    good, good_key, _ = make_cert(tmp_path / "good", "127.0.0.1", "localhost")
    other, other_key, _ = make_cert(tmp_path / "other", "server.example")
    data = synthetic_mnist_dir
    for name, cert, key in (("good", good, good_key), ("other", other, other_key)):
        slog, clog = tmp_path / f"server-{name}.log", tmp_path / f"client-{name}.log"
        server = start("server.py", *server_args(free_port, tmp_path / name, data, 1, 1, "--tls-cert", cert,
                                                 "--tls-key", key, "--test-limit", 100), log=slog)
        client = None
        try:
            wait_for_line(slog, "listening on", proc=server)
            client = start("client.py", *client_args(free_port, 0, 1, data, "--tls-ca", cert, "--limit", 50,
                                                      "--connect-timeout", 5), log=clog)
            if name == "good":
                expect_exit(server, slog, timeout=120)
                expect_exit(client, clog, timeout=30)
            else:
                expect_exit(client, clog, timeout=60, code=1)
        finally:
            stop(server, *([client] if client else []))
    assert "(TLS)" in log_of(tmp_path / "server-good.log")
    errors = [line for line in log_of(tmp_path / "client-other.log").splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "certificate is not valid for '127.0.0.1'" in errors[0], errors


# --- simulate.py's secret, read as the server reads it -----------------------------------------

def launcher_secret(*argv: str) -> str:
    args, _ = simulate.parse_args(list(argv))
    return simulate.run_secret(args)


def test_simulate_takes_the_secret_from_the_environment_or_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FL_SECRET", "from-the-environment")
    assert launcher_secret() == "from-the-environment"
    path = tmp_path / "secret"
    path.write_text("from-a-file\n")
    path.chmod(0o600)
    assert launcher_secret("--secret-file", str(path)) == "from-a-file"
    monkeypatch.delenv("FL_SECRET")
    first, second = launcher_secret(), launcher_secret()
    assert len(first) == 32 and first != second  # fresh for each run
    with pytest.raises(CredentialError, match="cannot read secret file"):
        launcher_secret("--secret-file", str(tmp_path / "missing"))


def test_simulate_with_an_unreadable_secret_file_is_one_line(tmp_path):
    r = run("simulate.py", "--secret-file", tmp_path / "missing", "--out", tmp_path / "run")
    assert r.returncode == 2 and r.stderr.strip().startswith("error: cannot read secret file"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# --- a run does not replace a previous one by surprise -----------------------------------------

def test_check_outputs(tmp_path):
    ckpt, metrics = tmp_path / "checkpoint.pt", tmp_path / "metrics.jsonl"
    check_outputs(ckpt, metrics, resume=False, overwrite=False)  # a fresh folder
    metrics.write_text("")
    check_outputs(ckpt, metrics, resume=False, overwrite=False)  # an empty file holds nothing
    metrics.write_text('{"round": 1}\n')
    with pytest.raises(OutputsError, match=r"a previous run's files are here \(.*metrics.jsonl\): --resume"):
        check_outputs(ckpt, metrics, resume=False, overwrite=False)
    check_outputs(ckpt, metrics, resume=True, overwrite=False)
    check_outputs(ckpt, metrics, resume=False, overwrite=True)
    with pytest.raises(OutputsError, match="give one"):
        check_outputs(ckpt, metrics, resume=True, overwrite=True)


def test_server_refuses_a_previous_runs_files_in_one_line(tmp_path, synthetic_mnist_dir, free_port):
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n')
    before = (tmp_path / "metrics.jsonl").read_text()
    r = run("server.py", *server_args(free_port, tmp_path, synthetic_mnist_dir), timeout=60)
    errors = [line for line in (r.stdout + r.stderr).splitlines() if "ERROR" in line]
    assert r.returncode == 2 and len(errors) == 1 and "previous run's files are here" in errors[0], errors
    assert (tmp_path / "metrics.jsonl").read_text() == before  # untouched
    r = run("server.py", *server_args(free_port, tmp_path, synthetic_mnist_dir, 1, 1, "--overwrite",
                                      "--resume"), timeout=60)
    assert r.returncode == 2 and "--resume continues the previous run and --overwrite replaces it" in r.stdout + r.stderr


def test_simulate_refuses_a_previous_runs_folder_before_starting_anything(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"x")
    r = run("simulate.py", "--out", out, "--data-dir", tmp_path / "nowhere")  # refused before the data check
    assert r.returncode == 2 and r.stderr.strip() == (f"error: a previous run's files are here ({out / 'checkpoint.pt'}): "
                                                      "--resume to continue it, --overwrite to start afresh, or write "
                                                      "elsewhere")
    r = run("simulate.py", "--resume")
    assert r.returncode == 2 and "--resume needs --out" in r.stderr


def test_simulate_passes_resume_and_overwrite_to_the_server():
    args, extra = simulate.parse_args(["--out", "runs/a", "--resume"])
    server, _ = simulate.build_commands(args, extra, 9999, Path("runs/a"), cores=2)
    assert "--resume" in server and "--overwrite" not in server
    args, extra = simulate.parse_args(["--overwrite"])
    server, _ = simulate.build_commands(args, extra, 9999, Path("runs/a"), cores=2)
    assert "--overwrite" in server and "--resume" not in server


def test_make_cli_check_sees_a_stale_page(tmp_path, monkeypatch):
    module = make_cli()
    monkeypatch.setattr(module, "PAGE", tmp_path / "cli.md")
    (tmp_path / "cli.md").write_text("# stale\n")
    assert module.main(["--check"]) == 1
    assert module.main([]) == 0 and module.main(["--check"]) == 0

