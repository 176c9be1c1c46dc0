"""How a chat line and a system event look. Used by serve, show, replay and tail alike.

Colors are rich styles, but a line is written as one plain string with the style's escape codes
computed once up front: printing a chat line costs a string join and a write, not a rich render
(measured: ~3 us against ~150 us for Console.print). Client text only ever reaches the terminal
through `sanitize.visible`, and it is never parsed as rich markup.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

from chatlog.sanitize import visible

# The words live in chatlog/words.py; these names are still imported from here by server.py,
# views.py and tests/test_read.py.
from chatlog.words import duration, ended_text, plural  # noqa: F401

STYLES = {
    "client": "bold cyan",
    "server": "bold magenta",
    "event": "yellow",
    "error": "bold red",
    "dim": "dim",
    "match": "bold reverse",
}


def want_color(stream: TextIO, force: bool | None = None) -> bool:
    if force is not None:
        return force
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


def _codes(style: str) -> tuple[str, str]:
    from rich.style import Style

    rendered = Style.parse(style).render("\0", color_system="standard")
    start, _, end = rendered.partition("\0")
    return start, end


# Before a line said under a handle bound to its client's certificate. A handle has no space, and
# every control character in text is escaped, so no line can make another look verified.
VERIFIED_MARK = "\u2713 "


class Renderer:
    """Writes sanitised, optionally colored lines to a stream, flushing each one."""

    def __init__(self, stream: TextIO | None = None, color: bool | None = None):
        self.stream = stream or sys.stdout
        self.color = want_color(self.stream, color)
        if self.color:
            self._codes = {role: _codes(style) for role, style in STYLES.items()}
        else:
            self._codes = {role: ("", "") for role in STYLES}

    def paint(self, role: str, text: str) -> str:
        start, end = self._codes[role]
        return f"{start}{text}{end}" if start else text

    def chat_line(self, sender: str, handle: str | None, text: str, verified: int = 0) -> str:
        role = "server" if sender == "server" else "client"
        if handle is None:
            return visible(text)
        start, end = self._codes[role]
        mark = VERIFIED_MARK if verified else ""
        return f"{mark}{start}{visible(handle)}>{end}{visible(text)}"

    def chat_lines(self, sender: str, handle: str | None, texts: list[str]) -> list[str]:
        """What `chat_line` makes of each text, for many lines of one handle: the handle made
        visible once, and the texts checked together (printable ASCII, as a room's run of plain
        lines always is, needs no escaping); any other text escaped line by line."""
        joined = "".join(texts)
        if handle is None or not (joined.isascii() and joined.isprintable()):
            return [self.chat_line(sender, handle, text) for text in texts]
        start, end = self._codes["server" if sender == "server" else "client"]
        head = f"{start}{visible(handle)}>{end}"
        return [head + text for text in texts]

    def chat(self, sender: str, handle: str | None, text: str) -> None:
        self.write(self.chat_line(sender, handle, text))

    def event(self, text: str) -> None:
        """A system event; `text` is ours, but may carry client data, so it is sanitised too."""
        self.write(self.paint("event", visible(text)))

    def write(self, line: str) -> None:
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except BrokenPipeError:
            # The reader of our output went away (`| head`); the chat goes on, unprinted.
            try:
                sys.stdout = open(os.devnull, "w")
                self.stream = sys.stdout
            except OSError:
                pass

    def prompt(self, text: str) -> str:
        """A readline prompt with the color codes marked as zero-width."""
        start, end = self._codes["server"]
        if not start:
            return text
        return f"\001{start}\002{text}\001{end}\002"
