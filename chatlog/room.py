"""The room policy: many clients and the operator in one conversation; socket-free.

`Room.handle_event(event)` takes one event from the server loop (`chatlog/events.py`) and returns
the decisions the loop must carry out, in order. No sockets, no store, no clock, no console: time
comes in on the events and everything the loop needs is in the decisions.

What a room does:

- A client is greeted at once on connect (rooms have no turns; `N here` counts the clients in the
  room, the newcomer included) and recorded (`Join`). Its handle becomes known from its first
  line (`Handle`); only then is its arrival announced to the others (`*** alice joined`) and
  recorded as an event, so a lurker who never speaks is never announced. Its leaving is announced
  and recorded if its arrival was; everyone's leaving is recorded by its `End`.
- Each client line is committed, then relayed to every other client as `handle>text\\n` (one
  `Broadcast`) and shown on the console. Handle and text are made safe with `sanitize.visible`
  exactly as the console makes them: old clients print what they get raw. A line over the
  protocol's 500 characters is committed whole but relayed cut there, marked, and its sender told.
- A line that cannot be relayed is still committed (nothing is lost) and its sender is told why:
  a line under a handle it may not take (`handles.handle_problem`: one that would not show as
  itself, the server's, one in use by someone present, or a look-alike of either; a rename onto
  such a handle is refused the same way and the old handle kept) and a line from a client whose
  handle is not known yet.
- The operator's lines go to everyone as `SERVER>text\\n` (the configured handle). At the console,
  `\\who` lists who is here, `\\kick NAME` removes a client (by handle or `host:port`), `\\quit`
  closes the room; the end of the operator's input closes it too. The operator's input is wanted
  from the start (`deadline()` is 0 until the first event, answered with `Prompt(True)`).
- A client that stops reading is dropped as `slow` (the loop reports it with `Stalled`), so nobody
  else ever waits for it. A client over its rate limit (a token bucket: `rate` lines/s with a
  `burst` allowance) is paused (`Pause`), never cut short: every line it sent is still committed
  and relayed.
- At most `max_clients` clients, and at most `per_address` from one address (0: no cap; an IPv6
  address counts by its /64, `words.address_key`); beyond either, a new connection is refused with a notice. There is no idle timeout.

Store writes always come before what is sent or shown in the same decision list, and the loop
commits every store write of a pass before it sends anything, so nobody is told what is not
recorded.
"""

from __future__ import annotations

import re
from itertools import repeat
from dataclasses import dataclass

from chatlog.events import (
    Bind,
    Broadcast,
    CloseRoom,
    Commit,
    CommitLines,
    Connected,
    Decision,
    Disconnected,
    End,
    Finish,
    Forget,
    Handle,
    History,
    Join,
    OpenRoom,
    OperatorEnd,
    OperatorLine,
    Pause,
    Prompt,
    Received,
    ReceivedLines,
    Refuse,
    Send,
    Show,
    ShowLines,
    Stalled,
    Started,
    Stop,
    Tick,
)
from chatlog.handles import Bindings, Names, bound_problem, example, fold, handle_problem
from chatlog.protocol import MAX_LINE, MAX_TEXT, SERVER_HANDLE, Run, is_quit, parse, valid_handle
from chatlog.sanitize import visible
from chatlog.words import LEFT, NOTICES, address, address_key, idle_text

MAX_CLIENTS = 10_000
HISTORY = 20  # lines of the room's record shown to a client that joins
PER_ADDRESS = 256  # enough for a classroom behind one NAT, or a benchmark on loopback
RATE = 20.0  # lines per second, sustained
BURST = 100  # lines at once before the rate applies
# The slow-reader rule (ergo's sendq, redis's client-output-buffer-limit): a client that lets
# this much of the room's output pile up unread is dropped as `slow`, so nobody waits for it.
SENDQ = 1024 * 1024
UNLIMITED = 1 << 30

FULL_NOTICE = "The room is full; try again later."
NO_HANDLE_NOTICE = "Start your first line with a handle, like: alice>hello (not relayed)"

