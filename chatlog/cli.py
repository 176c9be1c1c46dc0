"""The click command group. Each command parses its options and calls one function.

Heavy modules (rich, sqlite-utils) are imported inside the commands that need them, so
`chatlog --help` and `chatlog path` start fast. Every failure, click's own usage errors included,
is one `chatlog: ...` line on stderr and a non-zero status.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import TYPE_CHECKING

import gettext  # isort: skip  (before click: see _translation)


_LOOKED: dict = {}  # (domain, directory) -> its translation, or why there is none


def _translation(domain, localedir=None, languages=None, class_=None, fallback=False):
    """gettext.translation, looked up once per domain and directory (found or not). Click asks
    for a translation of each of its messages (every option's help, every heading), and the
    standard library searches the locale's files again at every call, a stat() per candidate:
    ~4 ms of `chatlog --help`."""
    if languages is not None or class_ is not None:
        return _looked_up(domain, localedir, languages, class_, fallback)
    key = (domain, localedir)
    if key not in _LOOKED:
        try:
            _LOOKED[key] = _looked_up(domain, localedir)
        except OSError as exc:  # none for this locale: said the same way at every call
            _LOOKED[key] = exc
    found = _LOOKED[key]
    if isinstance(found, OSError):
        if fallback:
            return gettext.NullTranslations()
        raise FileNotFoundError(*found.args)
    return found


_looked_up, gettext.translation = gettext.translation, _translation

import click  # noqa: E402

from chatlog import __version__  # noqa: E402
from chatlog.words import plural  # noqa: E402

if TYPE_CHECKING:
    from pathlib import Path

# -- one error style --------------------------------------------------------------------------


class PathParam(click.Path):
    """click.Path, converted to a pathlib.Path (imported when an option is given, not at every
    start: pathlib and what it imports are ~5 ms of `chatlog --help`)."""

    def convert(self, value, param, ctx):
        from pathlib import Path

        return Path(super().convert(value, param, ctx))


class Failed(click.ClickException):
    """A command could not do what was asked: one line, exit status 1."""

    def show(self, file=None) -> None:
        from chatlog.sanitize import visible  # (a file name, a value given: never raw to the terminal)

        click.echo(f"chatlog: {visible(self.format_message())}", err=True)


class Nothing(Exception):
    """Nothing matched: said on stderr, and not a failure (exit status 0), so a cron job that
    finds nothing to list, export or prune does not look failed."""


@contextlib.contextmanager
def one_line_errors():
    """Whatever goes wrong below becomes a `Failed` (keeping click's exit status for usage
    errors): store and export errors, bad dates, and click's own errors. The modules that
    define those errors are not imported here (`chatlog path` and `--help` stay fast): an error
    of theirs can only come from a module already loaded."""
    try:
        yield
    except (Failed, click.exceptions.NoArgsIsHelpError):  # the latter shows the help, as it should
        raise
    except click.ClickException as exc:
        err = Failed(exc.format_message())
        err.exit_code = exc.exit_code
        raise err from None
    except click.exceptions.Abort:
        raise Failed("aborted") from None
    except Exception as exc:
        if _worded_for_people(exc):
            raise Failed(str(exc)) from None
        raise


def _worded_for_people(exc: Exception) -> bool:
    """Whether `exc` is one of our errors whose message is already one clear line."""
    for module, name in (("chatlog.db", "StoreError"), ("chatlog.query", "BadDate"), ("chatlog.export", "ExportError")):
        loaded = sys.modules.get(module)
        if loaded is not None and isinstance(exc, getattr(loaded, name)):
            return True
    return False


def _columns() -> int:
    """The terminal's width as `shutil.get_terminal_size` finds it ($COLUMNS, else the terminal
    on stdout, else 80), without importing shutil (and bz2 and lzma with it): ~4 ms of every
    `--help`, where click's formatter imports it."""
    try:
        columns = int(os.environ.get("COLUMNS", 0))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


class Context(click.Context):
    def make_formatter(self) -> click.HelpFormatter:
        width = self.terminal_width
        if width is None:  # (click's own default, worked out as click does)
            from click import formatting

            width = formatting.FORCED_WIDTH
            if width is None:
                width = max(min(_columns(), self.max_content_width or 80) - 2, 50)
        return self.formatter_class(width=width, max_width=self.max_content_width)


class Command(click.Command):
    context_class = Context

    def make_context(self, *args, **kwargs):
        with one_line_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with one_line_errors():
            _utf8_arguments(ctx)
            _closed_streams(ctx)
            try:
                return super().invoke(ctx)
            except Nothing as exc:
                click.echo(str(exc), err=True)
                return None
            except BrokenPipeError:  # `| head`: the reader has what it wanted; not a failure
                _silence_stdout()
                return None
            except KeyboardInterrupt:
                err = Failed("interrupted")
                err.exit_code = 130
                raise err from None
            except OSError as exc:  # stdout on a full disk, a failed device...
                if exc.filename is not None or _worded_for_people(exc):
                    raise
                _silence_stdout()  # and no second complaint when Python flushes it at exit
                raise Failed(f"cannot write the output: {exc.strerror or exc}") from None


def _utf8_arguments(ctx: click.Context) -> None:
    """An argument with bytes that are not UTF-8 reaches Python as lone surrogates, and a search
    query, a --handle or --host filter or a --bind address made of them died with a
    UnicodeEncodeError traceback. File names may be any bytes; everything else is text."""
    for param in ctx.command.params:
        if isinstance(param.type, (click.Path, click.File)):
            continue
        value = ctx.params.get(param.name)
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, str):
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    err = click.BadParameter("not valid UTF-8", ctx=ctx, param=param)
                    raise err from None


def _room_name(ctx, param, value):
    """A room's name: 1 to 64 characters, nothing a terminal would act on, no leading or
    trailing space."""
    if value is None:
        return None
    from chatlog.sanitize import visible

    if not value or len(value) > 64 or value != value.strip() or visible(value) != value:
        raise click.BadParameter("1 to 64 visible characters, like lab or cs372-room", ctx=ctx, param=param)
    return value


