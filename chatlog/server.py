"""`chatlog serve`: listening, the queue of waiting clients, the turn loop, idle timeouts, signals.

One thread runs one `selectors` loop over the listening sockets, every client socket, the
operator's input and a signal wake-up socket, so a client leaving is noticed even while the
operator is typing. Each message is committed to the store before it is shown or answered.

At a terminal, the operator's line is read by `input()` (readline editing) in a helper thread that
hands each line to the loop through a socket pair; from a pipe, the loop reads stdin itself, one
line per turn, so a script of replies is consumed in order.
"""

from __future__ import annotations

import errno
import os
import selectors
import signal
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from chatlog import protocol
from chatlog.protocol import MAX_LINE, MAX_TEXT, QUIT_LINE, SERVER_HANDLE, Framer
from chatlog.render import Renderer, connected_text, ended_text
from chatlog.recorder import Recorder

RECV_SIZE = 65536
MAX_OUTBUF = 64 * 1024  # a client that lets this much of our output pile up is dropped
SEND_BUFFER = 64 * 1024  # kernel send buffer per client: chat lines are small
MAX_UNANSWERED = 64  # messages a client may send without an answer before it is dropped


class ServeError(Exception):
    """A fatal start-up problem, worded for the operator."""


@dataclass(eq=False)
class Conn:
    sock: socket.socket
    host: str
    port: int
    session_id: int
    framer: Framer = field(default_factory=Framer)
    handle: str | None = None
    outbuf: bytearray = field(default_factory=bytearray)
    held: list[protocol.Message] = field(default_factory=list)  # said while waiting
    turn_started: float = 0.0
    unanswered: int = 0
    client_count: int = 0
    server_count: int = 0
    closed: bool = False


def _plain_addr(host: str) -> str:
    return host[7:] if host.startswith("::ffff:") else host


def listen(bind: str | None, port: int) -> list[socket.socket]:
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
                s.listen(16)
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
            s.listen(16)
            s.setblocking(False)
            return [s]
        except OSError as exc:
            s.close()
            errors.append(exc)
    exc = errors[0]
    if exc.errno == errno.EADDRINUSE:
        raise ServeError(f"cannot listen on port {port}: address already in use") from None
    raise ServeError(f"cannot listen on {bind} port {port}: {exc.strerror}")


def host_addresses(bind: str | None) -> tuple[str, str]:
    """(hostname, an address other hosts can reach us at) for the start-up banner."""
    hostname = socket.gethostname()
    if bind not in (None, "", "0.0.0.0", "::"):
        return hostname, bind
    try:
        infos = socket.getaddrinfo(hostname, None, type=socket.SOCK_STREAM)
    except OSError:
        infos = []
    addrs = [info[4][0] for info in infos] + _interface_addresses()
    for addr in addrs:
        if not addr.startswith("127.") and addr != "::1":
            return hostname, addr
    return hostname, addrs[0] if addrs else "127.0.0.1"


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


def _pollable(fd: int) -> bool:
    """Whether epoll (the selector) accepts this descriptor."""
    sel = selectors.DefaultSelector()
    try:
        sel.register(fd, selectors.EVENT_READ)
        return True
    except (PermissionError, OSError, ValueError):
        return False
    finally:
        sel.close()


