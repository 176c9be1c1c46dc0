"""The record's newer promises, each through the real command: verified handles and transports,
incremental export by message id, tombstones (rm --message, forget), retention, room
participants as people in the archive."""

import csv
import io
import json
import os

import pytest
from conftest import run_chatlog as run
from storebuild import _ts, open_store

from chatlog.events import Link


def T(hms: str) -> str:
    return f"2026-11-20T{hms}.000000+00:00"


FP = "SHA256:" + "ab" * 32


@pytest.fixture
def store(db_path):
    s = open_store(db_path)
    yield s
    s.close()


@pytest.fixture
def mixed(store):
    """A verified 1:1 chat over TLS (amy), a plain one (bob), and a room where carol is verified
    and dave is not."""
    rec = store.rec
    amy = store.begin_session(("127.0.0.1", 5000), ("127.0.0.1", 9999), at=T("10:00:00"), served=True)
    store.set_handle(amy, "amy")
    rec.set_link("sessions", amy, Link("tls", "TLSv1.3", "TLS_AES_256_GCM_SHA384", FP))
    rec.set_verified("sessions", amy)
    store.add_message(amy, "client", "amy", "hi", at=T("10:00:01"), verified=True)
    store.add_message(amy, "server", "SERVER", "hello", at=T("10:00:02"))
    store.end_session(amy, "client-quit", at=T("10:00:03"))
    bob = store.begin_session(("127.0.0.1", 5001), ("127.0.0.1", 9999), at=T("10:01:00"), served=True)
    store.set_handle(bob, "bob")
    store.add_message(bob, "client", "bob", "yo", at=T("10:01:01"))
    store.end_session(bob, "client-quit", at=T("10:01:02"))
    room = store.begin_session((None, None), ("127.0.0.1", 7000), at=T("12:00:00"), served=True, kind="room")
    carol = rec.add_participant(room, "10.0.0.1", 4001, _ts(T("12:00:01")))
    rec.set_participant_handle(carol, "carol")
    rec.set_link("participants", carol, Link("tls", "TLSv1.3", "TLS_AES_128_GCM_SHA256", FP))
    rec.set_verified("participants", carol)
    rec.add_event(room, carol, "joined", _ts(T("12:00:01")))
    dave = rec.add_participant(room, "10.0.0.2", 4002, _ts(T("12:00:02")))
    rec.set_participant_handle(dave, "dave")
    rec.add_event(room, dave, "joined", _ts(T("12:00:02")))
    store.add_message(room, "client", "carol", "hi all", at=T("12:00:03"), participant=carol, verified=True)
    store.add_message(room, "client", "dave", "hey", at=T("12:00:04"), participant=dave)
    store.add_message(room, "server", "SERVER", "welcome", at=T("12:00:05"))
    store.end_session(room, "shutdown", at=T("12:00:06"))
    return {"amy": amy, "bob": bob, "room": room}


MARK = "✓ "


def test_verified_handles_are_marked_in_every_reader(db_path, mixed):
    amy, bob, room = mixed["amy"], mixed["bob"], mixed["room"]
    shown = run(db_path, "show", str(amy)).output
    assert "✓ amy>hi" in shown and "SERVER>hello" in shown  # the operator is not a verified client
    assert "transport: tls (TLSv1.3, TLS_AES_256_GCM_SHA384), certificate " + FP + ", handle verified" in shown
    plain = run(db_path, "show", str(bob)).output
    assert "bob>yo" in plain and "✓" not in plain and "transport: tcp" in plain
    body = run(db_path, "show", str(room)).output
    assert "✓ carol>hi all" in body and "dave>hey" in body and "dave ✓" not in body
    assert "✓ carol>hi all" in run(db_path, "replay", str(room)).output
    assert "✓ carol>hi all" in run(db_path, "tail", str(room)).output
    for fmt in ("txt", "md"):
        out = run(db_path, "export", "-f", fmt).stdout
        assert "✓ amy>hi" in out and "✓ carol>hi all" in out and "bob>yo" in out and "dave>hey" in out, fmt
    html = run(db_path, "export", "-f", "html").stdout
    assert html.count('class="verified"') == 2 and "dave&gt;" in html
    doc = json.loads(run(db_path, "export", "-f", "json").stdout)
    said = {m["text"]: m["verified"] for s in doc["sessions"] for m in s["messages"] if m["sender"] != "event"}
    assert said == {"hi": True, "hello": False, "yo": False, "hi all": True, "hey": False, "welcome": False}
    first = doc["sessions"][0]
    assert (first["transport"], first["tls_version"], first["cert_fingerprint"], first["verified"]) == (
        "tls", "TLSv1.3", FP, True)
    assert doc["sessions"][1]["transport"] == "tcp" and doc["sessions"][1]["verified"] is False
    lines = [json.loads(x) for x in run(db_path, "export", "-f", "jsonl").stdout.splitlines()]
    assert {m["text"]: m["verified"] for m in lines if m["sender"] != "event"} == said
    assert lines[0]["transport"] == "tls" and lines[0]["cert_fingerprint"] == FP
    rows = list(csv.DictReader(io.StringIO(run(db_path, "export", "-f", "csv").stdout)))
    assert {r["text"]: r["verified"] for r in rows if r["sender"] != "event"} == {
        k: "true" if v else "false" for k, v in said.items()}


