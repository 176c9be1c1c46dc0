"""The store and its migrations, against real SQLite files."""

import os
import sqlite3
import stat

import pytest

from chatlog import schema
from storebuild import open_store

from chatlog.db import StoreError
from chatlog.recorder import open_recorder


def test_fresh_database_has_schema_wal_and_owner_only_mode(tmp_path):
    path = tmp_path / "sub" / "chat.db"
    store = open_store(path)
    store.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    names = [r[0] for r in conn.execute("SELECT name FROM _sqlite_migrations ORDER BY id")]
    assert names == schema.NAMES
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"sessions", "messages", "messages_fts"} <= tables


def test_migrations_are_applied_once(tmp_path):
    path = tmp_path / "chat.db"
    open_store(path).close()
    open_store(path).close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM _sqlite_migrations").fetchone()[0] == len(schema.NAMES)


def test_partial_schema_is_upgraded(tmp_path):
    """A database made by an older chatlog (first migration only) gains the later ones."""
    from sqlite_utils import Database
    from sqlite_utils.migrations import Migrations

    path = tmp_path / "old.db"
    db = Database(path)
    m = Migrations(schema.MIGRATION_SET)
    m(name=schema.NAMES[0])(schema.MIGRATIONS[0])
    m.apply(db)
    db["sessions"].insert({"started_at": "2026-01-01T00:00:00.000000+00:00"})
    db["messages"].insert(
        {"session_id": 1, "seq": 1, "at": "2026-01-01T00:00:01.000000+00:00", "sender": "client", "text": "old words"}
    )
    db.close()
    store = open_store(path, create=False)
    hits = store.conn.execute("SELECT rowid FROM messages_fts WHERE messages_fts MATCH 'words'").fetchall()
    assert hits == [(1,)]  # the FTS migration indexed the existing row


def test_the_id_floors_keep_their_values_and_triggers_through_m016(tmp_path):
    """m016 makes `id_floors` a WITHOUT ROWID table (the turn's one lookup): an archive made
    before it keeps its floors, and deleting the newest rows still raises them."""
    from sqlite_utils import Database
    from sqlite_utils.migrations import Migrations

    from chatlog.recorder import open_recorder

    path = tmp_path / "before-m016.db"
    db = Database(path)
    m = Migrations(schema.MIGRATION_SET)
    for name, fn in zip(schema.NAMES, schema.MIGRATIONS, strict=True):
        if name != "m016_id_floors_without_rowid":
            m(name=name)(fn)
    m.apply(db)
    db.execute("INSERT INTO sessions (id, started_at) VALUES (1, '2026-01-01T00:00:00.000000+00:00')")
    for i in (1, 2, 3):
        db.execute("INSERT INTO messages (id, session_id, seq, at, sender, text) "
                   "VALUES (?, 1, ?, '2026-01-01T00:00:01.000000+00:00', 'client', 'x')", [i, i])
    db.execute("DELETE FROM messages WHERE id = 3")
    db.conn.commit()
    db.close()
    rec = open_recorder(path)
    conn = rec.conn
    assert "WITHOUT ROWID" in conn.execute("SELECT sql FROM sqlite_master WHERE name = 'id_floors'").fetchone()[0]
    assert conn.execute("SELECT upto FROM id_floors WHERE name = 'messages'").fetchone() == (3,)
    rows = [(1, "client", None, "new", None, None, 5.0, False), (1, "server", "SERVER", "answer", None, None, 5.0, False)]
    rec.add_message_rows(rows)
    rec.add_message_rows(rows)
    assert [r[0] for r in conn.execute("SELECT id FROM messages ORDER BY id")] == [1, 2, 4, 5, 6, 7]
    conn.execute("DELETE FROM messages WHERE id = 7")
    assert conn.execute("SELECT upto FROM id_floors WHERE name = 'messages'").fetchone() == (7,)
    rec.add_message_rows(rows)
    assert [r[0] for r in conn.execute("SELECT id FROM messages WHERE id > 6 ORDER BY id")] == [8, 9]
    rec.close()


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "new.db"
    open_store(path).close()
    conn = sqlite3.connect(path)
    conn.execute(
        "INSERT INTO _sqlite_migrations (migration_set, name, applied_at) VALUES ('chatlog', 'm999_future', 'x')"
    )
    conn.commit()
    with pytest.raises(StoreError, match="newer version of chatlog"):
        open_store(path)