def _closed_streams(ctx: click.Context) -> None:
    """Started with stdin or stdout closed (`<&-`, `>&-`; Python then has None for them), every
    command died with an AttributeError traceback. A closed stdin is input that has ended (an
    empty pipe: /dev/null would tell `serve` that nobody is at the console). A closed stdout is nowhere to write: the server goes on without a console (the
    chat is still recorded); a command whose output goes there says so in one line."""
    import os

    if sys.stdin is None:
        r, w = os.pipe()
        os.close(w)
        sys.stdin = os.fdopen(r)  # (for the life of the process)
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        quiet = ("serve", "rm", "prune", "backup")  # they tell what they did on stderr
        if ctx.command.name not in quiet and ctx.params.get("output", "-") == "-":
            raise Failed("cannot write the output: standard output is closed")


def _silence_stdout() -> None:
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


class Group(click.Group):
    command_class = Command
    context_class = Context

    def make_context(self, *args, **kwargs):
        with one_line_errors():
            return super().make_context(*args, **kwargs)

    def resolve_command(self, ctx, args):
        with one_line_errors():
            return super().resolve_command(ctx, args)


# -- shared options ---------------------------------------------------------------------------

DB_HELP = "SQLite database file [env: CHATLOG_DB; default: ~/.local/share/chatlog/chatlog.db]"


def _db_value(ctx: click.Context, param: click.Parameter, value, text: bool = False):
    """--db after the command wins; else `chatlog --db PATH COMMAND`; else $CHATLOG_DB; else
    the per-user default. A Path (with `text`, the same as a str)."""
    from chatlog.config import db_text

    if ctx.get_parameter_source(param.name) not in (
        click.core.ParameterSource.COMMANDLINE,
    ):
        root = ctx.find_root()
        if root is not ctx and root.params.get("db"):
            value = root.params["db"]
    found = db_text(value or None)
    if text:
        return found
    from pathlib import Path

    return Path(found)


def db_option(fn=None, *, text: bool = False):
    """--db, declared once: every command takes it (and `chatlog --db PATH COMMAND` too). With
    `text`, the command gets it as a str."""
    if fn is None:
        return lambda f: db_option(f, text=text)
    return click.option(
        "--db",
        "db",
        type=click.Path(dir_okay=False),
        envvar="CHATLOG_DB",
        callback=(lambda ctx, param, value: _db_value(ctx, param, value, text=True)) if text else _db_value,
        help=DB_HELP,
    )(fn)


class When(click.ParamType):
    """A date or time as a person writes it (see chatlog.query.FORMS), as the stored format."""

    name = "when"

    def convert(self, value, param, ctx):
        from chatlog.query import BadDate, parse_when

        try:
            return parse_when(value)
        except BadDate as exc:
            self.fail(str(exc), param, ctx)


WHEN = When()


class Finite(click.FloatRange):
    """A FloatRange that also refuses nan (every comparison with it is false, so a range lets
    it through) and, with its `max`, inf: a timeout of either crashed the server's loop."""

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if value != value:
            self.fail("not a number", param, ctx)
        return value


YEAR = 365 * 24 * 3600.0


class SessionRef(click.ParamType):
    """A session id or `last`."""

    name = "id"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value == "last":
            return value
        text = str(value).strip()
        if text.lower() == "last":
            return "last"
        if text.isascii() and text.isdigit():
            return int(text)
        self.fail(f"invalid session id {value!r} (a number, or 'last')", param, ctx)


SESSION = SessionRef()


class ExportFormat(click.Choice):
    """The export formats: the names in chatlog.export's writer registry, looked up only when
    the option is used (or its help shown), so `chatlog --help` and `chatlog path` stay fast."""

    name = "format"

    def __init__(self):
        super().__init__(())

    @property
    def choices(self):
        from chatlog.export import WRITERS

        return tuple(WRITERS)

    @choices.setter
    def choices(self, value):
        pass  # click sets it in __init__; the registry is the one list


def filter_options(fn):
    """--handle, --host, --since, --until: the filters shared by sessions, export and prune."""
    fn = click.option("--until", type=WHEN, metavar="WHEN", help="Sessions started before WHEN.")(fn)
    fn = click.option(
        "--since", type=WHEN, metavar="WHEN",
        help="Sessions started at or after WHEN: now, today, yesterday, 2h, 3d, 1w, 2mo, 1y, a date, a time.",
    )(fn)
    fn = click.option("--host", metavar="ADDR", help="Only sessions from this client address.")(fn)
    fn = click.option("--handle", metavar="NAME", help="Only sessions with this handle (a room: one of its participants).")(fn)
    return fn


def utc_option(fn):
    return click.option("--utc", is_flag=True, help="Show times in UTC instead of local time.")(fn)


def timestamps_option(fn):
    return click.option(
        "-t", "--timestamps", is_flag=True, help="Each line with its time: [20:09:14] alice>hi"
    )(fn)


def json_option(fn):
    return click.option("--json", "as_json", is_flag=True, help="Output JSON.")(fn)


def csv_option(fn):
    return click.option("--csv", "as_csv", is_flag=True, help="Output CSV (with its header, even when empty).")(fn)


def pager_option(fn):
    return click.option(
        "--pager/--no-pager", default=True, show_default=True,
        help="At a terminal, page long output through $PAGER (else less -R).",
    )(fn)


def color_option(fn):
    return click.option(
        "--color/--no-color", default=None, help="Force colors on or off [default: auto, honours NO_COLOR]."
    )(fn)


def open_archive(db: Path):
    """The archive, opened for reading."""
    from chatlog.archive import open_archive as opener

    return opener(db)


def get_session(store, ident):
    """A session by id or `last`; a clear error otherwise."""
    s = store.session(ident) if ident == "last" or ident < 2**63 else None
    if s is None:
        raise Failed("no sessions recorded yet" if ident == "last" else f"no session {ident}")
    return s


def make_filters(handle=None, host=None, since=None, until=None, ids=()):
    from chatlog.query import Filters

    return Filters(handle=handle, host=host, since=since, until=until, ids=tuple(ids))


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="chatlog")
@click.option("--db", "db", type=click.Path(dir_okay=False), default=None,
              help=DB_HELP + " (for every command; each command takes --db too)")
