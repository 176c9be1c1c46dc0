"""The room policy (chatlog/room.py) without sockets: events in, decisions out."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatlog.events import (
    Bind,
    Broadcast,
    Commit,
    CommitLines,
    Connected,
    Disconnected,
    End,
    Finish,
    Handle,
    History,
    Join,
    OperatorEnd,
    OperatorLine,
    Pause,
    Prompt,
    Received,
    ReceivedLines,
    Refuse,
    Send,
    Show,
    ShowLines,
    Stalled,
    Stop,
    Tick,
)
from chatlog.protocol import Framer, Message, parse
import chatlog.room as room_module
from chatlog.room import FULL_NOTICE, Room, fold
from chatlog.handles import keys
from chatlog.sanitize import is_safe, visible
from chatlog.words import NOTICES

HOST = "127.0.0.1"
STORE = (Commit, Join, Handle)


def line(conn, text, handle=None, at=10.0, raw=None, cut=0):
    return Received(conn, Message(handle, text, raw, text.strip() == "\\quit", cut), at)


def opened(**kw):
    """A room as the loop starts it: its first deadline is now, and the Tick turns the prompt on."""
    r = Room(**kw)
    assert r.deadline() == 0.0
    assert r.handle_event(Tick(0.5)) == [Prompt(True)]
    assert r.deadline() is None
    return r


def room(n=0, handles=(), **kw):
    """A room with `n` clients (conn 1..n) connected at t=1; the first len(handles) have spoken."""
    r = opened(**kw)
    for c in range(1, n + 1):
        r.handle_event(Connected(c, HOST, 5000 + c, 1.0))
    for c, h in enumerate(handles, 1):
        r.handle_event(line(c, "hi", h, at=2.0))
    return r


def of(kind, decisions):
    return [d for d in decisions if isinstance(d, kind)]


# -- the exact bytes ------------------------------------------------------------------------


def test_greeting_is_sent_at_once_after_the_join_is_recorded():
    r = opened()
    out = r.handle_event(Connected(1, HOST, 5001, 1.0))
    assert out[0] == Join(1, HOST, 5001, 1.0)
    assert out[1] == Send(1, b"SERVER>*** Welcome to the room: 1 here. Type at any time.\n")
    assert out[2:] == [History(1, 20, 1.0), Show("event", "127.0.0.1:5001 entered the room (1 here)")]
    out = r.handle_event(Connected(2, HOST, 5002, 1.5))
    assert of(Send, out) == [Send(2, b"SERVER>*** Welcome to the room: 2 here. Type at any time.\n")]
    assert not of(Broadcast, out)  # a lurker is not announced


def test_first_line_announces_the_join_then_relays_the_line():
    r = room(3)
    out = r.handle_event(line(1, "hello all", "alice", at=2.0))
    assert out[:3] == [
        Handle(1, "alice"),
        Commit(1, "event", "alice", "joined", None, None, 2.0),
        Commit(1, "client", "alice", "hello all", None, None, 2.0),
    ]
    assert of(Broadcast, out) == [
        Broadcast(b"SERVER>*** alice joined\n", exclude=1),
        Broadcast(b"alice>hello all\n", exclude=1),
    ]
    assert Show("client", "hello all", "alice") in out


def test_a_relayed_line_and_a_line_without_prefix_keep_the_handle():
    r = room(2, ["alice"])
    assert r.handle_event(line(1, "again", "alice", at=3.0)) == [
        Commit(1, "client", "alice", "again", None, None, 3.0),
        Show("client", "again", "alice"),
        Broadcast(b"alice>again\n", exclude=1),
    ]
    out = r.handle_event(line(1, "no prefix", None, at=3.5))
    assert of(Commit, out) == [Commit(1, "client", "alice", "no prefix", None, None, 3.5)]
    assert of(Broadcast, out) == [Broadcast(b"alice>no prefix\n", exclude=1)]
    assert not of(Handle, out)


def test_leave_notice_and_event():
    r = room(2, ["alice"])
    out = r.handle_event(Disconnected(1, 5.0))
    assert out == [
        Commit(1, "event", "alice", "left", None, "disconnect", 5.0),
        End(1, "disconnect", 5.0, None),
        Broadcast(b"SERVER>*** alice left\n", exclude=1),
        Show("event", "alice (127.0.0.1:5001) left: disconnected (1 here)"),
    ]
    assert r.handle_event(Disconnected(1, 6.0)) == []  # an End happens once


def test_a_lurker_leaves_quietly():
    r = room(2)
    assert r.handle_event(Disconnected(1, 5.0)) == [
        End(1, "disconnect", 5.0, None),
        Show("event", "127.0.0.1:5001 left: disconnected (1 here)"),
    ]


def test_the_server_handle_can_be_changed():
    r = room(2, ["alice"], handle="host")
    out = r.handle_event(OperatorLine("hi", 3.0))
    assert of(Broadcast, out) == [Broadcast(b"host>hi\n")]
    out = r.handle_event(Disconnected(1, 4.0))
    assert of(Broadcast, out) == [Broadcast(b"host>*** alice left\n", exclude=1)]
    out = r.handle_event(Connected(9, HOST, 6000, 5.0))
    assert of(Send, out)[0].data == b"host>*** Welcome to the room: 2 here. Type at any time.\n"


def test_an_invalid_server_handle_is_refused():
    for bad in ("", "two words", "a>b", "elevenchars"):
        with pytest.raises(ValueError):
            Room(handle=bad)


# -- quitting, leaving, being dropped ----------------------------------------------------------


def test_client_quit_is_not_committed_as_a_message():
    r = room(2, ["alice"])
    out = r.handle_event(line(1, "\\quit", "alice", at=4.0))
    assert out == [
        Commit(1, "event", "alice", "left", None, "client-quit", 4.0),
        End(1, "client-quit", 4.0, None),
        Broadcast(b"SERVER>*** alice left\n", exclude=1),
        Show("event", "alice (127.0.0.1:5001) left: quit (1 here)"),
    ]
    assert r.handle_event(line(1, "after quit", "alice", at=4.1)) == []


def test_a_slow_client_is_dropped_at_once_and_the_others_told():
    r = room(3, ["alice", "bob"])
    out = r.handle_event(Stalled(2, 7.0))
    assert out == [
        Commit(2, "event", "bob", "left", None, "slow", 7.0),
        End(2, "slow", 7.0, NOTICES["slow"]),
        Broadcast(b"SERVER>*** bob left\n", exclude=2),
        Show("event", "bob (127.0.0.1:5002) left: dropped, it stopped reading (2 here)"),
    ]
    # Nothing else is waiting on it: the next line goes out as usual.
    assert of(Broadcast, r.handle_event(line(1, "still here", "alice", at=7.1))) == [
        Broadcast(b"alice>still here\n", exclude=1)
    ]


def test_an_overlong_line_is_committed_whole_relayed_cut_then_its_sender_ended():
    r = room(2, ["alice"])
    out = r.handle_event(line(1, "x" * 8192, "alice", at=4.0, raw=b"alice>" + b"x" * 8186, cut=100))
    commits = of(Commit, out)
    assert commits[0].text == "x" * 8192 and "100 more bytes dropped" in commits[0].note
    assert commits[1] == Commit(1, "event", "alice", "left", None, "overlong", 4.0)
    assert of(End, out) == [End(1, "overlong", 4.0, NOTICES["overlong"])]
    assert of(Broadcast, out) == [
        Broadcast(b"alice>" + b"x" * 500 + b" [7692 more characters not relayed]\n", exclude=1),
        Broadcast(b"SERVER>*** alice left\n", exclude=1),
    ]
    assert not of(Send, out)  # its End carries the notice


def test_a_line_over_500_characters_is_kept_whole_and_relayed_cut():
    r = room(2, ["alice"])
    out = r.handle_event(line(1, "y" * 501, "alice", at=4.0))
    assert of(Commit, out) == [Commit(1, "client", "alice", "y" * 501, None, "longer than 500 characters", 4.0)]
    assert of(Broadcast, out) == [Broadcast(b"alice>" + b"y" * 500 + b" [1 more characters not relayed]\n", 1)]
    assert of(Send, out) == [Send(1, b"SERVER>*** Lines are at most 500 characters: the others saw the first 500 of yours.\n")]
    # Escapes cannot blow a relayed line up past ten times the limit: one line to every
    # listener stays small.
    out = r.handle_event(line(1, "\U000e0001" * 2000, "alice", at=5.0))
    assert len(of(Broadcast, out)[0].data) < 5100
    assert r.handle_event(line(1, "z" * 500, "alice", at=6.0))[0].note is None


# -- the server's handle, unknown handles, renames -----------------------------------------


@pytest.mark.parametrize("claimed", ["SERVER", "server", "Server", "ＳＥＲＶＥＲ", "ſerver"])
def test_no_client_takes_the_server_handle(claimed):
    r = room(2)
    out = r.handle_event(line(1, "I am the server", claimed, at=3.0))
    assert of(Commit, out) == [
        Commit(1, "client", claimed, "I am the server", None,
               "the handle SERVER is the server's: not relayed", 3.0)
    ]
    assert not of(Broadcast, out) and not of(Handle, out)
    # The operator does not see it as a chat line under the server's own name.
    assert [s.kind for s in of(Show, out)] == ["error"]
    assert of(Show, out)[0].text == f"127.0.0.1:5001: the handle SERVER is the server's (not relayed): {claimed}>I am the server"
    assert of(Send, out) == [
        Send(1, b"SERVER>*** The handle SERVER is the server's; choose another, like: "
                b"alice>hello (not relayed)\n")
    ]
    # A line without prefix afterwards is not the server's either.
    out = r.handle_event(line(1, "still me", None, at=3.5))
    assert not of(Broadcast, out) and of(Commit, out)[0].handle is None
    # A proper handle afterwards joins as usual.
    out = r.handle_event(line(1, "ok then", "mallory", at=4.0))
    assert of(Handle, out) == [Handle(1, "mallory")]
    assert of(Broadcast, out)[-1] == Broadcast(b"mallory>ok then\n", exclude=1)


def test_the_server_handle_check_follows_a_custom_handle():
    r = room(2, handle="Op")
    assert not of(Broadcast, r.handle_event(line(1, "x", "OP", at=3.0)))
    assert of(Broadcast, r.handle_event(line(2, "x", "SERVER", at=3.0)))  # only the configured one is reserved


def test_a_line_with_no_handle_yet_is_kept_and_its_sender_told():
    r = room(2)
    out = r.handle_event(line(1, "hello from nc", None, at=3.0))
    assert of(Commit, out) == [
        Commit(1, "client", None, "hello from nc", None, "no handle yet: not relayed", 3.0)
    ]
    assert not of(Broadcast, out)
    assert of(Send, out) == [
        Send(1, b"SERVER>*** Start your first line with a handle, like: alice>hello (not relayed)\n")
    ]


def test_a_new_handle_relays_under_it_without_a_second_join():
    r = room(2, ["alice"])
    out = r.handle_event(line(1, "now bob", "bob", at=3.0))
    assert not of(Handle, out)
    assert of(Commit, out) == [
        Commit(1, "event", "bob", "renamed", None, "alice is now bob", 3.0),
        Commit(1, "client", "bob", "now bob", None, None, 3.0),
    ]
    assert of(Broadcast, out) == [
        Broadcast(b"SERVER>*** alice is now bob\n", exclude=1), Broadcast(b"bob>now bob\n", exclude=1),
    ]
    assert any(s.kind == "event" and "now calls itself bob" in s.text for s in of(Show, out))
    out = r.handle_event(Disconnected(1, 4.0))
    assert of(Broadcast, out) == [Broadcast(b"SERVER>*** bob left\n", exclude=1)]


# -- hostile text --------------------------------------------------------------------------


def test_control_characters_and_escapes_never_pass_through():
    r = room(2)
    # A handle that would not show as itself is refused; the notice shows it escaped.
    out = r.handle_event(line(1, "hi", "\x1b[31mM", at=2.5))
    assert not of(Broadcast, out) and not of(Handle, out)
    assert of(Send, out) == [Send(1, b"SERVER>*** The handle \\x1b[31mM has an invisible or control character "
                                     b"(\\x1b); choose another, like: alice>hello (not relayed)\n")]
    out = r.handle_event(line(1, "\x1b]0;pwned\x07 \x9b31m \u202eevil\r\nfake>x", "M", at=3.0))
    assert of(Broadcast, out) == [
        Broadcast(b"SERVER>*** M joined\n", exclude=1),
        Broadcast(b"M>\\x1b]0;pwned\\x07 \\x9b31m \\u202eevil\\r\\nfake>x\n", exclude=1),
    ]
    # The record keeps the exact text.
    assert of(Commit, out)[-1].text.startswith("\x1b]0;pwned\x07")
    out = r.handle_event(OperatorLine("\x1b[2Jhi\x00", 4.0))
    assert of(Broadcast, out) == [Broadcast(b"SERVER>\\x1b[2Jhi\\x00\n")]
    assert of(Commit, out)[0].text == "\x1b[2Jhi\x00"


# -- the operator --------------------------------------------------------------------------


def test_operator_lines_go_to_everyone_after_being_committed():
    r = room(3, ["alice"])
    assert r.handle_event(OperatorLine("hello room", 5.0)) == [
        Commit(None, "server", "SERVER", "hello room", None, None, 5.0),
        Show("operator", "hello room", "SERVER"),
        Broadcast(b"SERVER>hello room\n"),
    ]


def test_operator_blank_long_and_mistyped_lines_are_not_sent():
    r = room(2)
    assert r.handle_event(OperatorLine("   ", 5.0)) == []
    out = r.handle_event(OperatorLine("z" * 501, 5.0))
    assert [d.kind for d in out] == ["error"] and "too long" in out[0].text
    out = r.handle_event(OperatorLine("\\kik bob", 5.0))
    assert [d.kind for d in out] == ["error"] and "unknown command \\kik" in out[0].text
    # A backslash that is not a command word is just text.
    assert of(Broadcast, r.handle_event(OperatorLine("\\o/ yay", 5.0))) == [Broadcast(b"SERVER>\\o/ yay\n")]


def test_who_lists_handle_address_and_idle_time():
    r = room(3, ["alice"])
    r.handle_event(Connected(7, "::1", 6000, 3.0))
    out = r.handle_event(OperatorLine("\\who", 125.0))
    assert all(isinstance(d, Show) and d.kind == "note" for d in out)
    text = [d.text for d in out]
    assert text[0] == "4 here:"
    assert re.fullmatch(r"  alice +127\.0\.0\.1:5001 +idle 2m03s", text[1])
    assert re.fullmatch(r"  \(no handle yet\) +127\.0\.0\.1:5002 +idle 2m04s", text[2])
    assert re.fullmatch(r"  \(no handle yet\) +\[::1\]:6000 +idle 2m02s", text[4])
    assert room().handle_event(OperatorLine("\\who", 1.0)) == [Show("note", "Nobody is here.")]


def test_kick_by_handle_ends_that_client_and_tells_the_others():
    r = room(3, ["alice", "bob"])
    out = r.handle_event(OperatorLine("\\kick bob", 6.0))
    assert out == [
        Commit(2, "event", "bob", "left", None, "kicked", 6.0),
        End(2, "kicked", 6.0, NOTICES["kicked"]),
        Broadcast(b"SERVER>*** bob left\n", exclude=2),
        Show("event", "bob (127.0.0.1:5002) left: removed by the operator (2 here)"),
    ]
    assert NOTICES["kicked"] == "The operator removed you from the room."
    assert r.handle_event(line(2, "let me back", "bob", at=6.1)) == []


def test_kick_case_insensitively_by_address_and_never_a_second_bob():
    r = room(4, ["alice", "bob", "bob"])  # the second bob was refused: only one is called bob
    assert of(End, r.handle_event(OperatorLine("\\kick ALICE", 6.0))) == [End(1, "kicked", 6.0, NOTICES["kicked"])]
    assert of(End, r.handle_event(OperatorLine("\\kick bob", 6.0))) == [End(2, "kicked", 6.0, NOTICES["kicked"])]
    assert of(End, r.handle_event(OperatorLine("\\kick 127.0.0.1:5003", 6.0))) == [End(3, "kicked", 6.0, NOTICES["kicked"])]
    out = r.handle_event(OperatorLine("\\kick 127.0.0.1:5004", 6.0))  # a lurker: nobody to tell
    assert out[:1] == [End(4, "kicked", 6.0, NOTICES["kicked"])] and not of(Broadcast, out)
    assert r.handle_event(OperatorLine("\\kick nobody", 6.0))[0].kind == "error"
    assert "usage" in r.handle_event(OperatorLine("\\kick", 6.0))[0].text


@pytest.mark.parametrize(
    "event, reason",
    [(OperatorLine("\\quit", 9.0), "server-quit"), (OperatorLine("  \\quit ", 9.0), "server-quit"),
     (OperatorEnd(9.0), "server-quit"), (Stop("SIGTERM", 9.0), "shutdown")],
)
def test_closing_the_room_ends_everyone_then_finishes(event, reason):
    r = room(3, ["alice", "bob"])
    out = r.handle_event(event)
    assert of(Commit, out) == [
        Commit(1, "event", "alice", "left", None, reason, 9.0),
        Commit(2, "event", "bob", "left", None, reason, 9.0),
    ]
    assert of(End, out) == [End(c, reason, 9.0, NOTICES[reason]) for c in (1, 2, 3)]
    assert not of(Broadcast, out)  # each is told its own ending, not everyone else's
    assert isinstance(out[-1], Finish)
    # Afterwards: late connections are turned away, everything else is ignored.
    assert r.handle_event(Connected(9, HOST, 7000, 10.0)) == [
        Refuse(9, HOST, 7000, "shutdown", 10.0, NOTICES["shutdown"])
    ]
    assert r.handle_event(line(1, "late", "alice", at=10.0)) == []
    assert r.handle_event(OperatorLine("hello?", 10.0)) == []
    assert r.handle_event(Stop("SIGINT", 10.0)) == []


def test_the_operator_may_speak_from_the_first_event_on():
    r = Room()
    out = r.handle_event(Connected(1, HOST, 5001, 1.0))  # whatever comes first turns it on
    assert out[0] == Prompt(True) and of(Join, out)
    assert r.deadline() is None
    assert not of(Prompt, r.handle_event(Connected(2, HOST, 5002, 1.0)))
    r = Room()
    out = r.handle_event(OperatorEnd(1.0))
    assert out[0] == Prompt(True) and out[-2:] == [Show("event", "Operator input ended; room closed"),
                                                   Finish("Operator input ended; room closed")]
    assert r.deadline() is None


def test_a_room_needs_no_timer():
    r = room(2, ["alice"])
    assert r.deadline() is None
    assert r.handle_event(Tick(1e9)) == []


# -- scale: caps ---------------------------------------------------------------------------


def test_max_clients_refuses_clearly_and_admits_again_after_a_leave():
    r = room(3, max_clients=3)
    out = r.handle_event(Connected(4, HOST, 6000, 2.0))
    assert out == [Refuse(4, HOST, 6000, "busy", 2.0, FULL_NOTICE, "the room is full (3 here)")]  # the loop shows it, coalesced
    assert FULL_NOTICE == "The room is full; try again later."
    assert r.handle_event(line(4, "hi", "x", at=2.0)) == []
    r.handle_event(Disconnected(2, 3.0))
    assert of(Join, r.handle_event(Connected(5, HOST, 6001, 3.0)))


def test_per_address_cap_counts_v4_mapped_addresses_as_one():
    r = opened(per_address=2)
    assert of(Join, r.handle_event(Connected(1, "10.0.0.1", 1, 1.0)))
    assert of(Join, r.handle_event(Connected(2, "::ffff:10.0.0.1", 2, 1.0)))
    out = r.handle_event(Connected(3, "10.0.0.1", 3, 1.0))
    assert out == [Refuse(3, "10.0.0.1", 3, "per-address", 1.0, NOTICES["per-address"], "2 connections from that address")]
    assert of(Join, r.handle_event(Connected(4, "10.0.0.2", 4, 1.0)))
    r.handle_event(line(2, "\\quit", "a", at=2.0))
    assert of(Join, r.handle_event(Connected(5, "10.0.0.1", 5, 2.0)))


def test_per_address_zero_is_no_cap():
    r = opened(per_address=0)
    for c in range(1, 1001):
        assert of(Join, r.handle_event(Connected(c, HOST, c, 1.0)))


def test_default_limits():
    r = Room()
    assert (r.max_clients, r.rate, r.burst) == (10_000, 20.0, 100)
    assert r.per_address > 101  # a benchmark of 100 listeners on loopback fits


# -- rate limits ---------------------------------------------------------------------------


def test_a_burst_passes_then_reads_pause_and_nothing_is_dropped():
    r = room(2, ["alice"], rate=20, burst=100)  # "hi" at t=2 took one token
    out = []
    for i in range(120):
        out += r.handle_event(line(1, f"m{i}", "alice", at=2.0))
    assert len(of(Commit, out)) == 120 and len(of(Broadcast, out)) == 120
    pauses = of(Pause, out)
    assert pauses[0] == Pause(1, pytest.approx(2.0 + 1 / 20))  # the bucket's 100th line
    assert len(pauses) == 22  # and every line after it, each pause a little longer
    assert pauses[-1].until == pytest.approx(2.0 + 22 / 20)
    notes = [s for s in of(Show, out) if s.kind == "note"]
    assert len(notes) == 1 and "paused" in notes[0].text


def test_the_bucket_refills_at_the_rate():
    r = room(2, ["alice"], rate=10, burst=5)  # "hi" took one token of five
    for _ in range(3):
        assert not of(Pause, r.handle_event(line(1, "x", "alice", at=2.0)))
    assert of(Pause, r.handle_event(line(1, "x", "alice", at=2.0))) == [Pause(1, pytest.approx(2.1))]
    # One second later ten tokens came back, capped at the burst of five.
    for _ in range(4):
        assert not of(Pause, r.handle_event(line(1, "x", "alice", at=3.0)))
    assert of(Pause, r.handle_event(line(1, "x", "alice", at=3.0)))
    # A clock that steps back neither refills nor breaks the bucket.
    assert of(Pause, r.handle_event(line(1, "x", "alice", at=1.0)))


def test_rate_zero_never_pauses():
    r = room(2, ["alice"], rate=0)
    out = []
    for _ in range(5000):
        out += r.handle_event(line(1, "x", "alice", at=2.0))
    assert not of(Pause, out) and len(of(Broadcast, out)) == 5000


def test_events_for_unknown_connections_are_ignored():
    r = room(1)
    assert r.handle_event(line(42, "hi", "ghost")) == []
    assert r.handle_event(Disconnected(42, 1.0)) == []
    assert r.handle_event(Stalled(42, 1.0)) == []
    assert r.handle_event(Connected(1, HOST, 1, 1.0)) == []  # a conn already here is not joined twice


# -- properties over random event sequences -------------------------------------------------

handles = st.sampled_from(
    [None, "alice", "bob", "SERVER", "server", "ＳＥＲＶＥＲ", "\x1b[2J", "b\u202eo", "x\x9b", "Op",
     "Alice", "\u0430lice", "bob\u034f", "S\u0415RV\u0415R", "SER\u3164VER", "carol"]
)
texts = st.one_of(
    st.text(max_size=30),
    st.text(min_size=495, max_size=520),
    st.sampled_from(["\\quit", " \\quit ", "\x1b]0;t\x07", "*** fake notice", "\u2028", "a\rb",
                     "\\who", "/who", "\\help", "/shrug x", "/usr/bin", "\\o/"]),
)
op_texts = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["\\who", "\\quit", "\\kick alice", "\\kick bob", "\\kick 127.0.0.1:5002",
                     "\\kick SERVER", "\\nope", "\x1b[31mred", "\\history", "\\history 3", "\\history x"]),
)


@st.composite
def scripts(draw):
    steps = []
    for _ in range(draw(st.integers(0, 60))):
        kind = draw(st.sampled_from(
            ["connect", "line", "line", "line", "line", "disconnect", "stall", "op", "tick", "end", "stop"]
        ))
        conn = draw(st.integers(1, 6))
        dt = draw(st.sampled_from([0.0, 0.0, 0.001, 0.05, 1.0, 30.0]))
        if kind == "line":
            steps.append((kind, conn, dt, draw(handles), draw(texts), draw(st.sampled_from([0, 0, 0, 7]))))
        elif kind == "op":
            steps.append((kind, conn, dt, draw(op_texts)))
        else:
            steps.append((kind, conn, dt))
    return steps


def to_event(step, at, connected):
    kind, conn = step[0], step[1]
    if kind == "connect":
        return Connected(conn, HOST if conn % 2 else "::ffff:127.0.0.1", 5000 + conn, at)
    if kind == "line":
        _, _, _, handle, text, cut = step
        return Received(conn, Message(handle, text, None, text.strip() == "\\quit", cut), at)
    if kind == "disconnect":
        return Disconnected(conn, at)
    if kind == "stall":
        return Stalled(conn, at)
    if kind == "op":
        return OperatorLine(step[3], at)
    if kind == "tick":
        return Tick(at)
    if kind == "end":
        return OperatorEnd(at)
    return Stop("SIGTERM", at)


UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\xad\u0600-\u0605\u061c\u06dd\u070f\u180e\u200b-\u200f\u2028-\u202e"
    "\u2060-\u2064\u2066-\u206f\ud800-\udfff\ufeff\ufff9-\ufffb]"
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    scripts(),
    st.sampled_from([(20.0, 100), (5.0, 2), (0.0, 100)]),
    st.sampled_from([10_000, 3]),
    st.sampled_from([0, 2]),
)
def test_room_properties(script, limits, max_clients, per_address):
    rate, burst = limits
    r = opened(rate=rate, burst=burst, max_clients=max_clients, per_address=per_address)
    server = fold("SERVER")
    here: set[int] = set()  # connections the room admitted and has not ended
    gone: set[int] = set()  # connections that got their End (conn ids are not reused here)
    handled: set[int] = set()
    finished = False
    prompts = []
    at = 100.0
    for step in script:
        at += step[2]
        if step[0] == "connect" and (step[1] in gone or step[1] in here):
            continue  # the loop never reuses a connection id
        ev = to_event(step, at, here)
        out = r.handle_event(ev)
        prompts += [(len(prompts), d.on) for d in of(Prompt, out)]
        assert r.deadline() is None

        # Store writes first, then output; every output is preceded by a store write, except
        # the console's own feedback (notes and errors) and the line saying the room closed.
        first_output = next((i for i, d in enumerate(out) if isinstance(d, (Send, Broadcast, Show))), len(out))
        assert not any(isinstance(d, STORE) for d in out[first_output:]), out
        for i, d in enumerate(out):
            if isinstance(d, (Send, Broadcast)) or (
                isinstance(d, Show) and d.kind not in ("note", "error") and not of(Finish, out)
            ):
                assert any(isinstance(x, STORE + (End, Refuse)) for x in out[:i]), out

        # Nothing unsafe reaches a client: one line per write, no control or invisible character.
        for d in of(Send, out) + of(Broadcast, out):
            text = d.data.decode()
            assert text.endswith("\n") and text.count("\n") == 1 and not UNSAFE.search(text[:-1]), d

        # The server's handle is never taken; a client's line never starts with it.
        for d in of(Handle, out):
            assert fold(d.handle) != server
        for d in of(Broadcast, out):
            prefix = d.data.split(b">", 1)[0].decode()
            if fold(prefix) == server:
                assert d.data.startswith(b"SERVER>*** ") or isinstance(ev, OperatorLine), d

        # Those present have handles that show as themselves, look like nobody else's, and not
        # like the server's.
        present = [p.handle for p in r.people.values() if p.handle is not None]
        assert all(is_safe(h) and not keys(h) & keys("SERVER") for h in present), present
        assert sum(len(keys(h)) for h in present) == len(set().union(*map(keys, present))), present

        # Every committed client line is relayed exactly once, after its commit, to all but its
        # sender, unless it was held back with a note saying so.
        relays = [(i, d) for i, d in enumerate(out)
                  if isinstance(d, Broadcast) and not d.data.startswith(b"SERVER>")]
        for i, c in enumerate(out):
            if isinstance(c, Commit) and c.sender == "client":
                mine = [(j, b) for j, b in relays if b.exclude == c.conn]
                if c.note and "not relayed" in c.note:
                    assert not mine
                else:
                    cut = len(c.text) - 500
                    shown = visible(c.text) if cut <= 0 else visible(c.text[:500]) + f" [{cut} more characters not relayed]"
                    want = (visible(c.handle) + ">" + shown + "\n").encode()
                    assert [b.data for _, b in mine] == [want] and mine[0][0] > i
        assert len(relays) == len([c for c in of(Commit, out) if c.sender == "client"
                                   and not (c.note and "not relayed" in c.note)])

        # A line from a present client is never dropped, whatever its rate.
        if isinstance(ev, Received) and ev.conn in here and not ev.msg.is_quit:
            assert [c.text for c in of(Commit, out) if c.sender == "client"] == [ev.msg.text]
        for p in of(Pause, out):
            assert p.conn == getattr(ev, "conn", None) and p.until > at
        if isinstance(ev, Received) and ev.conn not in here:
            assert out == []

        # A participant's End happens once, and only to a participant.
        for e in of(End, out):
            assert e.conn in here and e.conn not in gone
            here.discard(e.conn)
            gone.add(e.conn)
        for j in of(Join, out):
            assert not finished
            here.add(j.conn)
        for h in of(Handle, out):
            assert h.conn not in handled
            handled.add(h.conn)

        closing = isinstance(ev, (Stop, OperatorEnd)) or (
            isinstance(ev, OperatorLine) and ev.text.strip() == "\\quit")
        if closing and not finished:
            assert isinstance(out[-1], Finish) and not here
            finished = True
        else:
            assert not of(Finish, out)
        if finished and not closing:
            assert all(isinstance(d, Refuse) for d in out)
        assert len(here) <= max_clients
    # Once the room was opened, the operator's input is wanted until the room closes.
    assert [on for _, on in prompts] in ([], [False])


def test_kick_a_hostile_handle_by_the_form_who_shows_or_an_ipv6_address():
    r = room(2, ["\x1b[2J"])  # refused: it never becomes a handle
    r.handle_event(Connected(3, "::1", 6000, 2.0))
    who = [d.text for d in r.handle_event(OperatorLine("\\who", 3.0))]
    assert any(t.startswith("  (no handle yet) ") for t in who) and any("[::1]:6000" in t for t in who)
    assert not any("\x1b" in t for t in who)
    r.handle_event(line(1, "hi", "\\x1b[2J", at=3.5))  # the same drawn with backslashes is a handle
    out = r.handle_event(OperatorLine("\\kick \\x1b[2J", 4.0))
    assert of(End, out) == [End(1, "kicked", 4.0, NOTICES["kicked"])]
    assert of(Broadcast, out) == [Broadcast(b"SERVER>*** \\x1b[2J left\n", exclude=1)]
    assert of(End, r.handle_event(OperatorLine("\\kick [::1]:6000", 4.0))) == [End(3, "kicked", 4.0, NOTICES["kicked"])]


def test_a_participant_who_changes_handle_is_announced_to_everyone():
    """Otherwise a participant could take another's name mid-room with only the console told."""
    r = room(3, ["alice", "bob"])
    out = r.handle_event(line(2, "call me carol", "carol", at=5.0))
    assert of(Commit, out)[0] == Commit(2, "event", "carol", "renamed", None, "bob is now carol", 5.0)
    assert of(Broadcast, out) == [
        Broadcast(b"SERVER>*** bob is now carol\n", exclude=2),
        Broadcast(b"carol>call me carol\n", exclude=2),
    ]


