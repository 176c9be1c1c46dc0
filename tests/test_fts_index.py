"""The search index kept in the background (schema m008, chatlog.indexer): a message is committed
without touching the index; the server's checkpointer thread, `Recorder.close`, a server's start
and `search` itself bring the index up to date. Real SQLite files, real servers."""

import os
import signal
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import db_rows, run_chatlog, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from storebuild import open_store

from chatlog import indexer, schema
from chatlog.archive import open_archive
from chatlog.db import connect
from chatlog.recorder import Recorder
from chatlog.upkeep import Upkeep


def assert_index_exact(conn: sqlite3.Connection) -> None:
    """The index holds exactly the non-event messages with id <= upto, with their current text,
    and nothing else: FTS5's own check against a copy whose content table holds only those."""
    conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('integrity-check')")
    if conn.in_transaction:
        conn.commit()
    copy = sqlite3.connect(":memory:")
    try:
        conn.backup(copy)
        for (name,) in copy.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'messages'"):
            copy.execute(f'DROP TRIGGER "{name}"')
        copy.execute("DELETE FROM messages WHERE sender = 'event' OR id > (SELECT upto FROM fts_progress)")
        copy.execute("INSERT INTO messages_fts(messages_fts, rank) VALUES ('integrity-check', 1)")
    finally:
        copy.close()


def upto(path) -> int:
    return db_rows(path, "SELECT upto FROM fts_progress")[0][0]


def max_id(path) -> int:
    return db_rows(path, "SELECT coalesce(max(id), 0) FROM messages")[0][0]


def matching(conn, word) -> list[int]:
    return [r[0] for r in conn.execute("SELECT rowid FROM messages_fts WHERE messages_fts MATCH ? ORDER BY rowid", (word,))]


# -- the chat path does not index; close, start and search do ----------------------------------------


def test_a_commit_leaves_the_index_alone_and_close_indexes_every_line(tmp_path):
    path = tmp_path / "c.db"
    rec = Recorder(connect(path))
    rec.start("127.0.0.1", 1, time.time())
    room = rec.begin_session("127.0.0.1", 1, "127.0.0.1", 2, time.time(), served=True, kind="room")
    who = rec.add_participant(room, "127.0.0.1", 3, time.time())
    rec.add_event(room, who, "alpha joined", time.time())
    with rec.transaction():
        for i in range(1000):
            rec.add_message(room, "client", "amy", f"alpha line {i}", None, None, time.time())
    rec.add_event(room, who, "alpha left", time.time())
    rec.close()
    assert upto(path) == max_id(path) == 1002
    conn = sqlite3.connect(path)
    assert matching(conn, "alpha") == list(range(2, 1002))  # every line, no event
    assert_index_exact(conn)


def test_the_insert_trigger_is_gone(tmp_path):
    path = tmp_path / "t.db"
    s = open_store(path)
    sid = s.begin_session(("127.0.0.1", 1), ("127.0.0.1", 2), served=True)
    s.add_message(sid, "client", "bob", "not yet indexed")
    assert matching(s.conn, "indexed") == []  # the commit did not index it
    assert indexer.pending(s.conn) == 1
    assert indexer.index_pending(s.conn) == 1
    assert matching(s.conn, "indexed") == [1]
    assert indexer.index_pending(s.conn) == 0
    s.close()


def test_index_pending_covers_at_most_a_chunk_and_skips_events(tmp_path):
    path = tmp_path / "k.db"
    s = open_store(path)
    room = s.begin_session(("127.0.0.1", 1), ("127.0.0.1", 2), served=True, kind="room")
    for i in range(7):
        s.add_message(room, "event" if i % 3 == 0 else "client", "amy", f"word{i} common")
    assert [indexer.index_pending(s.conn, chunk=3) for _ in range(4)] == [3, 3, 1, 0]
    assert matching(s.conn, "common") == [2, 3, 5, 6]
    assert_index_exact(s.conn)
    s.close()


def test_index_pending_gives_up_on_a_busy_database_at_once(tmp_path):
    path = tmp_path / "b.db"
    s = open_store(path)
    sid = s.begin_session(("127.0.0.1", 1), ("127.0.0.1", 2), served=True)
    s.add_message(sid, "client", "bob", "waiting")
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    s.conn.execute("PRAGMA busy_timeout = 5000")
    started = time.monotonic()
    assert indexer.index_pending(s.conn) == 0
    assert time.monotonic() - started < 1.0  # not the 5 s busy timeout
    assert s.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000  # left as it was
    other.execute("ROLLBACK")
    assert indexer.index_pending(s.conn) == 1
    s.close()


