"""The operator's side of the console: their input (a terminal with readline, a pipe, a file) and
the lines the server prints to them.

- **A terminal**: a helper thread runs `input()` (readline editing) only while an answer is
  wanted, and hands each line to the loop through a socket pair. What was typed before the
  prompt appeared is discarded, and the operator is told: a line never answers a message the
  operator has not seen. A line printed while the operator is typing clears the prompt line,
  then the prompt and what was typed so far are drawn again.
- **A pipe**: read by the loop as it arrives (a bounded backlog), one line per answer, so a
  script of replies is consumed in order; its end is known at once, even with no client.
- **A regular file** (which epoll cannot watch, and which never blocks): read directly whenever
  the backlog runs low.
- **Nobody** (`--no-operator`, stdin /dev/null, or started in the background: `unattended`):
  nothing is read, ever.

`Console` writes the server's lines; a console that fails (a full disk, a hung-up terminal) is
said once on stderr and then left alone: the chat goes on and is still recorded.
"""

from __future__ import annotations

import os
import selectors
import socket
import stat
import sys
import threading
import time
from collections import deque
from typing import TextIO

from chatlog.events import OperatorEnd, OperatorLine

READ_SIZE = 65536
BACKLOG = 256  # piped lines read ahead of need, at most


def _pollable(fd: int) -> bool:
    """Whether epoll (the selector) accepts this descriptor."""
    sel = selectors.DefaultSelector()
    try:
        sel.register(fd, selectors.EVENT_READ)
        return True
    except (PermissionError, OSError, ValueError):
        return False
    finally:
        sel.close()


def unattended(stream) -> str | None:
    """Why nobody can be at the console (None: someone may be). Nobody is when the operator's
    input is /dev/null (as under systemd, or `nohup ... </dev/null`) or a terminal whose
    foreground process group is not ours (started with `&`: reading it would stop us with
    SIGTTIN). A closed stdin, a pipe or a file is a script: its end stops the server."""
    try:
        fd = stream.fileno()
        st = os.fstat(fd)
    except (AttributeError, ValueError, OSError):
        return None
    try:
        null = os.stat(os.devnull)
    except OSError:
        null = None
    if null is not None and stat.S_ISCHR(st.st_mode) and st.st_rdev == null.st_rdev:
        return "its input is /dev/null"
    if os.isatty(fd):
        try:
            if os.tcgetpgrp(fd) != os.getpgrp():
                return "it was started in the background"
        except OSError:
            pass  # a terminal that is not ours to control: read it like any other
    return None


