"""The transcript tools against a real SQLite file filled through the store's own API."""

import base64
import csv
import io
import json
import shutil
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, run_chatlog
from storebuild import open_store

HOSTILE = [
    "\x1b[2J\x1b]0;title\x07",
    "[bold]x[/] [link=https://x]y[/link] :smile: trailing\\",
    "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">",
    "=cmd|' /C calc'!A0",
    "+1",
    "-1",
    "@SUM(1)",
    "\u202eevil",
]
BAD_UTF8_RAW = b"bob>\xff\xfe bytes\n\0pad\0"


def t(sec):
    return f"2026-11-20T10:{sec // 60:02d}:{sec % 60:02d}.250000+00:00"


@pytest.fixture
def db(tmp_path):
    """Three sessions: a hostile one, a friendly one, and one still in progress."""
    path = tmp_path / "t.db"
    s = open_store(path)
    a = s.begin_session(("127.0.0.1", 5000), ("127.0.0.1", 9999), at=t(0), served=True)
    s.set_handle(a, "bob")
    s.add_message(a, "client", "bob", "hello server", at=t(1))
    s.add_message(a, "server", "SERVER", "why hello client", at=t(3))
    for i, text in enumerate(HOSTILE):
        s.add_message(a, "client", "bob", text, at=t(5 + 2 * i))
        s.add_message(a, "server", "SERVER", f"noted {i}", at=t(6 + 2 * i))
    s.add_message(a, "client", "bob", "\ufffd\ufffd bytes", raw=BAD_UTF8_RAW, at=t(40))
    s.end_session(a, "client-quit", at=t(41))
    b = s.begin_session(("10.0.0.7", 6001), ("127.0.0.1", 9999), at="2026-11-22T09:00:00.000000+00:00", served=True)
    s.set_handle(b, "amy")
    s.add_message(b, "client", "amy", "e-mail me, don't forget", at="2026-11-22T09:00:01.000000+00:00")
    s.add_message(b, "server", "SERVER", "sure", at="2026-11-22T09:01:01.000000+00:00")
    s.end_session(b, "server-quit", at="2026-11-22T09:01:02.000000+00:00")
    c = s.begin_session(("127.0.0.1", 5002), ("127.0.0.1", 9999), served=True)
    s.set_handle(c, "cat")
    s.add_message(c, "client", "cat", "still talking")
    s.close()
    return path


run = run_chatlog


def no_raw_controls(text):
    return not any(ch in text for ch in ("\x1b", "\x07", "\x9b", "\u202e"))


# -- sessions ---------------------------------------------------------------------------------


def test_sessions_lists_newest_first(db):
    r = run(db, "sessions")
    assert r.exit_code == 0
    lines = r.output.splitlines()
    assert lines[0].split() == ["id", "started", "duration", "client", "handle", "messages", "ended"]
    assert [line.split()[0] for line in lines[1:]] == ["3", "2", "1"]
    assert "in progress" in lines[1] and "server-quit" in lines[2] and "client-quit" in lines[3]
    assert "10.0.0.7:6001" in lines[2] and "1m 02s" in lines[2]


def test_sessions_json_shape_and_filters(db):
    rows = json.loads(run(db, "sessions", "--json").output)
    assert [r["id"] for r in rows] == [3, 2, 1]
    assert set(rows[0]) >= {"id", "started_at", "ended_at", "client_host", "client_port", "handle", "end_reason",
                            "client_messages", "server_messages", "duration_seconds"}
    by_handle = {r["handle"]: r for r in rows}
    assert by_handle["bob"]["client_messages"] == 10 and by_handle["bob"]["server_messages"] == 9
    assert by_handle["cat"]["client_messages"] == 1  # counted live while in progress
    assert [r["id"] for r in json.loads(run(db, "sessions", "--json", "--handle", "amy").output)] == [2]
    assert [r["id"] for r in json.loads(run(db, "sessions", "--json", "--host", "10.0.0.7").output)] == [2]
    assert [r["id"] for r in json.loads(run(db, "sessions", "--json", "--since", "2026-11-21").output)] == [3, 2]
    assert [r["id"] for r in json.loads(run(db, "sessions", "--json", "--until", "2026-11-21").output)] == [1]
    assert [r["id"] for r in json.loads(run(db, "sessions", "--json", "--since", "1h").output)] == [3]
    assert [r["id"] for r in json.loads(run(db, "sessions", "--json", "-n", "1").output)] == [3]


def test_sessions_csv(db):
    rows = list(csv.DictReader(io.StringIO(run(db, "sessions", "--csv", "-n", "0").output)))
    assert [r["id"] for r in rows] == ["3", "2", "1"]


def test_sessions_utc(db):
    assert "2026-11-20 10:00:00Z" in run(db, "sessions", "--utc").output


# -- show -------------------------------------------------------------------------------------


def test_show_is_the_console_transcript_made_safe(db):
    r = run(db, "show", "1", "--utc")
    assert r.exit_code == 0
    out = r.output
    assert out.startswith("Session 1: bob from 127.0.0.1 port 5000\n")
    assert "connected to: 127.0.0.1 port 5000\nbob>hello server\nSERVER>why hello client\n" in out
    assert "bob>\\x1b[2J\\x1b]0;title\\x07\n" in out
    assert "bob>[bold]x[/] [link=https://x]y[/link] :smile: trailing\\\n" in out
    assert "bob>\\u202eevil" in out
    assert out.rstrip().endswith("client has quit (session 1, 10 from the client, 9 from the server)")
    assert no_raw_controls(out)