def test_per_address_cap_counts_an_ipv6_64_as_one_address():
    """A host with IPv6 picks source addresses from a whole /64: three of one /64 are one address."""
    r = opened(per_address=2)
    assert of(Join, r.handle_event(Connected(1, "2001:db8:1:2::a", 1, 1.0)))
    assert of(Join, r.handle_event(Connected(2, "2001:db8:1:2:ffff:1:2:3", 2, 1.0)))
    out = r.handle_event(Connected(3, "2001:db8:1:2::b", 3, 1.0))
    assert of(Refuse, out) and of(Refuse, out)[0].reason == "per-address"
    assert of(Join, r.handle_event(Connected(4, "2001:db8:1:3::a", 4, 1.0)))  # the next /64 is another
    assert of(Join, r.handle_event(Connected(5, "fe80::1%eth0", 5, 1.0)))  # a scoped address parses
    r.handle_event(Disconnected(1, 2.0))
    assert of(Join, r.handle_event(Connected(6, "2001:db8:1:2::c", 6, 2.0)))


# -- impersonation and handles in use (issue 14 items 3 and 4) ------------------------------


@pytest.mark.parametrize("claimed", [
    "SERVER\u034f", "SERVER\ufe0f", "SERVER\U000e0100", "SERVER\u17b4", "SER\u115fVER", "SERVER\u3164",
    "SERV\u1160ER", "SERVER\uffa0", "S\u0415RV\u0415R", "\u0405ERVER",
], ids=ascii)
def test_no_look_alike_or_invisible_variant_passes_for_the_server(claimed):
    r = room(2)
    out = r.handle_event(line(1, "Please re-send your password", claimed, at=3.0))
    assert not of(Broadcast, out) and not of(Handle, out)
    (c,) = of(Commit, out)
    assert (c.handle, c.text) == (claimed, "Please re-send your password")
    assert c.note.startswith("the handle ") and c.note.endswith(": not relayed")
    (s,) = of(Send, out)
    assert s.data.startswith(b"SERVER>*** The handle ") and b"; choose another, like: alice>hello (not relayed)\n" in s.data
    assert is_safe_bytes(s.data)
    assert [x.kind for x in of(Show, out)] == ["error"]
    assert is_safe_text(of(Show, out)[0].text)


