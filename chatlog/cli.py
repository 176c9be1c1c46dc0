"""The click command group. Each command parses its options and calls one function.

Heavy modules (rich, sqlite-utils) are imported inside the commands that need them, so
`chatlog --help` and `chatlog path` start fast.
"""

from __future__ import annotations

import sys

import click

from chatlog import __version__

DB_HELP = "SQLite database file [env: CHATLOG_DB; default: ~/.local/share/chatlog/chatlog.db]"


def db_option(fn):
    return click.option(
        "--db",
        "db",
        type=click.Path(dir_okay=False),
        default=None,
        help=DB_HELP,
    )(fn)


def fail(message: str, code: int = 1):
    """One clear line on stderr and a non-zero exit."""
    click.echo(f"chatlog: {message}", err=True)
    sys.exit(code)


def open_db(db: str | None, create: bool = False):
    from chatlog.config import db_path
    from chatlog.archive import open_archive
    from chatlog.db import StoreError

    try:
        return open_archive(db_path(db), create=create)
    except StoreError as exc:
        fail(str(exc))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="chatlog")
@click.option("--db", "db", type=click.Path(dir_okay=False), default=None, help=DB_HELP + " (for every command)")
def cli(db):
    """A turn-based TCP chat server that keeps a faithful, searchable, replayable transcript.

    Start the server with `chatlog serve 9999`, chat with `./chatclient HOST 9999`, then look back
    with `chatlog sessions`, `chatlog show last` and `chatlog search WORD`.
    """
    if db:
        import os

        os.environ["CHATLOG_DB"] = db


def _handle_name(ctx, param, value):
    from chatlog.protocol import valid_handle

    if not valid_handle(value):
        raise click.BadParameter("a handle is 1 to 10 characters, with no spaces and no '>'")
    return value


@cli.command()
@click.argument("port", type=click.IntRange(0, 65535))
@click.option("--bind", metavar="ADDR", help="Address to listen on [default: every interface, IPv6 and IPv4]")
@click.option(
    "--handle", default="SERVER", show_default=True, metavar="NAME", callback=_handle_name,
    help="The operator's handle, sent to clients and recorded.",
)
@click.option(
    "--idle-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=300.0,
    show_default=True,
    metavar="SECONDS",
    help="Drop a client that sends nothing for this long on its turn.",
)
@click.option(
    "--first-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="While others wait, a client that has said nothing yet has this long to speak.",
)
@click.option(
    "--max-waiting",
    type=click.IntRange(0, 1000),
    default=5,
    show_default=True,
    help="Clients that may wait while another is served; more are told the server is busy.",
)
@click.option(
    "--per-address",
    type=click.IntRange(0, 100_000),
    default=None,
    help="How many waiting clients (in a room: clients) may come from one address; 0: no cap "
    "[default: 2; in a room 256].",
)
@click.option("--room", is_flag=True, help="A room: many clients at once, every line relayed to everyone else.")
@click.option(
    "--max-clients", type=click.IntRange(1, 1_000_000), default=10_000, show_default=True,
    help="A room's size; more are told it is full.",
)
@click.option(
    "--rate", type=click.FloatRange(min=0), default=20.0, show_default=True, metavar="LINES",
    help="A room's per-client rate limit, lines per second (0: none); over it, reading pauses.",
)
@click.option(
    "--burst", type=click.IntRange(min=1), default=100, show_default=True,
    help="Lines a room client may send at once before --rate applies.",
)
@click.option(
    "--fsync", is_flag=True,
    help="Sync every message to disk before it is shown or answered (survives a power loss; slower).",
)
@click.option("--color/--no-color", default=None, help="Force colors on or off [default: auto, honours NO_COLOR].")
@db_option
def serve(
    port, bind, handle, idle_timeout, first_timeout, max_waiting, per_address, room, max_clients, rate,
    burst, fsync, color, db,
):
    """Listen on PORT and chat with one client at a time (or, with --room, with many at once),
    recording everything.

    The client speaks first; answer at the SERVER> prompt. Type \\quit to end a chat. Clients that
    connect meanwhile wait their turn (and are told their place). Answers can be scripted by
    piping them in; the server stops when its input ends:

        printf 'hi\\nbye\\n' | chatlog serve 9999

    In a room (--room), clients type at any time and each line goes to everyone else; the
    operator's lines go to everyone. At the prompt: \\who lists who is here, \\kick NAME
    removes someone, \\quit closes the room.

    PORT 0 picks a free port (it is printed). Ctrl-C, SIGTERM or SIGHUP closes the current chat
    cleanly. Every message is committed before it is shown or answered.
    """
    from chatlog.config import db_path
    from chatlog.db import StoreError
    from chatlog.recorder import open_recorder
    from chatlog.render import Renderer
    from chatlog.server import MAX_OUTBUF, ROOM_OUTBUF, ServeError, listen, raise_open_files_limit
    from chatlog.server import serve as run_server

    try:
        recorder = open_recorder(db_path(db), fsync=fsync) if fsync else open_recorder(db_path(db))
    except StoreError as exc:
        fail(str(exc))
    try:
        raise_open_files_limit()
        if room:
            from chatlog.room import Room

            policy = Room(
                handle=handle, max_clients=max_clients, rate=rate, burst=burst,
                **({} if per_address is None else {"per_address": per_address}),
            )
            sockets = listen(bind, port, backlog=4096)
        else:
            from chatlog.turns import Turns

            policy = Turns(
                handle=handle, idle_timeout=idle_timeout, first_timeout=first_timeout,
                max_waiting=max_waiting, per_address=2 if per_address is None else (per_address or max_waiting),
            )
            sockets = listen(bind, port)
        run_server(
            recorder, sockets, policy, Renderer(color=color), sys.stdin, bind=bind, room=room,
            idle_timeout=None if room else idle_timeout, max_outbuf=ROOM_OUTBUF if room else MAX_OUTBUF,
        )
    except (ServeError, StoreError) as exc:
        fail(str(exc))
    finally:
        recorder.close()


