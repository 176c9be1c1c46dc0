"""`chatlog serve`: the event loop. It watches connections, the operator's input, the timers and
the signals, reports what happened to the conversation policy (`turns.Turns`, or `room.Room`) as
events, and carries out the decisions it gets back. It decides nothing, and it never touches a
socket: bytes move through `transport` connections, and the mode's store records.

One thread runs one `selectors` loop. Every pass is bounded: at most `PASS_LINES` lines are
taken from a client that alone has input, `SHARED_LINES` from several together (shared fairly,
never more than the policy's `allowance` for a client: the rest stays unread in the kernel's
socket buffer), and the decisions are carried out
in chunks of at most `PENDING_CHUNK`. Each chunk is carried out in two phases: first every store
write, in one transaction (`mode.store.record`), then the console lines and the socket writes,
in order. So nothing is shown or sent that is not committed, and a store that fails for good
leaves nothing half-told: every client is told why and the server stops with one clear line.
"""

from __future__ import annotations

import gc
import selectors
import signal
import time
from contextlib import contextmanager

from chatlog.events import (
    NOTICES,
    Bind,
    Broadcast,
    Commit,
    CommitLines,
    Connected,
    Disconnected,
    End,
    Finish,
    Handle,
    Join,
    Link,
    Open,
    Pause,
    Prompt,
    Publish,
    ReceivedLines,
    Refuse,
    Send,
    Serve,
    Show,
    ShowLines,
    Stalled,
    Started,
    Stop,
    StoreWrite,
    Tick,
)
from chatlog.operator import Console, Operator
from chatlog.protocol import QUIT_LINE, Framer
from chatlog.render import Renderer
from chatlog.sanitize import visible
from chatlog.transport import (
    Acceptor,
    Listener,
    ServeError,
    banner,
    drain_wakeups,
    open_files_limit,
    wakeup_pair,
)

PASS_LINES = 1024  # lines taken in one pass from a client that alone has input (a burst's sender)
SHARED_LINES = 512  # lines taken in one pass from all clients with input, shared among them
MIN_LINES = 8  # ... but at least this many from each (still within its allowance)
PENDING_CHUNK = 4096  # decisions carried out (committed, then sent) at a time
LINK_TAKE = 512  # events taken from a room's link to other servers in one pass
EVENT_LINES = 128  # a read's frames reported in events of at most this many (a Run of whole lines is one)
_QUIET = (Commit, CommitLines, Handle, Open, Serve, Bind, Show, ShowLines, Prompt)  # recorded, shown, prompted: nothing reports back


class Client:
    """The loop's view of one connection: its transport, its framer, and two facts the loop
    carries out for the policy (it hears broadcasts; its reading is paused until a time)."""

    __slots__ = ("id", "io", "framer", "member", "paused_until", "gone")

    def __init__(self, id: int, io):
        self.id = id
        self.io = io
        self.framer = Framer()
        self.member = False
        self.paused_until: float | None = None
        self.gone = False  # the peer is gone; the policy's End will close it


SPIN = 100e-6  # seconds a wait polls before it sleeps, while the last wait was shorter than this


