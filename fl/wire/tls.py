"""TLS contexts: confidentiality under the handshake (TLS 1.2 at least; the client checks
the server's certificate and name against its CA file), and a self-signed certificate for
a server in one command, so that name check has something to pass:

    python -m fl.wire.tls --host server.example [--host 10.0.0.5] --out tls/

writes ``tls/cert.pem`` (for ``server.py --tls-cert`` and every ``client.py --tls-ca``) and
``tls/key.pem`` (``--tls-key``, readable by its owner only) and prints the certificate's
SHA-256 fingerprint. A client checks the name it dials (``--host``) against the
certificate's subject-alternative names, so the certificate lists every name and address
clients will use.
"""
from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import ssl
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fl.common.cli import HelpFormatter


def server_tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def client_tls_context(ca: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
DNS_NAME = re.compile(rf"(?=.{{1,253}}$){LABEL}(\.{LABEL})*")


def alt_name(host: str) -> x509.GeneralName:
    """An IP address SAN for an address, a DNS name SAN for a host name; ValueError for
    anything else."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not DNS_NAME.fullmatch(host):
        raise ValueError(f"--host {host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host)


def self_signed(hosts: list[str], days: int = 365) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A P-256 key and a certificate for ``hosts`` signed by it: its own trust anchor
    (``--tls-ca``), valid from now for ``days``."""
    names = [alt_name(h) for h in hosts]
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "federated-learning server")])  # clients read the SANs
    now = datetime.datetime.now(datetime.timezone.utc)
    public = key.public_key()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def write_certificate(hosts: list[str], out: str | os.PathLike[str], days: int = 365) -> tuple[Path, Path, str]:
    """``out/cert.pem`` and ``out/key.pem`` (mode 0600 from its creation), and the
    fingerprint; FileExistsError rather than replace a key a server may be using,
    ValueError for a host that is no name or address."""
    out = Path(out)
    cert, key = self_signed(hosts, days)
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / "cert.pem", out / "key.pem"
    for path in (cert_path, key_path):
        if path.exists():
            raise FileExistsError(f"{path} exists: remove it or choose another --out")
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path, fingerprint(cert)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fl.wire.tls", description=(
        "Write a self-signed TLS certificate and key for a server: cert.pem for server.py --tls-cert and "
        "client.py --tls-ca, key.pem for --tls-key."), formatter_class=HelpFormatter)
    p.add_argument("--host", action="append", required=True, metavar="NAME",
                   help="a DNS name or IP address clients dial (their --host); repeat for each")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for cert.pem and key.pem")
    p.add_argument("--days", type=int, default=365, help="days the certificate is valid")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.days < 1:
        p.error("--days must be at least 1")
    try:
        cert, key, print_ = write_certificate(a.host, a.out, a.days)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {cert} and {key} (owner-only) for {', '.join(a.host)}\nSHA-256 fingerprint {print_}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