def test_show_last_and_errors(db, tmp_path):
    assert "cat>still talking" in run(db, "show", "last").output
    r = run(db, "show", "99")
    assert r.exit_code == 1 and r.output == "chatlog: no session 99\n"
    r = run(db, "show", "abc")
    assert r.exit_code == 2 and r.output == "chatlog: Invalid value for 'ID': invalid session id 'abc' (a number, or 'last')\n"
    empty = tmp_path / "empty.db"
    open_store(empty).close()
    r = run(empty, "show", "last")
    assert r.exit_code == 1 and r.output == "chatlog: no sessions recorded yet\n"
    r = run(empty, "sessions")  # nothing to list is not a failure
    assert r.exit_code == 0 and r.stdout == "" and r.stderr == "no sessions recorded yet\n"
    r = run(tmp_path / "missing.db", "sessions")
    assert r.exit_code == 1 and "no chatlog database at" in r.output


def test_not_sqlite_gives_one_line(tmp_path):
    bad = tmp_path / "x.db"
    bad.write_text("not a database")
    for cmd in (["sessions"], ["show", "1"], ["search", "x"], ["export"], ["stats"]):
        r = run(bad, *cmd)
        assert r.exit_code == 1 and r.output.count("\n") == 1 and "not a chatlog database" in r.output


# -- replay -----------------------------------------------------------------------------------


def test_replay_into_a_pipe_prints_without_waiting(db):
    start = time.monotonic()
    r = run(db, "replay", "1")
    assert time.monotonic() - start < 5  # the session lasted 41 s
    assert r.output == run(db, "show", "1").output.split("\n\n", 1)[1]


class FakeClock:
    """A clock that moves only when the player sleeps (or when a write takes time)."""

    def __init__(self):
        self.now = 100.0
        self.slept = []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.slept.append(round(seconds, 6))
        self.now += seconds


def test_replay_timing_speed_and_idle_limit():
    from chatlog.replay import play, schedule

    times = [t(0), t(1), t(3), t(63)]
    lines = [(x, str(i)) for i, x in enumerate(times)]
    assert [round(s, 3) for s, _ in schedule(lines)] == [0, 1, 3, 63]
    assert [round(s, 3) for s, _ in schedule(lines, speed=2)] == [0, 0.5, 1.5, 31.5]
    assert [round(s, 3) for s, _ in schedule(lines, idle_limit=1.5)] == [0, 1, 2.5, 4]
    # -i caps the recorded pause first, then --speed scales it (as asciinema does): the 60 s
    # pause becomes 2 s, played at 4x in 0.5 s (not min(60 / 4, 2) = 2 s).
    clock, shown = FakeClock(), []
    play(schedule(lines, speed=4, idle_limit=2), shown.append, clock=clock, sleep=clock.sleep)
    assert shown == ["0", "1", "2", "3"] and clock.slept == [0.25, 0.5, 0.5]
    clock = FakeClock()
    play(schedule(lines), lambda line: None, instant=True, clock=clock, sleep=clock.sleep)
    assert clock.slept == []


def test_replay_keeps_to_an_absolute_clock():
    """Time spent writing a line is not added to the next pause: playback does not drift."""
    from chatlog.replay import play, schedule

    clock = FakeClock()

    def slow_write(line):
        clock.now += 0.3  # a slow terminal

    play(schedule([(t(0), "a"), (t(1), "b"), (t(2), "c")]), slow_write, clock=clock, sleep=clock.sleep)
    assert clock.slept == [0.7, 0.7]


