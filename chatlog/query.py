"""Filters shared by `sessions`, `export`, `search` and `prune`: dates, handles, hosts.

(What a search query means is the archive's: `chatlog.archive.fts_query`.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

# A relative time: a number and a unit, optionally followed by "ago". Units are spelled out
# so that nothing is a guess: `m`/`min` are minutes, `mo` months; a capital `M` is refused.
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([a-zA-Z]+)(?:\s+ago)?$")
_UNITS = {
    "s": "seconds", "sec": "seconds", "secs": "seconds", "second": "seconds", "seconds": "seconds",
    "m": "minutes", "min": "minutes", "mins": "minutes", "minute": "minutes", "minutes": "minutes",
    "h": "hours", "hr": "hours", "hrs": "hours", "hour": "hours", "hours": "hours",
    "d": "days", "day": "days", "days": "days",
    "w": "weeks", "wk": "weeks", "week": "weeks", "weeks": "weeks",
    "mo": "months", "month": "months", "months": "months",
    "y": "years", "yr": "years", "year": "years", "years": "years",
}
_CLOCK = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2}))?$")

FORMS = (
    "now, today, yesterday, a relative time (30s, 15min or 15m, 2h, 3d, 1w, 2mo, 1y), "
    "a date (2026-11-24), a date and time ('2026-11-24 10:00', ISO 8601 with or without a zone) "
    "or a time today (14:30)"
)


class BadDate(ValueError):
    pass


def parse_when(text: str, now: datetime | None = None) -> str:
    """WHEN as the stored timestamp format (UTC ISO 8601), so it compares as a string.

    Accepts the forms in FORMS. Dates and times without a zone are local time."""
    try:
        when = _parse_when(text.strip(), now or datetime.now(UTC))
        return when.astimezone(UTC).isoformat(timespec="microseconds")
    except BadDate:
        raise
    except (ValueError, OverflowError):  # a well-formed date out of range: year 1, 10**9 weeks ago
        raise BadDate(f"invalid date {text!r} (use {FORMS})") from None


_SECONDS = {"seconds": 1, "minutes": 60, "hours": 3600, "days": 86400, "weeks": 7 * 86400}
DURATION_FORMS = "a number and a unit: 45s, 30m or 30min, 12h, 90d, 2w"


def duration_seconds(text: str) -> float:
    """A duration as a person writes it (`90d`, `12h`, `30m`, `45s`, `2w`) in seconds: the one
    reading of these, shared by retention and by `--before`/`--since` (`30d` there is 30 days
    ago). Months and years are not fixed lengths, so a duration does not take them."""
    m = _RELATIVE.match(text.strip())
    if m:
        if m.group(2) == "M":
            raise BadDate(f"ambiguous duration {text!r}: write {m.group(1)}min for minutes")
        name = _UNITS.get(m.group(2).lower())
        if name in _SECONDS:
            seconds = float(m.group(1)) * _SECONDS[name]
            if seconds < float("inf"):
                return seconds
    raise BadDate(f"invalid duration {text!r} (use {DURATION_FORMS})")


def _parse_when(value: str, now: datetime) -> datetime:
    low = value.lower()
    if low == "now":
        return now
    if low in ("today", "yesterday"):
        local = now.astimezone().replace(hour=0, minute=0, second=0, microsecond=0)
        return local - timedelta(days=1 if low == "yesterday" else 0)
    m = _RELATIVE.match(value)
    if m:
        amount, unit = float(m.group(1)), m.group(2)
        if unit == "M":
            raise BadDate(f"ambiguous date {value!r}: write {m.group(1)}min for minutes or {m.group(1)}mo for months")
        name = _UNITS.get(unit.lower())
        if name is None:
            raise ValueError(value)
        if name in ("months", "years"):
            return _months_before(now, amount * (12 if name == "years" else 1))
        return now - timedelta(seconds=duration_seconds(value.removesuffix("ago").strip()))
    m = _CLOCK.match(value)
    if m:  # a time today, local
        hour, minute, second = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
        return now.astimezone().replace(hour=hour, minute=minute, second=second, microsecond=0)
    when = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    return when.astimezone() if when.tzinfo is None else when  # naive: local time


def _months_before(now: datetime, months: float) -> datetime:
    """Calendar months back (the day clamped to the month's length); a fraction as 30-day parts."""
    whole = int(months)
    local = now.astimezone()
    total = local.year * 12 + (local.month - 1) - whole
    year, month = divmod(total, 12)
    month += 1
    import calendar

    day = min(local.day, calendar.monthrange(year, month)[1])
    return local.replace(year=year, month=month, day=day) - timedelta(days=30 * (months - whole))


@dataclass
class Filters:
    handle: str | None = None
    host: str | None = None
    since: str | None = None  # stored-format timestamps
    until: str | None = None
    ids: tuple[int, ...] = ()
    ended_only: bool = False  # leave out sessions still in progress
    verified: bool = False  # only sessions with a verified handle (a room: any participant's)
    kind: str | None = None  # "chat" or "room"
    before: int | None = None  # only sessions with an id below this (a page of a listing)
    # turned into SQL by the store: nothing above it writes SQL
