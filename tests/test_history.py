"""A room's history from the record: a name kept across runs, the last N lines shown to a client
that joins and to the operator's `\\history`. Real servers, real sockets, real SQLite files."""

import sqlite3
from datetime import datetime

import pytest
from conftest import db_rows, join_room as join, recv_until

from chatlog import schema

UTC = {"TZ": "UTC"}
END = b"SERVER>*** End of history; live from here.\n"


def stamp(at: str) -> str:
    return datetime.fromisoformat(at).strftime("%H:%M")  # the server runs with TZ=UTC


def said(db, room):
    """(at, handle, text) of the lines said in a room, over all its runs, in order."""
    return db_rows(db, "SELECT m.at, m.handle, m.text FROM messages m JOIN sessions s ON s.id = m.session_id "
                       "WHERE s.room = ? AND m.sender IN ('client', 'server') ORDER BY m.id", (room,))


def history_bytes(name, rows):
    what = "the last line" if len(rows) == 1 else f"the last {len(rows)} lines"
    body = b"".join(f"[{stamp(at)}] {h}>{t}\n".encode() for at, h, t in rows)
    return f"SERVER>*** History: {what} of {name}\n".encode() + body + END


def test_a_client_that_joins_is_shown_the_last_lines_marked_as_history(start_server, db_path):
    room = start_server("--room", "--name", "lab", "--history", "3", env=UTC, db=db_path, history=True)
    alice = join(room)  # the empty room: nothing more than the greeting (see the next test)
    alice.sendall(b"alice>one\n")
    alice.sendall(b"alice>two\n")
    room.wait_for("^alice>two$")
    room.say("three, from the operator")
    assert recv_until(alice, b"operator\n").endswith(b"SERVER>three, from the operator\n")
    alice.sendall(b"alice>four\n")
    room.wait_for("^alice>four$")
    bob = room.connect()
    got = recv_until(bob, END)
    rows = said(db_path, "lab")[-3:]
    assert [t for _, _, t in rows] == ["two", "three, from the operator", "four"]  # joins do not count
    assert got == b"SERVER>*** Welcome to the room: 2 here. Type at any time.\n" + history_bytes("lab", rows)
    # then live: what is said after it joined, once
    alice.sendall(b"alice>five\n")
    assert recv_until(bob, b"five\n").endswith(b"alice>five\n")


@pytest.mark.parametrize("history", [None, "0"])
def test_an_empty_room_or_history_0_sends_nothing_before_the_live_lines(start_server, db_path, history):
    args = ["--room"] + (["--history", history] if history else [])
    room = start_server(*args, env=UTC, db=db_path, history=True)
    alice = join(room)  # nothing said yet: no history
    alice.sendall(b"alice>hi\n")
    room.wait_for("^alice>hi$")
    bob = room.connect()
    welcome = b"SERVER>*** Welcome to the room: 2 here. Type at any time.\n"
    if history == "0":
        assert recv_until(bob, welcome) == welcome
        alice.sendall(b"alice>again\n")
        assert recv_until(bob, b"again\n") == b"alice>again\n"  # the first thing after the greeting
    else:
        got = recv_until(bob, END)
        assert got.startswith(welcome + b"SERVER>*** History: the last line of room-")


def test_every_run_of_the_same_name_is_the_same_room(start_server, db_path):
    first = start_server("--room", "--name", "lab", env=UTC, db=db_path, history=True)
    alice = join(first, "alice")
    alice.sendall(b"alice>remember this\n")
    first.wait_for("^alice>remember this$")
    other = start_server("--room", "--name", "elsewhere", env=UTC, db=db_path, history=True)
    carol = join(other, "carol")
    other.wait_for("^carol>hi$")
    first.say("\\quit")
    assert first.wait() == 0
    # a new run of lab: bob sees what was said in the earlier run, and nothing of elsewhere
    second = start_server("--room", "--name", "lab", env=UTC, db=db_path, history=True)
    second.wait_for(r"The room is open \(session \d+, lab\)")
    bob = second.connect()
    got = recv_until(bob, END)
    rows = said(db_path, "lab")
    assert [t for _, _, t in rows] == ["hi", "remember this"]
    assert got.endswith(history_bytes("lab", rows))
    assert b"carol" not in got
    assert db_rows(db_path, "SELECT DISTINCT room FROM sessions ORDER BY room") == [("elsewhere",), ("lab",)]
    carol.close()


def test_the_default_name_is_room_and_the_port(start_server, db_path):
    room = start_server("--room", env=UTC, db=db_path, history=True)
    room.wait_for(rf"The room is open \(session 1, room-{room.port}\)")
    assert db_rows(db_path, "SELECT room FROM sessions") == [(f"room-{room.port}",)]


