"""Export writers: a registry {format: writer}. Each writer takes an iterator of
(session, messages) pairs, a text stream and the options, and writes as it reads, so memory
stays flat.

The text-like formats (txt, md, html, cast) read each session through the one read model,
`chatlog.transcript`; JSON, JSON lines and CSV are the records themselves. Client text is
untrusted in every format, and made safe only by `chatlog.sanitize`: made visible in txt and md,
escaped in HTML, neutralised in CSV, always valid JSON (the raw bytes, when they differ from the
text, travel base64-encoded beside it).
"""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _encode_str
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from chatlog import transcript
from chatlog.render import VERIFIED_MARK, Renderer
from chatlog.sanitize import TerminalSafe, csv_cell, csv_plain, html_text, visible
from chatlog.views import console_lines, header_lines, message_dict, session_dict

from chatlog.records import Msg, Session, clean_msg

if TYPE_CHECKING:
    from chatlog.query import Filters

Sessions = Iterable[tuple[Session, Iterator[tuple]]]  # messages as tuples in Msg field order


def msgs(rows: Iterable[tuple]) -> Iterator[Msg]:
    return (Msg(*row) for row in rows)


@dataclass(frozen=True)
class Options:
    timestamps: bool = False  # txt, md: `[20:09:14] ` before each line
    utc: bool = False  # times in UTC instead of local time
    headings: bool = False  # txt: a heading per session (several sessions)
    sessions: int = 0  # how many sessions the export holds, when known (html: its title)
    header: bool = True  # csv: the header line (not when appending to an earlier run's output)
    # json, jsonl, csv: a room's lines by sequence number -> (host, port) of who said each
    addresses: Callable[[int], dict[int, tuple[str, int]]] | None = None


def _room_addresses(s, opts: Options) -> dict[int, tuple[str, int]] | None:
    if s.kind != "room" or opts.addresses is None:
        return None
    return opts.addresses(s.id)


WRITERS: dict[str, Callable[[Sessions, TextIO, Options], None]] = {}
EXTENSIONS = {
    ".txt": "txt", ".log": "txt", ".md": "md", ".markdown": "md", ".json": "json",
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".html": "html", ".htm": "html",
    ".cast": "cast",
}


UNTYPED: set = set()  # writers that take messages as stored and check each value's type themselves


def writer(name: str):
    def register(fn):
        WRITERS[name] = fn
        return fn

    return register


class ExportError(Exception):
    """Why an export could not be written, in one line."""


PROGRESS_MIN_MESSAGES = 20_000  # a shorter export is over before a bar would be worth drawing


def format_for(output: str) -> str:
    """The format an output file's extension asks for: txt for stdout or a name with no
    extension (a device, a FIFO); an extension that names no format is an error."""
    if output == "-":
        return "txt"
    ext = os.path.splitext(output)[1].lower()
    if not ext:
        return "txt"
    fmt = EXTENSIONS.get(ext)
    if fmt is None:
        known = ", ".join(sorted(EXTENSIONS))
        raise ExportError(f"cannot tell the format from {ext!r} (known: {known}); give it with --format")
    return fmt


