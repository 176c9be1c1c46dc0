"""The 1:1 turn policy on its own: events in, decisions out, no sockets."""

from hypothesis import given, settings
from hypothesis import strategies as st

from chatlog import protocol
from chatlog.events import (
    Commit,
    Connected,
    Disconnected,
    End,
    Finish,
    Handle,
    Open,
    OperatorEnd,
    OperatorLine,
    Prompt,
    Received,
    Refuse,
    Send,
    Serve,
    Show,
    Stalled,
    Started,
    Stop,
    Tick,
)
from chatlog.turns import NOBODY_NOTICE, Turns


def line(conn, data: bytes, at=0.0):
    frame = protocol.Frame(data.rstrip(b"\n"), data, at)
    return Received(conn, protocol.parse(frame), at)


def kinds(decisions, kind):
    return [d for d in decisions if isinstance(d, kind)]


def sent(decisions, conn):
    return b"".join(d.data for d in decisions if isinstance(d, Send) and d.conn == conn)


def test_a_chat_commits_before_it_shows_and_answers():
    t = Turns()
    out = t.handle_event(Connected(1, "10.0.0.1", 5000, 0.0))
    assert out[0] == Open(1, "10.0.0.1", 5000, 0.0, served=True)
    out = t.handle_event(line(1, b"amy>hello\n", 1.0))
    assert [type(d) for d in out] == [Handle, Commit, Show, Prompt]
    assert out[1].text == "hello" and out[1].sender == "client" and out[1].handle == "amy"
    out = t.handle_event(OperatorLine("hi amy", 2.0))
    assert [type(d) for d in out] == [Commit, Show, Send, Prompt]
    assert out[2].data == b"SERVER>hi amy\n"
    assert out[3] == Prompt(False)


def test_operator_handle_is_used_on_the_wire_and_in_the_record():
    t = Turns(handle="Ops")
    t.handle_event(Connected(1, "h", 1, 0.0))
    t.handle_event(line(1, b"a>x\n"))
    out = t.handle_event(OperatorLine("y", 1.0))
    assert kinds(out, Commit)[0].handle == "Ops" and sent(out, 1) == b"Ops>y\n"


def test_operator_line_out_of_turn_is_not_sent():
    t = Turns()
    out = t.handle_event(OperatorLine("nobody here", 0.0))
    assert not kinds(out, Send) and not kinds(out, Commit)
    t.handle_event(Connected(1, "h", 1, 0.0))
    out = t.handle_event(OperatorLine("too early", 0.0))  # the client speaks first
    assert not kinds(out, Send) and not kinds(out, Commit)


def test_quit_either_way():
    t = Turns()
    t.handle_event(Connected(1, "h", 1, 0.0))
    t.handle_event(line(1, b"a>hi\n"))
    out = t.handle_event(OperatorLine("\\quit", 1.0))
    end = kinds(out, End)[0]
    assert (end.reason, end.notice) == ("server-quit", "The server closed the chat.")
    assert not kinds(out, Commit)
    t.handle_event(Connected(2, "h", 2, 2.0))
    out = t.handle_event(line(2, b"b> \\quit \n", 3.0))
    assert kinds(out, End)[0].reason == "client-quit" and not kinds(out, Commit)


def test_queue_waiting_notice_is_the_answer_and_begun_rides_with_the_answer():
    t = Turns()
    t.handle_event(Connected(1, "10.0.0.1", 1, 0.0))
    out = t.handle_event(Connected(2, "10.0.0.2", 2, 0.5))
    assert out[0] == Open(2, "10.0.0.2", 2, 0.5, served=False)
    out = t.handle_event(line(2, b"bob>anyone?\n", 1.0))
    assert kinds(out, Commit) and not kinds(out, Show)  # recorded, held from the console
    assert sent(out, 2) == b"SERVER>*** Waiting: 1 ahead of you. Your chat begins when they are done.\n"
    out = t.handle_event(line(2, b"bob>ok, waiting\n", 2.0))
    assert not kinds(out, Send)  # the client is now blocked on an answer: nothing out of turn
    t.handle_event(line(1, b"amy>bye\n", 3.0))
    out = t.handle_event(Disconnected(1, 4.0))
    assert kinds(out, End)[0].reason == "disconnect"
    assert kinds(out, Serve) == [Serve(2, 4.0)]
    assert [s.text for s in kinds(out, Show) if s.kind == "client"] == ["anyone?", "ok, waiting"]
    assert Prompt(True) in out  # bob is owed an answer
    out = t.handle_event(OperatorLine("hello bob", 5.0))
    assert sent(out, 2) == b"SERVER>*** Your chat has begun.\nSERVER>hello bob\n"  # one write


