"""TLS on the server: a listener beside the plain one (or instead of it), real certificates made
in the test, real clients (Python's ssl, `openssl s_client`), and what a hostile or stalled
peer on the TLS port costs everybody else: nothing."""

import datetime
import hashlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time

import pytest
from conftest import db_dicts, recv_until, wait_until

WELCOME = b"SERVER>*** Welcome to the room: "


def tls_port(server) -> int:
    server.wait_for(r"TLS on port \d+|\(TLS only\)")
    m = re.search(r"TLS on port (\d+)", server.output)
    return int(m.group(1)) if m else server.port


def server_cert_path(server):
    m = re.search(r"kept in (\S+)\): (SHA256:[0-9a-f]{64})", server.output)
    return os.path.join(m.group(1), "chatlog-tls-cert.pem"), m.group(2)


def client_identity(tmp_path, name="alice"):
    """A client's own self-signed certificate and key, as chatclient makes one; returns
    (cert path, key path, its fingerprint)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA256()))
    cp, kp = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return cp, kp, "SHA256:" + hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def tls_connect(server, port, identity=None, timeout=10):
    """A verifying TLS client: the server's self-signed certificate pinned as the only CA."""
    cert, _ = server_cert_path(server)
    ctx = ssl.create_default_context(cafile=cert)
    if identity:
        ctx.load_cert_chain(identity[0], identity[1])
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_a_1to1_chat_over_tls_is_recorded_with_its_transport(start_server, tmp_path):
    server = start_server("--tls-port", "0")
    port = tls_port(server)
    ident = client_identity(tmp_path)
    c = tls_connect(server, port, ident)
    c.sendall(b"bob>hello over tls\n")
    server.wait_for("bob>hello over tls")
    server.say("hi bob")
    assert recv_until(c, b"\n") == b"SERVER>hi bob\n"
    c.sendall(b"bob>\\quit\n")
    wait_until(lambda: db_dicts(server.db, "SELECT end_reason FROM sessions")[0]["end_reason"] == "client-quit")
    row = db_dicts(server.db, "SELECT transport, tls_version, tls_cipher, cert_fingerprint, verified FROM sessions")[0]
    assert row["transport"] == "tls" and row["tls_version"] in ("TLSv1.2", "TLSv1.3") and row["tls_cipher"]
    assert row["cert_fingerprint"] == ident[2]


def test_plain_and_tls_clients_share_one_room(start_server):
    server = start_server("--room", "--tls-port", "0")
    port = tls_port(server)
    plain = server.connect()
    assert recv_until(plain, b"\n").startswith(WELCOME)
    secure = tls_connect(server, port)
    assert recv_until(secure, b"\n").startswith(WELCOME)
    plain.sendall(b"amy>hello from plain\n")
    assert recv_until(secure, b"plain\n").endswith(b"amy>hello from plain\n")
    secure.sendall(b"tess>hello from tls\n")
    assert recv_until(plain, b"from tls\n").endswith(b"tess>hello from tls\n")
    rows = db_dicts(server.db, "SELECT handle, transport FROM participants ORDER BY id")
    assert [(r["handle"], r["transport"]) for r in rows] == [("amy", "tcp"), ("tess", "tls")]


def test_tls_only_speaks_tls_on_port_and_refuses_plain_text(start_server):
    server = start_server("--room", "--tls-only")
    server.wait_for(r"\(TLS only\)")
    plain = server.connect()
    plain.sendall(b"amy>hello\n")
    plain.settimeout(10)
    got = b""
    try:
        while chunk := plain.recv(4096):
            got += chunk
    except ConnectionResetError:
        pass
    assert b"amy" not in got and b"Welcome" not in got
    server.wait_for(r"TLS handshake with 127\.0\.0\.1 port \d+ failed: not TLS")
    secure = tls_connect(server, server.port)
    assert recv_until(secure, b"\n").startswith(WELCOME)
    assert "Traceback" not in server.stderr_text(timeout=0.1) if server.proc.poll() is not None else True


