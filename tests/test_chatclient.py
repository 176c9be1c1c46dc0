"""./chatclient in a pseudo-terminal against scripted servers: usage, framing, safety, signals."""

import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pexpect
import pytest
from fakeserver import FakeServer

from chatlog.sanitize import UNSAFE_RANGES, visible


def spawn(chatclient, port, *args, host="127.0.0.1"):
    env = dict(os.environ, TERM="xterm")
    return pexpect.spawn(str(chatclient), [*args, host, str(port)], env=env, encoding="utf-8", timeout=10)


# The only control sequences the client itself writes: clear to the end of the screen and move up
# (to redraw the line being typed). Anything else with an ESC came from the server.
OWN_CONTROLS = re.compile(r"\x1b\[J|\x1b\[\d+A")


def login(p, handle="brandon"):
    p.expect_exact("What would you like your chat handle to be> ")
    p.sendline(handle)
    p.expect_exact(f"{handle}>")


def finish(p, status):
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == status, p.before


def test_exact_bytes_of_a_chat(chatclient):
    def script(peer):
        peer.expect(b"brandon>hello server\n\0")
        peer.send(b"SERVER>why hello client\n")
        peer.expect(b"brandon>\\quit\n\0")
        peer.wait_close()

    srv = FakeServer(script)
    p = spawn(chatclient, srv.port)
    p.expect_exact(f"Connecting to 127.0.0.1 port {srv.port}")
    login(p)
    p.sendline("hello server")
    p.expect_exact("SERVER>why hello client")
    p.expect_exact("brandon>")
    p.sendline("\\quit")
    p.expect_exact("You left the chat.")
    finish(p, 0)
    srv.join()
    assert srv.received == b"brandon>hello server\n\0brandon>\\quit\n\0"


@pytest.mark.parametrize("bad", ["", "elevenchars", "two words", "a>b"])
def test_invalid_handles_are_asked_again(chatclient, bad):
    srv = FakeServer(lambda peer: peer.expect(b"ok>"))
    p = spawn(chatclient, srv.port)
    p.expect_exact("What would you like your chat handle to be> ")
    p.sendline(bad)
    p.expect_exact("A handle is 1 to 10 characters")
    login(p, "ok")
    p.sendline("x")
    srv.join()
    p.terminate(force=True)


def test_server_close_is_noticed_before_enter(chatclient):
    def script(peer):
        peer.expect(b"\n\0")
        peer.send(b"SERVER>go\n")
        peer.conn.settimeout(0.3)
        try:
            peer.conn.recv(1)  # the user types but never presses Enter: nothing arrives
        except TimeoutError:
            pass

    srv = FakeServer(script)
    p = spawn(chatclient, srv.port)
    login(p)
    p.sendline("hi")
    p.expect_exact("SERVER>go")
    p.expect_exact("brandon>")
    p.send("half a sentence")
    p.expect_exact("Connection closed by the server.")
    finish(p, 1)


def test_server_quit(chatclient):
    srv = FakeServer(lambda peer: (peer.expect(b"\n\0"), peer.send(b"\\quit\n")))
    p = spawn(chatclient, srv.port)
    login(p)
    p.sendline("hi")
    p.expect_exact("The server closed the chat.")
    finish(p, 0)


def test_ctrl_d_is_quit(chatclient):
    srv = FakeServer(lambda peer: (peer.expect(b"brandon>\\quit\n\0"), peer.wait_close()))
    p = spawn(chatclient, srv.port)
    login(p)
    p.sendeof()
    p.expect_exact("You left the chat.")
    finish(p, 0)
    srv.join()


def test_length_limit_and_empty_lines(chatclient):
    srv = FakeServer(lambda peer: (peer.expect(b"brandon>" + b"x" * 500 + b"\n\0")))
    p = spawn(chatclient, srv.port)
    login(p)
    p.sendline("")  # nothing is sent for an empty line
    p.expect_exact("brandon>")
    p.sendline("y" * 501)
    p.expect_exact("Message too long (501 characters, at most 500); not sent.")
    p.expect_exact("brandon>")
    p.sendline("x" * 500)
    srv.join()
    assert srv.received == b"brandon>" + b"x" * 500 + b"\n\0"
    p.terminate(force=True)


@pytest.mark.parametrize(
    "args,status,text",
    [
        ([], 2, "usage: chatclient"),
        (["localhost"], 2, "usage: chatclient"),
        (["localhost", "http"], 2, "usage: chatclient"),
        (["localhost", "70000"], 2, "usage: chatclient"),
        (["no-such-host.invalid", "9999"], 1, "chatclient: cannot resolve no-such-host.invalid"),
    ],
)
def test_usage_and_resolution_errors(chatclient, args, status, text):
    r = subprocess.run([str(chatclient), *args], capture_output=True, text=True, timeout=20)
    assert r.returncode == status
    assert text in r.stderr


