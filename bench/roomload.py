"""Room load generator: many clients in one process, against a multi-client chat room.

Servers (each on 127.0.0.1 only):
  chatlog  `chatlog serve --room 0 --bind 127.0.0.1 --db TMP` (stdin a pipe kept open; the
           console drained by `cat` in its own process; the port read from its banner)
  ncat     `ncat -l --chat --max-conns N 127.0.0.1 PORT` (Debian's nmap ncat; its default cap is
           100 connections, so the cap is raised to the scenario's client count)
  relay    bench/relay.c, a trivial epoll relay in C: what the generator reaches against it is the
           generator's own ceiling

Every line a client sends is `b{id}>{run} {id} {seq} {send time ns} {padding}\n`. `run` is a random
tag, so lines from other runs and the servers' own lines (`SERVER>*** ...`, ncat's `<announce>`)
are ignored; ncat's `<userN> ` prefix is skipped the same way. Listeners count lines with
bytes.count, or, when timing, find the send times with one regex per recv() and subtract them
from the receive time (time.monotonic_ns, the same clock in every process). The generator's own
CPU time is reported beside each result, so one can see whether it was the bottleneck.

Usage (one scenario alone):
  python bench/roomload.py fanout     --server ncat [--clients 200 --rate 2 --seconds 20]
  python bench/roomload.py throughput --server chatlog [--listeners 100 --lines 20000]
  python bench/roomload.py slow       --server ncat [--clients 50 --rate 10 --size 450 --seconds 20]
  python bench/roomload.py crowd      --server relay [--clients 10000]
  python bench/roomload.py throughput --server linked   (three chatlog servers linked through a
           local nats-server -js, clients spread over them; reports whether the archives agree)
  python bench/roomload.py resets     --server ncat [--clients 20 --resets 500]
  python bench/roomload.py idle       --server chatlog [--clients 1000]   (server RSS per idle client)

--tls (chatlog only): the server gets `--tls-port 0` and every client speaks TLS to that port
(Python's ssl, non-blocking, verifying the server's self-signed certificate as the only CA; full
handshakes, no resumption). The plain path is the same code as without it.
"""

import argparse
import array
import errno
import heapq
import json
import os
import re
import resource
import secrets
import selectors
import shutil
import signal
import ssl
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
CHATLOG = [os.environ.get("ROOMLOAD_CHATLOG") or str(VENV_BIN / "chatlog")]  # another build: --chatlog PATH
IP_BIND_ADDRESS_NO_PORT = 24  # Linux: pick the source port at connect(), not bind()
EVENT_READ, EVENT_WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
# Clients connect in batches this size, each waiting for its greetings before the next: ncat
# listens with a backlog of 10, and a larger burst of connects overflows it (dropped SYNs retried
# after 1 s, 3 s, ...), which would measure the batch size, not the server.
BATCH = 10
MAX_LINE = 1 << 20


class Unavailable(Exception):
    """The server cannot be run here (command or option missing): the row says n/a."""


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the servers we start
    return hard


def cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---------------------------------------------------------------------------------------- servers

