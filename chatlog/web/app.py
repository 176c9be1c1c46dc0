"""The web app: Starlette routes over the archive, opened read-only for each request.

Every page is read through the same modules as the terminal commands: the session list and its
filters (`archive.sessions`, `query.Filters`), a transcript through the one read model
(`transcript.events`), search (`archive.search`, the `chatlog search` syntax), downloads through
the export writers. Archive text reaches a page only through `sanitize.html_text` (the HTML
rule: made visible, then escaped), in templates as the `t` filter and in the streamed lines
directly; Jinja2's autoescape is on underneath. No inline script and no asset from elsewhere:
the Content-Security-Policy says so to the browser.

A transcript is streamed: the page's head goes out before the first message is read, and lines
follow in batches, read a page of messages at a time (no read transaction stays open).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import queue
import threading
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlencode

import anyio
import jinja2
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from chatlog import transcript
from chatlog.archive import Archive, open_archive
from chatlog.db import BadQuery, StoreError
from chatlog.query import BadDate, Filters, parse_when
from chatlog.records import HL_END, HL_START, Session
from chatlog.replay import paged_messages
from chatlog.sanitize import html_text
from chatlog.views import fmt_time, header_lines, session_row

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
PAGE = 50  # sessions a page of the list
MAX_PAGE = 1000
HITS = 50  # search hits shown
BATCH = 256  # transcript lines a chunk of the stream
POLL = 0.2  # seconds between looks at a followed session (a line shows within a second)
KEEPALIVE = 15.0  # seconds between comments on a quiet event stream (proxies drop idle ones)
FORMATS = {  # export format -> (file extension, content type)
    "txt": ("txt", "text/plain; charset=utf-8"),
    "md": ("md", "text/markdown; charset=utf-8"),
    "json": ("json", "application/json"),
    "jsonl": ("jsonl", "application/x-ndjson"),
    "csv": ("csv", "text/csv; charset=utf-8"),
    "html": ("html", "text/html; charset=utf-8"),
    "cast": ("cast", "application/x-asciicast"),
}
STATIC = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8",
          "icon.svg": "image/svg+xml"}
LINES_MARK = "<!--LINES-->"
COOKIE = "chatlog_token"
_KINDS = {  # an event's kind -> its class; a kind this page does not know yet is shown plainly
    transcript.CONNECTED: "event", transcript.BEGAN: "event", transcript.ENDED: "event",
    transcript.JOINED: "event", transcript.LEFT: "event", transcript.NOTE: "note",
    transcript.MESSAGE: "msg",
}
_ANCHORS = {transcript.CONNECTED: "start", transcript.BEGAN: "began", transcript.ENDED: "end"}


def text_of(value) -> str:
    """Any stored value as text (a crafted file may hold a number or a blob where text belongs)."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def e(value) -> str:
    """The one rule for archive text in a page: `sanitize.html_text`."""
    return html_text(text_of(value))


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("chatlog.web", "templates"),
        autoescape=True, trim_blocks=True, lstrip_blocks=True,
    )
    env.filters["t"] = lambda value: Markup(e(value))
    env.globals["when"] = lambda value: fmt_time(text_of(value), utc=True)
    return env


# -- a transcript as HTML lines -------------------------------------------------------------------


def line_html(ev: transcript.Event, where: dict | None = None, t: float | None = None) -> str:
    """One event as one line of the page (no newline inside: the event stream sends it whole).
    A message's anchor is its id (`/s/12#41`); the stamp links to it."""
    kind = _KINDS.get(ev.kind, "other")
    # A note on the message before it has no id of its own (the message has the anchor).
    anchor = str(ev.id) if ev.id is not None else _ANCHORS.get(ev.kind)
    at = e(ev.at)
    stamp = f'<time datetime="{at}">{transcript.clock(text_of(ev.at), utc=True)}</time>'
    stamp = f'<a class="ts" href="#{anchor}">{stamp}</a>' if anchor else f'<span class="ts">{stamp}</span>'
    attrs = f' id="{anchor}"' if anchor else ""
    if t is not None:
        attrs += f' data-t="{t:.6f}"'
    if kind == "msg" and ev.handle is not None:
        role = "server" if ev.sender == "server" else "client"
        mark = '<span class="v" title="verified: bound to its certificate">\u2713</span> ' if ev.verified else ""
        title = ""
        if where and ev.id in where:
            host, port = where[ev.id]
            title = f' title="{e(host)} port {e(port)}"'
        body = f'{mark}<span class="h {role}"{title}>{e(ev.handle)}&gt;</span>{e(ev.text)}'
    else:
        body = e(ev.text)
    return f'<div class="l {kind}"{attrs}>{stamp} <span class="x">{body}</span></div>'