def test_help(chatclient):
    r = subprocess.run([str(chatclient), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("usage: chatclient")


def test_refused(chatclient):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    r = subprocess.run([str(chatclient), "127.0.0.1", str(port)], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr == f"chatclient: cannot connect to 127.0.0.1 port {port}: Connection refused\n"


def _ipv6():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6(), reason="no IPv6 loopback")
def test_ipv6_literal(chatclient):
    srv6 = socket.socket(socket.AF_INET6)
    srv6.bind(("::1", 0))
    srv6.listen(1)
    port = srv6.getsockname()[1]
    p = spawn(chatclient, port, host="::1")
    c, addr = srv6.accept()
    login(p)
    p.sendline("over six")
    data = b""
    while not data.endswith(b"\n\0"):
        data += c.recv(100)
    assert data == b"brandon>over six\n\0"
    c.close()
    srv6.close()
    p.expect_exact("Connection closed by the server.")


@pytest.mark.parametrize(
    "reply,shown",
    [
        (b"SERVER> no newline at all", "SERVER>no newline at all"),
        (b"SERVER>crlf\r\n", "SERVER>crlf"),
        (b"SERVER>padded\0" + b"\xde\xad\xbe\xef" * 100, "SERVER>padded"),
        (b"Server> spaced\n", "Server>spaced"),
        (b"bare words\n", "bare words"),
        ("SERVER>caf\u00e9 \U0001f600\n".encode(), "SERVER>caf\u00e9 \U0001f600"),
    ],
)
def test_sloppy_servers(chatclient, reply, shown):
    srv = FakeServer(lambda peer: (peer.expect(b"\n\0"), peer.send(reply), peer.expect(b"again\n\0")))
    p = spawn(chatclient, srv.port)
    login(p)
    p.sendline("hi")
    p.expect_exact(shown + "\r\n")
    p.expect_exact("brandon>")
    assert "\\x" not in p.before
    p.sendline("again")
    srv.join()
    p.terminate(force=True)


def test_multibyte_character_split_across_sends(chatclient):
    data = "SERVER>h\u00e9llo\n".encode()
    cut = data.index(b"\xc3") + 1

    def script(peer):
        peer.expect(b"\n\0")
        peer.send(data[:cut])
        peer.conn.sendall(data[cut:])
        peer.expect(b"x\n\0")

    srv = FakeServer(script)
    p = spawn(chatclient, srv.port)
    login(p)
    p.sendline("hi")
    p.expect_exact("SERVER>h\u00e9llo")
    p.expect_exact("brandon>")
    p.sendline("x")
    srv.join()
    p.terminate(force=True)


HOSTILE = (
    b"SERVER>\x1b[2J\x1b]0;title\x07\x1b]52;c;aGk=\x07\x1b[6n \xc2\x9b \x9b "
    + "\u202e\u200b".encode()
    + b" %s%n%x over\rwrite\n"
)


def test_hostile_server_text_is_shown_inert(chatclient):
    srv = FakeServer(lambda peer: (peer.expect(b"\n\0"), peer.send(HOSTILE), peer.expect(b"x\n\0")))
    p = spawn(chatclient, srv.port)
    login(p)
    p.sendline("hi")
    p.expect_exact("over\\rwrite\r\n")
    shown = OWN_CONTROLS.sub("", p.before + p.after)
    for raw in ("\x1b", "\x07", "\x9b", "\u202e", "\u200b"):
        assert raw not in shown
    assert (
        "SERVER>\\x1b[2J\\x1b]0;title\\x07\\x1b]52;c;aGk=\\x07\\x1b[6n \\x9b \\x9b "
        "\\u202e\\u200b %s%n%x over\\rwrite"
    ) in shown
    p.sendline("x")
    srv.join()
    p.terminate(force=True)


def test_sigint_while_waiting_for_the_reply(chatclient):
    srv = FakeServer(lambda peer: (peer.expect(b"hi\n\0"), peer.expect(b"brandon>\\quit\n\0"), peer.wait_close()))
    p = spawn(chatclient, srv.port)
    login(p)
    p.sendline("hi")
    p.expect_exact("hi\r\n")
    for _ in range(3):
        p.kill(signal.SIGINT)
    p.expect_exact("You left the chat.")
    finish(p, 0)
    srv.join()
    assert srv.received.count(b"\\quit") == 1  # repeated signals: one clean quit, nothing half-sent


def test_sigwinch_storm_is_harmless(chatclient):
    storm_over = threading.Event()

    def script(peer):
        peer.expect(b"hi\n\0")
        storm_over.wait(10)  # answer only after the client has been resized 50 times
        peer.send(b"SERVER>still here\n")
        peer.expect(b"bye\n\0")

    srv = FakeServer(script)
    p = spawn(chatclient, srv.port)
    login(p)
    p.sendline("hi")
    p.expect_exact("hi\r\n")
    for _ in range(50):
        p.kill(signal.SIGWINCH)
    storm_over.set()
    p.expect_exact("SERVER>still here")
    p.expect_exact("brandon>")
    p.sendline("bye")
    srv.join()
    p.terminate(force=True)


def test_no_answer_timeout(chatclient):
    srv = FakeServer(lambda peer: (peer.expect(b"hi\n\0"), peer.expect(b"\\quit\n\0")))
    p = spawn(chatclient, srv.port, "-t", "1")
    login(p)
    p.sendline("hi")
    p.expect_exact("No answer from the server in 1 s: you left the chat.")
    finish(p, 1)
    srv.join()


# -- memory safety: hostile servers against the sanitizer build and valgrind ------------------

HOSTILE_CASES = {
    "random-bytes": lambda peer: peer.send(random.Random(7).randbytes(65536)),
    "100k-line": lambda peer: peer.send(b"SERVER>" + b"x" * 100_000),
    "full-buffer": lambda peer: peer.send(b"y" * 8200),
    "nuls": lambda peer: peer.send(b"\0" * 3000 + b"SERVER>a\0b\0\0c"),
    "close-mid-message": lambda peer: peer.send(b"SERVER>half a mess"),
    "reset-mid-message": lambda peer: (peer.send(b"SERVER>half"), peer.reset()),
    "escapes": lambda peer: peer.send(HOSTILE * 50),
    "never-answers": lambda peer: peer.expect(b"\\quit\n\0"),
}


def run_hostile(command, case):
    def script(peer):
        peer.expect(b"hello\n\0")
        HOSTILE_CASES[case](peer)

    srv = FakeServer(script)
    r = subprocess.run(
        [*command, "-t", "1", "127.0.0.1", str(srv.port)],
        input=b"bob\nhello\n",
        capture_output=True,
        timeout=120,
        env=dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0"),
    )
    srv.join()
    err = r.stderr.decode("utf-8", "replace")
    out = r.stdout.decode("utf-8", "replace")
    for marker in ("ERROR: AddressSanitizer", "runtime error:", "LeakSanitizer", "Invalid read", "Invalid write"):
        assert marker not in err, err[-3000:]
    assert r.returncode in (0, 1), (r.returncode, err[-3000:])
    last = out.strip().splitlines()[-1]
    assert last in (
        "Connection closed by the server.",
        "Connection to the server lost: Connection reset by peer.",
        "No answer from the server in 1 s: you left the chat.",
    ), out[-500:]
    assert "\x1b" not in out and "\x9b" not in out


@pytest.mark.asan
@pytest.mark.parametrize("case", sorted(HOSTILE_CASES))
def test_hostile_server_under_asan(chatclient_asan, case):
    run_hostile([str(chatclient_asan)], case)


@pytest.mark.valgrind
@pytest.mark.parametrize("case", sorted(HOSTILE_CASES))
def test_hostile_server_under_valgrind(chatclient, valgrind, case):
    run_hostile(
        [valgrind, "--leak-check=full", "--errors-for-leak-kinds=all", "--error-exitcode=99", "-q", str(chatclient)],
        case,
    )


# -- the typed input paths: hostile handles and messages under the sanitizer build -------------

SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "runtime error:", "LeakSanitizer")


def run_typed(command, stdin: bytes, script=None):
    """The client with `stdin` piped in against a server that records what it receives."""

    def default(peer):
        peer.wait_close()

    srv = FakeServer(script or default)
    r = subprocess.run(
        [*command, "127.0.0.1", str(srv.port)],
        input=stdin,
        capture_output=True,
        timeout=60,
        env=dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0"),
    )
    srv.join()
    err = r.stderr.decode("utf-8", "replace")
    for marker in SANITIZER_MARKERS:
        assert marker not in err, err[-3000:]
    return r, srv.received


@pytest.mark.asan
@pytest.mark.parametrize(
    "handle",
    [
        b"a" + b"\x80" * 300,  # one letter and continuation bytes: the old length check counted 1
        b"\x80" * 5000,
        b"ab\xc3",  # a truncated sequence
        b"\xed\xa0\x80",  # an encoded surrogate
        b"\xf4\x90\x80\x80",  # past U+10FFFF
        b"\xc0\xaf",  # an overlong '/'
        "a\u202eb".encode(),  # a format character
        "a\u00a0b".encode(),  # no-break space is whitespace
        "\U0001f600".encode() * 11,  # 11 code points, 44 bytes
    ],
)
def test_hostile_handles_are_refused_without_overflow(chatclient_asan, handle):
    r, received = run_typed([str(chatclient_asan)], handle + b"\nok\n\\quit\n")
    assert r.returncode == 0, r.stderr[-2000:]
    assert received == b"ok>\\quit\n\0"
    assert r.stdout.count(b"A handle is 1 to 10 characters") == 1


# -- one sanitiser rule: the client's table is generated from chatlog/sanitize.py ---------------

ROOT = Path(__file__).resolve().parent.parent


def test_unsafe_header_is_generated_from_the_sanitiser():
    r = subprocess.run(
        [sys.executable, str(ROOT / "c_client" / "gen_unsafe.py")], capture_output=True, text=True, check=True
    )
    committed = (ROOT / "c_client" / "unsafe.h").read_text()
    assert r.stdout == committed, "c_client/unsafe.h is stale: run `make unsafe-header`"
    # the client's binary search needs sorted, disjoint ranges
    for (lo, hi), (nlo, _) in zip(UNSAFE_RANGES, UNSAFE_RANGES[1:]):
        assert lo <= hi < nlo