class Server:
    def __init__(self, name, proc, port, db=None, helpers=()):
        self.name, self.proc, self.port, self.db, self.helpers = name, proc, port, db, helpers
        self.stderr = None  # a file holding what it wrote there, when kept
        self.hwm = None

    def sample(self):
        """Remember the peak resident memory while the server runs (it is gone once it exits)."""
        hwm = self.status("VmHWM")
        if hwm is not None:
            self.hwm = hwm
        return hwm

    def last_words(self):
        if not self.stderr:
            return ""
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace").strip().splitlines()[-1:] or ""

    def alive(self):
        return self.proc.poll() is None

    def status(self, field):
        """A /proc/PID/status field in MB (VmHWM: peak resident memory), or None once exited."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def cpu_seconds(self):
        try:
            fields = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError):
            return None

    def stop(self):
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stdin:
            self.proc.stdin.close()
        for h in self.helpers:
            if h.poll() is None:
                h.kill()
            h.wait(5)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, proc, timeout=10):
    """Wait until something listens on 127.0.0.1:port (read from /proc/net/tcp, so no probe
    connection joins the room)."""
    want = f"0100007F:{port:04X}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Unavailable(f"exited with {proc.returncode} before listening")
        with open("/proc/net/tcp") as f:
            if any(line.split()[1] == want and line.split()[3] == "0A" for line in f.readlines()[1:]):
                return
        time.sleep(0.02)
    raise Unavailable("not listening after 10 s")


def start_ncat(max_conns):
    if not shutil.which("ncat"):  # `make bench` installs it when it can (apt-get, as root)
        raise Unavailable("ncat missing")
    port = free_port()
    err = tempfile.TemporaryFile()
    p = subprocess.Popen(["ncat", "-l", "--chat", "--max-conns", str(max_conns), "127.0.0.1", str(port)],
                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
    wait_listening(port, p)
    server = Server("ncat", p, port)
    server.stderr = err
    return server


def relay_binary():
    out = Path(tempfile.gettempdir()) / f"chatlog-bench-relay-{os.getuid()}"
    src = HERE / "relay.c"
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        tmp = out.with_name(out.name + f".{os.getpid()}")
        r = subprocess.run(["gcc", "-O2", "-o", str(tmp), str(src)], capture_output=True, text=True)
        if r.returncode:
            raise Unavailable("relay.c does not compile: " + r.stderr[-100:])
        tmp.rename(out)
    return out


def start_relay(_max_conns):
    p = subprocess.Popen([str(relay_binary()), "0"], stdout=subprocess.PIPE, text=True)
    port = int(p.stdout.readline().split()[1])
    return Server("relay", p, port)


def chatlog_has_room():
    r = subprocess.run([*CHATLOG, "serve", "--help"], capture_output=True, text=True)
    return "--room" in r.stdout


def start_chatlog(_max_conns, db, extra=(), tls=False, wait_for=None):
    """tls: a TLS listener beside the plain one (`--tls-port 0`); the server's port is then the
    TLS one, and its self-signed certificate is made beside the database."""
    if not chatlog_has_room():
        raise Unavailable("no serve --room yet")
    if tls:
        extra = (*extra, "--tls-port", "0")
    # The console goes to a pipe read by its own process: the banner line is passed on, the rest
    # discarded, so the generator's process spends nothing on it.
    pattern = "TLS on port " if tls else "port "
    then = "exec cat >/dev/null"
    if wait_for:  # a later line too (a linked room: "linked to ..."), then nothing more
        then = (f'while IFS= read -r l; do case $l in *"{wait_for}"*) printf "%s\\n" "$l"; '
                'exec cat >/dev/null;; esac; done')
    console = subprocess.Popen(
        ["sh", "-c", f'while IFS= read -r l; do case $l in *"{pattern}"*) printf "%s\\n" "$l"; '
         f'{then};; esac; done'],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    err = tempfile.TemporaryFile()
    p = subprocess.Popen(
        [*CHATLOG, "serve", "--room", "0", "--bind", "127.0.0.1", "--db", str(db), *extra],
        stdin=subprocess.PIPE, stdout=console.stdin, stderr=err, env=dict(os.environ, NO_COLOR="1"),
    )
    console.stdin.close()
    banner = console.stdout.readline()
    if wait_for and banner:
        console.stdout.readline()  # linked: the room is whole
    m = re.search(r"port (\d+)", banner)
    server = Server("chatlog", p, int(m.group(1)) if m else 0, db=db, helpers=(console,))
    server.stderr = err
    if not m:
        server.stop()
        raise Unavailable(f"serve --room failed: exit {p.returncode}: {' '.join(server.last_words())[:60]}")
    return server


class Linked:
    """Three chatlog servers in one room linked through a local `nats-server -js` (the room's
    stream on disk): for a scenario, one server whose clients are spread over three ports."""

    name = "linked"

    def __init__(self, broker, servers):
        self.broker, self.servers = broker, servers
        self.ports = [s.port for s in servers]
        self.port = self.ports[0]
        self.db = servers[0].db
        self.dbs = [s.db for s in servers]
        self.proc = servers[0].proc
        self.hwm = None

    def alive(self):
        return all(s.alive() for s in self.servers)

    def sample(self):
        for s in self.servers:
            s.sample()
        self.hwm = max((s.hwm or 0) for s in self.servers) or None
        return self.hwm

    def cpu_seconds(self):
        cpu = [s.cpu_seconds() for s in self.servers]
        return None if None in cpu else round(sum(cpu), 2)

    def last_words(self):
        return [w for s in self.servers for w in s.last_words()]

    def broker_cpu_seconds(self):
        return Server("nats-server", self.broker, 0).cpu_seconds()

    def stop(self):
        for s in self.servers:
            s.stop()
        if self.broker.poll() is None:
            self.broker.terminate()
        self.broker.wait(10)


def start_linked(tmp, extra=()):
    nats = shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin:/usr/local/sbin")
    if nats is None:
        raise Unavailable("no nats-server")
    port = free_port()
    broker = subprocess.Popen([nats, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp / "js")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(port, broker)
    servers = []
    try:
        for name in "abc":
            db = tmp / f"{name}.db"
            servers.append(start_chatlog(0, db, ("--name", "bench", "--link", f"nats://127.0.0.1:{port}", *extra),
                                         wait_for="linked to "))
    except Unavailable:
        for s in servers:
            s.stop()
        broker.terminate()
        broker.wait(10)
        raise
    return Linked(broker, servers)


def same_archives(dbs, run):
    """Whether linked servers' archives hold the same lines of this run in the same order (the
    clients' leaving at the end is not compared: each server stops when it stops)."""
    got = []
    for db in dbs:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            got.append(conn.execute("SELECT origin_server, origin_id, stream_seq, text FROM messages "
                                    "WHERE stream_seq IS NOT NULL AND text LIKE ? ORDER BY id", (run + " %",)).fetchall())
        finally:
            conn.close()
    return all(g == got[0] for g in got[1:]) and bool(got[0])


