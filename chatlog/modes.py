"""The two ways to serve, each built in one place: its policy, how its decisions are recorded,
and what the console says of what was recorded.

- `chat_mode(...)`: 1:1 chats (`turns.Turns`): a session per client.
- `room_mode(...)`: a room (`room.Room`): one session for the run, a participant per client.

A mode's store (`ChatStore`, `RoomStore`) is the one mapping from decisions to the recorder:
`record(batch)` writes every store decision of a pass (`events.StoreWrite`) in one transaction
and returns a result for each decision; `describe(decision, result)` is the console line for a
result, if any, and `reply(decision, result)` the bytes its connection is sent (a room's
history: the policy decides that it is sent, `History(conn, n)`; the store reads it from the
recorder's connection in order with the pass's writes; its words are the room's, and the loop
sends what `reply` returns). The server loop imports neither this module nor the store: `cli.py` builds a
mode and hands it to `server.serve`.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from chatlog.events import (
    Bind,
    CloseRoom,
    Commit,
    CommitLines,
    End,
    Forget,
    Handle,
    History,
    Join,
    Open,
    OpenRoom,
    Policy,
    Refuse,
    Serve,
    StoreWrite,
)
from chatlog.handles import key_of
from chatlog.recorder import ROWS_AT_ONCE
from chatlog.render import ended_text
from chatlog.room import history_lines
from chatlog.sanitize import visible
from chatlog.transport import plain_addr

ROOM_COMMANDS = "At the prompt: \\who, \\history [N], \\kick NAME, \\forget NAME, \\quit"
NOBODY = "Nobody is at the console: the room runs until SIGTERM."
REFUSALS_SAID = (10, 100, 1000, 10000, 100000)  # per address and minute, past the first


class _Store:
    """What both modes share: the recorder, the server's own record, refusals."""

    def __init__(self, recorder):
        self.recorder = recorder
        self.local: tuple[str, int] = ("", 0)

    def start(self, local_addr, at: float) -> int:
        """Record this server (once it listens); returns how many sessions a server that stopped
        unexpectedly had left open (now closed as interrupted)."""
        self.local = (plain_addr(local_addr[0]), local_addr[1])
        _, orphans = self.recorder.start(socket.gethostname(), local_addr[1], at)
        return orphans

    def set_hooks(self, on_wait, should_stop) -> None:
        """How the recorder reports waiting on a busy store, and asks whether to give up."""
        self.recorder.on_wait = on_wait
        if should_stop is not None:
            self.recorder.should_stop = should_stop

    def record(self, batch: list) -> list:
        """Every store write of `batch` in one transaction. Messages alone (a 1:1 turn: a line,
        and the answer a script already gave) go in one INSERT, which commits on its own, as
        atomically, without BEGIN and COMMIT around it."""
        results: list = [None] * len(batch)
        writes = [i for i, d in enumerate(batch) if isinstance(d, StoreWrite)]
        if not writes or (len(writes) <= ROWS_AT_ONCE and self._messages([batch[i] for i in writes])):
            return results
        with self.recorder.transaction():
            self._write_all(batch, writes, results)
        return results

    def _messages(self, writes: list) -> bool:
        """Commits alone, in one statement (False: not only commits; nothing was written)."""
        if len(writes) == 1 and type(writes[0]) is Commit:
            self._write(writes[0])
            return True
        return False

    def _write_all(self, batch: list, writes: list[int], results: list) -> None:
        for i in writes:
            results[i] = self._write(batch[i])

    def reply(self, d, result) -> bytes | None:
        """Bytes for the connection of a store decision, from what the store read (None: none)."""
        return None

    def describe(self, d, result) -> str | None:
        if isinstance(d, Refuse):
            # Coalesced per address and minute: a flood of refusals cannot fill the console.
            if result == 1:
                return visible(f"refused {d.host} port {d.port}: {d.why}")
            if result in REFUSALS_SAID:
                return f"refused {result} connections from {d.host} this minute"
        return None

    def _write(self, d):
        if isinstance(d, Refuse):
            return self.recorder.add_refusal(d.host, d.reason, d.at)
        if isinstance(d, Forget):
            self.recorder.forget_handle(d.handle)
        return None

    def _bind(self, d: Bind, table: str, row: int | None) -> None:
        self.recorder.bind(key_of(d.handle), d.handle, d.fingerprint, d.at)
        if row is not None:
            self.recorder.set_verified(table, row)


class ChatStore(_Store):
    """1:1: a session for every client, from its connection (or its wait) to its end."""

    def __init__(self, recorder):
        super().__init__(recorder)
        self.sessions: dict[int, tuple[int, str, int]] = {}  # conn -> (session, host, port)

    def _messages(self, writes: list) -> bool:
        sessions, rows = self.sessions, []
        for d in writes:
            if type(d) is not Commit:
                return False
            if (s := sessions.get(d.conn)) is not None:
                rows.append((s[0], d.sender, d.handle, d.text, d.raw, d.note, d.at, d.verified))
        if rows:
            self.recorder.add_message_rows(rows)
        return True

    def _write(self, d):
        rec = self.recorder
        t = type(d)
        if t is Commit:
            s = self.sessions.get(d.conn) if d.conn is not None else None
            if s is not None:
                rec.add_message(s[0], d.sender, d.handle, d.text, d.raw, d.note, d.at, verified=d.verified)
        elif t is Open:
            sid = rec.begin_session(d.host, d.port, self.local[0], self.local[1], d.at, served=d.served)
            if d.link is not None:
                rec.set_link("sessions", sid, d.link)
            self.sessions[d.conn] = (sid, d.host, d.port)
        elif t is End:
            s = self.sessions.pop(d.conn, None)
            if s is not None:
                return s, rec.end_session(s[0], d.reason, d.at)
        elif t is Bind:
            s = self.sessions.get(d.conn)
            self._bind(d, "sessions", s[0] if s else None)
        elif t is Serve:
            s = self.sessions.get(d.conn)
            if s is not None:
                rec.serve_session(s[0], d.at)
        elif t is Handle:
            s = self.sessions.get(d.conn)
            if s is not None:
                rec.set_handle(s[0], d.handle)
        else:
            return super()._write(d)
        return None

    def describe(self, d, result) -> str | None:
        if isinstance(d, End):
            if result is None:
                return None
            (session, host, port), (client, server) = result
            what = ended_text(d.reason, session, client, server, d.limit)
            if d.waiting:
                what = f"waiting client {host} port {port}: {what}"
            return visible(what)
        return super().describe(d, result)


