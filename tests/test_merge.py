"""`chatlog merge` given what it cannot read: one line, and the output is left as it was (a new
one is not left behind), never half a merge. (Merging linked rooms: test_link.py.)"""

import shutil
import signal
import sqlite3
import subprocess
import sys

import pytest

from conftest import ROOT, run_chatlog, wait_until
from storebuild import open_store


def archive(path, handle, lines=3):
    s = open_store(path)
    sid = s.begin_session(("10.0.0.1", 5000), ("127.0.0.1", 9999), served=True)
    s.set_handle(sid, handle)
    for i in range(lines):
        s.add_message(sid, "client", handle, f"{handle} line {i}")
    s.end_session(sid, "client-quit")
    s.close()
    return path


def merge(*paths, out):
    return run_chatlog(None, "merge", *map(str, paths), "-o", str(out))


def everything(db):
    conn = sqlite3.connect(db)
    try:
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY id").fetchall() for t in ("sessions", "messages")}
    finally:
        conn.close()


def test_a_source_that_is_not_an_archive_is_one_line_and_nothing_is_made(tmp_path):
    good = archive(tmp_path / "a.db", "amy")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all\n" * 100)
    crafted = tmp_path / "crafted.db"
    conn = sqlite3.connect(crafted)
    conn.executescript("CREATE TABLE sessions (x); CREATE TABLE messages (y); INSERT INTO sessions VALUES (1);")
    conn.close()
    for bad, words in ((junk, "not an SQLite database"), (crafted, "sessions has no id, started_at")):
        out = tmp_path / "all.db"
        r = merge(good, bad, out=out)
        assert r.exit_code == 1 and r.stderr == f"chatlog: {bad} is not a chatlog archive ({words})\n", r.stderr
        assert not list(tmp_path.glob("all.db*"))  # the good one was not merged first


def test_a_source_that_fails_halfway_leaves_the_output_as_it_was(tmp_path):
    out = tmp_path / "all.db"
    assert merge(archive(tmp_path / "a.db", "amy"), out=out).exit_code == 0
    before = everything(out)
    broken = shutil.copy(archive(tmp_path / "c.db", "cat"), tmp_path / "broken.db")
    conn = sqlite3.connect(broken)
    # It passes the first look and fails once its session is copied: two lines at one place.
    conn.executescript("DROP INDEX idx_messages_session_id_seq; UPDATE messages SET seq = 1;")
    conn.close()
    r = merge(archive(tmp_path / "b.db", "bob"), broken, out=out)
    assert r.exit_code == 1 and r.stderr.startswith(f"chatlog: cannot merge {broken}: ") and r.stderr.count("\n") == 1
    assert r.stderr.endswith(f"; {out} is left as it was\n")
    assert everything(out) == before  # not even bob's archive, which came first
    r = merge(tmp_path / "b.db", out=out)
    assert r.exit_code == 0 and "1 new session, 3 new messages" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_merge_stopped_by_a_signal_leaves_nothing_behind(tmp_path, sig):
    """A merge stopped midway (SIGTERM from a service manager, SIGHUP from a closed terminal) is
    one line and its exit status, and the output it began is not left behind: it used to stay,
    an archive that looked merged and held nothing. An output that was there is left as it was."""
    s = open_store(tmp_path / "big.db")
    sid = s.begin_session(("10.0.0.1", 5000), ("127.0.0.1", 9999), served=True)
    s.add_lines(sid, "client", "amy", 80_000)
    s.end_session(sid, "client-quit")
    s.close()
    out = tmp_path / "all.db"
    kept = tmp_path / "kept.db"
    assert merge(archive(tmp_path / "a.db", "amy"), out=kept).exit_code == 0
    before = everything(kept)
    for target, said in ((out, f"{out} was not made"), (kept, f"{kept} is left as it was")):
        p = subprocess.Popen([sys.executable, "-m", "chatlog", "merge", str(tmp_path / "big.db"), "-o", str(target)],
                             cwd=ROOT, stderr=subprocess.PIPE, text=True)
        # (the output is made, or opened, before the first message is copied)
        wait_until(lambda t=target, p=p: p.poll() is not None or (t.exists() and (tmp_path / f"{t.name}-wal").exists()))
        p.send_signal(sig)
        err = p.communicate(timeout=30)[1]
        assert p.returncode == 128 + sig, (p.returncode, err)  # (had it finished, this says so)
        assert err == f"chatlog: merge stopped by {sig.name}; {said}\n"
    assert not list(tmp_path.glob("all.db*"))
    assert everything(kept) == before


def by_session(db, columns):
    """Each session's `columns` and its lines' texts joined by '|', in session order."""
    conn = sqlite3.connect(db)
    try:
        return conn.execute(
            f"SELECT {columns}, group_concat(m.text, '|') FROM sessions s "
            "LEFT JOIN messages m ON m.session_id = s.id GROUP BY s.id ORDER BY s.id").fetchall()
    finally:
        conn.close()


