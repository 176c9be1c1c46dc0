"""`chatlog merge` attacked: a busy output, odd file names, signals as it commits, rows deleted from
a merged archive, lines removed on one side and the other, an older merged archive beside its
source. Each test failed before its fix."""

import os
import signal
import sqlite3

from conftest import run_chatlog
from storebuild import bulky, open_store, schema_before
from test_merge import archive, by_session, everything, merge, texts


def test_a_locked_output_is_one_line_not_a_traceback(tmp_path):
    """The output busy (another merge, a server writing to it): one line, exit status 1, the
    output left as it was. It was an OperationalError traceback from BEGIN IMMEDIATE."""
    out = tmp_path / "all.db"
    assert merge(archive(tmp_path / "a.db", "amy"), out=out).exit_code == 0
    before = everything(out)
    holder = sqlite3.connect(out, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        try:
            r = merge(archive(tmp_path / "b.db", "bob"), out=out)
        except sqlite3.Error as exc:  # (run in-process: what a person saw as a traceback)
            raise AssertionError(f"traceback: {exc!r}") from None
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert r.exit_code == 1 and r.stderr.startswith("chatlog: ") and r.stderr.count("\n") == 1, r.stderr
    assert everything(out) == before


def test_a_source_whose_name_is_not_utf8_is_merged(tmp_path):
    """File names may be any bytes (cli._utf8_arguments): an archive named so is merged like any
    other. It was a UnicodeEncodeError traceback (quote() of the path)."""
    src = archive(tmp_path / "a.db", "amy")
    odd = tmp_path / os.fsdecode(b"\xff-archive.db")
    src.rename(odd)
    out = tmp_path / "all.db"
    try:
        r = merge(odd, out=out)
    except UnicodeError as exc:
        raise AssertionError(f"traceback: {exc!r}") from None
    assert r.exit_code == 0 and "1 new session, 3 new messages" in r.stderr, r.stderr


def test_escape_bytes_in_file_names_never_reach_the_terminal(tmp_path):
    """A file name is any bytes, escapes included: what merge, backup and export say of it (done,
    or why not) shows them as visible escapes. Their done lines and every one-line error printed
    them raw (a file name could set the terminal's title, or colour all that followed)."""
    out = tmp_path / "all\x1b]0;owned\x07.db"
    src = archive(tmp_path / "a\x1b[31mred.db", "amy")
    said = [merge(src, out=out), merge(src, out=src), run_chatlog(None, "sessions", "--db", str(tmp_path / "no\x1b[2J.db")),
            run_chatlog(src, "backup", str(tmp_path / "bk\x1b]0;owned\x07.db")),
            run_chatlog(src, "export", "--all", "-o", str(tmp_path / "ex\x1b]0;owned\x07.txt"))]
    assert [r.exit_code for r in said] == [0, 1, 1, 0, 0], [r.stderr for r in said]
    for r in said:
        assert r.stderr.count("\n") == 1 and "\x1b" not in r.stderr and "\x07" not in r.stderr, r.stderr
        assert "\\x1b" in r.stderr, r.stderr


def test_a_session_deleted_from_the_merged_archive_does_not_give_its_id_to_the_next(tmp_path):
    """`rm` of the newest session of a merged archive, then a merge of another archive: the new
    session must not take the deleted one's id (m013: ids are never reused), and the next merge
    of the same archives must still work. The new session took id 2, `merged` still said the
    deleted session of b.db was session 2, and every later merge of b.db failed (its lines put
    into cat's session: a UNIQUE constraint)."""
    a, b, c = (archive(tmp_path / f"{h[0]}.db", h) for h in ("amy", "bob", "cat"))
    out = tmp_path / "all.db"
    assert merge(a, b, out=out).exit_code == 0
    assert run_chatlog(out, "rm", "-y", "2").exit_code == 0
    assert merge(c, out=out).exit_code == 0
    conn = sqlite3.connect(out)
    try:
        ids = [r[0] for r in conn.execute("SELECT id FROM sessions ORDER BY id")]
        mids = [r[0] for r in conn.execute("SELECT id FROM messages WHERE session_id = ?", (ids[-1],))]
    finally:
        conn.close()
    assert ids[-1] > 2 and min(mids) > 6, (ids, mids)
    r = merge(a, b, c, out=out)
    assert r.exit_code == 0, r.stderr


def test_a_line_removed_on_the_server_after_another_was_removed_from_the_merged_archive(tmp_path):
    """One line removed from the merged archive (`rm --message` there), then another of the same
    chat removed on the server: the next merge must remove that one too. Whether a session was to
    be looked at again was decided by counting tombstones (1 here, 1 there: nothing to do), and
    the line stayed in the merged archive for good."""
    a = archive(tmp_path / "a.db", "amy")
    out = tmp_path / "all.db"
    assert merge(a, out=out).exit_code == 0
    assert run_chatlog(out, "rm", "-y", "--message", "1").exit_code == 0  # amy line 0, in the merged archive
    assert run_chatlog(a, "rm", "-y", "--message", "2").exit_code == 0  # amy line 1, on the server
    assert merge(a, out=out).exit_code == 0
    assert run_chatlog(out, "search", "-c", "amy").output.strip() == "1"  # amy line 2 alone
    conn = sqlite3.connect(out)
    try:
        assert [r[0] for r in conn.execute("SELECT text FROM messages ORDER BY seq")] == ["", "", "amy line 2"]
    finally:
        conn.close()


def test_a_merge_stopped_after_its_commit_does_not_say_the_output_was_not_made(tmp_path, monkeypatch):
    """SIGTERM once the merge had committed (it used to index for search after COMMIT, up to
    30 s): it said `all.db was not made` and left all.db there, holding the whole merge. A real
    SIGTERM, sent to this process as the merge closes its output: the merge is done, and says
    so."""
    import chatlog.merge as merge_module

    real = merge_module.Merge.close

    def close(self):
        os.kill(os.getpid(), signal.SIGTERM)  # (delivered at once: the handler in force decides)
        real(self)

    monkeypatch.setattr(merge_module.Merge, "close", close)
    out = tmp_path / "all.db"
    r = merge(archive(tmp_path / "a.db", "amy"), out=out)
    assert r.exit_code == 0 and "1 new session, 3 new messages" in r.stderr, (r.exit_code, r.stderr)
    assert texts(out) == texts(tmp_path / "a.db")

def test_ctrl_c_as_the_merge_commits_is_not_a_traceback(tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM/SIGHUP, raised the same way) arriving while COMMIT runs is raised as
    COMMIT returns: merge() then ran ROLLBACK with no transaction, and `cannot rollback - no
    transaction is active` came out as an OperationalError traceback (seen with a real SIGTERM
    too), and a new output, complete, was removed."""
    import chatlog.merge as merge_module

    class Conn:
        def __init__(self, conn):
            self._conn = conn

        def execute(self, sql, *args):
            cur = self._conn.execute(sql, *args)
            if sql == "COMMIT" and not self.__dict__.get("told"):
                self.told = True  # (one Ctrl-C)
                raise KeyboardInterrupt
            return cur

        def __getattr__(self, name):
            return getattr(self._conn, name)

    real = merge_module.Merge.__init__

    def init(self, out):
        real(self, out)
        self.conn = Conn(self.conn)

    monkeypatch.setattr(merge_module.Merge, "__init__", init)
    out = tmp_path / "all.db"
    try:
        r = merge(archive(tmp_path / "a.db", "amy"), out=out)
    except sqlite3.Error as exc:
        raise AssertionError(f"traceback: {exc!r}") from None
    # Committed, the merge is done: it says so (and the output holds it), not a traceback.
    assert r.exit_code == 0 and "1 new session, 3 new messages" in r.stderr, r.stderr
    assert texts(out) == texts(tmp_path / "a.db")


def test_an_older_merged_archive_does_not_put_an_ended_chat_back_in_progress(tmp_path):
    """ab.db merged while amy's chat went on; the chat has ended since. `merge a.db ab.db` (a
    merged archive beside its source) took the end from a.db, then ab.db's older row wrote over
    it: the chat shown `in progress` for ever (ended_at NULL, 0 messages counted), every merge
    again. `merge ab.db a.db` gives the ended chat: the order must not matter."""
    s = open_store(tmp_path / "a.db")
    sid = s.begin_session(("10.0.0.1", 5000), ("127.0.0.1", 9999), served=True)
    s.set_handle(sid, "amy")
    s.add_message(sid, "client", "amy", "amy line 0")
    ab = tmp_path / "ab.db"
    assert merge(tmp_path / "a.db", out=ab).exit_code == 0
    s.add_message(sid, "client", "amy", "amy line 1")
    s.end_session(sid, "client-quit")
    s.close()
    one, two = tmp_path / "one.db", tmp_path / "two.db"
    assert merge(ab, tmp_path / "a.db", out=one).exit_code == 0
    assert merge(tmp_path / "a.db", ab, out=two).exit_code == 0
    assert texts(one) == [(1, 1, 2, "amy line 0|amy line 1")]
    assert texts(two) == texts(one)


def rooms(db):
    return by_session(db, "s.room, s.ended_at IS NOT NULL")


def as_afresh(src, out):
    """The rooms of `out`, merged from `src` in steps, checked against a merge of it made afresh."""
    fresh = out.with_name("fresh.db")
    assert merge(src, out=fresh).exit_code == 0
    assert rooms(out) == rooms(fresh)
    return rooms(out)


def room_run(path, lines=(), *, streamed, at="2026-01-01 00:00:00", end=True):
    """One run of room `lab` (its lines as a linked room records them when `streamed`: origin and
    stream sequence; else as a room never linked)."""
    s = open_store(path)
    sid = s.begin_session(("10.0.0.1", 5000), ("127.0.0.1", 9999), served=True, kind="room", at=at)
    uid = s.rec.node_uid()
    s.close()
    add_room_lines(path, sid, uid, lines, streamed=streamed, at=at, end=end)
    return sid, uid


def add_room_lines(path, sid, uid, lines, *, streamed, at="2026-01-01 00:00:00", end=True):
    conn = sqlite3.connect(path)
    conn.execute("UPDATE sessions SET room = 'lab' WHERE id = ?", (sid,))
    top = conn.execute("SELECT coalesce(max(seq), 0) FROM messages WHERE session_id = ?", (sid,)).fetchone()[0]
    base = conn.execute("SELECT coalesce(max(stream_seq), 0) FROM messages").fetchone()[0]
    for i, text in enumerate(lines, 1):
        conn.execute(
            "INSERT INTO messages (session_id, seq, at, sender, handle, text, origin_server, origin_id, stream_seq) "
            "VALUES (?, ?, ?, 'client', 'amy', ?, ?, ?, ?)",
            (sid, top + i, f"{at[:-2]}{top + i:02d}", text, *((uid, f"{sid}.{top + i}.0", base + i) if streamed
                                                            else (None, None, None))))
    if end:
        conn.execute("UPDATE sessions SET ended_at = ?, end_reason = 'shutdown' WHERE id = ?", (f"{at[:-5]}59:00", sid))
    conn.commit()
    conn.close()


def test_a_linked_room_merged_before_its_first_streamed_line_is_not_left_in_progress_for_ever(tmp_path):
    """A nightly merge that meets a linked room just begun (nothing relayed yet) copies it as a
    session of one server; once its lines came through the stream, the next merge puts the room
    in its one session, and the first copy stayed beside it: empty, `in progress` for ever. The
    result must be what a merge made afresh gives."""
    a = tmp_path / "a.db"
    sid, uid = room_run(a, streamed=True, end=False)
    conn = sqlite3.connect(a)  # (a linked server notes its room's stream as it starts)
    conn.execute("INSERT INTO room_links (room, stream) VALUES ('lab', 'chatlog_lab')")
    conn.commit()
    conn.close()
    out = tmp_path / "all.db"
    assert merge(a, out=out).exit_code == 0
    add_room_lines(a, sid, uid, ["line 1", "line 2"], streamed=True)
    assert merge(a, out=out).exit_code == 0
    assert as_afresh(a, out) == [("lab", 1, "line 1|line 2")]


def test_merging_a_big_linked_room_again_does_not_redo_it(tmp_path):
    """A nightly merge of a busy room: merging it again took longer than the first merge (43 s
    against 11 s for 200,000 lines), every line read and offered again, and every line's place
    written twice. Now a run's lines already taken are not read again, the room is put in order
    only when something came, and an unchanged merge writes nothing. A line removed since, and
    lines said since, still come."""
    a = tmp_path / "a.db"
    sid, uid = room_run(a, [f"line {i}" for i in range(1, 301)], streamed=True, end=False)
    out = tmp_path / "all.db"
    assert merge(a, out=out).exit_code == 0

    def changes():
        from chatlog.merge import Merge

        m = Merge(out)  # (the count of rows written, on the merge's own connection)
        try:
            m.conn.execute("BEGIN IMMEDIATE")
            start = m.conn.total_changes
            m.add(a)
            return m.conn.total_changes - start
        finally:
            m.conn.execute("ROLLBACK")
            m.db.close()

    assert changes() == 0  # nothing new: nothing written (it rewrote 600 places)
    add_room_lines(a, sid, uid, ["line 301", "line 302"], streamed=True)
    conn = sqlite3.connect(a)
    conn.execute("UPDATE messages SET text = '', removed_at = '2026-01-02 00:00:00' WHERE text = 'line 5'")
    conn.commit()
    conn.close()
    r = merge(a, out=out)
    assert r.exit_code == 0 and "0 new sessions, 2 new messages" in r.stderr, r.stderr
    texts_now = [t for (t,) in sqlite3.connect(out).execute(
        "SELECT text FROM messages WHERE session_id = (SELECT merged_session FROM merged WHERE source = 'room:lab') "
        "ORDER BY seq")]
    assert texts_now == [f"line {i}" if i != 5 else "" for i in range(1, 303)]
    fresh = tmp_path / "fresh.db"
    assert merge(a, out=fresh).exit_code == 0
    assert rooms(fresh) == rooms(out)


def test_a_room_run_merged_before_the_room_was_linked_joins_the_room_at_the_next_merge(tmp_path):
    """Room `lab` served without --link, merged; then served with --link. A merge made afresh
    puts both runs' lines in the room's one session; the merge made in two steps left the first
    run's lines in a session of their own, for good."""
    a = tmp_path / "a.db"
    room_run(a, ["old one", "old two"], streamed=False)
    out = tmp_path / "all.db"
    assert merge(a, out=out).exit_code == 0
    room_run(a, ["new one", "new two"], streamed=True, at="2026-01-02 00:00:00")
    assert merge(a, out=out).exit_code == 0
    assert as_afresh(a, out) == [("lab", 1, "old one|old two|new one|new two")]


