"""TLS for the server: its certificate (given, or made once and kept beside the database), the
OpenSSL context, and fingerprints.

Built on pyOpenSSL rather than Python's `ssl`: a server must accept a client's self-signed
certificate (a client's identity is its own key, not a CA's word), and `ssl` has no verify
callback, so OpenSSL would abort such a handshake on an unknown issuer. `Context.set_verify`
with a callback that accepts any certificate asks for one, verifies nothing about its issuer,
and leaves the binding of a handle to a fingerprint to the archive (`identities`).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path

HANDSHAKE_TIMEOUT = 10.0  # seconds a client has to finish the TLS handshake


class TlsSetupError(Exception):
    """A certificate or key that cannot be used, worded for the operator."""


@dataclass(frozen=True, slots=True)
class ServerCert:
    cert: Path
    key: Path
    fingerprint: str  # "SHA256:" + hex of the certificate's DER
    made: bool  # generated on this start
    handshake_timeout: float = HANDSHAKE_TIMEOUT


def fingerprint_der(der: bytes) -> str:
    return "SHA256:" + hashlib.sha256(der).hexdigest()


def default_paths(db_path: Path) -> tuple[Path, Path]:
    base = Path(db_path).resolve().parent
    return base / "chatlog-tls-cert.pem", base / "chatlog-tls-key.pem"


def server_cert(db_path: Path, cert: str | None, key: str | None,
                handshake_timeout: float = HANDSHAKE_TIMEOUT) -> ServerCert:
    """The certificate to serve: `cert` and `key` when given (both), else the one kept beside
    the database, made on first use (self-signed, EC P-256; the key file 0600)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    if (cert is None) != (key is None):
        raise TlsSetupError("--tls-cert and --tls-key go together: give both, or neither for a self-signed certificate")
    made = False
    if cert is None:
        cert_path, key_path = default_paths(db_path)
        if not cert_path.exists() or not key_path.exists():
            made = _make_once(cert_path, key_path)
    else:
        cert_path, key_path = Path(cert), Path(key)
    try:
        pem = cert_path.read_bytes()
        c = x509.load_pem_x509_certificate(pem)
    except OSError as exc:
        raise TlsSetupError(f"cannot read the certificate {cert_path}: {exc.strerror}") from None
    except ValueError:
        raise TlsSetupError(f"{cert_path} is not a PEM certificate") from None
    try:
        key_path.read_bytes()
    except OSError as exc:
        raise TlsSetupError(f"cannot read the key {key_path}: {exc.strerror}") from None
    return ServerCert(cert_path, key_path, fingerprint_der(c.public_bytes(serialization.Encoding.DER)), made,
                      handshake_timeout)


def _make_once(cert_path: Path, key_path: Path) -> bool:
    """Make the pair under a lock, so two servers starting on one database at once never keep
    one's key with the other's certificate. True if this process made it."""
    import fcntl

    lock_path = cert_path.with_name("chatlog-tls.lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise TlsSetupError(f"cannot keep a certificate beside the database ({cert_path.parent}): {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if cert_path.exists() and key_path.exists():
            return False  # the other one made it meanwhile
        _make_self_signed(cert_path, key_path)
        return True
    finally:
        os.close(fd)


def _make_self_signed(cert_path: Path, key_path: Path) -> None:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    host = socket.gethostname()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.timezone.utc)
    names = [x509.DNSName(host), x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
             x509.IPAddress(ipaddress.ip_address("::1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        cert_path.parent.mkdir(parents=True, exist_ok=True)
        tmp_key = key_path.with_suffix(".tmp")
        fd = os.open(tmp_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        os.chmod(tmp_key, 0o600)
        tmp_key.replace(key_path)  # never a half-written key under the real name
        tmp = cert_path.with_suffix(".tmp")
        tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        tmp.replace(cert_path)
    except OSError as exc:
        raise TlsSetupError(f"cannot keep a certificate beside the database ({cert_path.parent}): {exc.strerror}") from None


def server_context(sc: ServerCert):
    """An OpenSSL context for the server: TLS 1.2 or newer, the certificate and key, and a
    client certificate asked for (optional) and accepted whoever issued it."""
    from OpenSSL import SSL

    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION if hasattr(SSL, "OP_NO_RENEGOTIATION")
                    else SSL.OP_NO_COMPRESSION)
    try:
        ctx.use_certificate_chain_file(str(sc.cert))
        ctx.use_privatekey_file(str(sc.key))
        ctx.check_privatekey()
    except SSL.Error as exc:
        raise TlsSetupError(f"cannot use the certificate {sc.cert} with the key {sc.key}: {_ssl_words(exc)}") from None
    ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: True)
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)  # an idle client holds no read or write buffer (~8 KB each)
    ctx.set_session_id(b"chatlog")
    return ctx


def _ssl_words(exc) -> str:
    """An OpenSSL error as a few words (its reason strings), never a traceback."""
    try:
        parts = [str(e[2]) for e in exc.args[0] if e and e[2]]
    except (IndexError, TypeError):
        parts = []
    return "; ".join(parts) or str(exc) or exc.__class__.__name__


ssl_words = _ssl_words