def stored_lines(db, run):
    """Rows of this run's lines in the store: in the room's session(s) once sessions.kind exists,
    in messages otherwise."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        cols = {r[1] for r in conn.execute("PRAGMA table_info(sessions)")}
        sql = "SELECT count(*) FROM messages WHERE text LIKE ?"
        if "kind" in cols:
            sql += " AND session_id IN (SELECT id FROM sessions WHERE kind = 'room')"
        return conn.execute(sql, (run + " %",)).fetchone()[0]
    finally:
        conn.close()


class Target:
    """Starts and stops one kind of server for a scenario (chatlog gets a fresh database)."""

    def __init__(self, kind, tls=False):
        if tls and kind not in ("chatlog",):
            raise Unavailable("--tls: chatlog only")
        self.kind = kind
        self.tls = tls
        self.tmp = None
        self.tls_context = None  # the clients' ssl context once a TLS server started

    def load(self, server, timing=False):
        """The scenario's clients: TLS ones against a TLS server."""
        return Load(server.port, timing=timing, tls=self.tls_context, ports=getattr(server, "ports", None))

    def __enter__(self):
        return self

    def start(self, max_conns, unlimited=False):
        """unlimited: turn chatlog's per-client rate limit off (a scenario measuring how fast the
        room relays one client that sends as fast as it can, not the limiter)."""
        if self.kind == "ncat":
            return start_ncat(max_conns)
        if self.kind == "relay":
            return start_relay(max_conns)
        self.tmp = tempfile.TemporaryDirectory(prefix="chatlog-bench-")
        if self.kind == "linked":
            return start_linked(Path(self.tmp.name), ("--rate", "0") if unlimited else ())
        db = Path(self.tmp.name) / "room.db"
        server = start_chatlog(max_conns, db, ("--rate", "0") if unlimited else (), tls=self.tls)
        if self.tls:
            self.tls_context = client_context(db.with_name("chatlog-tls-cert.pem"))
        return server

    def __exit__(self, *exc):
        if self.tmp:
            self.tmp.cleanup()