def cli(db):
    """A turn-based TCP chat server that keeps a faithful, searchable, replayable transcript.

    Start the server with `chatlog serve 9999`, chat with `./chatclient HOST 9999`, then look back
    with `chatlog sessions`, `chatlog show last` and `chatlog search WORD`.
    """


def _handle_name(ctx, param, value):
    from chatlog.protocol import valid_handle
    from chatlog.sanitize import is_safe

    if not valid_handle(value):
        raise click.BadParameter("a handle is 1 to 10 characters, with no spaces and no '>'")
    if not is_safe(value):
        # A byte that is not UTF-8 (a surrogate here) crashed the server at its first answer;
        # a control character would reach every old client's terminal raw.
        raise click.BadParameter("a handle has no control characters and only valid UTF-8")
    return value


def _duration(ctx, param, value):
    if value is None:
        return None
    from chatlog.query import BadDate, duration_seconds

    try:
        seconds = duration_seconds(value)
    except BadDate as exc:
        raise click.BadParameter(str(exc)) from None
    if seconds <= 0:
        raise click.BadParameter(f"{value!r} keeps nothing: give a period such as 90d")
    return seconds


@cli.command()
@click.argument("port", type=click.IntRange(0, 65535))
@click.option("--bind", metavar="ADDR", help="Address to listen on [default: every interface, IPv6 and IPv4]")
@click.option(
    "--handle", default="SERVER", show_default=True, metavar="NAME", callback=_handle_name,
    help="The operator's handle, sent to clients and recorded.",
)
@click.option(
    "--idle-timeout",
    type=Finite(min=0, min_open=True, max=YEAR),
    default=300.0,
    show_default=True,
    metavar="SECONDS",
    help="Drop a client that sends nothing for this long on its turn.",
)
@click.option(
    "--first-timeout",
    type=Finite(min=0, min_open=True, max=YEAR),
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
    "--rate", type=Finite(min=0, max=1e9), default=20.0, show_default=True, metavar="LINES",
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
@click.option(
    "--tls-port", type=click.IntRange(0, 65535), metavar="TLSPORT",
    help="Also listen for TLS on TLSPORT, into the same conversation (0 picks a free port).",
)
@click.option("--tls-only", is_flag=True, help="PORT itself speaks TLS; no plain listener.")
@click.option(
    "--tls-cert", type=click.Path(dir_okay=False), metavar="FILE",
    help="The server's certificate (PEM, with its chain). Without it, a self-signed one is made once and kept beside the database.",
)
@click.option("--tls-key", type=click.Path(dir_okay=False), metavar="FILE", help="The key of --tls-cert (PEM).")
@click.option(
    "--tls-handshake-timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True, metavar="SECONDS",
    help="Close a TLS connection whose handshake is not done by then.",
)
@click.option(
    "--name", "room_name", callback=_room_name, metavar="NAME",
    help="A room's name, kept in the record: every run of the same name is the same room "
    "[default: room-PORT].",
)
@click.option(
    "--history", type=click.IntRange(0, 1000), default=None, metavar="N",
    help="A client that joins a room is first shown its last N lines, earlier runs' too, marked "
    "as history (0: none) [default: 20].",
)
@click.option(
    "--link", "link_url", metavar="URL",
    help="A room across servers: link it through a NATS JetStream broker (nats://[USER:PASS@]HOST:4222, "
    "or tls://...). Every server with the same --name on that broker is one room.",
)
@click.option("--link-creds", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="A NATS credentials file for --link.")
@click.option("--link-ca", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="The CA that signed the broker's certificate (TLS to the broker).")
@click.option("--link-replicas", type=click.IntRange(1, 5), default=1, show_default=True, metavar="N",
              help="Copies of the room's stream a NATS cluster keeps, when this server creates it (3 on a "
              "3-node cluster: the room survives a node).")
@click.option(
    "--no-operator", is_flag=True,
    help="Nobody is at the console: stdin is never read and the server runs until SIGTERM (1:1 "
    "clients are recorded, not answered, and told so). Also when stdin is /dev/null or the server "
    "was started in the background (&).",
)
@click.option("--retain", metavar="DURATION", callback=_duration,
              help="Keep the record this long (90d, 12w, 36h): sessions that ended earlier are removed in "
              "the background, at start and hourly, in small steps no chat waits on [default: keep all].")
@click.option("--color/--no-color", default=None, help="Force colors on or off [default: auto, honours NO_COLOR].")
@db_option
def serve(
    port, bind, handle, idle_timeout, first_timeout, max_waiting, per_address, room, max_clients, rate,
    burst, fsync, tls_port, tls_only, tls_cert, tls_key, tls_handshake_timeout, room_name, history, link_url,
    link_creds, link_ca, link_replicas, no_operator, retain, color, db,
):
    """Listen on PORT and chat with one client at a time (or, with --room, with many at once),
    recording everything.

    The client speaks first; answer at the SERVER> prompt. Type \\quit to end a chat. Clients that
    connect meanwhile wait their turn (and are told their place). Answers can be scripted by
    piping them in; the server stops when its input ends:

        printf 'hi\\nbye\\n' | chatlog serve 9999

    In a room (--room), clients type at any time and each line goes to everyone else; the
    operator's lines go to everyone. At the prompt: \\who lists who is here, \\history N shows
    the room's last lines, \\kick NAME removes someone, \\quit closes the room. A client that
    joins is shown the room's last lines (--history), from earlier runs of the same --name too.
    With --link nats://HOST:4222, servers with the same --name on one NATS JetStream broker are
    one room: every server commits every line in the room's one order before relaying it.

    PORT 0 picks a free port (it is printed). Ctrl-C, SIGTERM or SIGHUP stops the server, closing
    every chat cleanly. Every message is committed before it is shown or answered.

    Unattended (--no-operator, stdin /dev/null as under systemd, or started with &): nothing is
    read from the terminal, and it runs until SIGTERM.
    """
    import signal

    from chatlog import modes
    from chatlog.config import db_path
    from chatlog.db import StoreError
    from chatlog.operator import unattended
    from chatlog.recorder import open_recorder
    from chatlog.render import Renderer
    from chatlog.server import serve as run_server
    from chatlog.tls import TlsSetupError
    from chatlog.transport import ServeError, listen, raise_open_files_limit

    if not room and (room_name is not None or history is not None):
        raise click.UsageError(f"{'--name' if room_name is not None else '--history'} is for a room (--room)")
    if not room and (link_url or link_creds or link_ca):
        raise click.UsageError("--link is for a room (--room)")
    link = None
    if link_url:
        from chatlog.link import BrokerLink, CredsError

        try:
            link = BrokerLink(link_url, creds=link_creds, ca=link_ca, replicas=link_replicas)
        except CredsError as exc:
            raise click.BadParameter(str(exc), param_hint="--link-creds") from None
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--link") from None
    elif link_creds or link_ca:
        raise click.UsageError("--link-creds and --link-ca go with --link URL")
    try:
        recorder = open_recorder(db_path(db), fsync=fsync) if fsync else open_recorder(db_path(db))
    except StoreError as exc:
        raise Failed(str(exc)) from None
    attended = not (no_operator or unattended(sys.stdin))
    saved = {}  # signal dispositions changed here, put back on the way out (serve may run in-process)
    if not attended:
        # Nothing reads the terminal, and a background job that writes to it (or a stray
        # terminal call) is never stopped for it; the terminal's modes are left alone.
        for sig in (signal.SIGTTOU, signal.SIGTTIN):
            saved[sig] = signal.signal(sig, signal.SIG_IGN)
    try:
        raise_open_files_limit()
        if room:
            mode = modes.room_mode(
                recorder, handle=handle, max_clients=max_clients, per_address=per_address, rate=rate, burst=burst,
                attended=attended, name=room_name, history=20 if history is None else history,
            )
            if link is not None:
                from chatlog.link import linked_room_mode

                mode = linked_room_mode(mode, recorder, link)
        else:
            mode = modes.chat_mode(
                recorder, handle=handle, idle_timeout=idle_timeout, first_timeout=first_timeout,
                max_waiting=max_waiting, per_address=per_address, attended=attended,
            )
        tls = None
        if tls_only or tls_port is not None or tls_cert or tls_key:
            from chatlog.tls import server_cert

            if tls_only and tls_port is not None:
                raise Failed("--tls-only makes PORT speak TLS: leave out --tls-port")
            if not (tls_only or tls_port is not None):
                raise Failed("--tls-cert and --tls-key need --tls-port TLSPORT or --tls-only")
            tls = server_cert(db_path(db), tls_cert, tls_key, tls_handshake_timeout)
        sockets = [] if tls_only else listen(bind, port, backlog=mode.backlog)
        tls_sockets = []
        if tls_only:
            tls_sockets = listen(bind, port, backlog=mode.backlog)
        elif tls_port is not None:
            tls_sockets = listen(bind, tls_port, backlog=mode.backlog)
        retention = None
        if retain is not None:
            from chatlog.retention import Retention

            retention = Retention(db_path(db), retain)
        run_server(mode, sockets, Renderer(color=color), sys.stdin if attended else None, bind=bind,
                   tls_sockets=tls_sockets, tls=tls, retention=retention)
    except (ServeError, StoreError, TlsSetupError) as exc:
        raise Failed(str(exc)) from None
    finally:
        try:
            if link is not None:
                link.close()  # what was published last (its clients' leaving) goes out
            recorder.close()
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)