def _wal_can_restart(path):
    """Whether a writer could start the WAL over now: not while a reader holds a snapshot."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=0)  # busy at once, not after 5 s
    try:
        conn.execute("INSERT INTO sessions (started_at) VALUES ('2026-01-01T00:00:00.000000+00:00')")
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        return busy == 0
    finally:
        conn.close()


def test_replay_streams_a_page_at_a_time(tmp_path):
    """A long session is read in pages, so replay never holds all of it (nor a read transaction
    for the whole playback)."""
    from chatlog.archive import open_archive
    from chatlog.replay import paged_messages

    path = tmp_path / "pages.db"
    s = open_store(path)
    sid = s.begin_session(("127.0.0.1", 1), ("127.0.0.1", 2), at=t(0), served=True)
    for i in range(25):
        s.add_message(sid, "client", "pat", f"m{i}", at=t(i))
    s.close()
    store = open_archive(path)
    pages = paged_messages(store, sid, page=10)
    first = [next(pages).text for _ in range(10)]
    assert first == [f"m{i}" for i in range(10)]
    assert _wal_can_restart(path)  # no read snapshot held between pages
    rows = store.messages(sid)
    next(rows)
    assert not _wal_can_restart(path)  # (what an open cursor would do)
    assert [m.text for m in pages] == [f"m{i}" for i in range(10, 25)]


def test_replay_at_a_terminal_pauses_with_space(db, tmp_path):
    import os

    import pexpect

    s = open_store(db)
    sid = s.begin_session(("127.0.0.1", 1), ("127.0.0.1", 2), at=t(0), served=True)
    s.add_message(sid, "client", "pat", "first", at=t(0))
    s.add_message(sid, "client", "pat", "second", at=t(1))
    s.end_session(sid, "client-quit", at=t(1))
    s.close()
    p = pexpect.spawn(sys.executable, ["-m", "chatlog", "replay", str(sid), "--db", str(db)],
                      env=dict(os.environ, NO_COLOR="1"), encoding="utf-8", timeout=10)
    p.expect_exact("pat>first")
    p.send(" ")  # pause before "second" (due 1 s later)
    p.expect_exact("[paused: space to resume]")
    with pytest.raises(pexpect.TIMEOUT):
        p.expect_exact("pat>second", timeout=1.5)
    p.send(" ")
    p.expect_exact("pat>second")
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0


# -- export -----------------------------------------------------------------------------------


def test_export_txt_is_the_uncolored_console(db):
    r = run(db, "export", "1", "--format", "txt")
    assert r.output.startswith("connected to: 127.0.0.1 port 5000\nbob>hello server\n")
    assert no_raw_controls(r.output)
    assert "bob>\\x1b[2J\\x1b]0;title\\x07" in r.output


def test_export_md(db):
    out = run(db, "export", "1", "-f", "md").output
    assert out.startswith("## Session 1: bob from 127.0.0.1 port 5000\n")
    assert "\n    bob>\\x1b[2J\\x1b]0;title\\x07\n" in out  # inside an indented code block
    assert "\n    bob><script>" in out
    assert no_raw_controls(out)


def test_export_json_keeps_everything(db):
    doc = json.loads(run(db, "export", "-f", "json").output)
    assert [s["id"] for s in doc["sessions"]] == [1, 2, 3]
    msgs = doc["sessions"][0]["messages"]
    assert [m["text"] for m in msgs if m["sender"] == "client"][1:9] == HOSTILE
    (raw,) = [m for m in msgs if "raw_base64" in m]
    assert base64.b64decode(raw["raw_base64"]) == BAD_UTF8_RAW and raw["text"] == "\ufffd\ufffd bytes"
    assert doc["sessions"][0]["handle"] == "bob" and doc["sessions"][0]["end_reason"] == "client-quit"


def test_export_jsonl_one_message_per_line(db):
    lines = run(db, "export", "1", "2", "-f", "jsonl").output.splitlines()
    rows = [json.loads(x) for x in lines]
    assert len(rows) == 19 + 2
    assert rows[0] == {
        "session_id": 1, "session_started_at": t(0), "session_ended_at": t(41), "client_host": "127.0.0.1",
        "client_port": 5000, "session_handle": "bob", "end_reason": "client-quit", "seq": 1, "at": t(1),
        "sender": "client", "handle": "bob", "text": "hello server", "id": 1, "verified": False,
        "transport": "tcp", "tls_version": None, "cert_fingerprint": None,
    }
    (raw,) = [r for r in rows if "raw_base64" in r]
    assert base64.b64decode(raw["raw_base64"]) == BAD_UTF8_RAW and raw["session_id"] == 1
    assert "\x1b" not in "\n".join(lines)  # JSON escapes control characters


def test_export_csv_neutralises_formulas(db):
    rows = list(csv.DictReader(io.StringIO(run(db, "export", "1", "-f", "csv").output)))
    texts = [r["text"] for r in rows if r["sender"] == "client"]
    assert "'=cmd|' /C calc'!A0" in texts and "'+1" in texts and "'-1" in texts and "'@SUM(1)" in texts
    (raw,) = [r for r in rows if r["raw_base64"]]
    assert base64.b64decode(raw["raw_base64"]) == BAD_UTF8_RAW
    assert {r["session_handle"] for r in rows} == {"bob"}


def test_export_html_escapes_every_byte(db, tmp_path):
    out = tmp_path / "t.html"
    r = run(db, "export", "-o", str(out))  # format from the extension
    assert r.exit_code == 0
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "<script>document" not in page and "<img src=x" not in page
    assert "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;" in page
    assert "Content-Security-Policy" in page and "http" not in page.split("<body>")[0].replace(
        'http-equiv', '')


def test_export_cast_replays_with_original_timing(db):
    lines = run(db, "export", "1", "-f", "cast").output.splitlines()
    header = json.loads(lines[0])
    assert header["version"] == 2 and header["width"] > 0 and header["timestamp"] == 1795168800
    events = [json.loads(x) for x in lines[1:]]
    assert all(e[1] == "o" and e[2].endswith("\r\n") for e in events)
    times = [e[0] for e in events]
    assert times == sorted(times)
    assert times[:3] == [0.0, 1.0, 3.0]  # connected, hello server, why hello client
    assert times[-1] == 41.0
    assert "hello server" in events[1][2] and "client has quit" in events[-1][2]
    assert all("\x1b]" not in e[2] and "\x07" not in e[2] for e in events)


def test_export_filters_and_errors(db, tmp_path):
    assert run(db, "export", "--handle", "amy").output.startswith("connected to: 10.0.0.7 port 6001")
    r = run(db, "export", "--handle", "nobody")
    assert r.exit_code == 0 and r.stdout == "" and r.stderr == "no sessions match; nothing exported\n"
    r = run(db, "export", "--since", "someday")
    assert r.exit_code == 2 and "invalid date 'someday'" in r.output
    r = run(db, "export", "-o", str(tmp_path / "nodir" / "x.txt"))
    assert r.exit_code == 1 and "cannot write" in r.output


@pytest.mark.slow
def test_large_export_streams_with_flat_memory(tmp_path):
    """200,000 messages to jsonl in a subprocess: peak memory stays far below the data size."""
    path = tmp_path / "big.db"
    s = open_store(path)
    sid = s.begin_session(("127.0.0.1", 1), ("127.0.0.1", 2), served=True)
    s.add_lines(sid, "client", "bob", 200_000, at=t(0), text="message %d " + "x" * 200)
    s.end_session(sid, "client-quit")
    s.close()
    code = (
        "import resource, subprocess, sys; "
        "subprocess.run([sys.executable, '-m', 'chatlog', 'export', '-f', 'jsonl', '--db', sys.argv[1]], "
        "stdout=subprocess.DEVNULL, check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=ROOT, check=True)
    assert int(out.stdout) < 100_000  # KiB; the data is ~45 MB


# -- search -----------------------------------------------------------------------------------


def test_search_words_with_hyphens_and_quotes(db):
    out = run(db, "search", "e-mail").output
    assert out.splitlines()[0].split()[0] == "2" and "amy>[e-mail] me" in out
    assert "amy>" in run(db, "search", "don't").output
    assert "[hello]" in run(db, "search", "hello").output


def test_search_newest_first_json_and_filters(db):
    hits = json.loads(run(db, "search", "noted", "--json", "-n", "0").output)
    assert len(hits) == 8 and [h["seq"] for h in hits] == sorted((h["seq"] for h in hits), reverse=True)
    assert json.loads(run(db, "search", "hello", "--json", "--handle", "bob").output)[0]["text"] == "hello server"
    assert json.loads(run(db, "search", "hello", "--json", "--since", "2026-11-21").stdout) == []


def test_search_hostile_hit_is_inert_and_raw_syntax(db):
    out = run(db, "search", "title").output
    assert no_raw_controls(out) and "\\x1b]0;[title]\\x07" in out
    assert run(db, "search", "--raw", "hel*").exit_code == 0
    r = run(db, "search", "--raw", "AND AND")
    assert r.exit_code == 1 and r.output.startswith("chatlog: invalid search query")
    r = run(db, "search", "zebra")
    assert r.exit_code == 0 and r.stdout == "" and r.stderr == "no messages match 'zebra'\n"


# -- stats, rm, prune, path, backup -----------------------------------------------------------


def test_stats(db):
    st = json.loads(run(db, "stats", "--json").output)
    assert st["sessions"] == 3 and st["messages"] == 22 and st["handles"] == 3 and st["hosts"] == 2
    assert st["busiest_handles"][0] == {"handle": "bob", "sessions": 1, "messages": 19, "said": 10, "answers": 9}
    assert st["average_session_seconds"] == pytest.approx((41 + 62) / 2)
    assert "sessions          3" in run(db, "stats").output


def test_rm_asks_then_deletes_messages_and_search_entries(db):
    r = run(db, "rm", "2", input="n\n")
    assert r.exit_code == 1 and r.output.endswith("chatlog: aborted\n")
    r = run(db, "rm", "2", input="y\n")
    assert r.exit_code == 0
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM messages WHERE session_id = 2").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM messages_fts WHERE messages_fts MATCH 'forget'").fetchone() == (0,)
    assert run(db, "rm", "2", "--yes").output == "chatlog: no session 2\n"


def test_prune(db):
    r = run(db, "prune", "--before", "2026-11-21", "--yes")
    assert r.exit_code == 0 and "deleted 1 session" in r.output
    assert [s["id"] for s in json.loads(run(db, "sessions", "--json").output)] == [3, 2]
    r = run(db, "prune", "--before", "2026-11-21", "--yes")
    assert r.exit_code == 0 and r.stderr == "nothing to prune: no ended sessions started before then\n"


def test_path_and_env(db, monkeypatch):
    assert run(db, "path").output.strip() == str(db)
    monkeypatch.setenv("CHATLOG_DB", str(db))
    assert run_chatlog(None, "path").output.strip() == str(db)


def test_backup_is_a_consistent_copy_while_writing(db, tmp_path):
    s = open_store(db)
    sid = s.begin_session(("127.0.0.1", 9), ("127.0.0.1", 9), served=True)
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            s.add_message(sid, "client", "w", f"m{i}")
            i += 1

    th = threading.Thread(target=writer)
    th.start()
    try:
        copy = tmp_path / "copy.db"
        r = run(db, "backup", str(copy))
        assert r.exit_code == 0
    finally:
        stop.set()
        th.join()
    conn = sqlite3.connect(copy)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert conn.execute("SELECT count(*) FROM sessions").fetchone()[0] == 4
    assert oct(copy.stat().st_mode & 0o777) == "0o600"


def test_tail_follows_a_live_session(db, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatlog", "tail", "--db", str(db)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        assert "session 3: connected to" in proc.stdout.readline()
        assert proc.stdout.readline().strip() == "cat>still talking"
        s = open_store(db)
        s.add_message(3, "server", "SERVER", "live \x1b[31m!")
        assert proc.stdout.readline().strip() == "SERVER>live \\x1b[31m!"
        s.end_session(3, "client-quit")
        assert "client has quit (session 3, 1 message each way)" in proc.stdout.readline()
        n = s.begin_session(("127.0.0.1", 7), ("127.0.0.1", 9), served=True)
        s.add_message(n, "client", "dan", "next one")
        assert f"session {n}: connected" in proc.stdout.readline()
        assert proc.stdout.readline().strip() == "dan>next one"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.browser
def test_html_export_in_headless_chromium(db, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        pytest.skip("chromium is not installed")
    page = tmp_path / "t.html"
    run(db, "export", "-f", "html", "-o", str(page))
    r = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=2000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=90,
    )
    dom = r.stdout
    assert "<title>chatlog: 3 sessions, from session 1</title>" in dom  # no injected script changed the title
    assert "pwned</title>" not in dom
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;" in dom  # shown as text
    assert "<img src=\"x\"" not in dom
    assert "=cmd|' /C calc'!A0" in dom and "why hello client" in dom
    assert "\\u202eevil" in dom and "\u202e" not in dom  # the override shown, not obeyed
    assert "\\x1b[2J\\x1b]0;title\\x07" in dom
    assert "[bold]x[/] [link=https://x]y[/link] :smile: trailing\\" in dom
    assert dom.count('<section id="session-') == 3 and "<script" not in dom.split("<body>")[1]


# -- more hostile text, every format ----------------------------------------------------------

MORE_HOSTILE = [
    "**bold** [x](http://e.test) <b>hi</b> `code` # heading",
    "<script>alert(1)</script>",
    "\tstarts with a tab",
    "\rstarts with a CR",
    'comma, "quotes" and a\nnewline',
    "\x00nul inside",
    "\u202edesrever",
]


@pytest.fixture
def hostile_db(tmp_path):
    """One ended session full of hostile text, including a message with no handle (an `nc`
    user before any handle was seen), plus a session still in progress."""
    path = tmp_path / "h.db"
    s = open_store(path)
    a = s.begin_session(("192.0.2.1", 4000), ("127.0.0.1", 9999), at=t(0), served=True)
    s.add_message(a, "client", None, "no handle <i>yet</i>", at=t(1))
    s.set_handle(a, "eve")
    for i, text in enumerate(MORE_HOSTILE):
        s.add_message(a, "client", "eve", text, at=t(2 + 2 * i))
        s.add_message(a, "server", "SERVER", f"ok {i}", at=t(3 + 2 * i))
    s.add_message(a, "client", "eve", "\ufffd\ufffd", raw=b"eve>\xff\xfe\n\0", at=t(30))
    s.end_session(a, "disconnect", at=t(31))
    b = s.begin_session(("192.0.2.2", 4001), ("127.0.0.1", 9999), at=t(40), served=True)
    s.set_handle(b, "live")
    s.add_message(b, "client", "live", "still here", at=t(41))
    s.close()
    return path


def test_md_transcript_is_a_code_block_not_markdown(hostile_db):
    from markdown_it import MarkdownIt

    out = run(hostile_db, "export", "1", "-f", "md").output
    tokens = MarkdownIt("commonmark").parse(out)
    blocks = [tok for tok in tokens if tok.type == "code_block"]
    assert len(blocks) == 1
    code = blocks[0].content
    assert "eve>**bold** [x](http://e.test) <b>hi</b> `code` # heading\n" in code
    assert "eve><script>alert(1)</script>\n" in code
    assert "no handle <i>yet</i>\n" in code and "eve>\\x00nul inside\n" in code
    # outside the code block, nothing of the client's is rendered as Markdown or HTML
    rendered = MarkdownIt("commonmark").render(out)
    assert "<strong>" not in rendered and "<a href" not in rendered and "<b>" not in rendered
    assert "<script>" not in rendered and no_raw_controls(out)


def test_html_shows_controls_and_bidi_overrides_as_escapes(hostile_db):
    page = run(hostile_db, "export", "-f", "html").output
    assert "\u202e" not in page and "\x00" not in page and "\t" not in page.split("<body>")[1]
    assert "eve&gt;</span>\\u202edesrever" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>" not in page
    assert "no handle &lt;i&gt;yet&lt;/i&gt;</div>" in page  # a message with no handle
    assert 'comma, &quot;quotes&quot; and a\\nnewline' in page


def test_csv_quotes_and_neutralises_every_cell(hostile_db):
    rows = list(csv.DictReader(io.StringIO(run(hostile_db, "export", "1", "-f", "csv").output)))
    texts = [r["text"] for r in rows if r["sender"] == "client"]
    assert texts[0] == "no handle <i>yet</i>" and rows[0]["handle"] == ""
    assert "'\tstarts with a tab" in texts and "'\rstarts with a CR" in texts
    assert 'comma, "quotes" and a\nnewline' in texts and "\x00nul inside" in texts
    assert base64.b64decode(rows[-1]["raw_base64"]) == b"eve>\xff\xfe\n\0"


def test_json_and_jsonl_round_trip_every_text(hostile_db):
    doc = json.loads(run(hostile_db, "export", "-f", "json").output)
    texts = [m["text"] for m in doc["sessions"][0]["messages"] if m["sender"] == "client"]
    assert texts[1:-1] == MORE_HOSTILE and texts[0] == "no handle <i>yet</i>"
    assert doc["sessions"][0]["messages"][0]["handle"] is None
    assert doc["sessions"][1]["end_reason"] is None  # in progress
    rows = [json.loads(x) for x in run(hostile_db, "export", "-f", "jsonl").output.splitlines()]
    assert [r["text"] for r in rows if r["sender"] == "client"][1:8] == MORE_HOSTILE
    assert base64.b64decode(rows[-2]["raw_base64"]) == b"eve>\xff\xfe\n\0"
    assert rows[-1]["session_id"] == 2 and rows[-1]["session_ended_at"] is None


def test_txt_and_show_agree_and_are_inert(hostile_db):
    txt = run(hostile_db, "export", "1").output
    assert txt == run(hostile_db, "show", "1").output.split("\n\n", 1)[1]
    assert "\nno handle <i>yet</i>\n" in txt
    assert "eve>\\tstarts with a tab\n" in txt and 'eve>comma, "quotes" and a\\nnewline\n' in txt
    assert no_raw_controls(txt) and "\x00" not in txt and "\r" not in txt


def test_cast_header_and_every_event(hostile_db):
    lines = run(hostile_db, "export", "-f", "cast").output.splitlines()
    header = json.loads(lines[0])
    assert {k: header[k] for k in ("version", "width", "height")} == {"version": 2, "width": 80, "height": 24}
    assert header["timestamp"] == 1795168800 and header["title"] == "chatlog session 1"
    events = [json.loads(x) for x in lines[1:]]
    times = [e[0] for e in events]
    assert times == sorted(times)
    # session 1: connected at 0, messages at their offsets, ended at 31; session 2 follows it
    assert times[:4] == [0.0, 1.0, 2.0, 3.0] and times[len(MORE_HOSTILE) * 2 + 3] == 31.0
    assert times[-2:] == [32.0, 33.0]  # session 2 starts a second after session 1 ended
    text = "".join(e[2] for e in events)
    assert "\x1b]" not in text and "\u202e" not in text and "\x00" not in text
    assert "\\u202edesrever" in text and "no handle <i>yet</i>\r\n" in text
    assert "\x1b[" in text  # the console's colors are kept


# -- export: files, formats, progress ---------------------------------------------------------


@pytest.mark.parametrize("ext,check", [
    ("md", lambda s: s.startswith("## Session 1")),
    ("json", lambda s: json.loads(s)["sessions"][0]["id"] == 1),
    ("jsonl", lambda s: json.loads(s.splitlines()[0])["seq"] == 1),
    ("csv", lambda s: s.startswith("session_id,")),
    ("html", lambda s: s.startswith("<!DOCTYPE html>")),
    ("cast", lambda s: json.loads(s.splitlines()[0])["version"] == 2),
    ("log", lambda s: s.startswith("connected to:")),
])
def test_export_format_from_the_extension(hostile_db, tmp_path, ext, check):
    out = tmp_path / f"x.{ext}"
    r = run(hostile_db, "export", "1", "-o", str(out))
    assert r.exit_code == 0 and r.output.startswith("wrote 1 session to")
    assert check(out.read_text())


def test_failed_export_leaves_the_old_file_alone(hostile_db, tmp_path, monkeypatch):
    from chatlog import export
    from chatlog.db import StoreError

    def broken(sessions, out, options):
        out.write("half")
        raise StoreError("disk went away")

    dest = tmp_path / "keep.txt"
    dest.write_text("previous export\n")
    monkeypatch.setitem(export.WRITERS, "txt", broken)
    r = run(hostile_db, "export", "-o", str(dest))
    assert r.exit_code == 1 and r.output == "chatlog: disk went away\n"
    assert dest.read_text() == "previous export\n"
    assert sorted(p.name for p in tmp_path.iterdir() if "keep" in p.name) == ["keep.txt"]


def test_export_and_backup_refuse_to_overwrite_the_database(hostile_db):
    size = hostile_db.stat().st_size
    r = run(hostile_db, "export", "-f", "txt", "-o", str(hostile_db))
    assert r.exit_code == 1 and "must not overwrite the database" in r.output
    r = run(hostile_db, "backup", str(hostile_db))
    assert r.exit_code == 1 and "must not overwrite the database" in r.output
    assert hostile_db.stat().st_size == size and run(hostile_db, "show", "1").exit_code == 0


def test_sparse_and_dense_exports_read_the_same_rows(tmp_path):
    path = tmp_path / "many.db"
    s = open_store(path)
    for i in range(40):
        sid = s.begin_session(("127.0.0.1", i), ("127.0.0.1", 1), at=t(i), served=True)
        s.set_handle(sid, "amy" if i % 10 == 3 else "bob")
        for k in range(i % 4):  # some sessions have no messages at all
            s.add_message(sid, "client", "x", f"s{sid} m{k}", at=t(i))
        s.end_session(sid, "client-quit", at=t(i + 1))
    every = [(x.id, list(rows)) for x, rows in s.export_rows(list(range(1, 41)))]
    for chosen in ([4, 14, 24, 34], [2, 3, 5], [40], list(range(1, 41, 2))):
        got = [(x.id, list(rows)) for x, rows in s.export_rows(chosen)]
        assert got == [pair for pair in every if pair[0] in chosen]
    s.close()
    rows = [json.loads(x) for x in run(path, "export", "--handle", "amy", "-f", "jsonl").output.splitlines()]
    assert [r["text"] for r in rows] == ["s4 m0", "s4 m1", "s4 m2", "s14 m0", "s24 m0", "s24 m1", "s24 m2", "s34 m0"]


def test_export_progress_bar_on_a_terminal_stderr(tmp_path):
    import os

    import pexpect

    path = tmp_path / "long.db"
    s = open_store(path)
    sid = s.begin_session(("127.0.0.1", 1), ("127.0.0.1", 2), served=True)
    s.add_lines(sid, "client", "bob", 30_000, at=t(0), text="hi")
    s.end_session(sid, "client-quit")
    s.close()
    out = tmp_path / "long.csv"
    p = pexpect.spawn(sys.executable, ["-m", "chatlog", "export", "-o", str(out), "--db", str(path)],
                      env=dict(os.environ, NO_COLOR="1"), encoding="utf-8", timeout=30)
    p.expect_exact("exporting")
    p.expect_exact("wrote 1 session to")
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0 and len(out.read_text().splitlines()) == 30_001


# -- pipes, terminals, colors -----------------------------------------------------------------


def test_into_a_pipe_nothing_imports_rich(db):
    code = (
        "import sys\n"
        "from chatlog.cli import cli\n"
        "for args in (['sessions'], ['show', '1'], ['search', 'hello'], ['replay', '1'], ['stats'],\n"
        "             ['export', '1'], ['sessions', '--json']):\n"
        "    try:\n"
        "        cli([*args, '--db', sys.argv[1]])\n"
        "    except SystemExit as exc:\n"
        "        assert not exc.code, (args, exc.code)\n"
        "print('heavy:', sorted(m for m in ('rich', 'sqlite_utils') if m in sys.modules), file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(db)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "heavy: []" in r.stderr
    assert "\x1b[" not in r.stdout  # plain, stable text


def test_help_imports_no_more_than_it_needs():
    """`--help` is start-up time: click's formatter would import shutil (with bz2 and lzma) for
    the terminal's width; chatlog finds the width itself."""
    code = (
        "import sys\n"
        "from chatlog.cli import cli\n"
        "for args in (['--help'], ['serve', '--help']):\n"
        "    try:\n"
        "        cli(args)\n"
        "    except SystemExit as exc:\n"
        "        assert not exc.code, (args, exc.code)\n"
        "print('heavy:', sorted(m for m in ('shutil', 'rich', 'sqlite_utils') if m in sys.modules), file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "heavy: []" in r.stderr


@pytest.mark.parametrize("columns", [50, 70, 120])
def test_help_wraps_to_the_terminals_width(columns):
    """In a terminal ($COLUMNS unset), the help is what click makes for the width it would find
    there itself: the terminal's, less two, between 50 and 78."""
    import os

    import pexpect

    env = dict(os.environ)
    env.pop("COLUMNS", None)
    p = pexpect.spawn(sys.executable, ["-m", "chatlog", "serve", "--help"], env=env, timeout=10,
                      dimensions=(40, columns))
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0
    width = max(min(columns, 80) - 2, 50)
    code = ("import click.formatting\n"
            f"click.formatting.FORCED_WIDTH = {width}\n"
            "from chatlog.cli import cli\n"
            "cli(['serve', '--help'], prog_name='chatlog')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    assert p.before.decode().replace("\r\n", "\n") == r.stdout


@pytest.mark.parametrize("no_color", [True, False])
def test_show_at_a_terminal_colors_unless_no_color(db, no_color):
    import os

    import pexpect

    env = dict(os.environ, TERM="xterm")
    env.pop("NO_COLOR", None)
    env.pop("FORCE_COLOR", None)
    if no_color:
        env["NO_COLOR"] = "1"
    p = pexpect.spawn(sys.executable, ["-m", "chatlog", "show", "1", "--no-pager", "--db", str(db)], env=env, timeout=10)
    p.expect(pexpect.EOF)
    p.close()
    out = p.before.decode()
    assert p.exitstatus == 0 and "client has quit" in out
    assert ("\x1b[" in out) is (not no_color)
    # the hostile message is shown as text, in color or not
    assert "\\x1b[2J\\x1b]0;title\\x07" in out and "\x1b[2J" not in out and "\x1b]0;" not in out


# -- more error paths -------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["sessions", "--since", "0001-01-01"],
    ["sessions", "--since", "99999999999w"],
    ["sessions", "--until", ""],
    ["sessions", "--since", "yesterdayish"],
    ["export", "--until", "2026-02-30"],
    ["search", "hello", "--since", "soon"],
    ["prune", "--before", "nope", "--yes"],
])
def test_bad_dates_are_one_line(db, args):
    r = run(db, *args)
    assert r.exit_code == 2 and r.output.count("\n") == 1
    assert r.output.startswith("chatlog: Invalid value for ") and "invalid date" in r.output
    assert "today, yesterday" in r.output and "2mo" in r.output


