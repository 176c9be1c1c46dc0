"""The read commands' newer promises, each through the real command: dates, one error style,
the queued client's story, timestamps, words, pager, tail, search, export and backup options."""

import csv
import io
import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime

import pytest
from conftest import ROOT, run_chatlog
from storebuild import open_store


def T(hms: str) -> str:
    """A stored time on 2026-11-20 (UTC) from `HH:MM:SS`."""
    return f"2026-11-20T{hms}.000000+00:00"


@pytest.fixture
def store(db_path):
    s = open_store(db_path)
    yield s
    s.close()


def chat(store, *, handle, port=5000, started, served=None, lines=(), end=None):
    """One session from named parts: `lines` are (sender, text, at) or (sender, text, at, note);
    `end` is (reason, at). `served` defaults to `started` (not queued)."""
    sid = store.begin_session(("127.0.0.1", port), ("127.0.0.1", 9999), at=started, served=served is None)
    if handle:
        store.set_handle(sid, handle)
    pending = served
    for sender, text, at, *note in lines:
        if pending and at >= pending:
            store.serve_session(sid, at=pending)
            pending = None
        who = "SERVER" if sender == "server" else handle
        store.add_message(sid, sender, who, text, at=at, note=note[0] if note else None)
    if pending:
        store.serve_session(sid, at=pending)
    if end:
        store.end_session(sid, end[0], at=end[1])
    return sid


run = run_chatlog


@pytest.fixture
def queued(store):
    """amy is served; bob connects meanwhile, says something while he waits, then is served."""
    amy = chat(store, handle="amy", started=T("10:00:00"), lines=[
        ("client", "hi", T("10:00:01")),
        ("server", "hello " + "x" * 1000, T("10:00:04"), "line cut at 1000 bytes"),
    ], end=("client-quit", T("10:00:05")))
    bob = chat(store, handle="bob", port=5001, started=T("10:00:02"), served=T("10:00:05"), lines=[
        ("client", "anyone?", T("10:00:03")),
        ("server", "yes", T("10:00:06")),
    ], end=("client-quit", T("10:00:07")))
    return {"amy": amy, "bob": bob}


# -- dates ------------------------------------------------------------------------------------


def test_every_date_form():
    from chatlog.query import parse_when

    now = datetime(2026, 3, 31, 12, 0, tzinfo=UTC)
    local_midnight = now.astimezone().replace(hour=0, minute=0, second=0, microsecond=0)
    assert parse_when("now", now) == "2026-03-31T12:00:00.000000+00:00"
    assert parse_when("today", now) == local_midnight.astimezone(UTC).isoformat(timespec="microseconds")
    assert parse_when("15min", now) == parse_when("15m", now) == "2026-03-31T11:45:00.000000+00:00"
    assert parse_when("30s", now) == "2026-03-31T11:59:30.000000+00:00"
    assert parse_when("2 days ago", now) == "2026-03-29T12:00:00.000000+00:00"
    assert parse_when("1w", now) == "2026-03-24T12:00:00.000000+00:00"
    one_month = parse_when("1mo", now)  # a calendar month, the day clamped: Feb has no 31st
    assert one_month[:10] in ("2026-02-28", "2026-02-27", "2026-03-01")
    assert parse_when("1y", now)[:4] == "2025"
    clock = datetime.fromisoformat(parse_when("14:30", now)).astimezone()
    assert (clock.hour, clock.minute) == (14, 30)


@pytest.mark.parametrize("bad", ["1M", "3 fortnights", "next tuesday", "25:00", ""])
def test_bad_and_ambiguous_dates_list_the_forms(db_path, store, bad):
    r = run(db_path, "sessions", "--since", bad)
    assert r.exit_code == 2 and r.output.count("\n") == 1 and r.output.startswith("chatlog: ")
    if bad == "1M":
        assert "ambiguous" in r.output and "1min" in r.output and "1mo" in r.output
    else:
        assert "now, today, yesterday" in r.output and "14:30" in r.output


# -- one error style, --db declared once --------------------------------------------------------


@pytest.mark.parametrize("args,words", [
    (["nosuch"], "No such command 'nosuch'"),
    (["show"], "Missing argument 'ID'"),
    (["sessions", "--limit", "x"], "Invalid value for '-n' / '--limit'"),
    (["sessions", "--db", "/"], "Invalid value for '--db'"),
    (["export", "-f", "pdf"], "Invalid value for '-f' / '--format'"),
])
def test_usage_errors_are_one_chatlog_line(db_path, store, args, words):
    r = run_chatlog(None, *args, env={"CHATLOG_DB": str(db_path)}, process=True)
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.startswith("chatlog: ") and r.stderr.count("\n") == 1 and words in r.stderr, r.stderr


def test_chatlog_alone_shows_the_help():
    r = run_chatlog(None, process=True)
    assert r.exit_code == 2 and r.output.startswith("Usage: chatlog [OPTIONS] COMMAND")


def test_db_from_the_command_the_group_or_the_environment(tmp_path):
    first, second = tmp_path / "a.db", tmp_path / "b.db"
    env = {"CHATLOG_DB": str(first)}
    assert run_chatlog(None, "path", env=env).output.strip() == str(first)
    assert run_chatlog(None, "--db", str(second), "path", env=env).output.strip() == str(second)
    assert run_chatlog(second, "path", env=env).output.strip() == str(second)
    assert "CHATLOG_DB" not in os.environ  # nothing written into the environment


# -- a queued client's session reads in time order ----------------------------------------------