def run(store, ids: list[int], fmt: str, output: str = "-", filters: Filters | None = None,
        options: Options = Options(), source: Callable[[bool], Sessions] | None = None) -> bool:
    """Export the sessions `ids` as `fmt` to the file `output` (`-`: stdout), streaming; or,
    with `source`, what `source(typed)` gives (an incremental export). Returns whether all of
    it was written, flushed and (into a file) synced: False when the reader of stdout went away.

    A file is written beside its destination and renamed into place when complete, so an export
    that fails halfway never leaves half a file (nor truncates the one it was replacing).
    On a terminal stderr, a long export shows a progress bar there."""
    chosen = WRITERS[fmt]
    if options.addresses is None and hasattr(store, "room_addresses"):
        import dataclasses

        options = dataclasses.replace(options, addresses=store.room_addresses)

    def write(pairs, out):
        chosen(pairs, out, options)

    typed = chosen not in UNTYPED
    pairs = source(typed) if source is not None else store.export_rows(ids, typed=typed)
    if source is None and sys.stderr.isatty() and not (output == "-" and sys.stdout.isatty()):
        total = store.message_total(filters) if filters is not None else 0
        if total >= PROGRESS_MIN_MESSAGES:
            pairs = _with_progress(pairs, total)
    try:
        return _write_to(store, output, write, pairs, sync=source is not None)
    finally:
        # Closed here, not by the garbage collector at exit: Ctrl-C midway left the progress
        # bar's generator open, and stopping its refresh thread during shutdown hung.
        close = getattr(pairs, "close", None)
        if close is not None:
            close()


def _write_to(store, output: str, write, pairs, *, sync: bool) -> bool:
    to_stdout = output == "-"
    if to_stdout:
        return _to_stdout(write, pairs)
    dest = Path(output)
    if store.is_database_file(dest):
        raise ExportError(f"the export must not overwrite the database or its files ({output})")
    if dest.exists() and not dest.is_file():  # /dev/stdout, a FIFO, >(gzip): write straight in
        try:
            with open(dest, "w", encoding="utf-8", newline="") as out:
                # A terminal (/dev/tty, or /dev/stdout at one) gets the terminal rule, as stdout
                # does: what is written is made visible. A pipe or a FIFO gets the exact text.
                write(pairs, TerminalSafe(out) if out.isatty() else out)
        except OSError as exc:
            raise ExportError(f"cannot write {output}: {exc.strerror or exc}") from None
        return True
    if dest.is_symlink():
        dest = Path(os.path.realpath(dest))  # replace the file it points to, not the link
    try:
        # (an incremental export is synced: its cursor moves on only past what is on disk)
        replace_file(dest, lambda out: write(pairs, out), sync=sync)
    except OSError as exc:
        raise ExportError(f"cannot write {output}: {exc.strerror or exc}") from None
    return True