def test_a_room_deleted_from_the_merged_archive_stays_deleted_and_merges_go_on(tmp_path):
    """`rm` of a linked room's session in the merged archive, then more lines in the room: every
    later merge of that archive failed (`FOREIGN KEY constraint failed`: the room's lines went to
    the deleted session). A session deleted from the merged archive stays deleted, as a 1:1
    chat's does, and the merge goes on with the rest."""
    a = tmp_path / "a.db"
    sid, uid = room_run(a, ["line 1", "line 2"], streamed=True)
    b = archive(tmp_path / "b.db", "bob")
    out = tmp_path / "all.db"
    assert merge(a, b, out=out).exit_code == 0
    room = sqlite3.connect(out).execute("SELECT merged_session FROM merged WHERE source = 'room:lab'").fetchone()[0]
    assert run_chatlog(out, "rm", "-y", str(room)).exit_code == 0
    add_room_lines(a, sid, uid, ["line 3"], streamed=True)
    conn = sqlite3.connect(b)
    conn.execute("UPDATE messages SET text = '', removed_at = '2026-01-02 00:00:00' WHERE text = 'bob line 0'")
    conn.commit()
    conn.close()
    r = merge(a, b, out=out)
    assert r.exit_code == 0 and "0 new sessions, 0 new messages" in r.stderr, r.stderr
    assert [t[0] for t in rooms(out)] == [None]  # bob's chat alone
    assert run_chatlog(out, "search", "-c", "bob").output.strip() == "2"  # (its forgotten line removed)


