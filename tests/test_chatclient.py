"""./chatclient in a pseudo-terminal against scripted servers: usage, framing, safety, signals."""

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pexpect
import pytest
from conftest import login, spawn_client

from chatlog.sanitize import UNSAFE_RANGES, visible


# The only control sequences the client itself writes: clear to the end of the screen, move up and
# move right (to redraw the line being typed and put the cursor back in it). Anything else with an
# ESC came from the server.
OWN_CONTROLS = re.compile(r"\x1b\[J|\x1b\[\d+[AC]")


def finish(p, status):
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == status, p.before


def test_exact_bytes_of_a_chat(chatclient, fake_server):
    def script(peer):
        peer.expect(b"brandon>hello server\n\0")
        peer.send(b"SERVER>why hello client\n")
        peer.expect(b"brandon>\\quit\n\0")
        peer.wait_close()

    srv = fake_server(script)
    p = spawn_client(chatclient, srv.port)
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
def test_invalid_handles_are_asked_again(chatclient, bad, fake_server):
    srv = fake_server(lambda peer: peer.expect(b"ok>"))
    p = spawn_client(chatclient, srv.port)
    p.expect_exact("What would you like your chat handle to be> ")
    p.sendline(bad)
    p.expect_exact("A handle is 1 to 10 characters")
    login(p, "ok")
    p.sendline("x")
    srv.join()
    p.terminate(force=True)


def test_server_close_is_noticed_before_enter(chatclient, fake_server):
    def script(peer):
        peer.expect(b"\n\0")
        peer.send(b"SERVER>go\n")
        peer.conn.settimeout(0.3)
        try:
            early = peer.conn.recv(1)  # the user types but never presses Enter: nothing arrives
        except TimeoutError:
            return
        raise AssertionError(f"sent before Enter: {early!r}")

    srv = fake_server(script)
    p = spawn_client(chatclient, srv.port)
    login(p)
    p.sendline("hi")
    p.expect_exact("SERVER>go")
    p.expect_exact("brandon>")
    p.send("half a sentence")
    p.expect_exact("Connection closed by the server.")
    finish(p, 1)


def test_server_quit(chatclient, fake_server):
    srv = fake_server(lambda peer: (peer.expect(b"\n\0"), peer.send(b"\\quit\n")))
    p = spawn_client(chatclient, srv.port)
    login(p)
    p.sendline("hi")
    p.expect_exact("The server closed the chat.")
    finish(p, 0)


def test_ctrl_d_is_quit(chatclient, fake_server):
    srv = fake_server(lambda peer: (peer.expect(b"brandon>\\quit\n\0"), peer.wait_close()))
    p = spawn_client(chatclient, srv.port)
    login(p)
    p.sendeof()
    p.expect_exact("You left the chat.")
    finish(p, 0)
    srv.join()


def test_length_limit_and_empty_lines(chatclient, fake_server):
    srv = fake_server(lambda peer: (peer.expect(b"brandon>" + b"x" * 500 + b"\n\0")))
    p = spawn_client(chatclient, srv.port)
    login(p)
    p.sendline("")  # nothing is sent for an empty line
    p.expect_exact("brandon>")
    p.sendline("y" * 501)
    p.expect_exact("Message too long (501 characters, at most 500); not sent. It is kept below for editing.")
    p.expect_exact("brandon>" + "y" * 501)
    p.sendline("\x15" + "x" * 500)  # Ctrl-U clears the kept line
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
    p = spawn_client(chatclient, port, host="::1")
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
def test_sloppy_servers(chatclient, reply, shown, fake_server):
    srv = fake_server(lambda peer: (peer.expect(b"\n\0"), peer.send(reply), peer.expect(b"again\n\0")))
    p = spawn_client(chatclient, srv.port)
    login(p)
    p.sendline("hi")
    p.expect_exact(shown + "\r\n")
    p.expect_exact("brandon>")
    assert "\\x" not in p.before
    p.sendline("again")
    srv.join()
    p.terminate(force=True)


def test_multibyte_character_split_across_sends(chatclient, fake_server):
    data = "SERVER>h\u00e9llo\n".encode()
    cut = data.index(b"\xc3") + 1

    def script(peer):
        peer.expect(b"\n\0")
        peer.send(data[:cut])
        peer.conn.sendall(data[cut:])
        peer.expect(b"x\n\0")

    srv = fake_server(script)
    p = spawn_client(chatclient, srv.port)
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


def test_hostile_server_text_is_shown_inert(chatclient, fake_server):
    srv = fake_server(lambda peer: (peer.expect(b"\n\0"), peer.send(HOSTILE), peer.expect(b"x\n\0")))
    p = spawn_client(chatclient, srv.port)
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


def test_sigint_while_waiting_for_the_reply(chatclient, fake_server):
    srv = fake_server(lambda peer: (peer.expect(b"hi\n\0"), peer.expect(b"brandon>\\quit\n\0"), peer.wait_close()))
    p = spawn_client(chatclient, srv.port)
    login(p)
    p.sendline("hi")
    p.expect_exact("hi\r\n")
    for _ in range(3):
        p.kill(signal.SIGINT)
    p.expect_exact("You left the chat.")
    finish(p, 0)
    srv.join()
    assert srv.received.count(b"\\quit") == 1  # repeated signals: one clean quit, nothing half-sent


def test_sigwinch_storm_is_harmless(chatclient, fake_server):
    storm_over = threading.Event()

    def script(peer):
        peer.expect(b"hi\n\0")
        storm_over.wait(10)  # answer only after the client has been resized 50 times
        peer.send(b"SERVER>still here\n")
        peer.expect(b"bye\n\0")

    srv = fake_server(script)
    p = spawn_client(chatclient, srv.port)
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


