"""./chatclient's line editor at a terminal: what is typed and edited is exactly what is sent.

Each test types keys into the real client in a pseudo-terminal, reads the screen through a
terminal emulator (pyte), and checks the bytes a scripted server received."""

import signal
import threading
import unicodedata

import pytest
from test_chatclient import Screen

LEFT, RIGHT, UP, DOWN = "\x1b[D", "\x1b[C", "\x1b[A", "\x1b[B"
HOME, END, DELETE = "\x1b[H", "\x1b[F", "\x1b[3~"
BACKSPACE = "\x7f"
CTRL_A, CTRL_E, CTRL_K, CTRL_U, CTRL_W = "\x01", "\x05", "\x0b", "\x15", "\x17"


def answering(*lines: bytes):
    """A server that expects each of `lines` from brandon in turn and answers each, then \\quit."""

    def script(peer):
        for i, text in enumerate(lines):
            peer.expect(b"brandon>" + text + b"\n\0")
            peer.send(b"SERVER>ok %d\n" % i)
        peer.expect(b"brandon>\\quit\n\0")

    return script


def login(s: Screen):
    s.type("brandon\r")
    s.wait_last("brandon>")


def quit_(s: Screen, srv):
    s.type(CTRL_E + CTRL_U + "\\quit\r")
    s.wait_last("You left the chat.")
    assert s.finish() == 0
    srv.join()


def cursor(s: Screen):
    return s.screen.cursor.y, s.screen.cursor.x


def last_row(s: Screen):
    return max(i for i, line in enumerate(s.screen.display) if line.strip())


def test_moving_inserting_and_deleting_never_split_a_character(chatclient, fake_server):
    want = "[1<a\u00e92]"
    srv = fake_server(answering(want.encode()))
    s = Screen(chatclient, srv.port)
    login(s)
    # Left twice (CSI and SS3 forms), Backspace takes the b; é goes in after the a.
    s.type("ab\u65e5c" + LEFT + "\x1bOD" + BACKSPACE + "\u00e9")
    s.wait_last("brandon>a\u00e9\u65e5c")
    assert cursor(s)[1] == len("brandon>a\u00e9")
    # Right, Delete takes the c; Home and End (and Ctrl-A, Ctrl-E) reach both ends.
    s.type(RIGHT + DELETE + HOME + "<" + END + ">" + CTRL_A + "1" + CTRL_E + "2")
    s.wait_last("brandon>1<a\u00e9\u65e5>2")
    # Backspace before the 2 takes the >, then the whole three-byte 日.
    s.type(LEFT + BACKSPACE + BACKSPACE)
    s.wait_last("brandon>1<a\u00e92")
    s.type("\x1b[1~[" + "\x1b[4~]" + LEFT * 3)  # the other Home and End sequences
    s.wait_last("brandon>" + want)
    assert cursor(s)[1] == len("brandon>[1<a")
    s.type("\r")
    s.wait(lambda lines: "SERVER>ok 0" in lines)
    quit_(s, srv)
    assert srv.received.startswith(f"brandon>{want}\n\0".encode())


def test_kill_word_kill_to_start_and_kill_to_end(chatclient, fake_server):
    srv = fake_server(answering(b"x three"))
    s = Screen(chatclient, srv.port)
    login(s)
    s.type("one two three" + LEFT * 6 + CTRL_W)  # the word before the cursor
    s.wait_last("brandon>one  three")
    s.type(CTRL_U)  # everything before the cursor
    s.wait_last("brandon> three")
    s.type("x" + CTRL_E + " four" + HOME + RIGHT * 7 + CTRL_K)  # everything after it
    s.wait_last("brandon>x three")
    s.type("\r")
    s.wait(lambda lines: "SERVER>ok 0" in lines)
    quit_(s, srv)


def test_up_and_down_walk_the_lines_sent_in_this_run(chatclient, fake_server):
    srv = fake_server(answering(b"first", b"second", b"first!"))
    s = Screen(chatclient, srv.port)
    login(s)
    s.type("first\r")
    s.wait(lambda lines: "SERVER>ok 0" in lines)
    s.type("second\r")
    s.wait(lambda lines: "SERVER>ok 1" in lines)
    s.type(UP)
    s.wait_last("brandon>second")
    s.type(UP)
    s.wait_last("brandon>first")
    s.type(UP + DOWN)  # the oldest stays the oldest
    s.wait_last("brandon>second")
    s.type(DOWN)  # past the newest: the line being typed, empty here
    s.wait_last("brandon>")
    s.type("draft" + UP)
    s.wait_last("brandon>second")
    s.type(DOWN)  # the draft comes back as it was
    s.wait_last("brandon>draft")
    s.type(UP + UP + "!")
    s.wait_last("brandon>first!")
    s.type("\r")
    s.wait(lambda lines: "SERVER>ok 2" in lines)
    s.type(UP)
    s.wait_last("brandon>first!")
    quit_(s, srv)