def replace_file(dest: Path, write: Callable[[TextIO], None], *, sync: bool) -> None:
    """Write `dest` whole or not at all: into a temporary file beside it (with its mode, if it
    exists: a private file stays private), synced if asked, then renamed over it. OSError out."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as out:
            if dest.exists():
                os.chmod(out.fileno(), dest.stat().st_mode & 0o7777)
            write(out)
            if sync:
                out.flush()
                os.fsync(out.fileno())
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_to(store, ids: list[int], fmt: str, out: TextIO, options: Options = Options()) -> None:
    """Export the sessions `ids` as `fmt` into any text stream, as it reads (what `chatlog web`
    streams to a browser): the same writers and rows as `run`, without the file handling."""
    chosen = WRITERS[fmt]
    if options.addresses is None and hasattr(store, "room_addresses"):
        import dataclasses

        options = dataclasses.replace(options, addresses=store.room_addresses)
    chosen(store.export_rows(ids, typed=chosen not in UNTYPED), out, options)


def _to_stdout(write, pairs) -> bool:
    if sys.stdout.isatty():
        write(pairs, TerminalSafe(sys.stdout))
        sys.stdout.flush()
        return True
    try:
        fd = sys.stdout.fileno()
    except (OSError, AttributeError, ValueError):  # not a real file (a test runner's)
        write(pairs, sys.stdout)
        sys.stdout.flush()
        return True
    sys.stdout.flush()
    # Our own buffer: stdout may be unbuffered (PYTHONUNBUFFERED), which costs a syscall a line.
    out = open(fd, "w", encoding="utf-8", newline="", buffering=1 << 16, closefd=False)
    try:
        write(pairs, out)
        out.flush()
        if _is_regular(fd):  # `>> out.jsonl`: on disk before a cursor moves past it
            os.fsync(fd)
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        _silence_stdout()
        return False
    finally:
        try:
            out.close()
        except BrokenPipeError:
            _silence_stdout()
            return False  # noqa: B012 (what is returned is whether all was written)
    return True


def _is_regular(fd: int) -> bool:
    import stat

    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False


def _silence_stdout() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _with_progress(pairs: Sessions, total: int) -> Iterator[tuple[Session, Iterator[tuple]]]:
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(file=sys.stderr), transient=True) as progress:
        task = progress.add_task("exporting", total=total)
        for s, rows in pairs:
            yield s, rows
            progress.advance(task, s.messages)


def _lines(s: Session, messages, r: Renderer, opts: Options) -> Iterator[tuple[str, str]]:
    return console_lines(transcript.events(s, msgs(messages)), r, opts.timestamps, opts.utc)


@writer("txt")
def write_txt(sessions: Sessions, out: TextIO, opts: Options = Options()) -> None:
    plain = Renderer(out, color=False)
    for i, (s, messages) in enumerate(sessions):
        if i:
            out.write("\n")
        if opts.headings:
            head = header_lines(s, opts.utc)
            out.write(f"== {head[0]} ==\n" + "".join(line + "\n" for line in head[1:]) + "\n")
        for _, line in _lines(s, messages, plain, opts):
            out.write(line + "\n")


@writer("md")
def write_md(sessions: Sessions, out: TextIO, opts: Options = Options()) -> None:
    plain = Renderer(out, color=False)
    for i, (s, messages) in enumerate(sessions):
        if i:
            out.write("\n")
        head = header_lines(s, opts.utc)
        out.write(f"## {_md_escape(head[0])}\n\n")
        # The details as one paragraph (a backslash ends each line but the last). Not a list:
        # an indented block right after a list item would continue the item as Markdown.
        out.write("\\\n".join(_md_escape(line) for line in head[1:]) + "\n\n")
        # An indented code block: no line of client text can close it or be read as Markdown.
        for _, line in _lines(s, messages, plain, opts):
            out.write("    " + line + "\n")


def _md_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "\\`*_[]<>|~#&!" else ch for ch in text)


@writer("json")
def write_json(sessions: Sessions, out: TextIO, opts: Options = Options()) -> None:
    out.write('{"sessions": [')
    for i, (s, messages) in enumerate(sessions):
        meta = json.dumps(session_dict(s))
        out.write(("," if i else "") + "\n  " + meta[:-1] + ', "messages": [')
        where = _room_addresses(s, opts)
        for j, m in enumerate(msgs(messages)):
            d = message_dict(m)
            if where is not None and m.seq in where:
                d["host"], d["port"] = where[m.seq]
            out.write(("," if j else "") + "\n    " + json.dumps(d))
        out.write("\n  ]}")
    out.write("\n]}\n")


@writer("jsonl")
def write_jsonl(sessions: Sessions, out: TextIO, opts: Options = Options()) -> None:
    # The hot loop of large exports: the session's columns are encoded once per session, and
    # each message adds its own fields with the C string encoder, written in batches. A message
    # with a handle and no raw bytes or note (nearly all of them) takes the one-line path.
    enc = _encode_str
    for s, rows in sessions:
        head = json.dumps(
            {
                "session_id": s.id,
                "session_started_at": s.started_at,
                "session_ended_at": s.ended_at,
                "client_host": s.client_host,
                "client_port": s.client_port,
                "session_handle": s.handle,
                "end_reason": s.end_reason,
                "transport": s.transport,
                "tls_version": s.tls_version,
                "cert_fingerprint": s.cert_fingerprint,
            }
        )[:-1]
        batch: list[str] = []
        add = batch.append
        where = _room_addresses(s, opts)
        if s.kind == "room":  # each line with the address of who said it, and whether verified
            where = where or {}
            for row in rows:
                fields = _rare(row)
                line, seq = _jsonl_rare(head, *fields), fields[1]
                if seq in where:
                    host, port = where[seq]
                    line = f'{line[:-2]}, "host": {_json_str(host)}, "port": {port}}}\n'
                add(line)
            out.write("".join(batch))
            continue
        for row in rows:
            _id, _sid, seq, at, sender, handle, text, raw, note, verified, removed_at = row
            try:  # enc() takes only text: a value of the wrong type (a crafted file) goes below
                if raw is None and note is None and handle is not None and removed_at is None:
                    add(f'{head}, "id": {_id}, "seq": {seq}, "at": {enc(at)}, "sender": {enc(sender)}, "handle": {enc(handle)}, "text": {enc(text)}, "verified": {_BOOL[verified]}}}\n')
                else:
                    add(_jsonl_rare(head, *_rare(row)))
            except (TypeError, KeyError):
                add(_jsonl_rare(head, *_rare(row)))
            if len(batch) >= 2048:
                out.write("".join(batch))
                batch.clear()
        out.write("".join(batch))


UNTYPED.add(write_jsonl)


_BOOL = {0: "false", 1: "true"}  # (True and False are these keys too)


def _rare(row: tuple) -> tuple:
    """An untyped row's values for the rare paths: typed (see clean_msg), without its session id."""
    _id, _sid, seq, at, sender, handle, text, raw, note, verified, removed_at = clean_msg(row)
    return (_id, seq, at, sender, handle, text, raw, note, verified, removed_at)