_COMMAND = re.compile(r"\\([A-Za-z]+)(?:\s+(.*))?")
# A client's command: `\who`, or irssi's habit `/who`: a backslash or slash, letters, then
# nothing or whitespace and arguments. `/usr/bin`, `\o/` and `//who` are chat.
_CLIENT_COMMAND = re.compile(r"\s*[\\/]([A-Za-z]+)(?:\s+(.*?))?\s*", re.S)
CLIENT_HELP = ("Commands: \\who (who is here), \\help (this), \\quit (leave); /who works too. "
               "Commands are answered to you alone, never sent to the room.")
COMMAND_NOTE = "a command, answered to its sender: not relayed"
# A plain line's text, after its sender's own `handle>`: printable ASCII (shown and relayed as it
# is), not starting like a command or with a space (which the parser would take off), at most
# MAX_TEXT characters. A run of them is committed, shown and relayed at once.
# Matched from after the handle to the end of the line's bytes: the text, then "\n" or "\n\0" (as
# ./chatclient ends a line) and nothing else.
_PLAIN_TEXT = rb"(?:[!-.0-\[\]-~][ -~]{0,%d})?\n\0?" % (MAX_TEXT - 1)
_PLAIN = re.compile(_PLAIN_TEXT)
OWN_MATCH_RUN = 64  # a sender whose read brings this many lines gets a matcher with its handle in it


def plain_line(said: bytes):
    """Matchers of the whole bytes of a plain line of a sender who sends `said` (b"handle>"),
    and of a `Run` of them: a line of its burst in one call, a run in one. Compiling them costs
    ~0.1 ms, so only a sender that bursts gets them (`OWN_MATCH_RUN`)."""
    line = re.escape(said) + _PLAIN_TEXT
    return re.compile(line).fullmatch, re.compile(b"(?:" + line + b")+").fullmatch


def _lines_in(frames: list) -> int:
    return sum(f.count if type(f) is Run else 1 for f in frames)


@dataclass(slots=True, eq=False)
class Participant:
    conn: int
    host: str
    port: int
    addr: str  # the per-address key
    last: float  # when it last sent a line (or connected)
    handle: str | None = None  # as last used; None until its first line with a handle
    shown: str = ""  # visible(handle)
    prefix: bytes = b""  # b"shown>", what its relayed lines start with
    said: bytes = b""  # b"handle>" as it sends it (UTF-8): a plain line of its starts with it
    plain: tuple | None = None  # plain_line(said), once it bursts (None until then, and after a rename)
    announced: bool = False  # its join was announced (and recorded as an event)
    tokens: float = 0.0  # rate limit bucket
    stamp: float = 0.0  # when `tokens` was last brought up to date
    noted_pause: bool = False  # the console was told it was paused (once)
    fingerprint: str | None = None  # its TLS client certificate's, if it presented one


