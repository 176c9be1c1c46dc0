"""What the read commands print: session listings, a transcript, search hits, stats.

A transcript is produced once, by `transcript()`, as timed lines that look exactly like the server
console; show, replay, tail, the text export and the cast export all use it. Output to a pipe is
plain and stable and does not import rich; a terminal gets rich tables and colors.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable, Iterator
from datetime import UTC

from chatlog.render import Renderer, connected_text, ended_text
from chatlog.sanitize import visible
from chatlog.records import HL_END, HL_START, Msg, Session, parse_iso


def fmt_time(value: str | None, utc: bool = False) -> str:
    if not value:
        return ""
    when = parse_iso(value)
    if utc:
        return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def session_dict(s: Session) -> dict:
    return {
        "id": s.id,
        "started_at": s.started_at,
        "served_at": s.served_at,
        "ended_at": s.ended_at,
        "duration_seconds": s.duration,
        "client_host": s.client_host,
        "client_port": s.client_port,
        "server_host": s.server_host,
        "server_port": s.server_port,
        "handle": s.handle,
        "end_reason": s.end_reason,
        "client_messages": s.client_messages,
        "server_messages": s.server_messages,
    }


def transcript_items(s: Session, messages: Iterable[Msg]) -> Iterator[tuple[str, str, str | None, str]]:
    """(kind, timestamp, handle, text) for a whole session, kind being client, server, event or
    note; the text is raw (untrusted) and each output escapes it its own way."""
    yield "event", s.served_at or s.started_at, None, connected_text(s.client_host, s.client_port)
    counts = {"client": 0, "server": 0}
    last = s.started_at
    for m in messages:
        counts[m.sender] = counts.get(m.sender, 0) + 1
        last = m.at
        yield ("server" if m.sender == "server" else "client"), m.at, m.handle, m.text
        if m.note:
            yield "note", m.at, None, f"({m.note})"
    if s.end_reason:
        line = ended_text(s.end_reason, s.id, counts["client"], counts["server"])
        yield "event", s.ended_at or last, None, line


def transcript(s: Session, messages: Iterable[Msg], r: Renderer) -> Iterator[tuple[str, str]]:
    """(timestamp, console line) for a whole session, as the server console showed it."""
    for kind, when, handle, text in transcript_items(s, messages):
        if kind in ("client", "server"):
            yield when, r.chat_line(kind, handle, text)
        else:
            yield when, r.paint("dim" if kind == "note" else "event", visible(text))


def header_lines(s: Session, utc: bool = False) -> list[str]:
    who = visible(s.handle) if s.handle else "(no handle)"
    lines = [f"Session {s.id}: {who} from {s.client_host} port {s.client_port}"]
    when = f"Started {fmt_time(s.started_at, utc)}"
    if s.served_at and s.served_at != s.started_at:
        when += f", served {fmt_time(s.served_at, utc)}"
    if s.ended_at:
        when += f", ended {fmt_time(s.ended_at, utc)} after {fmt_duration(s.duration)}"
    lines.append(when)
    lines.append(
        f"{s.client_messages} from the client, {s.server_messages} from the server; "
        f"{'ended: ' + s.end_reason if s.end_reason else s.state}"
    )
    return lines


def show(s: Session, messages: Iterable[Msg], r: Renderer, utc: bool = False) -> None:
    for line in header_lines(s, utc):
        r.write(r.paint("dim", line))
    r.write("")
    for _, line in transcript(s, messages, r):
        r.write(line)


# -- sessions ---------------------------------------------------------------------------------

COLUMNS = ["id", "started", "duration", "client", "handle", "messages", "ended"]


def session_row(s: Session, utc: bool) -> list[str]:
    return [
        str(s.id),
        fmt_time(s.started_at, utc),
        fmt_duration(s.duration),
        f"[{s.client_host}]:{s.client_port}" if ":" in (s.client_host or "") else f"{s.client_host}:{s.client_port}",
        visible(s.handle) if s.handle else "",
        str(s.messages),
        s.state,
    ]


def sessions_table(rows: list[Session], utc: bool, out=None) -> None:
    out = out or sys.stdout
    cells = [session_row(s, utc) for s in rows]
    if out.isatty():
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        table = Table(box=None, header_style="bold", pad_edge=False)
        for name in COLUMNS:
            table.add_column(name, justify="right" if name in ("id", "messages") else "left")
        for row in cells:
            table.add_row(*(Text(c) for c in row))  # Text: never parsed as markup
        Console(file=out).print(table)
        return
    widths = [max(len(c[i]) for c in [COLUMNS, *cells]) for i in range(len(COLUMNS))]
    for row in [COLUMNS, *cells]:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


def sessions_json(rows: list[Session], out=None) -> None:
    out = out or sys.stdout
    json.dump([session_dict(s) for s in rows], out, indent=2)
    out.write("\n")


def sessions_csv(rows: list[Session], out=None) -> None:
    from chatlog.export import TerminalSafe, safe_cell

    out = out or sys.stdout
    if out.isatty():  # a handle may hold an escape sequence: never send it to a screen raw
        out = TerminalSafe(out)
    w = csv.writer(out, lineterminator="\n")
    fields = list(session_dict(rows[0]).keys()) if rows else []
    w.writerow(fields)
    for s in rows:
        w.writerow([safe_cell(v) for v in session_dict(s).values()])


# -- search -----------------------------------------------------------------------------------


def highlighted(marked: str, r: Renderer) -> str:
    """Sanitised text with the matches (between HL marks) in the match style."""
    out = []
    rest = marked
    while HL_START in rest:
        before, _, rest = rest.partition(HL_START)
        match, _, rest = rest.partition(HL_END)
        out.append(visible(before))
        out.append(r.paint("match", visible(match)) if r.color else f"[{visible(match)}]")
    out.append(visible(rest))
    return "".join(out)


def search_hits(hits: list[tuple[Msg, str]], r: Renderer, utc: bool = False) -> None:
    for m, marked in hits:
        who = visible(m.handle) if m.handle else ""
        prefix = f"{m.session_id:>5}  {fmt_time(m.at, utc)}  "
        role = "server" if m.sender == "server" else "client"
        r.write(prefix + r.paint(role, f"{who}>") + highlighted(marked, r))


def search_json(hits: list[tuple[Msg, str]], out=None) -> None:
    from chatlog.export import message_dict

    out = out or sys.stdout
    json.dump([message_dict(m) for m, _ in hits], out, indent=2)
    out.write("\n")


def stats_text(st: dict, r: Renderer) -> None:
    avg = st["average_session_seconds"]
    r.write(f"sessions          {st['sessions']}")
    r.write(f"messages          {st['messages']}")
    r.write(f"distinct handles  {st['handles']}")
    r.write(f"distinct hosts    {st['hosts']}")
    r.write(f"average session   {fmt_duration(avg) if avg is not None else '-'}")
    if st["first_session"]:
        r.write(f"first / last      {fmt_time(st['first_session'])} / {fmt_time(st['last_session'])}")
    if st["busiest_handles"]:
        r.write("busiest handles")
        for b in st["busiest_handles"]:
            r.write(f"  {visible(b['handle']):<12} {b['messages']:>7} messages in {b['sessions']} session{'' if b['sessions'] == 1 else 's'}")
    if st["end_reasons"]:
        r.write("how sessions ended")
        for reason, n in st["end_reasons"].items():
            r.write(f"  {reason:<12} {n:>7}")
