"""Generate a chat archive in the real schema: N sessions of M messages, plus one long session.

Usage: python bench/gen.py PATH SESSIONS MESSAGES_PER_SESSION
The search index is built in bulk (triggers off, then FTS5 'rebuild'), which is how a large
import should be done; the triggers are put back so the file is a normal chatlog database.
"""

import hashlib
import random
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
from chatlog.db import connect as open_store  # noqa: E402

WORDS = (
    "hello server client how are you good fine thanks what is the time today tomorrow "
    "homework assignment socket port bind listen accept connect send recv buffer message "
    "handle quit python c compile gcc make test debug error warning network protocol tcp "
    "packet latency turn chat log search replay export window terminal escape sequence"
).split()
RARE = "zanzibar"  # appears in about one message in ten thousand
LONG_SESSION = 1000  # messages in the session that `show` is timed on


def stamp():
    """A short version stamp for generated files: a hash of this generator and of what open_store
    creates (schema, triggers, page size), so a stale archive is never reused."""
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(f"{tmp}/empty.db")
        ddl = [r[0] or "" for r in store.conn.execute("SELECT sql FROM sqlite_master ORDER BY name")]
        page = store.conn.execute("PRAGMA page_size").fetchone()[0]
        store.close()
    h = hashlib.sha1(open(__file__, "rb").read())
    h.update(repr((ddl, page)).encode())
    return h.hexdigest()[:8]


def generate(path, sessions, per_session, seed=1):
    rng = random.Random(seed)
    store = open_store(path)
    conn = store.conn
    triggers = conn.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'messages'"
    ).fetchall()
    for (sql,) in triggers:
        name = sql.split()[2]
        conn.execute(f"DROP TRIGGER {name}")
    start = datetime(2025, 1, 1, tzinfo=UTC)
    conn.execute("BEGIN")
    msg_id = 0
    for sid in range(1, sessions + 2):
        n = LONG_SESSION if sid == sessions + 1 else per_session
        t0 = start + timedelta(minutes=7 * sid)
        handle = f"user{rng.randrange(5000)}"
        host = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        rows = []
        for seq in range(1, n + 1):
            msg_id += 1
            sender = "client" if seq % 2 else "server"
            words = rng.choices(WORDS, k=rng.randrange(3, 15))
            if rng.random() < 0.0001:
                words.append(RARE)
            at = (t0 + timedelta(seconds=3 * seq)).isoformat(timespec="microseconds")
            rows.append((msg_id, sid, seq, at, sender, handle if sender == "client" else "SERVER", " ".join(words)))
        conn.execute(
            "INSERT INTO sessions (id, started_at, served_at, ended_at, client_host, client_port, server_host, "
            "server_port, handle, end_reason, client_messages, server_messages) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (sid, t0.isoformat(timespec="microseconds"), t0.isoformat(timespec="microseconds"),
             (t0 + timedelta(seconds=3 * n + 1)).isoformat(timespec="microseconds"), host,
             rng.randrange(1024, 65535), "10.0.0.1", 9999, handle, "client-quit", (n + 1) // 2, n // 2),
        )
        conn.executemany(
            "INSERT INTO messages (id, session_id, seq, at, sender, handle, text) VALUES (?,?,?,?,?,?,?)", rows
        )
        if sid % 20000 == 0:
            conn.execute("COMMIT")
            conn.execute("BEGIN")
    conn.execute("COMMIT")
    conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('rebuild')")
    conn.execute("UPDATE fts_progress SET upto = (SELECT coalesce(max(id), 0) FROM messages)")  # all indexed
    for (sql,) in triggers:
        conn.execute(sql)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    return sessions + 1  # id of the long session


if __name__ == "__main__":
    t = time.perf_counter()
    long_id = generate(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    print(f"generated {sys.argv[1]} in {time.perf_counter() - t:.1f} s; long session id {long_id}")