def test_lines_kept_back_are_not_replayed_and_hostile_text_is_made_safe(start_server, db_path):
    room = start_server("--room", "--name", "lab", env=UTC, db=db_path, history=True)
    mal = join(room)
    mal.sendall(b"no handle yet\n")  # kept back: not relayed, so not history either
    mal.sendall(b"SERVER>fake operator line\n")
    mal.sendall(b"mal>\\who\n")
    mal.sendall(b"mal>\x1b]0;pwned\x07 \xe2\x80\xae evil\n")
    room.wait_for("pwned")
    bob = room.connect()
    got = recv_until(bob, END)
    body = got.split(b"\n")[2:-2]  # between the history's notices
    [(at, _, _)] = said(db_path, "lab")[-1:]
    assert body == [f"[{stamp(at)}] mal>\\x1b]0;pwned\\x07 \\u202e evil".encode()]
    assert b"\x1b" not in got and "\u202e".encode() not in got


def test_the_operators_history_command_shows_it_on_the_console(start_server, db_path):
    room = start_server("--room", "--name", "lab", env=UTC, db=db_path, history=True)
    room.say("\\history")
    room.wait_for("^Nothing has been said in lab yet.$")
    alice = join(room, "alice")
    alice.sendall(b"alice>one\n")
    alice.sendall(b"alice>two\n")
    room.wait_for("^alice>two$")
    start = len(room.lines)
    room.say("\\history 2")
    room.wait_for("^History: the last 2 lines of lab$", start=start)
    end = room.wait_for("^End of history; live from here.$", start=start)
    shown = room.lines[start:]
    rows = said(db_path, "lab")[-2:]
    assert shown[shown.index("History: the last 2 lines of lab") + 1:shown.index(end)] == [
        f"[{stamp(at)}] {h}>{t}" for at, h, t in rows
    ]


def test_name_and_history_are_for_a_room(db_path):
    from conftest import run_chatlog

    r = run_chatlog(db_path, "serve", "0", "--name", "lab")
    assert r.exit_code == 2 and "chatlog: --name is for a room (--room)" in r.output
    assert not db_path.exists()
    r = run_chatlog(db_path, "serve", "0", "--room", "--name", "a\x1bb")
    assert r.exit_code == 2 and "Invalid value for '--name'" in r.output


# -- an archive from before room names -----------------------------------------------------------


def test_an_old_archive_names_its_rooms_by_their_port(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    saved = schema.MIGRATIONS[:]
    try:
        schema.MIGRATIONS[:] = [fn for fn in saved if fn.__name__ < "m009"]
        schema.apply(conn)
    finally:
        schema.MIGRATIONS[:] = saved
    conn.execute("INSERT INTO sessions (id, started_at, server_port, kind) VALUES "
                 "(1, '2026-01-01T00:00:00+00:00', 9999, 'room'), (2, '2026-01-01T00:00:00+00:00', 9999, 'chat')")
    conn.execute("INSERT INTO messages (session_id, seq, at, sender, handle, text) VALUES "
                 "(1, 1, '2026-01-01T00:00:01+00:00', 'client', 'old', 'from before names')")
    conn.close()
    from chatlog.recorder import open_recorder

    rec = open_recorder(path)
    try:
        assert db_rows(path, "SELECT id, room FROM sessions ORDER BY id") == [(1, "room-9999"), (2, None)]
        assert rec.room_history("room-9999", 20) == [
            ("2026-01-01T00:00:01+00:00", "client", "old", "from before names")]
    finally:
        rec.close()


def test_history_reads_a_few_rows_however_long_the_record(tmp_path):
    """Each join reads the newest runs backwards along the (session, seq) index: the query plan
    uses it, never a scan of messages."""
    from chatlog.recorder import open_recorder

    rec = open_recorder(tmp_path / "big.db")
    try:
        plan = rec.conn.execute(
            "EXPLAIN QUERY PLAN SELECT at, sender, handle, text FROM messages WHERE session_id = ? "
            "AND sender IN ('client', 'server') AND (note IS NULL OR note NOT LIKE '%not relayed%') "
            "ORDER BY seq DESC LIMIT ?", (1, 20)).fetchall()
        assert any("idx_messages_session_id_seq" in row[-1] for row in plan), plan
        plan = rec.conn.execute("EXPLAIN QUERY PLAN SELECT id FROM sessions WHERE room = ? AND deleting = 0 "
                                "ORDER BY id DESC", ("lab",)).fetchall()
        assert any("idx_sessions_room" in row[-1] for row in plan), plan
    finally:
        rec.close()


def test_our_client_shows_the_history_before_the_live_lines(start_server, db_path, chatclient):
    from conftest import spawn_client

    room = start_server("--room", "--name", "lab", env=UTC, db=db_path, history=True)
    alice = join(room, "alice")
    alice.sendall(b"alice>before you came\n")
    room.wait_for("^alice>before you came$")
    p = spawn_client(chatclient, room)
    p.expect_exact("History: the last 2 lines of lab")  # as it connects, before it asks a handle
    p.expect(r"\[\d\d:\d\d\] alice>hi")
    p.expect(r"\[\d\d:\d\d\] alice>before you came")
    p.expect_exact("End of history; live from here.")
    p.expect_exact("What would you like your chat handle to be> ")
    p.sendline("bob")
    p.expect_exact("bob>")
    alice.sendall(b"alice>now live\n")
    p.expect_exact("alice>now live")
    p.sendline("\\quit")
    p.expect_exact("You left the chat.")
