"""The read tools against hostile archives and hostile outputs (issue 14, the read side).

Real SQLite files, real processes where a terminal matters (a pseudo-terminal, not a mock).
"""

import os
import sys

import pytest
from conftest import ROOT, run_chatlog
from storebuild import open_store

HOSTILE = "\x1b]0;pwned\x07\x1b[2J"  # sets the window title, clears the screen


@pytest.fixture
def hostile_chat(db_path):
    s = open_store(db_path)
    sid = s.begin_session(("127.0.0.1", 5000), ("127.0.0.1", 9999), served=True)
    s.set_handle(sid, f"ev{HOSTILE}")
    s.add_message(sid, "client", f"ev{HOSTILE}", f"title{HOSTILE}end")
    s.add_message(sid, "server", "SERVER", "ok")
    s.end_session(sid, "client-quit")
    s.close()
    return db_path


# -- 6. a terminal named with -o gets the terminal rule ------------------------------------------------


def _at_a_terminal(db_path, *args) -> bytes:
    """`chatlog ARGS` with a pseudo-terminal as its standard output (and controlling terminal)."""
    import pexpect

    p = pexpect.spawn(sys.executable, ["-m", "chatlog", *args, "--db", str(db_path)], cwd=ROOT, timeout=20,
                      env=dict(os.environ, TERM="xterm", NO_COLOR="1"))
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0, p.before
    return p.before


@pytest.mark.parametrize("fmt", ["csv", "txt", "md", "html", "json", "jsonl", "cast"])
@pytest.mark.parametrize("output", ["-", "/dev/stdout", "/dev/tty"])
def test_a_terminal_named_with_o_is_never_sent_escape_sequences(hostile_chat, fmt, output):
    out = _at_a_terminal(hostile_chat, "export", "-f", fmt, "-o", output)
    assert b"pwned" in out  # the text is there, made visible
    assert b"\x1b" not in out and b"\x07" not in out, out


def test_a_file_or_a_pipe_named_with_o_gets_the_exact_text(hostile_chat, tmp_path):
    dest = tmp_path / "out.csv"
    r = run_chatlog(hostile_chat, "export", "-f", "csv", "-o", str(dest), process=True)
    assert r.exit_code == 0, r.stderr
    assert f"title{HOSTILE}end" in dest.read_text(encoding="utf-8")
    r = run_chatlog(hostile_chat, "export", "-f", "csv", "-o", "/dev/stdout", process=True)
    assert r.exit_code == 0 and f"title{HOSTILE}end" in r.stdout