@cli.command()
@db_option(text=True)
def path(db):
    """Print the path of the database file."""
    click.echo(str(db))


# -- reading the transcript -------------------------------------------------------------------


@cli.command()
@click.option("-n", "--limit", type=click.IntRange(min=0), default=20, show_default=True, help="How many (0 for all).")
@filter_options
@click.option("--verified", is_flag=True,
              help="Only sessions with a verified handle (bound to its client certificate); a room: any participant's.")
@click.option("--kind", type=click.Choice(["chat", "room"]), help="Only 1:1 chats, or only rooms.")
@utc_option
@json_option
@csv_option
@db_option
def sessions(limit, handle, host, since, until, verified, kind, utc, as_json, as_csv, db):
    """List past conversations, newest first."""
    from chatlog import views

    filters = make_filters(handle, host, since, until)
    filters.verified, filters.kind = verified, kind
    rows = open_archive(db).sessions(filters, limit)
    if as_json:
        views.sessions_json(rows)
    elif as_csv:
        views.sessions_csv(rows)
    elif rows:
        views.sessions_table(rows, utc)
    if not rows:
        raise Nothing("no sessions match" if any((handle, host, since, until, verified, kind))
                      else "no sessions recorded yet")


@cli.command()
@click.argument("session_id", metavar="ID", type=SESSION)
@utc_option
@timestamps_option
@color_option
@pager_option
@click.option("--json", "as_json", is_flag=True, help="Output the session and its messages as JSON.")
@db_option
def show(session_id, utc, timestamps, color, pager, as_json, db):
    """Print a whole conversation, as the server console showed it. ID may be `last`."""
    from chatlog import views
    from chatlog.render import Renderer

    store = open_archive(db)
    s = get_session(store, session_id)
    if as_json:
        return views.show_json(s, store.messages(s.id), store.room_addresses(s.id) if s.kind == "room" else None)
    with views.paged(pager) as out:
        views.show(s, store.messages(s.id), Renderer(out, color=color), utc, timestamps)