class Operator:
    """The operator's lines: from a pipe (read by the loop) or a terminal (read by a thread)."""

    def __init__(self, stream, renderer: Renderer):
        self.stream = stream
        self.lines: deque[str] = deque()
        self.eof = False
        self.tty = stream.isatty()
        self.renderer = renderer
        self._partial = b""
        self.reading = False  # the terminal thread is inside input(), a prompt on screen
        if self.tty:
            self._rsock, self._wsock = socket.socketpair()
            self._rsock.setblocking(False)
            self._request = threading.Event()
            self._thread = threading.Thread(target=self._read_terminal, daemon=True)
            self._thread.start()
            self.fd = self._rsock.fileno()
        else:
            self.fd = stream.fileno()
            os.set_blocking(self.fd, False)
        # A regular file or /dev/null cannot be watched with epoll, and never blocks: it is read
        # directly whenever an answer is wanted.
        self.direct = not self.tty and not _pollable(self.fd)

    def want(self) -> bool:
        """An answer is needed. Returns True when the loop must watch `fd` for it."""
        if self.tty:
            if not self.reading:
                self._request.set()
            return True
        return not self.eof

    def next_line(self) -> str | None:
        return self.lines.popleft() if self.lines else None

    def read_available(self) -> None:
        if self.tty:
            try:
                self._rsock.recv(4096)
            except BlockingIOError:
                pass
            return
        try:
            data = os.read(self.fd, RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.eof = True
            if self._partial:
                self.lines.append(self._decode(self._partial))
                self._partial = b""
            return
        chunks = (self._partial + data).split(b"\n")
        self._partial = chunks.pop()
        self.lines.extend(self._decode(c) for c in chunks)

    @staticmethod
    def _decode(line: bytes) -> str:
        return line.rstrip(b"\r").decode("utf-8", "replace")

    def _read_terminal(self) -> None:
        try:
            import readline  # noqa: F401  (line editing for input())
        except ImportError:
            pass
        prompt = self.renderer.prompt(f"{SERVER_HANDLE}>")
        while True:
            self._request.wait()
            self._request.clear()
            self.reading = True
            try:
                line = input(prompt)
            except EOFError:
                line = None
            except Exception:
                line = None
            self.reading = False
            if line is None:
                self.eof = True
            else:
                self.lines.append(line)
            try:
                self._wsock.send(b"x")
            except OSError:
                return
            if line is None:
                return


class Server:
    def __init__(
        self,
        store: Recorder,
        sockets: list[socket.socket],
        renderer: Renderer,
        operator: Operator,
        idle_timeout: float | None = 300.0,
        max_waiting: int = 5,
    ):
        self.store = store
        self.sockets = sockets
        self.out = renderer
        self.operator = operator
        self.idle_timeout = idle_timeout
        self.max_waiting = max_waiting
        self.sel = selectors.DefaultSelector()
        self.current: Conn | None = None
        self.waiting: deque[Conn] = deque()
        self.operator_turn = False
        self.stopping: int | None = None
        self.finished = False
        self.operator_registered = False
        # Echo the operator's answer unless the terminal already shows what was typed.
        self.echo_operator = not (operator.tty and renderer.stream.isatty())
        if operator.tty and renderer.stream.isatty():
            renderer.hook = self._around_prompt

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> str:
        """Serve until a signal or the end of operator input. Returns why it stopped."""
        for s in self.sockets:
            self.sel.register(s, selectors.EVENT_READ, ("listen", s))
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        self.sel.register(wake_r, selectors.EVENT_READ, ("wake", None))
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        old_handlers = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        self._watch_operator(False)
        try:
            self.out.event("Awaiting client connections")
            while not self.finished:
                if self.stopping is not None:
                    self._shutdown()
                    return "signal"
                for key, mask in self.sel.select(self._timeout()):
                    kind, obj = key.data
                    if kind == "client":
                        if mask & selectors.EVENT_READ:
                            self._readable(obj)
                        if mask & selectors.EVENT_WRITE and not obj.closed:
                            self._flush_out(obj)
                    elif kind == "listen":
                        self._accept(obj)
                    elif kind == "operator":
                        self.operator.read_available()
                    elif kind == "wake":
                        try:
                            wake_r.recv(512)
                        except BlockingIOError:
                            pass
                self._timers(time.time())
                self._operator_answers()
            return "operator"
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            wake_r.close()
            wake_w.close()
            for s in self.sockets:
                s.close()

    def _on_signal(self, signum, frame) -> None:
        self.stopping = signum

    def _timeout(self) -> float | None:
        deadlines = []
        for conn in self._conns():
            d = conn.framer.deadline()
            if d is not None:
                deadlines.append(d)
        cur = self.current
        if cur is not None and not self.operator_turn and self.idle_timeout:
            deadlines.append(cur.turn_started + self.idle_timeout)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.time())

    def _conns(self):
        if self.current is not None:
            yield self.current
        yield from self.waiting

    def _timers(self, now: float) -> None:
        for conn in list(self._conns()):
            frames = conn.framer.flush_if_quiet(now)
            if frames:
                self._received(conn, frames)
        cur = self.current
        if (
            cur is not None
            and not self.operator_turn
            and self.idle_timeout
            and now - cur.turn_started >= self.idle_timeout
        ):
            self._end(cur, "timeout", tell=True)

    # -- connections ---------------------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.out.error(f"cannot accept a connection: {exc.strerror}")
                return
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            except OSError:
                pass
            host, port = _plain_addr(addr[0]), addr[1]
            local = sock.getsockname()
            busy = self.current is not None and len(self.waiting) >= self.max_waiting
            session_id = self.store.begin_session(
                host, port, _plain_addr(local[0]), local[1], time.time(), served=self.current is None
            )
            conn = Conn(sock, host, port, session_id, turn_started=time.time())
            if busy:
                self.out.event(f"refused {host} port {port}: {len(self.waiting)} already waiting")
                self._send(conn, protocol.format_server("The server is busy; try again later."))
                self._close(conn, "busy", tell=True)
                continue
            self.sel.register(sock, selectors.EVENT_READ, ("client", conn))
            if self.current is None:
                self._serve(conn, new=True)
            else:
                self.waiting.append(conn)
                self.out.event(
                    f"{host} port {port} is waiting ({len(self.waiting)} in the queue)"
                )

    def _serve(self, conn: Conn, new: bool = False) -> None:
        self.current = conn
        self.operator_turn = False
        conn.turn_started = time.time()
        if not new:
            self.store.serve_session(conn.session_id, time.time())
        waiting = f" ({len(self.waiting)} waiting)" if self.waiting else ""
        self.out.event(connected_text(conn.host, conn.port) + waiting)
        held, conn.held = conn.held, []
        for msg in held:
            self._show(conn, msg)
        if held:
            self.operator_turn = True

    def _readable(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = None
        now = time.time()
        if data:
            frames = conn.framer.feed(data, now)
            if frames:
                self._received(conn, frames)
            return
        # Closed (b"") or reset (None): what was held is the last message.
        frames = conn.framer.flush(now)
        if frames:
            self._received(conn, frames)
        if not conn.closed:
            self._end(conn, "disconnect")

    def _received(self, conn: Conn, frames: list[protocol.Frame]) -> None:
        for frame in frames:
            if conn.closed:
                return
            msg = protocol.parse(frame)
            if msg.handle is not None:
                if conn.handle is None:
                    self.store.set_handle(conn.session_id, msg.handle)
                conn.handle = msg.handle
            else:
                msg.handle = conn.handle
            if msg.is_quit:
                if conn is self.current:
                    self._end(conn, "client-quit")
                else:
                    self._close(conn, "client-quit")
                return
            note = None
            if msg.cut:
                note = f"line cut at {MAX_LINE} bytes; {msg.cut} more bytes dropped"
            elif len(msg.text) > MAX_TEXT:
                note = f"longer than {MAX_TEXT} characters"
            self.store.add_message(
                conn.session_id, "client", msg.handle, msg.text, msg.raw, note, frame.at
            )
            conn.client_count += 1
            conn.unanswered += 1
            if conn is self.current:
                self._show(conn, msg)
                self.operator_turn = True
            else:
                conn.held.append(msg)
            if conn.unanswered > MAX_UNANSWERED:
                # Turns are strict: a client that keeps talking without answers is flooding.
                self.out.error(f"{conn.host} port {conn.port} sent {MAX_UNANSWERED} messages unanswered")
                if conn is self.current:
                    self._end(conn, "flood", tell=True)
                else:
                    self._close(conn, "flood", tell=True)
                return
            if msg.cut:
                self.out.error(f"{conn.host} port {conn.port} sent a line over {MAX_LINE} bytes")
                if conn is self.current:
                    self._end(conn, "overlong", tell=True)
                else:
                    self._close(conn, "overlong")
                return

    def _show(self, conn: Conn, msg: protocol.Message) -> None:
        self.out.write(self.out.chat_line("client", msg.handle, msg.text))

    def _around_prompt(self, before: bool) -> bool:
        """Renderer hook: a line printed while the operator is typing at a terminal first clears
        the prompt line, then readline redraws the prompt and what was typed so far."""
        if not self.operator.reading:
            return False
        if not before and self.stopping is None and not self.finished:
            try:
                import readline

                typed = readline.get_line_buffer()
            except (ImportError, AttributeError):
                typed = ""
            self.out.stream.write(self.out.paint("server", f"{SERVER_HANDLE}>") + typed)
            self.out.stream.flush()
        return True

    def _operator_answers(self) -> None:
        """Give the operator's next line to the client whose turn it is, or ask for one."""
        op = self.operator
        while True:
            cur = self.current
            if cur is None or not self.operator_turn:
                if op.tty:
                    stray = op.next_line()
                    if stray is not None:
                        self.out.event("(no client is waiting for an answer; line not sent)")
                        continue
                    if op.eof:
                        self._operator_gone()
                self._watch_operator(False)
                return
            line = op.next_line()
            if line is None and op.direct and not op.eof:
                op.read_available()
                continue
            if line is None:
                if op.eof:
                    self._operator_gone()
                    return
                self._watch_operator(op.want())
                return
            self._answer(cur, line)

    def _answer(self, cur: Conn, line: str) -> None:
        if protocol.is_quit(line):
            self._end(cur, "server-quit", tell=True)
            return
        if len(line) > MAX_TEXT:
            self.out.error(f"message too long ({len(line)} characters, at most {MAX_TEXT}); not sent")
            return
        self.store.add_message(cur.session_id, "server", SERVER_HANDLE, line, None, None, time.time())
        cur.server_count += 1
        cur.unanswered = 0
        if self.echo_operator:
            self.out.write(self.out.chat_line("server", SERVER_HANDLE, line))
        self.operator_turn = False
        cur.framer.spoke()
        cur.turn_started = time.time()
        self._send(cur, protocol.format_server(line))

    def _operator_gone(self) -> None:
        self.finished = True
        if self.current is not None:
            self._end(self.current, "server-quit", tell=True)
        for conn in list(self.waiting):
            self._close(conn, "shutdown", tell=True)
        self.out.event("Operator input ended; server stopped")

    def _watch_operator(self, on: bool) -> None:
        """Watch the operator's input only while an answer is wanted (a terminal: always)."""
        on = (on or self.operator.tty) and not self.operator.direct
        if on == self.operator_registered:
            return
        if on:
            self.sel.register(self.operator.fd, selectors.EVENT_READ, ("operator", None))
        else:
            self.sel.unregister(self.operator.fd)
        self.operator_registered = on

    # -- sending and ending --------------------------------------------------------------------

    def _send(self, conn: Conn, data: bytes) -> None:
        if conn.closed:
            return
        if not conn.outbuf:
            try:
                n = conn.sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                self._end(conn, "disconnect")
                return
            data = data[n:]
            if not data:
                return
            self._want_write(conn, True)
        conn.outbuf += data
        if len(conn.outbuf) > MAX_OUTBUF:
            conn.outbuf.clear()
            self._end(conn, "stalled")

    def _flush_out(self, conn: Conn) -> None:
        try:
            n = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._end(conn, "disconnect")
            return
        del conn.outbuf[:n]
        if not conn.outbuf:
            self._want_write(conn, False)

    def _want_write(self, conn: Conn, on: bool) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0)
        try:
            self.sel.modify(conn.sock, events, ("client", conn))
        except (KeyError, ValueError):
            pass

    def _end(self, conn: Conn, reason: str, tell: bool = False) -> None:
        """End the session being served, then serve the next waiting client."""
        if conn.closed:
            return
        self._close(conn, reason, tell)
        if conn is self.current:
            self.current = None
            self.operator_turn = False
            if self.waiting:
                self._serve(self.waiting.popleft())
            elif not self.finished and self.stopping is None:
                self.out.event("Awaiting client connections")

    def _close(self, conn: Conn, reason: str, tell: bool = False) -> None:
        if conn.closed:
            return
        conn.closed = True
        self.store.end_session(conn.session_id, reason, time.time())  # recorded before anyone is told
        if tell:
            self._send_last(conn, QUIT_LINE)
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        try:
            conn.sock.close()
        except OSError:
            pass
        if conn in self.waiting:
            self.waiting.remove(conn)
        if conn is self.current or reason != "busy":
            self.out.event(self._ended_text(conn, reason))

    def _send_last(self, conn: Conn, data: bytes) -> None:
        """Best effort: what is queued, then `data`, without waiting on a client that won't read."""
        try:
            conn.sock.send(bytes(conn.outbuf) + data)
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _ended_text(self, conn: Conn, reason: str) -> str:
        what = ended_text(reason, conn.session_id, conn.client_count, conn.server_count, self.idle_timeout)
        if conn is not self.current:
            what = f"waiting client {conn.host} port {conn.port}: {what}"
        return what

    def _shutdown(self) -> None:
        name = signal.Signals(self.stopping).name if self.stopping else "signal"
        now = time.time()
        for conn in list(self._conns()):  # what was said before the signal is recorded too
            frames = []
            while True:
                try:
                    data = conn.sock.recv(RECV_SIZE)
                except OSError:
                    break
                if not data:
                    break
                frames += conn.framer.feed(data, now)
            frames += conn.framer.flush(now)
            if frames:
                self._received(conn, frames)
        if self.current is not None:
            self._close(self.current, "shutdown", tell=True)
            self.current = None
        for conn in list(self.waiting):
            self._close(conn, "shutdown", tell=True)
        self.out.event(f"Server stopped ({name})")