def test_date_forms(db):
    from datetime import UTC, datetime

    from chatlog.query import parse_when

    now = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
    assert parse_when("30m", now) == "2026-11-24T11:30:00.000000+00:00"
    assert parse_when("2h", now) == "2026-11-24T10:00:00.000000+00:00"
    assert parse_when("3d", now) == "2026-11-21T12:00:00.000000+00:00"
    assert parse_when("1w", now) == "2026-11-17T12:00:00.000000+00:00"
    assert parse_when("2026-11-24T10:00+02:00") == "2026-11-24T08:00:00.000000+00:00"
    assert parse_when("2026-11-24T10:00Z") == "2026-11-24T10:00:00.000000+00:00"
    local = datetime(2026, 11, 24, 10, 0).astimezone().astimezone(UTC).isoformat(timespec="microseconds")
    assert parse_when("2026-11-24 10:00") == local  # no zone: local time
    ids = [s["id"] for s in json.loads(run(db, "sessions", "--json", "--since", "2026-11-22T09:00:00Z").output)]
    assert ids == [3, 2]


def test_bad_raw_queries_are_one_line(db):
    for q in ('"unterminated', "nosuchcol:hello", "NEAR(a b", "*foo", "("):
        r = run(db, "search", "--raw", q)
        assert r.exit_code == 1 and r.output.count("\n") == 1
        assert r.output.startswith("chatlog: invalid search query"), r.output
    # without --raw, the same text is just words to look for
    for q in ('"unterminated', "NEAR(a b", "*foo", "(", "AND", "-", "'"):
        r = run(db, "search", q)
        assert r.output.startswith("chatlog: no messages match") or r.exit_code == 0, r.output