class Reading:
    """A session's messages as they are read, keeping the last sequence number (where following
    picks up) and, in a room, the address of who said each line."""

    def __init__(self, store: Archive, s: Session):
        self.store, self.s = store, s
        self.seq = 0
        self.where: dict[int, tuple] | None = None
        self._by_seq = store.room_addresses(s.id) if s.kind == "room" else None
        if self._by_seq is not None:
            self.where = {}

    def __iter__(self):
        where, by_seq = self.where, self._by_seq
        for m in paged_messages(self.store, self.s.id):
            self.seq = m.seq
            if by_seq is not None and m.seq in by_seq:
                where[m.id] = by_seq[m.seq]
            yield m


def transcript_lines(s: Session, reading: Reading, timed: bool) -> Iterator[str]:
    """The session's lines, in batches; with `timed`, each with its time from the first line
    (replay's clock: `replay.relative`, never going backwards)."""
    batch: list[str] = []
    first = None
    t = 0.0
    seen = None
    for ev in transcript.events(s, reading):
        if timed and ev.at != seen:
            seen = ev.at
            when = transcript.parse_time(text_of(ev.at))
            if when is not None:
                first = first or when
                t = max(t, (when - first).total_seconds())
        batch.append(line_html(ev, reading.where, t if timed else None))
        if len(batch) >= BATCH:
            yield "\n".join(batch) + "\n"
            batch.clear()
    if batch:
        yield "\n".join(batch) + "\n"


# -- the app --------------------------------------------------------------------------------------


