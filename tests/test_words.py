"""The vocabulary (chatlog/words.py): one place for how reasons, counts, durations and addresses
are worded, and the read model taking its words there rather than from the room's policy."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from chatlog import words

ROOT = Path(__file__).resolve().parent.parent


def test_the_read_model_does_not_load_the_room_policy():
    code = (
        "import sys\n"
        "from chatlog.records import Msg\n"
        "from chatlog.transcript import event_of\n"
        "m = Msg(1, 1, 1, '2026-01-01T00:00:00', 'event', 'bob', 'left', None, 'slow')\n"
        "print(event_of(m, '2026-01-01T00:00:00').text)\n"
        "print('chatlog.room' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.splitlines() == ["bob left (dropped, it stopped reading)", "False"]


WORDS = {"NOTICES", "ENDINGS", "LEFT", "timeout_notice", "ended_text", "connected_text", "plural",
         "duration", "idle_text", "address", "plain_host", "address_key"}


def test_the_words_are_defined_once():
    """Only words.py defines them; other modules import (or, for old importers, re-export) them."""
    for path in sorted((ROOT / "chatlog").glob("*.py")):
        if path.name == "words.py":
            continue
        tree = ast.parse(path.read_text())
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.value, ast.Dict)
                    for t in n.targets if isinstance(t, ast.Name)}  # a table of words
        if path.name == "views.py":  # its own address() (None-tolerant) is left to the read side's work
            defined.discard("address")
        assert not defined & WORDS, f"{path.name} defines {sorted(defined & WORDS)}"


@pytest.mark.parametrize("seconds,long,compact", [
    (0.5, "0.5s", "0s"), (41, "41s", "41s"), (62, "1m 02s", "1m02s"), (7500, "2h 05m", "2h05m"),
])
def test_durations(seconds, long, compact):
    assert words.duration(seconds) == long and words.idle_text(seconds) == compact


def test_addresses_and_counts():
    assert words.address("::ffff:10.0.0.1", 5) == "10.0.0.1:5"
    assert words.address("::1", 6000) == "[::1]:6000"
    assert words.plural(1, "message") == "1 message" and words.plural(2, "message") == "2 messages"
    assert words.ended_text("client-quit", 1, 2, 2) == "client has quit (session 1, 2 messages each way)"
    assert words.ended_text("timeout", 3, 1, 0, 30.0) == (
        "client timed out after 30s on its turn (session 3, 1 from the client, 0 from the server)")