def is_safe_bytes(data):
    return not UNSAFE.search(data.decode()[:-1]) and not INVISIBLE.search(data.decode())


def is_safe_text(text):
    return not UNSAFE.search(text) and not INVISIBLE.search(text)


INVISIBLE = re.compile("[\u034f\ufe00-\ufe0f\U000e0100-\U000e01ef\u17b4\u17b5\u115f\u1160\u3164\uffa0]")


def test_a_second_client_cannot_take_a_handle_in_use():
    r = room(3, ["alice"])
    out = r.handle_event(line(2, "I am alice too", "alice", at=3.0))
    assert not of(Broadcast, out) and not of(Handle, out)
    assert of(Commit, out) == [
        Commit(2, "client", "alice", "I am alice too", None, "the handle alice is taken by someone here: not relayed", 3.0)
    ]
    assert of(Send, out) == [Send(2, b"SERVER>*** The handle alice is taken by someone here; "
                                     b"choose another, like: carol>hello (not relayed)\n")]
    # A look-alike is refused as well, and the client may then choose another.
    assert not of(Broadcast, r.handle_event(line(2, "x", "\u0430lice", at=3.5)))
    out = r.handle_event(line(2, "fine", "alice2", at=4.0))
    assert of(Handle, out) == [Handle(2, "alice2")] and of(Broadcast, out)[-1] == Broadcast(b"alice2>fine\n", exclude=2)
    # Once alice has left, her handle is free.
    r.handle_event(Disconnected(1, 5.0))
    out = r.handle_event(line(3, "now me", "alice", at=6.0))
    assert of(Handle, out) == [Handle(3, "alice")]


