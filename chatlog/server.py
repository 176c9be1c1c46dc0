"""`chatlog serve`: the event loop. It watches connections, the operator's input, the timers and
the signals, reports what happened to the conversation policy (`turns.Turns`, or `room.Room`) as
events, and carries out the decisions it gets back. It decides nothing, and it never touches a
socket: bytes move through `transport` connections, and the mode's store records.

One thread runs one `selectors` loop. Every pass is bounded: at most `PASS_LINES` lines are
taken from all clients together (shared fairly, never more than the policy's `allowance` for a
client: the rest stays unread in the kernel's socket buffer), and the decisions are carried out
in chunks of at most `PENDING_CHUNK`. Each chunk is carried out in two phases: first every store
write, in one transaction (`mode.store.record`), then the console lines and the socket writes,
in order. So nothing is shown or sent that is not committed, and a store that fails for good
leaves nothing half-told: every client is told why and the server stops with one clear line.
"""

from __future__ import annotations

import selectors
import signal
import time

from chatlog import protocol
from chatlog.events import (
    NOTICES,
    Broadcast,
    Connected,
    Disconnected,
    End,
    Finish,
    Join,
    OperatorEnd,
    OperatorLine,
    Pause,
    Prompt,
    Received,
    Refuse,
    Send,
    Show,
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
    AtLimit,
    Listener,
    ServeError,
    banner,
    drain_wakeups,
    open_files_limit,
    wakeup_pair,
)

ACCEPT_BACKOFF = (0.05, 2.0)  # at the open-files limit, stop accepting for this long (doubling)
ACCEPTS_PER_PASS = 64
PASS_LINES = 2048  # lines taken from all clients in one pass, shared among those with input
MIN_LINES = 16  # ... but at least this many from each (still within its allowance)
PENDING_CHUNK = 4096  # decisions carried out (committed, then sent) at a time


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


