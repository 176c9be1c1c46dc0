"""./chatclient --tls against TLS servers made in the test, with certificates made in the test.

Every certificate here is real (trustme CAs, or a self-signed one from `cryptography`); the
servers are Python's ssl module on loopback, one connection each (several on one listener when
a test needs the same host:port twice, as known_hosts does). Each test has its own config
directory (XDG_CONFIG_HOME), so identities and known_hosts never leak between tests.
"""

import datetime
import hashlib
import os
import random
import signal
import socket
import ssl
import stat
import subprocess
import threading
import time
from pathlib import Path

import pexpect
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fakeserver import Peer

# -- certificates --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ca():
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca, tmp_path_factory):
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture(scope="session")
def good_ctx(ca):
    return server_ctx(ca.issue_cert("localhost", "127.0.0.1"))


def server_ctx(leaf):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf.configure_cert(ctx)
    return ctx


class SelfSigned:
    """A self-signed certificate for localhost, as `chatlog serve` makes for itself."""

    def __init__(self, tmp_path, name="server"):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256())
        )
        self.fingerprint = cert.fingerprint(hashes.SHA256()).hex()
        self.pem = tmp_path / f"{name}.pem"
        self.pem.write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
            + cert.public_bytes(serialization.Encoding.PEM)
        )

    def ctx(self):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.pem))
        return ctx


# -- a scripted TLS server -----------------------------------------------------------------------


def listener():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(4)
    return s


class TLSServer:
    """Accepts one client on `sock` (a fresh listener unless given) and, with a context, does
    the server's handshake, then runs `script(peer)`; with `raw`, runs `raw(conn)` on the bare
    TCP connection instead. A failed handshake is kept in .handshake_error, not raised."""

    def __init__(self, ctx=None, script=None, raw=None, sock=None):
        self.sock = sock or listener()
        self.own = sock is None
        self.port = self.sock.getsockname()[1]
        self.received = b""
        self.error = self.handshake_error = self.peer_cert = None
        self.ctx, self.script, self.raw = ctx, script, raw
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            conn, _ = self.sock.accept()
            conn.settimeout(20)
            with conn:
                if self.raw:
                    self.raw(conn)
                    return
                try:
                    tconn = self.ctx.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError) as exc:
                    self.handshake_error = exc
                    return
                self.peer_cert = tconn.getpeercert(binary_form=True)
                if self.script:
                    self.script(Peer(self, tconn))
        except Exception as exc:  # noqa: BLE001 (reported by join)
            self.error = exc
        finally:
            if self.own:
                self.sock.close()

    def join(self, timeout=20):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the server thread is still running"
        if self.error:
            raise self.error


def chat_script(peer):
    peer.expect(b"hello\n\0")
    peer.send(b"SERVER>hi over tls\n")
    peer.expect(b"\\quit\n\0")


@pytest.fixture
def cfg(tmp_path):
    """The client's environment: its own config directory (and HOME) under tmp_path."""
    env = dict(os.environ, TERM="xterm", HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "config"))
    env.pop("SSL_CERT_FILE", None)
    env.pop("SSL_CERT_DIR", None)
    return env


def cfg_dir(env):
    return Path(env["XDG_CONFIG_HOME"]) / "chatlog"


def run_piped(chatclient, port, *args, env, host="localhost", stdin=b"bob\nhello\n", timeout=30):
    return subprocess.run([str(chatclient), "--tls", *args, host, str(port)], input=stdin,
                          capture_output=True, timeout=timeout, env=env)


def spawn(chatclient, port, *args, env, host="localhost"):
    return pexpect.spawn(str(chatclient), ["--tls", *args, host, str(port)], env=env, encoding="utf-8",
                         timeout=10)


def one_line_refusal(r, *needles):
    """Refused: exit 1, nothing on stdout past the first line, one line on stderr saying why."""
    err = r.stderr.decode()
    assert r.returncode == 1, (r.returncode, err)
    assert err.count("\n") == 1 and err.startswith("chatclient: "), err
    for needle in needles:
        assert needle in err, err
    assert "What would you like your chat handle" not in r.stdout.decode()
    return err


# -- chatting over TLS ---------------------------------------------------------------------------