def test_a_rename_onto_someone_present_is_refused_and_the_old_handle_kept():
    r = room(3, ["bob", "dan"])
    out = r.handle_event(line(2, "dan is now bob", "bob", at=3.0))
    assert not of(Broadcast, out)
    assert of(Commit, out) == [
        Commit(2, "client", "bob", "dan is now bob", None, "the handle bob is taken by someone here: not relayed", 3.0)
    ]
    assert of(Send, out)[0].data.startswith(b"SERVER>*** The handle bob is taken by someone here; choose another")
    # Still dan: a line without a prefix goes out under dan.
    out = r.handle_event(line(2, "as before", None, at=4.0))
    assert of(Broadcast, out) == [Broadcast(b"dan>as before\n", exclude=2)]
    # Changing the case of one's own handle is no theft.
    out = r.handle_event(line(2, "louder", "DAN", at=5.0))
    assert of(Broadcast, out)[0] == Broadcast(b"SERVER>*** dan is now DAN\n", exclude=2)
    # After a rename the old handle is free, the new one taken.
    assert of(Broadcast, r.handle_event(line(2, "new name", "erin", at=5.5)))
    assert of(Handle, r.handle_event(line(3, "hi", "dan", at=6.0))) == [Handle(3, "dan")]
    assert not of(Broadcast, r.handle_event(line(1, "x", "Erin", at=6.0)))


