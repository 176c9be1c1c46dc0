"""Start `python -m chatlog ...` processes without paying for Python's start each time.

The suite starts some 250 servers, and each spent ~0.1 s of CPU starting the interpreter and
importing chatlog before it did anything: a fifth of `make test`. A zygote (this file run as a
script) imports chatlog once and forks a child per start, as multiprocessing's forkserver does.
The child is a real, separate process: its own pid, signals and exit status, stdio on the pipes
or files it was given, the environment and working directory asked for, every other descriptor
closed, and an ordinary interpreter exit (atexit, flushing stdout, status 120 when that fails).
What it skips is only the start: the interpreter and the imports. Tests of the start itself
(`chatlog --help`, `make serve`) and anything that needs a `preexec_fn` or an interpreter setting
from the environment still start a fresh interpreter (`ServerProc`/`run_chatlog` decide).

Protocol, per start: the client connects to the zygote's unix socket and sends one JSON request
(argv, env, cwd) with the child's stdin, stdout and stderr descriptors (SCM_RIGHTS); the zygote
answers `pid\n`, and `status\n` (a wait status) when the child has exited.
"""

from __future__ import annotations

import atexit
import io
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

PRELOAD = ("chatlog.cli", "chatlog.server", "chatlog.modes", "chatlog.room", "chatlog.turns",
           "chatlog.recorder", "chatlog.operator", "chatlog.transport", "chatlog.tls", "chatlog.link")


# -- the zygote ---------------------------------------------------------------------------------


def _zygote(path: str) -> dict:
    """Serve forks until stdin closes (the test worker went away). Returns only in a child, with
    its request; the parent exits here."""
    for name in PRELOAD:
        __import__(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "listen")
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "parent")
    children: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, conn)
    while True:
        for key, _ in sel.select():
            if key.data == "parent":
                os._exit(0)
            if key.data == "listen":
                conn, _ = listener.accept()
                msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
                if len(fds) != 3:  # the client gave up before asking
                    for fd in fds:
                        os.close(fd)
                    conn.close()
                    continue
                request = json.loads(msg)
                pid = os.fork()
                if pid == 0:
                    for pidfd, (_, other) in children.items():
                        os.close(pidfd)
                        other.close()
                    sel.close()
                    listener.close()
                    conn.close()
                    _become(request, fds)
                    return request
                for fd in fds:
                    os.close(fd)
                pidfd = os.pidfd_open(pid)
                children[pidfd] = (pid, conn)
                sel.register(pidfd, selectors.EVENT_READ, "child")
                conn.sendall(f"{pid}\n".encode())
            else:
                pidfd = key.fd
                pid, conn = children.pop(pidfd)
                sel.unregister(pidfd)
                os.close(pidfd)
                _, status = os.waitpid(pid, 0)
                try:
                    conn.sendall(f"{status}\n".encode())
                except OSError:
                    pass
                conn.close()


