"""The small records the archive returns, and the time helpers every module shares.

Times are stored as UTC ISO 8601 strings with microseconds (`2026-11-24T10:00:00.000000+00:00`),
so they sort and compare as text. Nothing here touches the database.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone

HL_START, HL_END = "\ue000", "\ue001"  # private-use marks around search matches


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


_second = [None, ""]  # the last whole second formatted, and its text up to the seconds


def iso(ts: float) -> str:
    """Epoch seconds as the stored time format, `2026-12-04T18:05:33.123456+00:00`: exactly
    what datetime's isoformat gives, with the text of the second kept from the last call (a
    chat commits many lines a second; this is on the path of every one)."""
    if ts < 0:
        return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="microseconds")
    frac, whole = math.modf(ts)
    us = round(frac * 1e6)  # half to even, as datetime rounds
    sec = int(whole)
    if us >= 1_000_000:
        sec += 1
        us -= 1_000_000
    if sec != _second[0]:
        _second[1] = datetime.fromtimestamp(sec, timezone.utc).isoformat(timespec="seconds")[:19]
        _second[0] = sec
    return f"{_second[1]}.{us:06d}+00:00"


def parse_iso(value: str) -> datetime:
    return datetime.fromisoformat(value)


@dataclass(slots=True)
class Session:
    id: int
    started_at: str
    served_at: str | None
    ended_at: str | None
    client_host: str | None
    client_port: int | None
    server_host: str | None
    server_port: int | None
    handle: str | None
    end_reason: str | None
    client_messages: int
    server_messages: int
    kind: str = "chat"  # or "room": many participants in one session
    participants: int = 0  # in a room, how many have taken part (0 for a 1:1 chat)
    # How the client was connected (1:1; a room's participants each have their own), and
    # whether its handle was verified (a room: whether any participant's was).
    transport: str = "tcp"
    tls_version: str | None = None
    tls_cipher: str | None = None
    cert_fingerprint: str | None = None
    verified: bool = False

    @property
    def messages(self) -> int:
        return self.client_messages + self.server_messages

    @property
    def state(self) -> str:
        """How it ended (the end reason), or `in progress` / `waiting`."""
        if self.end_reason is None:
            return "in progress" if self.served_at else "waiting"
        return self.end_reason


@dataclass(slots=True)
class Msg:
    id: int
    session_id: int
    seq: int
    at: str
    sender: str
    handle: str | None
    text: str
    raw: bytes | None
    note: str | None
    verified: int = 0  # said under a handle bound to its client's certificate (1), or not (0)
    removed_at: str | None = None  # a tombstone: when the message was removed (its text is '')



def _text(value, default: str | None = None) -> str | None:
    if value is None:
        return default
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def _int(value) -> int:
    if type(value) is int:
        return value
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return 0


def clean_msg(row: tuple) -> tuple:
    """A messages row (in `Msg` field order) read as stored, each value made the type its column
    promises, as chatlog.archive's SQL does for every other reader: for the export writers that
    read rows untyped (the fast way) and take this way for a row of another type (a crafted file)."""
    id_, session_id, seq, at, sender, handle, text, raw, note, verified, removed_at = row
    if raw is not None and not isinstance(raw, bytes):
        raw = str(raw).encode("utf-8", "surrogatepass")
    return (id_, _int(session_id), _int(seq), _text(at, ""), _text(sender, ""), _text(handle), _text(text, ""),
            raw, _text(note), 1 if verified == 1 else 0, _text(removed_at))