def client_context(cafile):
    """A verifying client context with the server's self-signed certificate as the only CA."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    return ctx


# --------------------------------------------------------------------------------------- clients

class TlsSock:
    """A non-blocking TLS client socket that reads and writes as a plain one does for Load:
    want-read/want-write come out as BlockingIOError, and a read takes what OpenSSL already holds
    (`pending()`: it does not wake the selector) and every record the kernel has, up to `size`."""

    __slots__ = ("s", "handshaking")

    def __init__(self, s):
        self.s = s
        self.handshaking = True

    def fileno(self):
        return self.s.fileno()

    def handshake(self):
        """One step: None (done), or the selector events it waits on."""
        try:
            self.s.do_handshake()
        except ssl.SSLWantReadError:
            return EVENT_READ
        except ssl.SSLWantWriteError:
            return EVENT_READ | EVENT_WRITE
        self.handshaking = False
        return None

    def recv(self, size):
        buf = bytearray(size)
        return bytes(memoryview(buf)[:self.recv_into(buf)])

    def recv_into(self, buf):
        """As `recv`, into `buf`: what the TLS layer has decrypted, up to len(buf) bytes."""
        s, view = self.s, memoryview(buf)
        try:
            got = s.recv_into(view)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise BlockingIOError from None
        while got and got < len(view):
            try:
                more = s.recv_into(view[got:], min(len(view) - got, max(s.pending(), 16384)))
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except OSError:
                break  # seen again at the next read
            if not more:
                break
            got += more
        return got

    def send(self, data):
        if self.handshaking:
            raise BlockingIOError
        try:
            return self.s.send(data)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise BlockingIOError from None

    def close(self):
        self.s.close()


class Client:
    __slots__ = ("id", "sock", "buf", "out", "greeted", "count", "closed", "reader", "mask", "strict", "intact")

    def __init__(self, cid, sock, reader=True):
        self.id, self.sock, self.reader = cid, sock, reader
        self.buf = b""
        self.out = bytearray()
        self.greeted = False
        self.count = 0
        self.closed = False
        self.mask = 0
        self.strict = False  # also check each line whole (a regex: slow, so on a few listeners only)
        self.intact = 0


class Load:
    """The clients of one scenario and the event loop that drives them."""

    def __init__(self, port, timing=False, tls=None, ports=None):
        self.port = port
        self.ports = ports  # linked servers: clients spread over them in turn (None: `port`)
        self.tls = tls  # an ssl.SSLContext: every client speaks TLS
        if tls is not None:  # the plain path's methods stay as they are
            self._read, self._flush = self._tls_read, self._tls_flush
        self.sel = selectors.EpollSelector()
        self.clients = []
        self.run = secrets.token_hex(4)
        self.marker = b">" + self.run.encode() + b" "
        # the sender's id, the line's number and its send time; the line whole up to its newline
        self.rx = re.compile(re.escape(self.marker) + rb"(\d+) (\d+) (\d+) x+\n")
        self.timing = timing
        self.lat = array.array("q")
        self.seen = set()
        self.delivered = 0
        self.last_delivery = 0
        # The generator's CPU seconds at the last delivery, read once a pass of the loop that
        # delivered something, not at every read (getrusage is a system call).
        self.last_delivery_cpu = 0.0
        self._cpu_for = 0
        self.rbuf = bytearray(262144)
        self.rview = memoryview(self.rbuf)
        self.coalesce = 0.0
        self.open_error = None
        self.server = None  # when set, its peak memory is sampled every half second
        self.next_sample = 0.0

    # -- connections
    def open(self, n, per_addr=0, reader=True, rcvbuf=0):
        """Start n non-blocking connects; per_addr > 0 spreads source addresses over 127.0.0.2+."""
        made = []
        for _ in range(n):
            cid = len(self.clients)
            try:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            except OSError as exc:  # out of file descriptors: the caller sees fewer clients
                self.open_error = exc.strerror
                break
            if rcvbuf:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            if per_addr:
                k = cid // per_addr + 2
                s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                s.bind((f"127.{k >> 16 & 255}.{k >> 8 & 255}.{k & 255}", 0))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
            c = Client(cid, s, reader)
            err = s.connect_ex(("127.0.0.1", self.ports[cid % len(self.ports)] if self.ports else self.port))
            if err not in (0, errno.EINPROGRESS):
                c.closed = True
                s.close()
            elif self.tls is not None:
                c.sock = TlsSock(self.tls.wrap_socket(s, server_hostname="127.0.0.1", do_handshake_on_connect=False))
                c.mask = EVENT_READ | EVENT_WRITE  # writable: connected, the ClientHello goes out
                self.sel.register(c.sock, c.mask, c)
            elif reader:
                c.mask = EVENT_READ
                self.sel.register(s, EVENT_READ, c)
            self.clients.append(c)
            made.append(c)
        return made

    def close(self, c):
        if c.closed:
            return
        c.closed = True
        if c.mask:
            self.sel.unregister(c.sock)
            c.mask = 0
        c.sock.close()

    def close_all(self):
        for c in self.clients:
            self.close(c)
        self.sel.close()

    # -- I/O
    def send(self, c, data):
        if c.closed:
            return
        if not c.out:
            try:
                n = c.sock.send(data)
            except BlockingIOError:
                n = 0
            except OSError:
                return self.close(c)
            if n == len(data):
                return
            data = data[n:]
        c.out += data
        self._want(c, EVENT_READ | EVENT_WRITE if c.reader else EVENT_WRITE)

    def _want(self, c, mask):
        if mask == c.mask or c.closed:
            return
        if not c.mask:
            self.sel.register(c.sock, mask, c)
        elif not mask:
            self.sel.unregister(c.sock)
        else:
            self.sel.modify(c.sock, mask, c)
        c.mask = mask

    def _flush(self, c):
        try:
            n = c.sock.send(c.out)
        except BlockingIOError:
            return
        except OSError:
            return self.close(c)
        del c.out[:n]
        if not c.out:
            self._want(c, EVENT_READ if c.reader else 0)

    def _tls_step(self, c):
        """Go on with a TLS client's handshake: True once it is done."""
        try:
            wait = c.sock.handshake()
        except (ssl.SSLError, OSError):
            self.close(c)
            return False
        if wait is None:
            self._want(c, (EVENT_READ if c.reader else 0) | (EVENT_WRITE if c.out else 0))
            return True
        self._want(c, wait)
        return False

    def _tls_flush(self, c):
        if c.sock.handshaking:
            if self._tls_step(c) and c.out:
                Load._flush(self, c)
            return
        Load._flush(self, c)

    def _tls_read(self, c):
        if c.sock.handshaking and not self._tls_step(c):
            return
        Load._read(self, c)

    def _read(self, c):
        try:
            # Into one buffer kept for every read: recv(262144) would map, remap and unmap
            # 256 KiB each time (four system calls a read, not one).
            n = c.sock.recv_into(self.rbuf)
        except BlockingIOError:
            return
        except OSError:
            return self.close(c)
        if not n:
            return self.close(c)
        data = bytes(self.rview[:n])
        c.greeted = True
        if c.buf:
            data = c.buf + data
        nl = data.rfind(b"\n")
        if nl < 0:
            c.buf = data if len(data) < MAX_LINE else b""  # a server's endless line: not ours
            return
        c.buf = data[nl + 1:]
        if self.timing:
            now = time.monotonic_ns()
            found = self.rx.findall(data, 0, nl + 1)
            if found:
                lat, seen = self.lat.append, self.seen.add
                for sid, seq, t in found:
                    lat(now - int(t))
                    seen((sid, seq))
                c.count += len(found)
                self.delivered += len(found)
                self.last_delivery = now
        else:
            k = data.count(self.marker, 0, nl + 1)
            if c.strict:
                c.intact += len(self.rx.findall(data, 0, nl + 1))
            if k:
                c.count += k
                self.delivered += k
                self.last_delivery = time.monotonic_ns()

    def line(self, cid, seq, size=0):
        """One client line; size pads it to that many bytes (newline included)."""
        head = b"b%d%s%d %d %d " % (cid, self.marker, cid, seq, time.monotonic_ns())
        return head + b"x" * max(1, size - len(head) - 1) + b"\n"

    def loop(self, until, deadline, timers=None, tick=None):
        """Run the event loop until until() is true or the monotonic deadline passes; timers is a
        heap of (due, client id, client) to pass to tick(client, now, due) when due. Returns until()."""
        sel, coalesce = self.sel, self.coalesce
        while True:
            if until():
                return True
            now = time.monotonic()
            if now >= deadline:
                return until()
            wait = deadline - now
            if timers:
                wait = max(0.0, min(wait, timers[0][0] - now))
            for key, mask in sel.select(min(wait, 0.25)):
                c = key.data
                if mask & EVENT_WRITE:
                    self._flush(c)
                if mask & EVENT_READ and not c.closed:
                    self._read(c)
            if self.last_delivery != self._cpu_for:
                self._cpu_for = self.last_delivery
                self.last_delivery_cpu = cpu_seconds()
            if timers:
                now = time.monotonic()
                while timers and timers[0][0] <= now:
                    due, cid, c = heapq.heappop(timers)
                    nxt = tick(c, now, due)
                    if nxt is not None:
                        heapq.heappush(timers, (nxt, cid, c))
            if self.server and now >= self.next_sample:
                self.server.sample()
                self.next_sample = now + 0.5
            if coalesce:
                time.sleep(coalesce)  # let many small writes gather into one recv() per socket

    def join(self, clients, timeout):
        """Wait until each of these clients got its first line from the server (it was accepted
        and greeted) or closed. Returns how many were greeted."""
        self.loop(lambda: all(c.greeted or c.closed for c in clients), time.monotonic() + timeout)
        return sum(c.greeted and not c.closed for c in clients)


