"""./chatclient says `\\caps notify` to a chatlog server that queued it, and so hears at once
that its chat has begun (docs/protocol.md); turns stay as they were."""

import threading

from conftest import spawn_client
from test_chatclient import Screen

WAITING = b"SERVER>*** Waiting: 1 ahead of you. Your chat begins when they are done.\n"


def test_a_queued_client_announces_notify_and_shows_begun_at_once(chatclient, fake_server):
    served = threading.Event()

    def script(peer):
        peer.expect(b"brandon>one\n\0")
        peer.send(WAITING)
        peer.expect(b"brandon>\\caps notify\n\0")  # at once, before anything is typed
        peer.expect(b"brandon>two\n\0")  # held by the server: brandon waits for an answer
        served.wait(10)
        peer.send(b"SERVER>*** Your chat has begun.\n")  # alone: not the answer to two
        peer.send(b"SERVER>hello brandon\n")
        peer.expect(b"brandon>three\n\0")
        peer.send(b"SERVER>bye\n")
        peer.expect(b"brandon>\\quit\n\0")

    srv = fake_server(script)
    s = Screen(chatclient, srv.port)
    s.type("brandon\rone\r")
    s.wait(lambda lines: "[Waiting: 1 ahead of you. Your chat begins when they are done.]" in lines)
    s.type("two\r")
    s.wait_last("brandon>")
    served.set()
    s.wait(lambda lines: "[Your chat has begun.]" in lines)
    s.type("three\r")  # typed before the answer: the begun notice was not it
    s.wait(lambda lines: "SERVER>bye" in lines)
    lines = s.lines()
    i = lines.index("[Your chat has begun.]")
    assert lines[i:i + 3] == ["[Your chat has begun.]", "SERVER>hello brandon", "brandon>three"]
    s.type("\\quit\r")
    s.wait_last("You left the chat.")
    assert s.finish() == 0
    srv.join()
    assert srv.received == (b"brandon>one\n\0brandon>\\caps notify\n\0brandon>two\n\0"
                            b"brandon>three\n\0brandon>\\quit\n\0")


def test_a_server_that_never_queues_never_hears_caps(chatclient, fake_server):
    def script(peer):
        peer.expect(b"brandon>one\n\0")
        peer.send(b"SERVER>*** not a waiting notice\nSERVER>answer\n")
        peer.expect(b"brandon>\\quit\n\0")

    srv = fake_server(script)
    s = Screen(chatclient, srv.port)
    s.type("brandon\rone\r")
    s.wait(lambda lines: "SERVER>answer" in lines)
    s.type("\\quit\r")
    s.wait_last("You left the chat.")
    assert s.finish() == 0
    srv.join()
    assert srv.received == b"brandon>one\n\0brandon>\\quit\n\0"


def test_with_chatlog_a_queued_client_learns_at_once_its_chat_has_begun(chatclient, server):
    first = spawn_client(chatclient, server, handle="first")
    first.sendline("one")
    server.wait_for("^first>one$")
    second = spawn_client(chatclient, server, handle="second")
    second.sendline("waiting here")
    second.expect_exact("Waiting: 1 ahead of you")
    server.wait_for("is waiting")
    server.say("hello first")
    first.expect_exact("SERVER>hello first")
    first.sendline("\\quit")
    first.expect_exact("You left the chat.")
    second.expect_exact("[Your chat has begun.]")  # without typing anything more
    second.sendline("ready")
    server.wait_for("^second>ready$")
    server.say("hello second")
    second.expect_exact("SERVER>hello second")
    assert "Your chat has begun" not in second.before  # said once
    second.sendline("\\quit")
    second.expect_exact("You left the chat.")
    server.wait_for(r"client has quit \(session 2")
