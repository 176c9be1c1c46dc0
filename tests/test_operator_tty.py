"""The operator at a real terminal (a pseudo-terminal): readline editing, prompts, Ctrl-C."""

import os
import re
import socket
import sys

import pexpect
import pytest
from conftest import ROOT, db_rows, ending, recv_until, wait_until


@pytest.fixture
def tty_server(tmp_path):
    env = dict(os.environ, TERM="xterm", NO_COLOR="1")
    db = tmp_path / "tty.db"
    p = pexpect.spawn(
        sys.executable,
        ["-m", "chatlog", "serve", "0", "--db", str(db), "--bind", "127.0.0.1"],
        env=env, cwd=str(ROOT), encoding="utf-8", timeout=10,
    )
    p.expect(r"port (\d+)\r\n")
    p.port = int(p.match.group(1))
    p.db = db
    p.expect("Awaiting client connections")
    yield p
    p.terminate(force=True)


def test_prompt_line_editing_and_disconnect_while_typing(tty_server):
    p = tty_server
    c = socket.create_connection(("127.0.0.1", p.port))
    c.sendall(b"bob>hi\n\0")
    p.expect("bob>hi")
    p.expect("SERVER>")
    p.send("hel")
    p.sendcontrol("h")  # backspace: readline editing works
    p.send("lo there\r")
    assert recv_until(c, b"\n") == b"SERVER>helo there\n"
    c.sendall(b"bob>second\n\0")
    p.expect("bob>second")
    p.expect("SERVER>")
    p.send("half a thou")  # the operator is typing when the client leaves
    c.close()
    p.expect(r"client has disconnected \(session 1, 2 from the client, 1 from the server\)")
    assert db_rows(p.db, "SELECT end_reason FROM sessions")[0][0] == "disconnect"
    p.sendcontrol("c")
    p.expect("Server stopped \\(SIGINT\\)")
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0


def test_ctrl_c_at_the_prompt_closes_the_session(tty_server):
    p = tty_server
    c = socket.create_connection(("127.0.0.1", p.port))
    c.sendall(b"bob>hi\n\0")
    p.expect_exact("bob>hi")  # (the idle prompt before it is not its prompt)
    p.expect("SERVER>")
    p.sendcontrol("c")
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0
    assert recv_until(c, b"\\quit\n") == ending("The server shut down.")
    assert db_rows(p.db, "SELECT end_reason FROM sessions")[0][0] == "shutdown"


def test_ctrl_d_ends_the_chat_and_the_server(tty_server):
    p = tty_server
    c = socket.create_connection(("127.0.0.1", p.port))
    c.sendall(b"bob>hi\n\0")
    p.expect_exact("bob>hi")  # (the idle prompt before it is not its prompt)
    p.expect("SERVER>")
    p.sendeof()
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0
    assert recv_until(c, b"\\quit\n") == ending("The server closed the chat.")
    assert db_rows(p.db, "SELECT end_reason FROM sessions")[0][0] == "server-quit"


def test_text_typed_before_the_prompt_never_answers_anyone(tty_server):
    """At a terminal, a line the operator typed during the client's turn (or with nobody
    connected) used to answer the next message, even from a different client: "it is hunter2"
    reached mallory. Text typed before the prompt appears is discarded, and the operator told."""
    p = tty_server
    amy = socket.create_connection(("127.0.0.1", p.port))
    amy.sendall(b"amy>what is the password?\n\0")
    p.expect_exact("amy>what is the password?")  # (the idle prompt before it is not its prompt)
    p.expect("SERVER>")
    p.send("ask me later\r")
    assert recv_until(amy, b"\n") == b"SERVER>ask me later\n"
    p.send("it is hunter2\r")  # typed during amy's turn: no prompt is on screen
    amy.sendall(b"amy>\\quit\n\0")
    p.expect(r"client has quit")
    # As the next prompt (for commands) comes: thrown away, or (when the terminal had not yet
    # delivered it) read there and refused: either way it answers nobody.
    p.expect(r"discarded what was typed before the prompt appeared|no client is waiting for an answer; line not sent")
    mallory = socket.create_connection(("127.0.0.1", p.port))
    mallory.sendall(b"mallory>hi\n\0")
    p.expect("mallory>hi")
    p.expect("SERVER>")
    p.send("hello mallory\r")
    assert recv_until(mallory, b"\n") == b"SERVER>hello mallory\n"
    texts = [t for (t,) in db_rows(p.db, "SELECT text FROM messages ORDER BY id")]
    assert "it is hunter2" not in texts