def test_no_answer_timeout(chatclient, fake_server):
    srv = fake_server(lambda peer: (peer.expect(b"hi\n\0"), peer.expect(b"\\quit\n\0")))
    p = spawn_client(chatclient, srv.port, "-t", "1")
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


def skip_sanitizer_build(chatclient):
    if "asan" in Path(chatclient).name:  # CHATCLIENT=./chatclient-asan: valgrind cannot run it
        pytest.skip("valgrind does not run the sanitizer build")


def run_hostile(command, case, fake_server):
    def script(peer):
        peer.expect(b"hello\n\0")
        HOSTILE_CASES[case](peer)

    srv = fake_server(script)
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
        "You left the chat.",  # the server answered, and the input had ended
    ), out[-500:]
    assert "\x1b" not in out and "\x9b" not in out


@pytest.mark.asan
@pytest.mark.parametrize("case", sorted(HOSTILE_CASES))
def test_hostile_server_under_asan(chatclient_asan, case, fake_server):
    run_hostile([str(chatclient_asan)], case, fake_server)


@pytest.mark.valgrind
@pytest.mark.parametrize("case", sorted(HOSTILE_CASES))
def test_hostile_server_under_valgrind(chatclient, valgrind, case, fake_server):
    skip_sanitizer_build(chatclient)
    run_hostile(
        [valgrind, "--leak-check=full", "--errors-for-leak-kinds=all", "--error-exitcode=99", "-q", str(chatclient)],
        case,
        fake_server,
    )


# -- the typed input paths: hostile handles and messages under the sanitizer build -------------

SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "runtime error:", "LeakSanitizer")


def run_typed(fake_server, command, stdin: bytes, script=None):
    """The client with `stdin` piped in against a server that records what it receives."""

    def default(peer):
        peer.wait_close()

    srv = fake_server(script or default)
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
def test_hostile_handles_are_refused_without_overflow(chatclient_asan, handle, fake_server):
    r, received = run_typed(fake_server, [str(chatclient_asan)], handle + b"\nok\n\\quit\n")
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
    for (lo, hi), (nlo, _) in zip(UNSAFE_RANGES, UNSAFE_RANGES[1:], strict=False):
        assert lo <= hi < nlo


# -- what the user sees: notices, why the chat ended, the prompt, turns, rooms -----------------

import time  # noqa: E402

import pyte  # noqa: E402


class Screen:
    """The client in a pty, its output through a terminal emulator: what a person sees."""

    def __init__(self, chatclient, port, *args, cols=80, rows=24, wrapper=()):
        command = [*wrapper, str(chatclient), *args, "127.0.0.1", str(port)]
        self.p = pexpect.spawn(
            command[0], command[1:], env=dict(os.environ, TERM="xterm"),
            encoding="utf-8", timeout=10, dimensions=(rows, cols),
        )
        self.screen = pyte.Screen(cols, rows)
        self.stream = pyte.Stream(self.screen)
        self.raw = ""
        # printed once the terminal is in the client's mode: keys typed before would be echoed twice
        self.wait(lambda lines: any(line.startswith("Connecting to") for line in lines))

    def lines(self):
        return [line.rstrip() for line in self.screen.display if line.strip()]

    def wait(self, cond, timeout=10):
        """Feed output to the emulator until cond(lines) holds; return the lines."""
        deadline = time.monotonic() + timeout
        while not cond(self.lines()):
            if time.monotonic() > deadline:
                raise AssertionError("screen never matched; it shows:\n" + "\n".join(self.lines()))
            try:
                data = self.p.read_nonblocking(4096, timeout=0.05)
            except pexpect.TIMEOUT:
                continue
            except pexpect.EOF:
                if not cond(self.lines()):
                    raise AssertionError("client exited; screen:\n" + "\n".join(self.lines())) from None
                break
            self.raw += data
            self.stream.feed(data)
        return self.lines()

    def wait_last(self, text, timeout=10):
        return self.wait(lambda lines: bool(lines) and lines[-1] == text, timeout)

    def type(self, text):
        self.p.send(text)

    def finish(self):
        self.p.expect(pexpect.EOF)
        self.p.close()
        return self.p.exitstatus


@pytest.mark.parametrize(
    "ending,final",
    [
        (b"SERVER>*** The server shut down.\n\\quit\n", "The server shut down."),
        (b"SERVER>*** No message for 300 s: timed out.\n\\quit\n", "No message for 300 s: timed out."),
        (b"HAL>*** Too many messages without an answer: disconnected.\nHAL>\\quit\n",
         "Too many messages without an answer: disconnected."),
        (b"SERVER>\\quit\n", "The server closed the chat."),
        (b"SERVER>*** A line over 8192 bytes: disconnected.\n", "Connection closed by the server."),
    ],
)
def test_the_last_line_says_why_the_chat_ended(chatclient, ending, final, fake_server):
    srv = fake_server(lambda peer: (peer.expect(b"hi\n\0"), peer.send(ending)))
    s = Screen(chatclient, srv.port)
    s.wait_last("What would you like your chat handle to be>")
    s.type("brandon\rhi\r")
    lines = s.wait_last(final)
    assert s.finish() == (1 if final.startswith("Connection") else 0)
    srv.join()
    # the reason is said once, as the last line, and never as a server line
    assert not any(">***" in line or ">\\quit" in line for line in lines)
    if final.startswith("Connection"):  # a notice with no \quit after it is a status line
        assert lines[-3:-1] == ["brandon>hi", "[A line over 8192 bytes: disconnected.]"]
    else:
        assert lines[-2] == "brandon>hi"