# -- a client's commands ------------------------------------------------------------------------


def test_a_clients_who_and_help_answer_it_alone_recorded_with_a_note_never_relayed():
    """A client's `\\who` (and irssi's `/who`) was relayed to everyone as a chat line."""
    r = room(3, handles=("alice", "bob"))
    for text in ("\\who", "/who", " \\who "):
        out = r.handle_event(line(1, text, "alice", at=5.0))
        assert not of(Broadcast, out), out
        assert of(Send, out) == [Send(1, b"SERVER>*** 3 here: alice, bob, (no handle yet)\n")]
        assert [(c.text, c.sender, c.handle) for c in of(Commit, out)] == [(text, "client", "alice")]
        assert "not relayed" in of(Commit, out)[0].note
        assert out.index(of(Commit, out)[0]) < out.index(of(Send, out)[0])
    out = r.handle_event(line(2, "\\help", "bob"))
    assert not of(Broadcast, out)
    [help_] = of(Send, out)
    assert help_.conn == 2 and b"\\who" in help_.data and b"\\quit" in help_.data


@pytest.mark.parametrize("text", ["\\nope", "/shrug", "/join #chatlog", "\\WHO x"])
def test_an_unknown_client_command_is_answered_to_its_sender_alone(text):
    r = room(2, handles=("alice", "bob"))
    out = r.handle_event(line(1, text, "alice"))
    assert not of(Broadcast, out)
    [reply] = of(Send, out)
    assert reply.conn == 1 and reply.data.startswith(b"SERVER>*** Unknown command") and b"not sent to the room" in reply.data
    assert [c.text for c in of(Commit, out)] == [text] and "not relayed" in of(Commit, out)[0].note


