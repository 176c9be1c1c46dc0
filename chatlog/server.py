"""`chatlog serve`: the event loop. It listens, reads and writes sockets, watches the operator's
input, the timers and the signals, turns all of that into events for the conversation policy
(`turns.Turns`, or `room.Room`), and carries out the decisions it gets back. It decides nothing.

One thread runs one `selectors` loop. The decisions of one pass are carried out in two phases:
first every store write, in one transaction (so in a room the lines read in one pass are one
commit), then the console lines and the socket writes, in order. So nothing is shown or sent that
is not committed, and a store that fails for good leaves nothing half-told: every client is told
why and the server stops with one clear line.
"""

from __future__ import annotations

import errno
import resource
import selectors
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass, field

from chatlog import protocol
from chatlog.events import (
    NOTICES,
    Broadcast,
    Commit,
    Connected,
    Disconnected,
    End,
    Finish,
    Handle,
    Join,
    Open,
    OperatorEnd,
    OperatorLine,
    Pause,
    Prompt,
    Received,
    Refuse,
    Send,
    Serve,
    Show,
    Stalled,
    Stop,
    Tick,
)
from chatlog.operator import Console, Operator
from chatlog.protocol import QUIT_LINE, Framer
from chatlog.render import Renderer, ended_text
from chatlog.sanitize import visible

RECV_SIZE = 65536
SEND_BUFFER = 64 * 1024  # kernel send buffer per client: chat lines are small
MAX_OUTBUF = 64 * 1024  # a 1:1 client that lets this much of our output pile up is dropped
ROOM_OUTBUF = 1024 * 1024  # in a room, a slow reader is dropped once this much is unsent
ACCEPT_BACKOFF = (0.05, 2.0)  # at the open-files limit, stop accepting for this long (doubling)
STORE_WRITES = (Open, Serve, Handle, Commit, End, Refuse, Join)


class ServeError(Exception):
    """A fatal problem, worded for the operator."""


@dataclass(eq=False, slots=True)
class Conn:
    id: int
    sock: socket.socket
    host: str
    port: int
    framer: Framer = field(default_factory=Framer)
    session: int | None = None  # its session (1:1) or participant (room) in the store
    # What it has not taken yet: references to the bytes sent to everyone (a broadcast is held
    # once, however many clients have yet to read it), and how many bytes that is.
    outq: deque = field(default_factory=deque)
    outlen: int = 0
    closed: bool = False
    paused_until: float | None = None
    member: bool = False  # in a room: joined, so it hears what is broadcast from now on


def _plain_addr(host: str) -> str:
    return host[7:] if host.startswith("::ffff:") else host