def test_busy_beyond_the_queue_and_beyond_the_per_address_cap():
    t = Turns(max_waiting=3, per_address=2)
    t.handle_event(Connected(1, "a", 1, 0.0))
    assert kinds(t.handle_event(Connected(2, "a", 2, 0.0)), Open)
    assert kinds(t.handle_event(Connected(3, "a", 3, 0.0)), Open)
    out = t.handle_event(Connected(4, "a", 4, 0.0))
    assert kinds(out, Refuse)[0].notice == "The server is busy; try again later."
    assert kinds(t.handle_event(Connected(5, "b", 5, 0.0)), Open)  # another address still gets in
    out = t.handle_event(Connected(6, "c", 6, 0.0))
    assert kinds(out, Refuse)  # the queue is full


def test_silent_connections_from_one_address_cannot_lock_another_out():
    """Ten silent connections from one address: a real client from another address is served
    within the first-message timeout, never refused."""
    t = Turns()
    for i in range(10):
        t.handle_event(Connected(i, "6.6.6.6", 1000 + i, 0.0))
    out = t.handle_event(Connected(99, "1.2.3.4", 5555, 1.0))
    assert kinds(out, Open) and not kinds(out, Refuse)
    assert t.deadline() == 30.0  # others have waited since 0: the silent one has 30 s to speak
    out = t.handle_event(Tick(30.0))
    assert kinds(out, End)[0].reason == "timeout"
    assert kinds(out, Serve) == [Serve(99, 30.0)]  # fairness: the other address goes first


def test_idle_timeout_and_deadline():
    t = Turns(idle_timeout=5)
    t.handle_event(Connected(1, "h", 1, 0.0))
    assert t.deadline() == 5.0
    t.handle_event(line(1, b"a>x\n", 1.0))
    assert t.deadline() is None  # the operator's turn has no timer
    t.handle_event(OperatorLine("y", 2.0))
    assert t.deadline() == 7.0
    assert t.handle_event(Tick(6.9)) == []
    out = t.handle_event(Tick(7.0))
    assert kinds(out, End)[0].notice == "No message for 5 s: timed out."


def test_flood_and_overlong():
    t = Turns(max_unanswered=3)
    t.handle_event(Connected(1, "h", 1, 0.0))
    for i in range(3):
        assert not kinds(t.handle_event(line(1, b"a>x\n", i)), End)
    out = t.handle_event(line(1, b"a>x\n", 4))
    assert kinds(out, Commit) and kinds(out, End)[0].reason == "flood"
    t.handle_event(Connected(2, "h", 2, 5.0))
    frame = protocol.Frame(b"b>" + b"x" * 10, b"b>" + b"x" * 10, 6.0, cut=99)
    out = t.handle_event(Received(2, protocol.parse(frame), 6.0))
    assert "99 more bytes dropped" in kinds(out, Commit)[0].note
    assert kinds(out, End)[0].reason == "overlong"


def test_stop_and_operator_end_end_everyone_then_finish():
    for event, reason in ((Stop("SIGHUP", 9.0), "shutdown"), (OperatorEnd(9.0), "server-quit")):
        t = Turns()
        t.handle_event(Connected(1, "h", 1, 0.0))
        t.handle_event(Connected(2, "h2", 2, 0.0))
        t.handle_event(line(1, b"a>hi\n", 1.0))  # the operator's turn: no answer will come
        out = t.handle_event(event)
        ends = {d.conn: d.reason for d in kinds(out, End)}
        assert ends == {1: reason, 2: "shutdown"}
        assert isinstance(out[-1], Finish)
        assert t.handle_event(Connected(3, "h", 3, 10.0)) == []


def test_operator_end_with_no_client_finishes_at_once():
    out = Turns().handle_event(OperatorEnd(0.0))
    assert isinstance(out[-1], Finish) and not kinds(out, End)