class Web:
    def __init__(self, db: Path, token: str | None = None, hosts: set[str] | None = None):
        self.db = Path(db)
        self.token = token
        self.cookie = hmac.new(token.encode(), b"chatlog web", hashlib.sha256).hexdigest() if token else None
        self.hosts = hosts  # the Host names a request may carry (None: any; a token guards it)
        self.env = _env()
        self.static = {name: (resources.files("chatlog.web") / "static" / name).read_bytes() for name in STATIC}

    def open(self) -> Archive:
        return open_archive(self.db, read_only=True)

    def page(self, name: str, status: int = 200, **context) -> HTMLResponse:
        return HTMLResponse(self.env.get_template(name).render(**context), status_code=status)

    def error(self, message: str, status: int) -> HTMLResponse:
        return self.page("error.html", status, title="error", message=message)

    # -- the session list -----------------------------------------------------------------------

    def filters(self, q) -> tuple[Filters, dict]:
        """The list's filters from the query string, and the values to put back in the form."""
        form = {k: q.get(k, "").strip() for k in ("handle", "host", "since", "until", "kind")}
        form["verified"] = q.get("verified", "") not in ("", "0")
        kind = form["kind"] if form["kind"] in ("chat", "room") else None
        f = Filters(
            handle=form["handle"] or None, host=form["host"] or None,
            since=parse_when(form["since"]) if form["since"] else None,
            until=parse_when(form["until"]) if form["until"] else None,
            kind=kind, verified=form["verified"],
        )
        return f, form

    @staticmethod
    def query(form: dict, **extra) -> str:
        pairs = [(k, v) for k, v in form.items() if v and k != "verified"]
        if form.get("verified"):
            pairs.append(("verified", "1"))
        pairs += [(k, str(v)) for k, v in extra.items() if v is not None]
        return urlencode(pairs)

    async def sessions(self, request: Request) -> Response:
        return await anyio.to_thread.run_sync(self._sessions, request)

    def _sessions(self, request: Request) -> Response:
        q = request.query_params
        try:
            f, form = self.filters(q)
        except BadDate as exc:
            return self.page("sessions.html", 400, title="sessions", form=dict(q), rows=[], problem=str(exc),
                             formats=FORMATS, more=None, newest=None, export_query="")
        n = _int(q.get("n"), PAGE, 1, MAX_PAGE)
        before = _int(q.get("before"), None, 1, 2**63 - 1)
        f.before = before
        store = self.open()
        try:
            rows = store.sessions(f, n + 1)
        finally:
            store.close()
        more = rows[n - 1].id if len(rows) > n else None
        rows = rows[:n]
        cells = [(s, session_row(s, utc=True)) for s in rows]
        page_n = n if n != PAGE else None
        return self.page(
            "sessions.html", title="sessions", form=form, rows=cells, problem=None, formats=FORMATS,
            more=self.query(form, n=page_n, before=more) if more else None,
            newest="/?" + self.query(form, n=page_n) if before else None,
            export_query=self.query(form),
        )

    # -- a session ------------------------------------------------------------------------------

    async def session(self, request: Request) -> Response:
        return await self._transcript(request, replay=False)

    async def replay(self, request: Request) -> Response:
        return await self._transcript(request, replay=True)

    async def _transcript(self, request: Request, replay: bool) -> Response:
        sid = request.path_params["sid"]
        store = await anyio.to_thread.run_sync(self.open)
        s = await anyio.to_thread.run_sync(store.session, sid) if sid < 2**63 else None
        if s is None:
            store.close()
            return self.error(f"no session {sid}", 404)
        head_lines = header_lines(s, utc=True)
        html = self.env.get_template("session.html").render(
            title=f"session {s.id}", s=s, head=head_lines, replay=replay, formats=FORMATS,
            body_class="replay" if replay else "",
        )
        top, _, bottom = html.partition(LINES_MARK)

        def body() -> Iterator[str]:  # run in a worker thread, a chunk at a time
            try:
                yield top
                reading = Reading(store, s)  # (a room's addresses: a read, after the head is out)
                began = not transcript.Transcript._queued(s)
                for chunk in transcript_lines(s, reading, timed=replay):
                    began = began or 'id="began"' in chunk
                    yield chunk
                if s.ended_at is None:
                    yield (f'<div id="follow" data-sid="{s.id}" data-after="{int(reading.seq)}" '
                           f'data-began="{int(began)}" hidden></div>\n')
                yield bottom
            finally:
                store.close()

        return StreamingResponse(body(), media_type="text/html; charset=utf-8")

    # -- following a session live ---------------------------------------------------------------

    async def live(self, request: Request) -> Response:
        sid = request.path_params["sid"]
        resume = request.headers.get("last-event-id", "")
        after, began = request.query_params.get("after", "0"), request.query_params.get("began", "0")
        if resume:
            after, _, began = resume.partition(".")
        after_seq = _int(after, 0, 0, 2**63 - 1)
        store = await anyio.to_thread.run_sync(self.open)
        s = await anyio.to_thread.run_sync(store.session, sid) if sid < 2**63 else None
        if s is None:
            store.close()
            return Response("no such session\n", 404, media_type="text/plain")
        last, counts = await anyio.to_thread.run_sync(store.said_upto, s.id, after_seq)
        t = transcript.Transcript.resumed(s, last, counts, began == "1")
        state = {"seq": after_seq}

        def poll() -> tuple[list[tuple[str, str]], str | None]:
            """New lines since the last look, each with where a reconnection picks up after it,
            and the closing words once the session has ended."""
            lines: list[tuple[str, str]] = []

            def add(evs) -> None:
                for ev in evs:
                    lines.append((f"{state['seq']}.{int(t.began)}", line_html(ev)))

            def read() -> None:
                for m in paged_messages(store, s.id, state["seq"]):
                    state["seq"] = m.seq
                    add(t.message(m))

            read()
            fresh = store.session(s.id)
            if fresh is None:
                return lines, "This session has been deleted."
            add(t.refresh(fresh))
            if fresh.ended_at is None:
                return lines, None
            read()  # committed just before the end
            add(t.end())
            return lines, ended_words(fresh)

        async def stream():
            try:
                yield "retry: 1000\n\n"
                quiet = 0.0
                while True:
                    lines, ended = await anyio.to_thread.run_sync(poll)
                    for mark, line in lines:
                        yield f"id: {mark}\nevent: line\ndata: {json.dumps({'html': line})}\n\n"
                    if ended is not None:
                        yield f"event: end\ndata: {json.dumps({'html': e(ended)})}\n\n"
                        return
                    if lines:
                        quiet = 0.0
                    else:
                        quiet += POLL
                        if quiet >= KEEPALIVE:
                            quiet = 0.0
                            yield ": still here\n\n"
                    await asyncio.sleep(POLL)
            finally:
                store.close()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})

    # -- search ---------------------------------------------------------------------------------

    async def search(self, request: Request) -> Response:
        return await anyio.to_thread.run_sync(self._search, request)

    def _search(self, request: Request) -> Response:
        q = request.query_params
        form = {k: q.get(k, "").strip() for k in ("q", "handle", "since", "until")}
        form["raw"] = q.get("raw", "") not in ("", "0")
        form["best"] = q.get("best", "") not in ("", "0")
        context = dict(title="search", form=form, hits=None, problem=None, unindexed=0)
        if not form["q"]:
            return self.page("search.html", **context)
        n = _int(q.get("n"), HITS, 1, MAX_PAGE)
        try:
            since = parse_when(form["since"]) if form["since"] else None
            until = parse_when(form["until"]) if form["until"] else None
        except BadDate as exc:
            return self.page("search.html", 400, **{**context, "problem": str(exc)})
        store = self.open()
        try:
            hits = store.search(form["q"], raw=form["raw"], handle=form["handle"] or None, since=since,
                                until=until, limit=n, best=form["best"])
            unindexed = store.unindexed
        except BadQuery as exc:
            return self.page("search.html", 400, **{**context, "problem": str(exc)})
        finally:
            store.close()
        shown = [(m, marked_html(marked)) for m, marked in hits]
        return self.page("search.html", **{**context, "hits": shown, "unindexed": unindexed})

    # -- downloads ------------------------------------------------------------------------------

    async def export_one(self, request: Request) -> Response:
        sid, fmt = request.path_params["sid"], request.path_params["fmt"]
        if fmt not in FORMATS:
            return self.error(f"no export format {fmt!r} (known: {', '.join(FORMATS)})", 404)

        def find():
            store = self.open()
            try:
                return store.session(sid) if sid < 2**63 else None
            finally:
                store.close()

        s = await anyio.to_thread.run_sync(find)
        if s is None:
            return self.error(f"no session {sid}", 404)
        return self._export([s.id], fmt, f"chatlog-session-{s.id}")

    async def export_list(self, request: Request) -> Response:
        fmt = request.path_params["fmt"]
        if fmt not in FORMATS:
            return self.error(f"no export format {fmt!r} (known: {', '.join(FORMATS)})", 404)
        try:
            f, _ = self.filters(request.query_params)
        except BadDate as exc:
            return self.error(str(exc), 400)

        def ids():
            store = self.open()
            try:
                return store.session_ids(f)
            finally:
                store.close()

        chosen = await anyio.to_thread.run_sync(ids)
        if not chosen:
            return self.error("no sessions match; nothing to download", 404)
        return self._export(chosen, fmt, "chatlog-sessions")

    def _export(self, ids: list[int], fmt: str, name: str) -> Response:
        """The export writer runs in a thread of its own, writing into a small queue that the
        response reads: streamed as it is written, memory bounded, stopped if the reader goes."""
        from chatlog import export as exporters

        chunks: queue.Queue = queue.Queue(maxsize=8)
        stop = threading.Event()
        db = self.db

        class Out:
            def __init__(self):
                self.parts: list[str] = []
                self.size = 0

            def write(self, text: str) -> int:
                self.parts.append(text)
                self.size += len(text)
                if self.size >= 1 << 16:
                    self.flush()
                return len(text)

            def flush(self) -> None:
                if not self.parts:
                    return
                data = "".join(self.parts).encode("utf-8", "surrogateescape")
                self.parts, self.size = [], 0
                while not stop.is_set():
                    try:
                        chunks.put(data, timeout=0.5)
                        return
                    except queue.Full:
                        continue
                raise BrokenPipeError("the download was abandoned")

            def isatty(self) -> bool:
                return False

        def run() -> None:
            out = Out()
            try:
                store = open_archive(db, read_only=True)
                try:
                    options = exporters.Options(utc=True, headings=len(ids) > 1)
                    exporters.write_to(store, ids, fmt, out, options)
                    out.flush()
                finally:
                    store.close()
                _put(chunks, None, stop)
            except BaseException as exc:  # noqa: BLE001 (reported by ending the body early)
                _put(chunks, exc, stop)

        async def body():
            worker = threading.Thread(target=run, name="export", daemon=True)
            worker.start()
            try:
                while True:
                    try:
                        item = await anyio.to_thread.run_sync(chunks.get, True, 1.0)
                    except queue.Empty:
                        if not worker.is_alive() and chunks.empty():
                            return
                        continue
                    if item is None or isinstance(item, BaseException):
                        return
                    yield item
            finally:
                stop.set()

        ext, media = FORMATS[fmt]
        return StreamingResponse(body(), media_type=media, headers={
            "content-disposition": f'attachment; filename="{name}.{ext}"', "cache-control": "no-store",
        })

    # -- login (only with a token) --------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        nxt = request.query_params.get("next", "/")
        if request.method == "POST":
            body = (await request.body())[:4096]
            fields = parse_qs(body.decode("utf-8", "replace"))
            nxt = fields.get("next", ["/"])[0]
            given = fields.get("token", [""])[0]
            if self.token and hmac.compare_digest(given.encode(), self.token.encode()):
                response = RedirectResponse(_local(nxt), status_code=303)
                response.set_cookie(COOKIE, self.cookie, httponly=True, samesite="strict",
                                    secure=request.url.scheme == "https")
                return response
            return self.page("login.html", 403, title="token", next=_local(nxt), wrong=True)
        return self.page("login.html", title="token", next=_local(nxt), wrong=False)

    def authorized(self, request: Request) -> bool:
        if self.token is None:
            return True
        cookie = request.cookies.get(COOKIE, "")
        if cookie and hmac.compare_digest(cookie.encode(), self.cookie.encode()):
            return True
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return hmac.compare_digest(auth[7:].strip().encode(), self.token.encode())
        return False

    async def static_file(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self.static:
            return Response("not found\n", 404, media_type="text/plain")
        return Response(self.static[name], media_type=STATIC[name], headers={"cache-control": "no-cache"})


def ended_words(s: Session) -> str:
    return f"This session has ended: {text_of(s.end_reason) or 'closed'}." if s.end_reason else "This session has ended."


def marked_html(marked: str) -> str:
    """A search hit's text, each match (between the HL marks) in <mark>, every part escaped."""
    out = []
    rest = text_of(marked)
    while HL_START in rest:
        before, _, rest = rest.partition(HL_START)
        match, _, rest = rest.partition(HL_END)
        out.append(e(before))
        out.append(f"<mark>{e(match)}</mark>")
    out.append(e(rest))
    return Markup("".join(out))


def _put(q: queue.Queue, item, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.5)
            return
        except queue.Full:
            continue


def _int(value, default, lo, hi):
    if value is None or not (str(value).isascii() and str(value).isdigit()):  # not '²'
        return default
    return max(lo, min(hi, int(value)))


def _local(path: str) -> str:
    """A redirect target on this site only (never `//elsewhere` or a scheme)."""
    if not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    return path


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Gate:
    """Around the app: the security headers on every response; the Host a request names
    (loopback without a token: a page elsewhere cannot rebind its name to us and read the
    archive); the token, when there is one (asked for by a page, or as a bearer token)."""

    OPEN = ("/login", "/static/")

    def __init__(self, app, web: Web):
        self.app, self.web = app, web

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def secured(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        request = Request(scope)
        if self.web.hosts is not None and _host_name(request.headers.get("host", "")) not in self.web.hosts:
            return await Response("unknown host\n", 421, media_type="text/plain")(scope, receive, secured)
        path = scope["path"]
        if not path.startswith(self.OPEN) and not self.web.authorized(request):
            if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
                target = path + (f"?{scope['query_string'].decode('latin-1')}" if scope["query_string"] else "")
                response = RedirectResponse("/login?" + urlencode({"next": target}), status_code=303)
            else:
                response = Response("a token is needed (see chatlog web --help)\n", 401, media_type="text/plain",
                                    headers={"www-authenticate": "Bearer"})
            return await response(scope, receive, secured)
        if request.method not in ("GET", "HEAD") and path != "/login":
            return await Response("read-only\n", 405, media_type="text/plain")(scope, receive, secured)
        return await self.app(scope, receive, secured)


def make_app(db: Path, token: str | None = None, hosts: set[str] | None = None):
    web = Web(db, token, hosts)
    routes = [
        Route("/", web.sessions),
        Route("/s/{sid:int}", web.session),
        Route("/s/{sid:int}/replay", web.replay),
        Route("/s/{sid:int}/live", web.live),
        Route("/s/{sid:int}/export.{fmt}", web.export_one),
        Route("/export.{fmt}", web.export_list),
        Route("/search", web.search),
        Route("/login", web.login, methods=["GET", "POST"]),
        Route("/static/{name}", web.static_file),
    ]

    async def on_error(request, exc):
        return web.error(str(exc), 500)

    app = Starlette(routes=routes, exception_handlers={StoreError: on_error})
    return Gate(app, web)


LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def is_loopback(bind: str) -> bool:
    import ipaddress

    if bind.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind.strip("[]")).is_loopback
    except ValueError:
        return False


def run(db: Path, bind: str, port: int, token: str | None, out) -> None:
    """Listen on bind:port and serve until stopped (Ctrl-C, SIGTERM)."""
    import socket

    import uvicorn

    hosts = None if token else LOOPBACK_NAMES | {bind.strip("[]").lower()}
    app = make_app(db, token, hosts)
    infos = socket.getaddrinfo(bind, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    shown_port = sock.getsockname()[1]
    host = f"[{addr[0]}]" if family == socket.AF_INET6 else addr[0]
    out.write(f"chatlog web: http://{host}:{shown_port}/ (read-only: {db}){' with a token' if token else ''}\n")
    out.flush()
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, server_header=False, lifespan="off",
        timeout_graceful_shutdown=2, proxy_headers=True, forwarded_allow_ips="127.0.0.1",
    )
    uvicorn.Server(config).run(sockets=[sock])