def percentile(sorted_values, p):
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p))]


def _finish(load, server, res, cpu0, t0):
    res["generator_cpu_s"] = round(cpu_seconds() - cpu0, 2)
    res["wall_s"] = round(time.monotonic() - t0, 2)
    res["server_alive"] = server.alive()
    res["server_cpu_s"] = server.cpu_seconds()
    server.sample()
    res["server_vmhwm_mb"] = server.hwm and round(server.hwm, 1)
    load.close_all()
    server.stop()
    res["server_exit"] = server.proc.returncode if not res["server_alive"] else None
    if not res["server_alive"]:
        res["server_said"] = server.last_words()
    if server.db:
        res["stored"] = stored_lines(server.db, load.run)
    if getattr(server, "dbs", None):
        res["stored_each"] = [stored_lines(db, load.run) for db in server.dbs]
        res["archives_identical"] = same_archives(server.dbs, load.run)
    return res


def _paced(load, senders, rate, seconds, size):
    """Each sender sends `rate` lines a second for `seconds`, start times staggered across the
    first period, each keeping its own phase: the next line is due a period after the last was
    due, not after it went. (Timed from when it went, senders that fell due in one pass of the
    loop stayed together from then on: the load gathered into ever larger bursts as the run went,
    the sooner the busier the machine.) Returns the number of lines sent."""
    period = 1.0 / rate
    start = time.monotonic()
    end = start + seconds
    seq = {}
    sent = 0
    timers = [(start + period * i / len(senders), c.id, c) for i, c in enumerate(senders)]
    heapq.heapify(timers)

    def tick(c, now, due):
        nonlocal sent
        if now >= end or c.closed:
            return None
        n = seq.get(c.id, 0)
        seq[c.id] = n + 1
        load.send(c, load.line(c.id, n, size))  # (timed from now: a late line is not counted late)
        sent += 1
        return due + period

    load.loop(lambda: not timers, end + period, timers, tick)
    return sent


