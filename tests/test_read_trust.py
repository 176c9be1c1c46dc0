"""The read tools against hostile archives and hostile outputs (issue 14, the read side).

Real SQLite files, real processes where a terminal matters (a pseudo-terminal, not a mock).
"""

import contextlib
import os
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from conftest import ROOT, run_chatlog
from storebuild import bulky, open_store

HOSTILE = "\x1b]0;pwned\x07\x1b[2J"  # sets the window title, clears the screen


@pytest.fixture
def hostile_chat(db_path):
    s = open_store(db_path)
    sid = s.begin_session(("127.0.0.1", 5000), ("127.0.0.1", 9999), served=True)
    s.set_handle(sid, f"ev{HOSTILE}")
    s.add_message(sid, "client", f"ev{HOSTILE}", f"title{HOSTILE}end")
    s.add_message(sid, "server", "SERVER", "ok")
    s.end_session(sid, "client-quit")
    s.close()
    return db_path


# -- 6. a terminal named with -o gets the terminal rule ------------------------------------------------


def _at_a_terminal(db_path, *args) -> bytes:
    """`chatlog ARGS` with a pseudo-terminal as its standard output (and controlling terminal)."""
    import pexpect

    p = pexpect.spawn(sys.executable, ["-m", "chatlog", *args, "--db", str(db_path)], cwd=ROOT, timeout=20,
                      env=dict(os.environ, TERM="xterm", NO_COLOR="1"))
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0, p.before
    return p.before


@pytest.mark.parametrize("fmt", ["csv", "txt", "md", "html", "json", "jsonl", "cast"])
@pytest.mark.parametrize("output", ["-", "/dev/stdout", "/dev/tty"])
def test_a_terminal_named_with_o_is_never_sent_escape_sequences(hostile_chat, fmt, output):
    out = _at_a_terminal(hostile_chat, "export", "-f", fmt, "-o", output)
    assert b"pwned" in out  # the text is there, made visible
    assert b"\x1b" not in out and b"\x07" not in out, out


def test_a_file_or_a_pipe_named_with_o_gets_the_exact_text(hostile_chat, tmp_path):
    dest = tmp_path / "out.csv"
    r = run_chatlog(hostile_chat, "export", "-f", "csv", "-o", str(dest), process=True)
    assert r.exit_code == 0, r.stderr
    assert f"title{HOSTILE}end" in dest.read_text(encoding="utf-8")
    r = run_chatlog(hostile_chat, "export", "-f", "csv", "-o", "/dev/stdout", process=True)
    assert r.exit_code == 0 and f"title{HOSTILE}end" in r.stdout


# -- 7. crafted archives: a value of the wrong type never crashes a reader -----------------------------


def _build_archive(path):
    """Every kind of session: a 1:1 chat with raw bytes and a note, a room with a participant who
    joins, speaks and leaves, a queued client served later, and a chat still in progress. The
    NOT NULL constraints are taken out of the schema, as anyone crafting a file can."""
    import sqlite3
    import time

    s = open_store(path)
    a = s.begin_session(("127.0.0.1", 5000), ("127.0.0.1", 9999), served=True)
    s.set_handle(a, "amy")
    s.add_message(a, "client", "amy", "hello server", raw=b"hello server\0\0")
    s.add_message(a, "server", "SERVER", "hi amy", note="line cut at 1000 bytes")
    s.end_session(a, "client-quit")
    room = s.begin_session(("0.0.0.0", 0), ("127.0.0.1", 9998), served=True, kind="room")
    p = s.rec.add_participant(room, "127.0.0.1", 6000, time.time())
    s.rec.set_participant_handle(p, "bob")
    s.rec.add_event(room, p, "joined", time.time())
    s.add_message(room, "client", "bob", "hello room", participant=p)
    s.rec.end_participant(p, "client-quit", time.time())
    s.rec.add_event(room, p, "left", time.time())
    s.end_session(room, "shutdown")
    queued = s.begin_session(("::1", 7000), ("::1", 9999), served=False)
    s.set_handle(queued, "cat")
    s.add_message(queued, "client", "cat", "waiting hello")
    s.serve_session(queued)
    s.add_message(queued, "server", "SERVER", "hello cat")
    s.end_session(queued, "timeout")
    live = s.begin_session(("127.0.0.1", 8000), ("127.0.0.1", 9999), served=True)
    s.set_handle(live, "dan")
    s.add_message(live, "client", "dan", "hello live")
    s.close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA writable_schema = ON")
    conn.execute("UPDATE sqlite_master SET sql = replace(sql, 'NOT NULL', '') WHERE name IN ('sessions', 'messages')")
    conn.commit()
    conn.close()