def test_rm_and_prune_leave_a_session_in_progress(hostile_db):
    r = run(hostile_db, "rm", "2", "--yes")
    assert r.exit_code == 1 and r.output == "chatlog: session 2 is still in progress; it can be deleted once it has ended\n"
    r = run(hostile_db, "prune", "--before", "1h", "--yes")
    assert r.exit_code == 0
    assert "leaving 1 session still in progress" in r.output and "deleted 1 session\n" in r.output
    assert [s["id"] for s in json.loads(run(hostile_db, "sessions", "--json").output)] == [2]
    s = open_store(hostile_db)
    s.add_message(2, "server", "SERVER", "the server writes on")  # its session is still there
    s.close()
    assert "SERVER>the server writes on" in run(hostile_db, "show", "2").output


def test_show_empty_and_waiting_sessions(tmp_path):
    path = tmp_path / "w.db"
    s = open_store(path)
    sid = s.begin_session(("127.0.0.1", 3), ("127.0.0.1", 4), at=t(0))  # waiting in the queue
    s.close()
    r = run(path, "show", str(sid), "--utc")
    assert r.exit_code == 0 and "waiting" in r.output and "connected to: 127.0.0.1 port 3" in r.output
    for fmt in ("txt", "md", "json", "jsonl", "csv", "html", "cast"):
        assert run(path, "export", "-f", fmt).exit_code == 0, fmt