@pytest.mark.parametrize("text", ["/usr/bin is where", "/ not a command", "\\o/ yay", "/2fa", "a \\who", "//who"])
def test_lines_that_only_start_like_a_command_are_relayed(text):
    r = room(2, handles=("alice", "bob"))
    out = r.handle_event(line(1, text, "alice"))
    assert [b.data for b in of(Broadcast, out)] == [b"alice>" + visible(text).encode() + b"\n"]
    assert not of(Send, out)


def test_a_who_from_a_client_with_no_handle_yet_is_answered_too():
    r = room(2, handles=("alice",))
    out = r.handle_event(line(2, "/who"))
    assert of(Send, out) == [Send(2, b"SERVER>*** 2 here: alice, (no handle yet)\n")]
    assert not of(Broadcast, out) and not of(Handle, out)


def test_who_for_a_big_room_stays_within_one_protocol_line():
    r = room(300, handles=[f"user{i:03d}" for i in range(300)], per_address=0)
    [reply] = of(Send, r.handle_event(line(1, "\\who", "user000")))
    text = reply.data.decode()[len("SERVER>"):-1]
    assert len(text) <= 500 and text.startswith("*** 300 here: user000, user001") and text.endswith(" more")


# -- a join announced when the handle is chosen (handle>\join) -------------------------------