@pytest.fixture(scope="module")
def crafted_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("crafted") / "base.db"
    _build_archive(path)
    return path


READERS = [
    ["sessions"], ["sessions", "--json"], ["sessions", "--csv"], ["sessions", "--verified"], ["sessions", "-n", "0", "--handle", "amy"],
    ["show", "1"], ["show", "2", "-t"], ["show", "3"], ["show", "last"],
    ["search", "hello"], ["search", "hello", "--json"], ["search", "hello", "--csv"], ["search", "-c", "hello"],
    ["stats"], ["stats", "--json"], ["replay", "2", "--instant"], ["replay", "3", "--instant"],
    *(["export", "-f", fmt] for fmt in ("txt", "md", "json", "jsonl", "csv", "html", "cast")),
]
# Raw control characters (C0 but newline and tab, DEL, C1). CSV into a pipe is the exact text by
# design (at a terminal it is made visible: see item 6), so it is not checked for them here.
CONTROL = {chr(c) for c in (*range(0x20), *range(0x7F, 0xA0))} - {"\n", "\t"}


def _mutated(base, tmp_path, changes):
    import shutil
    import sqlite3

    path = tmp_path / f"m{_mutated.n}.db"
    _mutated.n += 1
    shutil.copy(base, path)
    conn = sqlite3.connect(path)
    for table, column, value, row in changes:
        where = "" if row is None else f" WHERE id = {row}"
        try:
            if isinstance(value, BadText):
                conn.execute(f"UPDATE {table} SET {column} = CAST(? AS TEXT){where}", (value.data,))
            else:
                conn.execute(f"UPDATE {table} SET {column} = ?{where}", (value,))
        except sqlite3.IntegrityError:
            pass  # (session_id, seq) stays unique: that mutation is not possible
    conn.commit()
    conn.close()
    return path


_mutated.n = 0


class BadText:
    """Bytes stored as TEXT that are not UTF-8."""

    def __init__(self, data: bytes):
        self.data = data

    def __repr__(self):
        return f"BadText({self.data!r})"


def _read_everything(path):
    """Every read tool over the archive, in-process: no traceback, exit 0 or one `chatlog:` line,
    no raw control character."""
    import io

    from click.testing import CliRunner

    from chatlog.archive import open_archive
    from chatlog.cli import cli
    from chatlog.db import StoreError
    from chatlog.render import Renderer
    from chatlog.replay import Follower

    for args in READERS:
        r = CliRunner().invoke(cli, [*args, "--db", str(path)], catch_exceptions=True)
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            import traceback

            tb = "".join(traceback.format_exception(r.exception))
            raise AssertionError(f"{args}: {tb}")
        assert r.exit_code in (0, 1), (args, r.exit_code, r.output[-500:])
        if r.exit_code == 1:
            assert r.stderr.startswith("chatlog: ") and r.stderr.count("\n") == 1, (args, r.stderr)
        shown = r.stderr if "csv" in args or "--csv" in args else r.stdout + r.stderr
        assert not CONTROL & set(shown), (args, sorted(CONTROL & set(shown)), shown[-500:])
    # tail: one pass over each session, in progress or not
    store = open_archive(path)
    out = io.StringIO()
    for sid in (1, 2, 3, 4):
        try:
            s = store.session(sid)
            if s is not None:
                stop = iter((False,)).__next__  # one pass, then stop
                Follower(store, Renderer(out, color=False), poll=0, stop=lambda stop=stop: _once(stop)).session(s, 1)
        except StoreError as exc:
            assert "\n" not in str(exc) and not CONTROL & set(str(exc))
    assert not CONTROL & set(out.getvalue())
    store.close()