class Room:
    times_out = False  # no Tick ends anyone's turn: the loop reads nobody for one
    __slots__ = (
        "handle", "max_clients", "per_address", "rate", "burst", "people", "per_addr",
        "finished", "prompted", "sendq", "names", "bindings", "_server_prefix", "history", "elsewhere",
    )

    def __init__(
        self,
        *,
        handle: str = SERVER_HANDLE,
        max_clients: int = MAX_CLIENTS,
        per_address: int = PER_ADDRESS,
        rate: float = RATE,
        burst: int = BURST,
        sendq: int = SENDQ,
        bindings: dict[str, str] | None = None,
        history: int = HISTORY,
    ):
        if not valid_handle(handle):
            raise ValueError(f"not a valid handle: {handle!r} (1 to 10 characters, no spaces or '>')")
        if max_clients < 1:
            raise ValueError("max_clients must be at least 1")
        if per_address < 0 or rate < 0 or burst < 0:
            raise ValueError("per_address, rate and burst cannot be negative")
        self.handle = handle
        self.max_clients = max_clients
        self.per_address = per_address
        self.rate = float(rate)
        self.burst = float(max(1, burst))
        self.people: dict[int, Participant] = {}
        self.per_addr: dict[str, int] = {}
        self.finished = False
        self.prompted = False  # the operator's input is wanted from the first event on
        self.sendq = sendq
        self.names = Names()  # the handles of those present
        self.bindings = Bindings(bindings)  # handles that belong to a certificate
        self.history = max(0, history)  # lines of the room's record a newcomer is shown
        self._server_prefix = (visible(handle) + ">").encode()
        # A linked room (chatlog.link): who is on the other servers, (handle, server, address)
        # each, made safe; kept here by the link's policy so \who lists everyone.
        self.elsewhere: list[tuple[str, str, str]] = []

    # -- the interface the loop uses ---------------------------------------------------------

    def handle_event(self, event) -> list[Decision]:
        """The decisions for one event, in the order the loop must carry them out."""
        if type(event) is ReceivedLines:  # the hot path first
            return self._received_lines(event)
        if type(event) is Received:
            return self._received(event)
        if self.finished:
            if type(event) is Connected:
                return [Refuse(event.conn, event.host, event.port, "shutdown", event.at, NOTICES["shutdown"])]
            return []
        if type(event) is Started:
            # The room's one session begins with the run; the operator may speak at once.
            self.prompted = True
            return [OpenRoom(event.at), Prompt(True)]
        if not self.prompted:
            self.prompted = True
            return [Prompt(True)] + self.handle_event(event)
        match event:
            case Connected():
                return self._connected(event)
            case Disconnected():
                return self._leave(event.conn, "disconnect", event.at)
            case Stalled():
                return self._leave(event.conn, "slow", event.at, NOTICES["slow"])
            case OperatorLine():
                return self._operator(event)
            case OperatorEnd():
                return self._close("server-quit", event.at, "Operator input ended; room closed")
            case Stop():
                return self._close("shutdown", event.at, f"Server stopped ({event.why})")
            case Tick():
                return []
        raise TypeError(f"not a room event: {event!r}")

    def deadline(self) -> float | None:
        """A room keeps no timers (no idle timeout; a pause carries its own end). Until its first
        event it asks for a Tick at once, to answer it with Prompt(True): in a room the
        operator may speak at any time, even before anyone comes."""
        return None if self.prompted or self.finished else 0.0

    def allowance(self, conn: int, now: float) -> int:
        """How many lines `conn` may send now: what its bucket holds (at least one once a pause
        has run out). The loop leaves the rest unread in the socket, so a flood costs one pass
        no more than this."""
        if not self.rate:
            return UNLIMITED
        p = self.people.get(conn)
        if p is None:
            return UNLIMITED
        tokens = p.tokens + (now - p.stamp) * self.rate if now > p.stamp else p.tokens
        return max(1, int(min(tokens, self.burst)))

    def notice(self, text: str) -> bytes:
        """A server notice line, e.g. `SERVER>*** alice joined\\n`."""
        return self._server_prefix + b"*** " + visible(text).encode() + b"\n"

    # -- clients -----------------------------------------------------------------------------

    def _connected(self, ev: Connected) -> list[Decision]:
        people = self.people
        if ev.conn in people:
            return []
        # The loop shows refusals itself, coalesced per address and minute, so a flood of
        # connections cannot flood the console.
        if len(people) >= self.max_clients:
            return [Refuse(ev.conn, ev.host, ev.port, "busy", ev.at, FULL_NOTICE, f"the room is full ({len(people)} here)")]
        key = address_key(ev.host)
        n = self.per_addr.get(key, 0)
        if self.per_address and n >= self.per_address:
            return [Refuse(ev.conn, ev.host, ev.port, "per-address", ev.at, NOTICES["per-address"],
                           f"{n} connections from that address")]
        self.per_addr[key] = n + 1
        p = Participant(ev.conn, ev.host, ev.port, key, ev.at, tokens=self.burst, stamp=ev.at,
                        fingerprint=ev.link.fingerprint if ev.link is not None else None)
        people[ev.conn] = p
        here = len(people) + len(self.elsewhere)  # (a linked room: on the other servers too)
        out: list[Decision] = [
            Join(ev.conn, ev.host, ev.port, ev.at, ev.link),
            Send(ev.conn, self.notice(f"Welcome to the room: {here} here. Type at any time.")),
        ]
        if self.history:
            # Read in order with this pass's commits: exactly what was said before it joined.
            out.append(History(ev.conn, self.history, ev.at))
        out.append(Show("event", visible(f"{address(ev.host, ev.port)} entered the room ({here} here)")))
        return out

    def _received(self, ev: Received) -> list[Decision]:
        p = self.people.get(ev.conn)
        if p is None:  # ended already (what it sent after \quit, a kick, or the room closing)
            return []
        msg = ev.msg
        if msg.padding:  # not a line: bytes that trailed one, recorded so nothing vanishes
            note = f"{msg.padding} bytes of padding after the previous line"
            return [Commit(p.conn, "event", p.handle, "padding", msg.raw, note, ev.at)]
        handle = msg.handle
        text = msg.text
        if (
            (handle is not None and handle != p.handle) or p.handle is None or msg.is_quit
            or msg.cut or len(text) > MAX_TEXT or (text and text[0] in "\\/ \t")
        ):
            return self._received_slow(p, ev)
        at = ev.at
        p.last = at
        shown = visible(text)
        out: list[Decision] = [
            Commit(ev.conn, "client", p.handle, text, msg.raw, None, at, p.fingerprint is not None),
            Show("client", shown, p.shown),
            Broadcast(p.prefix + shown.encode() + b"\n", ev.conn),
        ]
        if self.rate:
            self._limit(p, at, out)
        return out

    def _received_lines(self, ev: ReceivedLines) -> list[Decision]:
        """A read's lines from one client. A run of plain lines (under its own handle, `_PLAIN`,
        ended by "\n" or "\n\0" and nothing else, not cut) is one `CommitLines`, one `ShowLines`
        and one `Broadcast` (each line's bytes, less a NUL after the newline, are what is
        relayed), its rate counted line by line as `_limit` counts it; any other line goes
        through `_received`, in its place. A `Run` (whole lines as they came) from a sender
        that bursts is taken at once when its own matcher says every line of it is plain: one
        match, one split; any other Run line by line, as its `frames()`."""
        conn = ev.conn
        people = self.people
        out: list[Decision] = []
        p = people.get(conn)
        if p is None:
            return out
        plain = _PLAIN.fullmatch
        rate, burst = self.rate, self.burst
        lines: list[tuple[str, float]] = []
        texts: list[str] = []
        relay: list[bytes] = []
        paused = None  # (at, tokens) of the run's last line that left less than one token
        said = p.said
        n = len(said)
        if said and p.plain is None and _lines_in(ev.frames) >= OWN_MATCH_RUN:
            p.plain = plain_line(said)
        own, own_run = p.plain or (None, None)
        for item in ev.frames:
            if type(item) is Run:
                if own_run is not None and own_run(item.data):  # whole lines, every one plain: at once
                    at, data = item.at, item.data
                    if b"\0" in data:
                        data = data.replace(b"\n\0", b"\n")  # (a NUL only ever after a newline)
                    said_text = said.decode()
                    run = data.decode()[len(said_text) : -1].split("\n" + said_text)
                    lines += zip(run, repeat(at))
                    texts += run
                    relay.append(data)
                    if rate and (left := self._spend(p, at, item.count)) is not None:
                        paused = left
                    continue
                frames = item.frames()
            else:
                frames = (item,)
            for frame in frames:
                raw = frame.raw  # (its payload, then "\n" or "\n\0" if it is plain: the match says)
                if ((own(raw) if own is not None else said and raw.startswith(said) and plain(raw, n))
                        and not frame.cut):
                    at = frame.at
                    text = frame.payload[n:].decode("ascii")
                    lines.append((text, at))
                    texts.append(text)
                    relay.append(raw if raw[-1] == 10 else raw[:-1])  # (less a NUL after the newline)
                    if rate:
                        elapsed = at - p.stamp
                        tokens = p.tokens + elapsed * rate if elapsed > 0 else p.tokens
                        if tokens > burst:
                            tokens = burst
                        tokens -= 1.0
                        p.tokens = tokens
                        if elapsed > 0:
                            p.stamp = at
                        if tokens < 1.0:
                            paused = (at, tokens)
                    continue
                if lines:
                    self._run(p, lines, texts, relay, paused, out)
                    lines, texts, relay, paused = [], [], [], None
                out += self._received(Received(conn, parse(frame), frame.at))
                p = people.get(conn)
                if p is None:  # it left (`\\quit`, a line cut at MAX_LINE): the rest is not taken
                    return out
                said = p.said  # (it may have taken another handle)
                own, own_run = p.plain or (None, None)
                n = len(said)
        if lines:
            self._run(p, lines, texts, relay, paused, out)
        return out

    def _spend(self, p: Participant, at: float, count: int) -> tuple[float, float] | None:
        """`count` lines said at `at` taken from `p`'s bucket, exactly as one at a time would;
        (at, tokens) if that left it less than one token."""
        elapsed = at - p.stamp
        tokens = p.tokens + elapsed * self.rate if elapsed > 0 else p.tokens
        if tokens > self.burst:
            tokens = self.burst
        for _ in range(count):  # (one subtraction a line: the float result is the same)
            tokens -= 1.0
        p.tokens = tokens
        if elapsed > 0:
            p.stamp = at
        return (at, tokens) if tokens < 1.0 else None

    def _run(self, p: Participant, lines: list, texts: list, relay: list, paused, out: list[Decision]) -> None:
        """A run of plain lines: committed, shown, relayed (and its sender paused, if its last
        line over the rate says so)."""
        p.last = lines[-1][1]
        out += [
            CommitLines(p.conn, p.handle, lines, p.fingerprint is not None),
            ShowLines("client", texts, p.shown),
            Broadcast(b"".join(relay), p.conn),
        ]
        if paused is not None:
            self._paused(p, paused[0], paused[1], out)

    def _received_slow(self, p: Participant, ev: Received) -> list[Decision]:
        """The first line, a new handle, a claimed server handle, no handle at all, `\\quit`, or a
        line over the protocol's 500 characters (up to 8192 bytes, more when cut at that limit)."""
        msg = ev.msg
        at = ev.at
        out: list[Decision] = []
        if msg.is_quit:
            return self._leave(p.conn, "client-quit", at)
        p.last = at
        if not msg.cut and (m := _CLIENT_COMMAND.fullmatch(msg.text)):
            if m.group(1) == "join" and not m.group(2) and msg.handle is not None and msg.text.strip() == "\\join":
                return self._join(p, ev)
            return self._client_command(p, ev, m.group(1), m.group(2) or "")
        handle = msg.handle
        note = None
        if msg.cut:
            note = f"line cut at {MAX_LINE} bytes; {msg.cut} more bytes dropped"
        elif len(msg.text) > MAX_TEXT:
            note = f"longer than {MAX_TEXT} characters"
        problem = None
        if handle is not None and handle != p.handle:
            problem = self._problem(p, handle)
        if problem is not None:
            out += self._refused(p, ev, problem, note)
        elif handle is None and p.handle is None:
            why = "no handle yet: not relayed"
            out += [
                Commit(p.conn, "client", None, msg.text, msg.raw, why if note is None else f"{note}; {why}", at),
                Show("client", visible(msg.text)),
                Send(p.conn, self.notice(NO_HANDLE_NOTICE)),
            ]
        else:
            if handle is not None and handle != p.handle:
                self._rename(p, handle, out)
            text = msg.text
            shown = visible(text)
            out += [
                Commit(p.conn, "client", p.handle, text, msg.raw, note, at, p.fingerprint is not None),
                Show("client", shown, p.shown),
            ]
            if len(text) > MAX_TEXT:
                # Relayed as the protocol allows: at most 500 characters, marked as cut. Old
                # clients have small buffers, and one long line sent to every listener is the
                # cheapest way to flood a room. The store keeps it whole; the sender is told.
                more = len(text) - MAX_TEXT
                shown = visible(text[:MAX_TEXT]) + f" [{more} more characters not relayed]"
                if not msg.cut:  # (a cut line ends its session, with its own notice)
                    out.append(Send(p.conn, self.notice(
                        f"Lines are at most {MAX_TEXT} characters: the others saw the first {MAX_TEXT} of yours."
                    )))
            out.append(Broadcast(p.prefix + shown.encode() + b"\n", p.conn))
        if msg.cut:
            return _stores_first(out + self._leave(p.conn, "overlong", at, NOTICES["overlong"]))
        out = _stores_first(out)
        if self.rate:
            self._limit(p, at, out)
        return out

    def _problem(self, p: Participant, handle: str) -> str | None:
        """Why `p` may not take `handle` (in use, the server's, a look-alike, bound to another
        certificate, not shown as itself), or None."""
        return handle_problem(handle, self.names, self.handle, own=p.handle) or bound_problem(
            handle, p.fingerprint, self.bindings)

    def _refused(self, p: Participant, ev: Received, problem: str, note: str | None = None) -> list[Decision]:
        """A line under a handle `p` may not take: recorded with why, not relayed, its sender told."""
        msg = ev.msg
        why = f"{problem}: not relayed"
        like = example(self.names, self.handle)
        return [
            Commit(p.conn, "client", msg.handle, msg.text, msg.raw, why if note is None else f"{note}; {why}", ev.at),
            # Not as a chat line: on the console it would read as the operator's (or the
            # other's) own words.
            Show("error", visible(f"{address(p.host, p.port)}: {problem} (not relayed): {msg.handle}>{msg.text}")),
            Send(p.conn, self.notice(f"T{problem[1:]}; choose another, like: {like}>hello (not relayed)")),
        ]

    def _join(self, p: Participant, ev: Received) -> list[Decision]:
        """`handle>\\join`: the client announces its handle as soon as it is chosen (our
        chatclient does, in a room), so its arrival is announced before it says anything."""
        handle = ev.msg.handle
        if handle == p.handle:
            return []  # (already announced under it)
        problem = self._problem(p, handle)
        if problem is not None:
            return _stores_first(self._refused(p, ev, problem))
        out: list[Decision] = []
        self._rename(p, handle, out)
        out = _stores_first(out)
        if self.rate:
            self._limit(p, ev.at, out)
        return out

    def _client_command(self, p: Participant, ev: Received, name: str, arg: str) -> list[Decision]:
        """A client's `\\who`, `\\help` or unknown command: recorded as its line with a note
        (nothing is silently dropped), answered to it alone, never relayed."""
        msg = ev.msg
        name = name.lower()
        if name == "who" and not arg:
            reply = self._who_line()
        elif name == "help" and not arg:
            reply = CLIENT_HELP
        else:
            reply = f"Unknown command {msg.text.strip()[:40]} (not sent to the room). {CLIENT_HELP}"
        who = p.shown if p.handle is not None else address(p.host, p.port)
        return [
            Commit(p.conn, "client", msg.handle or p.handle, msg.text, msg.raw, COMMAND_NOTE, ev.at),
            Show("note", visible(f"{who} asked: {msg.text.strip()}")),
            Send(p.conn, self.notice(_fit(reply))),
        ]

    def _who_line(self) -> str:
        """Who is here, by handle, in one protocol line (the rest counted)."""
        people = list(self.people.values())
        head = f"{len(people) + len(self.elsewhere)} here: "
        names = [p.shown if p.handle is not None else "(no handle yet)" for p in people]
        names += [f"{name} (on {server})" for name, server, _ in self.elsewhere]
        out = head
        for i, name in enumerate(names):
            more = len(names) - i
            piece = name if i == 0 else ", " + name
            if len(out) + len(piece) + len(f", and {more} more") > MAX_TEXT - 4:
                return out + f", and {more} more"
            out += piece
        return out

    def _rename(self, p: Participant, handle: str, out: list[Decision]) -> None:
        if p.fingerprint is not None:
            # Over TLS with a certificate: the handle is its owner's (bound the first time).
            self.bindings.add(handle, p.fingerprint)
            out.append(Bind(p.conn, handle, p.fingerprint, p.last))
        old, old_handle = p.shown, p.handle
        if old_handle is not None:
            self.names.remove(old_handle)
        self.names.add(handle)
        p.handle = handle
        p.shown = visible(handle)
        p.prefix = (p.shown + ">").encode()
        p.said = (handle + ">").encode() if p.shown == handle else b""
        p.plain = None
        if p.announced:
            # Everyone is told, or a participant could take another's name unnoticed.
            out += [
                Commit(p.conn, "event", handle, "renamed", None, f"{old_handle} is now {handle}", p.last),
                Show("event", f"{old} ({address(p.host, p.port)}) now calls itself {p.shown}"),
                Broadcast(self.notice(f"{old} is now {p.shown}"), p.conn),
            ]
            return
        p.announced = True
        out += [
            Handle(p.conn, handle),
            Commit(p.conn, "event", handle, "joined", None, None, p.last),
            Show("event", f"{p.shown} joined ({address(p.host, p.port)}, {len(self.people)} here)"),
            Broadcast(self.notice(f"{p.shown} joined"), p.conn),
        ]

    def withdraw(self, conn: int, where: str, at: float) -> list[Decision]:
        """`conn`'s handle turned out to be someone else's first (a linked room: claimed on
        another server `where`, earlier in the order every server reads): it gives the handle up.
        Recorded and announced as its leaving under that handle (reason `name-taken`); the client
        stays, with no handle, and is told to choose another."""
        p = self.people.get(conn)
        if p is None or p.handle is None:
            return []
        handle, shown = p.handle, p.shown
        self.names.remove(handle)
        announced = p.announced
        p.handle, p.shown, p.prefix, p.said, p.plain, p.announced = None, "", b"", b"", None, False
        like = example(self.names, self.handle)
        out: list[Decision] = []
        if announced:
            out += [Commit(conn, "event", handle, "left", None, "name-taken", at),
                    Broadcast(self.notice(f"{shown} left: the name was taken first {where}"), conn)]
        return out + [
            Show("event", f"{shown} ({address(p.host, p.port)}) gave up the name: it was taken first {where}"),
            Send(conn, self.notice(f"The handle {shown} was taken first {where}, a moment before you; "
                                   f"choose another, like: {like}>hello (not relayed)")),
        ]

    def _limit(self, p: Participant, at: float, out: list[Decision]) -> None:
        """Token bucket: `burst` lines at once, then `rate` a second. Over it, reads pause until
        the bucket holds a line again; the line in hand has been committed and relayed."""
        rate = self.rate
        elapsed = at - p.stamp
        tokens = p.tokens + elapsed * rate if elapsed > 0 else p.tokens
        if tokens > self.burst:
            tokens = self.burst
        tokens -= 1.0
        p.tokens = tokens
        if elapsed > 0:
            p.stamp = at
        if tokens < 1.0:
            self._paused(p, at, tokens, out)

    def _paused(self, p: Participant, at: float, tokens: float, out: list[Decision]) -> None:
        out.append(Pause(p.conn, at + (1.0 - tokens) / self.rate))
        if not p.noted_pause:
            p.noted_pause = True
            out.append(Show("note", f"{p.shown or address(p.host, p.port)} is sending over {self.rate:g} lines/s: reading paused to that rate"))

    def _leave(self, conn: int, reason: str, at: float, notice: str | None = None) -> list[Decision]:
        p = self.people.pop(conn, None)
        if p is None:
            return []
        if p.handle is not None:
            self.names.remove(p.handle)
        n = self.per_addr[p.addr] - 1
        if n:
            self.per_addr[p.addr] = n
        else:
            del self.per_addr[p.addr]
        # The console hears of every leave from here: the loop shows no ending for a participant.
        who = f"{p.shown} ({address(p.host, p.port)})" if p.announced else address(p.host, p.port)
        shown = Show("event", f"{who} left: {LEFT.get(reason, reason)} ({len(self.people)} here)")
        if not p.announced:
            return [End(conn, reason, at, notice), shown]
        return [
            Commit(conn, "event", p.handle, "left", None, reason, at),
            End(conn, reason, at, notice),
            Broadcast(self.notice(f"{p.shown} left"), conn),
            shown,
        ]

    # -- the operator --------------------------------------------------------------------------

    def _operator(self, ev: OperatorLine) -> list[Decision]:
        text = ev.text
        stripped = text.strip()
        if not stripped:
            return []
        if is_quit(stripped):
            return self._close("server-quit", ev.at, "The operator closed the room")
        m = _COMMAND.fullmatch(stripped)
        if m:
            name, arg = m.group(1), (m.group(2) or "").strip()
            if name == "who" and not arg:
                return self._who(ev.at)
            if name == "kick":
                return self._kick(arg, ev.at)
            if name == "forget":
                return self._forget(arg)
            if name == "history":
                if arg and not (arg.isascii() and arg.isdigit()):
                    return [Show("error", "usage: \\history [N] (the room's last N lines; default 20)")]
                return [History(None, int(arg) if arg else (self.history or HISTORY), ev.at)]
            return [Show("error", f"unknown command \\{name}; commands: \\who, \\history [N], \\kick NAME, \\forget NAME, \\quit")]
        if len(text) > MAX_TEXT:
            return [Show("error", f"message too long ({len(text)} characters, at most {MAX_TEXT}); not sent")]
        shown = visible(text)
        return [
            Commit(None, "server", self.handle, text, None, None, ev.at),
            Show("operator", shown, visible(self.handle)),
            Broadcast(self._server_prefix + shown.encode() + b"\n"),
        ]

    def _who(self, now: float) -> list[Decision]:
        people = self.people
        if not people and not self.elsewhere:
            return [Show("note", "Nobody is here.")]
        out: list[Decision] = [Show("note", f"{len(people) + len(self.elsewhere)} here:")]
        for p in people.values():
            name = p.shown if p.handle is not None else "(no handle yet)"
            out.append(Show("note", f"  {name:<15}  {address(p.host, p.port):<21}  idle {idle_text(now - p.last)}"))
        for name, server, addr in self.elsewhere:
            out.append(Show("note", f"  {name:<15}  {addr:<21}  on {server}"))
        return out

    def _forget(self, name: str) -> list[Decision]:
        """Release a handle's binding to a certificate: anyone may take it again."""
        if not name:
            return [Show("error", "usage: \\forget NAME (a handle bound to a certificate)")]
        released = self.bindings.remove(name)
        if not released:
            return [Show("error", visible(f"no handle like {name} is bound to a certificate"))]
        return [Forget(released[0]), Show("event", visible(f"{released[0]} is no longer bound to a certificate"))]

    def _kick(self, name: str, at: float) -> list[Decision]:
        if not name:
            return [Show("error", "usage: \\kick NAME (a handle, or host:port as \\who shows it)")]
        found = [p for p in self.people.values() if address(p.host, p.port) == name]
        if not found:
            found = [p for p in self.people.values() if p.handle is not None and p.shown == name]
        if not found:
            key = fold(name)
            found = [p for p in self.people.values() if p.handle is not None and fold(p.shown) == key]
        if not found:
            return [Show("error", visible(f"nobody here is called {name}; \\who lists who is here"))]
        if len(found) > 1:
            where = ", ".join(address(p.host, p.port) for p in found[:5])
            more = ", ..." if len(found) > 5 else ""
            return [Show("error", visible(f"{len(found)} clients are called {name} ({where}{more}): kick one by host:port"))]
        return self._leave(found[0].conn, "kicked", at, NOTICES["kicked"])

    def _close(self, reason: str, at: float, why: str) -> list[Decision]:
        """Everyone is told (their own ending notice; nobody hears of the others leaving), then
        the room stops."""
        self.finished = True
        notice = NOTICES[reason]
        commits: list[Decision] = []
        ends: list[Decision] = []
        for conn, p in self.people.items():
            if p.announced:
                commits.append(Commit(conn, "event", p.handle, "left", None, reason, at))
            ends.append(End(conn, reason, at, notice))
        self.people.clear()
        self.per_addr.clear()
        self.names.clear()
        return commits + ends + [CloseRoom(reason, at), Prompt(False), Show("event", why), Finish(why)]