def test_a_notice_then_a_close_is_shown_and_the_close_said(chatclient, fake_server):
    srv = fake_server(lambda peer: (peer.expect(b"hi\n\0"), peer.send(b"SERVER>*** The server shut down.\n")))
    s = Screen(chatclient, srv.port)
    s.type("brandon\rhi\r")
    lines = s.wait_last("Connection closed by the server.")
    assert lines[-2] == "[The server shut down.]"
    assert s.finish() == 1


@pytest.mark.parametrize("client", ["chatclient", "chatclient_asan"])
@pytest.mark.parametrize("room", [False, True], ids=["turns", "room"])
def test_an_unterminated_last_line_at_the_close_is_shown_as_cut(request, client, room, fake_server):
    """A reader dropped mid-line (a room's slow reader) gets `bob>I will` and the close: shown as
    cut, never as if bob had said it. A line the server finished is shown as it is."""
    chatclient = request.getfixturevalue(client)
    greeting = b"SERVER>*** Welcome to the room: 2 here. Type at any time.\n" if room else b""
    srv = fake_server(lambda peer: (peer.send(greeting), peer.expect(b"hi\n\0"),
                                   peer.send(b"bob>I will not\nbob>I will")))
    s = Screen(chatclient, srv.port)
    s.type("brandon\rhi\r")
    lines = s.wait_last("Connection closed by the server.")
    assert s.finish() == 1
    srv.join()
    assert "bob>I will not" in lines
    assert lines[-2] == "bob>I will [cut: connection closed mid-line]"
    assert "bob>I will" not in lines


def test_busy_is_said_before_the_handle_is_asked(chatclient, fake_server):
    srv = fake_server(lambda peer: (peer.send(b"SERVER>*** The server is busy; try again later.\n\\quit\n"), peer.wait_close()))
    p = spawn_client(chatclient, srv.port)
    p.expect_exact("The server is busy; try again later.\r\n")
    assert "handle" not in p.before
    p.expect(pexpect.EOF)
    assert "handle" not in p.before
    p.close()
    assert p.exitstatus == 0
    srv.join()
    assert srv.received == b""  # nothing sent: no handle was ever asked for


def test_waiting_and_begun_notices_are_status_lines(chatclient, fake_server):
    def script(peer):
        peer.expect(b"brandon>one\n\0")
        peer.send(b"SERVER>*** Waiting: 2 ahead of you. Your chat begins when they are done.\n")
        peer.expect(b"brandon>two\n\0")
        peer.send(b"SERVER>*** Your chat has begun.\nSERVER>hello brandon\n")
        peer.expect(b"brandon>three\n\0")
        peer.send(b"SERVER>bye\n")
        peer.expect(b"\\quit\n\0")

    srv = fake_server(script)
    s = Screen(chatclient, srv.port)
    s.type("brandon\rone\r")
    s.wait(lambda lines: "[Waiting: 2 ahead of you. Your chat begins when they are done.]" in lines)
    s.type("two\r")
    s.wait(lambda lines: "SERVER>hello brandon" in lines)
    s.type("three\r")  # the notice and the answer together were one answer: it is our turn
    lines = s.wait(lambda lines: "SERVER>bye" in lines)
    assert lines[lines.index("brandon>two") + 1 :][:2] == ["[Your chat has begun.]", "SERVER>hello brandon"]
    s.type("\\quit\r")
    s.wait_last("You left the chat.")
    assert s.finish() == 0
    srv.join()
    # after the Waiting notice (only chatlog sends it) the client says it shows notices at once;
    # a server that still sends "begun" with its answer is followed just the same
    assert srv.received == (b"brandon>one\n\0brandon>\\caps notify\n\0brandon>two\n\0brandon>three\n\0"
                            b"brandon>\\quit\n\0")


def test_an_incoming_line_never_garbles_the_prompt_or_typed_text(chatclient, fake_server):
    answer = threading.Event()

    def script(peer):
        peer.expect(b"brandon>hi\n\0")
        answer.wait(10)
        peer.send(b"SERVER>why hello client\n")
        peer.expect(b"\\quit\n\0")

    srv = fake_server(script)
    s = Screen(chatclient, srv.port)
    s.type("brandon\rhi\r")
    s.wait_last("brandon>")
    s.type("half typed")
    s.wait_last("brandon>half typed")
    answer.set()
    lines = s.wait(lambda lines: lines[-2:] == ["SERVER>why hello client", "brandon>half typed"])
    assert not any("brandon>SERVER" in line or "typedSERVER" in line for line in lines)
    s.type("\x15\\quit\r")  # Ctrl-U clears the typed text
    s.wait_last("You left the chat.")
    assert s.finish() == 0


def test_a_line_typed_out_of_turn_is_queued_not_sent(chatclient, fake_server):
    queued = threading.Event()
    checked = threading.Event()

    def script(peer):
        peer.expect(b"brandon>hi\n\0")
        queued.wait(10)
        peer.conn.setblocking(False)
        try:
            early = peer.conn.recv(100)
        except BlockingIOError:
            early = b""
        peer.conn.setblocking(True)
        assert early == b"", f"sent out of turn: {early!r}"
        checked.set()
        peer.send(b"SERVER>answer\n")
        peer.expect(b"brandon>second\n\0")
        peer.send(b"SERVER>answer two\n")
        peer.expect(b"\\quit\n\0")

    srv = fake_server(script)
    s = Screen(chatclient, srv.port)
    s.type("brandon\rhi\rsecond\r")
    s.wait(lambda lines: "(queued: will be sent when the server answers)" in lines)
    s.type("third\r")
    s.wait(lambda lines: lines[-1] == "brandon>third"
           and any(line.startswith("Not sent: a line is already queued; wait") for line in lines))
    s.type("\x15")  # the refused line was kept for editing: cleared
    queued.set()
    assert checked.wait(10)
    lines = s.wait(lambda lines: "SERVER>answer two" in lines)
    i = lines.index("SERVER>answer")
    assert lines[i + 1] == "brandon>second"  # sent now, shown as it goes
    s.type("\\quit\r")
    s.wait_last("You left the chat.")
    assert s.finish() == 0
    srv.join()
    assert srv.received == b"brandon>hi\n\0brandon>second\n\0brandon>\\quit\n\0"