def _once(step):
    try:
        return step()
    except StopIteration:
        return True


SESSION_COLUMNS = ["started_at", "served_at", "ended_at", "client_host", "client_port", "server_host", "server_port",
                   "handle", "end_reason", "client_messages", "server_messages", "server_id", "deleting", "kind",
                   "transport", "tls_version", "tls_cipher", "cert_fingerprint", "verified"]
MESSAGE_COLUMNS = ["session_id", "seq", "at", "sender", "handle", "text", "raw", "note", "participant_id", "removed_at"]


@pytest.mark.parametrize("table, column, value", [
    ("messages", "at", b"\x1b[2J\xff"),  # show: TypeError
    ("sessions", "client_messages", ""),  # sessions: TypeError
    ("sessions", "end_reason", b"\x1b]0;pwned\x07"),  # stats: AttributeError
    ("messages", "handle", b"\x00\x1b[31m"),
    ("sessions", "server_port", b"\xff\xfe"),
    ("messages", "text", None),
    ("sessions", "started_at", None),
    ("messages", "text", BadText(b"bad \xff\x1b[2J")),
    ("sessions", "handle", BadText(b"\xc3(")),
    ("sessions", "cert_fingerprint", b"\x1b[2J"),
    ("sessions", "verified", "yes"),
    ("messages", "removed_at", b"\x1b]0;x\x07\xff"),
    ("messages", "removed_at", 12),
    ("sessions", "tls_version", BadText(b"\xff\x1b]0;x\x07")),
])
def test_the_crafted_archives_that_crashed_the_readers(crafted_base, tmp_path, table, column, value):
    _read_everything(_mutated(crafted_base, tmp_path, [(table, column, value, None)]))


WRONG = st.one_of(
    st.binary(max_size=12), st.text(max_size=20), st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False), st.none(),
    st.sampled_from(["", "\x1b]0;pwned\x07\x1b[2J", "\x9b2J\u202e", "9999-99-99T99:99:99", "A" * 70_000,
                     -1, 2**63 - 1, -(2**63), 1e308, -0.0, BadText(b"A\xff\x1b[2J")]),
)
MUTATION = st.one_of(
    st.tuples(st.just("sessions"), st.sampled_from(SESSION_COLUMNS), WRONG, st.sampled_from([None, 1, 2, 3, 4])),
    st.tuples(st.just("messages"), st.sampled_from(MESSAGE_COLUMNS), WRONG, st.sampled_from([None, 1, 2, 4, 6, 8])),
)