def test_search_catches_up_first(tmp_path):
    path = tmp_path / "s.db"
    s = open_store(path)
    sid = s.begin_session(("127.0.0.1", 1), ("127.0.0.1", 2), served=True)
    s.add_message(sid, "client", "bob", "said a moment ago")
    s.db.close()  # as a server still running would leave it: not indexed yet
    a = open_archive(path)
    assert [m.text for m, _ in a.search("moment")] == ["said a moment ago"]
    assert a.unindexed == 0
    a.close()
    r = run_chatlog(path, "search", "moment", process=True)
    assert r.exit_code == 0 and "bob>said a [moment] ago" in r.stdout and r.stderr == ""


def test_search_sees_a_line_a_running_server_committed_a_moment_ago(start_server, tmp_path):
    server = start_server(db=tmp_path / "live.db")
    c = server.connect()
    c.sendall(b"bob>the zanzibar password\n\0")
    server.wait_for("^bob>the zanzibar password$")
    r = run_chatlog(server.db, "search", "zanzibar", process=True)
    assert r.exit_code == 0, r.stderr
    assert "bob>the [zanzibar] password" in r.stdout and r.stderr == ""
    assert run_chatlog(server.db, "search", "zanzibar", "--count", process=True).stdout == "1\n"


def test_the_running_server_indexes_in_the_background(start_server, tmp_path):
    server = start_server(db=tmp_path / "bg.db")
    c = server.connect()
    c.sendall(b"bob>hello there\n\0")
    server.wait_for("^bob>hello there$")
    server.say("hello back")
    server.wait_for("hello back")
    wait_until(lambda: upto(server.db) == max_id(server.db) == 2, timeout=10)


def test_a_stopped_server_leaves_a_complete_index(start_server, tmp_path):
    server = start_server(db=tmp_path / "stop.db")
    c = server.connect()
    for i in range(30):
        c.sendall(f"bob>line {i}\n\0".encode())
        server.wait_for(f"^bob>line {i}$")
        server.say(f"answer {i}")
        server.wait_for(f"answer {i}$")
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    assert upto(server.db) == max_id(server.db) == 60
    conn = sqlite3.connect(server.db)
    assert len(matching(conn, "line")) == 30 and len(matching(conn, "answer")) == 30
    assert_index_exact(conn)


def test_a_server_that_starts_indexes_what_a_killed_one_left(start_server, tmp_path):
    db = tmp_path / "killed.db"
    first = start_server(db=db)
    c = first.connect()
    c.sendall(b"bob>left behind\n\0")
    first.wait_for("^bob>left behind$")
    first.proc.kill()
    first.proc.wait()
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('delete-all')")  # as if it died
    conn.execute("UPDATE fts_progress SET upto = 0")  # before indexing anything
    conn.close()
    start_server(db=db)
    wait_until(lambda: upto(db) == max_id(db) == 1, timeout=10)
    assert matching(sqlite3.connect(db), "behind") == [1]


# -- read-only archives: search what is indexed, and say what is not -------------------------------


def test_read_only_archive_searches_what_is_indexed_and_says_how_much_is_not(tmp_path):
    path = tmp_path / "ro.db"
    s = open_store(path)
    sid = s.begin_session(("127.0.0.1", 1), ("127.0.0.1", 2), served=True)
    s.add_message(sid, "client", "bob", "old words")
    indexer.index_pending(s.conn)
    s.add_message(sid, "server", "SERVER", "new words")
    s.add_message(sid, "client", "bob", "newer words")
    s.db.close()
    a = open_archive(path, read_only=True)
    assert [m.text for m, _ in a.search("words")] == ["old words"]
    assert a.unindexed == 2
    assert a.search("words", count=True) == 1
    a.close()
    assert upto(path) == 1  # nothing was written


@pytest.fixture
def ro_mount(tmpfs):
    return tmpfs("2m")