class RoomStore(_Store):
    """A room: one session for the run, a participant for every client, every line in order."""

    def __init__(self, recorder, *, attended: bool = True, name: str | None = None, notice=None):
        super().__init__(recorder)
        self.attended = attended
        self.name = name  # None: `room-PORT`, once the port is known
        self.notice = notice  # the policy's notice line (its words and handle)
        self.session: int | None = None
        self.participants: dict[int, int] = {}  # conn -> participant

    def _write_all(self, batch: list, writes: list[int], results: list) -> None:
        """Runs of lines go in one executemany each (a burst is most of a pass); anything else
        in between is written in its place, so the order of the record is the order decided."""
        rows: list[tuple] = []
        participants = self.participants
        for i in writes:
            d = batch[i]
            t = type(d)
            if t is Commit:
                pid = participants.get(d.conn) if d.conn is not None else None
                rows.append((d.sender, d.handle, d.text, d.raw, d.note, d.at, pid, d.verified))
                continue
            if t is CommitLines:
                if rows:
                    self.recorder.add_messages(self.session, rows)
                    rows = []
                self.recorder.add_lines(self.session, d.handle, d.lines, participants.get(d.conn), d.verified)
                continue
            if rows:
                self.recorder.add_messages(self.session, rows)
                rows = []
            results[i] = self._write(d)
        if rows:
            self.recorder.add_messages(self.session, rows)

    def _write(self, d):
        rec = self.recorder
        t = type(d)
        if t is Commit:
            pid = self.participants.get(d.conn) if d.conn is not None else None
            rec.add_message(self.session, d.sender, d.handle, d.text, d.raw, d.note, d.at, participant=pid,
                            verified=d.verified)
        elif t is CommitLines:
            rec.add_lines(self.session, d.handle, d.lines, self.participants.get(d.conn), d.verified)
        elif t is Join:
            pid = self.participants[d.conn] = rec.add_participant(self.session, d.host, d.port, d.at)
            if d.link is not None:
                rec.set_link("participants", pid, d.link)
        elif t is End:
            pid = self.participants.pop(d.conn, None)
            if pid is not None:
                rec.end_participant(pid, d.reason, d.at)
        elif t is Handle:
            pid = self.participants.get(d.conn)
            if pid is not None:
                rec.set_participant_handle(pid, d.handle)
        elif t is Bind:
            self._bind(d, "participants", self.participants.get(d.conn))
        elif t is History:
            return rec.room_history(self.name, d.n)
        elif t is OpenRoom:
            if self.name is None:
                self.name = f"room-{self.local[1]}"
            self.session = rec.begin_session(
                None, None, self.local[0], self.local[1], d.at, served=True, kind="room", room=self.name,
            )
            return self.session
        elif t is CloseRoom:
            if self.session is not None:
                rec.end_session(self.session, d.reason, d.at)
        else:
            return super()._write(d)
        return None

    def describe(self, d, result) -> str | None:
        if isinstance(d, OpenRoom):
            said = ROOM_COMMANDS if self.attended else NOBODY
            return f"The room is open (session {result}, {visible(self.name)}); awaiting clients. {said}"
        if isinstance(d, History) and d.conn is None:
            if not result:
                return visible(f"Nothing has been said in {self.name} yet.")
            head, lines, tail = history_lines(self.name, result, d.at)
            return "\n".join([head, *lines, tail])
        return super().describe(d, result)

    def reply(self, d, result) -> bytes | None:
        if isinstance(d, History) and d.conn is not None and result:
            head, lines, tail = history_lines(self.name, result, d.at)
            notice = self.notice or (lambda text: b"*** " + text.encode() + b"\n")
            return notice(head) + "".join(line + "\n" for line in lines).encode() + notice(tail)
        return None


@dataclass
class Mode:
    """What `server.serve` runs: a policy, its store mapping, and how to listen."""

    name: str
    policy: Policy
    store: _Store
    backlog: int  # the listening queue
    link: object = None  # a room's link to other servers (chatlog.link.BrokerLink), or None


def chat_mode(recorder, *, handle, idle_timeout, first_timeout, max_waiting, per_address, attended=True) -> Mode:
    from chatlog.turns import Turns

    policy = Turns(
        bindings=recorder.bindings(), handle=handle, idle_timeout=idle_timeout, first_timeout=first_timeout,
        max_waiting=max_waiting, per_address=2 if per_address is None else (per_address or max_waiting),
        attended=attended,
    )
    return Mode("chat", policy, ChatStore(recorder), backlog=128)


def room_mode(recorder, *, handle, max_clients, per_address, rate, burst, attended=True, name=None,
              history=20) -> Mode:
    from chatlog.room import Room

    policy = Room(
        bindings=recorder.bindings(), handle=handle, max_clients=max_clients, rate=rate, burst=burst, history=history,
        **({} if per_address is None else {"per_address": per_address}),
    )
    store = RoomStore(recorder, attended=attended, name=name, notice=policy.notice)
    return Mode("room", policy, store, backlog=4096)