@pytest.mark.parametrize(
    "content,message",
    [
        (b"this is not a database at all", "not an SQLite file"),
        (b"SQLite format 3\x00" + b"\xff" * 200, "not a usable chatlog database"),
    ],
)
def test_not_sqlite_or_corrupt(tmp_path, content, message):
    path = tmp_path / "bad.db"
    path.write_bytes(content)
    with pytest.raises(StoreError, match=message):
        open_store(path)


def test_foreign_sqlite_file_is_refused(tmp_path):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE messages (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="not a chatlog database"):
        open_store(path)


def test_missing_database_for_readers(tmp_path):
    with pytest.raises(StoreError, match="no chatlog database"):
        open_store(tmp_path / "nope.db", create=False)


def test_unwritable_location(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    with pytest.raises(StoreError, match="cannot create the database"):
        open_store(blocker / "chat.db")


def test_session_lifecycle_counts_and_orphans(tmp_path):
    store = open_store(tmp_path / "c.db")
    sid = store.begin_session(("127.0.0.1", 5000), ("127.0.0.1", 9999), served=True)
    store.set_handle(sid, "bob")
    store.add_message(sid, "client", "bob", "hi", raw=b"bob> hi\n")
    store.add_message(sid, "server", "SERVER", "yo")
    store.add_message(sid, "client", "bob", "\ufffd", raw=b"bob>\xff\n\0")
    s = store.session("last")
    assert (s.client_messages, s.server_messages, s.handle, s.end_reason) == (2, 1, "bob", None)
    assert [m.seq for m in store.messages(sid)] == [1, 2, 3]
    assert [m.raw for m in store.messages(sid)] == [b"bob> hi\n", None, b"bob>\xff\n\0"]
    store.close()
    # the server died: the next open finds the session open and closes it as interrupted
    store = open_store(tmp_path / "c.db")
    assert store.close_orphans() == 1
    s = store.session(sid)
    assert s.end_reason == "interrupted"
    assert s.ended_at == list(store.messages(sid))[-1].at
    store.end_session(sid, "client-quit")  # an ended session is not re-ended
    assert store.session(sid).end_reason == "interrupted"


def test_wal_stays_bounded_under_continuous_writes(tmp_path, monkeypatch):
    """A writer that never pauses races every passive checkpoint, which then never completes, so
    the WAL would never start over: the writer restarts it itself past a limit."""
    import chatlog.recorder

    monkeypatch.setattr(chatlog.recorder, "WAL_CHECK_EVERY", 100)
    path = tmp_path / "busy.db"
    store = open_store(path)
    store.db.start_checkpointer(interval=0.005, restart_bytes=4_000_000)  # small, to keep it short
    sid = store.begin_session(("127.0.0.1", 1), ("127.0.0.1", 2), served=True)
    biggest = 0
    for i in range(12000):
        store.add_message(sid, "client", "bob", f"message number {i} with some words in it")
        if i % 100 == 0:
            biggest = max(biggest, os.path.getsize(str(path) + "-wal"))
    store.close()
    assert biggest < 40_000_000  # without the restart: ~125 MB by the end


def test_the_wal_is_begun_again_in_the_background_not_by_the_next_line(tmp_path):
    """When the chat pauses, the checkpointer copies the WAL into the database and then begins
    it again itself: beginning it writes a new header and syncs it (fdatasync), which must not
    fall to the next line's commit (at chat pace, every line's: 0.15 ms here, milliseconds on a
    slow disk). Seen in the WAL's header: its salts change with each beginning."""
    from conftest import wait_until

    path = tmp_path / "pace.db"
    store = open_store(path)
    store.db.start_checkpointer(interval=0.01)
    sid = store.begin_session(("127.0.0.1", 1), ("127.0.0.1", 2), served=True)
    wal = str(path) + "-wal"

    def salts() -> bytes:
        with open(wal, "rb") as f:
            return f.read(32)[16:24]

    for i in range(3):
        store.add_message(sid, "client", "bob", f"a line at chat pace {i}")
        before = salts()
        passes = store.db.checkpoints
        wait_until(lambda b=before: salts() != b, timeout=5)  # begun again, with no commit of the writer's
        assert store.db.checkpoints > passes
        mark = store.db.checkpoints
        wait_until(lambda m=mark: store.db.checkpoints >= m + 2, timeout=5)  # (the pass that began it is over)
        again = salts()
        wait_until(lambda m=mark: store.db.checkpoints >= m + 8, timeout=5)
        assert salts() == again  # nothing new: not begun again and again
    store.close()
    conn = sqlite3.connect(path)
    assert [r[0] for r in conn.execute("SELECT text FROM messages ORDER BY id")] == [
        f"a line at chat pace {i}" for i in range(3)]
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


def test_beginning_the_wal_again_writes_one_row_of_a_crafted_table(tmp_path):
    """An archive whose `wal_begun` was filled with rows (crafted, or copied into): the
    checkpointer's write still changes one, not all of them at every pause, holding the lock."""
    from chatlog.db import begin_wal_again

    path = tmp_path / "crafted.db"
    open_store(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < 5000) "
                 "INSERT INTO wal_begun (n) SELECT i FROM k")
    before = conn.total_changes
    begin_wal_again(conn)
    assert conn.total_changes - before == 1
    conn.close()