def test_search_on_read_only_media_says_in_one_line_what_it_cannot_see(ro_mount):
    path = ro_mount / "archive.db"
    s = open_store(path)
    sid = s.begin_session(("127.0.0.1", 1), ("127.0.0.1", 2), served=True)
    s.add_message(sid, "client", "bob", "indexed hello")
    indexer.index_pending(s.conn)
    for i in range(3):
        s.add_message(sid, "client", "bob", f"pending hello {i}")
    s.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    s.db.close()
    subprocess.run(["mount", "-o", "remount,ro", str(ro_mount)], check=True)
    r = run_chatlog(path, "search", "hello", process=True)
    assert r.exit_code == 0 and "bob>indexed [hello]" in r.stdout and "pending" not in r.stdout
    assert r.stderr == (
        "chatlog: the 3 newest messages are not indexed yet (the archive is read-only here), "
        "so this search did not see them\n"
    )
    r = run_chatlog(path, "search", "nothing-here", process=True)
    assert "Traceback" not in r.stderr and "sqlite" not in r.stderr.lower()


# -- deletes of partly indexed sessions -------------------------------------------------------------


def test_rm_and_prune_of_partly_indexed_sessions_keep_the_index_sound(tmp_path):
    path = tmp_path / "d.db"
    s = open_store(path)
    ids = []
    for n in range(3):
        sid = s.begin_session(("127.0.0.1", 1), ("127.0.0.1", 2), served=True, at="2026-01-01T00:00:00+00:00")
        for i in range(50):
            s.add_message(sid, "client" if i % 2 else "server", "bob", f"session {n} line {i} common")
        if n == 0:
            indexer.catch_up(s.conn, 10)
        elif n == 1:
            indexer.index_pending(s.conn, chunk=20)  # this one partly
        s.end_session(sid, "client-quit", at="2026-01-01T00:01:00+00:00")
        ids.append(sid)
    assert 0 < upto(path) < max_id(path)
    s.db.close()  # leaving the rest unindexed
    assert run_chatlog(path, "rm", str(ids[1]), "--yes", process=True).exit_code == 0
    conn = sqlite3.connect(path)
    assert_index_exact(conn)
    assert run_chatlog(path, "prune", "--before", "2026-06-01", "--yes", process=True).exit_code == 0
    assert_index_exact(conn)
    assert db_rows(path, "SELECT count(*) FROM messages") == [(0,)]


def test_deleting_in_small_batches_across_the_indexed_edge(tmp_path):
    s = open_store(tmp_path / "e.db")
    sid = s.begin_session(("127.0.0.1", 1), ("127.0.0.1", 2), served=True)
    for i in range(40):
        s.add_message(sid, "client", "bob", f"edge {i}")
    indexer.index_pending(s.conn, chunk=25)
    s.end_session(sid, "client-quit")
    Upkeep(s).delete_sessions([sid], batch=7)
    assert_index_exact(s.conn)
    s.close()


def test_an_id_freed_by_deleting_the_newest_rows_is_not_reused_below_the_index(tmp_path):
    """INTEGER PRIMARY KEY reuses max(id) + 1: had `upto` stayed above it, a new row would be taken
    for indexed, never indexed, and its delete would corrupt the index."""
    s = open_store(tmp_path / "r.db")
    keep = s.begin_session(("127.0.0.1", 1), ("127.0.0.1", 2), served=True)
    s.add_message(keep, "client", "bob", "kept")
    gone = s.begin_session(("127.0.0.1", 1), ("127.0.0.1", 2), served=True)
    for i in range(5):
        s.add_message(gone, "client", "bob", f"gone {i}")
    indexer.catch_up(s.conn, 10)
    s.end_session(gone, "client-quit")
    Upkeep(s).delete_sessions([gone])
    assert s.conn.execute("SELECT upto FROM fts_progress").fetchone() == (1,)
    s.add_message(keep, "client", "bob", "reuses id two")  # id 2 again
    assert [m.text for m, _ in s.search("reuses")] == ["reuses id two"]
    s.end_session(keep, "client-quit")
    Upkeep(s).delete_sessions([keep])
    assert_index_exact(s.conn)
    s.close()


# -- an archive written before m008 ----------------------------------------------------------------