@cli.command()
@click.argument("session_id", metavar="ID", type=SESSION)
@click.option("--speed", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True, help="Playback speed.")
@click.option(
    "-i", "--idle-limit", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
    help="Cap every recorded pause at SECONDS, before --speed applies (like asciinema -i).",
)
@click.option("--instant", is_flag=True, help="Print everything at once.")
@click.option("--follow", is_flag=True, help="Follow the session live as it is written (like tail).")
@timestamps_option
@utc_option
@db_option
def replay(session_id, speed, idle_limit, instant, follow, timestamps, utc, db):
    """Play a conversation back with its original timing. ID may be `last`.

    Space pauses and resumes; Ctrl-C stops. Into a pipe it prints without waiting.
    """
    from chatlog import replay as player
    from chatlog import transcript
    from chatlog.render import Renderer
    from chatlog.views import console_lines

    store = open_archive(db)
    s = get_session(store, session_id)
    r = Renderer()
    if follow:
        return _follow(store, r, s, timestamps, utc)
    lines = console_lines(transcript.events(s, player.paged_messages(store, s.id)), r, timestamps, utc)
    frames = player.schedule(lines, speed, idle_limit)
    tty = sys.stdout.isatty()
    try:
        if tty and sys.stdin.isatty() and not instant:
            with player.Keys() as keys:
                player.play(frames, r.write, keys=keys)
        else:
            player.play(frames, r.write, instant=instant or not tty)
    except KeyboardInterrupt:
        click.echo("\nreplay stopped", err=True)
        sys.exit(130)


def _follow(store, r, session=None, timestamps=False, utc=False, last=None):
    from chatlog.replay import Follower

    follower = Follower(store, r, timestamps=timestamps, utc=utc)
    try:
        if session is not None:
            follower.session(session, last)
        else:
            follower.run(last)
    except KeyboardInterrupt:
        sys.exit(0)


@cli.command()
@click.argument("session_id", metavar="[ID]", type=SESSION, required=False)
@click.option(
    "-n", "--lines", "last", type=click.IntRange(min=0), default=None, metavar="N",
    help="Start from the last N lines of the session in progress [default: all of it].",
)
@timestamps_option
@utc_option
@db_option
def tail(session_id, last, timestamps, utc, db):
    """Watch conversations live, from another terminal, as the server records them.

    With no ID it follows the chat in progress (or waits for the next one to begin) and every one
    that begins after it, in order, however short; with an ID it stops when that session ends.
    Before anything is recorded (even before the database exists) it waits for the first
    session. Ctrl-C stops.
    """
    from chatlog.render import Renderer

    r = Renderer()
    if session_id is None:
        store = _wait_for_archive(db, r)
        if store is None:
            sys.exit(0)
        return _follow(store, r, None, timestamps, utc, last)
    store = open_archive(db)
    _follow(store, r, get_session(store, session_id), timestamps, utc, last)


def _wait_for_archive(db: Path, r, poll: float = 0.2):
    """The archive, once there is one to read (the server creates it on its first start)."""
    import time

    from chatlog.db import StoreError

    said = False
    try:
        while True:
            if db.exists() and (db.stat().st_size > 0 or not db.is_file()):
                try:
                    return open_archive(db)
                except StoreError:
                    if db.stat().st_size >= 512 or not db.is_file():  # a real error, not a file being made
                        raise
            if not said:
                r.event("Waiting for a session to start...")
                said = True
            time.sleep(poll)
    except KeyboardInterrupt:
        return None


@cli.command()
@click.argument("session_ids", metavar="[ID]...", type=SESSION, nargs=-1)
@filter_options
@click.option("--all", "everything", is_flag=True, help="Export every session (the default when no ID or filter is given).")
@click.option(
    "-f", "--format", "fmt", type=ExportFormat(),
    default=None, help="Output format [default: from the -o extension, else txt].",
)
@click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True), default="-", help="Output file [default: stdout].")
@click.option(
    "--after-id", type=click.IntRange(min=0), metavar="N",
    help="Only the messages with an id above N (json, jsonl, csv: every message has its `id`).",
)
@click.option(
    "--cursor", type=PathParam(dir_okay=False), metavar="FILE",
    help="Incremental: only messages newer than the id FILE holds (all, if FILE does not exist yet); "
         "once the output is written, FILE is updated to the newest id seen. For cron: "
         "`chatlog export -f jsonl --cursor F >> log.jsonl` appends each message exactly once.",
)
@timestamps_option
@utc_option
@db_option
def export(session_ids, handle, host, since, until, everything, fmt, output, after_id, cursor, timestamps, utc, db):
    """Write conversations out as txt, md, json, jsonl, csv, html or an asciinema cast.

    Give session IDs (or `last`), or filters, or nothing for all sessions. Exports stream, so
    memory stays flat however large the archive. --timestamps applies to txt and md, --utc to
    txt, md and html.
    --after-id and --cursor export the newer messages (json, jsonl, csv), in id order.
    """
    from chatlog import export as exporters

    if fmt is None:
        fmt = exporters.format_for(output)
    if after_id is not None or cursor is not None:
        return _export_after(session_ids, handle, host, since, until, fmt, output, after_id, cursor, db)
    store = open_archive(db)
    ids = [get_session(store, i).id for i in session_ids]
    filters = make_filters(handle, host, since, until, ids)
    chosen = store.session_ids(filters)
    if not chosen:
        raise Nothing(
            "no sessions match; nothing exported" if (ids or any((handle, host, since, until)))
            else "no sessions recorded yet; nothing exported"
        )
    options = exporters.Options(timestamps=timestamps, utc=utc, headings=len(chosen) > 1, sessions=len(chosen))
    exporters.run(store, chosen, fmt, output, filters, options)
    if output != "-":
        from chatlog.sanitize import visible

        click.echo(visible(f"wrote {plural(len(chosen), 'session')} to {output} ({fmt})"), err=True)