def legacy_archive(path, sessions):
    """An archive from before archives had an identity of their own (schema m014)."""
    conn = schema_before(path, "m014")
    for sid, (started, handle) in enumerate(sessions, 1):
        conn.execute("INSERT INTO sessions (id, started_at, ended_at, client_host, client_port, handle) "
                     "VALUES (?, ?, ?, '10.0.0.1', ?, ?)", (sid, started, started, 5000 + sid, handle))
        for i in range(2):
            conn.execute("INSERT INTO messages (session_id, seq, at, sender, handle, text) VALUES (?, ?, ?, 'client', ?, ?)",
                         (sid, i + 1, started, handle, f"{handle} said {i}"))
    conn.close()
    return path


def test_an_archive_from_before_identities_is_known_upgraded_moved_or_replaced(tmp_path):
    """An archive from before `node` was taken under its file's path. Upgraded in place by a
    server, or moved, the next merge took every session of it again (twice in the result);
    another archive put at its path had its sessions taken for the first one's (left out)."""
    old = legacy_archive(tmp_path / "old.db", [("2026-01-01T10:00:00.123456+00:00", "amy"),
                                               ("2026-01-02T11:00:00.654321+00:00", "bob")])
    moved = tmp_path / "moved.db"
    moved.write_bytes(old.read_bytes())
    out = tmp_path / "all.db"
    assert "2 new sessions, 4 new messages" in merge(old, out=out).stderr
    assert "0 new sessions, 0 new messages" in merge(moved, out=out).stderr  # (moved, or renamed)
    open_store(old).close()  # upgraded in place: a server opened it (it has an identity now)
    s = open_store(old)
    sid = s.begin_session(("10.0.0.2", 6000), ("127.0.0.1", 9999), served=True)
    s.add_message(sid, "client", "cat", "after the upgrade")
    s.end_session(sid, "client-quit")
    s.close()
    r = merge(old, out=out)
    assert r.exit_code == 0 and "1 new session, 1 new message" in r.stderr, r.stderr
    assert "0 new sessions, 0 new messages" in merge(old, moved, out=out).stderr
    assert [t[3] for t in texts(out)] == ["amy said 0|amy said 1", "bob said 0|bob said 1", "after the upgrade"]
    other = tmp_path / "other"
    other.mkdir()
    first = legacy_archive(other / "x.db", [("2026-02-01T09:00:00.000001+00:00", "dan")])
    assert "1 new session, 2 new messages" in merge(first, out=out).stderr
    first.unlink()
    legacy_archive(first, [("2026-03-01T09:00:00.000002+00:00", "eve")])  # another archive, same path
    assert "1 new session, 2 new messages" in merge(first, out=out).stderr
    assert "0 new sessions, 0 new messages" in merge(first, out=out).stderr
    assert sorted(t[3] for t in texts(out))[-2:] == ["dan said 0|dan said 1", "eve said 0|eve said 1"]


