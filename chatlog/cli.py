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
    from chatlog.store import StoreError, open_store

    try:
        return open_store(db_path(db), create=create)
    except StoreError as exc:
        fail(str(exc))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="chatlog")
def cli():
    """A turn-based TCP chat server that keeps a faithful, searchable, replayable transcript.

    Start the server with `chatlog serve 9999`, chat with `./chatclient HOST 9999`, then look back
    with `chatlog sessions`, `chatlog show last` and `chatlog search WORD`.
    """


@cli.command()
@click.argument("port", type=click.IntRange(0, 65535))
@click.option("--bind", metavar="ADDR", help="Address to listen on [default: every interface, IPv6 and IPv4]")
@click.option(
    "--idle-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=300.0,
    show_default=True,
    metavar="SECONDS",
    help="Drop a client that sends nothing for this long on its turn.",
)
@click.option(
    "--max-waiting",
    type=click.IntRange(0, 1000),
    default=5,
    show_default=True,
    help="Clients that may wait while another is served; more are told the server is busy.",
)
@click.option("--color/--no-color", default=None, help="Force colors on or off [default: auto, honours NO_COLOR].")
@db_option
def serve(port, bind, idle_timeout, max_waiting, color, db):
    """Listen on PORT and chat with one client at a time, recording everything.

    The client speaks first; answer at the SERVER> prompt. Type \\quit to end a chat. Clients that
    connect meanwhile wait their turn. Answers can be scripted by piping them in:

        printf 'hi\\nbye\\n' | chatlog serve 9999

    PORT 0 picks a free port (it is printed). Ctrl-C or SIGTERM closes the current chat cleanly.
    """
    from chatlog.render import Renderer
    from chatlog.server import ServeError
    from chatlog.server import serve as run_server

    store = open_db(db, create=True)
    try:
        run_server(store, port, bind, Renderer(color=color), idle_timeout, max_waiting)
    except ServeError as exc:
        fail(str(exc))
    finally:
        store.close()


@cli.command()
@db_option
def path(db):
    """Print the path of the database file."""
    from chatlog.config import db_path

    click.echo(str(db_path(db)))
