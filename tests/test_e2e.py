"""The real ./chatclient in a pseudo-terminal against the real `chatlog serve`."""

import signal

import pexpect
import pytest
from conftest import db_rows, login, spawn_client


def test_the_readme_chat(chatclient, server):
    p = spawn_client(chatclient, server, handle="brandon")
    p.sendline("hello server")
    server.wait_for("^brandon>hello server$")
    server.say("why hello client")
    p.expect_exact("SERVER>why hello client")
    p.expect_exact("brandon>")
    p.sendline("how are you")
    server.wait_for("^brandon>how are you$")
    server.say("good")
    p.expect_exact("SERVER>good")
    p.expect_exact("brandon>")
    p.sendline("\\quit")
    p.expect_exact("You left the chat.")
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0
    server.wait_for(r"client has quit \(session 1, 2 messages each way\)")
    assert db_rows(server.db, "SELECT sender, handle, text, raw FROM messages ORDER BY seq") == [
        ("client", "brandon", "hello server", None),
        ("server", "SERVER", "why hello client", None),
        ("client", "brandon", "how are you", None),
        ("server", "SERVER", "good", None),
    ]
    assert db_rows(server.db, "SELECT handle, end_reason FROM sessions") == [("brandon", "client-quit")]


def test_server_quits(chatclient, server):
    p = spawn_client(chatclient, server, handle="brandon")
    p.sendline("bye?")
    server.wait_for("^brandon>bye\\?$")
    server.say("\\quit")
    # the current server sends a bare \quit; with the documented notices it reads the same
    p.expect_exact("The server closed the chat.")
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0
    assert db_rows(server.db, "SELECT end_reason FROM sessions") == [("server-quit",)]


def test_client_killed_mid_turn(chatclient, server):
    p = spawn_client(chatclient, server, handle="brandon")
    p.sendline("hi")
    server.wait_for("^brandon>hi$")
    p.kill(signal.SIGKILL)
    server.wait_for(r"client has disconnected \(session 1")
    assert db_rows(server.db, "SELECT end_reason FROM sessions") == [("disconnect",)]


def test_server_gone_while_the_user_types(chatclient, server):
    p = spawn_client(chatclient, server, handle="brandon")
    p.sendline("hi")
    server.wait_for("^brandon>hi$")
    server.say("go ahead")
    p.expect_exact("SERVER>go ahead")
    p.expect_exact("brandon>")
    p.send("I am typing and hav")  # no Enter
    server.signal(signal.SIGTERM)
    p.expect_exact("The server shut down.")  # the notice before \quit, as the last line
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus in (0, 1)
    assert db_rows(server.db, "SELECT end_reason FROM sessions") == [("shutdown",)]


def test_waiting_client_is_served_next(chatclient, server):
    first = spawn_client(chatclient, server, handle="first")
    first.sendline("one")
    server.wait_for("^first>one$")
    second = spawn_client(chatclient, server, handle="second")
    second.sendline("waiting here")
    second.expect_exact("Waiting: 1 ahead of you")  # the queue answers for the operator
    server.wait_for("is waiting")
    server.say("hello first")
    first.expect_exact("SERVER>hello first")
    first.sendline("\\quit")
    first.expect(pexpect.EOF)
    server.wait_for("^second>waiting here$")
    second.sendline("ready")
    server.wait_for("^second>ready$")
    server.say("hello second")
    second.expect_exact("Your chat has begun.")
    second.expect_exact("SERVER>hello second")
    second.sendline("\\quit")
    second.expect(pexpect.EOF)
    server.wait_for(r"client has quit \(session 2")
    rows = db_rows(server.db, "SELECT id, handle, end_reason, client_messages FROM sessions ORDER BY id")
    assert rows == [(1, "first", "client-quit", 1), (2, "second", "client-quit", 2)]


def test_hostile_operator_text_is_inert_in_the_client(chatclient, server):
    p = spawn_client(chatclient, server, handle="brandon")
    p.sendline("hi")
    server.wait_for("^brandon>hi$")
    server.say("\x1b[2J\x1b]0;title\x07 %s%n%x \u202e")
    p.expect_exact("SERVER>")
    p.expect_exact("\r\n")
    shown = p.before
    assert "\x1b" not in shown and "\x07" not in shown and "\u202e" not in shown
    assert "\\x1b[2J\\x1b]0;title\\x07 %s%n%x \\u202e" in shown
    p.sendline("\\quit")
    p.expect(pexpect.EOF)


def test_end_of_input_is_quit(chatclient, server):
    p = spawn_client(chatclient, server, handle="brandon")
    p.sendline("hi")
    server.wait_for("^brandon>hi$")
    server.say("yes")
    p.expect_exact("SERVER>yes")
    p.expect_exact("brandon>")
    p.sendeof()
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0
    server.wait_for(r"client has quit \(session 1")


@pytest.mark.parametrize("length,sent", [(500, True), (501, False)])
def test_message_length_limit(chatclient, server, length, sent):
    p = spawn_client(chatclient, server, handle="brandon")
    p.sendline("x" * length)
    if sent:
        server.wait_for("^brandon>x{500}$")
    else:
        p.expect("too long")
        p.sendline("\x15short")  # the refused line is kept for editing: Ctrl-U clears it
        server.wait_for("^brandon>short$")
        assert db_rows(server.db, "SELECT text FROM messages") == [("short",)]


# -- the notices the server sends, as the client shows them ----------------------------------------


def test_busy_is_said_before_a_handle_is_asked(chatclient, start_server):
    server = start_server("--max-waiting", "0")
    first = spawn_client(chatclient, server, handle="first")
    first.sendline("one")
    server.wait_for("^first>one$")
    second = spawn_client(chatclient, server)
    second.expect_exact("The server is busy; try again later.")
    second.expect(pexpect.EOF)  # (not asked for a handle, unless the server took over 100 ms)
    second.close()
    assert second.exitstatus == 0
    first.sendline("\\quit")
    first.expect(pexpect.EOF)


def test_another_server_handle_and_the_idle_timeout(chatclient, start_server):
    server = start_server("--handle", "HAL", "--idle-timeout", "1")
    p = spawn_client(chatclient, server, handle="brandon")
    p.sendline("open the pod bay doors")
    server.wait_for("^brandon>open the pod bay doors$")
    server.say("I'm afraid I can't do that")
    p.expect_exact("HAL>I'm afraid I can't do that\r\n")
    p.expect_exact("No message for 1 s: timed out.")
    p.expect(pexpect.EOF)
    assert "***" not in p.before
    p.close()
    assert p.exitstatus == 0


def test_a_room_through_the_real_server(chatclient, start_server):
    server = start_server("--room")

    def join(handle, here):
        p = spawn_client(chatclient, server)
        p.expect_exact(f"[Welcome to the room: {here} here. Type at any time.]")
        login(p, handle)
        return p

    alice = join("alice", 1)
    alice.sendline("anyone here?")
    bob = join("bob", 2)
    bob.sendline("hello all")
    alice.expect_exact("[bob joined]")
    alice.expect_exact("bob>hello all")
    alice.sendline("one")  # no turns: two lines in a row, no answer between them
    alice.sendline("two")
    bob.expect_exact("alice>one")
    bob.expect_exact("alice>two")
    bob.sendline("\\quit")
    bob.expect_exact("You left the chat.")
    bob.expect(pexpect.EOF)
    alice.expect_exact("[bob left]")
    server.say("\\quit")
    alice.expect_exact("The server closed the chat.")
    alice.expect(pexpect.EOF)
    alice.close()
    assert alice.exitstatus == 0
