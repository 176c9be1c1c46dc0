"""A server with nobody at the console: `--no-operator`, stdin /dev/null (systemd, nohup), or
started in the background of a shell. Real processes, a real pseudo-terminal, real sockets."""

import os
import pty
import signal
import subprocess
import sys

import pexpect
import pytest
from conftest import ROOT, db_rows, recv_until, wait_until

from chatlog.operator import unattended
from chatlog.turns import NOBODY_NOTICE

NOBODY = f"SERVER>*** {NOBODY_NOTICE}\n".encode()


# -- the decision ---------------------------------------------------------------------------------


def test_devnull_and_a_background_terminal_mean_nobody_is_at_the_console(tmp_path):
    with open(os.devnull, "rb") as f:
        assert unattended(f) == "its input is /dev/null"
    r, w = os.pipe()
    try:
        with os.fdopen(r, "rb", closefd=False) as f:
            assert unattended(f) is None  # a script: its end stops the server
    finally:
        os.close(r)
        os.close(w)
    script = tmp_path / "answers.txt"
    script.write_text("hi\n")
    with open(script, "rb") as f:
        assert unattended(f) is None
    assert unattended(None) is None  # stdin closed: input that has ended
    other = tmp_path / "null-lookalike"
    other.write_bytes(b"")
    with open(other, "rb") as f:
        assert unattended(f) is None
    # A terminal that is not our controlling terminal is read like any other.
    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "rb", closefd=False) as f:
            assert unattended(f) is None
    finally:
        os.close(master)
        os.close(slave)


# -- stdin is /dev/null ---------------------------------------------------------------------------


def test_a_1to1_server_on_devnull_records_answers_nothing_and_runs_until_sigterm(start_server, db_path):
    """It stopped at once (the end of its input): under systemd it could not run at all."""
    server = start_server(stdin="devnull", db=db_path)
    server.wait_for("nobody is at the console")
    amy = server.connect()
    amy.sendall(b"amy>anyone there?\n\0")
    assert recv_until(amy, b"\n") == NOBODY  # the answer to its first line: its turns stay in step
    bob = server.connect()
    bob.sendall(b"bob>me too\n\0")
    assert recv_until(bob, b"\n") == NOBODY  # waiting, and told the same
    amy.sendall(b"amy>leaving a message\n\0")
    server.wait_for("amy>leaving a message")
    amy.settimeout(0.3)
    with pytest.raises(TimeoutError):
        amy.recv(100)  # nothing more is answered
    amy.sendall(b"amy>\\quit\n\0")
    server.wait_for("bob>me too")  # bob is served: what it said while waiting is shown
    assert server.proc.poll() is None
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    assert server.lines[-2:] == ["Server stopped (SIGTERM)", None]
    texts = [t for (t,) in db_rows(db_path, "SELECT text FROM messages ORDER BY id")]
    assert texts == ["anyone there?", "me too", "leaving a message"]


def test_a_room_on_devnull_runs_until_sigterm(start_server):
    room = start_server("--room", stdin="devnull")
    room.wait_for("Nobody is at the console: the room runs until SIGTERM")
    amy = room.connect()
    recv_until(amy, b"Type at any time.\n")
    amy.sendall(b"amy>hello\n\0")
    room.wait_for("amy>hello")
    room.signal(signal.SIGTERM)
    assert room.wait() == 0
    assert recv_until(amy, b"\\quit\n").endswith(b"The server shut down.\n\\quit\n")


# -- --no-operator --------------------------------------------------------------------------------


@pytest.mark.parametrize("room", [False, True])
def test_no_operator_never_reads_stdin_and_its_end_stops_nothing(start_server, room):
    server = start_server("--no-operator", *(["--room"] if room else []))
    server.say("this is never read")
    server.end_input()
    c = server.connect()
    if room:
        recv_until(c, b"Type at any time.\n")
        c.sendall(b"amy>hi\n\0")
        server.wait_for("amy>hi")
    else:
        c.sendall(b"amy>hi\n\0")
        assert recv_until(c, b"\n") == NOBODY
    assert server.proc.poll() is None
    assert "this is never read" not in server.output
    server.signal(signal.SIGTERM)
    assert server.wait() == 0