def test_a_chat_over_tls_at_a_terminal_both_ways(chatclient, ca_file, good_ctx, cfg):
    srv = TLSServer(good_ctx, chat_script)
    p = spawn(chatclient, srv.port, "--ca", ca_file, env=cfg)
    p.expect_exact("Made your TLS identity")
    p.expect_exact(f"Connecting to localhost port {srv.port}")
    p.expect_exact("What would you like your chat handle to be> ")
    p.sendline("brandon")
    p.expect_exact("brandon>")
    p.sendline("hello")
    p.expect_exact("SERVER>hi over tls")
    p.expect_exact("brandon>")
    p.sendline("\\quit")
    p.expect_exact("You left the chat.")
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0
    srv.join()
    assert srv.received == b"brandon>hello\n\0brandon>\\quit\n\0"


def test_piped_chat_over_tls_to_an_ip_address(chatclient, ca_file, good_ctx, cfg):
    srv = TLSServer(good_ctx, chat_script)
    r = run_piped(chatclient, srv.port, "--ca", ca_file, env=cfg, host="127.0.0.1", stdin=b"bob\nhello\n")
    srv.join()
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr
    assert "SERVER>hi over tls" in out and out.rstrip().endswith("You left the chat.")
    assert srv.received == b"bob>hello\n\0bob>\\quit\n\0"


def test_the_system_ca_store_is_used_without_ca(chatclient, ca_file, good_ctx, cfg):
    # OpenSSL's default verify paths honour SSL_CERT_FILE: the private CA stands in for the system's.
    srv = TLSServer(good_ctx, chat_script)
    r = run_piped(chatclient, srv.port, env=dict(cfg, SSL_CERT_FILE=ca_file))
    srv.join()
    assert r.returncode == 0, r.stderr
    assert b"SERVER>hi over tls" in r.stdout


def test_many_lines_held_by_openssl_are_all_shown(chatclient, ca_file, good_ctx, cfg):
    # One sendall of 2,000 lines: OpenSSL reads ahead, so most arrive without waking poll().
    def script(peer):
        peer.expect(b"hello\n\0")
        peer.send(b"".join(b"SERVER>line %d\n" % i for i in range(2000)))
        peer.expect(b"\\quit\n\0")

    srv = TLSServer(good_ctx, script)
    p = spawn(chatclient, srv.port, "--ca", ca_file, "--no-identity", env=cfg)
    p.expect_exact("What would you like your chat handle to be> ")
    p.sendline("bob")
    p.expect_exact("bob>")
    p.sendline("hello")
    p.expect_exact("SERVER>line 1999\r\n")
    p.sendline("\\quit")
    p.expect(pexpect.EOF)
    srv.join()


def _unread(conn):
    import fcntl
    import termios

    return int.from_bytes(fcntl.ioctl(conn.fileno(), termios.FIONREAD, b"\0\0\0\0"), "little")