class Loop:
    def __init__(self, policy, store, listeners: list, renderer: Renderer, console: Console,
                 operator: Operator, *, echo_operator: bool = True):
        self.policy = policy
        self.store = store
        self.listeners = listeners
        self.r = renderer
        self.console = console
        self.operator = operator
        self.echo_operator = echo_operator
        self.sel = selectors.DefaultSelector()
        self.clients: dict[int, Client] = {}
        self._next_id = 1
        self.pending: list = []
        self._bcast: list[tuple[bytes, int | None]] = []
        self._held: set[Client] = set()  # input read but not yet taken (past a pass's share)
        self.finished = False
        self.failure: str | None = None  # why the store failed for good
        self.stopping: str | None = None
        self._operator_watched = False
        self._accept_paused_until: float | None = None
        self._accept_backoff = ACCEPT_BACKOFF[0]
        self._told_busy = False
        self._told_end = False

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        for lst in self.listeners:
            self.sel.register(lst, selectors.EVENT_READ, ("listen", lst))
        wake_r, wake_w = wakeup_pair()
        self.sel.register(wake_r, selectors.EVENT_READ, ("wake", wake_r))
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        stops = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
        old_handlers = {sig: signal.signal(sig, self._on_signal) for sig in stops}
        try:
            # Only now that the signals are ours: from here on Ctrl-C closes cleanly.
            self._feed(Started(time.time()))
            self._carry_out()
            self._operator_input()
            while not self.finished:
                self._pass()
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            for c in list(self.clients.values()):
                c.io.close()
            wake_r.close()
            wake_w.close()
            for lst in self.listeners:
                lst.close()
            self.sel.close()

    def _on_signal(self, signum, frame) -> None:
        self.stopping = signal.Signals(signum).name

    def _pass(self) -> None:
        readable: list[Client] = []
        for key, mask in self.sel.select(self._timeout()):
            kind, obj = key.data
            if kind == "client":
                if mask & selectors.EVENT_WRITE and not obj.gone:
                    obj.io.flush()
                    self._after_write(obj)
                if mask & selectors.EVENT_READ:
                    readable.append(obj)
            elif kind == "listen":
                self._accept(obj)
            elif kind == "operator":
                for note in self.operator.read_available():
                    self.console.write(self.r.paint("event", note))
            else:
                drain_wakeups(obj)
        now = time.time()
        if self.stopping is not None:
            # What was already taken is the clients' last word; what a paused client has yet to
            # send was never accepted (it is told the server shut down). One bounded read each.
            self._read(readable + [c for c in self._held if c not in readable], now)
            for c in list(self.clients.values()):
                self._frames(c, c.framer.flush(now))
            self._feed(Stop(self.stopping, now))
            self._carry_out()
            return
        for c in self._held:
            if c not in readable and c.paused_until is None:
                readable.append(c)
        self._read(readable, now)
        self._quiet_frames(now)
        deadline = self.policy.deadline()
        if deadline is not None and now >= deadline:
            # Read what has arrived before timing anyone out: after a stall (SIGSTOP, a long
            # lock wait) a message sent in time may be waiting in the socket.
            self._read(list(self.clients.values()), now)
            self._feed(Tick(now))
        self._resume(now)
        self._carry_out()
        self._operator_input()

    def _timeout(self) -> float | None:
        if any(c.paused_until is None for c in self._held):
            return 0.0
        deadlines = [d for d in (self.policy.deadline(), self._accept_paused_until) if d is not None]
        for c in self.clients.values():
            d = c.framer.deadline()
            if d is not None:
                deadlines.append(d)
            if c.paused_until is not None:
                deadlines.append(c.paused_until)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.time())

    def _feed(self, event) -> None:
        self.pending.extend(self.policy.handle_event(event))
        if len(self.pending) >= PENDING_CHUNK:
            self._carry_out()

    # -- reading -------------------------------------------------------------------------------

    def _read(self, clients: list[Client], now: float) -> None:
        """One read from each of `clients`, each taking its share of the pass's lines, never more
        than the policy allows it (a paused client is not read, but at a stop)."""
        if not clients:
            return
        share = max(MIN_LINES, PASS_LINES // len(clients))
        allowance = self.policy.allowance
        for c in clients:
            if c.gone or c.paused_until is not None:
                continue  # (at a stop too: what a paused client was refused was never taken)
            data = c.io.read(min(share, allowance(c.id, now)))
            if c.io.buffered:
                self._held.add(c)
            else:
                self._held.discard(c)
            if data is None:
                continue
            if data:
                self._frames(c, c.framer.feed(data, now))
            else:
                self._frames(c, c.framer.flush(now))
                self._gone(c, now)

    def _frames(self, c: Client, frames) -> None:
        for frame in frames:
            self._feed(Received(c.id, protocol.parse(frame), frame.at))

    def _quiet_frames(self, now: float) -> None:
        """Complete the unterminated lines of clients that have gone quiet. Quiet means nothing
        more has arrived: after a long pass the rest of a line may be waiting in the socket, so
        it is read first. A paused client is not quiet."""
        quiet = [c for c in self.clients.values()
                 if c.paused_until is None and (d := c.framer.deadline()) is not None and now >= d]
        self._read(quiet, now)
        for c in quiet:
            if c.id in self.clients:
                self._frames(c, c.framer.flush_if_quiet(now))

    def _gone(self, c: Client, now: float) -> None:
        """The peer closed or failed: stop watching it and say so (the policy's End closes it)."""
        if c.gone:
            return
        c.gone = True
        self._held.discard(c)
        try:
            self.sel.unregister(c.io)
        except (KeyError, ValueError):
            pass
        self._feed(Disconnected(c.id, now))

    # -- the operator --------------------------------------------------------------------------

    def _operator_input(self) -> None:
        """Hand the policy the operator's lines while it wants them, and the end of input."""
        op = self.operator
        while not self.finished:
            op.fill()
            line = op.take()
            if line is not None:
                self._feed(OperatorLine(line, time.time()))
                self._carry_out()
                op.rearm()
                continue
            if op.ended and not self._told_end:
                self._told_end = True  # once: the policy decides when that ends the chat
                self._feed(OperatorEnd(time.time()))
                self._carry_out()
            break
        on = op.watch()
        if on != self._operator_watched and op.fd is not None:
            if on:
                self.sel.register(op.fd, selectors.EVENT_READ, ("operator", None))
            else:
                self.sel.unregister(op.fd)
            self._operator_watched = on

    # -- connections ---------------------------------------------------------------------------

    def _accept(self, listener: Listener) -> None:
        for _ in range(ACCEPTS_PER_PASS):  # bounded, so one pass cannot starve the chat
            try:
                io = listener.accept()
            except AtLimit as exc:
                self._pause_accepting(str(exc))
                return
            if io is None:
                return
            if self._told_busy:
                self._told_busy = False
                self.console.write(self.r.paint("event", "accepting connections again"))
            self._accept_backoff = ACCEPT_BACKOFF[0]
            c = Client(self._next_id, io)
            self._next_id += 1
            self.clients[c.id] = c
            self.sel.register(io, selectors.EVENT_READ, ("client", c))
            self._feed(Connected(c.id, io.host, io.port, time.time()))

    def _pause_accepting(self, why: str) -> None:
        """At the open-files limit the listening socket stays readable: stop watching it for a
        while instead of spinning, and say so once."""
        for lst in self.listeners:
            try:
                self.sel.unregister(lst)
            except (KeyError, ValueError):
                pass
        self._accept_paused_until = time.time() + self._accept_backoff
        self._accept_backoff = min(self._accept_backoff * 2, ACCEPT_BACKOFF[1])
        if not self._told_busy:
            self._told_busy = True
            self.console.write(self.r.paint(
                "error",
                f"cannot accept connections: {why} (limit {open_files_limit()}); "
                "new clients wait in the kernel's queue until some leave",
            ))

    def _resume(self, now: float) -> None:
        if self._accept_paused_until is not None and now >= self._accept_paused_until:
            self._accept_paused_until = None
            for lst in self.listeners:
                self.sel.register(lst, selectors.EVENT_READ, ("listen", lst))
        for c in self.clients.values():
            if c.paused_until is not None and now >= c.paused_until:
                c.paused_until = None
                self._interest(c)

    def _interest(self, c: Client) -> None:
        if c.gone:
            return
        events = 0 if c.paused_until is not None else selectors.EVENT_READ
        if c.io.wants_write:
            events |= selectors.EVENT_WRITE
        try:
            if events:
                self.sel.modify(c.io, events, ("client", c))
            else:
                self.sel.unregister(c.io)
        except KeyError:
            if events:
                self.sel.register(c.io, events, ("client", c))
        except ValueError:
            pass

    # -- carrying out decisions ----------------------------------------------------------------

    def _carry_out(self) -> None:
        while self.pending and not self.finished:
            batch, self.pending = self.pending, []
            try:
                results = self.store.record(batch)
            except Exception as exc:  # noqa: BLE001  (the recorder's StoreFailed, worded)
                if not _is_store_failure(exc):
                    raise
                self._store_failed(str(exc))
                return
            for decision, result in zip(batch, results, strict=True):
                self._act(decision, result)
            if self._bcast:
                self._flush_broadcasts()

    def _act(self, d, result) -> None:
        """Phase two: the console and the sockets."""
        t = type(d)
        if t is Broadcast:
            self._bcast.append((d.data, d.exclude))
            return
        if t is Show:
            self._show(d)
            return
        if self._bcast and t is not Pause:
            self._flush_broadcasts()  # what was said before reaches everyone before what follows
        if t is Send:
            c = self.clients.get(d.conn)
            if c is not None:
                self._send(c, d.data)
                self._frames(c, c.framer.spoke())  # our answer ends any padding it was sending
        elif t is End or t is Refuse:
            c = self.clients.pop(d.conn, None)
            if c is not None:
                self._close(c, d.notice)
        elif t is Pause:
            c = self.clients.get(d.conn)
            if c is not None:
                c.paused_until = d.until
                self._interest(c)
        elif t is Prompt:
            self.operator.want(d.on)
        elif t is Finish:
            self.finished = True
        elif t is Join:
            c = self.clients.get(d.conn)
            if c is not None:
                c.member = True  # it hears what is said from now on, not before
        if isinstance(d, StoreWrite):
            line = self.store.describe(d, result)
            if line is not None:
                self.console.write(self.r.paint("event", line))

    def _show(self, d: Show) -> None:
        if d.kind in ("client", "server", "operator"):
            if d.kind == "operator" and not self.echo_operator:
                return
            role = "client" if d.kind == "client" else "server"
            self.console.write(self.r.chat_line(role, d.handle, d.text))
        elif d.kind == "error":
            self.console.write(self.r.paint("error", visible(d.text)))
        elif d.kind == "note":
            self.console.write(self.r.paint("dim", visible(d.text)))
        else:
            self.console.write(self.r.paint("event", visible(d.text)))

    # -- sending and closing -------------------------------------------------------------------

    def _flush_broadcasts(self) -> None:
        """Every line broadcast since the last flush, in one write per connection: the same
        joined bytes for everyone who said none of them, and its own selection for each sender."""
        lines, self._bcast = self._bcast, []
        everyone = b"".join(data for data, _ in lines)
        senders = {ex for _, ex in lines if ex is not None}
        for c in list(self.clients.values()):
            if not c.member:
                continue
            if c.id in senders:
                data = b"".join(data for data, ex in lines if ex != c.id)
                if data:
                    self._send(c, data)
            else:
                self._send(c, everyone)

    def _send(self, c: Client, data: bytes) -> None:
        io = c.io
        had = io.wants_write
        io.write(data)
        if io.failed or (io.backlog > self.policy.sendq and not io.stalled) or io.wants_write != had:
            self._after_write(c)

    def _after_write(self, c: Client) -> None:
        """Report a peer that failed or stopped reading; watch for writability while output
        waits (the policy's sendq says how much may wait)."""
        io = c.io
        if io.failed:
            self._gone(c, time.time())
            return
        if io.backlog > self.policy.sendq and not io.stalled:
            backlog = io.backlog
            io.stall()
            self._feed(Stalled(c.id, time.time(), backlog))
        self._interest(c)

    def _close(self, c: Client, notice: str | None) -> None:
        """Best effort, never waiting on a client that does not read: what is queued, the notice
        and `\\quit`, then close."""
        self._held.discard(c)
        if not c.gone:
            try:
                self.sel.unregister(c.io)
            except (KeyError, ValueError):
                pass
        c.gone = True
        c.io.close(self.policy.notice(notice) + QUIT_LINE if notice is not None else None)

    # -- the store failing ---------------------------------------------------------------------

    def on_store_wait(self, seconds: float, resumed: bool) -> None:
        """The recorder waits on a store another process holds (said once, and when it frees)."""
        self.console.write(store_wait_line(self.r, seconds, resumed))

    def _store_failed(self, why: str) -> None:
        """Nothing of the failed pass was shown or sent. Tell every client, and stop."""
        self.failure = why
        self.pending = []
        for c in list(self.clients.values()):
            self._close(c, NOTICES["store"])
        self.clients.clear()
        self.finished = True


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


def serve(mode, sockets: list, renderer: Renderer, stdin, *, bind: str | None = None) -> None:
    """Run `mode` (a policy and its store, see `chatlog.modes`) on listening `sockets` until it
    is stopped. Raises ServeError if the store fails for good (every client has been told)."""
    console = Console(renderer.stream)
    try:
        loop = _prepare(mode, sockets, renderer, stdin, console, bind)
        saved_tty = _save_tty(stdin)
        try:
            loop.run()
        finally:
            _restore_tty(stdin, saved_tty)
    finally:
        console.close()
    if loop.failure:
        raise ServeError(f"{loop.failure}; the server stopped (every client was told)")


def _prepare(mode, sockets, renderer, stdin, console, bind) -> Loop:
    """The banner, the server's record, the operator: everything but the loop."""
    for line in banner(bind, sockets):
        console.write(line)
    store, policy = mode.store, mode.policy
    # Starting waits on a database another process holds locked, like any write: say so, or the
    # banner stands there as if the server were up while nobody is accepted.
    store.set_hooks(lambda seconds, resumed: console.write(store_wait_line(renderer, seconds, resumed)), None)
    orphans = store.start(sockets[0].getsockname(), time.time())
    if orphans:
        what = "1 session" if orphans == 1 else f"{orphans} sessions"
        console.write(renderer.paint(
            "event", f"closed {what} left open by a server that stopped unexpectedly, as interrupted"
        ))
    operator = Operator(
        stdin, console, prompt=f"{policy.handle}>", color_prompt=renderer.prompt(f"{policy.handle}>")
    )
    if operator.tty and renderer.color:
        operator.prompt = renderer.paint("server", f"{policy.handle}>")
    echo = not (operator.tty and console.stream.isatty())
    listeners = [Listener(s) for s in sockets]
    loop = Loop(policy, store, listeners, renderer, console, operator, echo_operator=echo)
    store.set_hooks(loop.on_store_wait, lambda: loop.stopping is not None)
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