def test_plaintext_and_stalled_handshakes_harm_no_one(start_server):
    """A stalled handshake is closed after --tls-handshake-timeout; plaintext gets one console
    line; meanwhile the chat on both ports goes on."""
    server = start_server("--room", "--tls-port", "0", "--tls-handshake-timeout", "0.5")
    port = tls_port(server)
    stalled = socket.create_connection(("127.0.0.1", port))
    junk = socket.create_connection(("127.0.0.1", port))
    junk.sendall(b"GET / HTTP/1.0\r\n\r\n")
    a = server.connect()
    assert recv_until(a, b"\n").startswith(WELCOME)
    b = tls_connect(server, port)
    assert recv_until(b, b"\n").startswith(WELCOME)
    a.sendall(b"amy>still here\n")
    assert recv_until(b, b"here\n").endswith(b"amy>still here\n")
    stalled.settimeout(10)
    assert stalled.recv(100) == b""  # closed at the deadline
    server.wait_for(r"TLS handshake with 127\.0\.0\.1 port \d+ failed: no handshake within 0\.5 s")
    assert server.count("failed: not TLS") == 1
    assert "Traceback" not in server.output


def test_a_thousand_failed_handshakes_leave_no_descriptors_or_memory_behind(start_server):
    server = start_server("--room", "--tls-port", "0", "--tls-handshake-timeout", "2")
    port = tls_port(server)
    pid = server.proc.pid
    probe = tls_connect(server, port)  # warm up OpenSSL's own allocations
    assert recv_until(probe, b"\n").startswith(WELCOME)
    probe.close()
    wait_until(lambda: server.count("left") >= 1)
    before_fds, before_rss = fds(pid), rss_kb(pid)
    for i in range(1000):
        try:
            s = socket.create_connection(("127.0.0.1", port))
        except ConnectionError:
            continue  # (closed at once past 16 handshakes under way from one address)
        if i % 2:
            try:
                s.sendall(b"\x16\x03\x01\x00\x05garbage" * 3)  # a record header, then junk
            except ConnectionError:
                pass
        else:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
        s.close()
    server.wait_for(r"10 failed TLS handshakes from 127\.0\.0\.1", timeout=30)
    wait_until(lambda: fds(pid) <= before_fds, timeout=20)  # (past 16 under way from one address, closed at once)
    assert rss_kb(pid) - before_rss < 8 * 1024
    for _ in range(50):  # and it still serves (once the flood's handshakes are over)
        try:
            c = tls_connect(server, port)
            break
        except (ConnectionError, ssl.SSLEOFError):  # a refusal while the flood's last ones close
            time.sleep(0.1)
    assert recv_until(c, b"\n").startswith(WELCOME)


def test_the_self_signed_certificate_is_kept_0600_and_reused(start_server, tmp_path):
    first = start_server("--tls-port", "0")
    tls_port(first)
    cert, fp = server_cert_path(first)
    key = os.path.join(os.path.dirname(cert), "chatlog-tls-key.pem")
    assert os.stat(key).st_mode & 0o777 == 0o600
    first.signal(signal.SIGTERM)
    assert first.wait() == 0
    second = start_server("--tls-port", "0")
    tls_port(second)
    assert server_cert_path(second)[1] == fp
    assert f"./chatclient --tls --pin {fp} 127.0.0.1 " in second.output


def test_a_given_certificate_is_used_and_a_missing_key_is_one_clear_line(start_server, tmp_path):
    from conftest import run_chatlog

    cp, kp, fp = client_identity(tmp_path, "server")
    server = start_server("--tls-port", "0", "--tls-cert", str(cp), "--tls-key", str(kp))
    tls_port(server)
    assert fp in server.output and "--pin" not in server.output
    r = run_chatlog(tmp_path / "x.db", "serve", "0", "--tls-port", "0", "--tls-cert", str(cp))
    assert r.exit_code != 0 and r.stderr.strip().count("\n") == 0 and "--tls-key" in r.stderr
    r = run_chatlog(tmp_path / "x.db", "serve", "0", "--tls-port", "0", "--tls-cert", str(cp), "--tls-key", str(cp))
    assert r.exit_code != 0 and "Traceback" not in r.stderr and r.stderr.startswith("chatlog: ")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is not installed")