class Cursor:
    """A cursor file, held for the whole export: a second export on the same cursor (an overlapping
    cron run) waits, then starts where the first ended, so no message is written twice. The lock
    is flock(2) on the file; the file is replaced by a rename, so a waiter that finds the name
    pointing to another file once it holds the lock opens it again."""

    def __init__(self, path: Path):
        import fcntl
        import stat

        self.path = path
        while True:
            try:
                try:
                    self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                    self.created = True
                except FileExistsError:  # (O_NONBLOCK: a FIFO given as the cursor must not hang)
                    self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
                    self.created = False
            except OSError as exc:
                raise Failed(f"cannot open the cursor file {path}: {exc.strerror or exc}") from None
            if not stat.S_ISREG(os.fstat(self.fd).st_mode):
                os.close(self.fd)
                raise Failed(f"the cursor file {path} is not a regular file")
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                same = os.stat(path).st_ino == os.fstat(self.fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(self.fd)  # replaced (or removed) while we waited: the newer file counts

    def read(self) -> int:
        """The message id the file holds (0 for a file just made); one line if it is bad."""
        try:
            text = os.read(self.fd, 64).decode("utf-8", errors="replace")
        except OSError as exc:
            raise Failed(f"cannot read the cursor file {self.path}: {exc.strerror or exc}") from None
        if self.created and not text:
            return 0
        value = text.strip()
        if not (value.isascii() and value.isdigit() and len(value) <= 18):
            from chatlog.sanitize import visible

            shown = visible(value[:20]) if value else "nothing"
            raise Failed(f"bad cursor file {self.path}: it should hold one message id (a whole number), not {shown}")
        return int(value)

    def write(self, last_id: int) -> None:
        """Replace the file at once: a temporary file beside it, synced, renamed over it."""
        from chatlog.export import replace_file

        try:
            replace_file(self.path, lambda f: f.write(f"{last_id}\n"), sync=True)
        except OSError as exc:
            raise Failed(f"cannot write the cursor file {self.path}: {exc.strerror or exc}") from None
        self.created = False

    def close(self) -> None:
        """Let the next export have it; a file made by this run and never written is removed."""
        if self.created:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        os.close(self.fd)


def _export_after(session_ids, handle, host, since, until, fmt, output, after_id, cursor, db):
    """An incremental export: the messages above an id, read in one snapshot of the archive."""

    if after_id is not None and cursor is not None:
        raise Failed("give --after-id or --cursor, not both")
    if fmt not in ("json", "jsonl", "csv"):
        raise Failed(f"--after-id and --cursor export json, jsonl or csv (not {fmt}): each message with its id")
    held = Cursor(cursor) if cursor is not None else None
    try:
        _export_after_id(open_archive(db), session_ids, handle, host, since, until, fmt, output,
                         held.read() if held else after_id, held)
    finally:
        if held:
            held.close()


def _export_after_id(store, session_ids, handle, host, since, until, fmt, output, start, cursor):
    from chatlog import export as exporters

    with store.snapshot() as upto:
        ids = [get_session(store, i).id for i in session_ids]
        filtered = bool(ids) or any((handle, host, since, until))
        chosen = set(store.session_ids(make_filters(handle, host, since, until, ids))) if filtered else None
        if upto <= start:  # nothing is written: not even a header onto what a cron job appends to
            click.echo(f"nothing new after message {start}", err=True)
            return
        # A cursor's later runs append to stdout (`>> log.csv`): the csv header only on its first.
        header = not (cursor is not None and start > 0 and output == "-")
        complete = exporters.run(
            store, [], fmt, output, None, exporters.Options(header=header),
            source=lambda typed: store.export_after(start, upto, chosen, typed=typed),
        )
    if not complete:
        raise Failed("the output was not all written (its reader went away); the cursor is left as it was")
    if cursor is not None:
        cursor.write(upto)


@cli.command()
@click.argument("query", nargs=-1, required=True)
@click.option("--raw", is_flag=True, help="QUERY is SQLite FTS5 syntax (AND, OR, NEAR, prefix*).")
@click.option("--handle", metavar="NAME", help="Only messages from this handle.")
@click.option("--since", type=WHEN, metavar="WHEN", help="Only messages at or after WHEN (2026-11-24, 2h, 3d).")
@click.option("--until", type=WHEN, metavar="WHEN", help="Only messages before WHEN.")
@click.option("--session", "session_id", type=SESSION, metavar="ID", help="Only messages of this session (or `last`).")
@click.option("-n", "--limit", type=click.IntRange(min=0), default=20, show_default=True, help="How many hits (0 for all).")
@click.option("--best", is_flag=True, help="Best match first, instead of newest first.")
@click.option("-c", "--count", is_flag=True, help="Print only how many messages match.")
@utc_option
@json_option
@csv_option
@pager_option
@db_option
def search(query, raw, handle, since, until, session_id, limit, best, count, utc, as_json, as_csv, pager, db):
    """Find words across every conversation (full-text search).

    Words are matched as typed: hyphens and quotes need no escaping. "an exact phrase" in
    quotes matches those words in order, and word* matches every word starting with it. Each hit
    shows the session, the time, the handle and the line with the match highlighted.
    """
    from chatlog import views
    from chatlog.db import BadQuery
    from chatlog.render import Renderer

    text = " ".join(query)
    store = open_archive(db)
    session = get_session(store, session_id).id if session_id is not None else None
    try:
        hits = store.search(text, raw=raw, handle=handle, since=since, until=until, session=session, limit=limit,
                            best=best, count=count)
    except BadQuery as exc:
        raise Failed(str(exc)) from None
    if store.unindexed:
        n = store.unindexed
        what = "the newest message is" if n == 1 else f"the {n} newest messages are"
        why = " (the archive is read-only here)" if store.db.read_only else ""
        click.echo(f"chatlog: {what} not indexed yet{why}, so this search did not see {'it' if n == 1 else 'them'}",
                   err=True)
    if count:
        click.echo(str(hits))
        return
    if as_json:
        views.search_json(hits)
    elif as_csv:
        views.search_csv(hits)
    elif hits:
        with views.paged(pager) as out:
            views.search_hits(hits, Renderer(out), utc)
    if not hits:
        raise Nothing(f"no messages match {text!r}")


@cli.command()
@json_option
@db_option
def stats(as_json, db):
    """Totals: sessions, messages, handles, hosts, busiest handles, average length."""
    from chatlog import views
    from chatlog.render import Renderer

    from chatlog.stats import totals

    st = totals(open_archive(db))
    if as_json:
        views.dump_json(st)
    else:
        views.stats_text(st, Renderer())


@cli.command()
@click.argument("session_ids", metavar="[ID]...", type=SESSION, nargs=-1)
@click.option(
    "--message", "message_ids", metavar="MSGID", type=click.IntRange(min=1), multiple=True,
    help="Remove this one message (its id: see export -f jsonl, search --json) instead of a session: its text, "
         "raw bytes and search entry go, a tombstone '(message removed ...)' stays in its place. Repeatable.",
)
@click.option("-n", "--dry-run", is_flag=True, help="Say what would be removed, and remove nothing.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@db_option
def rm(session_ids, message_ids, dry_run, yes, db):
    """Delete sessions, with their messages and search entries; or, with --message, single messages."""
    if message_ids:
        if session_ids:
            raise Failed("give session IDs or --message, not both")
        return _remove_messages(sorted(set(message_ids)), dry_run, db)
    if not session_ids:
        raise click.UsageError("give the session IDs to delete, or --message MSGID")
    store = open_archive(db)
    chosen = [get_session(store, i) for i in session_ids]
    held = store.held([s.id for s in chosen])
    for s in chosen:
        if s.id in held:
            raise Failed(f"session {s.id} is being recorded by a running server ({held[s.id]}); it can be deleted once it has ended")
        if s.ended_at is None:
            raise Failed(f"session {s.id} is still in progress; it can be deleted once it has ended")
    if dry_run:
        ids = sorted({s.id for s in chosen})
        click.echo(f"would delete {plural(len(ids), 'session')}: {', '.join(map(str, ids))}", err=True)
        return
    _delete(store, sorted({s.id for s in chosen}), yes)


def _remove_messages(ids, dry_run, db):
    from chatlog.upkeep import Upkeep

    up = Upkeep(open_archive(db))
    found = up.messages_to_remove(ids)
    missing = sorted(set(ids) - {r[0] for r in found})
    if missing:
        raise Failed(f"no message {missing[0]} (or it is a join, a leave or a trace, which are not messages)")
    todo = [r[0] for r in found if r[3] is None]
    for mid, sid, _, removed in found:
        if removed is not None:
            click.echo(f"message {mid} (session {sid}) was already removed, at {visible_text(removed)}", err=True)
    if dry_run:
        for mid, sid, handle, removed in found:
            if removed is None:
                click.echo(visible_text(f"would remove message {mid} (session {sid}, from {handle or 'nobody'})"),
                           err=True)
        return
    up.remove_messages(todo)
    for mid, sid, handle, removed in found:
        if removed is None:
            click.echo(visible_text(f"removed message {mid} (session {sid}, from {handle or 'nobody'})"), err=True)


def visible_text(text: str) -> str:
    from chatlog.sanitize import visible

    return visible(str(text))


@cli.command()
@click.option("--handle", metavar="NAME", required=True, help="Whose lines to remove: in 1:1 chats and rooms alike.")
@click.option("--host", metavar="ADDR", help="Only NAME's lines from this client address (in a linked room, "
              "lines said on another server are left: their address is not known here).")
@click.option("-n", "--dry-run", is_flag=True, help="Say what would be removed, and remove nothing.")
@db_option
def forget(handle, host, dry_run, db):
    """Remove every line a person said, leaving tombstones in place.

    Each message's text, raw bytes and search entry go; '(message removed ...)' stays where it
    was, so sequence numbers and replays stay whole. Done in small transactions, safe beside a
    running server. The server's answers, joins and leaves are kept."""
    from chatlog.upkeep import Upkeep

    up = Upkeep(open_archive(db))
    found = up.said_by(handle, host)
    who = handle + (f" at {host}" if host else "")
    if not found:
        click.echo(visible_text(f"no messages from {who} to remove"), err=True)
        return
    sessions = sorted({sid for _, sid in found})
    what = f"{plural(len(found), 'message')} from {who} in {plural(len(sessions), 'session')}"
    if dry_run:
        click.echo(visible_text(f"would remove {what} ({_id_list(sessions)})"), err=True)
        return
    n = up.remove_messages([mid for mid, _ in found])
    if n != len(found):  # some were removed meanwhile by another run
        what = f"{plural(n, 'message')} from {who}"
    click.echo(visible_text(f"removed {what} ({_id_list(sessions)})"), err=True)


def _id_list(ids: list[int]) -> str:
    shown = ", ".join(map(str, ids[:10]))
    return f"session{'s' if len(ids) > 1 else ''} {shown}" + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")


@cli.command()
@click.option("--before", type=WHEN, metavar="WHEN", required=True, help="Delete sessions started before WHEN (a date, or 30d...).")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@db_option
def prune(before, yes, db):
    """Delete every session that started before a date."""
    store = open_archive(db)
    filters = make_filters(until=before)
    everything = store.session_ids(filters)
    filters.ended_only = True
    ids = store.session_ids(filters)
    if len(ids) < len(everything):
        n = len(everything) - len(ids)
        live = len(store.held(sorted(set(everything) - set(ids))))
        click.echo(f"leaving {plural(n, 'session')} still in progress"
                   + (f" ({live} recorded by a running server)" if live else ""), err=True)
    if not ids:
        raise Nothing("nothing to prune: no ended sessions started before then")
    _delete(store, ids, yes)


def _delete(store, ids, yes):
    n = len(ids)
    what = f"session {ids[0]} and its" if n == 1 else f"{n} sessions and their"
    if not yes:
        click.confirm(f"Delete {what} messages?", abort=True)
    from chatlog.upkeep import Upkeep

    deleted = Upkeep(store).delete_sessions(ids)
    click.echo(f"deleted {plural(deleted, 'session')}", err=True)


@cli.command()
@click.argument("sources", metavar="DB...", nargs=-1, required=True,
                type=PathParam(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=PathParam(dir_okay=False), metavar="ALL.db",
              help="The merged archive (created, or added to: merging the same archives again changes nothing; "
                   "never a server's own archive or a copy of one).")
def merge(sources, output):
    """One archive from several servers' archives (a room linked with `serve --link`, and each
    server's own sessions).

    A linked room becomes one session per room name, each line once (by its origin server and
    id), in the room's stream order; every other session is copied with its server named. The
    sources are only read. `sessions`, `show`, `search` and `export` work on the result.

    Merge into the same output as often as you like (a nightly job): what came since is added,
    a chat still going on is completed, and lines `forget` removed since are removed. A merged
    archive can be a source beside the archives it came from. All or nothing: a source it cannot
    read, a busy output or Ctrl-C leaves the output as it was.
    """
    import signal

    from chatlog.db import StoreError
    from chatlog.merge import merge as run_merge

    class Stopped(BaseException):  # (not an Exception: nothing on the way may take it for an error)
        pass

    def stop(signum, frame):
        raise Stopped(signum)

    # Stopped midway (a service manager's SIGTERM, a closed terminal's SIGHUP), the merge's one
    # transaction is rolled back and an output it began is removed, as after Ctrl-C.
    def done():  # committed: a signal now is too late to stop anything, and is let go
        for sig in saved:
            signal.signal(sig, signal.SIG_IGN)

    existed = output.exists()
    saved = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    saved[signal.SIGINT] = signal.getsignal(signal.SIGINT)
    try:
        added = run_merge(list(sources), output, on_commit=done)
    except StoreError as exc:
        raise Failed(str(exc)) from None
    except Stopped as exc:
        signum = exc.args[0]
        err = Failed(f"merge stopped by {signal.Signals(signum).name}; "
                     + (f"{output} is left as it was" if existed else f"{output} was not made"))
        err.exit_code = 128 + signum
        raise err from None
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    from chatlog.sanitize import visible

    click.echo(f"merged {plural(len(sources), 'archive')} into {visible(str(output))}: "
               f"{plural(added['sessions'], 'new session')}, {plural(added['messages'], 'new message')}", err=True)


@cli.command()
@click.argument("dest", type=PathParam())
@click.option("-f", "--force", is_flag=True, help="Overwrite DEST if it exists.")
@db_option
def backup(dest, force, db):
    """Write a consistent copy of the database to DEST, safely, even while the server runs.

    DEST may be a directory: the copy is DEST/<the database's file name>. An existing file is
    left alone unless --force is given.
    """
    from chatlog.upkeep import Upkeep

    store = open_archive(db)
    if dest.is_dir():
        dest = dest / store.path.name
    if store.is_database_file(dest):
        raise Failed(f"the backup must not overwrite the database or its files ({dest})")
    if dest.exists() and not force:
        raise Failed(f"{dest} already exists (use --force to overwrite it)")
    try:
        Upkeep(store).backup(dest)
    except OSError as exc:
        raise Failed(f"cannot write {dest}: {exc.strerror}") from None
    from chatlog.sanitize import visible

    click.echo(visible(f"backed up {store.path} to {dest}"), err=True)


@cli.command()
@click.option("--forget", "forget", metavar="NAME", help="Release NAME's binding: anyone may take the handle again.")
@json_option
@db_option
def identities(forget, as_json, db):
    """List handles bound to a client certificate (first used over TLS with one), or --forget one.

    A bound handle may be used only with its certificate; a plain client, another certificate,
    or a look-alike handle is refused (and recorded, not relayed)."""
    import sqlite3

    from chatlog.db import StoreError, connect
    from chatlog.sanitize import visible

    try:
        store = connect(db, create=False, read_only=forget is None)
    except StoreError as exc:
        raise Failed(str(exc)) from None
    conn = store.conn
    try:
        rows = conn.execute(
            "SELECT handle, fingerprint, first_seen, last_seen, sessions FROM identities ORDER BY handle"
        ).fetchall()
    except sqlite3.OperationalError:
        rows = []  # an archive from before identities: nothing is bound
    if forget is not None:
        from chatlog.handles import keys

        wanted = keys(forget)
        gone = [r[0] for r in rows if isinstance(r[0], str) and keys(r[0]) & wanted]
        if not gone:
            raise Failed(visible(f"no handle like {forget} is bound to a certificate"))
        with conn:
            conn.executemany("DELETE FROM identities WHERE handle = ?", [(h,) for h in gone])
        click.echo(visible(f"released {', '.join(gone)} (a running server keeps its own list until it restarts)"), err=True)
        return
    if as_json:
        import json

        click.echo(json.dumps([dict(zip(("handle", "fingerprint", "first_seen", "last_seen", "sessions"), r, strict=True))
                               for r in rows], indent=1, default=str))
        return
    if not rows:
        raise Nothing("no handle is bound to a certificate yet")
    for handle, fp, first, last, n in rows:
        click.echo(visible(f"{handle!s:<12} {fp!s}  first {first!s}  last {last!s}  sessions {n!s}"))


@cli.command()
@click.option("--bind", default="127.0.0.1", show_default=True, metavar="ADDR",
              help="Address to listen on. Anything but loopback needs --token or --token-file.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port to listen on (0 picks a free one; it is printed).")
@click.option("--token", metavar="TOKEN", help="A token the browser must give (asked for by a page) [env: CHATLOG_WEB_TOKEN].",
              envvar="CHATLOG_WEB_TOKEN")
@click.option("--token-file", type=PathParam(dir_okay=False), metavar="FILE",
              help="Read the token from FILE (kept out of the process list).")
@db_option
def web(bind, port, token, token_file, db):
    """Read, search, replay and follow the archive in a browser, read-only.

    Serves http://127.0.0.1:8080/ by default: the sessions (with the filters of `sessions`), each
    transcript as `show` prints it with a link per line, search (`search` syntax), replay with
    its timing, a session in progress followed live, and every export format as a download.
    Lists, transcripts and search work with JavaScript off. Ctrl-C stops.
    """
    from chatlog.web.app import is_loopback

    if token is not None and token_file is not None:
        raise click.UsageError("--token and --token-file: give one")
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise Failed(f"cannot read the token file {token_file}: {getattr(exc, 'strerror', None) or exc}") from None
        if not token:
            raise Failed(f"the token file {token_file} is empty")
    if token is not None and not token.strip():
        raise Failed("the token is empty")
    if not is_loopback(bind) and not token:
        raise Failed(f"binding to {bind} needs --token or --token-file: anyone who can reach it could read the archive")
    from chatlog.web.app import run

    from chatlog.archive import open_archive as opener

    opener(db, read_only=True).close()  # a missing or unreadable archive is one line now, not a page later
    try:
        run(db, bind, port, token, sys.stdout)
    except OSError as exc:
        raise Failed(f"cannot listen on {bind} port {port}: {exc.strerror or exc}") from None