@cli.command()
@db_option
def path(db):
    """Print the path of the database file."""
    from chatlog.config import db_path

    click.echo(str(db_path(db)))


# -- reading the transcript -------------------------------------------------------------------


def filter_options(fn):
    """--handle, --host, --since, --until: the filters shared by sessions, export and prune."""
    fn = click.option("--until", metavar="WHEN", help="Sessions started before WHEN.")(fn)
    fn = click.option(
        "--since", metavar="WHEN", help="Sessions started at or after WHEN (2026-11-24, '2026-11-24 10:00', 2h, 3d)."
    )(fn)
    fn = click.option("--host", metavar="ADDR", help="Only sessions from this client address.")(fn)
    fn = click.option("--handle", metavar="NAME", help="Only sessions with this handle.")(fn)
    return fn


def make_filters(handle=None, host=None, since=None, until=None, ids=()):
    from chatlog.query import BadDate, Filters, parse_when

    try:
        return Filters(
            handle=handle,
            host=host,
            since=parse_when(since) if since is not None else None,
            until=parse_when(until) if until is not None else None,
            ids=tuple(ids),
        )
    except BadDate as exc:
        fail(str(exc))


def get_session(store, ident):
    """A session by id or `last`; a clear error otherwise."""
    if not ((ident.isascii() and ident.isdigit()) or ident.lower() == "last"):
        fail(f"invalid session id {ident!r} (a number, or 'last')")
    s = store.session(ident) if ident.lower() == "last" or int(ident) < 2**63 else None
    if s is None:
        fail("no sessions recorded yet" if ident.lower() == "last" else f"no session {ident}")
    return s