@settings(max_examples=int(os.environ.get("CHATLOG_CRAFTED_EXAMPLES", "25")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.lists(MUTATION, min_size=1, max_size=3))
def test_a_crafted_archive_never_crashes_a_reader(crafted_base, tmp_path, changes):
    _read_everything(_mutated(crafted_base, tmp_path, changes))


def test_an_export_that_meets_text_that_is_not_utf8_goes_on_after_it_in_any_batch(tmp_path):
    """The export reads messages a batch at a time (archive.FETCH); text that is not UTF-8 in a
    later batch is read again leniently from after the last row of the batch before: every
    message once, in order, the bad bytes made visible, whichever batch they fall in."""
    import json
    import sqlite3
    import time

    from click.testing import CliRunner

    from chatlog.archive import FETCH
    from chatlog.cli import cli
    from chatlog.recorder import open_recorder

    path = tmp_path / "batches.db"
    rec = open_recorder(path)
    per = FETCH + 300  # each session crosses a batch boundary
    for s in range(3):
        sid = rec.begin_session("127.0.0.1", 1, "127.0.0.1", 2, time.time(), served=True)
        for i in range(per):
            rec.add_message(sid, "client", "bob", f"line {s} {i}", None, None, time.time())
        rec.end_session(sid, "disconnect", time.time())
    rec.close()
    conn = sqlite3.connect(path)
    # The first is met in the third batch (the connection reads leniently from then on, so it
    # is the one that makes the walk go on from where it was); then the last message.
    bad = [2 * FETCH + 5, 3 * per]
    conn.executemany("UPDATE messages SET text = CAST(X'62616466FF' AS TEXT) WHERE id = ?", [(i,) for i in bad])
    conn.commit()
    conn.close()
    r = CliRunner().invoke(cli, ["export", "-f", "jsonl", "--db", str(path)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.output.splitlines()]
    assert [row["id"] for row in rows] == list(range(1, 3 * per + 1))
    texts = {row["id"]: row["text"] for row in rows}
    assert all(texts[i].startswith("badf") and texts[i] != "badf" for i in bad)
    assert texts[2] == "line 0 1" and texts[3 * per - 1] == f"line 2 {per - 2}"


def test_an_archive_on_a_full_disk_is_read_and_a_write_says_the_disk_is_full(tmp_path, tmpfs):
    """Its disk full, every read tool failed with `database error ...: disk I/O error`: SQLite
    could not make the -shm a WAL database is read through. With no WAL to read (nothing
    committed but not yet in the file), the file is read as it is; a write says why it cannot."""
    import shutil

    src = tmp_path / "chat.db"
    s = open_store(src)
    sid = s.begin_session(("10.0.0.1", 5000), ("127.0.0.1", 9999), served=True)
    s.set_handle(sid, "amy")
    s.add_message(sid, "client", "amy", "written before the disk filled")
    s.end_session(sid, "client-quit")
    s.close()
    disk = tmpfs("1m")
    db = disk / "chat.db"
    shutil.copy(src, db)
    assert not (disk / "chat.db-wal").exists()
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    for args in (["sessions"], ["show", "1"], ["stats"], ["search", "disk"], ["export", "1"]):
        r = run_chatlog(db, *args)
        assert r.exit_code == 0 and "Traceback" not in r.output, (args, r.output)
        assert args[0] in ("sessions", "stats") or "written before the" in r.output, (args, r.output)
    from chatlog.archive import open_archive

    with contextlib.closing(open_archive(db, read_only=True)) as a:  # (as `chatlog web` opens it)
        assert [m.text for m in a.messages(1)] == ["written before the disk filled"]
    r = run_chatlog(db, "rm", "1", "--yes")
    assert r.exit_code == 1 and "disk is full" in r.output and r.output.count("\n") == 1, r.output
    assert "written before the disk filled" in run_chatlog(db, "show", "1").output


def test_a_backup_onto_a_disk_that_fills_keeps_the_previous_one_and_names_its_own_file(tmp_path, tmpfs):
    """A backup was written straight into DEST: one that failed halfway (a full disk) left part of
    a copy there, over the previous backup with --force, and the error named the database it
    read (`cannot write the database chat.db: disk is full`), not the file it could not write."""
    src = bulky(tmp_path / "chat.db", 20)
    disk = tmpfs("1m")
    dest = disk / "copy.db"
    dest.write_bytes(b"the previous backup")
    r = run_chatlog(src, "backup", str(dest), "--force")
    assert r.exit_code == 1 and r.output == f"chatlog: cannot write {dest}: disk is full\n", r.output
    assert dest.read_bytes() == b"the previous backup"
    assert sorted(p.name for p in disk.iterdir()) == ["copy.db"]  # nothing half-written left beside it
