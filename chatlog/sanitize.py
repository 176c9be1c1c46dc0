"""Make untrusted text inert for a terminal. The only place that knows which characters are dangerous.

Every renderer (server console, show, replay, tail, txt export) passes client text through
`visible()`. Control characters, invisible formatting characters and every other character that
draws as nothing (Unicode's default-ignorable code points) become backslash escapes that a person
can read: ESC is shown as `\\x1b`, a right-to-left override as `\\u202e`, a combining grapheme
joiner as `\\u034f`. Newline, carriage return and tab are shown as `\\n`, `\\r` and `\\t`, so a
message can never forge a line or overwrite one. Everything else, including backslashes and rich
markup such as `[bold]`, is left alone: it is harmless once it is printed as plain text (never as
markup).
"""

from __future__ import annotations

import re

_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}

# Unicode categories Cc (C0, DEL, C1), Cf (format: bidi embeddings, overrides and isolates,
# zero-width spaces and joiners, soft hyphen, BOM, tags...), Zl and Zp (line and paragraph
# separators) and Cs (lone surrogates, which surrogateescape produces), and every
# Default_Ignorable_Code_Point (drawn as nothing: the combining grapheme joiner, variation
# selectors, Hangul fillers, U+17B4/U+17B5, and the code points reserved as such), as inclusive
# code-point ranges. Generated from ICU's Unicode 16.0 data (Cs is the fixed block U+D800-U+DFFF;
# tests/test_sanitize.py fails when the list is stale, and prints the new one) and kept as a
# literal so importing this module costs nothing. c_client/unsafe.h is generated from this list
# (c_client/gen_unsafe.py), so the client and the server escape exactly the same characters.
UNSAFE_RANGES = [
    (0x0, 0x1F), (0x7F, 0x9F), (0xAD, 0xAD), (0x34F, 0x34F), (0x600, 0x605), (0x61C, 0x61C),
    (0x6DD, 0x6DD), (0x70F, 0x70F), (0x890, 0x891), (0x8E2, 0x8E2), (0x115F, 0x1160),
    (0x17B4, 0x17B5), (0x180B, 0x180F), (0x200B, 0x200F), (0x2028, 0x202E), (0x2060, 0x206F),
    (0x3164, 0x3164), (0xD800, 0xDFFF), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0),
    (0xFFF0, 0xFFFB), (0x110BD, 0x110BD), (0x110CD, 0x110CD), (0x13430, 0x1343F),
    (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF),
]

_UNSAFE = re.compile(
    "["
    + "".join(chr(lo) if lo == hi else f"{chr(lo)}-{chr(hi)}" for lo, hi in UNSAFE_RANGES)
    + "]"
)


def _escape(m: re.Match[str]) -> str:
    ch = m.group(0)
    named = _NAMED.get(ch)
    if named:
        return named
    cp = ord(ch)
    if cp <= 0xFF:
        return f"\\x{cp:02x}"
    if cp <= 0xFFFF:
        return f"\\u{cp:04x}"
    return f"\\U{cp:08x}"


def visible(text: str) -> str:
    """Return `text` with every control or invisible character replaced by a visible escape."""
    if text.isascii() and text.isprintable():
        return text
    return _UNSAFE.sub(_escape, text)


def visible_lines(text: str) -> str:
    """`visible` for each line of `text`, its newlines kept (lines another server formatted)."""
    if text.isascii() and text.replace("\n", " ").isprintable():
        return text
    return "\n".join(visible(line) for line in text.split("\n"))


def is_safe(text: str) -> bool:
    """True when `visible(text)` would change nothing."""
    return _UNSAFE.search(text) is None


# -- untrusted text in other places: a terminal stream, a CSV cell, HTML ------------------------

# A spreadsheet runs a cell that starts with one of these as a formula.
FORMULA_LEAD = ("=", "+", "-", "@", "\t", "\r")
_FORMULA_SET = frozenset(FORMULA_LEAD)


class TerminalSafe:
    """Wraps a terminal stream: whatever is written (raw text in CSV, say) is made visible line
    by line, so output printed to a screen cannot drive it."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write("\n".join(visible(part) for part in text.split("\n")))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def csv_safe(value):
    """A spreadsheet must not run what a client typed: formula-like text gets a leading '."""
    if isinstance(value, str) and value.startswith(FORMULA_LEAD):
        return "'" + value
    return value


def csv_cell(value) -> str:
    """One CSV cell (RFC 4180 quoting), formula-like text neutralised."""
    if value is None:
        return ""
    if not isinstance(value, str):
        return str(value)
    if value.startswith(FORMULA_LEAD):
        value = "'" + value
    if '"' in value or "," in value or "\n" in value or "\r" in value:
        return '"' + value.replace('"', '""') + '"'
    return value


def csv_plain(text: str) -> bool:
    """True when `text` is already a safe CSV cell as it stands (the fast path of big exports)."""
    return not (
        text[:1] in _FORMULA_SET or '"' in text or "," in text or "\n" in text or "\r" in text
    )


def html_text(text: str) -> str:
    """Untrusted text for an HTML page: made visible first (a bidi override or a control
    character shows as its escape instead of reordering or hiding the line), then escaped."""
    text = visible(text)
    if "&" in text or "<" in text or ">" in text or '"' in text or "'" in text:
        from html import escape

        return escape(text)
    return text