class Console:
    """Writes whole lines to the operator's screen (or wherever stdout goes).

    The loop's lines of one pass are written once, at the end of the pass (`flush`), by the loop
    itself when the console can take them at once: a few bytes that a pipe, a file or a terminal
    accepts without blocking (poll says writable, and at most PIPE_BUF). Otherwise they go
    through a bounded queue to a writer thread, so a console that stalls (a pipe nobody reads, a
    terminal paused with Ctrl-S) never stalls the chat: past the bound, lines are counted, not
    shown, and the count is said once the console catches up (every line is in the store). Once
    the thread has lines, every line goes through it, in order, until it is idle again.
    """

    MAX_QUEUED = 10_000
    EVERY = 0.01  # seconds: under load, a pass's lines wait at most this long for the next pass's
    DIRECT_MAX = 4096  # bytes written by the loop itself (PIPE_BUF: a pipe takes them whole)

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self.operator: Operator | None = None  # set when a terminal prompt may be on screen
        self.failed = False
        self._batch: list[str] = []  # this pass's lines (the loop's thread only)
        self._after: list = []  # called once they are written (`after_written`)
        self._written = 0.0  # when lines were last written (time.time)
        self._poll = None
        self._fd: int | None = None  # written with os.write, past the text layer's buffer
        self._encoding = getattr(self.stream, "encoding", None) or "utf-8"
        try:
            import select

            self.stream.flush()
            self._fd = self.stream.fileno()
            self._poll = select.poll()
            self._poll.register(self._fd, select.POLLOUT)
        except (AttributeError, OSError, ValueError):
            self._poll = None  # not a real file: always through the thread, with the stream
            self._fd = None
        self._lines: deque[str] = deque()
        self._skipped = 0
        self._cv = threading.Condition()
        self._closing = False
        self._busy = False  # the writer thread is writing
        self._redraw = False  # draw the prompt again, with or without lines
        self._thread = threading.Thread(target=self._run, name="console", daemon=True)
        self._thread.start()

    def write(self, line: str) -> None:
        """A line, written at the end of the pass (`flush`)."""
        self._batch.append(line)

    def extend(self, lines: list[str]) -> None:
        """Lines, written at the end of the pass (`flush`)."""
        self._batch.extend(lines)

    def after_written(self, fn) -> None:
        """Call `fn` at the end of this pass's `flush`, once its lines are on screen or queued
        for the writer thread (whose `wait_written` then waits for them): a prompt asked for
        now is drawn below what the pass says, never above it."""
        self._after.append(fn)

    def flush_due(self, now: float) -> None:
        """The end of a pass: its lines are written if the last write was EVERY ago or more (or
        a prompt waits on them); else they go with the next pass's, by `due` at the latest. So a
        busy chat writes its console a hundred times a second, not at every line: each write
        wakes whoever reads it (a pipe's reader, a terminal), on the chat's cores."""
        if (self._batch and now >= self._written + self.EVERY) or self._after:
            self.flush(now)

    @property
    def due(self) -> float | None:
        """When the lines `flush_due` held are written (None: it holds none)."""
        return self._written + self.EVERY if self._batch else None

    def flush(self, now: float | None = None) -> None:
        """Write this pass's lines: at once if the console takes them without blocking and the
        thread has nothing queued, else through the thread. Then what waited for them."""
        try:
            self._flush(time.time() if now is None else now)
        finally:
            if self._after:
                after, self._after = self._after, []
                for fn in after:
                    fn()

    def _flush(self, now: float) -> None:
        if not self._batch or self.failed:
            self._batch.clear()
            return
        self._written = now
        lines, self._batch = self._batch, []
        # Read without the lock: only this thread adds lines, and a thread finishing just now
        # at worst sends these through it too. Written here, they are on screen before the loop
        # goes on (so before any prompt it asks for).
        if not (self._lines or self._busy or self._skipped) and self._takes_now(lines):
            self._emit(lines)
            return
        with self._cv:
            room = self.MAX_QUEUED - len(self._lines)
            if room < len(lines):
                self._skipped += len(lines) - max(room, 0)
                lines = lines[:max(room, 0)]
            self._lines.extend(lines)
            self._cv.notify()

    def _takes_now(self, lines: list[str]) -> bool:
        if self._poll is None or sum(len(x) for x in lines) * 4 + 256 > self.DIRECT_MAX:
            return False
        try:
            return bool(self._poll.poll(0))
        except OSError:
            return False

    def post(self, line: str) -> None:
        """A line from another thread (the retention thread): through the writer thread, in
        order after what is queued, bounded as the loop's lines are."""
        with self._cv:
            if len(self._lines) >= self.MAX_QUEUED:
                self._skipped += 1
            else:
                self._lines.append(line)
            self._cv.notify()

    def redraw(self) -> None:
        """Draw the operator's prompt again (it is wanted again while input() is waiting)."""
        with self._cv:
            self._redraw = True
            self._cv.notify()

    def wait_written(self, timeout: float = 1.0) -> None:
        """Block until every line flushed so far is on screen (before a prompt is drawn)."""
        with self._cv:
            self._cv.wait_for(lambda: not self._lines and not self._busy, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (waiting at most `timeout` for a stalled console), then stop."""
        lines, self._batch = self._batch, []
        with self._cv:
            self._lines.extend(lines)
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._lines and not self._skipped and not self._closing and not self._redraw:
                    self._cv.wait()
                redraw, self._redraw = self._redraw, False
                lines = list(self._lines)
                self._lines.clear()
                skipped, self._skipped = self._skipped, 0
                closing = self._closing
                self._busy = True
            if skipped:
                lines.append(f"({skipped} console lines not shown: the console was not keeping up; all are recorded)")
            try:
                if (lines or redraw) and not self.failed:
                    self._emit(lines)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()
            if closing:
                with self._cv:
                    if not self._lines:
                        return

    def _emit(self, lines: list[str]) -> None:
        op = self.operator
        try:
            if op is not None and op.reading:
                # The prompt is drawn again below the lines only while input is wanted: never
                # after the last line (a stray prompt before the shell's), nor while the
                # client has the turn (what was typed is drawn again with the prompt).
                text = "\r\x1b[K" + "".join(line + "\n" for line in lines)
                text += op.prompt + op.typed() if op._wanted else ""
            elif lines:
                text = "\n".join(lines) + "\n"
            else:
                return
            if self._fd is None:
                self.stream.write(text)
                self.stream.flush()
            else:
                data = memoryview(text.encode(self._encoding, "replace"))
                while data:
                    data = data[os.write(self._fd, data):]
        except BrokenPipeError:
            self._silence()  # the reader of our output went away (`| head`): chat on, unprinted
        except (OSError, ValueError) as exc:
            self._silence()
            try:
                sys.stderr.write(
                    f"chatlog: cannot write to the console ({getattr(exc, 'strerror', None) or exc}); "
                    "the chat goes on and is still recorded\n"
                )
                sys.stderr.flush()
            except (OSError, ValueError):
                pass

    def _silence(self) -> None:
        self.failed = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self.stream.fileno())
            finally:
                os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass


class Operator:
    """The operator's lines, one per answer wanted."""

    def __init__(self, stream, console: Console, prompt: str = "SERVER>", color_prompt: str | None = None):
        self.stream = stream
        self.console = console
        self.prompt = color_prompt or prompt  # as drawn on screen (with colour codes)
        self._rl_prompt = prompt if color_prompt is None else color_prompt
        self.lines: deque[str] = deque()
        self.eof = False  # the input has ended (what is in `lines` is still to be used)
        self.absent = stream is None  # nobody is at the console: nothing is ever read
        self.tty = not self.absent and stream.isatty()
        self.reading = False  # the terminal thread is inside input(): a prompt is on screen
        self.discarded = 0  # lines thrown away because they were typed before their prompt
        self._partial = b""
        self._wanted = False
        self._commands = False  # only a command is wanted (nobody is being served)
        self._stale = False  # the line being typed was begun before the message it would answer
        self._told_end = False  # the end of the input was handed on
        if self.tty:
            self._rsock, self._wsock = socket.socketpair()
            self._rsock.setblocking(False)
            self._request = threading.Event()
            self._lock = threading.Lock()
            self._events: deque[tuple[str, str | None]] = deque()
            self._thread = threading.Thread(target=self._read_terminal, daemon=True)
            self._thread.start()
            self.fd: int | None = self._rsock.fileno()
            console.operator = self
        elif self.absent:
            self.fd = None
        else:
            fd = stream.fileno()
            if _pollable(fd):
                os.set_blocking(fd, False)
                self.fd = fd
            else:
                self.fd = None  # a file: read directly
            self._ifd = fd

    # -- what the loop calls -------------------------------------------------------------------

    def events(self):
        """The operator's lines while answers are wanted (the loop carries out each before the
        next is taken), then, once, the end of the input: OperatorLine and OperatorEnd events."""
        while True:
            self.fill()
            line = self.take()
            if line is not None:
                yield OperatorLine(line, time.time())
                self.rearm()
                continue
            if self.ended and not self._told_end:
                self._told_end = True  # once: the policy decides when that ends the chat
                yield OperatorEnd(time.time())
            return

    def may_have_events(self) -> bool:
        """False when `events()` would yield nothing now (it is not started then: a pass of a
        busy chat asks every time)."""
        if self.fd is None:
            return True  # (a file: events() reads it as it goes)
        return bool(self._wanted and self.lines) or (self.ended and not self._told_end)

    def want(self, on: bool, commands: bool = False) -> None:
        """An answer is (or is no longer) wanted; `commands`: only a command is (nobody is
        being served): a terminal shows the prompt, a script's next line is taken only if it is
        a command, so its answers still wait for their client."""
        self._wanted = on
        self._commands = on and commands
        if not (on and self.tty):
            return
        if self.reading:
            # A prompt is already on screen from before the message was shown: whatever is
            # typed there now was typed before the operator saw what it would answer.
            # Typed means in the line editor's buffer, or still in the terminal's input queue:
            # on a busy machine the reading thread may not have taken the keystrokes yet.
            if not commands:
                self._stale = bool(self.typed()) or unread(self.stream)
            self.console.redraw()
        else:
            self._request.set()

    def watch(self) -> bool:
        """Whether the loop should watch `fd` now."""
        if self.fd is None:
            return False
        if self.tty:
            return True
        return not self.eof and len(self.lines) < BACKLOG

    def read_available(self) -> list[str]:
        """Read what has arrived; returns notes for the console (e.g. discarded type-ahead)."""
        if self.tty:
            return self._collect_terminal()
        if self.eof:
            return []
        try:
            data = os.read(self._ifd, READ_SIZE)
        except BlockingIOError:
            return []
        except OSError:
            data = b""
        if not data:
            self.eof = True
            if self._partial:
                self.lines.append(self._decode(self._partial))
                self._partial = b""
            return []
        chunks = (self._partial + data).split(b"\n")
        self._partial = chunks.pop()
        self.lines.extend(self._decode(c) for c in chunks)
        return []

    def fill(self) -> None:
        """A file is read directly, a chunk at a time, whenever the backlog runs low."""
        while self.fd is None and not self.tty and not self.absent and not self.eof and len(self.lines) < BACKLOG:
            self.read_available()

    def rearm(self) -> None:
        """After a line was used: if answers are still wanted (a room), prompt for the next."""
        if self.tty and self._wanted and not self.reading and not self.eof:
            self.console.after_written(self._request.set)  # below what the line made the console say

    def take(self) -> str | None:
        """The next line, if an answer is wanted and one is there."""
        if self._wanted and self.lines:
            if self._commands and not self.tty and not self.lines[0].lstrip().startswith("\\"):
                return None  # a scripted answer: it waits for its client
            return self.lines.popleft()
        return None

    @property
    def ended(self) -> bool:
        """The input has ended and every line of it has been used."""
        return self.eof and not self.lines

    def typed(self) -> str:
        try:
            import readline

            return readline.get_line_buffer()
        except (ImportError, AttributeError):
            return ""

    @staticmethod
    def _decode(line: bytes) -> str:
        return line.rstrip(b"\r").decode("utf-8", "replace")

    # -- the terminal --------------------------------------------------------------------------

    def _collect_terminal(self) -> list[str]:
        try:
            self._rsock.recv(4096)
        except BlockingIOError:
            pass
        notes = []
        with self._lock:
            while self._events:
                kind, value = self._events.popleft()
                if kind == "flushed":
                    self.discarded += 1
                    notes.append("(discarded what was typed before the prompt appeared)")
                elif kind == "eof":
                    self.eof = True
                elif kind == "line" and value is not None:
                    if not self._wanted:
                        # Entered at a prompt that was withdrawn (a client came, or left): it
                        # answers nobody's message the operator has seen.
                        self.discarded += 1
                        notes.append("(discarded a line entered while no answer was wanted; wait for the prompt)")
                    elif self._stale:
                        self._stale = False
                        self.discarded += 1
                        notes.append("(discarded a line begun before the message it would answer; type it again)")
                        if self._wanted:  # prompted again below the note, once it is written
                            self.console.after_written(self._request.set)
                    else:
                        self.lines.append(value)
        return notes

    def _post(self, kind: str, value: str | None = None) -> None:
        with self._lock:
            self._events.append((kind, value))
        try:
            self._wsock.send(b"x")
        except OSError:
            pass

    def _read_terminal(self) -> None:
        try:
            import readline  # noqa: F401  (line editing for input())
        except ImportError:
            pass
        fd = self.stream.fileno()
        while True:
            self._request.wait()
            self._request.clear()
            if _discard_typeahead(fd):
                self._post("flushed")
            self.console.wait_written()  # the message this prompt answers is on screen first
            self.reading = True
            try:
                line = input(self._rl_prompt)
            except EOFError:
                line = None
            except Exception:
                line = None
            self.reading = False
            if line is None:
                self._post("eof")
                return
            self._post("line", line)


def _discard_typeahead(fd: int) -> bool:
    """Throw away what was typed at the terminal while no prompt was shown; True if there was any."""
    try:
        import fcntl
        import struct
        import termios

        pending = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
        termios.tcflush(fd, termios.TCIFLUSH)
        return pending > 0
    except (ImportError, OSError):
        return False


def unread(stream) -> bool:
    """Whether keystrokes wait in a terminal's input queue, not yet read by anyone."""
    import fcntl
    import struct
    import termios

    try:
        return struct.unpack("i", fcntl.ioctl(stream.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0] > 0
    except (OSError, ValueError):
        return False