def test_openssl_s_client_can_chat_in_the_room(start_server):
    server = start_server("--room", "--tls-port", "0")
    port = tls_port(server)
    listener = server.connect()
    assert recv_until(listener, b"\n").startswith(WELCOME)
    p = subprocess.Popen(["openssl", "s_client", "-quiet", "-connect", f"127.0.0.1:{port}"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        p.stdin.write(b"oscar>hello from s_client\n")
        p.stdin.flush()
        assert recv_until(listener, b"s_client\n").endswith(b"oscar>hello from s_client\n")
        listener.sendall(b"lisa>hi oscar\n")
        deadline = time.time() + 10
        got = b""
        while b"lisa>hi oscar" not in got and time.time() < deadline:
            got += p.stdout.readline()
        assert b"lisa>hi oscar" in got
    finally:
        p.kill()
        p.wait()


class Ncat:
    """`ncat --ssl 127.0.0.1 PORT` (nmap's ncat) as a user runs it: lines typed on its standard
    input, what it prints read from its standard output. It does not verify the server unless
    told to (--ssl-verify), as a user of a self-signed server would run it."""

    def __init__(self, port):
        self.proc = subprocess.Popen(["ncat", "--ssl", "127.0.0.1", str(port)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out = b""

    def type(self, line: bytes):
        self.proc.stdin.write(line)
        self.proc.stdin.flush()

    def read_until(self, needle: bytes, timeout=10.0) -> bytes:
        import select

        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while needle not in self.out and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            self.out += chunk
        return self.out

    def stop(self):
        self.proc.kill()
        self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            f.close()


needs_ncat = pytest.mark.skipif(shutil.which("ncat") is None,
                                reason="ncat (nmap's, Debian package ncat) is not installed: .ci/run installs it")


@needs_ncat
def test_ncat_ssl_can_chat_in_the_room_with_a_plain_client(start_server):
    server = start_server("--room", "--tls-port", "0")
    port = tls_port(server)
    plain = server.connect()
    assert recv_until(plain, b"\n").startswith(WELCOME)
    n = Ncat(port)
    try:
        assert WELCOME in n.read_until(WELCOME)  # the handshake went through: the room greets it
        n.type(b"nora>hello from ncat\n")
        assert recv_until(plain, b"from ncat\n").endswith(b"nora>hello from ncat\n")
        plain.sendall(b"paul>hi nora\n")
        assert b"paul>hi nora\n" in n.read_until(b"paul>hi nora\n")
        row = db_dicts(server.db, "SELECT transport FROM participants WHERE handle = 'nora'")
        assert [r["transport"] for r in row] == ["tls"]
    finally:
        n.stop()


@needs_ncat
def test_ncat_ssl_can_chat_one_to_one(start_server):
    server = start_server("--tls-port", "0")
    port = tls_port(server)
    n = Ncat(port)
    try:
        n.type(b"nick>hello over ncat --ssl\n")
        server.wait_for("nick>hello over ncat --ssl")
        server.say("hi nick")
        assert b"SERVER>hi nick\n" in n.read_until(b"SERVER>hi nick\n")
        n.type(b"nick>and back again\n")
        server.wait_for("nick>and back again")
        wait_until(lambda: db_dicts(server.db, "SELECT count(*) AS n FROM messages")[0]["n"] >= 3)
        row = db_dicts(server.db, "SELECT transport FROM sessions")[0]
        assert row["transport"] == "tls"
    finally:
        n.stop()


def test_two_servers_starting_on_one_database_at_once_share_one_certificate(tmp_path):
    """Both may find no certificate and make one: the pair kept must be one pair (a lock), or
    every later start fails with a key that does not match its certificate."""
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from chatlog.tls import server_cert, server_context

    code = ("import sys; from pathlib import Path; from chatlog.tls import server_cert; "
            "print(server_cert(Path(sys.argv[1]), None, None).fingerprint)")
    for round_ in range(5):
        db = tmp_path / f"r{round_}" / "chat.db"
        db.parent.mkdir()
        with ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(lambda path: subprocess.run([sys.executable, "-c", code, path], capture_output=True,
                                                             text=True, timeout=60), [str(db)] * 4))
        assert all(o.returncode == 0 for o in outs), [o.stderr for o in outs]
        assert len({o.stdout for o in outs}) == 1
        server_context(server_cert(db, None, None))  # the key matches the certificate
