"""The one read model: a session as the events a person saw, in order.

`show`, `tail`, `replay` and the text-like exports (txt, md, html, cast) all read a session
through `events()` (or, live, through a `Transcript` fed message by message), so they agree on
what happened and when: the client connected, (if it was queued) how long it waited and when its
chat began, each message with its note, and how it ended. Times never go backwards: a message
sent while the client waited is shown before its chat began.

Text in an Event is raw: messages are untrusted and each output makes them safe its own way
(`sanitize`); the words of the other events are ours, but may carry client data (a handle).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC
from typing import TYPE_CHECKING

from chatlog.words import LEFT as LEFT_WORDS
from chatlog.words import connected_text, duration, ended_text, plural

from chatlog.records import Msg, Session, parse_iso

if TYPE_CHECKING:
    from datetime import datetime

# Event kinds
CONNECTED = "connected"
BEGAN = "began"  # a queued client's chat began
MESSAGE = "message"
NOTE = "note"  # the server's note on the message before it (a cut line, say)
JOINED = "joined"  # rooms
LEFT = "left"
ENDED = "ended"


@dataclass(slots=True)  # not frozen: a frozen dataclass is 4x slower to make, once a message
class Event:
    kind: str
    at: str  # ISO 8601; never earlier than the event before it
    text: str
    sender: str | None = None  # a message's: client or server
    handle: str | None = None
    verified: int = 0  # a message said under a handle bound to its client's certificate
    id: int | None = None  # the stored message it comes from (a line's anchor in `chatlog web`)

    @property
    def is_message(self) -> bool:
        return self.kind == MESSAGE


def waited_text(seconds: float) -> str:
    return f"chat began after {duration(seconds)} waiting"


class Transcript:
    """Builds a session's events incrementally: `start()`, `message(m)` for each message in
    order, `refresh(session)` when the stored session changes (a live one), then `end()`."""

    def __init__(self, session: Session):
        self.session = session
        self.counts = {"client": 0, "server": 0}
        self.last = session.started_at
        self._began = not self._queued(session)

    @classmethod
    def resumed(cls, session: Session, last: str | None, counts: dict[str, int], began: bool) -> Transcript:
        """A transcript picked up after lines already shown (a page following a session live):
        the time of the last line shown, how many each sender had said, and whether the chat
        had begun by then."""
        t = cls(session)
        if last is not None and looks_like_time(last) and last > t.last:
            t.last = last
        for sender in t.counts:
            t.counts[sender] += counts.get(sender, 0)
        t._began = t._began or began
        return t

    @property
    def began(self) -> bool:
        return self._began

    @staticmethod
    def _queued(s: Session) -> bool:
        return s.served_at is not None and s.served_at != s.started_at

    def _at(self, when: str | None) -> str:
        # Stored times are UTC ISO strings, which compare as times; anything else (a hand-edited
        # file) is taken as "no later than the line before".
        if when is None or when < self.last or not looks_like_time(when):
            return self.last
        self.last = when
        return when

    def start(self) -> Iterator[Event]:
        s = self.session
        if s.kind == "room":
            text = f"room opened on port {s.server_port}"
        else:
            text = connected_text(s.client_host, s.client_port)
        yield Event(CONNECTED, self._at(s.started_at), text)

    def _began_event(self) -> Event:
        s = self.session
        self._began = True
        wait = seconds_between(s.started_at, s.served_at)
        text = waited_text(wait) if wait is not None else "chat began"
        return Event(BEGAN, self._at(s.served_at), text)

    def message(self, m: Msg) -> Iterator[Event]:
        if not self._began and self.session.served_at is not None and m.at >= self.session.served_at:
            yield self._began_event()
        if m.sender in self.counts:
            self.counts[m.sender] += 1
        at = self._at(m.at)
        if m.sender == "event":  # recorded in place with the messages
            yield event_of(m, at)
            return
        if m.removed_at is not None:  # a tombstone: never the old text, nor its note
            yield Event(NOTE, at, removed_text(m), None, m.handle, 0, m.id)
            return
        yield Event(MESSAGE, at, m.text, "server" if m.sender == "server" else "client", m.handle, m.verified, m.id)
        if m.note:
            yield Event(NOTE, at, f"({m.note})")

    def refresh(self, session: Session) -> Iterator[Event]:
        """The stored session changed (served, ended): what that shows so far."""
        self.session = session
        if not self._began and session.served_at is not None:
            if self._queued(session):
                yield self._began_event()
            else:
                self._began = True

    def end(self) -> Iterator[Event]:
        s = self.session
        if not self._began and s.served_at is not None:
            yield self._began_event()
        if s.end_reason:
            if s.kind == "room":
                said = self.counts["client"] + self.counts["server"]
                line = f"room closed: {s.end_reason} (session {s.id}, {plural(said, 'message')})"
            else:
                line = ended_text(s.end_reason, s.id, self.counts["client"], self.counts["server"])
            yield Event(ENDED, self._at(s.ended_at), line)


def event_of(m: Msg, at: str) -> Event:
    """A stored event as a person reads it. The server records a join or a leave as the bare
    word (`joined`, `left`, with the reason in the note) beside the participant's handle, and
    padding that trailed a line as `padding` with a note that counts it."""
    who = m.handle if m.handle is not None else "someone"
    if m.text == "joined":
        return Event(JOINED, at, f"{who} joined", None, m.handle, 0, m.id)
    if m.text == "left":
        why = ""
        if m.note:
            why = f" ({LEFT_WORDS.get(m.note, m.note)})"
        return Event(LEFT, at, f"{who} left{why}", None, m.handle, 0, m.id)
    return Event(NOTE, at, f"({m.note or m.text})", None, m.handle, 0, m.id)


def removed_text(m: Msg) -> str:
    """A tombstone as a person reads it: `(message removed 2026-12-04 20:31:02 UTC; it was amy's)`.
    Not a chat line (it has no `amy>`), so nobody can type one that looks the same."""
    t = parse_time(m.removed_at)
    when = t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if t is not None else m.removed_at
    whose = f"; it was {m.handle}'s" if m.handle else ""
    return f"(message removed {when}{whose})"


def events(session: Session, messages: Iterable[Msg]) -> Iterator[Event]:
    """A whole session's events, in order, streamed from its messages."""
    t = Transcript(session)
    yield from t.start()
    counts = t.counts
    slow = t.message
    for m in messages:
        # The common message (chat begun, no note, a well-formed time not before the last) is
        # made here; anything else takes Transcript.message. The same events either way.
        at = m.at
        if t._began and not m.note and m.removed_at is None and m.sender in counts and at >= t.last and looks_like_time(at):
            counts[m.sender] += 1
            t.last = at
            yield Event(MESSAGE, at, m.text, m.sender, m.handle, m.verified, m.id)
        else:
            yield from slow(m)
    yield from t.end()


# -- times as a person reads them ----------------------------------------------------------------


def looks_like_time(value: str) -> bool:
    return len(value) >= 19 and value[:4].isdigit()


def parse_time(value: str | None) -> datetime | None:
    """A stored time, or None for one that is missing or unreadable (a hand-edited file): a
    reader shows what it can rather than failing."""
    if not value:
        return None
    try:
        t = parse_iso(value)
    except (ValueError, TypeError):
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def seconds_between(start: str | None, end: str | None) -> float | None:
    a, b = parse_time(start), parse_time(end)
    return max(0.0, (b - a).total_seconds()) if a is not None and b is not None else None


def clock(when: str, utc: bool = False) -> str:
    """`20:09:14` in local time (or UTC); `??:??:??` for an unreadable time."""
    t = parse_time(when)
    if t is None:
        return "??:??:??"
    return (t.astimezone(UTC) if utc else t.astimezone()).strftime("%H:%M:%S")


def stamp(when: str, utc: bool = False) -> str:
    """The irssi-like prefix of a line with --timestamps: `[20:09:14] `."""
    return f"[{clock(when, utc)}] "