def _drain(load, expected, quiet=3.0, limit=15.0):
    """Wait for the expected deliveries: until they are all in, nothing arrived for `quiet`
    seconds, or `limit` seconds passed."""
    deadline = time.monotonic() + limit
    while load.delivered < expected and time.monotonic() < deadline:
        before = load.delivered
        load.loop(lambda: load.delivered >= expected, min(deadline, time.monotonic() + quiet))
        if load.delivered == before:
            break


def fanout(target, clients=200, rate=2.0, seconds=20.0, size=0):
    """N clients each sending `rate` lines a second; every other client times every line."""
    server = target.start(clients + 10)
    load = target.load(server, timing=True)
    load.server = server
    t0, cpu0 = time.monotonic(), cpu_seconds()
    cs = []
    for i in range(0, clients, BATCH):
        batch = load.open(min(BATCH, clients - i))
        cs += batch
        if load.join(batch, 15) < len(batch):
            break
    joined = sum(c.greeted and not c.closed for c in cs)
    start, start_cpu = time.monotonic(), cpu_seconds()
    broker = server.broker_cpu_seconds if isinstance(server, Linked) else lambda: None
    server_cpu, broker_cpu = server.cpu_seconds(), broker()
    sent = _paced(load, cs, rate, seconds, size) if joined == clients else 0
    expected = sent * (clients - 1)
    _drain(load, expected)
    took = time.monotonic() - start
    busy = round(100 * (cpu_seconds() - start_cpu) / took)
    # The cores each part kept busy while lines came (where a shared machine's margin goes).
    cores = {"generator": (cpu_seconds() - start_cpu) / took}
    for part, then, now in (("server", server_cpu, server.cpu_seconds()), ("broker", broker_cpu, broker())):
        if then is not None and now is not None:
            cores[part] = (now - then) / took
    lat = sorted(load.lat)
    res = {"clients": clients, "joined": joined, "sent": sent, "expected": expected, "delivered": load.delivered,
           "relayed": len(load.seen), "p50_ms": ms(percentile(lat, 0.5)), "p99_ms": ms(percentile(lat, 0.99)),
           "max_ms": ms(lat[-1] if lat else None), "dropped": sum(c.closed for c in cs), "generator_busy_pct": busy,
           "cores": {part: round(c, 2) for part, c in cores.items()}}
    return _finish(load, server, res, cpu0, t0)


def ms(ns):
    return None if ns is None else round(ns / 1e6, 2)