# -- following a session live -----------------------------------------------------------------


def test_tail_with_an_id_stops_when_that_session_ends(hostile_db):
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatlog", "tail", "2", "--db", str(hostile_db)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        assert "session 2: connected to: 192.0.2.2 port 4001" in proc.stdout.readline()
        assert proc.stdout.readline().strip() == "live>still here"

        def write():  # the server, in another thread
            s = open_store(hostile_db)
            s.add_message(2, "server", "SERVER", "and \u202e more")
            s.add_message(2, "client", "live", "bye")
            s.end_session(2, "client-quit")
            s.close()

        th = threading.Thread(target=write)
        th.start()
        th.join()
        rest = proc.stdout.read()  # to EOF: tail exits by itself
        assert proc.wait(10) == 0
        assert rest.splitlines() == [
            "SERVER>and \\u202e more",
            "live>bye",
            "client has quit (session 2, 2 from the client, 1 from the server)",
        ]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_tail_waits_for_the_first_session(tmp_path):
    path = tmp_path / "new.db"
    open_store(path).close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatlog", "tail", "--db", str(path)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        assert proc.stdout.readline().strip() == "Waiting for a session to start..."

        def server():
            s = open_store(path)
            sid = s.begin_session(("127.0.0.1", 8), ("127.0.0.1", 9), served=True)
            s.add_message(sid, "client", "zed", "first words")
            s.close()

        th = threading.Thread(target=server)
        th.start()
        th.join()
        assert proc.stdout.readline().strip() == "session 1: connected to: 127.0.0.1 port 8"
        assert proc.stdout.readline().strip() == "zed>first words"
    finally:
        proc.terminate()
        proc.wait(10)


