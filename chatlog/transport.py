"""Connections: the one place bytes move between a socket and the server loop.

The loop (`server.Loop`) never calls a socket method. It asks a `Listener` for new connections
and a connection (`TcpConn`, with TLS and a broker link beside it later) to read, write and
close, and gets back plain outcomes:

- `read(limit)`: bytes (data), `b""` (the peer closed, or the connection failed), or `None`
  (nothing to read now). At most `limit` line endings are taken: what is past them stays where it
  is (`unread`, then the kernel's socket buffer), so a client can never hand one pass more than
  the pass asked for.
- `write(data)`: queued and sent as far as the kernel takes it now; the rest waits for
  `flush()` when the socket is writable. `backlog` is how much is unsent. A failed write closes
  the connection (`failed` is set); the loop reports it as a disconnection.
- `close(last)`: best effort, never waiting on a peer that does not read: `last` (a notice) is
  sent only if everything queued before it went out whole, so a peer never sees a line cut in
  two with another glued to it; then the connection is shut down and closed.

Like redis's `connection.h` or ergo's `IRCConn`: one interface, a type per transport.
"""

from __future__ import annotations

import errno
import os
import resource
import socket
import time
from collections import deque

RECV_SIZE = 65536  # one read; a room's burst arrives in these
SEND_BUFFER = 64 * 1024  # kernel send buffer per client: chat lines are small
SENDMSG_PARTS = 64  # buffers handed to one sendmsg()


class ServeError(Exception):
    """A fatal problem, worded for the operator."""


def plain_addr(host: str) -> str:
    """An IPv4-mapped IPv6 address (`::ffff:1.2.3.4`) as plain IPv4."""
    return host[7:] if host.startswith("::ffff:") else host


_NUL_AS_NEWLINE = bytes.maketrans(b"\0", b"\n")


def cut_after(data: bytes, limit: int) -> int:
    """The length of the prefix of `data` that holds at most `limit` line endings (`\\n`, or
    `\\0` for clients that end lines with a NUL); len(data) when it holds no more than that. A
    `\\0` right after a cut `\\n` stays with it (it is part of the CS372 terminator)."""
    if len(data) <= limit:  # (fewer bytes than the limit: fewer line endings too)
        return len(data)
    ends = data.translate(_NUL_AS_NEWLINE) if b"\0" in data else data
    if ends.count(b"\n") <= limit:
        return len(data)
    if limit <= 0:
        return 0
    # Just past the limit-th ending: what follows it is the last of limit + 1 pieces. (Found by
    # counting halves of the buffer instead, this took 345 us of a 64 KiB read's 512 lines.)
    lo = len(data) - len(ends.split(b"\n", limit)[-1])
    if lo < len(data) and data[lo] == 0 and data[lo - 1] == 10:
        lo += 1
    return lo