def throughput(target, listeners=100, lines=20000, size=0):
    """One sender writes `lines` lines as fast as the server takes them; `listeners` count them
    (a line counts once its run tag arrives: bytes.count, C speed). The first listener also checks
    every line whole, to its newline, and reports how many were: `intact_on_checked`."""
    server = target.start(listeners + 10, unlimited=True)
    load = target.load(server)
    load.server = server
    t0, cpu0 = time.monotonic(), cpu_seconds()
    ls = []
    for i in range(0, listeners, BATCH):
        batch = load.open(min(BATCH, listeners - i))
        ls += batch
        if load.join(batch, 15) < len(batch):
            break
    sender = load.open(1)[0]
    load.join([sender], 15)
    joined = sum(c.greeted and not c.closed for c in ls)
    ls[0].strict = True
    expected = lines * listeners
    res = {"listeners": listeners, "lines": lines, "joined": joined, "expected": expected}
    if joined == listeners and sender.greeted:
        payload = b"".join(load.line(0, n, size) for n in range(lines))
        start, start_cpu = time.monotonic_ns(), cpu_seconds()
        load.send(sender, payload)
        _drain(load, expected, quiet=5.0, limit=60.0)
        took = (load.last_delivery - start) / 1e9 if load.delivered else None
        res["generator_busy_pct"] = took and round(100 * (load.last_delivery_cpu - start_cpu) / took)
        res.update(delivered=load.delivered, seconds=took and round(took, 3),
                   deliveries_per_s=took and load.delivered / took,
                   relayed=max(c.count for c in ls), intact_on_checked=ls[0].intact,
                   complete=load.delivered == expected and ls[0].intact == lines)
    return _finish(load, server, res, cpu0, t0)


def slow(target, clients=50, rate=10.0, size=450, seconds=20.0):
    """`clients` clients, one of which never reads (with a small receive buffer, so it fills in
    seconds rather than minutes); the others send `rate` lines a second of `size` bytes and time
    them. Returns what the others did not get."""
    server = target.start(clients + 10)
    load = target.load(server, timing=True)
    load.server = server
    t0, cpu0 = time.monotonic(), cpu_seconds()
    mute = load.open(1, reader=False, rcvbuf=4096)[0]
    cs = []
    for i in range(0, clients - 1, BATCH):
        batch = load.open(min(BATCH, clients - 1 - i))
        cs += batch
        if load.join(batch, 15) < len(batch):
            break
    joined = sum(c.greeted and not c.closed for c in cs)
    sent = _paced(load, cs, rate, seconds, size) if joined == clients - 1 else 0
    expected = sent * (clients - 2)
    _drain(load, expected)
    # Did the server drop the client that never reads? (read what it holds: EOF or a reset says so)
    mute_dropped = None
    if not mute.closed:
        mute.sock.setblocking(True)
        mute.sock.settimeout(2)
        try:
            while mute.sock.recv(1 << 20):
                pass
            mute_dropped = True
        except ConnectionResetError:
            mute_dropped = True
        except OSError:
            mute_dropped = False
    lat = sorted(load.lat)
    res = {"clients": clients, "joined": joined + 1, "sent": sent, "expected": expected, "delivered": load.delivered,
           "undelivered_pct": round(100 * (1 - load.delivered / expected), 1) if expected else None,
           "relayed": len(load.seen), "p99_ms": ms(percentile(lat, 0.99)), "mute_dropped": mute_dropped,
           "dropped_readers": sum(c.closed for c in cs)}
    return _finish(load, server, res, cpu0, t0)


def crowd(target, clients=10000, batch=None, per_addr=100, connect_limit=180.0):
    """`clients` concurrent clients, connected in batches of `batch` (each batch waits for its
    greetings), source addresses spread over 127.0.0.2+ (`per_addr` each); then one line to all."""
    server = target.start(clients + 10)
    load = target.load(server)
    load.server = server
    load.coalesce = 0.005
    t0, cpu0 = time.monotonic(), cpu_seconds()
    deadline = t0 + connect_limit
    batch = batch or BATCH
    cs = []
    stalled = None
    joined_max = 0
    while len(cs) < clients and time.monotonic() < deadline:
        b = load.open(min(batch, clients - len(cs)), per_addr=per_addr)
        cs += b
        if not b:
            stalled = len(cs)
            break
        ok = load.join(b, 10) == len(b)
        server.sample()
        joined_max = max(joined_max, sum(c.greeted and not c.closed for c in cs))
        if not ok or not server.alive():
            stalled = len(cs) - len(b)
            break
    connect_s = time.monotonic() - t0
    busy = round(100 * (cpu_seconds() - cpu0) / connect_s)
    joined = sum(c.greeted and not c.closed for c in cs)
    peak_during_connect = max(joined, joined_max)
    live = [c for c in cs if c.greeted and not c.closed]
    got = 0
    if live and server.alive():
        sender = live[0]
        load.send(sender, load.line(sender.id, 0))
        others = live[1:]
        load.loop(lambda: all(c.count or c.closed for c in others), time.monotonic() + 60)
        got = sum(1 for c in others if c.count)
    res = {"clients": clients, "joined": peak_during_connect, "stalled_at": stalled, "open_error": load.open_error,
           "connect_s": round(connect_s, 1), "generator_busy_pct": busy,
           "got_line": got, "of": max(0, len(live) - 1), "alive_after": server.alive(),
           "relayed": 1 if got else 0}
    return _finish(load, server, res, cpu0, t0)