def history_lines(name: str, rows, now: float) -> tuple[str, list[str], str]:
    """The words of a room's history, for a client or the console: a notice before, the lines
    (each with its time, local, with the date when not today, made safe and cut as the relay
    cuts them), a notice after. `rows` are (at, sender, handle, text), oldest first; `at` is
    the store's UTC ISO text."""
    from datetime import datetime

    today = datetime.fromtimestamp(now).astimezone().date()
    lines = []
    for at, _sender, handle, text in rows:
        when = datetime.fromisoformat(at).astimezone()
        stamp = when.strftime("%H:%M") if when.date() == today else when.strftime("%Y-%m-%d %H:%M")
        shown = visible(text[:MAX_TEXT]) + (f" [{len(text) - MAX_TEXT} more characters]" if len(text) > MAX_TEXT else "")
        lines.append(f"[{stamp}] {visible(handle or '?')}>{shown}")
    what = "the last line" if len(rows) == 1 else f"the last {len(rows)} lines"
    return f"History: {what} of {visible(name)}", lines, "End of history; live from here."


def _fit(text: str) -> str:
    """A notice's text within the protocol's line (the `*** ` prefix included)."""
    return text if len(text) <= MAX_TEXT - 4 else text[: MAX_TEXT - 5] + "…"


_RECORD_ONLY = (Handle, Commit, Join, Bind)  # store writes that send and show nothing themselves


def _stores_first(out: list[Decision]) -> list[Decision]:
    """Records before console and socket output (a stable partition; an End keeps its place,
    as it also closes)."""
    return [d for d in out if isinstance(d, _RECORD_ONLY)] + [d for d in out if not isinstance(d, _RECORD_ONLY)]