class Watcher:
    """The selector's bookkeeping: what is watched, for what. Tolerant of what is already
    (un)registered, so the loop says what it wants, not how to get there.

    A wait polls for up to SPIN before it sleeps, but only while the last wait was shorter
    than that (as an adaptive mutex spins only while spinning pays): a program chatting at
    machine speed answers within it, and the loop takes its next line without being put to
    sleep and woken again, which on a virtual machine costs more than the pass itself and
    leaves the next pass running cold. A wait that outlasts the spin ends it until one is short
    again, so a chat at human pace, an idle server or a room between lines never spins. What it
    costs is the CPU it polls for: a client that answers each line 100-150 us after it came,
    just past the spin, costs the server ~60 us of CPU a turn more (measured: 140-160 against
    200-220)."""

    def __init__(self):
        self.sel = selectors.DefaultSelector()
        self.spin = False  # the last wait was shorter than SPIN: the next one polls first

    def set(self, obj, events: int, data) -> None:
        try:
            if events:
                self.sel.modify(obj, events, data)
            else:
                self.sel.unregister(obj)
        except KeyError:
            if events:
                self.sel.register(obj, events, data)
        except ValueError:
            pass  # closed already

    def client(self, c: "Client") -> None:
        if not c.gone:
            reading = 0 if c.paused_until is not None else selectors.EVENT_READ
            self.set(c.io, reading | (selectors.EVENT_WRITE if c.io.wants_write else 0), ("client", c))

    def select(self, timeout):
        sel = self.sel
        if timeout == 0:
            return sel.select(0)
        clock = time.perf_counter
        start = clock()
        if self.spin and (timeout is None or timeout > SPIN):
            end = start + SPIN
            while True:
                ready = sel.select(0)
                if ready:
                    return ready
                if clock() >= end:
                    break
            if timeout is not None:
                timeout -= SPIN
        ready = sel.select(timeout)
        self.spin = clock() - start < SPIN
        return ready

    def close(self) -> None:
        self.sel.close()


