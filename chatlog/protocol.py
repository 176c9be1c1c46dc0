"""The wire protocol: limits, the tolerant framer, and parsing and formatting lines.

No sockets here. Everything is a pure function or a small state machine fed with bytes and a clock,
so it can be unit-tested and fuzzed directly. docs/protocol.md is the prose version of this file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_HANDLE = 10  # characters
MAX_TEXT = 500  # characters
MAX_LINE = 8192  # bytes; a longer line is cut here so memory stays bounded
QUIET = 0.15  # seconds of silence that complete an unterminated burst
SERVER_HANDLE = "SERVER"
QUIT = "\\quit"

_PREFIX = re.compile(r"([^\s>]{1,%d})> ?" % MAX_HANDLE)
# A line that starts again after padding: a handle (up to 10 characters of UTF-8), `>`, text
# with no NUL, and a newline (or the end of what has arrived).
_RESUME = re.compile(rb"([^\s>\x00]{1,%d})> ?[^\x00\n]*(?:\n|$)" % (4 * MAX_HANDLE))
PADDING_KEEP = 1024  # bytes of late padding kept (the rest is counted)
_HANDLE = re.compile(r"[^\s>]{1,%d}" % MAX_HANDLE)


@dataclass(slots=True)
class Frame:
    """One received message, as bytes: the payload and everything that arrived with it."""

    payload: bytes  # the line without its terminator
    raw: bytes  # every byte this message consumed: payload, terminator, padding
    at: float  # clock time the message became complete
    cut: int = 0  # bytes dropped because the line was longer than MAX_LINE
    padding: int = 0  # not a message: this many bytes of padding that came after one (in raw, the first of them)


@dataclass(slots=True)
class Run:
    """Whole lines of one read, as the bytes they came in (`feed(..., runs=True)`): each line
    ends in "\n", or "\n\0" (a NUL only ever right after a newline), and they became complete
    at one time. `frames()` gives the Frames the framer would have returned for them (a line
    over `max_line` cut, a "\r" before the newline taken off), so a reader that takes a run
    whole (a room's burst of plain lines, which has neither) and one that takes it line by line
    see the same lines."""

    data: bytes
    count: int  # lines
    at: float
    max_line: int = MAX_LINE

    def split(self, pieces: int) -> list["Run"]:
        """This run as at most `pieces` runs of about equal size, each of whole lines (a line's
        NUL stays with it), in order: what smaller reads would have brought."""
        data, out, start = self.data, [], 0
        for k in range(1, pieces):
            cut = data.find(b"\n", max(start, len(data) * k // pieces - 1))
            if cut < 0 or cut + 1 >= len(data):
                break
            cut += 2 if data[cut + 1:cut + 2] == b"\0" else 1
            if cut >= len(data):
                break
            piece = data[start:cut]
            out.append(Run(piece, piece.count(b"\n"), self.at, self.max_line))
            start = cut
        piece = data[start:]
        out.append(Run(piece, piece.count(b"\n"), self.at, self.max_line))
        return out

    def frames(self) -> list[Frame]:
        parts = self.data.split(b"\n")
        nul = parts.pop() == b"\0"  # (the last line's NUL)
        at, limit, out = self.at, self.max_line, []
        for k in range(len(parts) - 1, -1, -1):  # from the last: a part's NUL ends the line before
            p = parts[k]
            end = b"\n\0" if nul else b"\n"
            nul = p[:1] == b"\0"
            if nul:
                p = p[1:]
            if len(p) > limit:  # as the framer cuts it: the first `limit` bytes, the rest counted
                kept = p[:limit]
                out.append(Frame(kept[:-1] if kept[-1:] == b"\r" else kept, kept, at, len(p) - limit))
            else:
                out.append(Frame(p[:-1] if p[-1:] == b"\r" else p, p + end, at))
        out.reverse()
        return out


@dataclass(slots=True)
class Message:
    """A frame parsed: who said what."""

    handle: str | None
    text: str
    raw: bytes | None  # the received bytes when they differ from the canonical form
    is_quit: bool
    cut: int = 0
    padding: int = 0  # not a message: padding bytes that followed the previous one


class Framer:
    """Splits a byte stream into messages, tolerating the many ways peers frame them.

    feed(data, now) takes one burst (one recv()) and returns the messages it completed;
    flush_if_quiet(now) completes an unterminated message once the peer has been quiet;
    deadline() says when flush_if_quiet next has something to do; spoke() tells the framer that
    our side has answered, which ends any padding.
    """

    __slots__ = (
        "quiet", "max_line", "dropped", "_buf", "_raw", "_last", "_padding", "_cutting", "_cut",
        "_pad_handle", "_late", "_late_n",
    )

    def __init__(self, quiet: float = QUIET, max_line: int = MAX_LINE):
        self.quiet = quiet
        self.max_line = max_line
        self.dropped = 0  # padding bytes that arrived after their message was already returned
        self._buf = bytearray()  # payload of the message being received
        self._raw = bytearray()  # raw bytes of the message being received (payload + extras)
        self._last = 0.0  # when the last byte arrived
        self._padding = False  # discarding padding after a NUL
        self._cutting = False  # discarding the rest of an overlong line
        self._cut = 0
        self._pad_handle: bytes | None = None  # the handle of the line the padding followed
        self._late = bytearray()  # padding that came in later bursts (the first PADDING_KEEP bytes)
        self._late_n = 0  # and how many bytes of it in all

    def deadline(self) -> float | None:
        if self._buf or self._cutting or self._late_n:
            return self._last + self.quiet
        return None

    def spoke(self) -> list[Frame]:
        """Our side answered: padding ends. Returns the late padding it leaves, if any."""
        self._padding = False
        return self._late_frame(self._last)

    def feed(self, data: bytes, now: float, runs: bool = False) -> list:
        """The messages `data` completes, in order. With `runs`, its whole lines after any that
        need the line-by-line framing (padding, a NUL not after a newline) are one `Run` (what
        its `frames()` give, without making a Frame a line)."""
        out: list = []
        if self._padding and now - self._last >= self.quiet:
            self._padding = False
            out += self._late_frame(now)
        # An unterminated line is completed by flush_if_quiet() when the peer has been quiet, never
        # here: bytes that arrive after the deadline may have waited in the kernel while the
        # reader was busy (a room relaying thousands of lines), and the line they continue must
        # not be cut in two.
        self._last = now
        i, n = 0, len(data)
        nul = data.find(b"\0")  # (found once, again only once passed: not once a line)
        if nul > 0 and not self._padding and data.count(b"\0") == data.count(b"\n\0"):
            if not (runs and self._run(data, 0, now, out)):
                self._lines(data, 0, now, out, nuls=True)  # every NUL ends a line ("\n\0", as ./chatclient sends)
            return out
        while i < n:
            if 0 <= nul < i:
                nul = data.find(b"\0", i)
            if nul < 0 and not self._padding:
                if not (runs and self._run(data, i, now, out)):
                    self._lines(data, i, now, out)  # no NUL in the rest: the usual case
                return out
            if self._padding:
                j = self._resumes_at(data, i)
                if j < 0:
                    self._attach_padding(out, data[i:], now)
                    return out
                # A well-formed line after the padding is a message, not junk.
                self._attach_padding(out, data[i:j], now)
                self._padding = False
                out += self._late_frame(now)
                i = j
                continue
            nl = data.find(b"\n", i)
            if nl < 0 and nul < 0:
                self._take(data[i:], data[i:])
                return out
            if nl < 0 or (0 <= nul < nl):
                # A NUL ends the message (if one was started) and starts padding.
                if nul > i or self._buf or self._cutting:
                    self._take(data[i:nul], data[i : nul + 1])
                    out.append(self._complete(now))
                    self._padding = True
                    self._pad_handle = _handle_of(out[-1].payload)
                    i = nul + 1
                else:
                    self._padding = True
                    i = nul
                continue
            end = nl + 1
            payload = data[i:nl]
            if end < n and data[end] == 0:
                end += 1  # "\n\0": the NUL belongs to the terminator
            self._take(payload, data[i:end])
            if self._buf.endswith(b"\r"):
                del self._buf[-1]
            out.append(self._complete(now))
            i = end
        return out

    def _lines(self, data: bytes, i: int, now: float, out: list[Frame], nuls: bool = False) -> None:
        """data[i:] holds no NUL (with `nuls`, none but right after a newline): every line in it, split at once
        (what the loop above does line by line, for the many lines of a burst), a NUL after
        its newline part of its terminator as there; an unterminated rest is held."""
        parts = (data[i:] if i else data).split(b"\n")
        tail = parts.pop()
        max_line = self.max_line
        last = len(parts) - 1
        nul = False  # this part starts with the NUL that ended the line before
        end = b"\n"
        for k, p in enumerate(parts):
            if nuls:
                if nul:
                    p = p[1:]
                nul = (parts[k + 1] if k < last else tail)[:1] == b"\0"
                end = b"\n\0" if nul else b"\n"
            if self._buf or self._cutting or len(p) > max_line:
                self._take(p, p + end)
                if self._buf.endswith(b"\r"):
                    del self._buf[-1]
                out.append(self._complete(now))
            else:
                out.append(Frame(p[:-1] if p[-1:] == b"\r" else p, p + end, now))
        if nul:
            tail = tail[1:]
        if tail:
            self._take(tail, tail)

    def _run(self, data: bytes, i: int, now: float, out: list) -> bool:
        """What `_lines` would make of data[i:], as one Run and a held rest (a line begun in an
        earlier read completed first, by `_lines`). False: no line ends in it after that."""
        last = data.rfind(b"\n", i)
        if last < 0:
            return False
        end = last + 2 if data[last + 1 : last + 2] == b"\0" else last + 1
        start = i
        if self._buf or self._cutting:  # the line held from before ends at the first newline
            nl = data.find(b"\n", i)
            start = nl + 2 if data[nl + 1 : nl + 2] == b"\0" else nl + 1
            if start >= end:
                return False
            self._lines(data[i:start], 0, now, out, nuls=True)  # (a NUL in it only after its newline)
        out.append(Run(data[start:end] if start or end < len(data) else data, data.count(b"\n", start, end), now,
                       self.max_line))
        if end < len(data):
            rest = data[end:]
            self._take(rest, rest)
        return True

    def flush_if_quiet(self, now: float) -> list[Frame]:
        if now - self._last < self.quiet:
            return []
        out = self._late_frame(now)
        if self._buf or self._cutting:
            out.append(self._complete(now))
        return out

    def flush(self, now: float) -> list[Frame]:
        """The peer closed: whatever is held is its last message."""
        self._padding = False
        out = self._late_frame(now)
        if self._buf or self._cutting:
            out.append(self._complete(now))
        return out

    def _resumes_at(self, data: bytes, i: int) -> int:
        """Where, in padding that starts at data[i], a well-formed line starts again (a line
        after a NUL, with the same handle as the line the padding followed); -1 if none does."""
        n = len(data)
        j = i
        while j < n:
            while j < n and data[j] == 0:
                j += 1
            if j >= n:
                return -1
            if j == 0 or data[j - 1] == 0:  # right after a NUL, or at the start of a burst
                m = _RESUME.match(data, j)
                if m and (self._pad_handle is None or m.group(1) == self._pad_handle):
                    if self._pad_handle is not None or _is_handle(m.group(1)):
                        return j
            j = data.find(b"\0", j)
            if j < 0:
                return -1
        return -1

    def _take(self, payload: bytes, raw: bytes) -> None:
        if self._cutting:
            self._cut += len(payload)
            return
        room = self.max_line - len(self._buf)
        if len(payload) > room:
            self._buf += payload[:room]
            self._raw += payload[:room]
            self._cut += len(payload) - room
            self._cutting = True
            return
        self._buf += payload
        self._raw += raw

    def _attach_padding(self, out: list[Frame], data: bytes, now: float) -> None:
        """Padding is kept with the message it followed; padding that comes in a later burst is
        handed on as a padding frame of its own once it ends, so nothing received vanishes."""
        if not data:
            return
        if out and not out[-1].padding:
            out[-1].raw += data
            return
        self.dropped += len(data)
        self._late_n += len(data)
        room = PADDING_KEEP - len(self._late)
        if room > 0:
            self._late += data[:room]

    def _late_frame(self, now: float) -> list[Frame]:
        if not self._late_n:
            return []
        frame = Frame(b"", bytes(self._late), now, padding=self._late_n)
        self._late.clear()
        self._late_n = 0
        return [frame]

    def _complete(self, now: float) -> Frame:
        frame = Frame(bytes(self._buf), bytes(self._raw), now, self._cut)
        self._buf.clear()
        self._raw.clear()
        self._cutting = False
        self._cut = 0
        return frame


def _handle_of(payload: bytes) -> bytes | None:
    end = payload.find(b">", 0, 4 * MAX_HANDLE + 1)
    if end <= 0:
        return None
    handle = payload[:end]
    return handle if _is_handle(handle) else None


def _is_handle(raw: bytes) -> bool:
    try:
        return valid_handle(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return False


def decode(payload: bytes) -> str:
    return payload.decode("utf-8", "replace")


def split_prefix(line: str) -> tuple[str | None, str]:
    """`handle>text` or `handle> text` gives (handle, text); a line with no prefix gives (None, line)."""
    m = _PREFIX.match(line)
    if m:
        return m.group(1), line[m.end() :]
    return None, line


def is_quit(text: str) -> bool:
    return text.strip() == QUIT


def parse(frame: Frame) -> Message:
    if frame.padding:
        return Message(None, "", frame.raw, False, 0, frame.padding)
    text = decode(frame.payload)
    handle, text = split_prefix(text)
    raw: bytes | None = frame.raw
    if handle is not None and frame.raw in (
        f"{handle}>{text}\n\0".encode(),
        f"{handle}>{text}\n".encode(),
    ):
        raw = None
    elif handle is None and frame.raw in (f"{text}\n".encode(), f"{text}\n\0".encode()):
        raw = None
    return Message(handle, text, raw, is_quit(text), frame.cut)


def valid_handle(handle: str) -> bool:
    return bool(_HANDLE.fullmatch(handle))


def format_line(handle: str, text: str) -> bytes:
    """A server line: `handle>text` and a newline."""
    return f"{handle}>{text}\n".encode()


def format_server(text: str) -> bytes:
    return format_line(SERVER_HANDLE, text)


QUIT_LINE = (QUIT + "\n").encode()


def format_client(handle: str, text: str) -> bytes:
    return f"{handle}>{text}\n\0".encode()
