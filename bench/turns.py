"""The chat turn: a client sends N messages, each answered by a scripted operator.

chatlog: `chatlog serve 0` with the replies piped in (written by a thread, so the pipe never
blocks) and the console read from a pipe by another thread.
Baseline: a bare Python echo server in its own process (recv a line, send a line; no store, no
console), the same loop shape.
The client measures every turn (send to full reply) with perf_counter_ns.
With tls=True the server also listens with `--tls-port 0` and the client speaks TLS to that port
(Python's ssl, the server's self-signed certificate as the only CA).
"""

import os
import shutil
import socket
import ssl
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import VENV_BIN, Missing, rss_mb

ECHO = r"""
import socket, sys
store = minimal = None
if len(sys.argv) > 2:  # a minimal recorder: a plain table, WAL, synchronous=NORMAL, a commit each
    import sqlite3, time
    minimal = sqlite3.connect(sys.argv[1], isolation_level=None)
    minimal.execute("PRAGMA journal_mode=WAL")
    minimal.execute("PRAGMA synchronous=NORMAL")
    minimal.execute("CREATE TABLE m (id INTEGER PRIMARY KEY, at REAL, sender TEXT, text TEXT)")
elif len(sys.argv) > 1:  # the echo server that also commits both messages of the turn, as chatlog does
    import time
    from chatlog.recorder import open_recorder
    store = open_recorder(sys.argv[1])
    store.start("127.0.0.1", 0, time.time())
    sid = store.begin_session("127.0.0.1", 0, "127.0.0.1", 0, time.time(), served=True)
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0))
srv.listen(1)
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
buf = b""
n = 0
while True:
    data = conn.recv(65536)
    if not data:
        break
    buf += data
    while b"\n" in buf:
        line, _, buf = buf.partition(b"\n")
        n += 1
        if store:
            store.add_message(sid, "client", "bob", line.lstrip(b"\0").decode(), None, None, time.time())
            store.add_message(sid, "server", "SERVER", "reply %d" % n, None, None, time.time())
        elif minimal:
            minimal.execute("INSERT INTO m (at, sender, text) VALUES (?, ?, ?)", (time.time(), "client", line.decode()))
            minimal.execute("INSERT INTO m (at, sender, text) VALUES (?, ?, ?)", (time.time(), "server", "reply %d" % n))
        conn.sendall(b"SERVER>reply %d\n" % n)
"""


def drive(port, n, after_turn=None, tls=None):
    """Chat n turns; return the per-turn latencies in ns. after_turn(i) runs outside the timing.
    tls: an ssl.SSLContext to speak TLS with (the handshake is done before the first turn)."""
    c = socket.create_connection(("127.0.0.1", port))
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls is not None:
        c = tls.wrap_socket(c, server_hostname="127.0.0.1")
    lat = []
    for i in range(n):
        t0 = time.perf_counter_ns()
        c.sendall(b"bob>msg %d\n\0" % i)
        data = c.recv(4096)
        while not data.endswith(b"\n"):
            data += c.recv(4096)
        lat.append(time.perf_counter_ns() - t0)
        if after_turn:
            after_turn(i + 1)
    c.close()
    return lat