def _jsonl_rare(head: str, id_, seq, at, sender, handle, text, raw, note, verified, removed_at=None) -> str:
    enc = _json_str
    line = (f'{head}, "id": {id_}, "seq": {seq}, "at": {enc(at)}, "sender": {enc(sender)}, "handle": {enc(handle)}, '
            f'"text": {enc(text)}, "verified": {_BOOL[bool(verified)]}')
    if raw is not None:
        line += f', "raw_base64": "{base64.b64encode(raw).decode("ascii")}"'
    if note:
        line += f', "note": {enc(note)}'
    if removed_at is not None:
        line += f', "removed_at": {enc(removed_at)}'
    return line + "}\n"


def _json_str(value) -> str:
    return "null" if value is None else _encode_str(value)


CSV_FIELDS = [
    "session_id", "session_started_at", "client_host", "client_port", "session_handle",
    "end_reason", "seq", "at", "sender", "handle", "text", "raw_base64", "note", "host", "port",
    "id", "verified", "removed_at", "transport", "cert_fingerprint",
]


@writer("csv")
def write_csv(sessions: Sessions, out: TextIO, opts: Options = Options()) -> None:
    # Built by hand rather than with csv.writer: only the text-like cells can need quoting, and
    # checking the rest row by row was most of the cost of a large export. A message with no raw
    # bytes or note and a plain handle (nearly all of them) takes the one-line path.
    if opts.header:
        out.write(",".join(CSV_FIELDS) + "\n")
    cell = csv_cell
    safe = csv_plain
    plain = _PLAIN_SENDERS
    for s, rows in sessions:
        head = ",".join(
            cell(v) for v in (s.id, s.started_at, s.client_host, s.client_port, s.handle, s.end_reason)
        )
        tail = "," + ",".join(cell(v) for v in (s.transport, s.cert_fingerprint))
        handles: dict[str, str] = {}  # each handle's cell, checked once per session
        batch: list[str] = []
        add = batch.append
        where = _room_addresses(s, opts)
        if s.kind == "room":  # each line with the address of who said it, and whether verified
            where = where or {}
            for row in rows:
                id_, seq, at, sender, handle, text, raw, note, verified, removed_at = _rare(row)
                host, port = where.get(seq, (None, None))
                add(_csv_rare(head, tail, id_, seq, at, sender, handle, text, raw, note, verified, removed_at,
                              host, port))
            out.write("".join(batch))
            continue
        for row in rows:
            _id, _sid, seq, at, sender, handle, text, raw, note, verified, removed_at = row
            if raw is not None or note is not None or handle is None or sender not in plain or removed_at is not None:
                add(_csv_rare(head, tail, *_rare(row)))
            else:
                try:  # a value of the wrong type (a crafted file) raises TypeError here
                    h = handles.get(handle)
                    if h is None:
                        if type(handle) is not str:
                            raise TypeError
                        h = handles[handle] = cell(handle)
                    if not safe(text):  # (csv_plain takes only text)
                        text = cell(text)
                    add(f"{head},{seq},{at},{sender},{h},{text},,,,,{_id},{_BOOL[verified]},{tail}\n")
                except (TypeError, KeyError):
                    add(_csv_rare(head, tail, *_rare(row)))
            if len(batch) >= 2048:
                out.write("".join(batch))
                batch.clear()
        out.write("".join(batch))