def test_two_copies_of_an_archive_from_before_identities_each_served_lose_nothing(tmp_path):
    """Two copies of one old archive, each upgraded and served by a server of its own: their
    shared sessions are one, and what each server recorded since is its own (the same session
    ids on both: neither is taken for the other's)."""
    old = legacy_archive(tmp_path / "old.db", [("2026-01-01T10:00:00.123456+00:00", "amy")])
    out = tmp_path / "all.db"
    assert "1 new session, 2 new messages" in merge(old, out=out).stderr
    copies = []
    for name, handle in (("a", "ann"), ("b", "ben")):
        copy = tmp_path / f"{name}.db"
        copy.write_bytes(old.read_bytes())
        s = open_store(copy)  # upgraded, and served
        sid = s.begin_session(("10.0.0.3", 7000), ("127.0.0.1", 9999), served=True)
        s.add_message(sid, "client", handle, f"{handle} on {name}")
        s.end_session(sid, "client-quit")
        s.close()
        copies.append(copy)
    r = merge(*copies, out=out)
    assert r.exit_code == 0 and "2 new sessions, 2 new messages" in r.stderr, r.stderr
    assert "0 new sessions, 0 new messages" in merge(old, *copies, out=out).stderr
    assert [t[3] for t in texts(out)] == ["amy said 0|amy said 1", "ann on a", "ben on b"]