def summary(lat, elapsed):
    s = sorted(lat)
    return {
        "turns_per_s": len(s) / elapsed,
        "p50_us": s[len(s) // 2] / 1000,
        "p99_us": s[int(len(s) * 0.99)] / 1000,
        "max_us": s[-1] / 1000,
    }


def echo_turns(n, commit=False, minimal=False):
    """The bare echo server; with commit=True, one that also commits both messages of each turn
    through Recorder.add_message (no framing, no console): the floor for a committed turn; with
    minimal=True, a minimal recorder: both messages committed to a plain SQLite table (WAL,
    synchronous=NORMAL), one commit each, and nothing else."""
    with tempfile.TemporaryDirectory(prefix="chatlog-bench-") as tmp:
        args = [str(Path(tmp) / "echo.db")] if commit or minimal else []
        if minimal:
            args.append("minimal")
        p = subprocess.Popen([sys.executable, "-c", ECHO, *args], stdout=subprocess.PIPE, text=True)
        port = int(p.stdout.readline())
        t = time.perf_counter()
        lat = drive(port, n)
        elapsed = time.perf_counter() - t
        p.wait(10)
    return summary(lat, elapsed)


def start_server(db, n_answers, extra=(), tls=False, wrap=()):
    """`chatlog serve 0` on loopback with n_answers scripted replies; returns (process, port);
    with tls, `--tls-port 0` too, and the port is the TLS one.

    The replies come from a file through `cat` and the console goes to `cat >/dev/null` (after
    its first line, which gives the port): both in processes of their own, so the client's
    process does nothing but chat and time it, as against the echo server.
    """
    replies = db.with_name("replies.txt")
    replies.write_bytes(b"".join(b"reply %d\n" % i for i in range(n_answers)))
    feeder = subprocess.Popen(["cat", str(replies)], stdout=subprocess.PIPE)
    err = tempfile.TemporaryFile()
    if tls:
        extra = (*extra, "--tls-port", "0")
    # the banner's first line gives the port; the second, with TLS, the TLS port
    keep = 2 if tls else 1
    console = subprocess.Popen(
        ["sh", "-c", f'for i in {" ".join(["x"] * keep)}; do IFS= read -r l; printf "%s\\n" "$l"; done; '
         "exec cat >/dev/null"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    p = subprocess.Popen(
        [*wrap, str(VENV_BIN / "chatlog"), "serve", "0", "--db", str(db), "--bind", "127.0.0.1", "--idle-timeout", "600",
         *extra],
        stdin=feeder.stdout, stdout=console.stdin, stderr=err, env=dict(os.environ, NO_COLOR="1"),
    )
    feeder.stdout.close()
    console.stdin.close()
    p.helpers = (feeder, console)
    banner = console.stdout.readline().decode()
    if tls:
        banner = console.stdout.readline().decode()
    if "port " not in banner:  # it did not start: say why in one line, not with a traceback
        p.wait(10)
        stop(p)
        err.seek(0)
        last = (err.read().decode(errors="replace").strip().splitlines() or [f"exit {p.returncode}"])[-1]
        raise Missing(f"serve {' '.join(extra)}: {last}")
    return p, int(banner.rsplit("port ", 1)[1])


def stop(p):
    p.terminate()
    p.wait(10)
    for helper in p.helpers:
        helper.kill()
        helper.wait(10)


def chatlog_turns(n, checkpoints=(), extra=(), tls=False):
    """Returns (summary, {turns: server RSS in MB}, messages committed). extra: more options for
    `chatlog serve` (e.g. --fsync); tls: the client speaks TLS to `--tls-port`."""
    with tempfile.TemporaryDirectory(prefix="chatlog-bench-") as tmp:
        return _chatlog_turns(Path(tmp) / "turns.db", n, checkpoints, extra, tls)


def client_context(db):
    """A verifying client context: the certificate `serve` made beside `db` is the only CA."""
    return ssl.create_default_context(cafile=str(db.with_name("chatlog-tls-cert.pem")))


def serve_has_option(option):
    """True if `chatlog serve` accepts this option yet (read from its --help)."""
    r = subprocess.run([str(VENV_BIN / "chatlog"), "serve", "--help"], capture_output=True, text=True)
    return option in r.stdout.split()


def _chatlog_turns(db, n, checkpoints, extra=(), tls=False):
    p, port = start_server(db, n, extra, tls)
    rss = {}
    marks = set(checkpoints)

    def sample(done):
        if done in marks:
            rss[done] = rss_mb(p.pid)

    t = time.perf_counter()
    lat = drive(port, n, sample if marks else None, client_context(db) if tls else None)
    elapsed = time.perf_counter() - t
    stop(p)
    conn = sqlite3.connect(db)
    committed = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    conn.close()
    return summary(lat, elapsed), rss, committed


def answered_before_committed(n):
    """A separate, untimed run: after every answer, a second connection (another reader, as
    `chatlog tail` would be) checks that the client's message and the answer are both already
    committed. Returns how many of the n turns were answered before that was true."""
    with tempfile.TemporaryDirectory(prefix="chatlog-bench-") as tmp:
        return _answered_before_committed(Path(tmp) / "order.db", n)


def _answered_before_committed(db, n):
    p, port = start_server(db, n)
    reader = None
    early = 0

    def check(done):
        nonlocal reader, early
        reader = reader or sqlite3.connect(db, isolation_level=None)
        seq = reader.execute("SELECT max(seq) FROM messages WHERE session_id = (SELECT max(id) FROM sessions)")
        if (seq.fetchone()[0] or 0) < 2 * done:
            early += 1

    drive(port, n, check)
    stop(p)
    reader.close()
    return early


def callgrind_prefix(out):
    """The command that runs a process under callgrind, counting nothing until told to."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise Missing("valgrind is not installed")
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
            f"--callgrind-out-file={out}"]


def _counted(pid, chat, n):
    """Chat n turns with the counting on (after a warm-up of WARM turns); the instructions the
    server ran in them, from callgrind's totals once it has exited (`chat` stops it)."""
    subprocess.run(["callgrind_control", "-i", "on", str(pid)], capture_output=True, check=True)
    chat(n)
    subprocess.run(["callgrind_control", "-i", "off", str(pid)], capture_output=True, check=True)


def _total(out):
    """(all threads, the main thread): the instructions counted. With --separate-threads, each
    thread has its file, `OUT-01` the main one's (each says `summary: 0` first when counting
    began off, and the count in `totals:`). The main thread's is the steadier figure: a
    background thread's share (the checkpointer's, the search indexer's) depends on how long
    the run took under valgrind."""
    counts = {}
    for f in sorted(Path(out).parent.glob(Path(out).name + "*")):
        totals = [int(line.split()[1]) for line in f.read_text().splitlines() if line.startswith("totals:")]
        if totals:
            counts[f.name] = sum(totals)
    if not counts:
        raise Missing(f"no totals in {out}")
    main = counts.get(Path(out).name + "-01", max(counts.values()))
    return sum(counts.values()), main


WARM = 300


def instructions(kind, n=2000):
    """Instructions the server runs a turn, (all its threads, its main thread), counted by valgrind's callgrind:
    a figure this machine's noise does not move (the same code gives the same count within a
    fraction of a percent), though it leaves out the kernel's time and the caches' misses.
    kind: "chatlog", "minimal" (the minimal recorder) or "floor" (echo + 2 recorder commits)."""
    with tempfile.TemporaryDirectory(prefix="chatlog-bench-") as tmp:
        out = Path(tmp) / "callgrind.out"
        wrap = callgrind_prefix(out)
        if kind == "chatlog":
            p, port = start_server(Path(tmp) / "turns.db", n + WARM + 10, wrap=wrap)
            c = socket.create_connection(("127.0.0.1", port))
        else:
            args = [str(Path(tmp) / "echo.db")] + (["minimal"] if kind == "minimal" else [])
            p = subprocess.Popen([*wrap, sys.executable, "-c", ECHO, *args], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True)
            c = socket.create_connection(("127.0.0.1", int(p.stdout.readline())))
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def chat(k):
            for i in range(k):
                c.sendall(b"bob>msg %d\n\0" % i)
                data = c.recv(4096)
                while not data.endswith(b"\n"):
                    data += c.recv(4096)

        chat(WARM)
        _counted(p.pid, chat, n)
        c.close()
        if kind == "chatlog":
            stop(p)
        else:
            p.wait(60)
        every, main = _total(out)
        return every / n, main / n
