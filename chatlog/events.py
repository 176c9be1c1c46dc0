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
relayed line outside a burst (a burst's run of plain lines: three in all), and a frozen dataclass takes four times as long to build (about 0.9 us against
0.2 us for a seven-field one on Python 3.11). Treat them as values all the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from chatlog.protocol import Message, Run, parse
from chatlog.words import NOTICES, timeout_notice  # noqa: F401 (server.py still imports them from here)


class Event:
    """What happened: the loop reports it, a policy decides what it means."""

    __slots__ = ()


class Decision:
    """What to do: a policy says it, the loop (and the mode's store) carries it out."""

    __slots__ = ()


class StoreWrite(Decision):
    """A decision with a part the store records; every one of a pass is committed, in one
    transaction, before anything of that pass is shown or sent."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Link:
    """How a client is connected, when it is not plain TCP."""

    transport: str  # "tls"
    version: str | None = None  # e.g. "TLSv1.3"
    cipher: str | None = None
    fingerprint: str | None = None  # the client certificate's ("SHA256:hex"), if it gave one


# -- events: what happened --------------------------------------------------------------------


@dataclass(slots=True)
class Started(Event):
    """The server is listening and its signals are handled: the conversation may begin."""

    at: float


@dataclass(slots=True)
class Connected(Event):
    conn: int
    host: str
    port: int
    at: float
    link: Link | None = None  # None: plain TCP


@dataclass(slots=True)
class Received(Event):
    """One framed, parsed line from a client."""

    conn: int
    msg: Message
    at: float


@dataclass(slots=True)
class ReceivedLines(Event):
    """The lines one read brought from a client, framed, in order (`protocol.Frame`s, each with
    its own `at`, and `protocol.Run`s, whole lines as they came): what a `Received` each would
    be (`received_each`), reported at once so a room can take a run of plain lines in one go."""

    conn: int
    frames: list


def received_each(event: ReceivedLines):
    """The `Received` events `event` stands for, parsed, in order (a `Run` line by line)."""
    conn = event.conn
    for item in event.frames:
        for frame in item.frames() if type(item) is Run else (item,):
            yield Received(conn, parse(frame), frame.at)


@dataclass(slots=True)
class Disconnected(Event):
    """The peer closed (or reset) its connection; what it sent before is already Received."""

    conn: int
    at: float


@dataclass(slots=True)
class Stalled(Event):
    """The client stopped reading: its unsent output passed the policy's `sendq` bound (what
    was queued for it is dropped; it gets nothing more)."""

    conn: int
    at: float
    backlog: int = 0


@dataclass(slots=True)
class OperatorLine(Event):
    text: str
    at: float


@dataclass(slots=True)
class OperatorEnd(Event):
    """The operator's input ended (Ctrl-D, or the end of a piped script)."""

    at: float


@dataclass(slots=True)
class Tick(Event):
    """Time passed: the policy's deadline() was reached."""

    at: float


@dataclass(slots=True)
class Stop(Event):
    """A signal (INT, TERM, HUP) asks the server to stop; `why` is its name."""

    why: str
    at: float


# -- decisions: what to do --------------------------------------------------------------------


@dataclass(slots=True)
class Open(StoreWrite):
    """Record a new session for a connection (served at once, or waiting in the queue)."""

    conn: int
    host: str
    port: int
    at: float
    served: bool
    link: Link | None = None


@dataclass(slots=True)
class Serve(StoreWrite):
    """Record that a waiting connection's chat has begun."""

    conn: int
    at: float


@dataclass(slots=True)
class Handle(StoreWrite):
    """Record the handle a connection first used."""

    conn: int
    handle: str


@dataclass(slots=True)
class Commit(StoreWrite):
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
    verified: bool = False  # said under a handle bound to the certificate its client presented


@dataclass(slots=True)
class CommitLines(StoreWrite):
    """Record a run of one client's plain lines (printable ASCII), in order: what a `Commit`
    each (sender 'client', under `handle`, no raw form, no note) would record. A room's burst."""

    conn: int
    handle: str
    lines: list  # (text, at) each
    verified: bool = False