def _become(request: dict, fds: list[int]) -> None:
    """In the child: the given stdio, nothing else open, the asked-for environment and cwd."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target, inheritable=True)
    os.closerange(3, 65536)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    time.tzset()
    encoding, errors = sys.stdout.encoding, sys.stdout.errors
    # As the interpreter makes them at start: stdout line-buffered only on a terminal, stderr
    # always line-buffered with backslashreplace, none of them closing the descriptor.
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "rb", closefd=False)),
                                                 encoding=encoding, errors=errors)
    out = io.FileIO(1, "wb", closefd=False)
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(io.BufferedWriter(out), encoding=encoding, errors=errors,
                                                   line_buffering=out.isatty())
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(io.BufferedWriter(io.FileIO(2, "wb", closefd=False)),
                                                   encoding=encoding, errors="backslashreplace",
                                                   line_buffering=True)
    sys.argv = [request["argv0"], *request["argv"]]
    sys.path[0] = request["cwd"]  # as `python -m` has it (here it was this file's folder)


def _main() -> None:
    request = _zygote(sys.argv[1])
    # Only a child gets here: run the command as `python -m chatlog` does, and let the
    # interpreter's own exit happen (SystemExit, atexit, the final flush of stdout).
    del request
    from chatlog.cli import cli

    cli(prog_name="chatlog")


# -- the client ---------------------------------------------------------------------------------


class Zygote:
    """One per test worker, started on first use."""

    _lock = threading.Lock()
    _proc = None
    _path = None

    @classmethod
    def path(cls) -> str:
        with cls._lock:
            if cls._proc is None or cls._proc.poll() is not None:
                tmp = tempfile.mkdtemp(prefix="chatlog-zygote-")
                cls._path = os.path.join(tmp, "sock")
                env = dict(os.environ)
                env.pop("PYTHONUNBUFFERED", None)
                cls._proc = subprocess.Popen([sys.executable, __file__, cls._path], stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, env=env,
                                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
                assert cls._proc.stdout.readline() == b"ready\n", "the fork server did not start"
                atexit.register(cls._stop, cls._proc, tmp)
            return cls._path


    @staticmethod
    def _stop(proc, tmp: str) -> None:
        """Its stdin closed, it exits (having waited for every child that ended); its socket's
        directory goes with it."""
        proc.stdin.close()
        try:
            proc.wait(10)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


class ForkedProc:
    """The part of `subprocess.Popen` the tests use, for a child of the zygote:
    `ForkedProc(["serve", "0", ...], stdin=PIPE, ...)` runs `python -m chatlog serve 0 ...`."""

    def __init__(self, argv, stdin=None, stdout=None, stderr=None, env=None, cwd=None):
        self.args = [sys.executable, "-m", "chatlog", *map(str, argv)]
        self.returncode = None
        self.stdin = self.stdout = self.stderr = None
        theirs, ours = [], []
        for i, spec in enumerate((stdin, stdout, stderr)):
            if spec == subprocess.PIPE:
                r, w = os.pipe()
                child, mine = (r, w) if i == 0 else (w, r)
                theirs.append(child)
                ours.append((i, mine))
            elif spec == subprocess.DEVNULL or spec is None:
                fd = os.open(os.devnull, os.O_RDWR) if spec == subprocess.DEVNULL else os.dup(i)
                theirs.append(fd)
                ours.append((i, None))
            else:
                theirs.append(os.dup(spec if isinstance(spec, int) else spec.fileno()))
                ours.append((i, None))
        request = {"argv": self.args[3:], "argv0": _MAIN, "env": dict(os.environ if env is None else env),
                   "cwd": str(cwd or os.getcwd())}
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._conn.connect(Zygote.path())
            socket.send_fds(self._conn, [json.dumps(request).encode()], theirs)
        finally:
            for fd in theirs:
                os.close(fd)
        self._buf = b""
        self.pid = int(self._line(None))
        for i, mine in ours:
            if mine is not None:
                f = os.fdopen(mine, "wb" if i == 0 else "rb")
                setattr(self, ("stdin", "stdout", "stderr")[i], f)

    def _line(self, timeout):
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            self._conn.settimeout(left)
            chunk = self._conn.recv(64)
            if not chunk:
                raise RuntimeError("the fork server went away")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def poll(self):
        if self.returncode is None:
            try:
                self._status(0)
            except (TimeoutError, BlockingIOError):
                pass
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None:
            try:
                self._status(timeout)
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
        return self.returncode

    def _status(self, timeout):
        status = int(self._line(timeout))
        self.returncode = os.waitstatus_to_exitcode(status)
        self._conn.close()

    def send_signal(self, sig):
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def communicate(self, input=None, timeout=None):
        """As Popen's: feed stdin, read stdout and stderr to their ends (both at once, so a full
        pipe never stalls the child), then wait; on timeout the child is killed."""
        got = {}

        def drain(name):
            f = getattr(self, name)
            got[name] = f.read() if f else None

        readers = [threading.Thread(target=drain, args=(n,), daemon=True) for n in ("stdout", "stderr")]
        for t in readers:
            t.start()
        if self.stdin:
            try:
                if input:
                    self.stdin.write(input)
                self.stdin.close()
            except BrokenPipeError:
                pass
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.wait()
            raise
        for t in readers:
            t.join()
        return got["stdout"], got["stderr"]


_MAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "chatlog", "__main__.py")


def can_fork(env_changes: dict | None) -> bool:
    """Whether a child of the zygote starts as a fresh interpreter would: not when the test
    changes what the interpreter reads at start (encoding, locale, its own flags)."""
    if os.environ.get("CHATLOG_TEST_FRESH"):  # every start a fresh interpreter, as before
        return False
    return not any(k.startswith(("PYTHON", "LC_", "LANG")) for k in (env_changes or {}))


if __name__ == "__main__":
    _main()