def test_replay_follow_is_tail(hostile_db):
    r = run(hostile_db, "replay", "1", "--follow")
    assert r.exit_code == 0
    assert r.output.splitlines()[0] == "session 1: connected to: 192.0.2.1 port 4000"
    assert r.output.splitlines()[-1].startswith("client has disconnected (session 1")


def test_out_of_range_ids_and_limits(db):
    for cmd in (["show"], ["export"], ["replay"], ["rm", "--yes"], ["tail"]):
        r = run(db, *cmd, "99999999999999999999999")
        assert r.exit_code == 1 and r.output == "chatlog: no session 99999999999999999999999\n", (cmd, r.output)
    r = run(db, "show", "\u0661\u0662")  # digits, but not ASCII ones
    assert r.exit_code == 2 and "invalid session id" in r.output
    assert len(json.loads(run(db, "sessions", "--json", "-n", str(10**30)).output)) == 3
    assert len(json.loads(run(db, "search", "noted", "--json", "-n", str(10**30)).output)) == 8


def test_export_into_devices_links_and_private_files(hostile_db, tmp_path):
    import os
    import stat

    r = run(hostile_db, "export", "1", "-o", os.devnull)
    assert r.exit_code == 0 and stat.S_ISCHR(os.stat(os.devnull).st_mode)  # still the device
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    assert run(hostile_db, "export", "1", "-f", "jsonl", "-o", str(fifo)).exit_code == 0
    reader.join(10)
    assert len(got[0].splitlines()) == 16 and stat.S_ISFIFO(os.stat(fifo).st_mode)
    target = tmp_path / "real.txt"
    target.write_text("old")
    os.chmod(target, 0o600)
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    assert run(hostile_db, "export", "1", "-o", str(link)).exit_code == 0
    assert link.is_symlink() and target.read_text().startswith("connected to: 192.0.2.1")
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600