def store_errors(fn):
    """Turn a StoreError raised while reading into one clear line."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from chatlog.db import StoreError

        try:
            return fn(*args, **kwargs)
        except StoreError as exc:
            fail(str(exc))

    return wrapper


@cli.command()
@click.option("-n", "--limit", type=click.IntRange(min=0), default=20, show_default=True, help="How many (0 for all).")
@filter_options
@click.option("--utc", is_flag=True, help="Show times in UTC instead of local time.")
@click.option("--json", "as_json", is_flag=True, help="Output JSON.")
@click.option("--csv", "as_csv", is_flag=True, help="Output CSV.")
@db_option
@store_errors
def sessions(limit, handle, host, since, until, utc, as_json, as_csv, db):
    """List past conversations, newest first."""
    from chatlog import views

    store = open_db(db)
    rows = store.sessions(make_filters(handle, host, since, until), limit)
    if as_json:
        views.sessions_json(rows)
    elif as_csv:
        views.sessions_csv(rows)
    elif not rows:
        fail("no sessions match" if any((handle, host, since, until)) else "no sessions recorded yet")
    else:
        views.sessions_table(rows, utc)


@cli.command()
@click.argument("session_id", metavar="ID")
@click.option("--utc", is_flag=True, help="Show times in UTC.")
@click.option("--color/--no-color", default=None, help="Force colors on or off.")
@db_option
@store_errors
def show(session_id, utc, color, db):
    """Print a whole conversation, as the server console showed it. ID may be `last`."""
    from chatlog import views
    from chatlog.render import Renderer

    store = open_db(db)
    s = get_session(store, session_id)
    views.show(s, store.messages(s.id), Renderer(color=color), utc)


@cli.command()
@click.argument("session_id", metavar="ID")
@click.option("--speed", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True, help="Playback speed.")
@click.option(
    "-i", "--idle-limit", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
    help="Cap every pause at SECONDS (like asciinema -i).",
)
@click.option("--instant", is_flag=True, help="Print everything at once.")
@click.option("--follow", is_flag=True, help="Follow the session live as it is written (like tail).")
@db_option
@store_errors
def replay(session_id, speed, idle_limit, instant, follow, db):
    """Play a conversation back with its original timing. ID may be `last`.

    Space pauses and resumes; Ctrl-C stops. Into a pipe it prints without waiting.
    """
    from chatlog import replay as player
    from chatlog import views
    from chatlog.render import Renderer

    store = open_db(db)
    s = get_session(store, session_id)
    r = Renderer()
    if follow:
        return _follow(store, r, s.id)
    lines = list(views.transcript(s, store.messages(s.id), r))
    tty = sys.stdout.isatty()
    try:
        if tty and sys.stdin.isatty():
            with player.Keys() as keys:
                player.play(lines, r.write, speed=speed, idle_limit=idle_limit, instant=instant, keys=keys)
        else:
            player.play(lines, r.write, speed=speed, idle_limit=idle_limit, instant=instant or not tty)
    except KeyboardInterrupt:
        click.echo("\nreplay stopped", err=True)
        sys.exit(130)


def _follow(store, r, session_id=None):
    from chatlog import replay as player

    try:
        player.follow(store, r, session_id)
    except KeyboardInterrupt:
        sys.exit(0)


@cli.command()
@click.argument("session_id", metavar="[ID]", required=False)
@db_option
@store_errors
def tail(session_id, db):
    """Watch conversations live, from another terminal, as the server records them.

    With no ID it follows the session in progress (or the latest) and each one after it; with an
    ID it stops when that session ends. Ctrl-C stops.
    """
    from chatlog.render import Renderer

    store = open_db(db)
    if session_id is not None:
        session_id = get_session(store, session_id).id
    _follow(store, Renderer(), session_id)


@cli.command()
@click.argument("session_ids", metavar="[ID]...", nargs=-1)
@filter_options
@click.option("--all", "everything", is_flag=True, help="Export every session (the default when no ID or filter is given).")
@click.option(
    "-f", "--format", "fmt", type=click.Choice(["txt", "md", "json", "jsonl", "csv", "html", "cast"]),
    default=None, help="Output format [default: from the -o extension, else txt].",
)
@click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True), default="-", help="Output file [default: stdout].")
@db_option
@store_errors
def export(session_ids, handle, host, since, until, everything, fmt, output, db):
    """Write conversations out as txt, md, json, jsonl, csv, html or an asciinema cast.

    Give session IDs (or `last`), or filters, or nothing for all sessions. Exports stream, so
    memory stays flat however large the archive.
    """
    from chatlog import export as exporters

    store = open_db(db)
    if fmt is None:
        fmt = exporters.format_for(output)
    ids = [get_session(store, i).id for i in session_ids]
    filters = make_filters(handle, host, since, until, ids)
    chosen = store.session_ids(filters)
    if not chosen:
        fail("no sessions match" if (ids or any((handle, host, since, until))) else "no sessions recorded yet")
    try:
        exporters.run(store, chosen, fmt, output, filters)
    except exporters.ExportError as exc:
        fail(str(exc))
    if output != "-":
        click.echo(f"wrote {len(chosen)} session(s) to {output} ({fmt})", err=True)


@cli.command()
@click.argument("query", nargs=-1, required=True)
@click.option("--raw", is_flag=True, help="QUERY is SQLite FTS5 syntax (AND, OR, NEAR, prefix*).")
@click.option("--handle", metavar="NAME", help="Only messages from this handle.")
@click.option("--since", metavar="WHEN", help="Only messages at or after WHEN (2026-11-24, 2h, 3d).")
@click.option("-n", "--limit", type=click.IntRange(min=0), default=20, show_default=True, help="How many hits (0 for all).")
@click.option("--best", is_flag=True, help="Best match first, instead of newest first.")
@click.option("--utc", is_flag=True, help="Show times in UTC.")
@click.option("--json", "as_json", is_flag=True, help="Output JSON.")
@db_option
@store_errors
def search(query, raw, handle, since, limit, best, utc, as_json, db):
    """Find words across every conversation (full-text search).

    Words are matched as typed: hyphens and quotes need no escaping. Each hit shows the session,
    the time, the handle and the line with the match highlighted.
    """
    from chatlog import views
    from chatlog.query import BadDate, fts_query, parse_when
    from chatlog.render import Renderer

    text = " ".join(query)
    fts = text if raw else fts_query(text)
    if not fts.strip():
        fail("empty search query")
    try:
        since_ts = parse_when(since) if since is not None else None
    except BadDate as exc:
        fail(str(exc))
    store = open_db(db)
    hits = store.search(fts, raw=True, handle=handle, since=since_ts, limit=limit, best=best)
    if as_json:
        views.search_json(hits)
    elif not hits:
        fail(f"no messages match {text!r}")
    else:
        views.search_hits(hits, Renderer(), utc)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Output JSON.")
@db_option
@store_errors
def stats(as_json, db):
    """Totals: sessions, messages, handles, hosts, busiest handles, average length."""
    import json

    from chatlog import views
    from chatlog.render import Renderer

    st = open_db(db).stats()
    if as_json:
        click.echo(json.dumps(st, indent=2))
    else:
        views.stats_text(st, Renderer())


@cli.command()
@click.argument("session_ids", metavar="ID...", nargs=-1, required=True)
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@db_option
@store_errors
def rm(session_ids, yes, db):
    """Delete sessions, with their messages and search entries."""
    store = open_db(db)
    chosen = [get_session(store, i) for i in session_ids]
    held = store.held([s.id for s in chosen])
    for s in chosen:
        if s.id in held:
            fail(f"session {s.id} is being recorded by a running server ({held[s.id]}); it can be deleted once it has ended")
        if s.ended_at is None:
            fail(f"session {s.id} is still in progress; it can be deleted once it has ended")
    _delete(store, sorted({s.id for s in chosen}), yes)


@cli.command()
@click.option("--before", metavar="WHEN", required=True, help="Delete sessions started before WHEN (a date, or 30d...).")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@db_option
@store_errors
def prune(before, yes, db):
    """Delete every session that started before a date."""
    store = open_db(db)
    filters = make_filters(until=before)
    everything = store.session_ids(filters)
    filters.ended_only = True
    ids = store.session_ids(filters)
    if len(ids) < len(everything):
        n = len(everything) - len(ids)
        live = len(store.held(sorted(set(everything) - set(ids))))
        click.echo(f"leaving {n} session(s) still in progress"
                   + (f" ({live} recorded by a running server)" if live else ""), err=True)
    if not ids:
        fail(f"no ended sessions started before {before}")
    _delete(store, ids, yes)


def _delete(store, ids, yes):
    n = len(ids)
    what = f"session {ids[0]} and its" if n == 1 else f"{n} sessions and their"
    if not yes:
        click.confirm(f"Delete {what} messages?", abort=True)
    deleted = store.delete_sessions(ids)
    click.echo(f"deleted {deleted} session(s)", err=True)


@cli.command()
@click.argument("dest", type=click.Path(dir_okay=False))
@db_option
@store_errors
def backup(dest, db):
    """Write a consistent copy of the database to DEST, safely, even while the server runs."""
    store = open_db(db)
    if store.is_database_file(dest):
        fail(f"the backup must not overwrite the database or its files ({dest})")
    try:
        store.backup(dest)
    except OSError as exc:
        fail(f"cannot write {dest}: {exc.strerror}")
    click.echo(f"backed up {store.path} to {dest}", err=True)
