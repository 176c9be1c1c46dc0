"""The operator at a real terminal (a pseudo-terminal): readline editing, prompts, Ctrl-C."""

import os
import socket
import sys

import pexpect
import pytest
from conftest import ending, ROOT, db_rows, recv_until


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
    p.expect("SERVER>")
    p.sendeof()
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0
    assert recv_until(c, b"\\quit\n") == ending("The server closed the chat.")
    assert db_rows(p.db, "SELECT end_reason FROM sessions")[0][0] == "server-quit"