def test_a_queued_session_shows_its_wait_in_order(db_path, queued):
    out = run(db_path, "show", str(queued["bob"]), "--utc", "--timestamps").output
    assert "waited 3s, chat began 2026-11-20 10:00:05Z" in out
    assert out.split("\n\n", 1)[1].splitlines() == [
        "[10:00:02] connected to: 127.0.0.1 port 5001",
        "[10:00:03] bob>anyone?",
        "[10:00:05] chat began after 3s waiting",
        "[10:00:06] SERVER>yes",
        "[10:00:07] client has quit (session 2, 1 message each way)",
    ]


@pytest.mark.parametrize("fmt,sep", [("txt", "== Session"), ("md", "## Session"), ("html", "<section"), ("cast", None)])
def test_no_export_shows_time_going_backwards(db_path, queued, fmt, sep):
    import re

    out = run(db_path, "export", "-f", fmt, "--timestamps", "--utc").stdout
    if fmt == "cast":  # sessions play one after another
        parts = [[json.loads(line)[0] for line in out.splitlines()[1:]]]
    else:  # within each session (the queued one overlaps the first)
        rx = r'<time datetime="([^"]+)"' if fmt == "html" else r"^ *\[(\d\d:\d\d:\d\d)\]"
        parts = [re.findall(rx, part, re.M) for part in out.split(sep)[1:]]
    assert [len(times) for times in parts] in ([10], [5, 5])
    assert all(times == sorted(times) for times in parts), parts


def test_timestamps_local_by_default_and_utc(db_path, queued):
    local = datetime.fromisoformat(T("10:00:03")).astimezone().strftime("%H:%M:%S")
    assert f"[{local}] bob>anyone?" in run(db_path, "show", "2", "-t").output
    assert "[10:00:03] bob>anyone?" in run(db_path, "export", "2", "-t", "--utc").output
    assert "    [10:00:03] bob>anyone?" in run(db_path, "export", "2", "-f", "md", "-t", "--utc").output
    assert "[" not in run(db_path, "export", "2").output.split("anyone")[0]  # off by default


def test_a_text_export_of_several_sessions_has_a_heading_each(db_path, queued):
    out = run(db_path, "export", "--utc").output
    assert out.startswith("== Session 1: amy from 127.0.0.1 port 5000 ==\n")
    assert "\n\n== Session 2: bob from 127.0.0.1 port 5001 ==\n" in out
    assert run(db_path, "export", "2").output.startswith("connected to:")  # one session: no heading


def test_a_note_shows_in_tail_as_in_show(db_path, queued):
    shown = run(db_path, "show", "1").output
    tailed = run(db_path, "tail", "1").output
    assert "(line cut at 1000 bytes)" in shown and "(line cut at 1000 bytes)" in tailed
    assert tailed.splitlines()[1:] == shown.split("\n\n", 1)[1].splitlines()[1:]


# -- words ----------------------------------------------------------------------------------------


def test_counts_and_durations_read_right(db_path, queued):
    out = run(db_path, "show", "2").output
    assert "1 message from the client, 1 from the server" in out and "1 message each way" in out
    assert "messages each way" not in out and "(s)" not in out
    stats = run(db_path, "stats").output
    assert "amy          said 1 message, got 1 answer in 1 session" in stats
    st = json.loads(run(db_path, "stats", "--json").output)
    assert {"handle": "amy", "said": 1, "answers": 1, "sessions": 1}.items() <= st["busiest_handles"][0].items()
    r = run(db_path, "export", "-o", str(db_path.parent / "one.txt"), "1")
    assert r.stderr.startswith("wrote 1 session to ")
    from chatlog.render import duration, ended_text

    assert [duration(x) for x in (0.5, 2, 41, 62, 7500)] == ["0.5s", "2s", "41s", "1m 02s", "2h 05m"]
    assert ended_text("timeout", 1, 1, 0, idle=2.0).startswith("client timed out after 2s on its turn")


# -- empty and nothing-to-do cases ----------------------------------------------------------------


def test_nothing_to_list_export_search_or_prune_is_not_a_failure(db_path, store):
    header = run(db_path, "sessions", "--csv")
    assert header.exit_code == 0 and header.stdout.startswith("id,started_at,served_at,ended_at")
    assert json.loads(run(db_path, "sessions", "--json").stdout) == []
    for args in (["sessions"], ["export"], ["export", "-f", "json"], ["search", "x"], ["search", "x", "--json"],
                 ["prune", "--before", "now", "--yes"]):
        r = run(db_path, *args)
        assert r.exit_code == 0 and r.stderr.count("\n") == 1 and "chatlog:" not in r.stderr, (args, r.output)
    assert run(db_path, "search", "x", "--count").stdout == "0\n"


# -- search ---------------------------------------------------------------------------------------


def test_search_phrases_prefixes_until_count_and_csv(db_path, store):
    chat(store, handle="amy", started=T("09:00:00"), lines=[
        ("client", "the quick brown fox", T("09:00:01")),
        ("client", "brown quick", T("09:00:02")),
        ("client", "quickly now", T("11:00:00")),
        ("client", "=HYPERLINK(\"x\") quick", T("11:00:01")),
    ], end=("client-quit", T("11:00:02")))
    texts = lambda *a: [h["text"] for h in json.loads(run(db_path, "search", *a, "--json", "-n", "0").stdout)]  # noqa: E731
    assert texts('"quick brown"') == ["the quick brown fox"]
    assert len(texts("quick")) == 3 and len(texts("quick*")) == 4
    assert texts("quick", "--until", T("10:00:00")) == ["brown quick", "the quick brown fox"]
    assert run(db_path, "search", "quick*", "--count").stdout == "4\n"
    rows = list(csv.DictReader(io.StringIO(run(db_path, "search", "quick", "--csv").stdout)))
    assert len(rows) == 3 and rows[0]["text"] == "'=HYPERLINK(\"x\") quick"  # neutralised for a spreadsheet