def test_sessions_verified_filters_to_sessions_with_a_verified_handle(db_path, mixed):
    rows = json.loads(run(db_path, "sessions", "--verified", "--json").stdout)
    assert sorted(r["id"] for r in rows) == [mixed["amy"], mixed["room"]]
    assert all(r["verified"] for r in rows)
    assert "--verified" in run(db_path, "sessions", "--help").stdout


def test_an_old_archive_reads_as_plain_and_unverified(db_path, store):
    sid = store.begin_session(("127.0.0.1", 5000), ("127.0.0.1", 9999), at=T("10:00:00"), served=True)
    store.set_handle(sid, "amy")
    store.add_message(sid, "client", "amy", "hi", at=T("10:00:01"))
    store.conn.execute("UPDATE sessions SET verified = 'yes', transport = X'00'")  # as crafted as it gets
    out = run(db_path, "show", str(sid)).output
    assert "amy>hi" in out and "transport: \\x00" in out
    assert json.loads(run(db_path, "export", "-f", "json").stdout)["sessions"][0]["messages"][0]["verified"] is False


# -- incremental export -----------------------------------------------------------------------


def _said(store, sid, n, start=0):
    for i in range(start, start + n):
        store.add_message(sid, "client", "amy", f"line {i}")


def test_export_after_id_writes_only_newer_messages_with_their_ids(db_path, mixed):
    every = [json.loads(x) for x in run(db_path, "export", "-f", "jsonl").stdout.splitlines()]
    ids = [m["id"] for m in every]
    assert sorted(ids) == list(range(1, len(ids) + 1))
    cut = ids[3]
    newer = [json.loads(x) for x in run(db_path, "export", "-f", "jsonl", "--after-id", str(cut)).stdout.splitlines()]
    assert [m["id"] for m in newer] == [i for i in sorted(ids) if i > cut]
    rows = list(csv.DictReader(io.StringIO(run(db_path, "export", "-f", "csv", "--after-id", str(cut)).stdout)))
    assert [int(r["id"]) for r in rows] == [i for i in sorted(ids) if i > cut]
    doc = json.loads(run(db_path, "export", "-f", "json", "--after-id", str(cut)).stdout)
    assert [m["id"] for s in doc["sessions"] for m in s["messages"]] == [i for i in sorted(ids) if i > cut]
    bad = run(db_path, "export", "-f", "txt", "--after-id", "3")
    assert bad.exit_code == 1 and bad.stderr.startswith("chatlog: ") and bad.stderr.count("\n") == 1
    for option in ("--after-id", "--cursor"):
        assert option in run(db_path, "export", "--help").stdout


def test_the_newer_messages_are_a_range_scan_of_the_rowid(db_path, mixed):
    from chatlog.archive import open_archive

    store = open_archive(db_path)
    plan = " ".join(r[-1] for r in store.conn.execute("EXPLAIN QUERY PLAN " + store.after_id_sql.format(columns="id"), (0, 10)))
    store.close()
    assert "INTEGER PRIMARY KEY (rowid>? AND rowid<?)" in plan, plan


def test_a_cursor_file_exports_each_message_once_and_moves_on(db_path, store, tmp_path):
    cursor = tmp_path / "export.cursor"
    sid = store.begin_session(("127.0.0.1", 5000), ("127.0.0.1", 9999), served=True)
    store.set_handle(sid, "amy")
    _said(store, sid, 5)
    first = run(db_path, "export", "-f", "jsonl", "--cursor", str(cursor)).stdout.splitlines()
    assert [json.loads(x)["text"] for x in first] == [f"line {i}" for i in range(5)]
    assert cursor.read_text().strip() == str(json.loads(first[-1])["id"])
    again = run(db_path, "export", "-f", "jsonl", "--cursor", str(cursor))
    assert again.exit_code == 0 and again.stdout == "" and "nothing new" in again.stderr
    _said(store, sid, 3, start=5)
    third = run(db_path, "export", "-f", "jsonl", "--cursor", str(cursor)).stdout.splitlines()
    assert [json.loads(x)["text"] for x in third] == ["line 5", "line 6", "line 7"]
    for content in ("12abc\n", "", "-4", "9" * 30):
        cursor.write_text(content)
        bad = run(db_path, "export", "-f", "jsonl", "--cursor", str(cursor))
        assert bad.exit_code == 1 and bad.stderr.startswith("chatlog: ") and bad.stderr.count("\n") == 1, content
        assert str(cursor) in bad.stderr and bad.stdout == ""
        assert cursor.read_text() == content  # left as it was