def test_sigterm_ends_a_client_blocked_writing_to_a_tls_server_that_does_not_read(chatclient, ca_file,
                                                                                   good_ctx, cfg):
    """In a room lines go out as typed; a TLS server that stops reading leaves SSL_write wanting
    to write. SIGTERM must still end the client at once, with its final line."""
    release, full = threading.Event(), threading.Event()

    def script(peer):
        peer.conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        peer.send(b"ROOM>*** Welcome to the room: 2 here. Type at any time.\n")
        last, stable_since = -1, time.monotonic()
        while not release.is_set():  # never reads; says when the client can send no more
            n = _unread(peer.conn)
            if n != last:
                last, stable_since = n, time.monotonic()
            elif n > 0 and time.monotonic() - stable_since > 0.3:
                full.set()
            release.wait(0.02)

    srv = TLSServer(good_ctx, script)
    proc = subprocess.Popen([str(chatclient), "--tls", "--ca", ca_file, "--no-identity", "localhost",
                             str(srv.port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=cfg)

    def feed():
        try:
            proc.stdin.write(b"bob\n" + (b"x" * 500 + b"\n") * 20000)
        except (BrokenPipeError, ValueError):
            pass

    threading.Thread(target=feed, daemon=True).start()
    try:
        assert full.wait(20), "the client never filled the socket"
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=5)
    finally:
        release.set()
        proc.kill()
    srv.join()
    assert proc.returncode == 0, err
    assert out.decode().rstrip("\n").split("\n")[-1] == "You left the chat."


def test_ctrl_c_during_the_handshake_ends_at_once(chatclient, ca_file, cfg):
    got_hello, release = threading.Event(), threading.Event()

    def raw(conn):
        conn.recv(4096)
        got_hello.set()
        release.wait(20)

    srv = TLSServer(raw=raw)
    p = spawn(chatclient, srv.port, "--ca", ca_file, "--no-identity", env=cfg)
    try:
        assert got_hello.wait(10)
        p.sendintr()
        p.expect_exact("You left the chat.")
        p.expect(pexpect.EOF)
        p.close()
    finally:
        release.set()
    srv.join()
    assert p.exitstatus == 0


# -- refusals: one clear line, exit 1 ------------------------------------------------------------


def test_wrong_host_name_is_refused(chatclient, ca, ca_file, cfg):
    srv = TLSServer(server_ctx(ca.issue_cert("other.example")))
    r = run_piped(chatclient, srv.port, "--ca", ca_file, env=cfg)
    srv.join()
    one_line_refusal(r, f"cannot verify localhost port {srv.port}", "not for the name localhost",
                     "hostname mismatch")


def test_expired_certificate_is_refused(chatclient, ca, ca_file, cfg):
    now = datetime.datetime.now(datetime.timezone.utc)
    leaf = ca.issue_cert("localhost", not_before=now - datetime.timedelta(days=30),
                         not_after=now - datetime.timedelta(days=1))
    srv = TLSServer(server_ctx(leaf))
    r = run_piped(chatclient, srv.port, "--ca", ca_file, env=cfg)
    srv.join()
    one_line_refusal(r, "certificate has expired")


@pytest.mark.parametrize("with_ca", [True, False], ids=["another-ca", "system-cas"])
def test_unknown_ca_is_refused_when_not_at_a_terminal(chatclient, ca_file, cfg, with_ca):
    stranger = trustme.CA()
    srv = TLSServer(server_ctx(stranger.issue_cert("localhost")))
    r = run_piped(chatclient, srv.port, *(["--ca", ca_file] if with_ca else []), env=cfg)
    srv.join()
    err = one_line_refusal(r, "a certificate from an unknown CA", "not at a terminal", "--pin SHA256:")
    assert not (cfg_dir(cfg) / "known_hosts").exists(), err


def test_pin_right_connects_and_any_spelling_works(chatclient, tmp_path, cfg):
    cert = SelfSigned(tmp_path)
    spelled = "sha256:" + ":".join(cert.fingerprint[i:i + 2].upper() for i in range(0, 64, 2))
    srv = TLSServer(cert.ctx(), chat_script)
    r = run_piped(chatclient, srv.port, "--pin", spelled, env=cfg)
    srv.join()
    assert r.returncode == 0, r.stderr
    assert b"SERVER>hi over tls" in r.stdout
    assert not (cfg_dir(cfg) / "known_hosts").exists()  # a pin is not remembered


def test_pin_wrong_is_refused_even_for_a_ca_verified_server(chatclient, ca_file, good_ctx, cfg):
    srv = TLSServer(good_ctx)
    r = run_piped(chatclient, srv.port, "--ca", ca_file, "--pin", "SHA256:" + "ab" * 32, env=cfg)
    srv.join()
    one_line_refusal(r, "not the pinned SHA256:" + "ab" * 32, "refusing to connect")


@pytest.mark.parametrize("pin", ["SHA256:abc", "SHA256:" + "g" * 64, "ab" * 33])
def test_a_malformed_pin_is_a_usage_error(chatclient, pin, cfg):
    r = subprocess.run([str(chatclient), "--tls", "--pin", pin, "localhost", "1"], capture_output=True,
                       text=True, env=cfg)
    assert r.returncode == 2
    assert r.stderr.startswith(f"chatclient: --pin '{pin}' is not SHA256: and 64 hex digits\nusage:")


@pytest.mark.parametrize("args", [["--ca", "x"], ["--pin", "ab" * 32], ["--no-identity"], ["--identity", "x"]])
def test_tls_options_need_tls(chatclient, args):
    r = subprocess.run([str(chatclient), *args, "localhost", "1"], capture_output=True, text=True)
    assert r.returncode == 2 and "go with --tls" in r.stderr


def test_plaintext_server_on_the_tls_port(chatclient, ca_file, cfg):
    def raw(conn):
        conn.sendall(b"SERVER>*** Welcome to the room (3 here)\n")
        conn.recv(4096)

    srv = TLSServer(raw=raw)
    r = run_piped(chatclient, srv.port, "--ca", ca_file, env=cfg)
    srv.join()
    one_line_refusal(r, f"localhost port {srv.port} does not speak TLS")


def test_a_server_that_closes_during_the_handshake(chatclient, ca_file, cfg):
    srv = TLSServer(raw=lambda conn: conn.recv(4096))
    r = run_piped(chatclient, srv.port, "--ca", ca_file, env=cfg)
    srv.join()
    one_line_refusal(r, "closed the connection during the TLS handshake")


def test_a_handshake_that_never_comes_times_out(chatclient, ca_file, cfg):
    done = threading.Event()

    def raw(conn):
        conn.recv(4096)  # the ClientHello, never answered
        done.wait(20)

    srv = TLSServer(raw=raw)
    r = run_piped(chatclient, srv.port, "-t", "1", "--ca", ca_file, env=cfg, timeout=15)
    done.set()
    srv.join()
    one_line_refusal(r, f"TLS handshake with localhost port {srv.port} timed out after 1 s (is it a TLS port?)")


# -- known_hosts: asked once at a terminal, then remembered --------------------------------------


def test_known_hosts_asked_once_remembered_and_a_change_refused(chatclient, tmp_path, cfg):
    cert = SelfSigned(tmp_path)
    sock = listener()
    port = sock.getsockname()[1]
    try:
        srv = TLSServer(cert.ctx(), chat_script, sock=sock)
        p = spawn(chatclient, port, "--no-identity", env=cfg)
        p.expect_exact(f"The authenticity of localhost:{port} can't be established: it presented a "
                       "self-signed certificate.")
        p.expect_exact(f"Its fingerprint is SHA256:{cert.fingerprint}")
        p.expect_exact("(yes/no)? ")
        p.sendline("maybe")
        p.expect_exact("Please type 'yes' or 'no': ")
        p.sendline("yes")
        p.expect_exact(f"Remembered localhost:{port} as SHA256:{cert.fingerprint}")
        p.expect_exact("What would you like your chat handle to be> ")
        p.sendline("bob")
        p.sendline("hello")
        p.expect_exact("SERVER>hi over tls")
        p.sendline("\\quit")
        p.expect(pexpect.EOF)
        srv.join()
        known = cfg_dir(cfg) / "known_hosts"
        assert known.read_text() == f"localhost:{port} SHA256:{cert.fingerprint}\n"
        assert stat.S_IMODE(known.stat().st_mode) == 0o600
        assert stat.S_IMODE(known.parent.stat().st_mode) == 0o700

        # Second time: silent, at a terminal or not.
        srv = TLSServer(cert.ctx(), chat_script, sock=sock)
        r = run_piped(chatclient, port, "--no-identity", env=cfg)
        srv.join()
        assert r.returncode == 0, r.stderr
        assert b"authenticity" not in r.stdout + r.stderr and b"SERVER>hi over tls" in r.stdout

        # The same host:port with another certificate: refused loudly, with both and the line.
        other = SelfSigned(tmp_path, "impostor")
        srv = TLSServer(other.ctx(), sock=sock)
        p = spawn(chatclient, port, "--no-identity", env=cfg)
        p.expect(pexpect.EOF)
        p.close()
        srv.join()
        assert p.exitstatus == 1
        out = p.before
        assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in out
        assert cert.fingerprint in out and other.fingerprint in out
        assert f"delete line 1 of {known}" in out
        assert out.rstrip().splitlines()[-1] == (
            f"chatclient: the certificate of localhost:{port} has changed ({known}:1): refusing to connect")
        assert "What would you like your chat handle" not in out
        assert known.read_text() == f"localhost:{port} SHA256:{cert.fingerprint}\n"  # untouched
    finally:
        sock.close()


def test_known_hosts_answer_no_refuses_and_remembers_nothing(chatclient, tmp_path, cfg):
    cert = SelfSigned(tmp_path)
    srv = TLSServer(cert.ctx())
    p = spawn(chatclient, srv.port, "--no-identity", env=cfg)
    p.expect_exact("(yes/no)? ")
    p.sendline("no")
    p.expect_exact(f"localhost:{srv.port} not trusted: not connecting")
    p.expect(pexpect.EOF)
    p.close()
    srv.join()
    assert p.exitstatus == 1
    assert not (cfg_dir(cfg) / "known_hosts").exists()


def test_known_hosts_written_by_hand_is_read_leniently(chatclient, tmp_path, cfg):
    cert = SelfSigned(tmp_path)
    srv = TLSServer(cert.ctx(), chat_script)
    known = cfg_dir(cfg) / "known_hosts"
    known.parent.mkdir(parents=True)
    colons = ":".join(cert.fingerprint[i:i + 2].upper() for i in range(0, 64, 2))
    known.write_text(f"# mine\n\nlocalhost:1 SHA256:{'00' * 32}\nLocalHost:{srv.port}  sha256:{colons}\n")
    r = run_piped(chatclient, srv.port, "--no-identity", env=cfg)
    srv.join()
    assert r.returncode == 0, r.stderr
    assert b"SERVER>hi over tls" in r.stdout


# -- the client's identity -----------------------------------------------------------------------


def identity_ctx(ca, pem_path):
    """A server that accepts exactly the client certificate in pem_path (loaded as its own CA:
    Python's ssl has no verify callback, so an unknown self-signed one would be refused)."""
    ctx = server_ctx(ca.issue_cert("localhost"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(pem_path))
    return ctx


def test_identity_is_made_once_0600_and_presented_every_time(chatclient, ca, ca_file, good_ctx, cfg):
    srv = TLSServer(good_ctx, chat_script)
    r = run_piped(chatclient, srv.port, "--ca", ca_file, env=cfg)
    srv.join()
    assert r.returncode == 0, r.stderr
    first = r.stdout.decode().splitlines()[0]
    pem = cfg_dir(cfg) / "identity.pem"
    assert first.startswith(f"Made your TLS identity {pem} (SHA256:")
    made_fp = first.split("SHA256:")[1].rstrip(").")
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    assert stat.S_IMODE(pem.parent.stat().st_mode) == 0o700
    text = pem.read_text()
    assert "PRIVATE KEY" in text and "BEGIN CERTIFICATE" in text

    for _ in range(2):  # presented, the same one, and made no more
        srv = TLSServer(identity_ctx(ca, pem), chat_script)
        r = run_piped(chatclient, srv.port, "--ca", ca_file, env=cfg)
        srv.join()
        assert r.returncode == 0, r.stderr
        assert b"Made your TLS identity" not in r.stdout
        assert hashlib.sha256(srv.peer_cert).hexdigest() == made_fp
        cert = x509.load_der_x509_certificate(srv.peer_cert)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "chatclient"


def test_identity_file_chosen_with_identity(chatclient, ca, ca_file, tmp_path, good_ctx, cfg):
    pem = tmp_path / "elsewhere" / "me.pem"
    srv = TLSServer(good_ctx, chat_script)
    r = run_piped(chatclient, srv.port, "--ca", ca_file, "--identity", str(pem), env=cfg)
    srv.join()
    assert r.returncode == 0, r.stderr
    assert f"Made your TLS identity {pem}".encode() in r.stdout
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    assert not (cfg_dir(cfg) / "identity.pem").exists()
    srv = TLSServer(identity_ctx(ca, pem), chat_script)
    r = run_piped(chatclient, srv.port, "--ca", ca_file, "--identity", str(pem), env=cfg)
    srv.join()
    assert r.returncode == 0, r.stderr
    assert srv.peer_cert


def test_an_unreadable_identity_is_one_clear_line(chatclient, ca_file, tmp_path, cfg):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a pem\n")
    r = subprocess.run([str(chatclient), "--tls", "--ca", ca_file, "--identity", str(bad), "localhost", "1"],
                       capture_output=True, text=True, env=cfg)
    assert r.returncode == 1
    assert r.stderr.startswith(f"chatclient: cannot use the identity {bad}: ") and r.stderr.count("\n") == 1


def test_no_identity_presents_none_and_makes_none(chatclient, ca, ca_file, cfg):
    ctx = server_ctx(ca.issue_cert("localhost"))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(cafile=ca_file)
    srv = TLSServer(ctx, chat_script)
    r = run_piped(chatclient, srv.port, "--ca", ca_file, "--no-identity", env=cfg)
    srv.join()
    assert r.returncode == 0, r.stderr
    assert srv.peer_cert is None
    assert not (cfg_dir(cfg) / "identity.pem").exists()
    assert b"Made your TLS identity" not in r.stdout


def test_plain_runs_never_touch_tls_files(chatclient, cfg, fake_server):
    srv = fake_server(lambda peer: (peer.expect(b"hello\n\0"), peer.send(b"SERVER>plain\n"), peer.wait_close()))
    r = subprocess.run([str(chatclient), "127.0.0.1", str(srv.port)], input=b"bob\nhello\n",
                       capture_output=True, env=cfg, timeout=20)
    srv.join()
    assert r.returncode == 0
    assert r.stdout.decode().splitlines()[0] == f"Connecting to 127.0.0.1 port {srv.port}"
    assert not cfg_dir(cfg).exists()


# -- hostile TLS servers under AddressSanitizer/UBSan and valgrind -------------------------------


class MemoryTLS:
    """The server's TLS over memory buffers, so a test can send any part of any record raw."""

    def __init__(self, conn, ctx):
        self.conn, self.inc, self.out = conn, ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_side=True)
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.flush()
                self.feed()
        self.flush()

    def feed(self):
        data = self.conn.recv(65536)
        if not data:
            raise ConnectionError("client closed")
        self.inc.write(data)

    def flush(self):
        if self.out.pending:
            self.conn.sendall(self.out.read())

    def records(self, data):
        self.obj.write(data)
        return self.out.read()

    def ends_with_close_notify(self):
        """Reads to the end: True if the client said close_notify, False if it just closed."""
        while True:
            try:
                if self.obj.read(65536) == b"":  # an SSLObject's read says close_notify so
                    return True
            except ssl.SSLZeroReturnError:
                return True
            except ssl.SSLWantReadError:
                data = self.conn.recv(65536)
                if not data:
                    return False
                self.inc.write(data)

    def expect(self, data):
        got = b""
        while data not in got:
            try:
                chunk = self.obj.read(65536)
                if not chunk:
                    raise ConnectionError(f"client said close_notify; received {got!r}, wanted {data!r}")
                got += chunk
            except ssl.SSLWantReadError:
                self.feed()


def _garbage(tls):
    tls.conn.sendall(random.Random(7).randbytes(65536))


def _close_mid_record(tls):
    record = tls.records(b"SERVER>" + b"x" * 3000 + b"\n")
    tls.conn.sendall(record[: len(record) // 2])


def _reset_mid_record(tls):
    _close_mid_record(tls)
    tls.conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")


def _huge_line(tls):
    tls.conn.sendall(tls.records(b"SERVER>" + b"x" * 100_000))


def _flood_of_lines(tls):
    tls.conn.sendall(tls.records(b"".join(b"SERVER>\x1b[2J%d\0\n" % i for i in range(5000))))


def _alert(tls):
    try:  # a close_notify, then a fatal alert in the clear after it
        tls.obj.unwrap()
    except ssl.SSLWantReadError:
        pass
    tls.flush()
    tls.conn.sendall(b"\x15\x03\x03\x00\x02\x02\x28")


def test_quit_ends_with_close_notify(chatclient, ca, ca_file, cfg):
    ctx = server_ctx(ca.issue_cert("localhost"))
    result = {}

    def raw(conn):
        tls = MemoryTLS(conn, ctx)
        tls.expect(b"hello\n\0")
        tls.conn.sendall(tls.records(b"SERVER>bye then\n"))
        tls.expect(b"\\quit\n\0")
        result["clean"] = tls.ends_with_close_notify()

    srv = TLSServer(raw=raw)
    r = run_piped(chatclient, srv.port, "--ca", ca_file, "--no-identity", env=cfg)
    srv.join()
    assert r.returncode == 0, r.stderr
    assert result == {"clean": True}


HOSTILE_TLS = {
    "garbage-after-handshake": _garbage,
    "close-mid-record": _close_mid_record,
    "reset-mid-record": _reset_mid_record,
    "100k-line": _huge_line,
    "flood-of-lines": _flood_of_lines,
    "close-notify-then-junk": _alert,
}

HOSTILE_ENDINGS = (
    "Connection closed by the server.",
    "Connection to the server lost: Connection reset by peer.",
    "You left the chat.",
)


def run_hostile_tls(command, case, ca, ca_file, env, identity=True):
    ctx = server_ctx(ca.issue_cert("localhost"))

    def raw(conn):
        tls = MemoryTLS(conn, ctx)
        tls.expect(b"hello\n\0")
        try:
            HOSTILE_TLS[case](tls)
        except (ConnectionError, ssl.SSLError):
            pass  # the client may give up on garbage before it has all been sent

    srv = TLSServer(raw=raw)
    # -t bounds the handshake too: generous, as valgrind on a busy machine is slow at it
    r = subprocess.run(
        [*command, "-t", "20", "--tls", "--ca", ca_file, *([] if identity else ["--no-identity"]),
         "localhost", str(srv.port)],
        input=b"bob\nhello\n", capture_output=True, timeout=120,
        env=dict(env, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0"),
    )
    srv.join()
    err = r.stderr.decode("utf-8", "replace")
    out = r.stdout.decode("utf-8", "replace")
    for marker in ("ERROR: AddressSanitizer", "runtime error:", "LeakSanitizer", "Invalid read",
                   "Invalid write", "definitely lost", "still reachable"):
        assert marker not in err, err[-3000:]
    assert r.returncode in (0, 1), (r.returncode, err[-3000:])
    last = out.strip().splitlines()[-1]
    assert last in HOSTILE_ENDINGS or last.startswith("Connection to the server lost: TLS error: "), out[-500:]
    assert "\x1b" not in out and "\x9b" not in out


@pytest.mark.asan
@pytest.mark.parametrize("case", sorted(HOSTILE_TLS))
def test_hostile_tls_server_under_asan(chatclient_asan, case, ca, ca_file, cfg):
    run_hostile_tls([str(chatclient_asan)], case, ca, ca_file, cfg)


@pytest.mark.valgrind
@pytest.mark.parametrize("case", sorted(HOSTILE_TLS))
def test_hostile_tls_server_under_valgrind(chatclient, valgrind, case, ca, ca_file, cfg):
    if "asan" in chatclient.name:
        pytest.skip("valgrind does not run the sanitizer build")
    run_hostile_tls([valgrind, "--leak-check=full", "--errors-for-leak-kinds=all", "--error-exitcode=99", "-q",
                     str(chatclient)], case, ca, ca_file, cfg, identity=case != "flood-of-lines")


@pytest.mark.asan
@pytest.mark.parametrize("how", ["handshake-timeout", "plaintext", "refused-pin", "changed-known-host"])
def test_tls_refusals_under_asan(chatclient_asan, how, ca_file, tmp_path, cfg):
    cert = SelfSigned(tmp_path)
    args = ["-t", "1" if how == "handshake-timeout" else "20"]
    if how == "handshake-timeout":
        srv = TLSServer(raw=lambda conn: (conn.recv(4096), conn.recv(4096)))
    elif how == "plaintext":
        srv = TLSServer(raw=lambda conn: (conn.sendall(b"SERVER>hi\n"), conn.recv(4096)))
    else:
        srv = TLSServer(cert.ctx())
        if how == "refused-pin":
            args += ["--pin", "cd" * 32]
        else:
            known = cfg_dir(cfg) / "known_hosts"
            known.parent.mkdir(parents=True)
            known.write_text(f"localhost:{srv.port} SHA256:{'ef' * 32}\n")
    r = run_piped(chatclient_asan, srv.port, *args, env=dict(cfg, ASAN_OPTIONS="detect_leaks=1"), timeout=30)
    srv.join()
    err = r.stderr.decode()
    assert r.returncode == 1, err
    for marker in ("ERROR: AddressSanitizer", "runtime error:", "LeakSanitizer"):
        assert marker not in err, err[-3000:]
    assert {"handshake-timeout": "timed out after 1 s", "plaintext": "does not speak TLS",
            "refused-pin": "not the pinned", "changed-known-host": "has changed"}[how] in err, err