def serve(
    store: Recorder,
    port: int,
    bind: str | None,
    renderer: Renderer,
    idle_timeout: float | None,
    max_waiting: int,
    stdin=None,
) -> None:
    sockets = listen(bind, port)
    actual_port = sockets[0].getsockname()[1]
    _, orphans = store.start(bind or "", actual_port, time.time())
    hostname, ip = host_addresses(bind)
    out = renderer
    out.write(f"Server started on host {hostname} ({ip}), port {actual_port}")
    out.write("Connect from another host with:")
    out.write(f"  ./chatclient {ip} {actual_port}")
    out.write(f"  ./chatclient {hostname} {actual_port}")
    if orphans:
        out.event(f"closed {orphans} session(s) left open by an earlier run as interrupted")
    stdin = stdin or sys.stdin
    saved_tty = None
    if stdin.isatty():
        try:
            import termios

            saved_tty = termios.tcgetattr(stdin.fileno())
        except Exception:
            saved_tty = None
    operator = Operator(stdin, renderer)
    server = Server(store, sockets, renderer, operator, idle_timeout, max_waiting)
    try:
        server.run()
    finally:
        if saved_tty is not None:
            import termios

            try:
                termios.tcsetattr(stdin.fileno(), termios.TCSADRAIN, saved_tty)
            except Exception:
                pass