def test_a_bare_archive_beside_an_old_one_is_merged(tmp_path):
    """An archive with only the columns a merge needs (sessions without client addresses),
    merged into an output that holds an archive from before identities: it failed with "no such
    column: client_host", where beside any other output it is merged."""
    out = tmp_path / "all.db"
    assert merge(legacy_archive(tmp_path / "old.db", [("2026-01-01T10:00:00.123456+00:00", "amy")]), out=out).exit_code == 0
    bare = tmp_path / "bare.db"
    conn = sqlite3.connect(bare)
    conn.executescript(
        "CREATE TABLE sessions (id INTEGER PRIMARY KEY, started_at TEXT);"
        "CREATE TABLE messages (id INTEGER PRIMARY KEY, session_id INTEGER, seq INTEGER, at TEXT, sender TEXT, handle TEXT, text TEXT);"
        "INSERT INTO sessions VALUES (1, '2026-01-05T10:00:00.000000+00:00');"
        "INSERT INTO messages VALUES (1, 1, 1, '2026-01-05T10:00:01.000000+00:00', 'client', 'zed', 'bare words');")
    conn.close()
    r = merge(bare, out=out)
    assert r.exit_code == 0 and "1 new session, 1 new message" in r.stderr, r.stderr


def test_an_output_on_a_disk_that_fills_is_an_error_not_said_as_merged(tmp_path, tmpfs):
    """A full disk makes SQLite roll the merge's transaction back itself; merge took that for a
    COMMIT that had returned and said `merged 1 archive ...: 202 new sessions` with exit status 0,
    over an output holding none of it."""
    src = bulky(tmp_path / "big.db", 40)
    disk = tmpfs("1m")
    out = disk / "all.db"
    r = merge(src, out=out)
    assert r.exit_code == 1 and r.stderr.startswith("chatlog: ") and r.stderr.count("\n") == 1, (r.output, r.stderr)
    assert "full" in r.stderr and "merged" not in r.output
    assert not [p for p in disk.iterdir()]  # a new output is not left behind
    assert merge(archive(tmp_path / "a.db", "amy"), out=out).exit_code == 0
    before = everything(out)
    r = merge(src, out=out)
    assert r.exit_code == 1 and "full" in r.stderr and "is left as it was" in r.stderr, (r.output, r.stderr)
    assert everything(out) == before