class Intake:
    """Bounded input: one read from each client with input, each taking its share of the pass's
    lines and never more than the policy allows it (what is left stays in the kernel, or, past a
    read's share, `held` here for the next pass), framed and reported as events."""

    def __init__(self, loop: "Loop"):
        self.loop = loop
        self.held: set[Client] = set()  # input read but not yet taken (past a pass's share)
        # Who has a timer, so a pass looks at them and not at everyone connected: an unterminated
        # line or late padding (its framer's deadline), a pause for its rate (until its end).
        self.timed: set[Client] = set()
        self.paused: set[Client] = set()

    def read(self, clients: list[Client], now: float) -> None:
        if not clients:
            return
        share = PASS_LINES if len(clients) == 1 else max(MIN_LINES, SHARED_LINES // len(clients))
        allowance, held = self.loop.policy.allowance, self.held
        for c in clients:
            if c.gone or c.paused_until is not None:
                continue  # (at a stop too: what a paused client was refused was never taken)
            data = c.io.read(min(share, allowance(c.id, now)))
            if c.io.buffered:
                held.add(c)
            else:
                held.discard(c)
            if data is None:
                if c.io.wants_write:  # (a TLS read that must write first)
                    self.loop.watch.client(c)
            elif data:
                self.frames(c, c.framer.feed(data, now, runs=True))
            else:  # closed or failed: its last word is taken as it goes
                self.loop._gone(c, now)

    def frames(self, c: Client, frames: list) -> None:
        """(Every call of a client's framer is followed by this: its timer is noted here.)"""
        if c.framer.deadline() is None:
            self.timed.discard(c)
        else:
            self.timed.add(c)
        feed = self.loop._feed
        for i in range(0, len(frames), EVENT_LINES):
            feed(ReceivedLines(c.id, frames[i : i + EVENT_LINES] if len(frames) > EVENT_LINES else frames))

    def last_word(self, c: Client, now: float) -> None:
        """A client is gone (however that was noticed: a write to it may fail before a read sees
        the reset): what it sent before, held by its framer or still in the kernel (one bounded
        read, unless it is paused: that was never accepted), is its last word."""
        if c.paused_until is None:
            data = c.io.read(min(PASS_LINES, self.loop.policy.allowance(c.id, now)))
            if data:
                self.frames(c, c.framer.feed(data, now))
        self.frames(c, c.framer.flush(now))

    def resume(self, now: float) -> list[Client]:
        """The paused clients whose pause has ended, no longer paused (the gone forgotten)."""
        if not self.paused:
            return []
        clients, ended = self.loop.clients, []
        for c in list(self.paused):
            if clients.get(c.id) is not c:
                self.paused.discard(c)
            elif now >= c.paused_until:
                c.paused_until = None
                self.paused.discard(c)
                ended.append(c)
        return ended

    def timers(self) -> list[Client]:
        """The clients with a timer running (see `timed` and `paused`)."""
        if not (self.timed or self.paused):
            return []
        clients = self.loop.clients
        return [c for c in self.timed | self.paused if clients.get(c.id) is c]

    def quiet(self, now: float) -> None:
        """Complete the unterminated lines of clients that have gone quiet. Quiet means nothing
        more has arrived: after a long pass the rest of a line may be waiting in the socket, so
        it is read first. A paused client is not quiet."""
        if not self.timed:
            return
        clients = self.loop.clients
        quiet = []
        for c in list(self.timed):
            if clients.get(c.id) is not c:
                self.timed.discard(c)
            elif c.paused_until is None and (d := c.framer.deadline()) is not None and now >= d:
                quiet.append(c)
        quiet.sort(key=lambda c: c.id)  # (in the order they connected, as before)
        self.read(quiet, now)
        for c in quiet:
            if c.id in clients:
                self.frames(c, c.framer.flush_if_quiet(now))


class Handshakes:
    """TLS connections whose handshake is under way: stepped when their socket is ready or
    their deadline passes; a failed one is said on the console (once per address and reason,
    then counted) and closed."""

    def __init__(self, loop: "Loop"):
        self.loop = loop
        self.clients: dict[int, Client] = {}

    def add(self, c: Client) -> None:
        self.clients[c.id] = c
        self.loop.watch.set(c.io, selectors.EVENT_READ, ("hs", c))

    def expired(self, now: float) -> list[Client]:
        if not self.clients:
            return []
        return [c for c in self.clients.values() if now >= c.io.deadline]

    def step(self, c: Client, now: float):
        """Go on with `c`'s handshake: its connection once done, else None."""
        io, loop = c.io, self.loop
        if not io.handshake(now):
            loop.watch.set(io, selectors.EVENT_READ | (selectors.EVENT_WRITE if io.wants_write else 0), ("hs", c))
            return None
        del self.clients[c.id]
        failures = loop.acceptor.handshake_over(io)
        if not io.failed:
            return io
        loop.watch.set(io, 0, None)
        if line := handshake_line(io, failures):
            loop.console.write(loop.r.paint("event", line))
        return None


class Loop:
    def __init__(self, policy, store, listeners: list, renderer: Renderer, console: Console,
                 operator: Operator, *, echo_operator: bool = True, link=None):
        self.policy = policy
        # A room's link to other servers (chatlog.link.BrokerLink, its client run in this thread),
        # or None: one more source of events, and one more place decisions go (`publish_first`).
        self.link = link
        # Decisions recorded in phase one (or published before it) and nothing more, like Commit:
        # not acted on, and broadcasts gather across them.
        self._recorded = frozenset((CommitLines, Commit, Handle, Open, Serve, Publish, *getattr(store, "record_only", ())))
        self.store = store
        self.acceptor = Acceptor(listeners)
        self.r = renderer
        self.console = console
        self.operator = operator
        self.echo_operator = echo_operator
        self.watch = Watcher()
        self.clients: dict[int, Client] = {}
        self.tls = Handshakes(self)  # TLS clients the policy has not heard of yet
        self._next_id = 1
        self.pending: list = []
        self._bcast: list[tuple[bytes, int | None]] = []
        self._later: list = []  # (decision, result) for the console, after the sockets (`_act`)
        self.intake = Intake(self)
        self.finished = False
        self.failure: str | None = None  # why the store failed for good
        self.stopping: str | None = None
        self._operator_watched = False
        self._carrying = False

    # -- the loop ------------------------------------------------------------------------------

    def run(self, wake) -> None:
        """Serve until stopped; `wake` is the socket a stop signal wakes the loop through (the signals are ours by now: from here on Ctrl-C closes cleanly)."""
        self._watch_listeners(True)
        self.watch.set(wake, selectors.EVENT_READ, ("wake", wake))
        if self.link is not None:
            self.watch.set(self.link.wake, selectors.EVENT_READ, ("link", self.link))
        try:
            self._feed(Started(time.time()))
            self._carry_out()
            self._operator_input()
            while not self.finished:
                self.console.flush_due(time.time())  # this pass's console lines (or with the next's)
                self._pass()
        finally:
            for c in [*self.clients.values(), *self.tls.clients.values()]:
                c.io.close()
            self.acceptor.close()
            self.watch.close()

    def _on_signal(self, signum, frame) -> None:
        self.stopping = signal.Signals(signum).name

    def _pass(self) -> None:
        readable: list[Client] = []
        link_io = False
        for key, mask in self.watch.select(self._timeout()):
            kind, obj = key.data
            if kind == "client":
                if mask & selectors.EVENT_WRITE and not obj.gone:
                    obj.io.flush()
                    self._after_write(obj)
                    if obj.io.buffered:  # (a TLS read that waited for the socket to be writable)
                        self.intake.held.add(obj)
                if mask & selectors.EVENT_READ:
                    readable.append(obj)
            elif kind == "hs":
                self._handshake(obj, time.time())
            elif kind == "listen":
                self._accept(obj)
            elif kind == "operator":
                for note in self.operator.read_available():
                    self.console.write(self.r.paint("event", note))
            elif kind == "link":
                link_io = True
            else:
                drain_wakeups(obj)
        now = time.time()
        if self.stopping is not None:
            # What was already taken is the clients' last word; what a paused client has yet to
            # send was never accepted (it is told the server shut down). One bounded read each.
            self.intake.read(readable + [c for c in self.intake.held if c not in readable], now)
            for c in list(self.clients.values()):
                self.intake.frames(c, c.framer.flush(now))
            take_from_link(self, link_io, now)  # (a linked room records what it published before it ends)
            self._feed(Stop(self.stopping, now))
            self._carry_out()
            return
        for c in self.intake.held:
            if c not in readable and c.paused_until is None:
                readable.append(c)
        self.intake.read(readable, now)
        self.intake.quiet(now)
        take_from_link(self, link_io, now)
        deadline = self.policy.deadline()
        if deadline is not None and now >= deadline:
            if self.policy.times_out:  # what came in time is read before anyone is timed out (a
                self.intake.read(list(self.clients.values()), now)  # stall: SIGSTOP, a lock wait)
            self._feed(Tick(now))
        for c in self.tls.expired(now):
            self._handshake(c, now)
        self._resume(now)
        self._carry_out()
        self._operator_input()

    def _timeout(self) -> float | None:
        if self.intake.held and any(c.paused_until is None for c in self.intake.held):
            return 0.0  # input is held that the kernel will not signal again
        now = time.time()
        more = [self.console.due]
        if self.tls.clients:
            more += [c.io.deadline for c in self.tls.clients.values()]
        if self.link is not None:  # (more than a pass took, or the broker client's own timers)
            more.append(self.link.deadline(now))
        when = next_deadline(self.policy.deadline(), self.acceptor.paused_until, self.intake.timers(), more)
        return None if when is None else max(0.0, when - now)

    def _feed(self, event) -> None:
        self.pending.extend(self.policy.handle_event(event))
        if len(self.pending) >= PENDING_CHUNK and not self._carrying:
            self._carry_out()  # commits in bounded chunks

    def _gone(self, c: Client, now: float) -> None:
        """The peer closed or failed: stop watching it and say so (the policy's End closes it)."""
        if c.gone:
            return
        c.gone = True
        self.intake.last_word(c, now)
        self.intake.held.discard(c)
        self.watch.set(c.io, 0, None)
        self._feed(Disconnected(c.id, now))

    def _operator_input(self) -> None:
        """Hand the policy the operator's lines while it wants them, and the end of input."""
        for event in self.operator.events() if self.operator.may_have_events() else ():
            if self.finished:
                break
            self._feed(event)
            self._carry_out()
        op = self.operator
        on = op.watch()
        if on != self._operator_watched and op.fd is not None:
            self.watch.set(op.fd, selectors.EVENT_READ if on else 0, ("operator", None))
            self._operator_watched = on

    # -- connections ---------------------------------------------------------------------------

    def _accept(self, listener: Listener) -> None:
        acc = self.acceptor
        told = acc.at_limit
        for io in acc.accept(listener, time.time()):
            c = Client(self._next_id, io)
            self._next_id += 1
            if io.kind == "tls":
                self.tls.add(c)
                continue
            self.clients[c.id] = c
            self.watch.set(io, selectors.EVENT_READ, ("client", c))
            self._feed(Connected(c.id, io.host, io.port, time.time()))
        if acc.paused_until is not None:
            self._watch_listeners(False)
        if bool(acc.at_limit) != bool(told):  # said once as it starts, once as it ends
            self.console.write(accept_line(self.r, acc.at_limit))

    def _handshake(self, c: Client, now: float) -> None:
        io = self.tls.step(c, now)
        if io is not None:  # done: the policy hears of the client
            self.clients[c.id] = c
            self.watch.client(c)
            self._feed(Connected(c.id, io.host, io.port, now, Link("tls", io.version, io.cipher, io.peer_fingerprint)))
            if io.buffered:
                self.intake.held.add(c)

    def _watch_listeners(self, on: bool) -> None:
        for lst in self.acceptor.listeners:
            self.watch.set(lst, selectors.EVENT_READ if on else 0, ("listen", lst))

    def _resume(self, now: float) -> None:
        if self.acceptor.resume(now):
            self._watch_listeners(True)
        for c in self.intake.resume(now):
            self.watch.client(c)

    # -- carrying out decisions ----------------------------------------------------------------

    def _carry_out(self) -> None:
        self._carrying = True
        try:
            self._carry_out_pending()
        finally:
            self._carrying = False

    def _carry_out_pending(self) -> None:
        while self.pending and not self.finished:
            batch, self.pending = self.pending, []
            take_answer(self.operator, self.policy, batch)
            if self.link is not None:
                self.link.publish_first(batch)
            try:
                results = self.store.record(batch)
            except Exception as exc:  # noqa: BLE001  (the recorder's StoreFailed, worded)
                if not _is_store_failure(exc):
                    raise
                self._store_failed(str(exc))
                return
            later, recorded = self._later, self._recorded
            for decision, result in zip(batch, results, strict=True):
                t = type(decision)
                if t is Show or t is ShowLines or t is Prompt:
                    later.append((decision, None))
                elif t not in recorded:
                    self._act(decision, result)
            if self._bcast:
                self._flush_broadcasts()
            if later:  # then the console (and the operator's prompt), in the batch's order
                self._later = []
                for decision, result in later:
                    to_console(self, decision, result)

    def _act(self, d, result) -> None:
        """Phase two: the sockets. What is for the console (its lines, the prompt) is held for
        after them, in order: no answer or relay waits while the batch's lines are formatted."""
        t = type(d)
        if t is Broadcast:
            self._bcast.append((d.data, d.exclude))
            return
        if self._bcast and t is not Pause:
            self._flush_broadcasts()  # what was said before reaches everyone before what follows
        if t is Send:
            c = self.clients.get(d.conn)
            if c is not None:
                self._send(c, d.data)
                self.intake.frames(c, c.framer.spoke())  # our answer ends any padding it was sending
        elif t is End or t is Refuse:
            c = self.clients.pop(d.conn, None)
            if c is not None:
                self._close(c, d.notice)
        elif t is Pause:
            c = self.clients.get(d.conn)
            if c is not None:
                c.paused_until = d.until
                self.intake.paused.add(c)
                self.watch.client(c)
        elif t is Finish:
            self.finished = True
        elif t is Join:
            c = self.clients.get(d.conn)
            if c is not None:
                c.member = True  # it hears what is said from now on, not before
        if isinstance(d, StoreWrite):
            self._later.append((d, result))  # (what the store says of it, on the console)
            data = self.store.reply(d, result)  # what the store read for d.conn (a room's history)
            if data is not None and (c := self.clients.get(d.conn)) is not None:
                self._send(c, data)

    # -- sending and closing -------------------------------------------------------------------

    def _flush_broadcasts(self) -> None:
        """Every line broadcast since the last flush, in one write per connection."""
        lines, self._bcast = self._bcast, []
        for c, data in fan_out(lines, list(self.clients.values())):
            self._send(c, data)

    def _send(self, c: Client, data: bytes) -> None:
        io = c.io
        had = io.wants_write
        io.write(data)
        if io.failed or (io.backlog > self.policy.sendq and not io.stalled) or io.wants_write != had:
            self._after_write(c)

    def _after_write(self, c: Client) -> None:
        """Report a peer that failed or stopped reading; watch for writability while output waits."""
        io = c.io
        if io.failed:
            self._gone(c, time.time())
            return
        if io.backlog > self.policy.sendq and not io.stalled:
            backlog = io.backlog
            io.stall()
            self._feed(Stalled(c.id, time.time(), backlog))
        self.watch.client(c)

    def _close(self, c: Client, notice: str | None) -> None:
        """Best effort, never waiting on a client that does not read: what is queued, the notice and `\\quit`, then close."""
        self.intake.held.discard(c)
        if not c.gone:
            self.watch.set(c.io, 0, None)
        c.gone = True
        c.io.close(self.policy.notice(notice) + QUIT_LINE if notice is not None else None)

    def _store_failed(self, why: str) -> None:
        """Nothing of the failed pass was shown or sent. Tell every client, and stop."""
        self.failure = why
        self.pending = []
        for c in list(self.clients.values()):
            self._close(c, NOTICES["store"])
        self.clients.clear()
        self.finished = True


def to_console(loop: Loop, d, result) -> None:
    """Phase three: the console's lines and the operator's prompt, after the sockets."""
    t = type(d)
    if t is Show or t is ShowLines:
        if d.kind != "operator" or loop.echo_operator:
            loop.console.extend(show_lines(loop.r, d))
    elif t is Prompt:
        if loop.operator.tty:  # what the answer answers is on screen before the prompt
            loop.console.flush()
        loop.operator.want(d.on, d.commands)
    else:
        line = loop.store.describe(d, result)
        if line is not None:
            loop.console.write(loop.r.paint("event", line))


def take_from_link(loop: Loop, io: bool, now: float) -> None:
    """What the broker sent (`io`: its socket was readable), as events for the policy: at most
    LINK_TAKE a pass, the rest the next."""
    if loop.link is not None:
        for event in loop.link.events(io, LINK_TAKE, now):
            loop._feed(event)


def take_answer(operator: Operator, policy, batch: list) -> None:
    """An answer a script already gave to what `batch` prompts for joins it: the message and its
    answer are committed in one transaction, before either is shown or sent. Only for a batch
    that records, shows and prompts (nothing in it reports back), never from a terminal (an
    answer is typed there once what it answers is on screen)."""
    last = batch[-1]
    if operator.tty or type(last) is not Prompt or not last.on:
        return
    for d in batch:
        if type(d) not in _QUIET:
            return
    for d in batch:
        if type(d) is Prompt:
            operator.want(d.on, d.commands)
    event = next(operator.events(), None)
    if event is not None:
        batch += policy.handle_event(event)


def handshake_line(io, n: int) -> str | None:
    """A failed TLS handshake, said once per address and reason, then at 10, 100, ... of them."""
    if n == 1:
        return visible(f"TLS handshake with {io.host} port {io.port} failed: {io.error}")
    if n in (10, 100, 1000, 10000, 100000):
        return visible(f"{n} failed TLS handshakes from {io.host} ({io.error})")
    return None


def accept_line(r: Renderer, at_limit: str | None) -> str:
    if at_limit is None:
        return r.paint("event", "accepting connections again")
    return r.paint("error", f"cannot accept connections: {at_limit} (limit {open_files_limit()}); "
                   "new clients wait in the kernel's queue until some leave")


def next_deadline(policy_deadline, accept_paused_until, clients, more=()) -> float | None:
    """The earliest of the policy's timer, the end of an accept pause, the quiet deadlines of
    unterminated lines, the ends of clients' pauses and `more` (None: nothing is timed)."""
    deadlines = [d for d in (policy_deadline, accept_paused_until, *more) if d is not None]
    for c in clients:
        d = c.framer.deadline()
        if d is not None:
            deadlines.append(d)
        if c.paused_until is not None:
            deadlines.append(c.paused_until)
    return min(deadlines) if deadlines else None


def fan_out(lines: list[tuple[bytes, int | None]], clients: list[Client]):
    """(client, bytes) for every member: the same joined bytes for everyone who said none of
    `lines`, and its own selection for each one who said some (a sender does not hear itself)."""
    everyone = b"".join(data for data, _ in lines)
    senders = {ex for _, ex in lines if ex is not None}
    for c in clients:
        if not c.member:
            continue
        if c.id in senders:
            data = b"".join(data for data, ex in lines if ex != c.id)
            if data:
                yield c, data
        else:
            yield c, everyone


@contextmanager
def stop_signals(handler):
    """INT, TERM and HUP go to `handler` while inside; each also wakes the loop through the
    socket yielded (watch it for reading). On the way out they are left ignored: only `chatlog
    serve` uses this, as the last thing its process does."""
    wake_r, wake_w = wakeup_pair()
    old_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    # A signal ignored when we were started stays ignored (`nohup`, or `&` in a script): TERM never.
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
           if sig == signal.SIGTERM or signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield wake_r
    finally:
        # A stop is under way (the server's last act): a further signal, as make passes its own
        # TERM on to the server it runs, must not kill it while it closes its record and exits.
        # So the signals are not handed back to a default that would: they are ignored (which,
        # unlike a Python handler, the interpreter's own shutdown leaves in place).
        signal.set_wakeup_fd(old_wakeup)
        for sig in old:
            signal.signal(sig, signal.SIG_IGN)
        wake_r.close()
        wake_w.close()


def show_lines(r: Renderer, d: Show | ShowLines) -> list[str]:
    """A Show or ShowLines decision as the console prints it."""
    if type(d) is Show:
        return [show_line(r, d)]
    return r.chat_lines("client" if d.kind == "client" else "server", d.handle, d.texts)


def show_line(r: Renderer, d: Show) -> str:
    """A Show decision as the console prints it."""
    if d.kind in ("client", "server", "operator"):
        return r.chat_line("client" if d.kind == "client" else "server", d.handle, d.text)
    return r.paint({"error": "error", "note": "dim"}.get(d.kind, "event"), visible(d.text))


def store_wait_line(r: Renderer, seconds: float, resumed: bool) -> str:
    if resumed:
        return r.paint("event", "the database is free again; the chat goes on")
    return r.paint(
        "error",
        f"the database is locked by another process; waiting ({seconds:.0f}s so far, nothing is lost)",
    )


def _is_store_failure(exc: BaseException) -> bool:
    from chatlog.db import StoreError

    return isinstance(exc, StoreError)


# -- running it ----------------------------------------------------------------------------------


def serve(mode, sockets: list, renderer: Renderer, stdin, *, bind: str | None = None,
          tls_sockets: list = (), tls=None, retention=None) -> None:
    """Run `mode` (a policy and its store, see `chatlog.modes`) on listening `sockets` (plain)
    and `tls_sockets` (TLS, with `tls`, a `chatlog.tls.ServerCert`) until it is stopped, with
    `retention` (a `chatlog.retention.Retention`) in the background. Raises ServeError if the
    store fails for good (every client has been told)."""
    console = Console(renderer.stream)
    try:
        loop = _prepare(mode, sockets, renderer, stdin, console, bind, tls_sockets, tls)
        if retention is not None:
            from chatlog.retention import describe

            console.write(renderer.paint("dim", f"Keeping {describe(retention.older_than)}: sessions that ended "
                                         "earlier are removed from the record in the background"))
            retention.start(lambda line: console.post(renderer.paint("event", line)))
        saved_tty = _save_tty(stdin)
        # The signals stay ours until the last console line is written: a second TERM (make
        # passes its own on to the server it runs) must not kill the server mid-goodbye.
        with stop_signals(loop._on_signal) as wake:
            try:
                settle_heap()
                loop.run(wake)
            finally:
                if retention is not None:
                    retention.stop()
                _restore_tty(stdin, saved_tty)
                console.close()
    finally:
        console.close()
    if loop.failure:
        raise ServeError(f"{loop.failure}; the server stopped (every client was told)")


def settle_heap() -> None:
    """What start-up made (the modules, click, the broker client) lives as long as the process:
    it is set aside from the collector's passes (`gc.freeze`), which otherwise walk all of it in
    every full collection, a stall of the loop (15-18 ms measured in a linked room's server,
    4-6 ms after this). Start-up's garbage is collected first, so none of it is kept."""
    gc.collect()
    gc.freeze()


def _prepare(mode, sockets, renderer, stdin, console, bind, tls_sockets=(), tls=None) -> Loop:
    """The banner, the server's record, the operator: everything but the loop."""
    context = None
    note = pin = None
    if tls_sockets:
        from chatlog.tls import server_context

        context = server_context(tls)
        if tls.made or tls.cert.name == "chatlog-tls-cert.pem":
            pin = tls.fingerprint
            note = f"TLS certificate (self-signed, {'made now and ' if tls.made else ''}kept in {tls.cert.parent}): {pin}"
        else:
            note = f"TLS certificate {tls.cert}: {tls.fingerprint}"
    for line in banner(bind, sockets, tls_sockets, pin, note):
        console.write(line)
    store, policy = mode.store, mode.policy
    # Starting waits on a database another process holds locked, like any write: say so, or the
    # banner stands there as if the server were up while nobody is accepted.
    # (said once, and when it frees)
    def on_wait(seconds, resumed):  # said at once: the loop is waiting, not passing
        console.write(store_wait_line(renderer, seconds, resumed))
        console.flush()

    store.set_hooks(on_wait, None)
    orphans = store.start((sockets or tls_sockets)[0].getsockname(), time.time())
    if orphans:
        what = "1 session" if orphans == 1 else f"{orphans} sessions"
        console.write(renderer.paint(
            "event", f"closed {what} left open by a server that stopped unexpectedly, as interrupted"
        ))
    link = getattr(mode, "link", None)
    if link is not None:
        console.write(renderer.paint("event", link.describe()))
    operator = Operator(
        stdin, console, prompt=f"{policy.handle}>", color_prompt=renderer.prompt(f"{policy.handle}>")
    )
    if operator.tty and renderer.color:
        operator.prompt = renderer.paint("server", f"{policy.handle}>")
    echo = not (operator.tty and console.stream.isatty())
    listeners = [Listener(s) for s in sockets] + [Listener(s, context, tls.handshake_timeout) for s in tls_sockets]
    loop = Loop(policy, store, listeners, renderer, console, operator, echo_operator=echo,
                link=getattr(mode, "link", None))
    store.set_hooks(on_wait, lambda: loop.stopping is not None)
    return loop


def _save_tty(stdin):
    try:
        if stdin.isatty():
            import termios

            return termios.tcgetattr(stdin.fileno())
    except Exception:  # noqa: BLE001  (no terminal to restore)
        return None
    return None


def _restore_tty(stdin, saved) -> None:
    if saved is None:
        return
    try:
        import termios

        termios.tcsetattr(stdin.fileno(), termios.TCSADRAIN, saved)
    except Exception:  # noqa: BLE001
        pass
