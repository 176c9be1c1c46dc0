"""The 1:1 conversation policy: the queue, whose turn it is, timeouts, fairness, what ends a
session and what each side is told. Socket-free: fed events, it returns decisions
(`chatlog.events`), so every rule here is unit- and property-tested without a server.

The rules, in short:
- One client is served at a time; the client speaks first, then the operator answers.
- Others wait in a queue, at most `max_waiting` of them and `per_address` from one address (an
  IPv6 address counts by its /64); more are refused as busy. The next one served is the one whose address was served longest
  ago (never served first), so one address cannot hold the chat with many connections.
- A served client that has not said anything yet while others wait has `first_timeout` seconds
  to speak; after that (and always) `idle_timeout` seconds on its turn.
- A line under the server's handle, a look-alike of it, or a handle that would not show as itself
  (`handles.handle_problem`) is recorded with a note saying so and shown on the console as such,
  never as a chat line; the session keeps the handle it had.
- Notices (docs/protocol.md) never shift a turn-based client's turns: a queued client is told it
  waits as the answer to its first line, "your chat has begun" rides with the operator's first
  answer, and the reason a chat ended comes right before `\\quit`.
- A client told it waits may say `\\caps notify` (chatclient does): it understands notices out of
  turn, so "your chat has begun" is sent to it alone, the moment it is served. That line is not a
  chat line and takes no turn; it is honoured only where the notice alone would also be a valid
  answer to it, so a turn-based client whose person typed it stays in step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from chatlog import protocol
from chatlog.events import (
    Bind,
    Commit,
    Connected,
    Decision,
    Disconnected,
    End,
    Event,
    Finish,
    Handle,
    Open,
    OperatorEnd,
    OperatorLine,
    Prompt,
    Received,
    ReceivedLines,
    Refuse,
    Send,
    Serve,
    Show,
    Stalled,
    Started,
    Stop,
    Tick,
    received_each,
)
from chatlog.handles import Bindings, bound_problem, handle_problem
from chatlog.protocol import MAX_LINE, MAX_TEXT
from chatlog.words import NOTICES, address_key, connected_text, timeout_notice

INPUT_ENDED = "Operator input ended; server stopped"
MAX_UNANSWERED = 64  # lines a client may send without an answer before it is dropped as flooding
# The slow-reader rule: a client that lets this much of our output pile up unread is dropped as
# `stalled` (1:1 lines are small and answered one by one, so this is far beyond any real client).
SENDQ = 64 * 1024
UNLIMITED = 1 << 30
GREETING = "Awaiting client connections"
# Said to each client as the answer to its first line when nobody is at the console (the server
# then answers nothing: it records, like an answering machine).
NOBODY_NOTICE = "Nobody is at the console; your words are recorded."
UNATTENDED = " (nobody is at the console: clients are recorded, not answered)"
QUIT_IDLE = "The operator quit; server stopped"
BEGUN_NOTICE = "Your chat has begun."


@dataclass(slots=True, eq=False)
class Peer:
    conn: int
    host: str
    port: int
    connected: float
    handle: str | None = None
    turn_since: float = 0.0  # when the client's current turn (or its wait) began
    said: int = 0  # lines it sent
    unanswered: int = 0  # lines since the operator last answered (the flood rule)
    owed: int = 0  # lines it is blocked on, waiting for an answer
    told_waiting: bool = False
    held: list[Show] = field(default_factory=list)  # what it said while waiting, as shown then
    begun_notice: bool = False  # "your chat has begun" rides with the next answer
    notify: bool = False  # it said `\\caps notify`: notices reach it at once, out of turn
    key: str = ""  # what the per-address cap and fairness count it as (an IPv6 host by its /64)
    fingerprint: str | None = None  # its TLS client certificate's, if it presented one

    def __post_init__(self):
        self.key = address_key(self.host)


def notice_line(handle: str, text: str) -> bytes:
    return protocol.format_line(handle, "*** " + text)


class Turns:
    times_out = True  # a Tick may end a client's turn: the loop reads everyone before one

    def __init__(
        self,
        *,
        handle: str = protocol.SERVER_HANDLE,
        idle_timeout: float | None = 300.0,
        first_timeout: float | None = 30.0,
        max_waiting: int = 5,
        per_address: int = 2,
        max_unanswered: int = MAX_UNANSWERED,
        sendq: int = SENDQ,
        bindings: dict[str, str] | None = None,
        attended: bool = True,
    ):
        self.handle = handle
        self.bindings = Bindings(bindings)  # handles that belong to a certificate
        self.attended = attended  # False: nobody is at the console; nothing is answered
        self.sendq = sendq
        self.idle_timeout = idle_timeout
        self.first_timeout = first_timeout
        self.max_waiting = max_waiting
        self.per_address = per_address
        self.max_unanswered = max_unanswered
        self.current: Peer | None = None
        self.queue: list[Peer] = []
        self.operator_turn = False
        self.finished = False
        self.peers: dict[int, Peer] = {}
        self.last_served: dict[str, float] = {}
        self.input_ended = False  # the operator's input ended: no answer will come any more

    # -- the one entry point ---------------------------------------------------------------------

    def handle_event(self, event: Event) -> list[Decision]:
        if self.finished:
            return []
        match event:
            case Received():
                return self._received(event)
            case ReceivedLines():  # a read's lines, one by one
                out = []
                for line in received_each(event):
                    if self.finished:
                        break
                    out += self._received(line)
                return out
            case OperatorLine():
                return self._operator_line(event)
            case Connected():
                return self._connected(event)
            case Disconnected():
                peer = self.peers.get(event.conn)
                return self._end(peer, "disconnect", event.at) if peer else []
            case Stalled():
                peer = self.peers.get(event.conn)
                return self._end(peer, "stalled", event.at) if peer else []
            case Tick():
                return self._tick(event.at)
            case OperatorEnd():
                self.input_ended = True
                if self.current is None or self.operator_turn:
                    return self._finish(INPUT_ENDED, event.at, "server-quit")
                return []  # the chat ends when the client next speaks and no answer is left
            case Stop():
                return self._finish(f"Server stopped ({event.why})", event.at, "shutdown")
            case Started():
                if not self.attended:
                    return [Show("event", GREETING + UNATTENDED)]
                return [Show("event", GREETING), Prompt(True, commands=True)]
        raise TypeError(f"not an event: {event!r}")

    def deadline(self) -> float | None:
        """When the current client's turn runs out (None: no timer is running)."""
        limit = self._limit()
        return limit[0] if limit else None

    def _limit(self) -> tuple[float, float] | None:
        """(when, seconds) of the timer that runs out first on the current client's turn."""
        cur = self.current
        if cur is None or self.operator_turn:
            return None
        limits = []
        if self.idle_timeout:
            limits.append((cur.turn_since + self.idle_timeout, self.idle_timeout))
        if self.first_timeout and cur.said == 0 and self.queue:
            waited_since = min(p.connected for p in self.queue)
            start = max(cur.turn_since, waited_since)
            limits.append((start + self.first_timeout, start + self.first_timeout - cur.turn_since))
        return min(limits) if limits else None

    def allowance(self, conn: int, now: float) -> int:
        """Lines are taken as they come (the flood rule bounds what goes unanswered)."""
        return UNLIMITED

    def notice(self, text: str) -> bytes:
        """A server notice line, e.g. `SERVER>*** The server shut down.\\n`."""
        return notice_line(self.handle, text)

    @property
    def waiting(self) -> int:
        return len(self.queue)

    # -- events ------------------------------------------------------------------------------------

    def _connected(self, ev: Connected) -> list[Decision]:
        peer = Peer(ev.conn, ev.host, ev.port, ev.at, turn_since=ev.at,
                    fingerprint=ev.link.fingerprint if ev.link is not None else None)
        if self.current is None:
            self.peers[ev.conn] = peer
            self.current = peer
            self.last_served[peer.key] = ev.at
            out: list[Decision] = [Open(ev.conn, ev.host, ev.port, ev.at, served=True, link=ev.link),
                                   Show("event", connected_text(peer.host, peer.port))]
            if self.attended:
                out.append(Prompt(False))  # the client speaks first: no command prompt meanwhile
            return out
        same_host = sum(1 for p in self.queue if p.key == peer.key)
        if len(self.queue) >= self.max_waiting or same_host >= self.per_address:
            why = (
                f"the queue is full ({self.max_waiting} may wait)" if len(self.queue) >= self.max_waiting
                else f"{same_host} from {peer.key} already waiting"
            )
            return [Refuse(ev.conn, ev.host, ev.port, "busy", ev.at, NOTICES["busy"], why)]
        self.peers[ev.conn] = peer
        self.queue.append(peer)
        return [
            Open(ev.conn, ev.host, ev.port, ev.at, served=False, link=ev.link),
            Show("event", f"{ev.host} port {ev.port} is waiting ({len(self.queue)} in the queue)"),
        ]

    def _received(self, ev: Received) -> list[Decision]:
        peer = self.peers.get(ev.conn)
        if peer is None:
            return []
        msg = ev.msg
        if msg.padding:  # not a line: bytes that trailed one, recorded so nothing vanishes
            note = f"{msg.padding} bytes of padding after the previous line"
            return [Commit(peer.conn, "event", peer.handle, "padding", msg.raw, note, ev.at)]
        out: list[Decision] = []
        problem = None
        if msg.handle is not None and msg.handle != peer.handle:
            # The server's handle, a look-alike of it, or one that would not show as itself: the
            # line is recorded under it and marked, never taken as the session's handle. Nothing
            # is sent: an answer out of turn would shift an old client's turns.
            problem = handle_problem(msg.handle, (), self.handle) or bound_problem(
                msg.handle, peer.fingerprint, self.bindings)
            if problem is None:
                if peer.handle is None:
                    out.append(Handle(peer.conn, msg.handle))
                if peer.fingerprint is not None:  # over TLS with a certificate: the handle is its owner's
                    self.bindings.add(msg.handle, peer.fingerprint)
                    out.append(Bind(peer.conn, msg.handle, peer.fingerprint, ev.at))
                peer.handle = msg.handle
        handle = msg.handle if problem is not None else peer.handle
        if self._announces_notify(peer, msg):
            return out + self._notify(peer, handle, msg, ev.at)
        if msg.is_quit:
            return out + self._end(peer, "client-quit", ev.at)
        notes = []
        if msg.cut:
            notes.append(f"line cut at {MAX_LINE} bytes; {msg.cut} more bytes dropped")
        elif len(msg.text) > MAX_TEXT:
            notes.append(f"longer than {MAX_TEXT} characters")
        if problem is not None:
            notes.append(problem)
            # Not as a chat line: on the console it would read as the operator's own words.
            shown = Show("error", f"{peer.host} port {peer.port}: {problem}: {handle}>{msg.text}")
        else:
            shown = Show("client", msg.text, handle)
        verified = problem is None and handle is not None and peer.fingerprint is not None
        out.append(Commit(peer.conn, "client", handle, msg.text, msg.raw, "; ".join(notes) or None, ev.at, verified))
        peer.said += 1
        peer.unanswered += 1
        if not self.attended:
            out += self._unanswered(peer, shown, ev.at)
        elif peer is self.current:
            out.append(shown)
            peer.owed += 1
            if not self.operator_turn:
                self.operator_turn = True
                out.append(Prompt(True))
            if self.input_ended:
                return out + self._finish(INPUT_ENDED, ev.at, "server-quit")
        else:
            peer.held.append(shown)
            if not peer.told_waiting:
                peer.told_waiting = True
                ahead = 1 + self._order().index(peer)
                out.append(Send(peer.conn, notice_line(self.handle, waiting_notice(ahead))))
            else:
                peer.owed += 1
        if peer.unanswered > self.max_unanswered:
            out.append(Show("error", f"{peer.host} port {peer.port} sent {self.max_unanswered} messages unanswered"))
            out += self._end(peer, "flood", ev.at, NOTICES["flood"])
        elif msg.cut:
            out.append(Show("error", f"{peer.host} port {peer.port} sent a line over {MAX_LINE} bytes"))
            out += self._end(peer, "overlong", ev.at, NOTICES["overlong"])
        return out

    def _announces_notify(self, peer: Peer, msg: protocol.Message) -> bool:
        """`\\caps notify` (more words may follow), from a client told it waits, once, while
        the begun notice is still to come: then that notice alone answers it."""
        words = msg.text.split()
        if not words or words[0] != "\\caps" or "notify" not in words[1:] or peer.notify:
            return False
        return peer.told_waiting and (peer is not self.current or peer.begun_notice)

    def _notify(self, peer: Peer, handle: str | None, msg: protocol.Message, at: float) -> list[Decision]:
        peer.notify = True
        out: list[Decision] = [Commit(peer.conn, "event", handle, "capabilities", msg.raw, "notify", at)]
        if peer is self.current and peer.begun_notice:  # served while the line was on its way
            peer.begun_notice = False
            out.append(Send(peer.conn, notice_line(self.handle, BEGUN_NOTICE)))
        return out

    def _unanswered(self, peer: Peer, shown: Show, at: float) -> list[Decision]:
        """Nobody is at the console: a line is recorded and shown, never answered; the answer
        to a client's first line (served or waiting) says so, so no notice shifts its turns."""
        out: list[Decision] = []
        if peer is self.current:
            out.append(shown)
            peer.turn_since = at  # its idle timeout runs from its last line
        else:
            peer.held.append(shown)
        if not peer.told_waiting:
            peer.told_waiting = True
            out.append(Send(peer.conn, notice_line(self.handle, NOBODY_NOTICE)))
        return out

    def _operator_line(self, ev: OperatorLine) -> list[Decision]:
        cur = self.current
        if cur is None and protocol.is_quit(ev.text):
            return self._finish(QUIT_IDLE, ev.at, "server-quit")
        if cur is None or not self.operator_turn:
            return [Show("event", "(no client is waiting for an answer; line not sent)")]
        if protocol.is_quit(ev.text):
            return self._end(cur, "server-quit", ev.at, NOTICES["server-quit"])
        if len(ev.text) > MAX_TEXT:
            return [Show("error", f"message too long ({len(ev.text)} characters, at most {MAX_TEXT}); not sent")]
        text = ev.text
        if "\0" in text:
            # The protocol's text has no NUL: a receiver's framer ends the line there and drops
            # the rest as padding. Sent (and recorded) as the visible escape instead.
            text = text.replace("\0", "\\x00")
        data = protocol.format_line(self.handle, text)
        if cur.begun_notice:
            data = notice_line(self.handle, BEGUN_NOTICE) + data
            cur.begun_notice = False
        cur.unanswered = cur.owed = 0
        cur.turn_since = ev.at
        self.operator_turn = False
        return [
            Commit(cur.conn, "server", self.handle, text, None, None, ev.at),
            Show("operator", text, self.handle),
            Send(cur.conn, data),
            Prompt(False),
        ]

    def _tick(self, now: float) -> list[Decision]:
        limit = self._limit()
        if limit is None or now < limit[0]:
            return []
        seconds = round(limit[1], 1)
        return self._end(self.current, "timeout", now, timeout_notice(seconds), limit=seconds)

    # -- endings -------------------------------------------------------------------------------

    def _end(
        self, peer: Peer, reason: str, at: float, notice: str | None = None, limit: float | None = None
    ) -> list[Decision]:
        if self.peers.pop(peer.conn, None) is None:
            return []
        if peer is not self.current:
            self.queue.remove(peer)
            return [End(peer.conn, reason, at, notice, waiting=True)]
        out: list[Decision] = [End(peer.conn, reason, at, notice, limit=limit)]
        if self.operator_turn:
            out.append(Prompt(False))
        self.current = None
        self.operator_turn = False
        if self.input_ended:
            return out + self._finish(INPUT_ENDED, at, "server-quit")
        if self.queue:
            out += self._serve_next(at)
        else:
            out.append(Show("event", GREETING))
            if self.attended:
                out.append(Prompt(True, commands=True))
        return out

    def _serve_next(self, at: float) -> list[Decision]:
        peer = self._order()[0]
        self.queue.remove(peer)
        self.current = peer
        self.last_served[peer.key] = at
        peer.turn_since = at
        waiting = f" ({len(self.queue)} waiting)" if self.queue else ""
        out: list[Decision] = [Serve(peer.conn, at), Show("event", connected_text(peer.host, peer.port) + waiting)]
        out += peer.held
        peer.held = []
        if not self.attended:
            return out
        peer.begun_notice = peer.told_waiting
        if peer.notify and peer.begun_notice:  # it understands a notice out of turn: at once
            peer.begun_notice = False
            out.append(Send(peer.conn, notice_line(self.handle, BEGUN_NOTICE)))
        if peer.owed:
            self.operator_turn = True
            out.append(Prompt(True))
        return out

    def _order(self) -> list[Peer]:
        """The queue in serving order: the address served longest ago first, then arrival."""
        return sorted(self.queue, key=lambda p: (self.last_served.get(p.key, float("-inf")), p.connected))

    def _finish(self, why: str, at: float, reason: str) -> list[Decision]:
        out: list[Decision] = []
        if self.current is not None:
            out += [End(self.current.conn, reason, at, NOTICES[reason])]
            self.peers.pop(self.current.conn, None)
            self.current = None
        for peer in list(self.queue):
            out.append(End(peer.conn, "shutdown", at, NOTICES["shutdown"], waiting=True))
            self.peers.pop(peer.conn, None)
        self.queue.clear()
        self.operator_turn = False
        self.finished = True
        return out + [Prompt(False), Show("event", why), Finish(why)]


def waiting_notice(ahead: int) -> str:
    return f"Waiting: {ahead} ahead of you. Your chat begins when they are done."