def texts(db):
    return by_session(db, "s.id, s.ended_at IS NOT NULL, s.client_messages")


def test_a_merged_archive_and_its_sources_give_each_session_once(tmp_path):
    """A merged archive is a source like any other: merged again with one of the archives it came
    from, in either order, each session is there once. It used to be there twice, the second copy
    empty but counted as holding the lines (its lines were rightly taken once)."""
    a, b = archive(tmp_path / "a.db", "amy"), archive(tmp_path / "b.db", "bob")
    ab = tmp_path / "ab.db"
    assert merge(a, b, out=ab).exit_code == 0
    for order in ((ab, a, b), (a, b, ab), (a, ab)):
        out = tmp_path / f"out{len(list(tmp_path.glob('out*.db')))}.db"
        r = merge(*order, out=out)
        assert r.exit_code == 0, r.stderr
        assert sorted((t[3] or "", t[2]) for t in texts(out)) == sorted((t[3], t[2]) for t in texts(ab)), order
        again = everything(out)
        r = merge(ab, a, b, out=out)  # and again, every way round: nothing new
        assert r.exit_code == 0 and "0 new sessions, 0 new messages" in r.stderr, r.stderr
        assert everything(out) == again


def test_an_output_that_is_a_servers_archive_is_refused_and_left_as_it_was(tmp_path):
    """An output that began as a copy of a source (or is a server's own archive) holds sessions no
    merge put there: merging that source into it gave each of its sessions twice. It is refused
    in one line, and left as it was; an archive a merge made takes more merges as ever."""
    a, b = archive(tmp_path / "a.db", "amy"), archive(tmp_path / "b.db", "bob")
    out = shutil.copy(a, tmp_path / "all.db")
    before = everything(out)
    r = merge(a, b, out=out)
    assert r.exit_code == 1 and r.stderr == (
        f"chatlog: {out} holds 1 session no merge put there (a server's archive, or a copy of one): merge "
        f"into a new file, or into one chatlog merge made; {out} is left as it was\n"), r.stderr
    assert everything(out) == before
    made = tmp_path / "made.db"
    assert merge(a, out=made).exit_code == 0
    again = shutil.copy(made, tmp_path / "again.db")  # (a copy of a merge's archive is one too)
    r = merge(a, b, out=again)
    assert r.exit_code == 0 and "1 new session, 3 new messages" in r.stderr, r.stderr
    assert [t[3] for t in texts(again)] == ["amy line 0|amy line 1|amy line 2", "bob line 0|bob line 1|bob line 2"]


def test_a_session_merged_while_in_progress_gets_the_rest_at_the_next_merge(tmp_path):
    """A merge of a live server's archive (a nightly one) takes a chat still going on as it is; the
    next merge takes its later lines and its end. They used to be left out for good, the session
    shown in progress forever."""
    s = open_store(tmp_path / "a.db")
    sid = s.begin_session(("10.0.0.1", 5000), ("127.0.0.1", 9999), served=True)
    s.set_handle(sid, "amy")
    for i in range(3):
        s.add_message(sid, "client", "amy", f"amy line {i}")
    out = tmp_path / "all.db"
    assert merge(tmp_path / "a.db", out=out).exit_code == 0
    assert texts(out) == [(1, 0, 0, "amy line 0|amy line 1|amy line 2")]  # (counted as it ends)
    for i in range(3, 5):
        s.add_message(sid, "client", "amy", f"amy line {i}")
    s.add_message(sid, "server", "SERVER", "bye")
    s.end_session(sid, "client-quit")
    s.close()
    r = merge(tmp_path / "a.db", out=out)
    assert r.exit_code == 0 and "0 new sessions, 3 new messages" in r.stderr, r.stderr
    assert texts(out) == [(1, 1, 5, "amy line 0|amy line 1|amy line 2|amy line 3|amy line 4|bye")]
    assert run_chatlog(out, "show", "1").output == run_chatlog(tmp_path / "a.db", "show", "1").output
    before = everything(out)
    assert merge(tmp_path / "a.db", out=out).exit_code == 0
    assert everything(out) == before


def test_a_line_forgotten_after_a_merge_is_forgotten_at_the_next(tmp_path):
    """`forget` on a server's archive after it was merged: the next merge removes those lines from
    the result too, as it does for a linked room's. It used to keep them there."""
    a = archive(tmp_path / "a.db", "amy")
    archive(tmp_path / "b.db", "bob")
    out = tmp_path / "all.db"
    assert merge(a, tmp_path / "b.db", out=out).exit_code == 0
    assert run_chatlog(a, "forget", "--handle", "amy").exit_code == 0
    assert merge(a, tmp_path / "b.db", out=out).exit_code == 0
    assert run_chatlog(out, "search", "-c", "amy").output.strip() == "0"
    assert run_chatlog(out, "search", "-c", "bob").output.strip() == "3"
    conn = sqlite3.connect(out)
    assert conn.execute("SELECT count(*) FROM messages WHERE removed_at IS NOT NULL AND text = ''").fetchone()[0] == 3
    conn.close()