class TcpConn:
    """A plain TCP connection to a client."""

    kind = "tcp"
    __slots__ = (
        "sock", "host", "port", "failed", "closed", "stalled", "_q", "backlog", "_held", "_ends_line",
    )

    def __init__(self, sock: socket.socket, host: str, port: int):
        self.sock = sock
        self.host = host
        self.port = port
        self.failed = False  # a read or write failed: the peer is gone
        self.closed = False
        self.stalled = False  # it stopped reading: nothing more is queued for it
        self._q: deque = deque()  # unsent output: bytes shared by every reader, and views of them
        self.backlog = 0  # bytes in _q
        self._held = b""  # read but not yet taken (past a read's limit)
        self._ends_line = True  # everything handed to the kernel so far ends with a newline

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def buffered(self) -> bool:
        """Input is held here that the socket will not signal again (read it without waiting)."""
        return bool(self._held)

    @property
    def wants_write(self) -> bool:
        return self.backlog > 0

    # -- the raw operations a transport type provides ----------------------------------------

    def _recv(self) -> bytes | None:
        """Bytes, b"" (closed or failed: `failed` says which), or None (nothing now)."""
        try:
            return self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            self.failed = True
            return b""  # a reset: what was held is its last message

    def _send(self, data) -> int:
        """How much the kernel took now (0: none); raises OSError when the peer is gone."""
        try:
            return self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0

    def _sendv(self, parts: list) -> int:
        try:
            return self.sock.sendmsg(parts)
        except (BlockingIOError, InterruptedError):
            return 0

    def _finish(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    # -- the interface the loop uses -------------------------------------------------------------

    def read(self, limit: int) -> bytes | None:
        if self._held:
            data, self._held = self._held, b""
        else:
            data = self._recv()
            if not data:
                return data
        n = cut_after(data, limit)
        if n < len(data):
            self._held = data[n:]
            data = data[:n]
        return data if data else None

    def write(self, data: bytes) -> None:
        if self.failed or self.closed or self.stalled:
            return
        if self.backlog:
            self._q.append(data)
            self.backlog += len(data)
            return
        try:
            n = self._send(data)
        except OSError:
            self.failed = True
            return
        if n:
            self._ends_line = data[n - 1] == 10
        if n < len(data):
            rest = memoryview(data)[n:]  # a view: bytes shared by a broadcast are not copied
            self._q.append(rest)
            self.backlog = len(rest)

    def flush(self) -> None:
        """Send what is queued, as far as the kernel takes it now."""
        q = self._q
        if not q or self.failed:
            return
        try:
            n = self._sendv([q[i] for i in range(min(len(q), SENDMSG_PARTS))])
        except OSError:
            self.failed = True
            return
        self.backlog -= n
        while n:
            first = q[0]
            if len(first) <= n:
                n -= len(first)
                last = first
                q.popleft()
                if not n:
                    self._ends_line = last[-1] == 10
            else:
                self._ends_line = first[n - 1] == 10
                q[0] = memoryview(first)[n:]
                n = 0

    def stall(self) -> None:
        """The peer stopped reading: forget what is queued but the rest of the line the kernel
        holds the start of, and queue nothing more. So what it last gets ends a line."""
        self.stalled = True
        rest = b""
        if not self._ends_line and self._q:
            first = bytes(self._q[0])
            end = first.find(b"\n")
            rest = first[: end + 1] if end >= 0 else first
        self._q.clear()
        self.backlog = 0
        if rest:
            self._q.append(rest)
            self.backlog = len(rest)

    def close(self, last: bytes | None = None) -> None:
        """Send what is queued and then `last`, in one try that never waits, and close. `last`
        goes only where the stream stands at the end of a whole line; a peer that cannot take
        even that gets nothing more."""
        if self.closed:
            return
        self.closed = True
        if not self.failed:
            data = b"".join(self._q)
            if last and (data.endswith(b"\n") if data else self._ends_line):
                data += last
            if data:
                try:
                    self._send(data)
                except OSError:
                    pass
            self._finish()
        self._q.clear()
        self.backlog = 0
        try:
            self.sock.close()
        except OSError:
            pass


class TlsConn(TcpConn):
    """A TLS connection (pyOpenSSL, non-blocking): the handshake runs inside the loop, with a
    deadline; then it reads and writes as TcpConn does. Bytes OpenSSL has decrypted but not
    handed over do not wake the selector: `buffered` says so, and the loop reads again."""

    kind = "tls"
    __slots__ = ("ssl", "handshaking", "deadline", "error", "version", "cipher", "peer_fingerprint", "timeout",
                 "_read_blocked_on_write", "_retry_read")

    def __init__(self, sock: socket.socket, host: str, port: int, context, timeout: float):
        from OpenSSL import SSL

        super().__init__(sock, host, port)
        self.ssl = SSL.Connection(context, sock)
        self.ssl.set_accept_state()
        self.handshaking = True
        self.timeout = timeout
        self.deadline: float | None = time.time() + timeout  # the handshake must be done by then
        self.error: str | None = None  # why the handshake failed
        self.version: str | None = None
        self.cipher: str | None = None
        self.peer_fingerprint: str | None = None  # the client certificate's, if it gave one
        self._read_blocked_on_write = False  # a read needs the socket writable first (a key update)
        self._retry_read = False

    def handshake(self, now: float) -> bool:
        """Go on with the handshake: True once it is over, done or failed (then `failed` is set
        and `error` says why, the deadline passing included); False while it waits on the peer."""
        from OpenSSL import SSL

        from chatlog.tls import fingerprint_der, ssl_words

        try:
            self.ssl.do_handshake()
        except (SSL.WantReadError, SSL.WantWriteError):
            if self.deadline is not None and now >= self.deadline:
                self.failed = True
                self.error = f"no handshake within {self.timeout:g} s"
                return True
            return False
        except SSL.SysCallError as exc:
            self.failed = True
            self.error = "the client closed the connection" if exc.args and exc.args[0] in (-1, 0) else (
                exc.args[1] if len(exc.args) > 1 else "connection error")
            return True
        except SSL.Error as exc:
            self.failed = True
            words = ssl_words(exc)
            self.error = "not TLS (plain text on the TLS port?)" if any(
                w in words for w in ("wrong version number", "http request", "unknown protocol", "packet length too long")
            ) else words
            return True
        self.handshaking = False
        self.deadline = None
        self.version = self.ssl.get_protocol_version_name()
        self.cipher = self.ssl.get_cipher_name()
        cert = self.ssl.get_peer_certificate(as_cryptography=True)
        if cert is not None:
            from cryptography.hazmat.primitives.serialization import Encoding

            self.peer_fingerprint = fingerprint_der(cert.public_bytes(Encoding.DER))
        return True

    @property
    def buffered(self) -> bool:
        return bool(self._held) or self._retry_read or (
            not self.handshaking and not self.failed and self.ssl.pending() > 0)

    @property
    def wants_write(self) -> bool:
        return self.backlog > 0 or self._read_blocked_on_write or (self.handshaking and self.ssl.want_write())

    def flush(self) -> None:
        if self._read_blocked_on_write:  # writable again: the read that needed it can go on
            self._read_blocked_on_write = False
            self._retry_read = True
        super().flush()

    def _recv(self) -> bytes | None:
        from OpenSSL import SSL

        self._retry_read = False
        try:
            return self.ssl.recv(RECV_SIZE)
        except SSL.WantReadError:
            return None
        except SSL.WantWriteError:
            self._read_blocked_on_write = True
            return None
        except SSL.ZeroReturnError:
            return b""
        except (SSL.Error, OSError):
            self.failed = True
            return b""

    def _send(self, data) -> int:
        from OpenSSL import SSL

        try:
            return self.ssl.send(data)
        except (SSL.WantReadError, SSL.WantWriteError):
            return 0
        except SSL.Error as exc:
            raise OSError(str(exc)) from None

    def _sendv(self, parts: list) -> int:
        if len(parts) == 1:
            return self._send(parts[0])
        data, size = [], 0
        for part in parts:  # up to a few TLS records' worth in one write
            data.append(part)
            size += len(part)
            if size >= RECV_SIZE:
                break
        return self._send(b"".join(data))

    def _finish(self) -> None:
        try:
            self.ssl.shutdown()
        except Exception:  # noqa: BLE001  (best effort: a peer that is gone or mid-handshake)
            pass
        super()._finish()


class Listener:
    """A listening socket; `accept()` gives a connection, None (nobody waiting), or raises
    `AtLimit` when the process or system is out of descriptors or memory."""

    __slots__ = ("sock", "kind", "context", "handshake_timeout")

    def __init__(self, sock: socket.socket, context=None, handshake_timeout: float = 10.0):
        self.sock = sock
        self.context = context  # an OpenSSL context: this listener speaks TLS
        self.kind = "tls" if context is not None else "tcp"
        self.handshake_timeout = handshake_timeout

    def fileno(self) -> int:
        return self.sock.fileno()

    def getsockname(self):
        return self.sock.getsockname()

    def accept(self) -> TcpConn | None:
        while True:
            try:
                sock, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise AtLimit(exc.strerror or str(exc)) from None
                continue  # ECONNABORTED and the like: that client is gone, nobody else is harmed
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            except OSError:
                pass
            if self.context is not None:
                return TlsConn(sock, plain_addr(addr[0]), addr[1], self.context, self.handshake_timeout)
            return TcpConn(sock, plain_addr(addr[0]), addr[1])

    def close(self) -> None:
        self.sock.close()


class AtLimit(Exception):
    """accept() failed for want of descriptors or memory; the message is the system's words."""


class Acceptor:
    """Every listener, accepted from in bounded turns. At the open-files limit a listening
    socket stays readable while accept() fails: the listeners are then left alone for a
    back-off that doubles (`paused_until`), instead of spinning. The last RESERVE descriptors
    below the limit are never given to a client: the server's own need them (the broker's
    connection made again, the archive's files, a thread's connection to it)."""

    BACKOFF = (0.05, 2.0)
    PER_TURN = 64  # connections accepted from one listener in one pass
    HANDSHAKES_PER_ADDRESS = 16  # TLS handshakes under way from one address; more are closed at once
    RESERVE = 16  # descriptors kept from clients for the server's own

    def __init__(self, listeners: list[Listener]):
        self.listeners = listeners
        self.limit = open_files_limit()
        self.handshaking: dict[str, int] = {}  # address -> TLS handshakes under way
        self.failures: dict[tuple[str, str], int] = {}  # (address, why) -> failed handshakes
        self.paused_until: float | None = None
        self.at_limit: str | None = None  # why accepting stopped (the system's words), until it works again
        self._backoff = self.BACKOFF[0]

    def accept(self, listener: Listener, now: float) -> list:
        """The connections waiting on `listener` (at most PER_TURN). Sets `paused_until` and
        `at_limit` when out of descriptors; clears `at_limit` once a connection is accepted."""
        out = []
        for _ in range(self.PER_TURN):
            try:
                self._room(listener)
                conn = listener.accept()
            except AtLimit as exc:
                self.paused_until = now + self._backoff
                self._backoff = min(self._backoff * 2, self.BACKOFF[1])
                self.at_limit = str(exc)
                break
            if conn is None:
                break
            self._backoff = self.BACKOFF[0]
            self.at_limit = None
            if conn.kind == "tls":
                n = self.handshaking.get(conn.host, 0)
                if n >= self.HANDSHAKES_PER_ADDRESS:
                    conn.failed = True  # a handshake flood from one address costs nobody else
                    conn.close()
                    continue
                self.handshaking[conn.host] = n + 1
            out.append(conn)
        return out

    def _room(self, listener: Listener) -> None:
        """AtLimit unless a connection accepted now leaves RESERVE descriptors free. The kernel
        gives the lowest free descriptor, so one accepted now would be the one a dup() gets: at
        or past the limit less RESERVE, every one below it is taken, and fewer than RESERVE
        are left."""
        try:
            fd = os.dup(listener.fileno())
        except OSError as exc:
            raise AtLimit(exc.strerror or str(exc)) from None
        os.close(fd)
        if 0 <= self.limit - self.RESERVE <= fd:  # (no limit at all: RLIM_INFINITY, -1 here)
            raise AtLimit(f"Too many open files, less the {self.RESERVE} kept for the server's own")

    def handshake_over(self, conn) -> int:
        """A handshake ended; a failed one is closed and counted. Returns how many have failed
        from that address for that reason (0 when this one succeeded)."""
        n = self.handshaking.get(conn.host, 1) - 1
        if n > 0:
            self.handshaking[conn.host] = n
        else:
            self.handshaking.pop(conn.host, None)
        if not conn.failed:
            return 0
        conn.close()
        key = (conn.host, conn.error or "")
        self.failures[key] = failed = self.failures.get(key, 0) + 1
        return failed

    def resume(self, now: float) -> bool:
        """True when a pause has just run out (watch the listeners again)."""
        if self.paused_until is not None and now >= self.paused_until:
            self.paused_until = None
            return True
        return False

    def close(self) -> None:
        for lst in self.listeners:
            lst.close()


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


def open_files_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def wakeup_pair() -> tuple[socket.socket, socket.socket]:
    """A non-blocking socket pair: signals write to one end to wake the loop."""
    r, w = socket.socketpair()
    r.setblocking(False)
    w.setblocking(False)
    return r, w


def drain_wakeups(sock: socket.socket) -> None:
    try:
        sock.recv(512)
    except OSError:
        pass


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


def is_loopback(addr: str) -> bool:
    import ipaddress

    try:
        ip = ipaddress.ip_address(plain_addr(addr.split("%")[0]))
    except ValueError:
        return False
    return ip.is_loopback


def banner(bind: str | None, sockets: list[socket.socket], tls_sockets: list[socket.socket] = (),
           pin: str | None = None, cert_note: str | None = None) -> list[str]:
    """The start-up lines: where the server listens and how to connect to it. `sockets` are
    plain, `tls_sockets` speak TLS; `pin` is the fingerprint a client must pin (a self-signed
    certificate), `cert_note` says where the certificate is."""
    hostname = socket.gethostname()
    first = (sockets or tls_sockets)[0].getsockname()
    port = first[1]
    tls_port = tls_sockets[0].getsockname()[1] if tls_sockets else None
    only = " (TLS only)" if tls_sockets and not sockets else ""

    def commands(host: str) -> list[str]:
        out = [f"  ./chatclient {host} {port}"] if sockets else []
        if tls_port is not None:
            out.append(f"  ./chatclient --tls {f'--pin {pin} ' if pin else ''}{host} {tls_port}")
        return out

    if is_loopback(first[0]):
        host = plain_addr(first[0])
        lines = [
            f"Server started on host {hostname} ({host}), port {port}{only}",
            f"Listening on {bind} only: reachable from this host alone "
            "(--bind 0.0.0.0, or no --bind, to let other hosts connect).",
            "Connect with:\n" + "\n".join(commands(host)),
        ]
    elif bind not in (None, "", "0.0.0.0", "::"):
        host = plain_addr(first[0])
        lines = [f"Server started on host {hostname} ({host}), port {port}{only}", "Connect from another host with:",
                 *commands(host)]
    else:
        ip = reachable_address()
        lines = [f"Server started on host {hostname} ({ip or 'no network address'}), port {port}{only}"]
        if ip is None:
            lines.append("This host has no address other hosts can reach; connect from here with:")
            lines += commands("127.0.0.1")
        else:
            lines.append("Connect from another host with:")
            lines += commands(ip)
            if not resolves_to_loopback(hostname):
                lines += commands(hostname)
    if tls_port is not None and sockets:
        lines.insert(1, f"TLS on port {tls_port}")
    if cert_note:
        lines.append(cert_note)
    return lines


def resolves_to_loopback(hostname: str) -> bool:
    try:
        infos = socket.getaddrinfo(hostname, None, type=socket.SOCK_STREAM)
    except OSError:
        return True
    return all(is_loopback(info[4][0]) for info in infos)


def reachable_address() -> str | None:
    """An address of this host that other hosts can use (None if there is none)."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, type=socket.SOCK_STREAM)
    except OSError:
        infos = []
    for addr in [info[4][0] for info in infos] + interface_addresses():
        if not is_loopback(addr):
            return addr
    return None


def interface_addresses() -> list[str]:
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