ROOM_WELCOME = b"ROOM>*** Welcome to the room: 2 here. Type at any time.\n"


def test_room_mode(chatclient, fake_server):
    typed = threading.Event()

    def script(peer):
        peer.send(ROOM_WELCOME)
        peer.expect(b"bob>one\n\0bob>two\n\0")  # no turns: both sent at once
        typed.wait(10)
        peer.send(b"alice>hi all\n")
        peer.send(b"alice>*** not a notice\nalice>\\quit\nROOM>*** carol joined\n")
        peer.expect(b"bob>three\n\0")
        peer.send(b"ROOM>*** The operator removed you from the room.\n\\quit\n")

    srv = fake_server(script)
    s = Screen(chatclient, srv.port)
    s.wait(lambda lines: "[Welcome to the room: 2 here. Type at any time.]" in lines)
    s.type("bob\rone\rtwo\r")
    s.wait_last("bob>")
    s.type("thr")
    s.wait_last("bob>thr")
    typed.set()
    s.wait(lambda lines: lines[-5:] == ["alice>hi all", "alice>*** not a notice", "alice>\\quit", "[carol joined]", "bob>thr"])
    s.type("ee\r")
    s.wait_last("The operator removed you from the room.")
    assert s.finish() == 0
    srv.join()


@pytest.mark.parametrize(
    "args,error",
    [
        (["127.0.0.1", "abc"], "chatclient: port 'abc' is not a number (1-65535)"),
        (["127.0.0.1", "0"], "chatclient: port '0' is not a number (1-65535)"),
        (["127.0.0.1", "-5"], "chatclient: port '-5' is not a number (1-65535)"),
        (["127.0.0.1", "99999999999999999999"], "is not a number (1-65535)"),
        ([], "chatclient: missing HOST and PORT"),
        (["localhost"], "chatclient: missing PORT"),
        (["a", "1", "b"], "chatclient: too many arguments"),
        (["-t", "x", "a", "1"], "chatclient: -t 'x' is not a number of seconds"),
        (["-t", "0", "a", "1"], "chatclient: -t '0' is not a number of seconds"),
        (["-t"], "chatclient: -t needs a number of seconds"),
        (["a", "1", "-t", "5"], "chatclient: too many arguments"),
        (["-q", "a", "1"], "chatclient: unknown option '-q'"),
    ],
)
def test_usage_errors_say_why(chatclient, args, error):
    r = subprocess.run([str(chatclient), *args], capture_output=True, text=True, timeout=20)
    assert r.returncode == 2
    first, rest = r.stderr.split("\n", 1)
    assert error in first
    assert rest.startswith("usage: chatclient")
    assert r.stdout == ""


def test_a_reset_says_the_connection_was_lost(chatclient, fake_server):
    srv = fake_server(lambda peer: (peer.expect(b"hi\n\0"), peer.reset()))
    s = Screen(chatclient, srv.port)
    s.type("brandon\rhi\r")
    s.wait_last("Connection to the server lost: Connection reset by peer.")
    assert s.finish() == 1


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "ctrl-c", "ctrl-d"])
def test_leaving_says_quit_and_gives_the_terminal_back(chatclient, how, fake_server):
    import termios

    srv = fake_server(lambda peer: (peer.expect(b"brandon>\\quit\n\0"), peer.wait_close()))
    s = Screen(chatclient, srv.port)
    s.type("brandon\r")
    s.wait_last("brandon>")
    s.type("typed but not sent")
    s.wait_last("brandon>typed but not sent")
    if how.startswith("SIG"):
        s.p.kill(getattr(signal, how))
    else:
        s.type("\x03" if how == "ctrl-c" else "\x15\x04")
    s.wait_last("You left the chat.")
    s.p.expect(pexpect.EOF)
    lflag = termios.tcgetattr(s.p.child_fd)[3]  # the pty's mode, as the client left it
    assert lflag & termios.ICANON and lflag & termios.ECHO
    assert s.finish() == 0
    srv.join()
    assert srv.received == b"brandon>\\quit\n\0"


# -- fuzzing the typed input paths under ASan/UBSan, against an oracle of what must be sent ----

from chatlog.sanitize import is_safe  # noqa: E402

INPUT_MAX = 4096  # bytes of one typed line the client holds (c_client/chatclient.c)


def expected_handle(raw: bytes) -> bool:
    if len(raw) > INPUT_MAX:
        return False
    raw = raw[:-1] if raw.endswith(b"\r") else raw
    if not raw or len(raw) > 40:
        return False
    try:
        h = raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return 1 <= len(h) <= 10 and is_safe(h) and ">" not in h and not any(c.isspace() for c in h)


def expected_message(raw: bytes):
    """The text the client must send for this typed line, or None (refused or empty)."""
    if len(raw) > INPUT_MAX:
        return None
    raw = raw[:-1] if raw.endswith(b"\r") else raw
    if not raw or b"\0" in raw:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return raw if len(text) <= 500 else None


