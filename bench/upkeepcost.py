"""Upkeep beside a live chat: the slowest turn while `serve --retain` or `chatlog forget` removes a
large part of the archive, against the slowest turn of the same chat with nothing else going on.

Both run on a fresh copy of the same generated archive (every session in it ended in 2025, so
`--retain 1d` removes them all; `forget` is given one handle that said every client line)."""

import shutil
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import turns
from common import VENV_BIN


def _worst_turn_while(db: Path, extra=(), side=None, done=None, limit=120.0):
    """Chat turn after turn with `chatlog serve` on `db` until `done()` says the upkeep finished
    (checked every 20 turns) or, with neither, for 400 turns; returns (worst turn s, turns, s)."""
    p, port = turns.start_server(db, 200_000, extra)
    proc = subprocess.Popen(side, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) if side else None
    worst, n, t0 = 0.0, 0, time.perf_counter()
    try:
        import socket

        c = socket.create_connection(("127.0.0.1", port))
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while time.perf_counter() - t0 < limit:
            t = time.perf_counter()
            c.sendall(b"bob>msg %d\n\0" % n)
            data = c.recv(4096)
            while not data.endswith(b"\n"):
                data += c.recv(4096)
            worst = max(worst, time.perf_counter() - t)
            n += 1
            if proc is not None and proc.poll() is not None:
                break
            if done is not None and n % 20 == 0 and done():
                break
            if proc is None and done is None and n >= 400:
                break
        c.close()
    finally:
        if proc is not None:
            proc.wait(limit)
        turns.stop(p)
    return worst, n, time.perf_counter() - t0


def _copy(src: Path, tmp: str, name: str) -> Path:
    dst = Path(tmp) / name / "chat.db"
    dst.parent.mkdir()
    shutil.copyfile(src, dst)
    return dst


def _old_sessions(db: Path) -> int:
    conn = sqlite3.connect(db, timeout=5)
    try:
        return conn.execute("SELECT count(*) FROM sessions WHERE started_at < '2026'").fetchone()[0]
    finally:
        conn.close()


def measure(src: Path):
    """{'baseline'|'retain'|'forget': (worst turn s, turns, seconds, what was removed)}."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="chatlog-bench-") as tmp:
        db = _copy(src, tmp, "base")
        out["baseline"] = (*_worst_turn_while(db), "")
        db = _copy(src, tmp, "retain")
        before = _old_sessions(db)
        out["retain"] = (*_worst_turn_while(db, ("--retain", "1d"), done=lambda: _old_sessions(db) == 0),
                         f"{before:,} sessions" if _old_sessions(db) == 0 else "not finished")
        db = _copy(src, tmp, "forget")
        conn = sqlite3.connect(db)
        lines = conn.execute("UPDATE messages SET handle = 'amy' WHERE sender = 'client'").rowcount
        conn.execute("UPDATE sessions SET handle = 'amy'")
        conn.commit()
        conn.close()
        side = [str(VENV_BIN / "chatlog"), "forget", "--handle", "amy", "--db", str(db)]
        out["forget"] = (*_worst_turn_while(db, side=side), f"{lines:,} lines")
        for name in ("retain", "forget"):  # deleting beside a live server must leave it whole
            _check_intact(Path(tmp) / name / "chat.db")
    return out


def _check_intact(db: Path) -> None:
    conn = sqlite3.connect(db)
    try:
        verdict = conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()
    if verdict != "ok":
        raise SystemExit(f"{db} is damaged after the run: {verdict}")
