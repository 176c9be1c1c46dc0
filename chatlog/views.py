"""What the read commands print: session listings, a transcript, search hits, stats.

A transcript comes from `chatlog.transcript` (the one read model); `console_lines` turns its
events into the lines the server console shows, for show, replay, tail, the text export and the
cast. Output to a pipe is plain and stable and does not import rich; a terminal gets rich tables
and colors. Untrusted text is made safe only through `chatlog.sanitize`.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import sys
from collections.abc import Iterable, Iterator
from datetime import UTC

from chatlog import transcript
from chatlog.render import Renderer, duration, plural
from chatlog.sanitize import TerminalSafe, csv_safe, visible
from chatlog.transcript import Event, stamp

from chatlog.records import HL_END, HL_START, Msg, Session



def fmt_time(value: str | None, utc: bool = False) -> str:
    if not value:
        return ""
    when = transcript.parse_time(value)
    if when is None:
        return visible(value)
    if utc:
        return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def session_duration(s: Session) -> float | None:
    return transcript.seconds_between(s.started_at, s.ended_at)


def session_dict(s: Session) -> dict:
    return {
        "id": s.id,
        "started_at": s.started_at,
        "served_at": s.served_at,
        "ended_at": s.ended_at,
        "duration_seconds": session_duration(s),
        "client_host": s.client_host,
        "client_port": s.client_port,
        "server_host": s.server_host,
        "server_port": s.server_port,
        "handle": s.handle,
        "end_reason": s.end_reason,
        "client_messages": s.client_messages,
        "server_messages": s.server_messages,
        "kind": s.kind,
        "participants": s.participants,
        "transport": s.transport,
        "tls_version": s.tls_version,
        "tls_cipher": s.tls_cipher,
        "cert_fingerprint": s.cert_fingerprint,
        "verified": bool(s.verified),
    }


def message_dict(m: Msg) -> dict:
    d = {
        "id": m.id,
        "session_id": m.session_id,
        "seq": m.seq,
        "at": m.at,
        "sender": m.sender,
        "handle": m.handle,
        "text": m.text,
        "verified": bool(m.verified),
    }
    if m.raw is not None:
        d["raw_base64"] = base64.b64encode(m.raw).decode("ascii")
    if m.note:
        d["note"] = m.note
    d["verified"] = bool(m.verified)
    if m.removed_at is not None:
        d["removed_at"] = m.removed_at
    return d


# -- a transcript -----------------------------------------------------------------------------


def console_line(ev: Event, r: Renderer) -> str:
    """An event as the server console shows it (sanitised, colored if `r` colors)."""
    if ev.kind == transcript.MESSAGE:
        return r.chat_line(ev.sender or "client", ev.handle, ev.text, ev.verified)
    return r.paint("dim" if ev.kind == transcript.NOTE else "event", visible(ev.text))


def console_lines(
    evs: Iterable[Event], r: Renderer, timestamps: bool = False, utc: bool = False
) -> Iterator[tuple[str, str]]:
    """(timestamp, console line) for each event; with `timestamps`, `[20:09:14] ` before each."""
    if not timestamps:
        for ev in evs:
            yield ev.at, console_line(ev, r)
        return
    second = shown = None
    for ev in evs:
        if ev.at[:19] != second:  # a stamp depends only on the second (many lines share one)
            second, shown = ev.at[:19], r.paint("dim", stamp(ev.at, utc))
        yield ev.at, shown + console_line(ev, r)


def header_lines(s: Session, utc: bool = False) -> list[str]:
    if s.kind == "room":
        lines = [f"Session {s.id}: a room on port {s.server_port}, {plural(s.participants, 'participant')}"]
    else:
        who = visible(s.handle) if s.handle else "(no handle)"
        lines = [f"Session {s.id}: {who} from {s.client_host} port {s.client_port}"]
    when = f"Started {fmt_time(s.started_at, utc)}"
    if s.served_at and s.served_at != s.started_at:
        waited = transcript.seconds_between(s.started_at, s.served_at)
        when += f", waited {duration(waited)}, chat began {fmt_time(s.served_at, utc)}"
    if s.ended_at:
        when += f", ended {fmt_time(s.ended_at, utc)} after {duration(session_duration(s))}"
    lines.append(when)
    who = "the participants" if s.kind == "room" else "the client"
    how = transport_line(s)
    if how:
        lines.append(how)
    lines.append(
        f"{plural(s.client_messages, 'message')} from {who}, {s.server_messages} from the server; "
        f"{'ended: ' + s.end_reason if s.end_reason else s.state}"
    )
    # Every field, not only the handle: an archive from elsewhere is untrusted as a whole (its
    # hosts and end reasons reached the terminal raw). Escapes are left as they are.
    return [visible(line) for line in lines]


def transport_line(s: Session) -> str:
    """How a 1:1 client was connected (`transport: tls (TLSv1.3, CIPHER), certificate SHA256:...,
    handle verified`); for a room, whether any participant's handle was verified (each
    participant has its own transport)."""
    if s.kind == "room":
        return "participants: a verified handle among them" if s.verified else ""
    line = f"transport: {s.transport}"
    details = ", ".join(x for x in (s.tls_version, s.tls_cipher) if x)
    if details:
        line += f" ({details})"
    if s.cert_fingerprint:
        line += f", certificate {s.cert_fingerprint}"
    return line + (", handle verified" if s.verified else "")


def show(
    s: Session, messages: Iterable[Msg], r: Renderer, utc: bool = False, timestamps: bool = False
) -> None:
    """The header and the whole transcript, written in batches (not a flush a line: on a large
    session that was half the time)."""
    out = r.stream
    batch = [r.paint("dim", line) for line in header_lines(s, utc)]
    batch.append("")
    for _, line in console_lines(transcript.events(s, messages), r, timestamps, utc):
        batch.append(line)
        if len(batch) >= 1024:
            batch.append("")
            out.write("\n".join(batch))
            batch.clear()
    batch.append("")
    out.write("\n".join(batch))
    out.flush()


def show_json(s: Session, messages: Iterable[Msg], where: dict | None = None, out=None) -> None:
    """A session and its messages as one JSON document (as `export -f json` writes each session;
    a room's lines with the address of who said each), written as it is read."""
    out = out or sys.stdout
    head = json.dumps(session_dict(s), indent=2)
    out.write(head[:-2] + ',\n  "messages": [')
    for i, m in enumerate(messages):
        d = message_dict(m)
        if where is not None and m.seq in where:
            d["host"], d["port"] = where[m.seq]
        out.write(("," if i else "") + "\n    " + json.dumps(d))
    out.write("\n  ]\n}\n")


# -- sessions ---------------------------------------------------------------------------------

COLUMNS = ["id", "started", "duration", "client", "handle", "messages", "ended"]


def address(host: str | None, port: int | None) -> str:
    return f"[{host}]:{port}" if ":" in (host or "") else f"{host}:{port}"


def session_row(s: Session, utc: bool) -> list[str]:
    room = s.kind == "room"
    row = [
        str(s.id),
        fmt_time(s.started_at, utc),
        duration(session_duration(s)),
        f"room :{s.server_port}" if room else address(s.client_host, s.client_port),
        plural(s.participants, "participant") if room else (s.handle or ""),
        str(s.messages),
        s.state,
    ]
    # Every cell: in an archive from elsewhere any column may hold text (SQLite keeps what it
    # is given, even in an integer column).
    return [visible(cell) for cell in row]


def table(columns: list[str], cells: list[list[str]], right: Iterable[str] = (), out=None) -> None:
    """Aligned columns: rich at a terminal, plain spaces into a pipe. Cells are already safe."""
    out = out or sys.stdout
    right = set(right)
    if out.isatty():
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        t = Table(box=None, header_style="bold", pad_edge=False)
        for name in columns:
            t.add_column(name, justify="right" if name in right else "left")
        for row in cells:
            t.add_row(*(Text(c) for c in row))  # Text: never parsed as markup
        Console(file=out).print(t)
        return
    widths = [max(len(c[i]) for c in [columns, *cells]) for i in range(len(columns))]
    for row in [columns, *cells]:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


def sessions_table(rows: list[Session], utc: bool, out=None) -> None:
    table(COLUMNS, [session_row(s, utc) for s in rows], ("id", "messages"), out)


def dump_json(value, out=None) -> None:
    out = out or sys.stdout
    json.dump(value, out, indent=2)
    out.write("\n")


def sessions_json(rows: list[Session], out=None) -> None:
    dump_json([session_dict(s) for s in rows], out)


SESSION_FIELDS = list(session_dict(Session(0, "", None, None, None, None, None, None, None, None, 0, 0)))


def write_csv(fields: list[str], rows: Iterable[dict], out=None) -> None:
    """A CSV table with its header (also when there are no rows), formula-like cells
    neutralised; on a terminal, escapes are made visible."""
    out = out or sys.stdout
    if out.isatty():  # a handle may hold an escape sequence: never send it to a screen raw
        out = TerminalSafe(out)
    w = csv.writer(out, lineterminator="\n")
    w.writerow(fields)
    for row in rows:
        w.writerow([csv_safe(row.get(f)) for f in fields])


def sessions_csv(rows: list[Session], out=None) -> None:
    write_csv(SESSION_FIELDS, (session_dict(s) for s in rows), out)


# -- search -----------------------------------------------------------------------------------

HIT_FIELDS = ["session_id", "seq", "at", "sender", "handle", "text", "raw_base64", "note", "id", "verified",
              "removed_at"]


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
    dump_json([message_dict(m) for m, _ in hits], out)


def search_csv(hits: list[tuple[Msg, str]], out=None) -> None:
    write_csv(HIT_FIELDS, (message_dict(m) for m, _ in hits), out)


# -- stats ------------------------------------------------------------------------------------


def stats_text(st: dict, r: Renderer) -> None:
    avg = st["average_session_seconds"]
    r.write(f"sessions          {st['sessions']}")
    messages = f"messages          {st['messages']}"
    if "client_messages" in st:
        messages += f" ({st['client_messages']} from clients, {st['server_messages']} answers)"
    r.write(messages)
    r.write(f"distinct handles  {st['handles']}")
    r.write(f"distinct hosts    {st['hosts']}")
    r.write(f"average session   {duration(avg) if avg is not None else '-'}")
    if st["first_session"]:
        r.write(f"first / last      {fmt_time(st['first_session'])} / {fmt_time(st['last_session'])}")
    if st["busiest_handles"]:
        r.write("busiest handles")
        for b in st["busiest_handles"]:
            name = visible(b["handle"])
            if "said" in b:  # what the handle said, apart from the answers it got
                what = f"said {plural(b['said'], 'message')}, got {plural(b.get('answers', 0), 'answer')}"
            else:
                what = plural(b["messages"], "message")
            r.write(f"  {name:<12} {what} in {plural(b['sessions'], 'session')}")
    if st.get("refused_connections"):
        r.write(f"refused           {plural(st['refused_connections'], 'connection')}")
    if st["end_reasons"]:
        r.write("how sessions ended")
        for reason, n in st["end_reasons"].items():
            r.write(f"  {visible(reason):<12} {n:>7}")


# -- paging long output at a terminal -----------------------------------------------------------


class PagerClosed(Exception):
    """The person quit the pager: stop producing output."""


class _PagerStream:
    """The pager's stdin as a text stream. It is a terminal as far as colors go (the pager
    passes them through), and quitting the pager ends the output instead of being an error."""

    def __init__(self, raw):
        self.raw = raw

    def write(self, text: str) -> int:
        try:
            return self.raw.write(text)
        except (BrokenPipeError, ValueError):
            raise PagerClosed from None

    def flush(self) -> None:  # the pager reads in chunks; flushing each line would cost a write each
        pass

    def isatty(self) -> bool:
        return True


@contextlib.contextmanager
def paged(enabled: bool = True):
    """Yield the stream a long listing should go to: at a terminal, like git, the stdin of
    $PAGER (else `less -R`, with LESS=FRX so that output shorter than a screen just prints);
    into a pipe, or with the pager turned off, stdout itself."""
    import os
    import shlex
    import subprocess

    command = os.environ.get("PAGER", "less -R").strip()
    if not enabled or not sys.stdout.isatty() or command in ("", "cat"):
        yield sys.stdout
        return
    env = dict(os.environ)
    env.setdefault("LESS", "FRX")
    env.setdefault("LV", "-c")
    sys.stdout.flush()
    try:
        proc = subprocess.Popen(shlex.split(command), stdin=subprocess.PIPE, env=env)
    except (OSError, ValueError):  # no such pager, or unbalanced quotes: print as if there were none
        yield sys.stdout
        return
    stream = io.TextIOWrapper(proc.stdin, encoding="utf-8", errors="replace", write_through=False)
    interrupted = False
    try:
        yield _PagerStream(stream)
    except PagerClosed:
        pass
    except KeyboardInterrupt:
        interrupted = True
    finally:
        try:
            stream.close()
        except (BrokenPipeError, ValueError):
            pass
        while True:
            try:
                proc.wait()
                break
            except KeyboardInterrupt:  # Ctrl-C in less reaches us too: the pager decides
                continue
    if interrupted:
        sys.exit(130)