@pytest.mark.parametrize("query", ["nosuchcol:hello", '"unterminated', "AND AND", "NEAR(a b"])
def test_no_sqlite_wording_in_search_errors(db_path, queued, query):
    r = run(db_path, "search", "--raw", query)
    assert r.exit_code == 1 and r.output.startswith("chatlog: invalid search query")
    assert "no such column" not in r.output and "fts5" not in r.output and "syntax error" not in r.output


# -- export ---------------------------------------------------------------------------------------


def test_an_unknown_extension_is_an_error_not_plain_text(db_path, queued, tmp_path):
    r = run(db_path, "export", "-o", str(tmp_path / "chat.pdf"))
    assert r.exit_code == 1 and r.output.startswith("chatlog: cannot tell the format from '.pdf'")
    assert "--format" in r.output and not (tmp_path / "chat.pdf").exists()
    assert run(db_path, "export", "-o", str(tmp_path / "chat.pdf"), "-f", "txt").exit_code == 0


def test_the_cast_is_as_wide_as_its_longest_line(db_path, queued):
    header = json.loads(run(db_path, "export", "1", "-f", "cast").stdout.splitlines()[0])
    assert len("SERVER>hello " + "x" * 1000) > 400 and header["width"] == 400  # as wide as allowed
    assert header["height"] == 24
    narrow = json.loads(run(db_path, "export", "2", "-f", "cast").stdout.splitlines()[0])
    assert narrow["width"] == 80


# -- backup ---------------------------------------------------------------------------------------


def test_backup_refuses_to_overwrite_unless_forced_and_accepts_a_directory(db_path, queued, tmp_path):
    dest = tmp_path / "copy.db"
    dest.write_text("precious")
    r = run(db_path, "backup", str(dest))
    assert r.exit_code == 1 and r.output == f"chatlog: {dest} already exists (use --force to overwrite it)\n"
    assert dest.read_text() == "precious"
    assert run(db_path, "backup", str(dest), "--force").exit_code == 0
    assert dest.read_bytes().startswith(b"SQLite format 3")
    folder = tmp_path / "backups"
    folder.mkdir()
    r = run(db_path, "backup", str(folder))
    assert r.exit_code == 0 and (folder / db_path.name).read_bytes().startswith(b"SQLite format 3")
    assert run(db_path, "backup", str(folder)).exit_code == 1  # and now it exists


# -- tail -----------------------------------------------------------------------------------------