PIECES = [
    lambda r: bytes(r.choice(b"abcXYZ 019>\\*\t") for _ in range(r.randint(1, 12))),
    lambda r: bytes(r.choice([b for b in range(256) if b != 10]) for _ in range(r.randint(1, 20))),
    lambda r: b"\x80" * r.choice([1, 3, 39, 40, 41, 300, 5000]),
    lambda r: "".join(chr(r.choice([r.randint(0x20, 0x7E), r.randint(0xA0, 0xD7FF), r.randint(0x10000, 0x10FFFF)]))
                      for _ in range(r.randint(1, 12))).encode(),
    lambda r: "".join(chr(r.randint(lo, hi)) for lo, hi in r.sample(UNSAFE_RANGES, 3) if not 0xD800 <= lo <= 0xDFFF).encode("utf-8", "replace"),
    lambda r: r.choice([b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82", b"\xff", b"\xf0\x9f\x98", b"\0", b"\r"]),
    lambda r: "\u00e9".encode() * r.choice([250, 499, 500, 501, 2048, 2049]),
    lambda r: b"x" * r.choice([499, 500, 501, 4095, 4096, 4097, 9000]),
]


def random_line(r: random.Random) -> bytes:
    while True:
        line = b"".join(r.choice(PIECES)(r) for _ in range(r.randint(0, 3))).replace(b"\n", b"")
        if line.strip(b" \t") != b"\\quit":
            return line


def answering_server(room: bool):
    def script(peer):
        if room:
            peer.send(ROOM_WELCOME)
        buf = b""
        while True:
            chunk = peer.conn.recv(65536)
            if not chunk:
                return
            peer.server.received += chunk
            buf += chunk
            while b"\n\0" in buf:
                msg, buf = buf.split(b"\n\0", 1)
                if msg.endswith(b">\\quit"):
                    return
                if not room:
                    peer.send(b"SERVER>ok\n")

    return script


def fuzz_once(fake_server, command, seed, room=False, lines=60):
    r = random.Random(seed)
    stdin, sent = [], []
    handle = None
    for _ in range(12):
        h = random_line(r) if r.random() < 0.8 else r.choice([b"ok", b"\xc3\xa9l\xc3\xa8ve\r", b"a" * 10])
        stdin.append(h)
        if expected_handle(h):
            handle = h.rstrip(b"\r")
            break
    else:
        stdin.append(b"ok")
        handle = b"ok"
    for _ in range(lines):
        line = random_line(r)
        stdin.append(line)
        if (text := expected_message(line)) is not None:
            sent.append(text)
    result, received = run_typed(fake_server, command, b"\n".join(stdin) + b"\n", answering_server(room))
    assert result.returncode == 0, (seed, result.stdout[-500:], result.stderr[-2000:])
    want = b"".join(handle + b">" + t + b"\n\0" for t in sent) + handle + b">\\quit\n\0"
    if room:  # in a room the handle is announced as soon as it is chosen
        want = handle + b">\\join\n\0" + want
    assert received == want, f"seed {seed}"
    return len(stdin)


@pytest.mark.asan
@pytest.mark.parametrize("room", [False, True], ids=["turns", "room"])
def test_fuzz_typed_input_under_asan(chatclient_asan, room, fake_server):
    """Random handles and messages, piped in: no sanitizer report, and the server receives exactly
    the lines that should be sent (valid UTF-8, at most 500 code points, nothing leaking from an
    overlong line into the next) and nothing else."""
    start, total = time.monotonic(), 0
    for seed in range(int(os.environ.get("CHATCLIENT_FUZZ_RUNS", "6"))):
        total += fuzz_once(fake_server, [str(chatclient_asan)], seed * 2 + room, room)
    print(f"fuzz: {total} typed lines in {time.monotonic() - start:.1f} s")


def test_client_escapes_exactly_what_the_sanitiser_escapes(chatclient, fake_server):
    """Every code point of every unsafe range, and the neighbours of each range, from a scripted
    server: the client shows each line as `visible()` would."""
    cps = set()
    for lo, hi in UNSAFE_RANGES:
        if 0xD800 <= lo <= 0xDFFF:  # surrogates cannot be sent as UTF-8
            continue
        cps.update(range(lo, hi + 1))
        cps.update(cp for cp in (lo - 1, hi + 1) if 0 <= cp <= 0x10FFFF)
    cps -= {0x00, 0x0A} | set(range(0xD800, 0xE000))  # NUL and newline end a message
    texts = [f"a{chr(cp)}b" for cp in sorted(cps)]
    burst = b"".join(f"SERVER>{t}\n".encode() for t in texts)

    srv = fake_server(lambda peer: (peer.expect(b"hi\n\0"), peer.send(burst + b"\\quit\n")))
    r = subprocess.run([str(chatclient), "127.0.0.1", str(srv.port)], input=b"bob\nhi\n", capture_output=True, timeout=20)
    srv.join()
    assert r.returncode == 0, r.stderr
    shown = [line for line in r.stdout.decode().split("\n") if line.startswith("SERVER>")]
    assert shown == [f"SERVER>{visible(t)}" for t in texts]
    assert sum("\\" in line for line in shown) > 200  # most of them are escapes


@pytest.mark.valgrind
@pytest.mark.parametrize("room", [False, True], ids=["turns", "room"])
def test_typed_input_under_valgrind(chatclient, valgrind, room, fake_server):
    skip_sanitizer_build(chatclient)
    fuzz_once(
        fake_server,
        [valgrind, "--leak-check=full", "--errors-for-leak-kinds=all", "--error-exitcode=99", "-q", str(chatclient)],
        seed=1000 + room, room=room, lines=30,
    )


def test_an_overlong_typed_line_is_refused_and_does_not_leak(chatclient, fake_server):
    """Typed at a terminal: a line longer than the input buffer is refused at Enter, its first
    4096 bytes kept for editing, and none of it reaches the next message once cleared."""
    srv = fake_server(lambda peer: (peer.expect(b"brandon>short\n\0"), peer.send(b"SERVER>ok\n"), peer.expect(b"\\quit\n\0")))
    s = Screen(chatclient, srv.port, cols=200, rows=60)
    s.type("brandon\r")
    s.wait_last("brandon>")
    s.type("y" * 5000 + "\r")
    s.wait(lambda lines: "Message too long (more than 4096 bytes, at most 500 characters); not sent. Its first"
           " 4096 bytes are kept below for editing." in lines and lines[-1] == "y" * (4096 + 8 - 200 * 20))
    s.type("\x15short\r")
    s.wait(lambda lines: "SERVER>ok" in lines)
    s.type("\\quit\r")
    s.wait_last("You left the chat.")
    assert s.finish() == 0
    srv.join()
    assert srv.received == b"brandon>short\n\0brandon>\\quit\n\0"


def test_a_wrapped_typed_line_is_redrawn_whole_below_an_incoming_line(chatclient, fake_server):
    """A typed line wider than the terminal wraps; an incoming line still appears above all of it,
    with no fragment left behind. Keys the editor does not use (Page Up, Insert, F1) insert nothing,
    and typed invisible characters are shown as escapes (but sent as typed)."""
    typed = "0123456789" * 7
    answer = threading.Event()
    handle = "\u00e9l\u00e8ve"

    def script(peer):
        peer.expect(f"{handle}>hi\n\0".encode())
        answer.wait(10)
        peer.send(b"SERVER>answer\n")
        peer.expect(f"{handle}>{typed}\u202e\n\0".encode())
        peer.send(b"SERVER>got it\n")
        peer.expect(b"\\quit\n\0")

    srv = fake_server(script)
    s = Screen(chatclient, srv.port, cols=30, rows=20)
    s.type(f"{handle}\rhi\r")
    s.wait_last(f"{handle}>")
    s.type(typed[:35] + "\x1b[5~\x1b[2~\x1bOP" + typed[35:] + "\u202e")
    want = f"{handle}>{typed}\\u202e"
    rows = [want[i : i + 30] for i in range(0, len(want), 30)]
    s.wait(lambda lines: lines[-len(rows) :] == rows)
    answer.set()
    lines = s.wait(lambda lines: lines[-len(rows) - 1 :] == ["SERVER>answer", *rows])
    assert not any("0123" in line for line in lines[: -len(rows)])  # nothing left of the old rows
    s.type("\r")
    s.wait(lambda lines: "SERVER>got it" in lines)
    s.type("\\quit\r")
    s.wait_last("You left the chat.")
    assert s.finish() == 0
    srv.join()


def _blocked_in_send(pid):
    try:
        with open(f"/proc/{pid}/stack") as f:
            return "sk_stream_wait_memory" in f.read()  # the socket buffer is full
    except OSError:
        return False


def _can_read_stacks():
    try:
        with open(f"/proc/{os.getpid()}/stack") as f:
            f.read()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _can_read_stacks(), reason="needs /proc/PID/stack (root)")
def test_sigterm_ends_a_client_blocked_on_a_server_that_does_not_read(chatclient, fake_server):
    """In a room, lines are sent as they are typed; a server that stops reading fills the socket.
    SIGTERM must still end the client (no retrying send() forever), with a final line."""
    release = threading.Event()

    def script(peer):
        peer.conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        peer.send(ROOM_WELCOME)
        release.wait(30)  # never reads until the test is over

    srv = fake_server(script)
    proc = subprocess.Popen([str(chatclient), "127.0.0.1", str(srv.port)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def feed():
        try:
            proc.stdin.write(b"bob\n" + (b"x" * 500 + b"\n") * 20000)
        except (BrokenPipeError, ValueError):
            pass

    threading.Thread(target=feed, daemon=True).start()
    deadline = time.monotonic() + 20
    while not _blocked_in_send(proc.pid):
        assert time.monotonic() < deadline and proc.poll() is None, "the client never filled the socket"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("SIGTERM did not end a client blocked in send()") from None
    finally:
        release.set()
    assert proc.returncode == 0, err
    assert out.decode().rstrip("\n").split("\n")[-1] == "You left the chat."


@pytest.mark.skipif(not _can_read_stacks(), reason="needs /proc/PID/stack (root)")
def test_ctrl_c_while_connecting_ends_at_once(chatclient):
    """A listener whose backlog is full leaves connect() waiting: Ctrl-C ends it with one line."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(0)
    port = lst.getsockname()[1]
    fillers = []
    for _ in range(3):  # fill the backlog (never accepted)
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(("127.0.0.1", port))
        fillers.append(f)
    proc = subprocess.Popen([str(chatclient), "127.0.0.1", str(port)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            with open(f"/proc/{proc.pid}/stack") as f:
                if "connect" in f.read():
                    break
            assert time.monotonic() < deadline, "the client was never left waiting in connect()"
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=5)
    finally:
        proc.kill()
        for f in fillers:
            f.close()
        lst.close()
    assert proc.returncode == 1
    assert err.decode() == f"chatclient: cannot connect to 127.0.0.1 port {port}: interrupted\n"


KEYS = (
    [chr(c) for c in range(0x20, 0x7F)] * 4
    + ["\u00e9", "\u65e5", "\U0001f600", "\u202e", "\u0085", "\x9b"]
    + ["\x7f", "\x08", "\x15", "\x17", "\x1b[A", "\x1b[1;5D", "\x1bOB", "\x1b", "\x1bx", "\t", "\x01", "\x0c"]
    + ["\x1b[D", "\x1b[C", "\x1b[B", "\x1b[H", "\x1b[F", "\x1b[3~", "\x05", "\x0b", "\x1bb", "\x1b[1;5C"]
    + ["\r"] * 6
)


@pytest.mark.asan
def test_fuzz_keystrokes_in_a_terminal_under_asan(chatclient_asan, fake_server):
    """Random keys (editing keys, escape sequences, multibyte characters, Enter) typed into the
    line editor of the sanitizer build: no report, and every line the server gets is well formed."""
    fuzz_keys(fake_server, chatclient_asan)


@pytest.mark.valgrind
def test_fuzz_keystrokes_in_a_terminal_under_valgrind(chatclient, valgrind, fake_server):
    skip_sanitizer_build(chatclient)
    fuzz_keys(fake_server, chatclient, wrapper=(valgrind, "--error-exitcode=99", "--leak-check=full",
                                   "--errors-for-leak-kinds=all", "-q"))


def fuzz_keys(fake_server, chatclient, wrapper=()):
    def script(peer):
        buf = b""
        while True:
            chunk = peer.conn.recv(65536)
            if not chunk:
                return
            peer.server.received += chunk
            buf += chunk
            while b"\n\0" in buf:
                msg, buf = buf.split(b"\n\0", 1)
                if msg.endswith(b">\\quit"):
                    return
                peer.send(b"SERVER>ok " + msg[-20:] + b"\n")

    r = random.Random(5)
    for _ in range(int(os.environ.get("CHATCLIENT_KEY_FUZZ_RUNS", "1"))):
        srv = fake_server(script)
        s = Screen(chatclient, srv.port, cols=50, rows=20, wrapper=wrapper)
        s.type("fuzz\r")
        s.wait_last("fuzz>")
        for _ in range(40):
            s.type("".join(r.choice(KEYS) for _ in range(r.randint(1, 60))))
        s.type("\x05\x15\\quit\r")  # Ctrl-E, Ctrl-U: an empty line wherever the cursor was
        s.wait(lambda lines: bool(lines) and lines[-1] == "You left the chat.", timeout=30)
        assert s.finish() == 0, s.raw[-2000:]
        srv.join()
        assert not any(m in s.raw for m in (*SANITIZER_MARKERS, "Invalid read", "uninitialised")), s.raw[-3000:]
        msgs = srv.received.split(b"\n\0")
        assert msgs[-2:] == [b"fuzz>\\quit", b""]
        for msg in msgs[:-2]:
            text = msg.decode("utf-8")  # valid UTF-8, or this raises
            assert text.startswith("fuzz>") and 0 < len(text) - 5 <= 500 and "\0" not in text


@pytest.mark.skipif(not _can_read_stacks(), reason="needs /proc/PID/stack (root)")
def test_a_signal_while_busy_printing_is_not_lost(chatclient, fake_server):
    """SIGTERM arriving while the client is busy (here: blocked writing to a full stdout) and not
    in poll() must still end it: a flag checked only after poll() returned was missed, and the
    client then waited in poll() for ever."""
    # one burst (one recv) whose escapes print four times its size: more than a pipe holds
    flood = (b"SERVER>" + b"\x01" * 100 + b"\n") * 300
    srv = fake_server(lambda peer: (peer.expect(b"hi\n\0"), peer.send(flood), peer.expect(b"\\quit\n\0")))
    proc = subprocess.Popen([str(chatclient), "127.0.0.1", str(srv.port)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.write(b"bob\nhi\n")
    proc.stdin.flush()  # and left open: no end of input
    try:
        deadline = time.monotonic() + 10
        while True:
            with open(f"/proc/{proc.pid}/stack") as f:
                if "pipe_write" in f.read():  # stdout is full and nobody reads it yet
                    break
            assert time.monotonic() < deadline, "the client never filled its stdout"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        out = []
        reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
        reader.start()  # stdin stays open: only the signal may end the client
        proc.wait(timeout=5)
        reader.join(5)
    except subprocess.TimeoutExpired:
        raise AssertionError("SIGTERM was lost: the client still runs") from None
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert out[0].endswith(b"You left the chat.\n")
    srv.join()


def test_a_terminal_hangup_sends_nothing_half_typed(chatclient, fake_server):
    """The terminal goes away under the client (here one that is not its controlling terminal, so
    no SIGHUP comes: only the end of input): what was half typed is not sent."""
    import pty as ptymod

    srv = fake_server(lambda peer: (peer.expect(b"\\quit\n\0"), peer.wait_close()))
    master, slave = ptymod.openpty()
    proc = subprocess.Popen([str(chatclient), "127.0.0.1", str(srv.port)], stdin=slave, stdout=slave,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    os.close(slave)
    seen = b""
    for keys, want in ((b"", b"handle to be> "), (b"brandon\r", b"brandon>"), (b"half typ", b"half typ")):
        os.write(master, keys)
        while not seen.endswith(want):
            seen += os.read(master, 4096)
    os.close(master)  # hang up
    assert proc.wait(timeout=10) == 0
    srv.join()
    assert srv.received == b"brandon>\\quit\n\0"


def test_the_last_line_of_piped_input_needs_no_newline(chatclient, fake_server):
    srv = fake_server(lambda peer: (peer.expect(b"bob>last words\n\0"), peer.send(b"SERVER>ok\n"), peer.expect(b"bob>\\quit\n\0")))
    r = subprocess.run([str(chatclient), "127.0.0.1", str(srv.port)], input=b"bob\nlast words", capture_output=True, timeout=20)
    srv.join()
    assert r.returncode == 0 and r.stdout.endswith(b"SERVER>ok\nYou left the chat.\n"), r.stdout


# -- the client's framer against the server's: one set of framing rules ------------------------

import struct  # noqa: E402

from chatlog.protocol import Framer  # noqa: E402

TOKENS = [
    b"SERVER>hello\n", b"SERVER> spaced\r\n", b"x\n\0", b"bare words", b"\r\n", b"\n", b"\r",
    b"caf\xc3", b"\xa9\n", b"SERVER>no end", b"y" * 3000, b"z" * 8191 + b"\r\n", b"\x1b[2J\n",
]
JUNK = bytes(b for b in range(256) if b != ord(">"))
GAPS = [0, 5, 60, 149, 151, 400]  # ms; never exactly the 150 ms quiet interval


def random_script(r: random.Random):
    """Bursts, quiet checks and our turns. While padding lasts (after a NUL, until the sender is
    quiet or we speak) only junk with no line in it follows: the server now also ends padding at a
    line that starts again with the same handle, a rule docs/protocol.md does not have yet."""
    script, now, last, padding = [], 1000, 1000, False
    for _ in range(r.randint(1, 12)):
        op = r.random()
        now += r.choice(GAPS)
        if op < 0.15:
            script.append(("Q", now))
            continue
        if op < 0.2:
            script.append(("S",))
            padding = False
            continue
        if padding and now - last < 150:
            data = bytes(r.choice(JUNK) for _ in range(r.randint(1, 50)))  # more padding, no line
        else:
            data = b"".join(r.choice(TOKENS) for _ in range(r.randint(0, 4)))
            padding = False
            if r.random() < 0.3:  # NUL padding to the end of the burst
                data += b"\0" + bytes(r.choice(JUNK) for _ in range(r.randint(0, 100)))
                padding = True
        if data:
            script.append(("B", now, data))
            last = now
    script.append(("E",))
    return script


def server_framing(script):
    f, out, now = Framer(quiet=0.15), [], 0
    for op in script:
        if op[0] == "B":
            now = op[1]
            # the server's loop completes an unterminated line at its deadline when nothing more
            # has arrived: a reader on time, as the client always is
            deadline = f.deadline()
            frames = f.flush_if_quiet(now / 1000) if deadline is not None and now / 1000 >= deadline else []
            frames += f.feed(op[2], now / 1000)
        elif op[0] == "Q":
            frames = f.flush_if_quiet(op[1] / 1000)
        elif op[0] == "S":
            frames = f.spoke()
        else:
            frames = f.flush(now / 1000)
        out += [fr.payload for fr in frames if not fr.padding]
    return out


def encode_script(script):
    out = b""
    for op in script:
        if op[0] == "B":
            out += b"B" + struct.pack("<qI", op[1], len(op[2])) + op[2]
        elif op[0] == "Q":
            out += b"Q" + struct.pack("<q", op[1])
        else:
            out += op[0].encode()
    return out


def client_framing(binary, scripts):
    """The messages framer-check makes of each script (one process, reset between scripts)."""
    data = b"".join(encode_script(script) + b"R" for script in scripts)
    r = subprocess.run([str(binary)], input=data, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode("utf-8", "replace")[-2000:]
    out, current, data, i = [], [], r.stdout, 0
    while i < len(data):
        (n,) = struct.unpack_from("<I", data, i)
        i += 4
        if n == 0xFFFFFFFF:
            out.append(current)
            current = []
            continue
        current.append(data[i : i + n])
        i += n
    return out


@pytest.mark.asan
def test_client_and_server_frame_alike():
    """The client's framer (alone, under ASan) and the server's Framer split the same bursts into
    the same messages: NUL padding, quiet completion, CRLF, \\n\\0, overlong lines, split UTF-8."""
    subprocess.run(["make", "-s", "-C", str(ROOT), "framer-check"], check=True)
    binary = ROOT / "framer-check"
    r = random.Random(11)
    scripts = [random_script(r) for _ in range(int(os.environ.get("CHATCLIENT_FRAMER_RUNS", "2000")))]
    for script, got in zip(scripts, client_framing(binary, scripts), strict=True):
        assert got == server_framing(script), script


@pytest.mark.skipif(not shutil.which("bash"), reason="needs bash")
def test_ctrl_z_gives_the_terminal_back_and_fg_resumes(chatclient, tmp_path, fake_server):
    """In an interactive shell: Ctrl-Z stops the client with the terminal back in the shell's mode;
    `fg` brings the client back with the prompt and the half-typed text redrawn."""
    srv = fake_server(lambda peer: (peer.expect(b"brandon>abcdef\n\0"), peer.send(b"SERVER>ok\n"), peer.expect(b"\\quit\n\0")))
    env = dict(os.environ, TERM="xterm", PS1="$ ", HOME=str(tmp_path))
    p = pexpect.spawn("bash", ["--norc", "--noprofile", "-i"], env=env, encoding="utf-8", timeout=10,
                      dimensions=(24, 80))
    p.expect_exact("$ ")
    p.sendline(f"{chatclient} 127.0.0.1 {srv.port}")
    p.expect_exact("handle to be> ")
    p.send("brandon\r")
    p.expect_exact("brandon>")
    p.send("abc")
    p.expect_exact("abc")
    p.send("\x1a")  # Ctrl-Z
    p.expect("Stopped")
    p.expect_exact("$ ")
    p.sendline("stty -a")  # the shell's terminal is in canonical mode with echo again
    p.expect(r"\sicanon\s")
    p.expect_exact("$ ")
    p.sendline("fg")
    p.expect_exact("brandon>abc")
    p.send("def\r")
    p.expect_exact("SERVER>ok")
    p.send("\\quit\r")
    p.expect_exact("You left the chat.")
    p.expect_exact("$ ")
    p.sendline("echo status=$?")  # (a stopped job's command list is not carried on by the shell)
    p.expect_exact("status=0")
    p.sendline("exit")
    p.expect(pexpect.EOF)
    srv.join()