def _old_archive(path: Path) -> None:
    """Every migration before m008, so the old insert trigger indexes rows as they come."""
    old = [fn for fn in schema.MIGRATIONS if fn.__name__ < "m008"]
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    saved = schema.MIGRATIONS[:]
    try:
        schema.MIGRATIONS[:] = old
        schema.apply(conn)
    finally:
        schema.MIGRATIONS[:] = saved
    assert conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'messages_ai'").fetchone()
    conn.execute(
        "INSERT INTO sessions (id, started_at, ended_at, end_reason, kind) VALUES "
        "(1, '2026-01-01T00:00:00+00:00', '2026-01-01T00:01:00+00:00', 'client-quit', 'room'), "
        "(2, '2026-01-02T00:00:00+00:00', '2026-01-02T00:01:00+00:00', 'client-quit', 'chat')"
    )
    rows = [(1, i, "event" if i == 1 else "client", f"old line {i}") for i in range(1, 6)]
    rows += [(2, i, "client", f"other line {i}") for i in range(1, 4)]
    conn.executemany(
        "INSERT INTO messages (session_id, seq, at, sender, text) VALUES (?, ?, '2026-01-01T00:00:01+00:00', ?, ?)",
        rows,
    )
    conn.close()


def test_an_old_archive_upgrades_and_keeps_working(tmp_path):
    path = tmp_path / "old.db"
    _old_archive(path)
    s = open_store(path)  # migrates
    assert schema.applied(s.conn) == schema.NAMES  # m008 and everything after it
    assert not s.conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'messages_ai'").fetchone()
    assert upto(path) == 8
    assert_index_exact(s.conn)
    assert [m.id for m, _ in s.search("line", limit=0)] == [8, 7, 6, 5, 4, 3, 2]  # not the event
    sid = s.begin_session(("127.0.0.1", 1), ("127.0.0.1", 2), served=True)
    s.add_message(sid, "client", "bob", "new line")
    s.end_session(sid, "client-quit")
    assert [m.text for m, _ in s.search("new")] == ["new line"]
    Upkeep(s).delete_sessions([1])
    assert_index_exact(s.conn)
    s.close()
    r = run_chatlog(path, "search", "line", "--count", process=True)
    assert r.exit_code == 0 and r.stdout == "4\n", r.stderr


# -- random interleavings ---------------------------------------------------------------------------

WORDS = ["apple", "berry", "cherry"]
OPS = st.one_of(
    st.tuples(st.just("say"), st.integers(0, 2), st.sampled_from(["client", "server", "event"]),
              st.lists(st.sampled_from(WORDS), min_size=1, max_size=3)),
    st.tuples(st.just("index"), st.integers(1, 4)),
    st.tuples(st.just("rm"), st.integers(0, 2), st.integers(1, 3)),
    st.tuples(st.just("edit"), st.integers(0, 50), st.sampled_from(WORDS)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OPS, max_size=40))
def test_random_inserts_index_chunks_and_deletes_keep_the_index_exact(ops):
    with tempfile.TemporaryDirectory(prefix="chatlog-fts-") as tmp:
        s = open_store(os.path.join(tmp, "h.db"))
        slots: list[int | None] = [None, None, None]  # a session in progress per slot
        for op in ops:
            if op[0] == "say":
                _, slot, sender, words = op
                if slots[slot] is None:
                    slots[slot] = s.begin_session(("127.0.0.1", 1), ("127.0.0.1", 2), served=True, kind="room")
                s.add_message(slots[slot], sender, "amy", " ".join(words))
            elif op[0] == "index":
                indexer.index_pending(s.conn, chunk=op[1])
            elif op[0] == "rm" and slots[op[1]] is not None:
                sid, slots[op[1]] = slots[op[1]], None
                s.end_session(sid, "client-quit")
                Upkeep(s).delete_sessions([sid], batch=op[2])
            elif op[0] == "edit":
                s.conn.execute("UPDATE messages SET text = ? WHERE id = ?", (op[2], op[1]))
            assert_index_exact(s.conn)
        expected = {
            w: [
                i for i, text in s.conn.execute("SELECT id, text FROM messages WHERE sender != 'event' ORDER BY id DESC")
                if w in text.split()
            ]
            for w in WORDS
        }
        for w in WORDS:
            assert [m.id for m, _ in s.search(w, limit=0)] == expected[w]
        assert s.unindexed == 0
        assert_index_exact(s.conn)
        s.close()