def test_iso_is_exactly_datetimes_isoformat():
    """The cached form of a stored time equals datetime's own, for any moment (hypothesis)."""
    from datetime import datetime, timezone

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from chatlog.records import iso

    @settings(max_examples=2000, deadline=None)
    @given(st.floats(min_value=0, max_value=4_000_000_000, allow_nan=False) | st.integers(0, 4_000_000_000).map(
        lambda s: s + 0.9999995) | st.integers(0, 4_000_000_000).map(lambda s: s + 0.0000005))
    def check(ts):
        assert iso(ts) == datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="microseconds")

    check()
    for ts in (0.0, 1.5, 1764871533.123456, 1764871533.9999999, -1.25):
        assert iso(ts) == datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="microseconds")


def test_a_few_messages_in_one_statement_take_fresh_ids_and_their_sessions_seqs(tmp_path):
    """`add_message_rows` (a 1:1 turn: a line and its answer, one INSERT): each message its
    session's next seq, ids after the newest ever given (a deleted newest id is not taken again),
    a long raw form cut as add_message cuts it."""
    from chatlog.recorder import RAW_KEEP, open_recorder

    rec = open_recorder(tmp_path / "rows.db")
    a = rec.begin_session("127.0.0.1", 1, "127.0.0.1", 2, 1.0, served=True)
    b = rec.begin_session("127.0.0.1", 3, "127.0.0.1", 2, 1.0, served=True)
    rec.add_message(a, "client", "amy", "one", None, None, 2.0)
    rec.add_message(a, "client", "amy", "two", None, None, 2.0)
    rec.conn.execute("DELETE FROM messages WHERE id = 2")  # the newest: its id is never given again
    seqs = rec.add_message_rows([
        (a, "client", "amy", "three", b"x" * (RAW_KEEP + 5), None, 3.0, False),
        (b, "client", "bob", "hi", None, None, 3.0, True),
        (a, "server", "SERVER", "four", None, None, 3.0, False),
    ])
    assert seqs == [3, 1, 4]
    rows = rec.conn.execute("SELECT id, session_id, seq, text, length(raw), note, verified FROM messages "
                            "ORDER BY id").fetchall()
    assert rows == [(1, a, 1, "one", None, None, 0), (3, a, 3, "three", RAW_KEEP, "raw bytes cut at 1024; 5 more received", 0),
                    (4, b, 1, "hi", None, None, 1), (5, a, 4, "four", None, None, 0)]
    assert rec.add_message(b, "server", "SERVER", "yo", None, None, 4.0) == 2
    rec.close()