def resets(target, clients=20, resets=500):
    """`clients` clients in the room, then `resets` connections made and reset (SO_LINGER 0) at
    once, back to back, as a port scanner or a crashing client does; then one line to all.
    `ncat --chat` exits when a reset lands between its accept() and its getpeername()."""
    server = target.start(clients + resets + 10)
    load = target.load(server)
    load.server = server
    t0, cpu0 = time.monotonic(), cpu_seconds()
    cs = []
    for i in range(0, clients, BATCH):
        batch = load.open(min(BATCH, clients - i))
        cs += batch
        if load.join(batch, 15) < len(batch):
            break
    done = 0
    for _ in range(resets):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        try:
            s.connect(("127.0.0.1", server.port))
        except OSError:  # refused: nothing listens any more
            s.close()
            break
        s.close()
        done += 1
    live = [c for c in cs if c.greeted and not c.closed]
    load.loop(lambda: not server.alive(), time.monotonic() + 1)  # give it a moment to fall over
    got = 0
    if live and server.alive():
        load.send(live[0], load.line(live[0].id, 0))
        load.loop(lambda: all(c.count or c.closed for c in live[1:]), time.monotonic() + 15)
        got = sum(1 for c in live[1:] if c.count)
    res = {"clients": clients, "resets": done, "survived": server.alive(), "got_line": got,
           "of": max(0, len(live) - 1), "relayed": 1 if got else 0}
    return _finish(load, server, res, cpu0, t0)


def idle(target, clients=1000, per_addr=100, warm=BATCH):
    """The server's resident memory per idle client: `warm` clients first (the first connections
    load libraries and grow the heap), its VmRSS, then `clients` more that join and stay silent,
    its VmRSS again once the join notices have drained: (after - before) / clients."""
    server = target.start(clients + warm + 10)
    load = target.load(server)
    load.server = server
    t0, cpu0 = time.monotonic(), cpu_seconds()
    first = load.open(warm, per_addr=per_addr)
    load.join(first, 15)
    load.loop(lambda: False, time.monotonic() + 1)
    before = server.status("VmRSS")
    cs = []
    while len(cs) < clients:
        b = load.open(min(BATCH, clients - len(cs)), per_addr=per_addr)
        cs += b
        if not b or load.join(b, 15) < len(b):
            break
    load.loop(lambda: False, time.monotonic() + 2)  # the last join notices read, queues empty
    after = server.status("VmRSS")
    joined = sum(c.greeted and not c.closed for c in cs)
    res = {"clients": clients, "joined": joined, "rss_before_mb": before and round(before, 1),
           "rss_after_mb": after and round(after, 1),
           "kb_per_client": round((after - before) * 1024 / joined, 1) if before and after and joined else None,
           "relayed": 0}
    return _finish(load, server, res, cpu0, t0)


SCENARIOS = {"fanout": fanout, "throughput": throughput, "slow": slow, "crowd": crowd, "resets": resets,
             "idle": idle}


def run(scenario, server, tls=False, **kw):
    """Run one scenario against one server kind (tls: chatlog's TLS port, TLS clients); raises
    Unavailable when it cannot run."""
    raise_fd_limit()
    with Target(server, tls=tls) as t:
        return SCENARIOS[scenario](t, **kw)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("scenario", choices=SCENARIOS)
    ap.add_argument("--server", choices=("chatlog", "ncat", "relay", "linked"), default="ncat")
    ap.add_argument("--chatlog", metavar="PATH", help="the chatlog command to run [default: this venv's]")
    ap.add_argument("--tls", action="store_true", help="TLS clients against chatlog's --tls-port")
    for name, typ in (("clients", int), ("listeners", int), ("lines", int), ("rate", float), ("size", int),
                      ("seconds", float), ("batch", int), ("per-addr", int), ("resets", int)):
        ap.add_argument(f"--{name}", type=typ)
    a = ap.parse_args()
    if a.chatlog:
        CHATLOG[0] = a.chatlog
    kw = {k.replace("-", "_"): v for k, v in vars(a).items()
          if v is not None and k not in ("scenario", "server", "chatlog", "tls")}
    try:
        print(json.dumps(run(a.scenario, a.server, tls=a.tls, **kw), indent=1))
    except Unavailable as exc:
        print(f"n/a: {exc}", file=sys.stderr)
        sys.exit(2)
    except TypeError as exc:
        print(f"roomload: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