def test_a_join_line_announces_the_handle_before_anything_is_said():
    """chatclient sends `alice>\\join` as soon as its user has chosen a handle: the others hear
    `alice joined` then, nothing is relayed as a line, and the join is recorded as the event."""
    r = room(2, handles=("bob",))
    out = r.handle_event(line(2, "\\join", "alice", at=3.0))
    assert of(Handle, out) == [Handle(2, "alice")]
    assert [(c.sender, c.text) for c in of(Commit, out)] == [("event", "joined")]
    assert [b.data for b in of(Broadcast, out)] == [b"SERVER>*** alice joined\n"]
    assert not of(Send, out)
    assert r.handle_event(line(2, "\\join", "alice", at=3.5)) == []  # said twice: nothing more
    out = r.handle_event(line(2, "hello", "alice", at=4.0))
    assert [b.data for b in of(Broadcast, out)] == [b"alice>hello\n"]  # no second "joined"


def test_a_join_under_a_handle_in_use_is_refused_like_any_line():
    r = room(2, handles=("alice",))
    out = r.handle_event(line(2, "\\join", "alice", at=3.0))
    assert not of(Broadcast, out) and not of(Handle, out)
    [c] = of(Commit, out)
    assert c.text == "\\join" and "not relayed" in c.note
    [s] = of(Send, out)
    assert b"taken by someone here" in s.data


# -- history ------------------------------------------------------------------------------------------


def test_a_newcomer_is_sent_the_rooms_history_right_after_the_greeting():
    r = opened(history=5)
    out = r.handle_event(Connected(1, HOST, 5001, 1.0))
    assert [type(d) for d in out] == [Join, Send, History, Show]
    assert out[2] == History(1, 5, 1.0)
    r = opened(history=0)
    assert not of(History, r.handle_event(Connected(1, HOST, 5001, 1.0)))


def test_the_operators_history_command_shows_the_rooms_last_lines_on_the_console():
    r = room(1, handles=("alice",))
    assert r.handle_event(OperatorLine("\\history", 7.0)) == [History(None, 20, 7.0)]
    assert r.handle_event(OperatorLine("\\history 3", 7.0)) == [History(None, 3, 7.0)]
    [err] = r.handle_event(OperatorLine("\\history lots", 7.0))
    assert err.kind == "error" and "\\history [N]" in err.text


def test_history_words_mark_every_line_with_its_time_and_make_it_safe():
    from chatlog.room import history_lines

    now = 1_800_000_000.0
    rows = [("2027-01-15T08:01:00.000000+00:00", "client", "alice", "hi"),
            ("2027-01-15T08:02:00.000000+00:00", "server", "SERVER", "\x1b[2Jwelcome"),
            ("2027-01-14T08:03:00.000000+00:00", "client", "b\u202eob", "x" * 600)]
    head, lines, tail = history_lines("lab", rows, now)
    assert head == "History: the last 3 lines of lab" and tail == "End of history; live from here."
    assert lines[0].startswith("[") and lines[0].endswith("] alice>hi")
    assert "\x1b" not in lines[1] and lines[1].endswith("SERVER>\\x1b[2Jwelcome")
    assert "\u202e" not in lines[2] and lines[2].endswith(" [100 more characters]")
    assert len(lines[2]) <= 500 + 60  # cut as the relay cuts it
    assert history_lines("lab", rows[:1], now)[0] == "History: the last line of lab"


# -- a read's lines at once: the same as each line on its own ---------------------------------