_PLAIN_SENDERS = frozenset(("client", "server"))


UNTYPED.add(write_csv)


def _csv_rare(head: str, tail: str, id_, seq, at, sender, handle, text, raw, note, verified, removed_at,
              host=None, port=None) -> str:
    raw64 = base64.b64encode(raw).decode("ascii") if raw is not None else ""
    cells = (seq, at, sender, handle, text, raw64, note, host, port, id_)
    return (head + "," + ",".join(csv_cell(v) for v in cells) + f",{_BOOL[bool(verified)]},"
            + csv_cell(removed_at) + f"{tail}\n")


HTML_HEAD = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body { background: #1e1e1e; color: #d4d4d4; font: 14px/1.45 ui-monospace, Menlo, Consolas, monospace; margin: 2em; }
h2 { color: #fff; font-size: 15px; margin: 2em 0 .3em; }
.meta { color: #888; margin: 0 0 1em; }
.line { white-space: pre-wrap; word-break: break-word; }
.client { color: #2aa1b3; font-weight: bold; }
.server { color: #c061cb; font-weight: bold; }
.event { color: #c4a000; }
.note { color: #888; }
.verified { color: #4e9a06; }
time { color: #666; margin-right: 1em; }
</style>
</head>
<body>
"""


VERIFIED_HTML = '<span class="verified" title="verified: bound to its client certificate">&#x2713;</span> '


@writer("html")
def write_html(sessions: Sessions, out: TextIO, opts: Options = Options()) -> None:
    """One page. Times are local, as `show` prints them, or UTC with --utc; each session's
    details say which (`times in local time (UTC+05:30)`, `times in UTC`). The title names the
    session (or how many there are)."""
    e = html_text
    pairs = iter(sessions)
    first = next(pairs, None)
    if first is None or opts.sessions > 1:
        title = f"chatlog: {opts.sessions} sessions, from session {first[0].id}" if first else "chatlog transcript"
    else:
        title = "chatlog: " + header_lines(first[0], opts.utc)[0]
    out.write(HTML_HEAD.replace("{title}", e(title)))
    for s, messages in _chain(first, pairs):
        head = header_lines(s, utc=opts.utc)
        head.append(zone_line(s, opts.utc))
        out.write(f'<section id="session-{s.id}">\n<h2>{e(head[0])}</h2>\n')
        out.write('<div class="meta">' + "<br>".join(e(x) for x in head[1:]) + "</div>\n")
        second = stamp = None
        for ev in transcript.events(s, msgs(messages)):
            if ev.at != second:  # many lines share a time
                second = ev.at
                stamp = f'<time datetime="{e(ev.at)}">{transcript.clock(ev.at, utc=opts.utc)}</time>'
            if ev.kind == transcript.NOTE:
                out.write(f'<div class="line note">{stamp}{e(ev.text)}</div>\n')
            elif not ev.is_message:
                out.write(f'<div class="line event">{stamp}{e(ev.text)}</div>\n')
            elif ev.handle is None:
                out.write(f'<div class="line">{stamp}{e(ev.text)}</div>\n')
            else:
                mark = VERIFIED_HTML if ev.verified else ""
                out.write(
                    f'<div class="line">{stamp}{mark}<span class="{ev.sender}">{e(ev.handle)}&gt;</span>'
                    f"{e(ev.text)}</div>\n"
                )
        out.write("</section>\n")
    out.write("</body>\n</html>\n")


def _chain(first, rest):
    if first is not None:
        yield first
        yield from rest


def zone_line(s: Session, utc: bool) -> str:
    """Which zone a session's times are in: `times in UTC`, or `times in local time (UTC+05:30)`
    (the offset at its start)."""
    if utc:
        return "times in UTC"
    when = transcript.parse_time(s.started_at)
    if when is None:
        return "times in local time"
    offset = when.astimezone().strftime("%z")
    return f"times in local time (UTC{offset[:3]}:{offset[3:]})" if offset else "times in local time"


CAST_MIN_WIDTH, CAST_MAX_WIDTH, CAST_HEIGHT = 80, 400, 24


@writer("cast")
def write_cast(sessions: Sessions, out: TextIO, opts: Options = Options()) -> None:
    """An asciinema v2 recording: a header line, then [seconds, "o", text] events that redraw the
    console line by line with the original timing. Several sessions play one after another.

    The header records a terminal as wide as the longest line (at least 80 columns), so nothing
    wraps on playback; the events are spooled (to disk past a few MB) until that is known."""
    import tempfile

    from rich.cells import cell_len

    color = Renderer(None, color=True)
    codes = {role: color._codes[role] for role in ("client", "server", "event", "dim")}
    enc = _encode_str
    offset = 0.0
    first: Session | None = None
    width = CAST_MIN_WIDTH
    with tempfile.SpooledTemporaryFile(max_size=4 << 20, mode="w+", encoding="utf-8") as spool:
        for s, messages in sessions:
            first = first or s
            t = 0.0
            start_at, seen = transcript.parse_time(s.started_at), None
            batch: list[str] = []
            for ev in transcript.events(s, msgs(messages)):
                if ev.at != seen:  # many lines share a time: parse each time once
                    seen, when = ev.at, transcript.parse_time(ev.at)
                    if when is not None and start_at is not None:
                        t = max(t, (when - start_at).total_seconds())
                text = visible(ev.text)
                if ev.is_message and ev.handle is not None:
                    who = visible(ev.handle)
                    start, end = codes["server" if ev.sender == "server" else "client"]
                    mark = VERIFIED_MARK if ev.verified else ""
                    line = f"{mark}{start}{who}>{end}{text}"
                    shown = f"{mark}{who}>{text}"
                elif ev.is_message:
                    line = shown = text
                else:
                    start, end = codes["dim" if ev.kind == transcript.NOTE else "event"]
                    line, shown = f"{start}{text}{end}", text
                width = max(width, len(shown) if shown.isascii() else cell_len(shown))
                batch.append(f"[{round(offset + t, 6)!r}, \"o\", {enc(line + chr(13) + chr(10))}]\n")
                if len(batch) >= 2048:
                    spool.write("".join(batch))
                    batch.clear()
            spool.write("".join(batch))
            offset += t + 1.0
        header = {"version": 2, "width": min(width, CAST_MAX_WIDTH), "height": CAST_HEIGHT}
        if first is not None:
            header.update({
                "timestamp": int(getattr(transcript.parse_time(first.started_at), "timestamp", lambda: 0)()),
                "title": f"chatlog session {first.id}",
                "env": {"TERM": "xterm-256color", "SHELL": "/bin/sh"},
            })
        out.write(json.dumps(header) + "\n")
        spool.seek(0)
        while chunk := spool.read(1 << 16):
            out.write(chunk)