def test_a_turn_takes_no_id_another_process_freed_after_the_last_turn(tmp_path):
    """After its own turn a recorder lets SQLite give the next ids (max + 1) while its newest
    message stands; when another process has deleted that one, or added newer ones and deleted
    those, it goes by the floor again: a freed id is never given twice."""
    from chatlog.recorder import open_recorder

    path = tmp_path / "turns.db"
    rec, other = open_recorder(path), open_recorder(path)
    sid = rec.begin_session("127.0.0.1", 1, "127.0.0.1", 2, 1.0, served=True)
    elsewhere = other.begin_session("127.0.0.1", 3, "127.0.0.1", 2, 1.0, served=True)

    def turn(n):
        rec.add_message_rows([(sid, "client", "amy", f"line {n}", None, None, 2.0, False),
                              (sid, "server", "SERVER", f"answer {n}", None, None, 2.0, False)])
        return [r[0] for r in rec.conn.execute("SELECT id FROM messages WHERE text LIKE ? ORDER BY id", (f"% {n}",))]

    assert turn(1) == [1, 2]
    assert turn(2) == [3, 4]
    other.conn.execute("DELETE FROM messages WHERE id = 4")  # the newest, this recorder's own
    assert turn(3) == [5, 6]
    other.add_message(elsewhere, "client", "bob", "elsewhere", None, None, 3.0)  # 7, then deleted
    other.add_message(elsewhere, "client", "bob", "elsewhere", None, None, 3.0)  # 8, then deleted
    other.conn.execute("DELETE FROM messages WHERE id >= 7")
    assert turn(4) == [9, 10]
    other.add_message(elsewhere, "client", "bob", "kept", None, None, 3.0)  # 11, kept
    assert turn(5) == [12, 13]
    rec.close()
    other.close()


def test_a_run_of_plain_lines_is_recorded_as_each_line_on_its_own_would_be(tmp_path):
    lines = [("plain", 10.5), ('"quoted" \\ back', 10.5), ("", 10.5), ("later", 11.25), ("x" * 500, 11.25)]
    tables = []
    for name, json_path in (("each", False), ("run", True)):
        rec = open_recorder(tmp_path / f"{name}.db")
        sid = rec.begin_session(None, None, "127.0.0.1", 1, 10.0, served=True, kind="room", room="r")
        pid = rec.add_participant(sid, "127.0.0.1", 5, 10.0)
        rec.add_message(sid, "client", "amy", "first", None, None, 10.0, participant=pid)
        rec._json = json_path  # the statement over a JSON array, or the fallback (add_messages)
        with rec.transaction():
            rec.add_lines(sid, "amy", lines, pid, True)
        rec.add_message(sid, "client", "amy", "after", None, None, 12.0, participant=pid)
        tables.append(rec.conn.execute(
            "SELECT id, session_id, seq, at, sender, handle, text, typeof(text), raw, note, participant_id, "
            "verified FROM messages ORDER BY id").fetchall())
        rec.close()
    assert tables[0] == tables[1]
    assert [r[6] for r in tables[1]] == ["first", *(t for t, _ in lines), "after"]
    assert [r[2] for r in tables[1]] == list(range(1, 8))


def test_a_turn_commits_only_the_pages_it_must(tmp_path):
    """A 1:1 turn's two messages are one commit, and a commit writes every page it touches whole
    into the WAL: the table's last page and the (session, seq) index's, and now and then the
    pages a split adds: 2.6 a turn. An index on the time took that to 4.5 (~10 us of a ~37 us
    commit), and nothing read through it."""
    path = tmp_path / "chat.db"
    store = open_recorder(path)
    store.conn.execute("PRAGMA wal_autocheckpoint = 0")
    sid = store.begin_session("127.0.0.1", 5000, "127.0.0.1", 9999, 1.0e9, served=True)
    page = store.conn.execute("PRAGMA page_size").fetchone()[0]

    def frames():
        return (os.path.getsize(f"{path}-wal") - 32) // (page + 24)

    before, turns = frames(), 200
    for i in range(turns):
        store.add_message_rows([(sid, "client", "bob", f"msg {i}", None, None, 1.0e9 + i, False),
                                (sid, "server", "SERVER", f"reply {i}", None, None, 1.0e9 + i, False)])
    per_commit = (frames() - before) / turns
    store.close()
    assert per_commit < 3, f"{per_commit:.2f} pages written a turn"
