"""Make untrusted text inert for a terminal. The only place that knows which characters are dangerous.

Every renderer (server console, show, replay, tail, txt export) passes client text through
`visible()`. Control characters and invisible formatting characters become backslash escapes that
a person can read: ESC is shown as `\\x1b`, a right-to-left override as `\\u202e`. Newline, carriage
return and tab are shown as `\\n`, `\\r` and `\\t`, so a message can never forge a line or overwrite
one. Everything else, including backslashes and rich markup such as `[bold]`, is left alone: it is
harmless once it is printed as plain text (never as markup).
"""

from __future__ import annotations

import re

_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}

# Unicode categories Cc (C0, DEL, C1), Cf (format: bidi embeddings, overrides and isolates,
# zero-width spaces and joiners, soft hyphen, BOM, tags...), Zl and Zp (line and paragraph
# separators) and Cs (lone surrogates, which surrogateescape produces). Generated from
# unicodedata (Unicode 14) and kept as a literal so importing this module costs nothing.
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\xad\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891\u08e2\u180e"
    "\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ud800-\udfff\ufeff\ufff9-\ufffb"
    "\U000110bd\U000110cd\U00013430-\U00013438\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
    "\U000e0001\U000e0020-\U000e007f]"
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
    import html

    return html.escape(visible(text))