def test_replay_ctrl_c_stops_cleanly_and_restores_the_terminal(db):
    import os

    import pexpect

    s = open_store(db)
    sid = s.begin_session(("127.0.0.1", 1), ("127.0.0.1", 2), at=t(0), served=True)
    s.add_message(sid, "client", "pat", "first", at=t(0))
    s.add_message(sid, "client", "pat", "an hour later", at="2026-11-20T11:00:00.250000+00:00")
    s.end_session(sid, "client-quit", at="2026-11-20T11:00:00.250000+00:00")
    s.close()
    script = f'trap : INT; {sys.executable} -m chatlog replay {sid} --db "{db}"; echo "status=$?"; stty -a'
    p = pexpect.spawn("/bin/sh", ["-c", script], env=dict(os.environ, NO_COLOR="1"), encoding="utf-8", timeout=10)
    p.expect_exact("pat>first")
    p.sendintr()
    p.expect_exact("replay stopped")
    p.expect(r"status=(\d+)")
    assert p.match.group(1) == "130"
    p.expect(pexpect.EOF)
    settings = p.before.split()
    assert "icanon" in settings and "echo" in settings  # cbreak mode was undone
    assert "Traceback" not in p.before and "an hour later" not in p.before


def test_a_hostile_handle_is_inert_everywhere(tmp_path):
    """A handle is any 1 to 10 characters without whitespace or '>': escapes and formulas too."""
    path = tmp_path / "hh.db"
    evil = "=1+\x1b[31m\u202e"
    s = open_store(path)
    sid = s.begin_session(("127.0.0.1", 1), ("127.0.0.1", 2), at=t(0), served=True)
    s.set_handle(sid, evil)
    s.add_message(sid, "client", evil, "findme", at=t(1))
    s.end_session(sid, "client-quit", at=t(2))
    s.close()
    shown = "=1+\\x1b[31m\\u202e"
    for args in (["sessions"], ["show", "1"], ["search", "findme"], ["stats"], ["export"], ["export", "-f", "md"],
                 ["export", "-f", "cast"], ["export", "-f", "html"], ["tail", "1"]):
        out = run(path, *args).output
        assert "\x1b[31m" not in out and "\u202e" not in out, args
        if args[-1] != "cast":
            assert shown in out or shown.replace("\\", "\\\\") in out or "=1+\\\\x1b\\[31m\\\\u202e" in out, (args, out)
    events = [json.loads(x)[2] for x in run(path, "export", "-f", "cast").output.splitlines()[1:]]
    assert events[1] == "\x1b[1;36m" + shown + ">\x1b[0mfindme\r\n"  # our colors, its text inert
    assert list(csv.DictReader(io.StringIO(run(path, "sessions", "--csv").output)))[0]["handle"] == "'" + evil
    assert json.loads(run(path, "sessions", "--json").output)[0]["handle"] == evil
    rows = list(csv.DictReader(io.StringIO(run(path, "export", "-f", "csv").output)))
    assert rows[0]["handle"] == rows[0]["session_handle"] == "'" + evil


def test_sessions_brackets_an_ipv6_client(tmp_path):
    path = tmp_path / "v6.db"
    s = open_store(path)
    sid = s.begin_session(("::1", 5000), ("::1", 9999), at=t(0), served=True)
    s.end_session(sid, "disconnect", at=t(1))
    s.close()
    assert "[::1]:5000" in run(path, "sessions").output.splitlines()[1]