def test_serve_help_explains_no_operator_and_how_to_stop(db_path):
    from conftest import run_chatlog

    out = run_chatlog(None, "serve", "--help").stdout
    assert "--no-operator" in out and "/dev/null" in out and "background" in out
    assert "Ctrl-C" in out and "stops the server" in " ".join(out.split())


# -- started in the background of a shell -----------------------------------------------------------

# What an interactive shell does for `chatlog serve ... &`: the job gets a process group of its
# own, in the terminal's session, and the terminal's foreground group stays the shell's.
SHELL = r"""
import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:], preexec_fn=lambda: os.setpgid(0, 0))
print("job", child.pid, "foreground", os.tcgetpgrp(0) == os.getpgrp(), flush=True)
sys.exit(child.wait())
"""


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.parametrize("room", [True, False])
def test_started_in_the_background_it_is_never_stopped_by_the_terminal(tmp_path, room):
    """A room started with `&` read the terminal (its operator prompt) and was stopped by
    SIGTTIN at once; a 1:1 server restored the terminal's modes at exit and was stopped by
    SIGTTOU. Nothing is read, the terminal is not touched, and SIGTERM stops it."""
    db = tmp_path / "bg.db"
    env = dict(os.environ, TERM="xterm", NO_COLOR="1")
    cmd = [sys.executable, "-m", "chatlog", "serve", "0", "--db", str(db), "--bind", "127.0.0.1"]
    p = pexpect.spawn(sys.executable, ["-c", SHELL, *cmd, *(["--room"] if room else [])],
                      env=env, cwd=str(ROOT), encoding="utf-8", timeout=10)
    job = None
    try:
        p.expect(r"job (\d+) foreground True")
        job = int(p.match.group(1))
        p.expect(r"port (\d+)\r\n")
        port = int(p.match.group(1))
        p.expect("Awaiting client connections|The room is open")
        import socket

        c = socket.create_connection(("127.0.0.1", port), timeout=10)
        if room:
            recv_until(c, b"Type at any time.\n")
        c.sendall(b"amy>hello from outside\n\0")
        p.expect_exact("amy>hello from outside")
        assert _state(job) != "T"
        assert "nobody is at the console" in p.before.lower()
        os.kill(job, signal.SIGTERM)
        p.expect_exact("Server stopped (SIGTERM)")
        p.expect(pexpect.EOF)
        p.close()
        assert p.exitstatus == 0
        job = None
    finally:
        if job is not None:
            try:
                os.kill(job, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.terminate(force=True)


def test_a_background_job_under_a_shell_with_devnull_stdin_runs_too(tmp_path):
    """`sh -c 'chatlog serve ... &'` with no job control gives the job /dev/null as stdin."""
    db = tmp_path / "sh.db"
    out = tmp_path / "console.txt"
    cmd = (f"{sys.executable} -m chatlog serve 0 --room --db {db} --bind 127.0.0.1 > {out} 2>&1 & echo $!")
    pid = int(subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, cwd=ROOT, check=True).stdout)
    try:
        wait_until(lambda: "The room is open" in out.read_text())
        assert "Nobody is at the console" in out.read_text()
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: "Server stopped (SIGTERM)" in out.read_text())


def test_a_hangup_ignored_by_nohup_stays_ignored(start_server):
    """`nohup chatlog serve ... &`: the server put its own SIGHUP handler over nohup's ignore,
    so closing the terminal stopped it."""
    server = start_server("--room", preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    server.signal(signal.SIGHUP)
    c = server.connect()
    recv_until(c, b"Type at any time.\n")  # still serving after the hangup
    assert server.proc.poll() is None
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    assert server.lines[-2:] == ["Server stopped (SIGTERM)", None]
