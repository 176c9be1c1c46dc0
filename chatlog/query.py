"""Filters shared by `sessions`, `export`, `search` and `prune`: dates, handles, hosts."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*(?:ago)?\s*$", re.I)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class BadDate(ValueError):
    pass


def parse_when(text: str, now: datetime | None = None) -> str:
    """A date, a date and time, an ISO timestamp, or a relative `30m`, `2h`, `3d`, `1w` (ago),
    returned as the stored timestamp format (UTC ISO 8601) so it compares as a string.
    Dates and times without a zone are local time."""
    try:
        return _parse_when(text, now or datetime.now(UTC))
    except (ValueError, OverflowError):  # a well-formed date out of range: year 1, 10**9 weeks ago
        raise BadDate(
            f"invalid date {text!r} (use YYYY-MM-DD, 'YYYY-MM-DD HH:MM', an ISO timestamp, "
            "or a relative time such as 30m, 2h, 3d, 1w)"
        ) from None


def _parse_when(text: str, now: datetime) -> str:
    m = _RELATIVE.match(text)
    if m:
        when = now - timedelta(**{_UNITS[m.group(2).lower()]: float(m.group(1))})
    else:
        value = text.strip()
        if value.lower() in ("today", "yesterday"):
            local = datetime.now().astimezone().replace(hour=0, minute=0, second=0, microsecond=0)
            when = local - timedelta(days=1 if value.lower() == "yesterday" else 0)
        else:
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
            if when.tzinfo is None:
                when = when.astimezone()  # naive: local time
    return when.astimezone(UTC).isoformat(timespec="microseconds")


@dataclass
class Filters:
    handle: str | None = None
    host: str | None = None
    since: str | None = None  # stored-format timestamps
    until: str | None = None
    ids: tuple[int, ...] = ()
    ended_only: bool = False  # leave out sessions still in progress
    # turned into SQL by the store (chatlog.archive.filter_sql): nothing above it writes SQL


def fts_query(words: str) -> str:
    """Ordinary words to an FTS5 query: each word quoted, so hyphens, quotes and operators in
    what people type are searched for rather than parsed."""
    tokens = words.split()
    return " ".join('"' + t.replace('"', '""') + '"' for t in tokens)
