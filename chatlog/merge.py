"""`chatlog merge A.db B.db ... -o ALL.db`: one archive from several servers' archives.

- A room linked across servers (its lines carry a stream sequence, schema m014) becomes one
  session per room name, its lines taken once each by origin identity (origin server and id: a
  line present on three servers appears once), in stream order. A line one server kept alone
  (said while its link was down: not relayed) is placed among them by its time. A line removed
  on any server (a tombstone) is removed in the result.
- Everything else (1:1 sessions, rooms that were never linked) is copied session by session,
  each with its server's row, so the server it was on stays named.
- What has been taken from which archive is recorded (`merged`), so merging the same archives
  again, into the same output, changes nothing. The sources are only read.

The result is an ordinary archive: `sessions`, `show`, `search`, `export` work on it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from chatlog import indexer
from chatlog.db import StoreError, connect, read_only_uri
from chatlog.recorder import _NEXT_ID
from chatlog.words import plural

_SERVER_KEY = ("pid", "hostname", "host", "port", "started_at")
_FLOORED = ("sessions", "messages")  # the tables whose ids are never reused (schema m013)


def _person(p) -> tuple:
    """Who a participant row is: in a linked room, the server they were on and their key
    there (every linked server's archive has a row for them); else their address and when they
    joined."""
    if _get(p, "origin_server") is not None:
        return ("origin", p["origin_server"], _get(p, "origin_key"))
    return (_get(p, "host"), _get(p, "port"), _get(p, "joined_at"))


def _takes_over(known: dict, p) -> bool:
    """Whether participant row `p` brings `known` (the same person, merged before) up to date.
    Their own server's row (the one with their address) says it all; another server's view
    of them only says they left, if `known` is a view too that has them still there."""
    if _get(p, "origin_server") is None or _get(p, "host") is not None:
        return True
    return known.get("host") is None and known.get("left_at") is None and _get(p, "left_at") is not None


def _get(row: sqlite3.Row, key: str):
    """A column an older archive may not have yet: None there."""
    return row[key] if key in row.keys() else None


def _columns(conn: sqlite3.Connection, table: str, schema: str = "main") -> list[str]:
    return [r[1] for r in conn.execute(f'PRAGMA "{schema}".table_info("{table}")')]


class Merge:
    def __init__(self, out: Path):
        self.db = connect(out, create=True)
        self.conn = self.db.conn
        self.cols = {t: _columns(self.conn, t) for t in ("servers", "sessions", "messages", "participants")}
        self.counts = {"sessions": 0, "messages": 0}

    def index(self) -> None:
        """What the merge added, indexed for search in the merge's own transaction (all or
        nothing, and nothing left to do once it has committed)."""
        upto = self.conn.execute("SELECT upto FROM fts_progress").fetchone()[0]
        self.conn.execute("INSERT INTO messages_fts (rowid, text) SELECT id, text FROM messages "
                          "WHERE id > ? AND sender != 'event'", (upto,))
        self.conn.execute("UPDATE fts_progress SET upto = max(upto, (SELECT coalesce(max(id), 0) FROM messages))")

    def check_output(self, out: Path) -> None:
        """An output holding sessions no merge put there (a server's archive, or a copy of a
        source) is refused: its own sessions are not known by their origin, so merging their
        archive into it would give each twice."""
        (n,) = self.conn.execute(
            "SELECT count(*) FROM sessions WHERE id NOT IN (SELECT merged_session FROM merged)").fetchone()
        if n:
            raise StoreError(f"{out} holds {plural(n, 'session')} no merge put there (a server's archive, or a copy of "
                             "one): merge into a new file, or into one chatlog merge made; "
                             f"{out} is left as it was")

    def close(self) -> None:
        indexer.catch_up(self.conn, 30.0)  # (nothing, unless someone wrote to it meanwhile)
        self.db.close()

    def add(self, path: Path) -> None:
        """Take one source, inside the transaction merge() holds. Read as it is (an archive from
        before linked rooms too: it has none), never written."""
        s = _open_source(path)
        try:
            s.row_factory = sqlite3.Row
            tables = {r[0] for r in s.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            row = s.execute("SELECT uid FROM node WHERE id = 1").fetchone() if "node" in tables else None
            self._add(s, *self._known_as(s, row[0] if row else None, Path(path).resolve()))
        finally:
            s.close()

    def _known_as(self, s: sqlite3.Connection, uid: str | None, path: Path) -> tuple[str, dict]:
        """The identity a source's sessions are noted under, and what it was taken as before it
        had one. A source with its own identity (`node`, schema m014) is known by it; one from
        before is taken under its file's path (`file:PATH`; another archive already merged from
        that path: `file:PATH#2`). An archive from before was taken under its path then, so it is
        known by its sessions too, as the output recorded them (each one's id, start to the
        microsecond and client address): upgraded in place by a server, moved or renamed, its
        sessions are the ones taken before; another archive put at its path is not taken for it.
        Returns (identity, {session id: (the identity it was taken under, the session taken)})."""
        if uid is not None and self.conn.execute("SELECT 1 FROM merged WHERE source = ? LIMIT 1", (uid,)).fetchone():
            return uid, {}
        before: dict[int, tuple[str, int]] = {}
        old = self.conn.execute(
            "SELECT m.source, m.session_id, m.merged_session, se.started_at, se.client_host, se.client_port "
            "FROM merged m JOIN sessions se ON se.id = m.merged_session "
            "WHERE m.source LIKE 'file:%' AND m.session_id != 0").fetchall()
        mine = {}
        if old:  # (an archive made by hand may lack the addresses: NULL, as the output has them)
            have = set(_columns(s, "sessions"))
            cols = ", ".join(c if c in have else "NULL" for c in ("started_at", "client_host", "client_port"))
            mine = {r[0]: tuple(r[1:]) for r in s.execute(f"SELECT id, {cols} FROM sessions")}
        other: set[str] = set()  # the paths another archive was taken from: a session of it is not this one's
        for source, sid, into, *session in old:
            if mine.get(sid) == tuple(session):
                before.setdefault(sid, (source, into))
            elif sid in mine:
                other.add(source)
        if uid is None:
            uid, n = f"file:{path}", 1
            while uid in other:
                n += 1
                uid = f"file:{path}#{n}"
        return uid, before

    # -- one source ---------------------------------------------------------------------------------

    def _add(self, s: sqlite3.Connection, uid: str, before: dict | None = None) -> None:
        linked = set()
        if "stream_seq" in _columns(s, "messages"):
            linked = {r[0] for r in s.execute(
                "SELECT DISTINCT se.room FROM sessions se JOIN messages m ON m.session_id = se.id "
                "WHERE se.kind = 'room' AND se.room IS NOT NULL AND m.stream_seq IS NOT NULL AND se.deleting = 0")}
        if _columns(s, "room_links"):  # (a room linked, though nothing came through its stream yet)
            linked |= {r[0] for r in s.execute("SELECT room FROM room_links")}
        cols = _columns(s, "sessions")
        live = "WHERE deleting = 0 " if "deleting" in cols else ""
        also = self._identities(s)
        grown: set[str] = set()  # the linked rooms that took lines: put in order again
        removed = set()  # the sessions with lines removed (`forget`, `rm --message`)
        if "removed_at" in _columns(s, "messages"):
            removed = {r[0] for r in s.execute("SELECT DISTINCT session_id FROM messages WHERE removed_at IS NOT NULL")}
        for se in s.execute(f"SELECT * FROM sessions {live}ORDER BY id").fetchall():
            if linked and se["room"] in linked and se["kind"] == "room":
                if self._room_session(s, uid, se, se["id"] in removed):
                    grown.add(se["room"])
                continue
            ids = [(uid, se["id"]), *also.get(se["id"], ())]
            taken = next((t for t in (self._taken(*i) for i in ids) if t is not None), None)
            if taken is None and before and se["id"] in before:  # (taken before under the file's path)
                source, taken = before[se["id"]]
                self.conn.execute(  # (and as far as its lines were taken then)
                    "INSERT OR IGNORE INTO merged (source, session_id, merged_session, upto) "
                    "SELECT ?, session_id, merged_session, upto FROM merged WHERE source = ? AND session_id = ?",
                    (uid, source, se["id"]))
            if taken is None:
                self._session(s, uid, se, ids)
                continue
            self._note(ids, taken)
            if self._going_on(taken) or (se["id"] in removed and self._removed_since(s, uid, se["id"])):
                self._refresh(s, uid, se, taken)
        for room in grown:
            self._resequence(room)

    @staticmethod
    def _identities(s: sqlite3.Connection) -> dict[int, list[tuple[str, int]]]:
        """A merged archive's sessions, each under the archives and ids it was taken from: the
        same session met again, from one of those archives or another merge of them, is taken
        once."""
        out: dict[int, list[tuple[str, int]]] = {}
        if {"source", "session_id", "merged_session"} <= set(_columns(s, "merged")):
            for source, sid, into in s.execute("SELECT source, session_id, merged_session FROM merged WHERE session_id != 0"):
                out.setdefault(into, []).append((source, sid))
        return out

    def _note(self, ids: list[tuple[str, int]], into: int) -> None:
        self.conn.executemany("INSERT OR IGNORE INTO merged (source, session_id, merged_session) VALUES (?, ?, ?)",
                              [(source, sid, into) for source, sid in ids])

    def _going_on(self, into: int) -> bool:
        """Whether a session taken before was in progress then (a nightly merge of a live
        server's archive): its later lines, people and end may have come since."""
        row = self.conn.execute("SELECT ended_at FROM sessions WHERE id = ?", (into,)).fetchone()
        return row is not None and row[0] is None

    def _removed_since(self, s: sqlite3.Connection, uid: str, sid: int) -> bool:
        """Whether a line the source has removed (`forget`, `rm --message`) still stands here."""
        has_origin = "origin_id" in _columns(s, "messages")
        for m in s.execute(f"SELECT id{', origin_server, origin_id' if has_origin else ''} FROM messages "
                           "WHERE session_id = ? AND removed_at IS NOT NULL", (sid,)):
            origin, oid = (m[1], m[2]) if has_origin else (None, None)
            if self.conn.execute("SELECT 1 FROM messages WHERE origin_server = ? AND origin_id = ? AND removed_at IS NULL",
                                 (origin or uid, oid or f"local.{m[0]}")).fetchone():
                return True
        return False

    def _refresh(self, s: sqlite3.Connection, uid: str, se: sqlite3.Row, into: int) -> None:
        """A session taken before, again: its later lines and people, its end, and the lines
        removed since (each line is taken once, by its origin; a removed one stays removed).
        The lines up to `merged.upto` were taken: of those, only the removed are read."""
        pids = self._participants(s, se["id"], into, again=True)
        row = self.conn.execute("SELECT upto FROM merged WHERE source = ? AND session_id = ?", (uid, se["id"])).fetchone()
        upto = row[0] if row else 0
        if upto and "removed_at" in _columns(s, "messages"):
            last = self._lines(s, uid, se["id"], into, pids, "id > ? OR removed_at IS NOT NULL", (upto,))
        else:
            last = self._lines(s, uid, se["id"], into, pids, "id > ?", (upto,))
        if last > upto:
            self.conn.execute("UPDATE merged SET upto = ? WHERE source = ? AND session_id = ?", (last, uid, se["id"]))
        # Only ever forward: an older copy (a merged archive made while the chat went on, met
        # after the archive it came from) never puts an ended chat back in progress.
        if _get(se, "ended_at") is None or not self._going_on(into):
            return
        cols = [c for c in ("served_at", "ended_at", "end_reason", "handle", "client_messages", "server_messages")
                if c in self.cols["sessions"] and c in se.keys()]
        self.conn.execute(f'UPDATE sessions SET {", ".join(f"{c} = ?" for c in cols)} WHERE id = ?',
                          [*(se[c] for c in cols), into])

    def _taken(self, source: str, sid: int) -> int | None:
        row = self.conn.execute("SELECT merged_session FROM merged WHERE source = ? AND session_id = ?",
                                (source, sid)).fetchone()
        return row[0] if row else None

    def _server(self, s: sqlite3.Connection, server_id: int | None) -> int | None:
        if server_id is None:
            return None
        row = s.execute("SELECT * FROM servers WHERE id = ?", (server_id,)).fetchone()
        if row is None:
            return None
        key = [row[k] for k in _SERVER_KEY]
        have = self.conn.execute(
            "SELECT id FROM servers WHERE pid IS ? AND hostname IS ? AND host IS ? AND port IS ? AND started_at IS ?",
            key).fetchone()
        if have:
            return have[0]
        cols = [c for c in self.cols["servers"] if c != "id" and c in row.keys()]
        return self._insert("servers", cols, [row[c] for c in cols])

    def _insert(self, table: str, cols: list[str], values: list) -> int:
        names = ", ".join(f'"{c}"' for c in cols)
        marks = ", ".join("?" for _ in cols)
        if table in _FLOORED:  # (an id a deleted row had is never given again: schema m013)
            names, marks = f'"id", {names}', f"{_NEXT_ID.format(t=table)}, {marks}"
        return self.conn.execute(f'INSERT INTO "{table}" ({names}) VALUES ({marks})', values).lastrowid

    def _participants(self, s: sqlite3.Connection, sid: int, into: int, again: bool = False) -> dict[int, int]:
        """A session's participants copied into session `into`, their ids mapped. `again`: into
        a session that may hold some already (taken before, or a merged archive's room met
        beside the archives it came from): a participant is known there by its address and
        when it joined, and only brought up to date (a handle taken, its leaving)."""
        out: dict[int, int] = {}
        if not _columns(s, "participants"):
            return out
        have: dict = {}
        if again:
            cur = self.conn.execute("SELECT * FROM participants WHERE session_id = ?", (into,))
            names = [d[0] for d in cur.description]
            for values in cur:
                row = dict(zip(names, values, strict=True))
                have[_person(row)] = row
        for p in s.execute("SELECT * FROM participants WHERE session_id = ? ORDER BY id", (sid,)).fetchall():
            cols = [c for c in self.cols["participants"] if c not in ("id", "session_id") and c in p.keys()]
            known = have.get(_person(p)) if again else None
            if known is None:
                out[p["id"]] = self._insert("participants", ["session_id", *cols], [into, *[p[c] for c in cols]])
                if again and _get(p, "origin_server") is not None:
                    have[_person(p)] = {"id": out[p["id"]], **{c: p[c] for c in cols}}
                continue
            out[p["id"]] = known["id"]
            if not _takes_over(known, p):
                continue
            if any(known[c] != p[c] for c in cols):  # (written only when it changed)
                self.conn.execute(f'UPDATE participants SET {", ".join(f"{c} = ?" for c in cols)} WHERE id = ?',
                                  [*(p[c] for c in cols), known["id"]])
        return out

    def _session(self, s: sqlite3.Connection, uid: str, se: sqlite3.Row, ids: list[tuple[str, int]]) -> None:
        """A session of one server (a 1:1 chat, a room never linked): copied whole."""
        cols = [c for c in self.cols["sessions"] if c not in ("id", "server_id") and c in se.keys()]
        new = self._insert("sessions", ["server_id", *cols], [self._server(s, _get(se, "server_id")), *[se[c] for c in cols]])
        self._note(ids, new)
        pids = self._participants(s, se["id"], new)
        last = self._lines(s, uid, se["id"], new, pids)
        self.conn.execute("UPDATE merged SET upto = ? WHERE source = ? AND session_id = ?", (last, uid, se["id"]))
        self.counts["sessions"] += 1

    def _lines(self, s: sqlite3.Connection, uid: str, sid: int, into: int, pids: dict, where: str = "1",
               args: tuple = ()) -> int:
        """A session's lines (those `where` picks) into session `into`, at their own places, as
        they are read (not all held at once); returns the highest id read (0: none)."""
        last = 0
        for m in s.execute(f"SELECT * FROM messages WHERE session_id = ? AND ({where}) ORDER BY seq", (sid, *args)):
            last = max(last, m["id"])
            self._message(m, into, uid, pids.get(_get(m, "participant_id")), seq=m["seq"])
        return last

    def _message(self, m: sqlite3.Row, session: int, uid: str, pid: int | None, seq: int) -> bool:
        cols = [c for c in self.cols["messages"]
                if c not in ("id", "session_id", "participant_id", "seq", "origin_server", "origin_id") and c in m.keys()]
        origin = _get(m, "origin_server") or uid
        oid = _get(m, "origin_id") or f"local.{m['id']}"
        names = ", ".join(f'"{c}"' for c in ["id", "session_id", "participant_id", "seq", "origin_server", "origin_id", *cols])
        marks = ", ".join([_NEXT_ID.format(t="messages"), *("?" for _ in range(5 + len(cols)))])
        cur = self.conn.execute(
            # Only a line already taken (by its origin) is skipped: any other conflict is an
            # archive that cannot be merged as it is, said, never a line quietly left out.
            f'INSERT INTO messages ({names}) VALUES ({marks}) '
            'ON CONFLICT ("origin_server", "origin_id") WHERE "origin_server" IS NOT NULL DO NOTHING',
            [session, pid, seq, origin, oid, *[m[c] for c in cols]])
        if cur.rowcount:
            self.counts["messages"] += 1
        elif _get(m, "removed_at") is not None:
            # Taken already from an archive where it was not removed: removed on any server
            # (`forget`, `rm --message`), it stays removed here, whatever was merged first.
            self.conn.execute(
                "UPDATE messages SET text = ?, raw = NULL, note = NULL, removed_at = ? "
                "WHERE origin_server = ? AND origin_id = ? AND removed_at IS NULL",
                (m["text"], m["removed_at"], origin, oid))
        return bool(cur.rowcount)

    def _room_session(self, s: sqlite3.Connection, uid: str, se: sqlite3.Row, removed: bool) -> bool:
        """One run of a linked room on one server: its lines go into the room's one session.
        Only the lines after those taken before are read (`merged.upto`), and the ones removed
        since (`removed`: the run has removed lines). Returns whether lines were added."""
        room = se["room"]
        key = f"room:{room}"
        merged = self._taken(key, 0)
        if merged is not None and self.conn.execute("SELECT 1 FROM sessions WHERE id = ?", (merged,)).fetchone() is None:
            return False  # deleted from this archive (`rm`): it stays deleted, as a 1:1 chat does
        if merged is None:
            merged = self._insert(
                "sessions", ["started_at", "served_at", "ended_at", "end_reason", "kind", "room", "server_host",
                             "server_port"],
                [se["started_at"], se["started_at"], se["ended_at"], se["end_reason"], "room", room, se["server_host"],
                 se["server_port"]])
            self.conn.execute("INSERT INTO merged (source, session_id, merged_session) VALUES (?, 0, ?)", (key, merged))
            self.counts["sessions"] += 1
        else:
            self.conn.execute(
                "UPDATE sessions SET started_at = min(started_at, ?1), served_at = min(served_at, ?1), "
                # (the latest end of its runs: a run in progress then, ended since, ends it too)
                "ended_at = CASE WHEN ?2 IS NULL THEN ended_at WHEN ended_at IS NULL THEN ?2 ELSE max(ended_at, ?2) END, "
                "end_reason = CASE WHEN ended_at IS NULL THEN ?3 ELSE end_reason END "
                # (written only when it changes: merging again changes nothing)
                "WHERE id = ?4 AND (started_at > ?1 OR served_at > ?1 OR (?2 IS NOT NULL AND "
                "(ended_at IS NULL OR ended_at < ?2)))",
                (se["started_at"], se["ended_at"], _get(se, "end_reason"), merged))
        row = self.conn.execute("SELECT upto, merged_session FROM merged WHERE source = ? AND session_id = ?",
                                (uid, se["id"])).fetchone()
        folded = False
        if row is None:
            self.conn.execute("INSERT INTO merged (source, session_id, merged_session) VALUES (?, ?, ?)",
                              (uid, se["id"], merged))
        elif row[1] != merged:  # taken as a session of its own before its room was linked
            self._fold(row[1], merged)
            folded = True
        upto = row[0] if row else 0
        # (again: a run merged while it went on has had people join since, and its people leave)
        pids = self._participants(s, se["id"], merged, again=True)
        top = self.conn.execute("SELECT coalesce(max(seq), 0) FROM messages WHERE session_id = ?", (merged,)).fetchone()[0]
        added, last = False, upto
        for m in s.execute("SELECT * FROM messages WHERE session_id = ? AND id > ? ORDER BY seq", (se["id"], upto)):
            last = max(last, m["id"])
            if self._message(m, merged, uid, pids.get(_get(m, "participant_id")), seq=top + 1):
                top += 1
                added = True
        if removed and upto:  # (lines taken before, removed since: removed here too)
            for m in s.execute("SELECT * FROM messages WHERE session_id = ? AND id <= ? AND removed_at IS NOT NULL",
                               (se["id"], upto)):
                self._message(m, merged, uid, pids.get(_get(m, "participant_id")), seq=top + 1)
        if last > upto:
            self.conn.execute("UPDATE merged SET upto = ? WHERE source = ? AND session_id = ?", (last, uid, se["id"]))
        return added or folded

    def _fold(self, old: int, room: int) -> None:
        """A room's run merged as a session of its own (its room not linked yet then) goes into
        the room's one session, as a merge made afresh puts it: its lines after the room's (put
        in stream order next), its people with them; the session it was is no more."""
        top = self.conn.execute("SELECT coalesce(max(seq), 0) FROM messages WHERE session_id = ?", (room,)).fetchone()[0]
        ids = [r[0] for r in self.conn.execute("SELECT id FROM messages WHERE session_id = ? ORDER BY seq", (old,))]
        self.conn.executemany("UPDATE messages SET session_id = ?, seq = ? WHERE id = ?",
                              [(room, top + k, mid) for k, mid in enumerate(ids, 1)])
        self.conn.execute("UPDATE participants SET session_id = ? WHERE session_id = ?", (room, old))
        self.conn.execute("UPDATE merged SET merged_session = ? WHERE merged_session = ?", (room, old))
        self.conn.execute("DELETE FROM sessions WHERE id = ?", (old,))

    def _resequence(self, room: str) -> None:
        """The room's lines in stream order (the lines of one stream message in their order);
        a line kept on one server alone goes after the last line of the stream said before it."""
        merged = self._taken(f"room:{room}", 0)
        rows = self.conn.execute("SELECT id, stream_seq, origin_id, at FROM messages WHERE session_id = ?",
                                 (merged,)).fetchall()

        def place(oid: str) -> tuple[int, ...]:
            # run.ref.i: one stream message may carry several events (refs), each several lines
            return tuple(int(p) if p.isdigit() else 0 for p in oid.split(".")[1:])

        streamed = sorted((r for r in rows if r[1] is not None), key=lambda r: (r[1], place(r[2])))
        alone = sorted((r for r in rows if r[1] is None), key=lambda r: (r[3], r[0]))
        order: list[int] = []
        i = 0
        for r in streamed:
            while i < len(alone) and alone[i][3] < r[3]:
                order.append(alone[i][0])
                i += 1
            order.append(r[0])
        order += [r[0] for r in alone[i:]]
        # Two steps, as (session, seq) is unique: out of the way, then in order.
        self.conn.execute("UPDATE messages SET seq = -seq WHERE session_id = ?", (merged,))
        self.conn.executemany("UPDATE messages SET seq = ? WHERE id = ?", [(n, mid) for n, mid in enumerate(order, 1)])
        from chatlog.schema import message_count

        self.conn.execute(
            f"UPDATE sessions SET client_messages = {message_count('client')}, "
            f"server_messages = {message_count('server')} WHERE id = ?", (merged,))


# What a source must have for a merge to read it (older archives lack the rest: read as None).
_NEEDED = {
    "sessions": {"id", "started_at"},
    "messages": {"id", "session_id", "seq", "at", "sender", "handle", "text"},
}


def _open_source(path: Path) -> sqlite3.Connection:
    """A source, read as the read commands read an archive (on read-only media too)."""
    try:
        return sqlite3.connect(read_only_uri(Path(path).resolve()), uri=True)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {path}: {exc}") from None


def check_source(path: Path) -> None:
    """One line if `path` is not an archive a merge can read (before anything is written)."""
    s = _open_source(path)
    try:
        tables = {r[0] for r in s.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for table, needed in _NEEDED.items():
            if table not in tables:
                raise StoreError(f"{path} is not a chatlog archive (it has no {table} table)")
            if missing := needed - set(_columns(s, table)):
                raise StoreError(f"{path} is not a chatlog archive ({table} has no {', '.join(sorted(missing))})")
    except sqlite3.Error as exc:
        if "not a database" in str(exc):
            raise StoreError(f"{path} is not a chatlog archive (not an SQLite database)") from None
        raise StoreError(f"cannot read {path}: {exc}") from None
    finally:
        s.close()


def merge(sources: list[Path], out: Path, on_commit=lambda: None) -> dict[str, int]:
    """Merge `sources` into `out` (created if needed), all or nothing; returns what was added.
    Every source is checked before anything is written, and one transaction takes them all:
    a source that fails halfway leaves `out` as it was (a new one is not left behind)."""
    for src in sources:
        if Path(src).resolve() == Path(out).resolve():
            raise StoreError(f"{out} is both a source and the output")
    for src in sources:
        check_source(Path(src))
    new = not Path(out).exists()
    left = f"{out} was not made" if new else f"{out} is left as it was"
    m = None
    failed = True
    try:
        m = Merge(out)  # (inside: stopped while a new output is made, it is not left behind)
        try:
            m.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:  # (another process writing it, past the busy timeout)
            raise StoreError(f"cannot merge into {out}: {exc}; {left}") from None
        committing = False
        try:
            if not new:
                m.check_output(out)
            for src in sources:
                try:
                    m.add(Path(src))
                except sqlite3.Error as exc:
                    raise StoreError(f"cannot merge {src}: {exc}; {left}") from None
            try:
                m.index()
                committing = True
                m.conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot merge into {out}: {exc}; {left}") from None
        except BaseException as exc:
            if m.conn.in_transaction:
                m.conn.execute("ROLLBACK")
                raise
            # Not in a transaction any more: SQLite rolled it back itself (a full disk, an I/O
            # error: the error says so), or a signal (Ctrl-C, SIGTERM) came as COMMIT returned,
            # which finds the merge done, and it is said as done.
            if isinstance(exc, Exception) or not committing:
                raise
        on_commit()  # (from here on the merge is done: the caller stops taking signals as stops)
        failed = False
    finally:
        if failed:
            if m is not None:
                m.db.close()
            if new:
                for suffix in ("", "-wal", "-shm", "-lock", "-journal"):
                    Path(f"{out}{suffix}").unlink(missing_ok=True)
        else:
            m.close()
    return m.counts