@dataclass(slots=True)
class Show(Decision):
    """A console line. kind: client, server, operator (the operator's own words: the loop leaves
    them out where the terminal already shows what was typed), event, error or note."""

    kind: str
    text: str
    handle: str | None = None


@dataclass(slots=True)
class ShowLines(Decision):
    """Console lines of one handle, in order: what a `Show(kind, text, handle)` each would show."""

    kind: str
    texts: list
    handle: str | None = None


@dataclass(slots=True)
class Send(Decision):
    """Bytes to a client (already formatted and made safe)."""

    conn: int
    data: bytes


@dataclass(slots=True)
class End(StoreWrite):
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
class Refuse(StoreWrite):
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
class Join(StoreWrite):
    """Room: record a participant (its address) joining the room's conversation."""

    conn: int
    host: str
    port: int
    at: float
    link: Link | None = None


@dataclass(slots=True)
class Broadcast(Decision):
    """Room: the same bytes to every connection in the room but `exclude`."""

    data: bytes
    exclude: int | None = None


@dataclass(slots=True)
class Pause(Decision):
    """Room: stop reading from `conn` until `until` (its rate limit); nothing is dropped."""

    conn: int
    until: float


@dataclass(slots=True)
class Prompt(Decision):
    """Whether an answer from the operator is wanted now. `commands`: no answer is wanted, only
    a command (a line starting with a backslash, such as `\\quit`); the operator's input decides
    how it offers that (a terminal shows the prompt; a script's next line is taken only if it is
    a command, so scripted answers still wait for their client)."""

    on: bool
    commands: bool = False


@dataclass(slots=True)
class Finish(Decision):
    """Stop serving; `why` is said on the console."""

    why: str


@dataclass(slots=True)
class Bind(StoreWrite):
    """Bind `handle` to the certificate `fingerprint` (or note its owner used it again), and
    mark `conn`'s session or participant as verified."""

    conn: int
    handle: str
    fingerprint: str
    at: float


@dataclass(slots=True)
class Forget(StoreWrite):
    """Release the binding of `handle` (the operator's `\\forget`)."""

    handle: str


@dataclass(slots=True)
class OpenRoom(StoreWrite):
    """Room: record the room's one session (every line of the run belongs to it)."""

    at: float


@dataclass(slots=True)
class CloseRoom(StoreWrite):
    """Room: record the end of the room's session."""

    reason: str
    at: float


@dataclass(slots=True)
class History(StoreWrite):
    """Room: read the last `n` lines said in the room (this run and earlier runs of the same
    name) from the record, and send them to `conn` marked as history (None: show them on the
    console). A read, carried out in the store's phase in order with the writes, so it holds
    exactly what was committed before it: what a joining client was not a member for."""

    conn: int | None
    n: int
    at: float


@dataclass(slots=True)
class Publish(Decision):
    """Hand `data` to the room's link to other servers (`chatlog.link`), after this pass's
    commits; `what` says which of its subjects (the room's stream, who is here, a kick). The
    loop carries it out and knows nothing of what it means."""

    what: str
    data: bytes
    ref: int = 0


class Policy(Protocol):
    """A conversation policy (`turns.Turns`, `room.Room`): events in, decisions out; no I/O."""

    handle: str  # the operator's handle
    sendq: int  # bytes of unsent output a client may let pile up before it is reported Stalled
    times_out: bool  # a Tick may time a client out: the loop reads every client before one

    def handle_event(self, event: Event) -> list[Decision]: ...

    def deadline(self) -> float | None:
        """When the policy next wants a Tick (None: no timer)."""

    def allowance(self, conn: int, now: float) -> int:
        """How many more lines the policy takes from `conn` now; the rest stays unread."""

    def notice(self, text: str) -> bytes:
        """A notice line for a client, in the policy's words and handle."""