def raise_open_files_limit() -> int:
    """The soft RLIMIT_NOFILE raised to the hard limit; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


class Loop:
    def __init__(
        self,
        policy,
        recorder,
        sockets: list[socket.socket],
        renderer: Renderer,
        console: Console,
        operator: Operator,
        *,
        echo_operator: bool = True,
        max_outbuf: int = MAX_OUTBUF,
        room_session: int | None = None,
    ):
        self.policy = policy
        self.room_session = room_session  # a room: the one session every line belongs to
        self._bcast: list[tuple[bytes, int | None]] = []
        self.recorder = recorder
        self.sockets = sockets
        self.r = renderer
        self.console = console
        self.operator = operator
        self.echo_operator = echo_operator
        self.max_outbuf = max_outbuf
        self.sel = selectors.DefaultSelector()
        self.conns: dict[int, Conn] = {}
        self._next_id = 1
        self.pending: list = []
        self.finished = False
        self.failure: str | None = None  # why the store failed for good
        self.stopping: str | None = None
        self._operator_watched = False
        self._accept_paused_until: float | None = None
        self._accept_backoff = ACCEPT_BACKOFF[0]
        self._local = {s: s.getsockname() for s in sockets}
        self._server_addr = self._local[sockets[0]]
        self._told_busy = False
        self._told_end = False
        self.greeting = "Awaiting client connections"

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        for s in self.sockets:
            self.sel.register(s, selectors.EVENT_READ, ("listen", s))
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        self.sel.register(wake_r, selectors.EVENT_READ, ("wake", wake_r))
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        stops = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
        old_handlers = {sig: signal.signal(sig, self._on_signal) for sig in stops}
        try:
            # Said only now that the signals are ours: from here on Ctrl-C closes cleanly.
            self.console.write(self.r.paint("event", self.greeting))
            self._operator_input()
            self._carry_out()
            while not self.finished:
                self._pass()
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            for conn in list(self.conns.values()):
                self._close(conn)
            wake_r.close()
            wake_w.close()
            for s in self.sockets:
                s.close()
            self.sel.close()

    def _on_signal(self, signum, frame) -> None:
        self.stopping = signal.Signals(signum).name

    def _pass(self) -> None:
        for key, mask in self.sel.select(self._timeout()):
            kind, obj = key.data
            if kind == "client":
                if mask & selectors.EVENT_WRITE and not obj.closed:
                    self._flush_out(obj)
                if mask & selectors.EVENT_READ and not obj.closed:
                    self._readable(obj)
            elif kind == "listen":
                self._accept(obj)
            elif kind == "operator":
                for note in self.operator.read_available():
                    self.console.write(self.r.paint("event", note))
            else:
                try:
                    obj.recv(512)
                except OSError:
                    pass
        now = time.time()
        if self.stopping is not None:
            self._drain_all(now, final=True)
            self._feed(Stop(self.stopping, now))
            self._carry_out()
            return
        self._quiet_frames(now)
        deadline = self.policy.deadline()
        if deadline is not None and now >= deadline:
            # Read what has arrived before timing anyone out: after a stall (SIGSTOP, a long
            # lock wait) a message sent in time may be waiting in the socket.
            self._drain_all(now)
            self._feed(Tick(now))
        self._resume(now)
        self._carry_out()
        self._operator_input()

    def _timeout(self) -> float | None:
        deadlines = [d for d in (self.policy.deadline(), self._accept_paused_until) if d is not None]
        for conn in self.conns.values():
            d = conn.framer.deadline()
            if d is not None:
                deadlines.append(d)
            if conn.paused_until is not None:
                deadlines.append(conn.paused_until)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.time())

    def _feed(self, event) -> None:
        self.pending.extend(self.policy.handle_event(event))

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

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(64):  # bounded, so one pass cannot starve the chat
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause_accepting(exc)
                return  # ECONNABORTED and the like: that client is gone, nobody else is harmed
            if self._accept_paused_until is None and self._told_busy:
                self._told_busy = False
                self.console.write(self.r.paint("event", "accepting connections again"))
            self._accept_backoff = ACCEPT_BACKOFF[0]
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            except OSError:
                pass
            conn = Conn(self._next_id, sock, _plain_addr(addr[0]), addr[1])
            self._next_id += 1
            self.conns[conn.id] = conn
            self.sel.register(sock, selectors.EVENT_READ, ("client", conn))
            self._feed(Connected(conn.id, conn.host, conn.port, time.time()))

    def _pause_accepting(self, exc: OSError) -> None:
        """At the open-files limit the listening socket stays readable: stop watching it for a
        while instead of spinning, and say so once."""
        for s in self.sockets:
            try:
                self.sel.unregister(s)
            except (KeyError, ValueError):
                pass
        self._accept_paused_until = time.time() + self._accept_backoff
        self._accept_backoff = min(self._accept_backoff * 2, ACCEPT_BACKOFF[1])
        if not self._told_busy:
            self._told_busy = True
            limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            self.console.write(self.r.paint(
                "error",
                f"cannot accept connections: {exc.strerror} (limit {limit}); "
                "new clients wait in the kernel's queue until some leave",
            ))

    def _resume(self, now: float) -> None:
        if self._accept_paused_until is not None and now >= self._accept_paused_until:
            self._accept_paused_until = None
            for s in self.sockets:
                self.sel.register(s, selectors.EVENT_READ, ("listen", s))
        for conn in self.conns.values():
            if conn.paused_until is not None and now >= conn.paused_until:
                conn.paused_until = None
                self._interest(conn)

    def _readable(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""  # reset: what was held is its last message
        now = time.time()
        if data:
            for frame in conn.framer.feed(data, now):
                self._feed(Received(conn.id, protocol.parse(frame), frame.at))
            return
        for frame in conn.framer.flush(now):
            self._feed(Received(conn.id, protocol.parse(frame), frame.at))
        self._feed(Disconnected(conn.id, now))
        self._forget(conn)

    def _drain_all(self, now: float, final: bool = False) -> None:
        """Read everything already received, from every client (before a timeout or a stop;
        at a stop, an unterminated line is the client's last message)."""
        for conn in list(self.conns.values()):
            if not conn.closed:
                self._read_waiting(conn, now, limit=1000)
            if final and conn.id in self.conns:
                for frame in conn.framer.flush(now):
                    self._feed(Received(conn.id, protocol.parse(frame), frame.at))
        self._quiet_frames(now)

    def _quiet_frames(self, now: float) -> None:
        """Complete the unterminated lines of clients that have gone quiet. Quiet means nothing
        more has arrived: after a long pass (a room relaying thousands of lines) the rest of a
        line may be waiting in the socket, so it is read first. A paused client is not quiet."""
        for conn in list(self.conns.values()):
            deadline = conn.framer.deadline()
            if deadline is None or now < deadline or conn.paused_until is not None:
                continue
            if not conn.closed:
                self._read_waiting(conn, now)
            if conn.id in self.conns:
                for frame in conn.framer.flush_if_quiet(now):
                    self._feed(Received(conn.id, protocol.parse(frame), frame.at))

    def _read_waiting(self, conn: Conn, now: float, limit: int = 16) -> None:
        """Read what one client has already sent (without waiting), as _readable does."""
        for _ in range(limit):  # bounded: a flooding client cannot hold the loop here
            try:
                data = conn.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                for frame in conn.framer.flush(now):
                    self._feed(Received(conn.id, protocol.parse(frame), frame.at))
                self._feed(Disconnected(conn.id, now))
                self._forget(conn)
                return
            for frame in conn.framer.feed(data, now):
                self._feed(Received(conn.id, protocol.parse(frame), frame.at))

    def _forget(self, conn: Conn) -> None:
        """The peer is gone: stop watching it (the policy's End closes it)."""
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.closed = True

    def _interest(self, conn: Conn) -> None:
        if conn.closed:
            return
        events = 0 if conn.paused_until is not None else selectors.EVENT_READ
        if conn.outlen:
            events |= selectors.EVENT_WRITE
        try:
            if events:
                self.sel.modify(conn.sock, events, ("client", conn))
            else:
                self.sel.unregister(conn.sock)
        except KeyError:
            if events:
                self.sel.register(conn.sock, events, ("client", conn))
        except ValueError:
            pass

    # -- carrying out decisions ----------------------------------------------------------------

    def _carry_out(self) -> None:
        while self.pending and not self.finished:
            batch, self.pending = self.pending, []
            try:
                results = self._record(batch)
            except Exception as exc:  # noqa: BLE001  (the recorder's StoreFailed, worded)
                if not _is_store_failure(exc):
                    raise
                self._store_failed(str(exc))
                return
            for decision, result in zip(batch, results, strict=True):
                self._act(decision, result)
            if self._bcast:
                self._flush_broadcasts()

    def _record(self, batch: list) -> list:
        """Phase one: every store write of the batch, in one transaction."""
        results: list = [None] * len(batch)
        if not any(isinstance(d, STORE_WRITES) for d in batch):
            return results
        rec = self.recorder
        room = self.room_session
        conns = self.conns
        with rec.transaction():
            for i, d in enumerate(batch):
                if isinstance(d, Commit):
                    conn = conns.get(d.conn) if d.conn is not None else None
                    if room is not None:
                        pid = conn.session if conn is not None else None
                        rec.add_message(room, d.sender, d.handle, d.text, d.raw, d.note, d.at, participant=pid)
                    elif conn is not None and conn.session is not None:
                        rec.add_message(conn.session, d.sender, d.handle, d.text, d.raw, d.note, d.at)
                elif isinstance(d, Join):
                    conn = conns.get(d.conn)
                    if conn is not None:
                        conn.session = rec.add_participant(room, d.host, d.port, d.at)
                elif isinstance(d, Open):
                    conn = conns.get(d.conn)
                    if conn is not None:
                        local = self._server_addr
                        conn.session = rec.begin_session(
                            d.host, d.port, _plain_addr(local[0]), local[1], d.at, served=d.served
                        )
                elif isinstance(d, End):
                    conn = conns.get(d.conn)
                    if conn is None or conn.session is None:
                        continue
                    if room is not None:
                        rec.end_participant(conn.session, d.reason, d.at)
                    else:
                        results[i] = (conn.session, rec.end_session(conn.session, d.reason, d.at))
                elif isinstance(d, Serve):
                    conn = conns.get(d.conn)
                    if conn is not None and conn.session is not None:
                        rec.serve_session(conn.session, d.at)
                elif isinstance(d, Handle):
                    conn = conns.get(d.conn)
                    if conn is not None and conn.session is not None:
                        if room is not None:
                            rec.set_participant_handle(conn.session, d.handle)
                        else:
                            rec.set_handle(conn.session, d.handle)
                elif isinstance(d, Refuse):
                    results[i] = rec.add_refusal(d.host, d.reason, d.at)
        return results

    def _act(self, d, result) -> None:
        """Phase two: the console and the sockets."""
        if isinstance(d, Broadcast):
            self._bcast.append((d.data, d.exclude))
            return
        if isinstance(d, Show):
            self._show(d)
            return
        if isinstance(d, (Commit, Handle, Open, Serve)):
            return  # recorded in phase one; nothing to send or show
        if self._bcast:
            self._flush_broadcasts()  # what was said before reaches everyone before what follows
        if isinstance(d, Join):
            conn = self.conns.get(d.conn)
            if conn is not None:
                conn.member = True  # it hears what is said from now on, not before
        elif isinstance(d, Pause):
            conn = self.conns.get(d.conn)
            if conn is not None:
                conn.paused_until = d.until
                self._interest(conn)
        elif isinstance(d, Send):
            conn = self.conns.get(d.conn)
            if conn is not None:
                self._send(conn, d.data)
                for frame in conn.framer.spoke():  # our answer ends any padding it was sending
                    self._feed(Received(conn.id, protocol.parse(frame), frame.at))
        elif isinstance(d, End):
            conn = self.conns.pop(d.conn, None)
            if conn is not None:
                self._end(conn, d, result)
        elif isinstance(d, Refuse):
            conn = self.conns.pop(d.conn, None)
            if conn is not None:
                self._tell_and_close(conn, d.notice)
            # Coalesced per address and minute: a flood of refusals cannot fill the console.
            if result == 1:
                self.console.write(self.r.paint("event", visible(f"refused {d.host} port {d.port}: {d.why}")))
            elif result in (10, 100, 1000, 10000, 100000):
                self.console.write(self.r.paint("event", f"refused {result} connections from {d.host} this minute"))
        elif isinstance(d, Prompt):
            self.operator.want(d.on)
        elif isinstance(d, Finish):
            self.finished = True

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

    def _end(self, conn: Conn, d: End, result) -> None:
        self._tell_and_close(conn, d.notice)
        if result is None:
            return
        session, (client, server) = result
        what = ended_text(d.reason, session, client, server, d.limit)
        if d.waiting:
            what = f"waiting client {conn.host} port {conn.port}: {what}"
        self.console.write(self.r.paint("event", visible(what)))

    # -- sending and closing -------------------------------------------------------------------

    def _flush_broadcasts(self) -> None:
        """Every line broadcast in this pass, in one write per connection: the same joined bytes
        for everyone who said none of them, and its own selection for each sender."""
        lines, self._bcast = self._bcast, []
        everyone = b"".join(data for data, _ in lines)
        senders = {ex for _, ex in lines if ex is not None}
        for conn in list(self.conns.values()):
            if not conn.member:
                continue
            if conn.id in senders:
                data = b"".join(data for data, ex in lines if ex != conn.id)
                if data:
                    self._send(conn, data)
            else:
                self._send(conn, everyone)

    def _send(self, conn: Conn, data: bytes) -> None:
        if conn.closed:
            return
        if not conn.outlen:
            try:
                n = conn.sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                self._forget(conn)
                self._feed(Disconnected(conn.id, time.time()))
                return
            if n == len(data):
                return
            data = memoryview(data)[n:]  # a view: the shared bytes are not copied
            conn.outq.append(data)
            conn.outlen = len(data)
            self._interest(conn)
            return
        conn.outq.append(data)
        conn.outlen += len(data)
        if conn.outlen > self.max_outbuf:
            conn.outq.clear()
            conn.outlen = 0
            self._feed(Stalled(conn.id, time.time()))

    def _flush_out(self, conn: Conn) -> None:
        q = conn.outq
        try:
            n = conn.sock.sendmsg([q[i] for i in range(min(len(q), 64))])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._forget(conn)
            self._feed(Disconnected(conn.id, time.time()))
            return
        conn.outlen -= n
        while n:
            first = q[0]
            if len(first) <= n:
                n -= len(first)
                q.popleft()
            else:
                q[0] = memoryview(first)[n:]
                n = 0
        if not q:
            self._interest(conn)

    def _tell_and_close(self, conn: Conn, notice: str | None) -> None:
        """Best effort: what is queued, then the notice and `\\quit`, without waiting on a client
        that will not read; then close."""
        data = b"".join(conn.outq)
        if notice is not None:
            data += self.policy.notice(notice) + QUIT_LINE
        if data and not conn.closed:
            try:
                conn.sock.send(data)
            except OSError:
                pass
        self._close(conn)

    def _close(self, conn: Conn) -> None:
        if not conn.closed:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        self._forget(conn)
        try:
            conn.sock.close()
        except OSError:
            pass

    # -- the store failing ---------------------------------------------------------------------

    def on_store_wait(self, seconds: float, resumed: bool) -> None:
        """The recorder waits on a store another process holds (said once, and when it frees)."""
        self.console.write(store_wait_line(self.r, seconds, resumed))

    def close_room(self) -> None:
        """Record the room's end (its participants have been ended already)."""
        reason = "shutdown" if self.stopping else "server-quit"
        try:
            self.recorder.end_session(self.room_session, reason, time.time())
        except Exception as exc:  # noqa: BLE001  (the store's own error, worded)
            if not _is_store_failure(exc):
                raise
            self.failure = str(exc)

    def _store_failed(self, why: str) -> None:
        """Nothing of the failed pass was shown or sent. Tell every client, and stop."""
        self.failure = why
        self.pending = []
        for conn in list(self.conns.values()):
            self._tell_and_close(conn, NOTICES["store"])
        self.conns.clear()
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


# -- listening and the banner ---------------------------------------------------------------------


def listen(bind: str | None, port: int, backlog: int = 128) -> list[socket.socket]:
    """Listen on `bind` (default: every interface, IPv6 and IPv4) and return the sockets."""
    if bind is None:
        try:
            s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        except OSError:
            s = None
        if s is not None:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                s.bind(("::", port))
                s.listen(backlog)
                s.setblocking(False)
                return [s]
            except OSError as exc:
                s.close()
                if exc.errno == errno.EADDRINUSE:
                    raise ServeError(f"cannot listen on port {port}: address already in use") from None
        bind = "0.0.0.0"
    try:
        infos = socket.getaddrinfo(bind, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ServeError(f"cannot listen on {bind}: {exc.strerror}") from None
    errors = []
    for family, type_, proto, _, addr in infos:
        s = socket.socket(family, type_, proto)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(addr)
            s.listen(backlog)
            s.setblocking(False)
            return [s]
        except OSError as exc:
            s.close()
            errors.append(exc)
    exc = errors[0]
    if exc.errno == errno.EADDRINUSE:
        raise ServeError(f"cannot listen on port {port}: address already in use") from None
    raise ServeError(f"cannot listen on {bind} port {port}: {exc.strerror}")


def _is_loopback(addr: str) -> bool:
    import ipaddress

    try:
        ip = ipaddress.ip_address(_plain_addr(addr.split("%")[0]))
    except ValueError:
        return False
    return ip.is_loopback


def banner(bind: str | None, sockets: list[socket.socket]) -> list[str]:
    """The start-up lines: where the server listens and how to connect to it."""
    hostname = socket.gethostname()
    local = sockets[0].getsockname()
    port = local[1]
    if _is_loopback(local[0]):
        return [
            f"Server started on host {hostname} ({_plain_addr(local[0])}), port {port}",
            f"Listening on {bind} only: reachable from this host alone "
            "(--bind 0.0.0.0, or no --bind, to let other hosts connect).",
            f"Connect with:\n  ./chatclient {_plain_addr(local[0])} {port}",
        ]
    if bind not in (None, "", "0.0.0.0", "::"):
        return [
            f"Server started on host {hostname} ({_plain_addr(local[0])}), port {port}",
            "Connect from another host with:",
            f"  ./chatclient {_plain_addr(local[0])} {port}",
        ]
    ip = _reachable_address()
    lines = [f"Server started on host {hostname} ({ip or 'no network address'}), port {port}"]
    if ip is None:
        lines.append("This host has no address other hosts can reach; connect from here with:")
        lines.append(f"  ./chatclient 127.0.0.1 {port}")
        return lines
    lines.append("Connect from another host with:")
    lines.append(f"  ./chatclient {ip} {port}")
    if not _resolves_to_loopback(hostname):
        lines.append(f"  ./chatclient {hostname} {port}")
    return lines


def _resolves_to_loopback(hostname: str) -> bool:
    try:
        infos = socket.getaddrinfo(hostname, None, type=socket.SOCK_STREAM)
    except OSError:
        return True
    return all(_is_loopback(info[4][0]) for info in infos)


def _reachable_address() -> str | None:
    """An address of this host that other hosts can use (None if there is none)."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, type=socket.SOCK_STREAM)
    except OSError:
        infos = []
    for addr in [info[4][0] for info in infos] + _interface_addresses():
        if not _is_loopback(addr):
            return addr
    return None


def _interface_addresses() -> list[str]:
    """IPv4 addresses of this host's interfaces (Linux), for when the hostname resolves only to
    loopback, as it often does."""
    try:
        import fcntl
        import struct

        found = []
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _, name in socket.if_nameindex():
                try:
                    req = struct.pack("256s", name.encode()[:15])
                    res = fcntl.ioctl(s.fileno(), 0x8915, req)  # SIOCGIFADDR
                except OSError:
                    continue
                found.append(socket.inet_ntoa(res[20:24]))
        return found
    except (ImportError, OSError, AttributeError):
        return []


def serve(
    recorder,
    sockets: list[socket.socket],
    policy,
    renderer: Renderer,
    stdin,
    *,
    bind: str | None = None,
    room: bool = False,
    max_outbuf: int = MAX_OUTBUF,
) -> None:
    """Run the server on listening `sockets` until it is stopped. Raises ServeError if the store
    fails for good (every client has been told by then)."""
    console = Console(renderer.stream)
    try:
        loop = _prepare(recorder, sockets, policy, renderer, stdin, console, bind, room, max_outbuf)
        saved_tty = _save_tty(stdin)
        try:
            loop.run()
        finally:
            _restore_tty(stdin, saved_tty)
            if loop.room_session is not None and not loop.failure:
                loop.close_room()
    finally:
        console.close()
    if loop.failure:
        raise ServeError(f"{loop.failure}; the server stopped (every client was told)")


def _prepare(recorder, sockets, policy, renderer, stdin, console, bind, room, max_outbuf) -> Loop:
    """The banner, the server's record (and the room's), the operator: everything but the loop."""
    for line in banner(bind, sockets):
        console.write(line)
    local = sockets[0].getsockname()
    # Starting waits on a database another process holds locked, like any write: say so, or the
    # banner stands there as if the server were up while nobody is accepted.
    recorder.on_wait = lambda seconds, resumed: console.write(store_wait_line(renderer, seconds, resumed))
    _, orphans = recorder.start(socket.gethostname(), local[1], time.time())
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
    room_session = None
    if room:
        host = _plain_addr(local[0])
        room_session = recorder.begin_session(None, None, host, local[1], time.time(), served=True, kind="room")
    loop = Loop(
        policy, recorder, sockets, renderer, console, operator,
        echo_operator=echo, max_outbuf=max_outbuf, room_session=room_session,
    )
    if room:
        loop.greeting = (
            f"The room is open (session {room_session}); awaiting clients. "
            "At the prompt: \\who, \\kick NAME, \\quit"
        )
    recorder.on_wait = loop.on_store_wait
    recorder.should_stop = lambda: loop.stopping is not None
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
