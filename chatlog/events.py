"""What a conversation policy is fed (events) and what it answers (decisions).

The server loop turns socket, console, timer and signal activity into events, hands each one to
the policy (`turns.Turns` for 1:1 chats, `room.Room` for many), and carries out the decisions it
gets back. A policy never touches a socket, the store or the console, and never reads a clock:
time comes in on the events. The loop never decides.

Connections are named by small integers the loop assigns (`conn`). Every event carries `at`, the
wall-clock time (seconds since the epoch) the loop saw it.

The loop carries out the decisions of one pass in two phases: first every store write (`Open`,
`Serve`, `Handle`, `Commit`, `Join`, and the recording part of `End` and `Refuse`), in one
transaction; then the console and socket ones in order. So nothing is shown or sent that is not
committed, and a store that fails leaves nothing half-told.

Events and decisions are plain slots dataclasses, not frozen ones: a room builds three per
relayed line, and a frozen dataclass takes four times as long to build (about 0.9 us against
0.2 us for a seven-field one on Python 3.11). Treat them as values all the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from chatlog.protocol import Message
from chatlog.words import NOTICES, timeout_notice  # noqa: F401 (server.py still imports them from here)

# -- events: what happened --------------------------------------------------------------------


@dataclass(slots=True)
class Connected:
    conn: int
    host: str
    port: int
    at: float


@dataclass(slots=True)
class Received:
    """One framed, parsed line from a client."""

    conn: int
    msg: Message
    at: float


@dataclass(slots=True)
class Disconnected:
    """The peer closed (or reset) its connection; what it sent before is already Received."""

    conn: int
    at: float


@dataclass(slots=True)
class Stalled:
    """The client stopped reading: its unsent output passed the loop's bound."""

    conn: int
    at: float


@dataclass(slots=True)
class OperatorLine:
    text: str
    at: float


@dataclass(slots=True)
class OperatorEnd:
    """The operator's input ended (Ctrl-D, or the end of a piped script)."""

    at: float


@dataclass(slots=True)
class Tick:
    """Time passed: the policy's deadline() was reached."""

    at: float


@dataclass(slots=True)
class Stop:
    """A signal (INT, TERM, HUP) asks the server to stop; `why` is its name."""

    why: str
    at: float


# -- decisions: what to do --------------------------------------------------------------------


@dataclass(slots=True)
class Open:
    """Record a new session for a connection (served at once, or waiting in the queue)."""

    conn: int
    host: str
    port: int
    at: float
    served: bool


@dataclass(slots=True)
class Serve:
    """Record that a waiting connection's chat has begun."""

    conn: int
    at: float


@dataclass(slots=True)
class Handle:
    """Record the handle a connection first used."""

    conn: int
    handle: str


@dataclass(slots=True)
class Commit:
    """Record one message. sender is 'client' or 'server' (or, in a room, 'event': a join or
    leave, text 'joined' or 'left', the end reason in `note`); conn is whose session it belongs
    to. In a room every line belongs to the room's one session: conn is the participant who said
    it, None for the operator."""

    conn: int | None
    sender: str
    handle: str | None
    text: str
    raw: bytes | None
    note: str | None
    at: float


@dataclass(slots=True)
class Show:
    """A console line. kind: client, server, operator (the operator's own words: the loop leaves
    them out where the terminal already shows what was typed), event, error or note."""

    kind: str
    text: str
    handle: str | None = None


@dataclass(slots=True)
class Send:
    """Bytes to a client (already formatted and made safe)."""

    conn: int
    data: bytes


@dataclass(slots=True)
class End:
    """End a connection's session: record `reason`, tell the client `notice` (if any) before
    `\\quit`, close the socket, and show the ending on the console. `waiting` says it ended while
    it waited in the queue."""

    conn: int
    reason: str
    at: float
    notice: str | None = None
    waiting: bool = False
    limit: float | None = None  # a timeout: the seconds it allowed


@dataclass(slots=True)
class Refuse:
    """Turn a new connection away: record it (coalesced per address and minute), tell it
    `notice` and `\\quit`, close it."""

    conn: int
    host: str
    port: int
    reason: str
    at: float
    notice: str
    why: str = "the server is busy"  # for the console, e.g. "the room is full (10000 here)"


@dataclass(slots=True)
class Join:
    """Room: record a participant (its address) joining the room's conversation."""

    conn: int
    host: str
    port: int
    at: float


@dataclass(slots=True)
class Broadcast:
    """Room: the same bytes to every connection in the room but `exclude`."""

    data: bytes
    exclude: int | None = None


@dataclass(slots=True)
class Pause:
    """Room: stop reading from `conn` until `until` (its rate limit); nothing is dropped."""

    conn: int
    until: float


@dataclass(slots=True)
class Prompt:
    """Whether an answer from the operator is wanted now."""

    on: bool


@dataclass(slots=True)
class Finish:
    """Stop serving; `why` is said on the console."""

    why: str


Event = Connected | Received | Disconnected | Stalled | OperatorLine | OperatorEnd | Tick | Stop
Decision = (
    Open | Serve | Handle | Commit | Show | Send | End | Refuse | Join | Broadcast | Pause | Prompt
    | Finish
)