def _waits_for_a_lock(pid: int) -> bool:
    """Whether process PID is blocked waiting for a file lock (/proc/locks lists its wait)."""
    with open("/proc/locks") as f:
        return any("->" in line and line.split()[5] == str(pid) for line in f if len(line.split()) > 5)


def test_an_export_on_a_cursor_in_use_waits_then_starts_where_the_other_ended(db_path, store, tmp_path):
    """Two cron runs that overlap on one cursor: the second waits for the first and writes only
    what came after it, never the same messages again."""
    import fcntl
    import subprocess
    import sys

    from conftest import wait_until

    cursor = tmp_path / "cron.cursor"
    sid = store.begin_session(("127.0.0.1", 5000), ("127.0.0.1", 9999), served=True)
    _said(store, sid, 5)
    assert len(run(db_path, "export", "-f", "jsonl", "--cursor", str(cursor)).stdout.splitlines()) == 5
    _said(store, sid, 3, start=5)
    held = os.open(cursor, os.O_RDONLY)  # an export under way holds the cursor
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        second = subprocess.Popen([sys.executable, "-m", "chatlog", "export", "-f", "jsonl", "--cursor", str(cursor),
                                   "--db", str(db_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: second.poll() is not None or _waits_for_a_lock(second.pid))
        assert second.poll() is None, "the second export did not wait for the first"
        newest = max(r[0] for r in store.conn.execute("SELECT id FROM messages"))
        tmp = tmp_path / "cursor.new"  # the first ends: its cursor renamed into place
        tmp.write_text(f"{newest}\n")
        os.replace(tmp, cursor)
    finally:
        os.close(held)
    out, err = second.communicate(timeout=30)
    assert second.returncode == 0 and out == "" and f"nothing new after message {newest}" in err


def test_a_cursor_that_cannot_be_made_fails_before_anything_is_written(db_path, store, tmp_path):
    sid = store.begin_session(("127.0.0.1", 5000), ("127.0.0.1", 9999), served=True)
    _said(store, sid, 2)
    for where in (tmp_path / "no such dir" / "c",):
        out = run(db_path, "export", "-f", "jsonl", "--cursor", str(where))
        assert out.exit_code == 1 and out.stdout == "" and out.stderr.count("\n") == 1, out.output
        assert out.stderr.startswith(f"chatlog: cannot open the cursor file {where}: ")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # (it used to wait for a writer for ever)
    out = run(db_path, "export", "-f", "jsonl", "--cursor", str(fifo))
    assert out.exit_code == 1 and out.stdout == "" and out.stderr == f"chatlog: the cursor file {fifo} is not a regular file\n"
    made = tmp_path / "made"
    out = run(tmp_path / "missing.db", "export", "-f", "jsonl", "--cursor", str(made))
    assert out.exit_code == 1 and not made.exists()  # made for a run that wrote nothing: not left behind


def test_a_cursor_appending_csv_writes_its_header_once(db_path, store, tmp_path):
    cursor = tmp_path / "csv.cursor"
    sid = store.begin_session(("127.0.0.1", 5000), ("127.0.0.1", 9999), served=True)
    store.set_handle(sid, "amy")
    _said(store, sid, 2)
    log = run(db_path, "export", "-f", "csv", "--cursor", str(cursor)).stdout
    assert run(db_path, "export", "-f", "csv", "--cursor", str(cursor)).stdout == ""  # nothing new: nothing
    _said(store, sid, 2, start=2)
    log += run(db_path, "export", "-f", "csv", "--cursor", str(cursor)).stdout
    rows = list(csv.DictReader(io.StringIO(log)))
    assert log.count("session_id,") == 1 and [r["text"] for r in rows] == [f"line {i}" for i in range(4)]
    into = tmp_path / "new.csv"  # a file of its own each run: a whole csv, header and all
    _said(store, sid, 1, start=4)
    run(db_path, "export", "-f", "csv", "--cursor", str(cursor), "-o", str(into))
    assert [r["text"] for r in csv.DictReader(io.StringIO(into.read_text()))] == ["line 4"]


def test_ids_of_deleted_messages_and_sessions_are_never_given_again(db_path, store, tmp_path):
    """rm of the newest session must not hand its ids to the next messages: a cursor already
    past them would skip those (and `session N` would name another chat)."""
    cursor = tmp_path / "ids.cursor"
    first = store.begin_session(("127.0.0.1", 5000), ("127.0.0.1", 9999), served=True)
    store.set_handle(first, "amy")
    _said(store, first, 3)
    store.end_session(first, "client-quit")
    newest = store.begin_session(("127.0.0.1", 5001), ("127.0.0.1", 9999), served=True)
    store.set_handle(newest, "bob")
    _said(store, newest, 3)
    store.end_session(newest, "client-quit")
    run(db_path, "export", "-f", "jsonl", "--cursor", str(cursor))
    assert run(db_path, "rm", str(newest), "--yes").exit_code == 0
    again = store.begin_session(("127.0.0.1", 5002), ("127.0.0.1", 9999), served=True)
    store.set_handle(again, "cat")
    _said(store, again, 2)
    with store.rec.transaction():  # a room's busy pass takes its ids in one go
        store.rec.add_messages(again, [("client", "cat", f"busy {i}", None, None, 0.0, None, False) for i in range(3)])
    assert again > newest
    new = [json.loads(x) for x in run(db_path, "export", "-f", "jsonl", "--cursor", str(cursor)).stdout.splitlines()]
    assert [m["text"] for m in new] == ["line 0", "line 1", "busy 0", "busy 1", "busy 2"]
    assert min(m["id"] for m in new) > 6 and all(m["session_id"] == again for m in new)


def test_a_cursor_beside_a_live_writer_misses_nothing_and_repeats_nothing(db_path, store, tmp_path):
    """A writer process commits messages, some in transactions of several, while exports run
    one after another against the same cursor: together they hold every message exactly once."""
    import subprocess
    import sys

    from conftest import ROOT

    sid = store.begin_session(("127.0.0.1", 5000), ("127.0.0.1", 9999), served=True)
    store.set_handle(sid, "amy")
    writer = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]
from storebuild import open_store
s = open_store({str(db_path)!r})
for i in range(400):
    if i % 7 == 0:
        with s.rec.transaction():
            for j in range(3):
                s.conn.execute("INSERT INTO messages (session_id, seq, at, sender, handle, text) VALUES "
                               "(?, (SELECT coalesce(max(seq), 0) + 1 FROM messages WHERE session_id = ?), ?, 'client', 'amy', ?)",
                               ({sid}, {sid}, '2026-11-20T10:00:00.000000+00:00', f'batch {{i}} {{j}}'))
            time.sleep(0.002)  # a transaction held open while the exports read
        s.rec._seq.pop({sid}, None)
    else:
        s.add_message({sid}, 'client', 'amy', f'line {{i}}')
s.close()
"""])
    cursor = tmp_path / "cursor"
    got = []
    runs = 0
    while True:
        done = writer.poll() is not None
        out = run(db_path, "export", "-f", "jsonl", "--cursor", str(cursor))
        assert out.exit_code == 0, out.output
        got += [json.loads(x)["id"] for x in out.stdout.splitlines()]
        runs += 1
        if done:
            break
    assert writer.returncode == 0
    every = [r[0] for r in store.conn.execute("SELECT id FROM messages ORDER BY id")]
    assert len(every) == 400 + 2 * len(range(0, 400, 7)) and runs > 2
    assert got == every


# -- removing what should not be kept ---------------------------------------------------------


def _every_reader(db_path, sid):
    """What every reader shows of a session: show, replay, tail, search, every export."""
    outs = {
        "show": run(db_path, "show", str(sid)).output,
        "replay": run(db_path, "replay", str(sid), "--instant").output,
        "tail": run(db_path, "tail", str(sid)).output,
        "search": run(db_path, "search", "secret", "--json").output,
    }
    for fmt in ("txt", "md", "json", "jsonl", "csv", "html", "cast"):
        outs[fmt] = run(db_path, "export", str(sid), "-f", fmt).stdout
    return outs


def test_rm_message_leaves_a_tombstone_every_reader_shows(db_path, mixed, store):
    amy = mixed["amy"]
    store.add_message(amy, "client", "amy", "my secret password", raw=b"my secret password\0", note="padded",
                      at=T("10:00:02"))
    (mid,) = [r[0] for r in store.conn.execute("SELECT id FROM messages WHERE text LIKE '%secret%'")]
    before = _every_reader(db_path, amy)
    assert all("secret" in out for name, out in before.items()), [n for n, o in before.items() if "secret" not in o]
    dry = run(db_path, "rm", "--message", str(mid), "--dry-run")
    assert dry.exit_code == 0 and "would remove" in dry.stderr and f"message {mid}" in dry.stderr
    assert "secret" in run(db_path, "show", str(amy)).output
    done = run(db_path, "rm", "--message", str(mid))
    assert done.exit_code == 0 and f"removed message {mid}" in done.stderr, done.output
    after = _every_reader(db_path, amy)
    for name, out in after.items():
        assert "secret" not in out.replace("no messages match 'secret'", "") and "padded" not in out, name
    assert "(message removed " in after["show"] and "(message removed " in after["replay"]
    assert "(message removed " in after["tail"] and "(message removed " in after["html"]
    assert "no messages match" in after["search"]
    msgs = json.loads(after["json"])["sessions"][0]["messages"]
    (gone,) = [m for m in msgs if m["id"] == mid]
    assert gone["text"] == "" and gone["removed_at"] and "raw_base64" not in gone
    assert [m["seq"] for m in msgs] == list(range(1, len(msgs) + 1))  # the numbering stays whole
    row = [r for r in csv.DictReader(io.StringIO(after["csv"])) if r["id"] == str(mid)][0]
    assert row["text"] == "" and row["removed_at"]
    import sqlite3

    conn = sqlite3.connect(db_path)
    assert conn.execute("SELECT text, raw, note FROM messages WHERE id = ?", (mid,)).fetchone() == ("", None, None)
    assert conn.execute("SELECT count(*) FROM messages_fts WHERE messages_fts MATCH 'secret'").fetchone() == (0,)
    assert conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('integrity-check')")  # the index is whole
    conn.close()
    again = run(db_path, "rm", "--message", str(mid))
    assert again.exit_code == 0 and "already removed" in again.stderr
    for bad in ("99999", "abc"):
        r = run(db_path, "rm", "--message", bad)
        assert r.exit_code in (1, 2) and r.stderr.count("\n") <= 2


def _room_of_amy_and_bob(store):
    """A room (its session id) with two participants: amy from 10.0.0.1, bob from 10.0.0.2."""
    room = store.begin_session((None, None), ("127.0.0.1", 7000), at=T("12:00:00"), served=True, kind="room")
    p = store.rec.add_participant(room, "10.0.0.1", 4001, _ts(T("12:00:01")))
    store.rec.set_participant_handle(p, "amy")
    q = store.rec.add_participant(room, "10.0.0.2", 4002, _ts(T("12:00:01")))
    store.rec.set_participant_handle(q, "bob")
    return room, p, q


def test_forget_removes_every_line_of_a_person_in_chats_and_rooms(db_path, store):
    a = store.begin_session(("10.0.0.1", 5000), ("127.0.0.1", 9999), at=T("10:00:00"), served=True)
    store.set_handle(a, "amy")
    for i in range(30):
        store.add_message(a, "client", "amy", f"amy private {i}")
        store.add_message(a, "server", "SERVER", f"answer {i}")
    store.end_session(a, "client-quit")
    b = store.begin_session(("10.0.0.9", 5001), ("127.0.0.1", 9999), at=T("10:05:00"), served=True)
    store.set_handle(b, "amy")  # another amy, from another host
    store.add_message(b, "client", "amy", "amy elsewhere")
    room, p, q = _room_of_amy_and_bob(store)
    store.add_message(room, "client", "amy", "amy in the room", participant=p)
    store.add_message(room, "client", "bob", "bob in the room", participant=q)
    dry = run(db_path, "forget", "--handle", "amy", "--host", "10.0.0.1", "--dry-run")
    assert dry.exit_code == 0 and "would remove 31 messages from amy at 10.0.0.1 in 2 sessions" in dry.stderr, dry.output
    assert run(db_path, "search", "private", "-c").stdout.strip() == "30"
    done = run(db_path, "forget", "--handle", "amy", "--host", "10.0.0.1")
    assert "removed 31 messages from amy at 10.0.0.1 in 2 sessions" in done.stderr, done.output
    assert run(db_path, "search", "private", "-c").stdout.strip() == "0"
    lines = [json.loads(x) for x in run(db_path, "export", "-f", "jsonl").stdout.splitlines()]
    kept = sorted(m["text"] for m in lines if not m.get("removed_at"))
    assert "amy elsewhere" in kept and "bob in the room" in kept and "answer 0" in kept
    assert not [t for t in kept if "private" in t or t == "amy in the room"]
    assert "forget" in run(db_path, "--help").stdout and "--dry-run" in run(db_path, "forget", "--help").stdout
    nobody = run(db_path, "forget", "--handle", "zed")
    assert nobody.exit_code == 0 and "no messages from zed" in nobody.stderr


def test_forget_finds_a_rooms_lines_said_under_a_later_name(db_path, store):
    """A room's participant keeps the name they came with; what they said after taking another
    is found by that name too (`sessions --handle`; `forget`, with --host as theirs from that
    address), and the first name still takes everything the person said."""
    room, p, q = _room_of_amy_and_bob(store)
    store.add_message(room, "client", "amy", "as amy", participant=p)
    store.add_message(room, "event", "cara", "renamed", note="amy is now cara", participant=p)
    store.add_message(room, "client", "cara", "as cara one", participant=p)
    store.add_message(room, "client", "bob", "bob says cara", participant=q)
    store.add_message(room, "client", "cara", "as cara two", participant=p)
    assert str(room) in run(db_path, "sessions", "--handle", "cara").stdout
    assert "no sessions" in run(db_path, "sessions", "--handle", "dana").stderr.lower()
    assert "would remove 2 messages from cara at 10.0.0.1" in run(
        db_path, "forget", "--handle", "cara", "--host", "10.0.0.1", "--dry-run").stderr
    assert "no messages from cara at 10.0.0.2" in run(db_path, "forget", "--handle", "cara", "--host", "10.0.0.2").stderr
    done = run(db_path, "forget", "--handle", "cara")
    assert "removed 2 messages from cara in 1 session" in done.stderr, done.output
    kept = [json.loads(x) for x in run(db_path, "export", "-f", "jsonl").stdout.splitlines()]
    assert sorted(m["text"] for m in kept if m["sender"] == "client" and not m.get("removed_at")) == [
        "as amy", "bob says cara"]
    assert "removed 1 message from amy" in run(db_path, "forget", "--handle", "amy").stderr


def test_a_later_name_is_found_without_reading_every_rooms_lines(db_path, store):
    """`forget` and `sessions --handle` find a name through the index of the rooms' events (a
    join or rename under it), never by reading every line (1.6 s for a room of 1M lines)."""
    import sqlite3

    from chatlog.archive import filter_sql
    from chatlog.query import Filters
    from chatlog.upkeep import Upkeep
    from chatlog.cli import open_archive

    room, p, q = _room_of_amy_and_bob(store)
    store.add_message(room, "event", "cara", "renamed", note="amy is now cara", participant=p)
    store.add_message(room, "client", "cara", "as cara", participant=p)
    up = Upkeep(open_archive(db_path))
    plans, real = [], up.conn

    class Watched:
        def __getattr__(self, name):
            return getattr(real, name)

        def execute(self, sql, args=()):
            plans.extend(r[3] for r in real.execute("EXPLAIN QUERY PLAN " + sql, args))
            return real.execute(sql, args)

    up.conn = Watched()
    for host in (None, "10.0.0.1"):
        assert len(up.said_by("cara", host)) == 1
    where, args = filter_sql(Filters(handle="cara"))
    conn = sqlite3.connect(db_path)
    assert conn.execute(f"SELECT id FROM sessions WHERE {where}", args).fetchall() == [(room,)]
    plans.extend(r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN SELECT id FROM sessions WHERE {where}", args))
    conn.close()
    assert any("idx_messages_event_handle" in p for p in plans)
    assert not [p for p in plans if p.startswith("SCAN m") or p == "SCAN messages"], plans


def _seed(db_path, sessions, lines, handle="amy", at=None):
    s = open_store(db_path)
    ids = []
    for i in range(sessions):
        sid = s.begin_session(("10.0.0.1", 5000 + i), ("127.0.0.1", 9999), at=at, served=True)
        s.set_handle(sid, handle)
        s.add_lines(sid, "client", handle, lines, at=at, text=f"{handle} old line %d")
        s.end_session(sid, "client-quit", at=at)
        ids.append(sid)
    s.close()
    return ids


def _chat_while(server, proc, limit=60.0, every=0.01):
    """Chat a turn every `every` seconds with the server until `proc` ends: the slowest turn, in
    seconds, and how many turns there were. Paced, not flat out: a stall of the writer lasts far
    longer than the pace, so it is still met, and the chat leaves the cores to what it waits on
    (flat out, the client and server took ~5 s of CPU here beside a 1.6 s delete)."""
    import time

    from conftest import recv_until

    c = server.connect()
    worst, turns, deadline = 0.0, 0, time.monotonic() + limit
    while proc.poll() is None and time.monotonic() < deadline:
        t0 = time.perf_counter()
        c.sendall(b"bob>turn %d\n\0" % turns)
        assert recv_until(c, b"\n")
        took = time.perf_counter() - t0
        worst = max(worst, took)
        turns += 1
        proc_wait(proc, every - took)
    c.close()
    return worst, turns


def proc_wait(proc, seconds: float) -> None:
    """Wait up to `seconds` for `proc` to end (returning at once when it does)."""
    import subprocess

    if seconds > 0:
        try:
            proc.wait(seconds)
        except subprocess.TimeoutExpired:
            pass


@pytest.mark.slow
def test_forget_beside_a_live_server_stalls_no_turn(start_server, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    db = tmp_path / "chat.db"
    _seed(db, 40, 10_000)
    server = start_server(db=db)
    server.script(f"answer {i}" for i in range(100_000))
    proc = subprocess.Popen([sys.executable, "-m", "chatlog", "forget", "--handle", "amy", "--db", str(db)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    worst, turns = _chat_while(server, proc)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "removed 400000 messages from amy" in err, err
    # The promise is no turn past 2 s; the bound is tighter so this can fail: all 400,000 in one
    # transaction held the server up about 2 s here (more with the suite's other tests beside
    # it), batches of REMOVE_BATCH about 0.05 s: the bound leaves a loaded machine room either way.
    assert turns > 10 and worst < 1.0, (worst, turns)
    import sqlite3

    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM messages WHERE handle = 'amy' AND removed_at IS NULL").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM messages WHERE text LIKE 'turn %'").fetchone()[0] >= turns
    conn.close()


# -- room participants are people in the archive ------------------------------------------------


def test_room_participants_are_found_counted_and_filtered(db_path, mixed):
    room, amy, bob = mixed["room"], mixed["amy"], mixed["bob"]
    listed = json.loads(run(db_path, "sessions", "--handle", "carol", "--json").stdout)
    assert [s["id"] for s in listed] == [room]
    assert [s["id"] for s in json.loads(run(db_path, "sessions", "--handle", "amy", "--json").stdout)] == [amy]
    out = [json.loads(x) for x in run(db_path, "export", "--handle", "dave", "-f", "jsonl").stdout.splitlines()]
    assert {m["session_id"] for m in out} == {room} and "hey" in [m["text"] for m in out]
    assert [s["id"] for s in json.loads(run(db_path, "sessions", "--kind", "room", "--json").stdout)] == [room]
    assert [s["id"] for s in json.loads(run(db_path, "sessions", "--kind", "chat", "--json").stdout)] == [bob, amy]
    st = json.loads(run(db_path, "stats", "--json").stdout)
    assert st["handles"] == 4  # amy, bob (1:1), carol, dave (the room)
    busiest = {b["handle"]: b for b in st["busiest_handles"]}
    assert busiest["carol"]["said"] == 1 and busiest["carol"]["sessions"] == 1
    assert "carol" in run(db_path, "stats").stdout
    hits = json.loads(run(db_path, "search", "hi", "--json", "--session", str(room)).stdout)
    assert [h["text"] for h in hits] == ["hi all"]
    assert [h["text"] for h in json.loads(run(db_path, "search", "hi", "--json").stdout)] == ["hi all", "hi"]
    assert "--session" in run(db_path, "search", "--help").stdout
    shown = json.loads(run(db_path, "show", str(room), "--json").stdout)
    assert shown["id"] == room and shown["kind"] == "room"
    assert [m["text"] for m in shown["messages"] if m["sender"] == "client"] == ["hi all", "hey"]
    assert [m["verified"] for m in shown["messages"] if m["sender"] == "client"] == [True, False]


# -- retention --------------------------------------------------------------------------------


def test_durations_are_read_by_one_helper_that_prune_shares():
    from chatlog.query import BadDate, duration_seconds, parse_when

    assert duration_seconds("90d") == 90 * 86400 and duration_seconds("12h") == 43200
    assert duration_seconds("30m") == 1800 and duration_seconds("45s") == 45 and duration_seconds("2w") == 14 * 86400
    for bad in ("", "90", "d", "3M", "-1d", "1x", "1e9999d"):
        with pytest.raises(BadDate):
            duration_seconds(bad)
    from datetime import UTC, datetime

    now = datetime(2026, 12, 4, tzinfo=UTC)
    assert parse_when("90d", now) == datetime.fromtimestamp(now.timestamp() - duration_seconds("90d"), UTC).isoformat(
        timespec="microseconds")


@pytest.mark.slow
def test_retain_removes_old_sessions_a_bounded_step_at_a_time(db_path):
    import time

    from chatlog import upkeep

    old = _seed(db_path, 3, 40_000, at=T("10:00:00"))  # ended 2026-11-20
    recent = _seed(db_path, 2, 10, handle="bob")  # now
    s = open_store(db_path)
    live = s.begin_session(("10.0.0.5", 6000), ("127.0.0.1", 9999), at=T("09:00:00"), served=True)
    s.add_message(live, "client", "eve", "still here", at=T("09:00:01"))  # old, but not ended
    s.close()
    removed = {"sessions": 0, "messages": 0}
    calls = 0
    while True:
        t0 = time.perf_counter()
        r = upkeep.retain(db_path, 7 * 86400, 0.05)
        assert time.perf_counter() - t0 < 0.5  # one step, not the whole job
        calls += 1
        removed["sessions"] += r.sessions
        removed["messages"] += r.messages
        if not r.more:
            break
        assert calls < 500
    assert calls > 2 and removed == {"sessions": 3, "messages": 120_000}
    assert upkeep.retain(db_path, 7 * 86400, 0.05).sessions == 0  # nothing left to do
    listed = {x["id"] for x in json.loads(run(db_path, "sessions", "-n", "0", "--json").stdout)}
    assert listed == {*recent, live} and not listed & set(old)
    st = json.loads(run(db_path, "stats", "--json").stdout)
    assert st["sessions"] == 3 and st["messages"] == 21
    import sqlite3

    from chatlog.db import connect

    conn = sqlite3.connect(db_path)
    assert conn.execute("SELECT count(*) FROM messages WHERE session_id IN (1, 2, 3)").fetchone() == (0,)
    conn.close()
    db = connect(db_path)  # also given an open connection
    ended, steps = 0, 0
    while True:  # the recent ones, ended; a loaded machine may need more than one step for them
        r = upkeep.retain(db.conn, 1, 0.05, now=time.time() + 10)
        ended, steps = ended + r.sessions, steps + 1
        if not r.more:
            break
        assert steps < 50
    assert ended == 2
    db.close()


@pytest.mark.slow
def test_retain_beside_a_live_server_stalls_no_turn(start_server, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    db = tmp_path / "chat.db"
    _seed(db, 20, 10_000, at=T("10:00:00"))
    server = start_server(db=db)
    server.script(f"answer {i}" for i in range(100_000))
    proc = subprocess.Popen([sys.executable, "-c", f"""
