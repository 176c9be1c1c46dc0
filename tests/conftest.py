"""Shared fixtures: real binaries, real sockets, real SQLite files.

The helpers every test file uses (add to these rather than writing another):
  start_server / server / ServerProc  a real `chatlog serve`: operator input, console, limits
  spawn_client, login                 the real ./chatclient in a pseudo-terminal
  run_chatlog                         a chatlog command with --db: exit_code, stdout, stderr
  storebuild.open_store               a database built through the recorder, with named rows
  db_dicts / db_rows                  what was stored, by column name / as tuples
  recv_until, ending, wait_until      sockets and conditions, never fixed sleeps
  join_room                           a raw client in a room, greeted (and named)
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from forkserver import ForkedProc, can_fork

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    """Long tests first: most of their time is waiting (a broker's election, a browser, a
    delete that leaves the lock free between its batches), so begun early they overlap the rest
    of the suite instead of being what the last worker is still doing. Marked `slow`, or in an
    xdist group (chatlog web's module: one unit of work on one worker)."""
    items.sort(key=lambda item: not (item.get_closest_marker("slow") or item.get_closest_marker("xdist_group")))


def _build(target):
    subprocess.run(["make", "-s", "-C", str(ROOT), target], check=True)
    return ROOT / target


@pytest.fixture(scope="session")
def chatclient():
    """Path to the compiled ./chatclient (built once per test run; $CHATCLIENT overrides it,
    e.g. to run the end-to-end tests against the sanitizer build)."""
    if os.environ.get("CHATCLIENT"):
        return Path(os.environ["CHATCLIENT"]).resolve()
    return _build("chatclient")


@pytest.fixture(scope="session")
def chatclient_asan():
    """Path to the AddressSanitizer/UBSan build of the client."""
    return _build("chatclient-asan")


@pytest.fixture(scope="session")
def valgrind():
    path = shutil.which("valgrind")
    if not path:
        pytest.skip("valgrind is not installed")
    return path


@pytest.fixture
def db_path(tmp_path):
    """A fresh database path (not created); commands are pointed at it with --db."""
    return tmp_path / "chat.db"


# -- a real `chatlog serve` process ----------------------------------------------------------------

import re  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402


class ServerProc:
    """A real `chatlog serve` on loopback (port 0 unless given), its console read by a thread.

    stdin:  "pipe" (the operator, scripted with say/script/end_input), "closed" (a pipe closed at
            once), "devnull", or a path (`chatlog serve PORT < FILE`).
    stdout: "capture" (lines in .lines/.output, waited on with wait_for), "unread" (a pipe nobody
            reads once the banner is read), "closed" (a pipe whose reader goes away after the
            banner), or a path such as /dev/full (the port is then read from /proc).
    ready:  wait for the banner and the port (False: the server may stop before it listens).
    stderr is always captured; .stderr_text() has all of it once the server has exited.
    The server runs as it would for a user: no PYTHONUNBUFFERED, so its own flushing is tested.
    """

    def __init__(self, db, *args, env=None, bind="127.0.0.1", port=0, stdin="pipe", stdout="capture",
                 preexec_fn=None, ready=True, history=False):
        self.db = db
        self.host = bind
        self.port = None
        if not history and "--room" in args and not any(str(a).startswith("--history") for a in args):
            # A newcomer's history may arrive apart from its greeting; tests of other things
            # read exact bytes after a join, so they run without it (tests/test_history.py has it).
            args = (*args, "--history", "0")
        cmd = [sys.executable, "-m", "chatlog", "serve", str(port), "--db", str(db), "--bind", bind, *args]
        environ = dict(os.environ, NO_COLOR="1")
        for name in ("FORCE_COLOR", "PYTHONUNBUFFERED"):
            environ.pop(name, None)
        environ.update(env or {})
        opened = []
        if stdin in ("pipe", "closed"):
            stdin_arg = subprocess.PIPE
        else:
            stdin_arg = open(os.devnull if stdin == "devnull" else stdin, "rb")
            opened.append(stdin_arg)
        self._stdout_mode = stdout if stdout in ("capture", "unread", "closed") else "file"
        if self._stdout_mode == "file":
            stdout_arg = open(stdout, "wb")
            opened.append(stdout_arg)
        else:
            stdout_arg = subprocess.PIPE
        try:
            if preexec_fn is None and can_fork(env):  # see tests/forkserver.py
                self.proc = ForkedProc(cmd[3:], stdin=stdin_arg, stdout=stdout_arg, stderr=subprocess.PIPE,
                                       env=environ, cwd=ROOT)
            else:
                self.proc = subprocess.Popen(cmd, stdin=stdin_arg, stdout=stdout_arg, stderr=subprocess.PIPE,
                                             env=environ, cwd=ROOT, preexec_fn=preexec_fn)
        finally:
            for f in opened:
                f.close()
        if stdin == "closed":
            self.proc.stdin.close()
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._err = bytearray()
        self._err_reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._err_reader.start()
        self._reader = None
        if self._stdout_mode == "capture":
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
            if ready:
                first = self.wait_for(r"Server started .* port (\d+)")
                self.port = int(re.search(r"port (\d+)", first).group(1))
                self.wait_for("Awaiting client connections|The room is open")
        elif self._stdout_mode in ("unread", "closed"):
            banner = self.proc.stdout.readline().decode()
            assert "port " in banner, f"no banner: {banner!r}; stderr: {self.stderr_text()}"
            self.port = int(banner.rsplit("port ", 1)[1].split()[0])
            if self._stdout_mode == "closed":
                self.proc.stdout.close()  # nobody reads the console any more
        elif ready:
            self.port = wait_until(self._listening_port)

    def start_reading(self):
        """Begin reading an "unread" console now (the console catching up), for wait_for."""
        assert self._stdout_mode == "unread" and self._reader is None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _listening_port(self) -> int | None:
        """The port the server listens on, from /proc (for when its banner cannot be read)."""
        assert self.proc.poll() is None, f"the server exited: {self.stderr_text()}"
        inodes = set()
        for fd in os.listdir(f"/proc/{self.proc.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{self.proc.pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                rows = open(table).read().splitlines()[1:]
            except OSError:
                continue
            for line in rows:
                parts = line.split()
                if parts[3] == "0A" and parts[9] in inodes:  # LISTEN
                    return int(parts[1].rsplit(":", 1)[1], 16)
        return None

    def _read(self):
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.lines.append(None)  # end of output
            self._cond.notify_all()

    def _read_stderr(self):
        for chunk in iter(lambda: self.proc.stderr.read1(65536), b""):
            self._err += chunk

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(x for x in self.lines if x is not None)

    def wait_for(self, pattern, timeout=10.0, start=0):
        """Wait until a console line (from index `start`) matches the regex; return the line."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    if line is not None and rx.search(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self.lines and self.lines[-1] is None):
                    raise AssertionError(
                        f"no console line matching {pattern!r}; console so far:\n{self.output}\n"
                        f"stderr: {self._stderr()}"
                    )
                self._cond.wait(left)

    def count(self, pattern) -> int:
        rx = re.compile(pattern)
        with self._cond:
            return sum(1 for x in self.lines if x is not None and rx.search(x))

    def _stderr(self):
        if self.proc.poll() is None:
            return "(still running)"
        return self.stderr_text()

    def stderr_text(self, timeout=10) -> str:
        """Everything the server wrote to stderr: waits for it to exit."""
        self.proc.wait(timeout)
        self._err_reader.join(timeout)
        return self._err.decode("utf-8", "replace")

    def say(self, line: str):
        """The operator types a line."""
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def script(self, lines):
        """Queue many operator answers without blocking on a full pipe (written by a thread)."""
        data = b"".join(line.encode() + b"\n" for line in lines)

        def write():
            try:
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
            except (OSError, ValueError):
                pass

        threading.Thread(target=write, daemon=True).start()

    def end_input(self):
        self.proc.stdin.close()

    def connect(self) -> socket.socket:
        s = socket.create_connection((self.host, self.port), timeout=10)
        return s

    def signal(self, sig=signal.SIGINT):
        self.proc.send_signal(sig)

    def wait(self, timeout=10):
        """Wait for the server to exit; its whole console is read by then. Returns the exit code."""
        code = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(timeout)
        self._err_reader.join(timeout)
        return code

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for reader in (self._reader, self._err_reader):  # they end at EOF: never close under them
            if reader is not None:
                reader.join(10)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f is not None:
                    f.close()
            except (OSError, ValueError):
                pass


@pytest.fixture
def start_server(tmp_path):
    """Factory: start_server(*extra_args, **ServerProc options) -> ServerProc; every server is
    stopped afterwards."""
    servers = []

    def start(*args, db=None, **options):
        server = ServerProc(db or tmp_path / "chat.db", *args, **options)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def server(start_server):
    return start_server()


def spawn_client(chatclient, server, *args, host="127.0.0.1", handle=None, **options):
    """The real ./chatclient in a pseudo-terminal (pexpect), connecting to `server` (a ServerProc,
    or a port on `host`). With `handle`, it is logged in: connected, handle given, prompt shown."""
    import pexpect

    if isinstance(server, ServerProc):
        host, port = server.host, server.port
    else:
        port = server
    env = dict(os.environ, TERM="xterm")
    p = pexpect.spawn(str(chatclient), [*args, host, str(port)], env=env, encoding="utf-8", timeout=10, **options)
    if handle is not None:
        p.expect_exact(f"Connecting to {host} port {port}")
        login(p, handle)
    return p


def login(p, handle="brandon"):
    """Answer the client's handle question and wait for its prompt."""
    p.expect_exact("What would you like your chat handle to be> ")
    p.sendline(handle)
    p.expect_exact(f"{handle}>")


class Ran:
    """What a chatlog command did: exit_code, stdout, stderr (and output: both)."""

    def __init__(self, exit_code: int, stdout: str, stderr: str):
        self.exit_code, self.stdout, self.stderr = exit_code, stdout, stderr

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_chatlog(db, *args, input=None, env=None, process=False, timeout=60):
    """Run `chatlog ARGS --db DB` (no --db when db is None) and return exit_code, stdout, stderr
    and output. In-process through the real click command by default (fast: a test suite runs
    hundreds); process=True runs `python -m chatlog` for what only a process shows (the entry
    point, exit codes from the top, environment, pipes)."""
    argv = [*args, "--db", str(db)] if db is not None else list(args)
    if not process:
        from click.testing import CliRunner

        from chatlog.cli import cli

        return CliRunner(env=env).invoke(cli, argv, input=input, catch_exceptions=False)
    environ = dict(os.environ, **(env or {}))
    if not can_fork(env):
        r = subprocess.run([sys.executable, "-m", "chatlog", *argv], input=input, capture_output=True, text=True,
                           cwd=ROOT, timeout=timeout, env=environ)
        return Ran(r.returncode, r.stdout, r.stderr)
    p = ForkedProc(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environ, cwd=ROOT)
    out, err = p.communicate(None if input is None else input.encode(), timeout)
    return Ran(p.returncode, _text(out), _text(err))


def _text(data: bytes) -> str:
    """As subprocess's text=True makes it: the locale's encoding, universal newlines."""
    import locale

    return data.decode(locale.getpreferredencoding(False)).replace("\r\n", "\n").replace("\r", "\n")


@pytest.fixture
def fake_server():
    """Makes `FakeServer(script)`s (tests/fakeserver.py) for driving the C client, and joins every
    one at teardown: a failure in a script (the client sent something else, or never sent what
    was expected) fails the test, whether or not the test joined it itself."""
    from fakeserver import FakeServer

    made = []

    def make(script):
        srv = FakeServer(script)
        made.append(srv)
        return srv

    yield make
    for srv in made:
        srv.join()


def recv_until(sock, needle: bytes, timeout=10.0) -> bytes:
    """Read from a socket until `needle` has arrived (or the peer closed)."""
    sock.settimeout(timeout)
    data = b""
    while needle not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def join_room(server, handle=None):
    """A raw client in a room: connected, greeted, and (with `handle`) its first line sent."""
    s = server.connect()
    greeting = recv_until(s, b"Type at any time.\n")
    assert greeting.startswith(b"SERVER>*** Welcome to the room: "), greeting
    if handle:
        s.sendall(f"{handle}>hi\n".encode())
    return s


def ending(notice: str, handle: str = "SERVER") -> bytes:
    """What a client receives when the server ends its chat: the notice, then `\\quit`."""
    return f"{handle}>*** {notice}\n\\quit\n".encode()


def wait_until(predicate, timeout=10.0, interval=0.01):
    """Poll `predicate` until it is truthy; return its value or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


def db_dicts(db, sql, args=()):
    """Rows as dicts by column name, for assertions that name what they check."""
    import sqlite3

    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in conn.execute(sql, args)]
    finally:
        conn.close()


def db_rows(db, sql, args=()):
    import sqlite3

    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


@pytest.fixture
def tmpfs(tmp_path):
    """Factory: tmpfs(size) mounts a real, small tmpfs and returns its path (needs root; skipped
    otherwise). Unmounted afterwards."""
    mounts = []

    def mount(size: str) -> Path:
        mnt = tmp_path / f"mnt{len(mounts)}"
        mnt.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
        if r.returncode != 0:
            pytest.skip("cannot mount a tmpfs here")
        mounts.append(mnt)
        return mnt

    yield mount
    for mnt in mounts:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
