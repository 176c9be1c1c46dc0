"""What a new user meets first: the README's commands and examples, run as written."""

import io
import os
import re
import signal
import socket
import subprocess
import sys

import pexpect
from conftest import ROOT, recv_until

README = (ROOT / "README.md").read_text()


def _screen(output: str) -> list[str]:
    """The lines a terminal shows for `output`: a redraw (`\\r`, erase to the end of the line)
    replaces what the line showed before."""
    return [re.split(r"\r\x1b\[K|\r", line.rstrip("\r"))[-1] for line in output.split("\n")]


def _digits(lines):
    return [re.sub(r"\d+", "N", line) for line in lines]


def test_the_readme_room_example_is_what_a_room_shows(tmp_path):
    """The README showed `127.0.0.1 port 50122 entered the room` and a bare `\\who`; the room
    says `127.0.0.1:50122 entered ...` and the terminal shows `SERVER>\\who`."""
    block = README.split("$ chatlog serve --room 9999\n...\n", 1)[1].split("```", 1)[0].splitlines()
    env = dict(os.environ, TERM="xterm", NO_COLOR="1")
    p = pexpect.spawn(sys.executable, ["-m", "chatlog", "serve", "--room", "0", "--db", str(tmp_path / "r.db")],
                      env=env, cwd=str(ROOT), encoding="utf-8", timeout=10)
    p.logfile_read = io.StringIO()
    try:
        p.expect(r"port (\d+)\r\n")
        port = int(p.match.group(1))
        p.expect_exact("The room is open")
        alice = socket.create_connection(("127.0.0.1", port), timeout=10)
        recv_until(alice, b"Type at any time.\n")
        p.expect_exact("entered the room")
        alice.sendall(b"alice>hello everyone\n")
        p.expect_exact("alice>hello everyone")
        p.expect_exact("SERVER>")
        p.send("welcome\r")
        assert recv_until(alice, b"welcome\n").endswith(b"SERVER>welcome\n")
        p.send("\\who\r")
        p.expect(r"idle \d+s\r\n")
        p.expect_exact("SERVER>")
    finally:
        p.sendcontrol("c")
        p.expect(pexpect.EOF)
        p.close()
    assert p.exitstatus == 0
    shown = _screen(p.logfile_read.getvalue())
    first = next(i for i, line in enumerate(shown) if line.startswith("The room is open"))
    shown = shown[first:first + len(block) - 1]
    assert _digits(shown) == _digits(block[:-1]), "\n".join(shown)
    assert block[-1] == "SERVER>"  # the prompt, drawn again after \\who's lines (expected above)


def test_make_serve_takes_the_servers_options(tmp_path):
    proc = subprocess.Popen(
        ["make", "-s", "serve", "PORT=0", f"ARGS=--room --bind 127.0.0.1 --db {tmp_path / 'm.db'} --no-operator"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True, env=dict(os.environ, NO_COLOR="1"),
    )
    try:
        lines = []
        for raw in proc.stdout:
            lines.append(raw.decode())
            if "The room is open" in lines[-1]:
                break
        assert any("The room is open" in line for line in lines), lines
        assert any("port " in line for line in lines)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        rest = proc.stdout.read().decode()
        proc.wait(10)
    assert "Server stopped (SIGTERM)" in rest


def test_make_install_puts_chatlog_on_the_path(tmp_path):
    bindir = tmp_path / "bin"
    r = subprocess.run(["make", "-s", "install", f"BINDIR={bindir}"], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PATH="/usr/bin:/bin"))
    assert r.returncode == 0, r.stderr
    assert f"{bindir} is not on your PATH" in r.stdout
    link = bindir / "chatlog"
    assert os.path.realpath(link) == os.path.realpath(ROOT / ".venv" / "bin" / "chatlog")
    ran = subprocess.run(["chatlog", "path", "--db", str(tmp_path / "x.db")], capture_output=True, text=True,
                         env=dict(os.environ, PATH=f"{bindir}:/usr/bin:/bin"))
    assert ran.returncode == 0 and ran.stdout.strip() == str(tmp_path / "x.db")
    r = subprocess.run(["make", "-s", "install", f"BINDIR={bindir}"], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PATH=f"{bindir}:/usr/bin:/bin"))
    assert r.returncode == 0 and "not on your PATH" not in r.stdout  # again: the same link, said plainly
    subprocess.run(["make", "-s", "uninstall", f"BINDIR={bindir}"], cwd=ROOT, check=True, capture_output=True)
    assert not link.exists()


def test_make_test_says_why_it_skips_and_the_readme_lists_what_is_optional():
    r = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, check=True)
    pytest_line = [line for line in r.stdout.splitlines() if "-m pytest" in line][-1]
    assert " -rs" in pytest_line
    for tool in ("chromium", "valgrind"):
        assert f"`{tool}`" in README
    assert "make install" in README and ".venv/bin/chatlog" in README