import sys
from chatlog import upkeep
total = 0
while True:
    r = upkeep.retain({str(db)!r}, 86400, 0.1)
    total += r.messages
    if not r.more:
        break
print(total)
"""], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    worst, turns = _chat_while(server, proc)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.split() == ["200000"], err
    # The promise is no turn past 2 s; the bound is tighter so this can fail (one removal of
    # everything at once stalls a turn for seconds), and loose enough for a loaded parallel run.
    assert turns > 10 and worst < 1.0, (worst, turns)


@pytest.mark.slow
def test_serve_retain_removes_what_ended_too_long_ago_in_the_background(start_server, tmp_path):
    db = tmp_path / "chat.db"
    old = _seed(db, 3, 20_000, at=T("10:00:00"))  # ended 2026-11-20, more than 7 days before the run
    server = start_server("--retain", "7d", db=db)
    server.wait_for("^Keeping 1w: sessions that ended earlier are removed")
    server.wait_for(r"retention: removed 3 sessions \(60,000 messages\) that ended over 1w ago", timeout=30)
    c = server.connect()
    c.sendall(b"bob>still here\n\0")
    server.wait_for("^bob>still here$")
    listed = json.loads(run(db, "sessions", "-n", "0", "--json").stdout)
    assert [x["handle"] for x in listed] == ["bob"] and len(old) == 3  # the live chat stays
    c.close()


@pytest.mark.parametrize("given, said", [("0d", "keeps nothing"), ("3M", "ambiguous duration"),
                                         ("soon", "invalid duration")])
def test_serve_retain_takes_a_period(db_path, given, said):
    r = run(db_path, "serve", "0", "--retain", given)
    assert r.exit_code == 2 and said in r.stderr and "--retain" in r.stderr


# -- html: its zone and its title ---------------------------------------------------------------


def test_html_times_say_their_zone_as_show_does_and_the_title_names_the_session(db_path, mixed):
    env = {"TZ": "Asia/Kolkata"}  # UTC+05:30, no daylight saving
    shown = run(db_path, "show", str(mixed["bob"]), "-t", process=True, env=env).stdout
    assert "Started 2026-11-20 15:31:00" in shown and "[15:31:01] bob>yo" in shown
    page = run(db_path, "export", str(mixed["bob"]), "-f", "html", process=True, env=env).stdout
    assert "<title>chatlog: Session 2: bob from 127.0.0.1 port 5001</title>" in page
    assert "Started 2026-11-20 15:31:00" in page and ">15:31:01</time>" in page
    assert "times in local time (UTC+05:30)" in page
    utc = run(db_path, "export", str(mixed["bob"]), "-f", "html", "--utc", process=True, env=env).stdout
    assert "Started 2026-11-20 10:01:00Z" in utc and ">10:01:01</time>" in utc and "times in UTC" in utc
    several = run(db_path, "export", "-f", "html", process=True, env=env).stdout
    assert "<title>chatlog: 3 sessions, from session 1</title>" in several