def _tail(db_path):
    return subprocess.Popen([sys.executable, "-m", "chatlog", "tail", "--db", str(db_path)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)


def test_tail_follows_the_chat_being_served_not_a_queued_client(db_path, store):
    served = chat(store, handle="amy", started=T("10:00:00"), lines=[("client", "being served", T("10:00:01"))])
    waiting = store.begin_session(("127.0.0.1", 7), ("127.0.0.1", 9999), at=T("10:00:02"))  # queued, newer
    store.add_message(waiting, "client", "bob", "waiting here", at=T("10:00:03"))
    proc = _tail(db_path)
    try:
        assert proc.stdout.readline().strip() == f"session {served}: connected to: 127.0.0.1 port 5000"
        assert proc.stdout.readline().strip() == "amy>being served"
        store.end_session(served, "client-quit", at=T("10:00:04"))
        assert "client has quit" in proc.stdout.readline()
        store.serve_session(waiting, at=T("10:00:05"))
        assert proc.stdout.readline().strip() == f"session {waiting}: connected to: 127.0.0.1 port 7"
        assert proc.stdout.readline().strip() == "bob>waiting here"
        assert proc.stdout.readline().strip() == "chat began after 3s waiting"
    finally:
        proc.terminate()
        proc.wait(10)


def _lines_of(proc, n, timeout=15.0):
    """The next `n` lines `proc` prints (stripped), or a failure naming what came before the
    time ran out: a reader thread, so a missing line never hangs the test."""
    import queue
    import threading

    if not hasattr(proc, "lines"):
        proc.lines = queue.Queue()
        threading.Thread(target=lambda: [proc.lines.put(line) for line in proc.stdout], daemon=True).start()
    got = []
    for _ in range(n):
        try:
            got.append(proc.lines.get(timeout=timeout).strip())
        except queue.Empty:
            raise AssertionError(f"tail printed only {got!r}") from None
    return got


def _whole_chat(store, handle, port, text):
    """A session that begins, is said in and ends in one transaction: no poll can see it live."""
    with store.rec.transaction():
        sid = store.begin_session(("127.0.0.1", port), ("127.0.0.1", 9999), served=True)
        store.set_handle(sid, handle)
        store.add_message(sid, "client", handle, text)
        store.end_session(sid, "client-quit")
    return sid


def test_tail_shows_every_session_that_happens_while_it_runs_in_order(db_path, store):
    """A session that began and ended between two polls was never shown, and one that began
    while tail followed another was skipped when a newer one had begun meanwhile."""
    before = _whole_chat(store, "old", 4000, "before tail started")
    proc = _tail(db_path)
    try:
        assert _lines_of(proc, 1) == ["Waiting for a session to start..."]
        quick = _whole_chat(store, "amy", 5001, "in and out")
        also = _whole_chat(store, "bob", 5002, "me too")
        live = chat(store, handle="cat", port=5003, started=None, lines=[("client", "still here", None)])
        assert _lines_of(proc, 3) == [f"session {quick}: connected to: 127.0.0.1 port 5001", "amy>in and out",
                                      f"client has quit (session {quick}, 1 from the client, 0 from the server)"]
        assert _lines_of(proc, 3)[:2] == [f"session {also}: connected to: 127.0.0.1 port 5002", "bob>me too"]
        assert _lines_of(proc, 2) == [f"session {live}: connected to: 127.0.0.1 port 5003", "cat>still here"]
        # cat's chat goes on while dan's begins and ends, then eve's begins: each is shown, in order
        dan = _whole_chat(store, "dan", 5004, "while cat chats")
        eve = chat(store, handle="eve", port=5005, started=None, lines=[("client", "newest", None)])
        store.end_session(live, "client-quit")
        assert "client has quit" in _lines_of(proc, 1)[0]
        assert _lines_of(proc, 2) == [f"session {dan}: connected to: 127.0.0.1 port 5004", "dan>while cat chats"]
        assert "client has quit" in _lines_of(proc, 1)[0]
        assert _lines_of(proc, 2) == [f"session {eve}: connected to: 127.0.0.1 port 5005", "eve>newest"]
        assert before < quick
    finally:
        proc.terminate()
        proc.wait(10)


def test_tail_n_starts_from_the_last_lines(db_path, store):
    room = store.begin_session(("127.0.0.1", 6000), ("127.0.0.1", 9999), served=True, kind="room")
    store.add_lines(room, "client", "amy", 500, text="line %d")
    said = ["amy>line 497", "amy>line 498", "amy>line 499"]
    for i, args in enumerate((["-n", "3"], ["-n", "3", str(room)])):
        proc = subprocess.Popen([sys.executable, "-m", "chatlog", "tail", *args, "--db", str(db_path)],
                                stdout=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            assert _lines_of(proc, 4) == [f"session {room}: room opened on port 9999", *said[-3:]]
            store.add_message(room, "client", "bob", f"new line {i}")
            said.append(f"bob>new line {i}")
            assert _lines_of(proc, 1) == [said[-1]]
        finally:
            proc.terminate()
            proc.wait(10)
    store.end_session(room, "shutdown")
    proc = subprocess.Popen([sys.executable, "-m", "chatlog", "tail", "-n", "2", str(room), "--db", str(db_path)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    out = proc.communicate(timeout=30)[0].splitlines()
    assert out[1:3] == said[-2:]
    assert out[3] == f"room closed: shutdown (session {room}, 502 messages)"  # counted whole


def test_tail_waits_for_the_database_to_exist(db_path):
    proc = _tail(db_path)
    try:
        assert proc.stdout.readline().strip() == "Waiting for a session to start..."
        s = open_store(db_path)
        sid = chat(s, handle="zed", started=T("10:00:00"), lines=[("client", "first words", T("10:00:01"))])
        assert proc.stdout.readline().strip() == f"session {sid}: connected to: 127.0.0.1 port 5000"
        assert proc.stdout.readline().strip() == "zed>first words"
        s.close()
    finally:
        proc.terminate()
        proc.wait(10)


# -- a pager at a terminal, never into a pipe -----------------------------------------------------


@pytest.fixture
def pager(tmp_path):
    """A $PAGER that marks what it was given, so a test can see the output went through it."""
    script = tmp_path / "pager.sh"
    script.write_text('#!/bin/sh\necho "PAGER START LESS=$LESS"\ncat\necho "PAGER END"\n')
    script.chmod(0o755)
    return str(script)


@pytest.mark.parametrize("args", [["show", "1"], ["search", "hi"]])
def test_long_output_at_a_terminal_goes_through_the_pager(db_path, queued, pager, args):
    import pexpect

    env = dict(os.environ, PAGER=pager, TERM="xterm")
    env.pop("LESS", None)
    p = pexpect.spawn(sys.executable, ["-m", "chatlog", *args, "--db", str(db_path)], env=env, timeout=10,
                      encoding="utf-8")
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0
    out = p.before
    assert "PAGER START LESS=FRX" in out and "PAGER END" in out
    assert out.index("PAGER START") < out.index("amy>") < out.index("PAGER END")
    p = pexpect.spawn(sys.executable, ["-m", "chatlog", *args, "--no-pager", "--db", str(db_path)], env=env,
                      timeout=10, encoding="utf-8")
    p.expect(pexpect.EOF)
    p.close()
    assert "PAGER" not in p.before and "amy>" in p.before
    piped = run_chatlog(db_path, *args, env=env, process=True)
    assert "PAGER" not in piped.stdout and "amy>" in piped.stdout


@pytest.mark.parametrize("pager_command", ["no-such-pager-here", 'less "unbalanced', ""])
def test_a_broken_pager_setting_prints_without_one(db_path, queued, pager_command):
    import pexpect

    env = dict(os.environ, PAGER=pager_command, TERM="xterm", NO_COLOR="1")
    p = pexpect.spawn(sys.executable, ["-m", "chatlog", "show", "2", "--db", str(db_path)], env=env, timeout=10,
                      encoding="utf-8")
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0 and "bob>anyone?" in p.before and "Traceback" not in p.before


def test_quitting_the_pager_early_ends_the_command_quietly(db_path, store):
    import pexpect

    sid = chat(store, handle="amy", started=T("10:00:00"))
    store.add_lines(sid, "client", "amy", 20000, at=T("10:00:01"))
    env = dict(os.environ, PAGER="head -n 3", TERM="xterm")
    p = pexpect.spawn(sys.executable, ["-m", "chatlog", "show", str(sid), "--db", str(db_path)], env=env,
                      timeout=20, encoding="utf-8")
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0 and "Traceback" not in p.before and "line 19999" not in p.before


def test_a_read_only_archive_can_be_read(db_path, queued):
    """Run as an unprivileged user (root ignores file modes) on a read-only file in a
    read-only directory: every read command works."""
    import shutil
    import tempfile

    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or not setpriv:
        pytest.skip("needs root and setpriv to drop to an unprivileged user")
    drop = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    probe = subprocess.run([*drop, sys.executable, "-c", "import chatlog.cli"], capture_output=True, cwd="/")
    if probe.returncode != 0:  # the checkout sits under a directory only its owner may enter
        pytest.skip("the unprivileged user cannot read this checkout")
    ro = tempfile.mkdtemp(prefix="chatlog-ro-")
    try:
        copy = os.path.join(ro, "chat.db")
        assert run(db_path, "backup", copy).exit_code == 0
        os.chmod(copy, 0o444)
        os.chmod(ro, 0o555)
        for args in (["sessions"], ["show", "2"], ["export", "-f", "jsonl"], ["search", "anyone"], ["stats"]):
            r = subprocess.run([*drop, sys.executable, "-m", "chatlog", *args, "--db", copy],
                               capture_output=True, text=True, cwd="/")
            assert r.returncode == 0, (args, r.stderr)
    finally:
        os.chmod(ro, 0o755)
        shutil.rmtree(ro)


def test_shell_completion_as_documented():
    env = dict(os.environ, _CHATLOG_COMPLETE="bash_complete", COMP_WORDS="chatlog exp", COMP_CWORD="1")
    r = run_chatlog(None, env=env, process=True)
    assert r.stdout.split() == ["plain,export"], r.output
    env.update(COMP_WORDS="chatlog export -f c", COMP_CWORD="3")
    r = run_chatlog(None, env=env, process=True)
    assert r.stdout.split() == ["plain,csv", "plain,cast"]
    assert "_CHATLOG_COMPLETE=bash_source chatlog" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("args", [["show", "1"], ["export", "1"], ["replay", "1"], ["search", "line", "-n", "0"]])
def test_a_reader_that_stops_early_is_not_a_failure(db_path, store, args):
    """`chatlog show 1 | head -1`: the command stops quietly with status 0."""
    chat(store, handle="amy", started=T("10:00:00"),
         lines=[("client", f"line {i} " + "x" * 100, T("10:00:01")) for i in range(3000)])
    proc = subprocess.Popen([sys.executable, "-m", "chatlog", *args, "--db", str(db_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout.readline()
    proc.stdout.close()
    assert proc.wait(20) == 0
    assert proc.stderr.read() == b""


def test_unreadable_stored_times_are_shown_not_a_traceback(db_path, queued):
    """A hand-edited file with a time that is not a time: every reader still shows the rest."""
    import sqlite3

    conn = sqlite3.connect(db_path)
    conn.execute("UPDATE messages SET at = 'garbage' WHERE session_id = 2 AND seq = 1")
    conn.execute("UPDATE sessions SET served_at = 'not a time', ended_at = '2026-13-45T99:00:00' WHERE id = 2")
    conn.commit()
    conn.close()
    for args in (["sessions"], ["sessions", "--json"], ["show", "2", "-t"], ["replay", "2"], ["tail", "2"],
                 ["export", "-f", "cast"], ["export", "-f", "html"], ["export", "-f", "md", "-t"], ["stats"]):
        r = run(db_path, *args)
        assert r.exit_code == 0 and "Traceback" not in r.output, (args, r.output)
        assert args[0] in ("sessions", "stats") or "anyone?" in r.output, (args, r.output)


def test_ctrl_c_during_an_export_is_one_line_and_leaves_no_file(db_path, store, tmp_path):
    import pexpect

    from chatlog.export import PROGRESS_MIN_MESSAGES

    sid = chat(store, handle="amy", started=T("10:00:00"))
    # enough for the bar, and for the export to be far from done when it shows (it shows at once)
    store.add_lines(sid, "client", "amy", 3 * PROGRESS_MIN_MESSAGES, at=T("10:00:01"))
    store.end_session(sid, "client-quit", at=T("10:00:02"))
    out = tmp_path / "big.cast"
    p = pexpect.spawn(sys.executable, ["-m", "chatlog", "export", str(sid), "-o", str(out), "--db", str(db_path)],
                      env=dict(os.environ, NO_COLOR="1"), encoding="utf-8", timeout=30)
    p.expect_exact("exporting")  # the progress bar: well under way
    p.sendintr()
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 130 and "Traceback" not in p.before and "chatlog: interrupted" in p.before
    assert not out.exists() and not [f for f in tmp_path.iterdir() if f.name.endswith(".tmp")]


def test_an_export_stopped_midway_stops_its_progress_bar(db_path, store, tmp_path, monkeypatch):
    """The bar is stopped with the export, not at the interpreter's exit: left to the garbage
    collector there, stopping it waited for a lock its refresh thread held when shutdown froze
    it, and Ctrl-C hung (`chatlog: interrupted`, then nothing)."""
    import io
    import threading

    from rich.live import _RefreshThread

    from chatlog import export
    from chatlog.export import PROGRESS_MIN_MESSAGES
    from chatlog.query import Filters

    sid = chat(store, handle="amy", started=T("10:00:00"))
    store.add_lines(sid, "client", "amy", 3 * PROGRESS_MIN_MESSAGES, at=T("10:00:01"))
    store.end_session(sid, "client-quit", at=T("10:00:02"))

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    def interrupted(sessions, out, options):
        for _ in sessions:
            assert any(isinstance(t, _RefreshThread) for t in threading.enumerate())  # it shows
            raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stderr", Terminal())
    monkeypatch.setitem(export.WRITERS, "txt", interrupted)
    with pytest.raises(KeyboardInterrupt) as caught:  # held, as the CLI's error holds it to the end
        export.run(store, [sid], "txt", str(tmp_path / "big.txt"), Filters(ids=(sid,)))
    assert caught.traceback
    for bar in [t for t in threading.enumerate() if isinstance(t, _RefreshThread)]:
        bar.join(timeout=10)  # told to stop, it ends at once; left running, it is still here
        assert not bar.is_alive()


# -- rooms ----------------------------------------------------------------------------------------


@pytest.fixture
def room(store):
    """A room: amy and bob join, talk over each other, bob leaves, the server shuts down."""
    from storebuild import _ts

    sid = store.begin_session((None, None), ("127.0.0.1", 7000), at=T("12:00:00"), served=True, kind="room")
    rec = store.rec
    amy = rec.add_participant(sid, "10.0.0.1", 4001, _ts(T("12:00:01")))
    rec.set_participant_handle(amy, "amy")
    rec.add_event(sid, amy, "joined", _ts(T("12:00:01")))
    bob = rec.add_participant(sid, "10.0.0.2", 4002, _ts(T("12:00:02")))
    rec.set_participant_handle(bob, "bob")
    rec.add_event(sid, bob, "joined", _ts(T("12:00:02")))
    store.add_message(sid, "client", "amy", "hi all", at=T("12:00:03"), participant=amy)
    store.add_message(sid, "client", "bob", "hey \x1b[31m", at=T("12:00:03"), participant=bob)
    store.add_message(sid, "server", "SERVER", "welcome", at=T("12:00:04"))
    rec.end_participant(bob, "client-quit", _ts(T("12:00:05")))
    store.add_message(sid, "event", "bob", "left", note="client-quit", at=T("12:00:05"), participant=bob)
    store.end_session(sid, "shutdown", at=T("12:00:06"))
    return sid


def test_a_rooms_people_count_among_the_distinct_hosts(db_path, store, room):
    """As their handles count among the distinct handles: a room's session has no client host of
    its own, and an archive of rooms said it had seen no host at all."""
    chat(store, handle="cy", started=T("10:00:00"))  # from 127.0.0.1
    assert re.search(r"^distinct hosts +3$", run(db_path, "stats").output, re.M)
    assert json.loads(run(db_path, "stats", "--json").output)["hosts"] == 3


def test_padding_recorded_in_a_chat_shows_as_a_note(db_path, store):
    sid = chat(store, handle="amy", started=T("10:00:00"), lines=[("client", "hi", T("10:00:01"))])
    store.add_message(sid, "event", "amy", "padding", raw=b"\0\0\0", note="3 bytes of padding after the previous line",
                      at=T("10:00:02"))
    store.add_message(sid, "server", "SERVER", "hello", at=T("10:00:03"))
    store.end_session(sid, "client-quit", at=T("10:00:04"))
    out = run(db_path, "show", str(sid)).output.split("\n\n", 1)[1].splitlines()
    assert out[1:4] == ["amy>hi", "(3 bytes of padding after the previous line)", "SERVER>hello"]
    assert out[4] == "client has quit (session 1, 1 message each way)"  # the trace is not a message
    rows = list(csv.DictReader(io.StringIO(run(db_path, "export", "-f", "csv").stdout)))
    assert [r["sender"] for r in rows] == ["client", "event", "server"] and rows[1]["raw_base64"] == "AAAA"


def test_a_room_reads_in_commit_order_with_joins_and_leaves(db_path, room):
    listing = run(db_path, "sessions").output.splitlines()
    assert "room :7000" in listing[1] and "2 participants" in listing[1]
    rows = json.loads(run(db_path, "sessions", "--json").stdout)
    assert rows[0]["kind"] == "room" and rows[0]["participants"] == 2
    out = run(db_path, "show", str(room), "--utc", "-t").output
    assert out.startswith("Session 1: a room on port 7000, 2 participants\n")
    assert out.split("\n\n", 1)[1].splitlines() == [
        "[12:00:00] room opened on port 7000",
        "[12:00:01] amy joined",
        "[12:00:02] bob joined",
        "[12:00:03] amy>hi all",
        "[12:00:03] bob>hey \\x1b[31m",
        "[12:00:04] SERVER>welcome",
        "[12:00:05] bob left (quit)",
        "[12:00:06] room closed: shutdown (session 1, 3 messages)",
    ]
    body = [line[11:] for line in out.split("\n\n", 1)[1].splitlines()]  # without "[12:00:00] "
    for fmt in ("txt", "md", "html", "cast"):
        text = run(db_path, "export", "-f", fmt).stdout
        for line in ("amy joined", "bob&gt;" if fmt == "html" else "bob>", "hey \\x1b[31m", "bob left", "room closed"):
            assert line in text or line.replace("\\", "\\\\") in text, (fmt, line)
        assert "\x1b[31m" not in text, fmt
    assert run(db_path, "replay", str(room)).output.splitlines() == body
    assert run(db_path, "tail", str(room)).output.splitlines()[1:] == body[1:]
    assert json.loads(run(db_path, "search", "welcome", "--json").stdout)[0]["session_id"] == room
    assert run(db_path, "search", "joined").stderr == "no messages match 'joined'\n"  # events are not searched


def test_the_inline_common_message_makes_the_same_events_as_the_general_path():
    """transcript.events takes a shortcut for the common message; it must agree with feeding
    every message through Transcript.message, whatever the notes, senders and times."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from chatlog import transcript
    from chatlog.records import Msg, Session

    times = st.sampled_from([T("10:00:00"), T("10:00:01"), T("10:00:05"), "garbage", T("09:59:59")])
    msg = st.tuples(st.sampled_from(["client", "server", "event"]), times, st.sampled_from([None, "", "cut"]))

    @settings(max_examples=300, deadline=None)
    @given(st.lists(msg, max_size=12), st.sampled_from([None, T("10:00:00"), T("10:00:03")]))
    def check(rows, served):
        s = Session(1, T("10:00:00"), served, T("10:00:09"), "h", 1, "h", 2, "amy", "client-quit", 0, 0)
        msgs = [Msg(i, 1, i, at, sender, "amy", f"m{i}", None, note) for i, (sender, at, note) in enumerate(rows, 1)]
        general = transcript.Transcript(s)
        expected = [*general.start(), *(ev for m in msgs for ev in general.message(m)), *general.end()]
        assert list(transcript.events(s, msgs)) == expected

    check()


@pytest.mark.browser
def test_html_of_a_queued_chat_and_a_room_in_headless_chromium(db_path, store, tmp_path):
    import re
    import shutil

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        pytest.skip("chromium is not installed")
    chat(store, handle="bob", port=5001, started=T("10:00:02"), served=T("10:00:05"), lines=[
        ("client", "anyone? <b>", T("10:00:03")), ("server", "yes", T("10:00:06"))], end=("client-quit", T("10:00:07")))
    from storebuild import _ts

    sid = store.begin_session((None, None), ("127.0.0.1", 7000), at=T("12:00:00"), served=True, kind="room")
    amy = store.rec.add_participant(sid, "10.0.0.1", 4001, _ts(T("12:00:01")))
    store.rec.set_participant_handle(amy, "amy")
    store.rec.add_event(sid, amy, "joined", _ts(T("12:00:01")))
    store.add_message(sid, "client", "amy", "\u202ehi", at=T("12:00:02"), participant=amy)
    store.end_session(sid, "shutdown", at=T("12:00:03"))
    page = tmp_path / "t.html"
    assert run(db_path, "export", "-o", str(page)).exit_code == 0
    r = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=2000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=90,
    )
    dom = r.stdout
    assert "<title>chatlog: 2 sessions, from session 1</title>" in dom and "<b>" not in dom.split("<body>")[1]
    assert "chat began after 3s waiting" in dom and "anyone? &lt;b&gt;" in dom
    assert "room opened on port 7000" in dom and "amy joined" in dom and "\\u202ehi" in dom
    for section in dom.split("<section")[1:]:
        times = re.findall(r'<time datetime="([^"]+)"', section)
        assert times and times == sorted(times)


def test_an_absurdly_slow_replay_waits_in_parts_not_a_traceback():
    from chatlog.replay import play, schedule

    class Clock:
        now = 0.0

        def __call__(self):
            return self.now

        def sleep(self, seconds):
            assert seconds <= 60
            self.now += seconds
            if self.now > 600:
                raise KeyboardInterrupt  # the person gives up, as they would

    clock, shown = Clock(), []
    with pytest.raises(KeyboardInterrupt):
        play(schedule([(T("10:00:00"), "a"), (T("10:00:01"), "b")], speed=1e-300), shown.append,
             clock=clock, sleep=clock.sleep)
    assert shown == ["a"]


def test_path_and_help_import_no_database_code(tmp_path):
    code = (
        "import sys\nfrom chatlog.cli import cli\n"
        "for args in (['path', '--db', sys.argv[1]], ['--help'], ['nosuch']):\n"
        "    try:\n        cli(args)\n    except SystemExit:\n        pass\n"
        "print('loaded:', sorted(m for m in ('sqlite3', 'chatlog.db', 'chatlog.query', 'rich') if m in sys.modules),"
        " file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.db")], capture_output=True, text=True, cwd=ROOT)
    assert "loaded: []" in r.stderr, r.stderr


@pytest.mark.parametrize("args", [["show", "2"], ["sessions"], ["export"], ["export", "-f", "cast"], ["search", "yes"],
                                  ["stats"], ["replay", "2"], ["path"]])
def test_output_that_cannot_be_written_is_one_line(db_path, queued, args):
    cmd = [sys.executable, "-m", "chatlog", *args, "--db", str(db_path)]
    with open("/dev/full", "w") as full:
        r = subprocess.run(cmd, stdout=full, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert r.returncode == 1 and r.stderr == "chatlog: cannot write the output: No space left on device\n"
    r = subprocess.run(["/bin/sh", "-c", '"$@" >&-', "sh", *cmd], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and r.stderr == "chatlog: cannot write the output: standard output is closed\n"


def test_the_cast_draws_exactly_the_colored_console_lines(db_path, queued, room):
    """The cast formats its lines itself (for speed): they must be the console's, colored."""
    from chatlog import transcript
    from chatlog.archive import open_archive
    from chatlog.render import Renderer
    from chatlog.views import console_lines

    store = open_archive(db_path)
    expected = []
    for sid in sorted((queued["amy"], queued["bob"], room)):
        s = store.session(sid)
        expected += [line + "\r\n" for _, line in console_lines(transcript.events(s, store.messages(sid)),
                                                               Renderer(None, color=True))]
    drawn = [json.loads(x)[2] for x in run(db_path, "export", "-f", "cast").stdout.splitlines()[1:]]
    assert drawn == expected and any("\\x1b[31m" in line for line in drawn)


def test_a_real_room_reads_back_as_it_happened(start_server):
    """`chatlog serve --room` with two real clients, then the read commands on what it recorded."""
    from conftest import recv_until

    server = start_server("--room")
    a = server.connect()
    recv_until(a, b"\n")
    b = server.connect()
    recv_until(b, b"\n")
    a.sendall(b"alice>hello\n")
    recv_until(b, b"hello\n")
    b.sendall(b"bob>hi \x1b[2J alice\n")
    recv_until(a, b"alice\n")
    server.say("welcome both")
    server.wait_for("^SERVER>welcome both$")
    b.sendall(b"bob>\\quit\n")
    server.wait_for(r"^bob \(.*\) left: ")
    a.close()
    b.close()
    server.stop()
    out = run(server.db, "show", "last").output
    body = out.split("\n\n", 1)[1].splitlines()
    assert body[0].startswith("room opened on port ")
    assert body[1:6] == ["alice joined", "alice>hello", "bob joined", "bob>hi \\x1b[2J alice", "SERVER>welcome both"]
    assert body[6].startswith("bob left") and body[-1].startswith("room closed: ")
    assert "alice left" in "\n".join(body[7:])
    listing = run(server.db, "sessions").output.splitlines()[1]
    assert "room :" in listing and "2 participants" in listing
    assert run(server.db, "export", "-f", "cast").exit_code == 0


def test_a_real_queued_client_reads_in_time_order(start_server):
    """Through a real `chatlog serve`: bob waits behind alice, talks while he waits, is served."""
    from conftest import recv_until

    server = start_server()
    a = server.connect()
    a.sendall(b"alice>first\n\0")
    server.wait_for("^alice>first$")
    b = server.connect()
    server.wait_for(r"is waiting \(1 in the queue\)")
    b.sendall(b"bob>i was waiting\n\0")
    recv_until(b, b"\n")  # its place in the queue
    server.say("hi alice")
    recv_until(a, b"\n")
    a.sendall(b"alice>\\quit\n\0")
    server.wait_for(r"client has quit \(session 1")
    server.wait_for("^bob>i was waiting$")
    b.sendall(b"bob>still there?\n\0")
    server.wait_for("^bob>still there\\?$")
    server.say("hi bob")
    recv_until(b, b"hi bob\n")
    b.sendall(b"bob>\\quit\n\0")
    server.wait_for(r"client has quit \(session 2")
    out = run(server.db, "show", "2", "-t", "--utc").output
    body = out.split("\n\n", 1)[1].splitlines()
    assert [line[11:] for line in body][1:] == [
        "bob>i was waiting", body[2][11:], "bob>still there?", "SERVER>hi bob",
        "client has quit (session 2, 2 from the client, 1 from the server)",
    ] and body[2][11:].startswith("chat began after ")
    assert [line[:10] for line in body] == sorted(line[:10] for line in body)
    assert ", waited " in out and ", chat began " in out


# -- incremental export ---------------------------------------------------------------------


def test_export_with_a_cursor_appends_exactly_what_is_new_never_twice_never_a_gap(tmp_path):
    path = tmp_path / "inc.db"
    s = open_store(path)
    a = s.begin_session(("127.0.0.1", 1), ("127.0.0.1", 9), served=True)
    for i in range(5):
        s.add_message(a, "client", "amy", f"first {i}")
    cursor = tmp_path / "cursor"
    out1 = run_chatlog(path, "export", "-f", "jsonl", "--cursor", str(cursor))
    got = [json.loads(x) for x in out1.stdout.splitlines()]
    assert [r["text"] for r in got] == [f"first {i}" for i in range(5)]
    assert cursor.read_text().strip() == str(got[-1]["id"])
    b = s.begin_session(("127.0.0.1", 2), ("127.0.0.1", 9), served=True)
    s.add_message(a, "server", "SERVER", "late answer in the first session")
    s.add_message(b, "client", "bob", "a new session")
    out2 = run_chatlog(path, "export", "-f", "jsonl", "--cursor", str(cursor))
    new = [json.loads(x) for x in out2.stdout.splitlines()]
    assert [r["text"] for r in new] == ["late answer in the first session", "a new session"]
    assert all(r["id"] > got[-1]["id"] for r in new)
    again = run_chatlog(path, "export", "-f", "jsonl", "--cursor", str(cursor))
    assert again.exit_code == 0 and again.stdout == "" and "nothing new after message" in again.stderr
    rows = list(csv.DictReader(io.StringIO(run_chatlog(path, "export", "-f", "csv", "--after-id", str(got[2]["id"])).stdout)))
    assert [int(r["id"]) for r in rows] == [r["id"] for r in got[3:] + new]
    s.close()


def test_a_cursor_file_that_holds_no_id_is_one_clear_line_and_left_alone(tmp_path):
    path = tmp_path / "inc.db"
    s = open_store(path)
    a = s.begin_session(("127.0.0.1", 1), ("127.0.0.1", 9), served=True)
    s.add_message(a, "client", "amy", "hello")
    s.close()
    cursor = tmp_path / "cursor"
    cursor.write_text("yesterday\n")
    r = run_chatlog(path, "export", "-f", "jsonl", "--cursor", str(cursor))
    assert r.exit_code != 0 and r.stderr.count("\n") == 1 and "should hold one message id" in r.stderr
    assert cursor.read_text() == "yesterday\n"


def test_cursor_exports_beside_a_live_server_lose_and_repeat_nothing(start_server, tmp_path):
    import socket
    import threading

    server = start_server("--room", "--rate", "0")
    cursor = tmp_path / "cursor"
    seen: list[int] = []
    done = threading.Event()

    held = []

    def talk():
        # Kept open to the end: a socket closed with the server's greeting unread is reset, and
        # a reset can throw away lines the server had not read yet.
        c = socket.create_connection(("127.0.0.1", server.port))
        held.append(c)
        c.sendall(b"amy>hi\n")
        for i in range(400):
            c.sendall(f"amy>line {i}\n".encode())
        done.set()

    t = threading.Thread(target=talk)
    t.start()
    finished = False
    for _ in range(500):  # (bounded: each run takes a moment)
        finished = done.is_set() and said_last(server.db)  # before this run: all is committed
        r = run_chatlog(server.db, "export", "-f", "jsonl", "--cursor", str(cursor), process=True)
        assert r.exit_code == 0, r.stderr
        seen += [json.loads(x)["id"] for x in r.stdout.splitlines()]
        if finished:
            break
    t.join()
    assert finished, "the last line never reached the archive"
    ids = [row[0] for row in sqlite3_ids(server.db)]
    held[0].close()
    assert sorted(seen) == seen and len(seen) == len(set(seen))
    assert set(ids) <= set(seen)


def said_last(db):
    import sqlite3

    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT 1 FROM messages WHERE text = 'line 399'").fetchone() is not None
    finally:
        conn.close()


def sqlite3_ids(db):
    import sqlite3

    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT id FROM messages ORDER BY id").fetchall()
    finally:
        conn.close()
