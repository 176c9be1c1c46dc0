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