def _effects(room_, out, effects):
    """What the loop would do with `out`: the records (a run's as a Commit each), the console's
    lines (a run's as a Show each; the rate note apart, as it may come at the run's end), the
    bytes each connection gets, when each is paused until, who is ended."""
    records, shows, notes, wire, paused, ended = effects
    for d in out:
        t = type(d)
        if t is CommitLines:
            records += [Commit(d.conn, "client", d.handle, text, None, None, at, d.verified) for text, at in d.lines]
        elif isinstance(d, (Commit, Join, Handle, End, Bind)):
            records.append(d)
            if t is End:
                ended.append(d.conn)
        elif t is ShowLines:
            shows += [Show(d.kind, text, d.handle) for text in d.texts]
        elif t is Show:
            (notes if "reading paused" in d.text else shows).append(d)
        elif t is Broadcast:
            for c in range(1, 7):
                if c != d.exclude:
                    wire[c] = wire.get(c, b"") + d.data
        elif t is Send:
            wire[d.conn] = wire.get(d.conn, b"") + d.data
        elif t is Pause:
            paused[d.conn] = d.until


plain_texts = st.one_of(
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12),
    st.sampled_from(["x" * 499, "x" * 500, "x" * 501, "\\who", "/who", " hi", "\\quit", "é", "a\tb", ""]),
)


@st.composite
def reads(draw):
    """A client's reads: lines under its handle (mostly), another handle, none; CRLF, NUL, overlong."""
    out = []
    for _ in range(draw(st.integers(1, 4))):
        data = b""
        for _ in range(draw(st.integers(0, 12))):
            handle = draw(st.sampled_from(["alice", "alice", "alice", "bob", "carol", None, "SERVER"]))
            text = draw(plain_texts)
            line = (f"{handle}>" if handle else "") + text
            end = draw(st.sampled_from(["\n", "\n", "\n", "\r\n", "\n\0"]))
            data += line.encode() + end.encode()
        if draw(st.booleans()):
            data += b"y" * draw(st.sampled_from([3, 9000]))  # an unterminated rest, or an overlong line
        out.append((data, draw(st.sampled_from([0.0, 0.0, 0.01, 2.0]))))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reads(), st.sampled_from([(20.0, 100), (5.0, 3), (0.0, 100)]))
def test_a_reads_lines_at_once_do_what_each_line_on_its_own_does(script, limits):
    _at_once_as_each(script, limits, runs=True)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reads(), st.sampled_from([(20.0, 100), (5.0, 3), (0.0, 100)]), st.booleans())
def test_a_bursting_senders_own_matcher_takes_the_same_lines_as_plain(script, limits, runs):
    """A sender whose reads bring many lines gets a matcher with its handle in it, which takes a
    Run of plain lines whole: with it made at every read (and made again after each rename),
    the room does the same, to the last bit of its rate bucket."""
    saved = room_module.OWN_MATCH_RUN
    room_module.OWN_MATCH_RUN = 1
    try:
        _at_once_as_each(script, limits, runs)
    finally:
        room_module.OWN_MATCH_RUN = saved


def _at_once_as_each(script, limits, runs):
    """Room 0 takes each read's lines at once (with `runs`, framed as the intake frames them:
    whole plain-framed lines as one Run), room 1 line by line; they must do the same."""
    rate, burst = limits
    rooms = [room(3, ["alice", "bob"], rate=rate, burst=burst) for _ in range(2)]
    framers = [Framer(), Framer()]
    effects = [([], [], [], {}, {}, []) for _ in range(2)]
    at = 10.0
    for data, dt in script:
        at += dt
        for i, (r, f) in enumerate(zip(rooms, framers, strict=True)):
            frames = f.feed(data, at, runs=runs and i == 0)
            if i == 0:
                out = r.handle_event(ReceivedLines(1, frames)) if frames else []
            else:
                out = []
                for frame in frames:
                    out += r.handle_event(Received(1, parse(frame), frame.at))
            _effects(r, out, effects[i])
    a, b = effects
    assert a[0] == b[0]  # the same records, in the same order
    assert a[1] == b[1]  # the same console lines
    assert len(a[2]) == len(b[2])  # the rate note, once
    assert a[3] == b[3]  # every connection gets the same bytes
    assert a[4] == b[4] and a[5] == b[5]
    pa, pb = rooms[0].people.get(1), rooms[1].people.get(1)
    assert (pa is None) == (pb is None)
    if pa is not None:
        assert (pa.handle, pa.tokens, pa.stamp, pa.last) == (pb.handle, pb.tokens, pb.stamp, pb.last)


def test_a_run_of_plain_lines_is_one_record_one_console_decision_and_one_broadcast():
    r = room(2, ["alice", "bob"])
    frames = Framer().feed(b"alice>one\nalice>two\nalice>three\n", 20.0)
    out = r.handle_event(ReceivedLines(1, frames))
    assert out == [
        CommitLines(1, "alice", [("one", 20.0), ("two", 20.0), ("three", 20.0)]),
        ShowLines("client", ["one", "two", "three"], "alice"),
        Broadcast(b"alice>one\nalice>two\nalice>three\n", 1),
    ]


def test_the_clients_own_lines_ending_in_a_nul_are_a_run_too():
    """./chatclient ends every line with "\n\0" (as the original CS372 server expects): its
    lines are plain too, recorded alike (the NUL is canonical, no raw bytes kept), relayed
    without the NUL."""
    r = room(2, ["alice", "bob"])
    frames = Framer().feed(b"alice>one\n\0alice>two\n\0", 20.0)
    out = r.handle_event(ReceivedLines(1, frames))
    assert out == [
        CommitLines(1, "alice", [("one", 20.0), ("two", 20.0)]),
        ShowLines("client", ["one", "two"], "alice"),
        Broadcast(b"alice>one\nalice>two\n", 1),
    ]


def test_a_line_that_needs_the_slow_path_splits_the_run_in_its_place():
    r = room(2, ["alice", "bob"])
    frames = Framer().feed(b"alice>one\n\\who\nalice> two\nalice>three\n", 20.0)
    out = r.handle_event(ReceivedLines(1, frames))
    kinds = [type(d).__name__ for d in out]
    assert kinds == ["CommitLines", "ShowLines", "Broadcast",  # one
                     "Commit", "Show", "Send",  # \who: answered to alice alone
                     "Commit", "Show", "Broadcast",  # " two": the parser takes the space off
                     "CommitLines", "ShowLines", "Broadcast"]  # three
    assert out[8].data == b"alice>two\n"