def test_a_line_begun_at_a_stale_prompt_is_not_sent_to_the_next_client(tty_server):
    """The prompt was up for amy, amy left while the operator was typing; mallory's message
    arrives and the operator presses Enter: that line was begun before mallory's message."""
    p = tty_server
    amy = socket.create_connection(("127.0.0.1", p.port))
    amy.sendall(b"amy>secret?\n\0")
    p.expect_exact("amy>secret?")  # (the idle prompt before it is not its prompt)
    p.expect("SERVER>")
    p.send("amy, it is hun")
    amy.close()
    p.expect("client has disconnected")
    mallory = socket.create_connection(("127.0.0.1", p.port))
    mallory.sendall(b"mallory>hi\n\0")
    p.expect("mallory>hi")
    p.send("ter2\r")
    p.expect("discarded a line begun before the message it would answer")
    p.expect("SERVER>")
    p.send("hello mallory\r")
    assert recv_until(mallory, b"\n") == b"SERVER>hello mallory\n"
    texts = [t for (t,) in db_rows(p.db, "SELECT text FROM messages ORDER BY id")]
    assert not any("hun" in t for t in texts)


def test_the_room_operator_can_type_line_after_line(tmp_path):
    env = dict(os.environ, TERM="xterm", NO_COLOR="1")
    p = pexpect.spawn(
        sys.executable,
        ["-m", "chatlog", "serve", "0", "--room", "--db", str(tmp_path / "r.db"), "--bind", "127.0.0.1"],
        env=env, cwd=str(ROOT), encoding="utf-8", timeout=10,
    )
    try:
        p.expect(r"port (\d+)\r\n")
        port = int(p.match.group(1))
        p.expect("The room is open")
        c = socket.create_connection(("127.0.0.1", port))
        recv_until(c, b"\n")
        c.sendall(b"amy>hi\n")
        p.expect("amy>hi")
        for text in ("one", "two", "three"):
            p.expect("SERVER>")
            p.send(text + "\r")
            assert recv_until(c, text.encode() + b"\n").endswith(b"SERVER>" + text.encode() + b"\n")
        p.expect("SERVER>")
        p.send("\\who\r")
        p.expect(r"1 here:")
        p.expect("SERVER>")
        p.send("\\quit\r")
        p.expect(pexpect.EOF)
    finally:
        p.terminate(force=True)


def test_a_line_refused_as_too_long_gives_the_operator_the_prompt_again(tty_server):
    """An answer over 500 characters is refused ("message too long ... not sent"), and the
    chat still waits for the operator's answer; but no prompt came back and what was typed
    next went nowhere: the chat was stuck until the client gave up."""
    p = tty_server
    c = socket.create_connection(("127.0.0.1", p.port))
    c.sendall(b"bob>hi\n\0")
    p.expect_exact("bob>hi")  # (the idle prompt before it is not its prompt)
    p.expect("SERVER>")
    p.send("y" * 600 + "\r")
    p.expect("too long")
    p.expect("SERVER>")
    p.send("shorter\r")
    assert recv_until(c, b"\n") == b"SERVER>shorter\n"


def _last_screen_line(output: str) -> str:
    """What the terminal's last line shows once `output` is written: after its last newline,
    what follows the last carriage return or erase-line."""
    last = output.rsplit("\n", 1)[-1]
    return re.split(r"\r|\x1b\[K", last)[-1]


def test_quit_with_nobody_connected_stops_the_server(tty_server):
    """With nobody connected no prompt was up and `\\quit` sat unread in the terminal."""
    p = tty_server
    p.expect_exact("SERVER>")
    p.send("hello?\r")
    p.expect_exact("(no client is waiting for an answer; line not sent)")
    p.expect_exact("SERVER>")
    p.send("\\quit\r")
    p.expect_exact("The operator quit; server stopped")
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0