def test_operator_end_on_the_clients_turn_waits_for_its_next_line():
    t = Turns()
    t.handle_event(Connected(1, "h", 1, 0.0))
    assert t.handle_event(OperatorEnd(1.0)) == []
    out = t.handle_event(line(1, b"a>still there?\n", 2.0))
    assert kinds(out, Commit) and kinds(out, End)[0].reason == "server-quit"
    assert isinstance(out[-1], Finish)


def test_stalled_waiting_client_leaves_the_queue():
    t = Turns()
    t.handle_event(Connected(1, "h", 1, 0.0))
    t.handle_event(Connected(2, "h2", 2, 0.0))
    out = t.handle_event(Stalled(2, 1.0))
    assert kinds(out, End) == [End(2, "stalled", 1.0, None, waiting=True)]
    assert t.waiting == 0


# -- properties over random event sequences -----------------------------------------------------

conns = st.integers(0, 4)
events = st.one_of(
    st.builds(lambda c, t: Connected(c, f"10.0.0.{c % 3}", c, t), conns, st.floats(0, 1000)),
    st.builds(
        lambda c, b, t: line(c, b, t),
        conns,
        st.sampled_from([b"a>hi\n", b"bob>yo\n", b"plain\n", b"x>\\quit\n", b"a>\x1b[2J\n"]),
        st.floats(0, 1000),
    ),
    st.builds(Disconnected, conns, st.floats(0, 1000)),
    st.builds(Stalled, conns, st.floats(0, 1000)),
    st.builds(OperatorLine, st.sampled_from(["hi", "\\quit", "x" * 600, ""]), st.floats(0, 1000)),
    st.builds(Tick, st.floats(0, 2000)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(events, max_size=40), st.booleans(), st.booleans())
def test_invariants(seq, stop_at_end, attended):
    t = Turns(max_waiting=2, per_address=1, attended=attended)
    live: set[int] = set()  # connections with an open session
    ended: set[int] = set()
    told: set[int] = set()  # told that nobody is at the console
    prompt = idle = False
    for d in t.handle_event(Started(0.0)):
        if isinstance(d, Prompt):
            prompt, idle = d.on and not d.commands, d.on and d.commands
    if stop_at_end:
        seq = seq + [Stop("SIGTERM", 5000.0)]
    for ev in sorted(seq, key=lambda e: getattr(e, "at", 0.0)):
        if isinstance(ev, Connected):
            if ev.conn in live or ev.conn in ended:
                continue  # the loop never reuses a connection number
        committed = False
        was_idle = t.current is None
        out = t.handle_event(ev)
        for d in out:
            if isinstance(d, Open):
                assert d.conn not in live
                live.add(d.conn)
            elif isinstance(d, Commit):
                assert d.conn in live
                committed = True
            elif isinstance(d, Send):
                assert d.conn in live
                if not d.data.startswith(b"SERVER>***"):
                    assert committed  # an answer is sent only after it is committed
                if not attended:  # nothing but the one notice, as the answer to a line
                    assert d.data == b"SERVER>*** " + NOBODY_NOTICE.encode() + b"\n" and d.conn not in told
                    assert isinstance(ev, Received) and ev.conn == d.conn
                    told.add(d.conn)
            elif isinstance(d, End):
                assert d.conn in live, "a session ends once"
                live.discard(d.conn)
                ended.add(d.conn)
            elif isinstance(d, Prompt):
                prompt, idle = d.on and not d.commands, d.on and d.commands
        # one served client at most, and the operator is prompted exactly on its turn; with
        # nobody served, only for commands (\\quit); with nobody at the console, never
        assert (t.current is not None) or not t.operator_turn
        assert prompt == t.operator_turn or t.finished
        assert idle == (attended and t.current is None and not t.finished)
        if not attended:
            assert not prompt and not idle and not t.operator_turn
        if isinstance(ev, OperatorLine) and protocol.is_quit(ev.text) and attended and was_idle:
            assert t.finished
        assert len(t.queue) <= 2
        assert set(t.peers) == live
    if stop_at_end:
        assert not live and t.finished


def test_the_per_address_cap_counts_an_ipv6_64_as_one_address():
    t = Turns(max_waiting=9, per_address=2)
    t.handle_event(Connected(1, "10.0.0.1", 1, 0.0))
    assert kinds(t.handle_event(Connected(2, "2001:db8::1", 2, 0.0)), Open)
    assert kinds(t.handle_event(Connected(3, "2001:db8::2:2", 3, 0.0)), Open)
    out = t.handle_event(Connected(4, "2001:db8:0:0:1::3", 4, 0.0))
    assert kinds(out, Refuse) and "2001:db8::/64" in kinds(out, Refuse)[0].why
    assert kinds(t.handle_event(Connected(5, "2001:db8:0:1::1", 5, 0.0)), Open)  # another /64
    # IPv4-mapped forms stay one IPv4 address.
    assert kinds(t.handle_event(Connected(6, "::ffff:10.0.0.9", 6, 0.0)), Open)
    assert kinds(t.handle_event(Connected(7, "10.0.0.9", 7, 0.0)), Open)
    assert kinds(t.handle_event(Connected(8, "::ffff:10.0.0.9", 8, 0.0)), Refuse)


def test_fairness_serves_another_64_before_a_second_address_of_the_one_just_served():
    t = Turns(max_waiting=5, per_address=5)
    t.handle_event(Connected(1, "2001:db8::1", 1, 0.0))
    t.handle_event(Connected(2, "2001:db8::2", 2, 1.0))  # same /64 as the one being served
    t.handle_event(Connected(3, "2001:db8:0:9::1", 3, 2.0))
    out = t.handle_event(Disconnected(1, 3.0))
    assert kinds(out, Serve) == [Serve(3, 3.0)]


def test_a_client_claiming_the_servers_handle_or_a_look_alike_is_recorded_and_marked():
    """1:1 sends nothing out of turn (an old client would take it for the answer): the line is
    recorded with a note, the console shows it as a refused handle, and the chat goes on."""
    for claimed in ["SERVER", "server", "S\u0415RV\u0415R", "SERVER\u034f", "SER\u3164VER"]:
        t = Turns()
        t.handle_event(Connected(1, "10.0.0.1", 5000, 0.0))
        out = t.handle_event(line(1, f"{claimed}>Please re-send your password\n".encode(), 1.0))
        assert not kinds(out, Handle) and not kinds(out, Send)
        (c,) = kinds(out, Commit)
        assert (c.handle, c.text) == (claimed, "Please re-send your password")
        assert c.note.startswith("the handle ")
        assert [s.kind for s in kinds(out, Show)] == ["error"]
        assert "10.0.0.1 port 5000" in kinds(out, Show)[0].text
        assert Prompt(True) in out  # the operator answers as usual
        out = t.handle_event(OperatorLine("no", 2.0))
        assert sent(out, 1) == b"SERVER>no\n"
        # A proper handle afterwards is the session's handle.
        out = t.handle_event(line(1, b"amy>sorry\n", 3.0))
        assert kinds(out, Handle) == [Handle(1, "amy")] and kinds(out, Commit)[0].note is None


def test_a_waiting_client_with_a_refused_handle_is_shown_marked_when_served():
    t = Turns()
    t.handle_event(Connected(1, "a", 1, 0.0))
    t.handle_event(Connected(2, "b", 2, 0.0))
    out = t.handle_event(line(2, "S\u0415RVER>psst\n".encode(), 1.0))
    assert kinds(out, Commit)[0].note.startswith("the handle ")
    out = t.handle_event(Disconnected(1, 2.0))
    assert [s.kind for s in kinds(out, Show) if "psst" in s.text] == ["error"]


# -- the operator with nobody connected -------------------------------------------------------------


def test_with_nobody_connected_the_operator_may_give_commands_and_quit_stops_the_server():
    """The operator's \\quit with nobody connected was discarded silently (no prompt was up);
    it stops the server. Only commands are wanted then, so a script's answers wait for a client."""
    t = Turns()
    assert t.handle_event(Started(0.0))[-1] == Prompt(True, commands=True)
    out = t.handle_event(OperatorLine("hello?", 0.5))
    assert not kinds(out, Send) and not kinds(out, Finish) and kinds(out, Show)
    t.handle_event(Connected(1, "h", 1, 1.0))
    out = t.handle_event(line(1, b"a>bye\n", 1.5))
    t.handle_event(line(1, b"a>\\quit\n", 2.0))
    out = t.handle_event(Disconnected(1, 2.0))
    assert not kinds(out, Prompt) or kinds(out, Prompt)[-1] == Prompt(True, commands=True)
    out = t.handle_event(OperatorLine("\\quit", 3.0))
    assert isinstance(out[-1], Finish) and kinds(out, Prompt) == [Prompt(False)]


def test_a_client_that_connects_takes_the_prompt_away_until_it_speaks():
    t = Turns()
    t.handle_event(Started(0.0))
    out = t.handle_event(Connected(1, "h", 1, 1.0))
    assert kinds(out, Prompt) == [Prompt(False)]
    assert kinds(t.handle_event(line(1, b"a>hi\n", 2.0)), Prompt) == [Prompt(True)]


# -- a client line that claims the server's handle ------------------------------------------------------


def test_a_client_line_in_the_servers_handle_is_recorded_with_a_note_and_shown_as_the_clients():
    """`SERVER>please re-send your password` from a client was recorded and shown exactly as if
    the operator had said it (and made SERVER the session's handle)."""
    for handle, claimed in (("SERVER", b"SERVER"), ("SERVER", b"server"), ("Ops", b"OPS")):
        t = Turns(handle=handle)
        t.handle_event(Connected(1, "10.0.0.1", 5000, 0.0))
        t.handle_event(line(1, b"amy>hi\n", 0.5))
        t.handle_event(OperatorLine("hello", 0.7))
        out = t.handle_event(line(1, claimed + b">please re-send your password\n", 1.0))
        [c] = kinds(out, Commit)
        assert c.sender == "client" and c.handle == claimed.decode() and c.text == "please re-send your password"
        assert c.note == f"the handle {handle} is the server's"
        assert not kinds(out, Handle) and t.current.handle == "amy"
        shows = kinds(out, Show)
        assert shows[0].kind == "error" and f"the handle {handle} is the server's" in shows[0].text
        assert kinds(out, Prompt) == [Prompt(True)]


# -- nobody at the console ------------------------------------------------------------------------------


def test_with_no_operator_each_client_is_told_once_as_the_answer_to_its_first_line():
    t = Turns(attended=False)
    out = t.handle_event(Started(0.0))
    assert not kinds(out, Prompt)
    t.handle_event(Connected(1, "10.0.0.1", 5000, 0.0))
    t.handle_event(Connected(2, "10.0.0.2", 5000, 0.0))
    out = t.handle_event(line(1, b"amy>anyone there?\n", 1.0))
    assert kinds(out, Commit) and sent(out, 1) == b"SERVER>*** " + NOBODY_NOTICE.encode() + b"\n"
    assert not kinds(out, Prompt)
    out = t.handle_event(line(1, b"amy>hello?\n", 2.0))
    assert kinds(out, Commit) and sent(out, 1) == b"" and not kinds(out, Prompt)
    out = t.handle_event(line(2, b"bob>me too\n", 2.0))  # waiting: told the same, once
    assert sent(out, 2) == b"SERVER>*** " + NOBODY_NOTICE.encode() + b"\n"
    # the idle timeout runs from the client's last line, and then the next one is served
    assert t.deadline() == 2.0 + 300
    out = t.handle_event(Tick(302.0))
    assert kinds(out, End)[0].reason == "timeout" and kinds(out, Serve) == [Serve(2, 302.0)]
    assert not kinds(out, Prompt)
    out = t.handle_event(line(2, b"bob>still here\n", 303.0))
    assert kinds(out, Commit) and sent(out, 2) == b""


# -- `\caps notify`: a client that says it understands out-of-turn notices hears "your chat has
# begun" the moment it is served, alone; every other client keeps hearing it with the first answer.

BEGUN = b"SERVER>*** Your chat has begun.\n"


def queued_bob(t: Turns, *bob_lines: bytes):
    """amy (conn 1) is served and has spoken; bob (conn 2) waits and says bob_lines."""
    t.handle_event(Connected(1, "10.0.0.1", 1, 0.0))
    t.handle_event(line(1, b"amy>hi\n", 0.5))
    t.handle_event(Connected(2, "10.0.0.2", 2, 1.0))
    return [t.handle_event(line(2, data, 2.0 + i)) for i, data in enumerate(bob_lines)]


def test_caps_notify_is_recorded_never_answered_and_not_a_line():
    t = Turns()
    waiting, caps = queued_bob(t, b"bob>anyone?\n", b"bob>\\caps notify\n")
    assert sent(waiting, 2).startswith(b"SERVER>*** Waiting: 1 ahead of you.")
    assert not kinds(caps, Send) and not kinds(caps, Show) and not kinds(caps, Prompt)
    (commit,) = kinds(caps, Commit)
    assert (commit.sender, commit.handle, commit.text, commit.note) == ("event", "bob", "capabilities", "notify")
    out = t.handle_event(Disconnected(1, 5.0))
    assert kinds(out, Serve) == [Serve(2, 5.0)]
    assert sent(out, 2) == BEGUN  # at once, alone
    assert [s.text for s in kinds(out, Show) if s.kind == "client"] == ["anyone?"]  # not the \caps
    assert Prompt(True) not in out  # the Waiting notice answered bob's line: bob's turn
    out = t.handle_event(line(2, b"bob>so?\n", 6.0))
    assert Prompt(True) in out
    out = t.handle_event(OperatorLine("hello bob", 7.0))
    assert sent(out, 2) == b"SERVER>hello bob\n"  # said once only


def test_caps_notify_while_bob_waits_for_an_answer():
    t = Turns()
    queued_bob(t, b"bob>anyone?\n", b"bob>\\caps notify\n", b"bob>still here\n")
    out = t.handle_event(Disconnected(1, 5.0))
    assert sent(out, 2) == BEGUN and Prompt(True) in out  # still owed the answer to "still here"
    out = t.handle_event(OperatorLine("hello bob", 6.0))
    assert sent(out, 2) == b"SERVER>hello bob\n"


def test_caps_notify_arriving_just_after_bob_was_served():
    t = Turns()
    queued_bob(t, b"bob>anyone?\n", b"bob>still here\n")
    out = t.handle_event(Disconnected(1, 5.0))
    assert not kinds(out, Send)  # bob has not said it understands: it rides with the answer
    out = t.handle_event(line(2, b"bob>\\caps notify\n", 5.5))
    assert sent(out, 2) == BEGUN
    out = t.handle_event(OperatorLine("hello bob", 6.0))
    assert sent(out, 2) == b"SERVER>hello bob\n"


def test_caps_is_an_ordinary_line_where_the_begun_notice_could_not_answer_it():
    """A turn-based client whose person types `\\caps notify` waits for an answer. From a client
    never queued (nothing to announce), or a second time, it is a chat line and answered as one,
    so such a client is never left waiting."""
    t = Turns()
    t.handle_event(Connected(1, "h", 1, 0.0))
    t.handle_event(line(1, b"amy>hi\n", 0.5))
    t.handle_event(OperatorLine("hello", 0.7))
    out = t.handle_event(line(1, b"amy>\\caps notify\n", 1.0))
    assert Prompt(True) in out and kinds(out, Commit)[0].sender == "client"
    out = t.handle_event(OperatorLine("what caps?", 2.0))
    assert sent(out, 1) == b"SERVER>what caps?\n"
    t = Turns()
    queued_bob(t, b"bob>anyone?\n", b"bob>\\caps notify\n")
    out = t.handle_event(line(2, b"bob>\\caps notify\n", 3.0))
    assert kinds(out, Commit)[0].sender == "client"  # held for the console, owed an answer
    out = t.handle_event(Disconnected(1, 5.0))
    assert sent(out, 2) == BEGUN and Prompt(True) in out


def test_old_clients_never_hear_begun_out_of_turn():
    """Without \\caps, a line that merely looks like it (or a word after \\caps that is not
    notify) changes nothing: begun rides with the first answer."""
    t = Turns()
    queued_bob(t, b"bob>anyone?\n", b"bob>\\caps\n", b"bob>\\caps unknown\n")
    out = t.handle_event(Disconnected(1, 5.0))
    assert not kinds(out, Send)
    t.handle_event(line(2, b"bob>hi\n", 6.0))
    out = t.handle_event(OperatorLine("hello bob", 7.0))
    assert sent(out, 2) == BEGUN + b"SERVER>hello bob\n"