def test_editing_a_wrapped_line_and_an_incoming_line_above_it(chatclient, fake_server):
    digits = "0123456789" * 4
    answer = threading.Event()

    def script(peer):
        peer.expect(b"brandon>hi\n\0")
        answer.wait(10)
        peer.send(b"SERVER>answer\n")
        peer.expect(b"brandon>X" + digits[:-1].encode() + b"\n\0")
        peer.send(b"SERVER>got it\n")
        peer.expect(b"brandon>\\quit\n\0")

    srv = fake_server(script)
    s = Screen(chatclient, srv.port, cols=30, rows=20)
    login(s)
    s.type("hi\r")
    s.wait_last("brandon>")
    s.type(digits + HOME + "X")
    whole = "brandon>X" + digits
    rows = [whole[i : i + 30] for i in range(0, len(whole), 30)]
    lines = s.wait(lambda lines: lines[-2:] == rows)
    assert cursor(s) == (last_row(s) - 1, len("brandon>X"))  # on the first of the two rows
    answer.set()  # the answer arrives while the cursor is on the upper row
    lines = s.wait(lambda lines: lines[-3:] == ["SERVER>answer", *rows])
    assert not any("0123" in line for line in lines[:-2])  # nothing left of the old rows
    assert cursor(s) == (last_row(s) - 1, len("brandon>X"))
    s.type(END + BACKSPACE)
    s.wait(lambda lines: lines[-2:] == [rows[0], rows[1][:-1]])
    assert cursor(s) == (last_row(s), len(rows[1]) - 1)
    s.type("\r")
    s.wait(lambda lines: "SERVER>got it" in lines)
    quit_(s, srv)


def test_a_line_over_500_characters_is_refused_and_kept_for_editing(chatclient, fake_server):
    srv = fake_server(answering(b"y" * 500))
    s = Screen(chatclient, srv.port, cols=200, rows=30)
    login(s)
    s.type("y" * 501 + "\r")
    whole = "brandon>" + "y" * 501
    rows = [whole[i : i + 200] for i in range(0, len(whole), 200)]
    refused = "Message too long (501 characters, at most 500); not sent. It is kept below for editing."
    s.wait(lambda lines: lines[-4:] == [refused, *rows])
    s.type(BACKSPACE + "\r")  # one less, and it goes
    s.wait(lambda lines: "SERVER>ok 0" in lines)
    quit_(s, srv)
    assert srv.received == b"brandon>" + b"y" * 500 + b"\n\0brandon>\\quit\n\0"


def test_a_line_refused_while_one_is_queued_is_kept_too(chatclient, fake_server):
    answer = threading.Event()

    def script(peer):
        peer.expect(b"brandon>hi\n\0")
        answer.wait(10)
        peer.send(b"SERVER>answer\n")
        peer.expect(b"brandon>second\n\0")
        peer.send(b"SERVER>answer two\n")
        peer.expect(b"brandon>third\n\0")
        peer.send(b"SERVER>answer three\n")
        peer.expect(b"brandon>\\quit\n\0")

    srv = fake_server(script)
    s = Screen(chatclient, srv.port, cols=120)
    s.type("brandon\rhi\rsecond\rthird\r")
    refused = "Not sent: a line is already queued; wait for the server's answer. It is kept below for editing."
    s.wait(lambda lines: lines[-2:] == [refused, "brandon>third"])
    answer.set()
    s.wait(lambda lines: "SERVER>answer two" in lines)
    s.type("\r")
    s.wait(lambda lines: "SERVER>answer three" in lines)
    quit_(s, srv)


@pytest.mark.parametrize("how", ["ctrl-d", "SIGTERM"])
def test_leaving_with_a_queued_line_says_it_was_not_sent(chatclient, how, fake_server):
    srv = fake_server(lambda peer: (peer.expect(b"brandon>\\quit\n\0"), peer.wait_close()))
    s = Screen(chatclient, srv.port)
    login(s)
    s.type("hi\rsecond\r")  # the server never answers hi: second waits for its turn
    s.wait(lambda lines: "(queued: will be sent when the server answers)" in lines)
    if how == "ctrl-d":
        s.type("\x04")
    else:
        s.p.kill(signal.SIGTERM)
    lines = s.wait_last("You left the chat.")
    assert lines[-2] == "Not sent (the server had not answered yet): second"
    assert s.finish() == 0
    srv.join()
    assert srv.received == b"brandon>hi\n\0brandon>\\quit\n\0"


def test_the_cursor_counts_wide_and_combining_characters_as_the_terminal_does(chatclient, fake_server):
    text = "\u65e5\u672c\U0001f600e\u0301x"  # two wide, an emoji, e and a combining acute, x
    srv = fake_server(answering("\u65e5\u672c\u00e9xe\u0301".encode()))
    s = Screen(chatclient, srv.port)
    login(s)
    s.type(text + LEFT)
    s.wait(lambda lines: lines[-1].startswith("brandon>\u65e5"))
    start = len("brandon>")
    s.wait(lambda lines: cursor(s)[1] == start + 2 + 2 + 2 + 1)  # before the x
    s.type(HOME + RIGHT * 2)
    s.wait(lambda lines: cursor(s)[1] == start + 4)  # after 日本
    s.type(RIGHT)  # over the emoji
    s.wait(lambda lines: cursor(s)[1] == start + 6)
    s.type(RIGHT)  # e with its mark: one step
    s.wait(lambda lines: cursor(s)[1] == start + 7)
    s.type(LEFT + BACKSPACE + "\u00e9x" + END + BACKSPACE)  # the emoji goes, whole
    nfc = "brandon>\u65e5\u672c\u00e9x\u00e9"  # the emulator keeps e and its mark in one cell
    s.wait(lambda lines: unicodedata.normalize("NFC", lines[-1]) == nfc)
    s.type("\r")
    s.wait(lambda lines: "SERVER>ok 0" in lines)
    quit_(s, srv)