@pytest.mark.parametrize("room", [False, True])
def test_no_stray_prompt_is_left_after_ctrl_c(tmp_path, room):
    """Ctrl-C at the prompt left `SERVER>` drawn after the last line, before the shell's prompt."""
    env = dict(os.environ, TERM="xterm", NO_COLOR="1")
    p = pexpect.spawn(
        sys.executable,
        ["-m", "chatlog", "serve", "0", "--db", str(tmp_path / "t.db"), "--bind", "127.0.0.1"]
        + (["--room"] if room else []),
        env=env, cwd=str(ROOT), encoding="utf-8", timeout=10,
    )
    p.expect(r"port (\d+)\r\n")
    port = int(p.match.group(1))
    if not room:
        c = socket.create_connection(("127.0.0.1", port))
        c.sendall(b"bob>hi\n\0")
        p.expect_exact("bob>hi")
    p.expect_exact("SERVER>")
    p.send("half typed")
    p.expect_exact("half typed")  # on screen (readline echoes it), then Ctrl-C
    p.sendcontrol("c")
    p.expect_exact("Server stopped (SIGINT)")
    p.expect(pexpect.EOF)
    rest = p.before
    p.close()
    assert p.exitstatus == 0
    assert _last_screen_line("Server stopped (SIGINT)" + rest) == "", repr(rest)


def test_keystrokes_not_yet_read_count_as_typed():
    """A line is stale if it was begun before the message it would answer, even when the line
    editor's thread has not yet taken its first keystrokes from the terminal (a busy machine:
    the line was then sent to the next client)."""
    import io
    import pty
    import tty

    from chatlog.operator import unread

    master, slave = pty.openpty()
    tty.setraw(slave)  # as the line editor has it while it reads
    try:
        with io.open(slave, "rb", buffering=0, closefd=False) as term:
            assert not unread(term)
            os.write(master, b"amy, it is hun")
            assert wait_until(lambda: unread(term), timeout=5)
            os.read(slave, 100)
            assert not unread(term)
        assert not unread(io.BytesIO())  # not a terminal: nothing waits there
    finally:
        os.close(master)
        os.close(slave)


def test_a_discarded_lines_note_is_on_screen_before_the_prompt_comes_back(monkeypatch):
    """The operator's Enter on a stale line: the note that it was discarded is written first,
    and only then is the line editor asked for the prompt again (it was asked at once, while
    the note still waited for the end of the pass, and a busy machine drew the prompt above
    the note: the operator was left typing below it, at no prompt)."""
    import builtins
    import io
    import pty
    import queue

    from chatlog.operator import Console, Operator

    prompts, answers = queue.Queue(), queue.Queue()
    r, w = os.pipe()
    os.set_blocking(r, False)

    def screen() -> bytes:
        try:
            return os.read(r, 65536)
        except BlockingIOError:
            return b""

    def line_editor(prompt):  # input(), as the terminal thread calls it: what is on screen then
        prompts.put(screen())
        return answers.get(timeout=10)

    monkeypatch.setattr(builtins, "input", line_editor)
    master, slave = pty.openpty()
    out = os.fdopen(w, "w")
    console = Console(out)
    try:
        with io.open(slave, "rb", buffering=0, closefd=False) as term:
            op = Operator(term, console)
            op.want(True)
            prompts.get(timeout=5)  # the prompt is up
            op._stale = True  # (what want() finds when a message arrives while a line is begun)
            answers.put("amy, it is hunter2")  # Enter
            assert wait_until(lambda: op._events, timeout=5)
            for note in op.read_available():  # as the loop does: the note is this pass's
                console.write(note)
            assert not op._request.is_set()  # not before the note is written
            console.flush()  # the pass ends
            assert b"discarded a line begun before the message" in prompts.get(timeout=5)
            answers.put(None)
    finally:
        console.close()
        out.close()
        os.close(r)
        os.close(master)
        os.close(slave)
