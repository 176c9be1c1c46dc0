"""A room across several servers, linked through a NATS JetStream broker (`serve --room --link`).

Three parts, each with the one job it has everywhere else in chatlog:

- `BrokerLink`: the link itself. The `nats-py` client is asyncio: its event loop is run by the
  main loop, in the main thread, between passes (`run_client`), when the client's selector
  (`wake`) is readable, when one of its timers is due (`timeout`) or when it has work ready (what
  a pass published goes out before that pass relays anything). What it brings in (a line of the
  room's stream, the link going down or coming back, who is on the other servers, a kick asked
  of us) is put on a bounded queue the loop takes from in the same pass. For the loop it is one
  more source of events (`wake`, `take`, `waiting`) and one more place decisions go (`publish`),
  not a second loop: no thread, so no hand-over between threads on a line's way.
- `LinkedRoom`: a pure policy around `room.Room`. The room decides as it always does; what it
  would commit and relay (its `Commit`s, `Broadcast`s and chat lines on the console) is instead
  published to the room's stream, one message per event, and carried out when the stream brings
  it back, on every server alike (the sender's too): committed in stream order, then relayed.
- `LinkedRoomStore`: `modes.RoomStore`, plus the lines that come through the stream (with their
  origin and stream sequence) and how far the stream is committed, in the same transaction.

One stream per room name (`CHATLOG_<name>`, subject `chatlog.room.<name>`), file storage. Every
message carries its origin server (the archive's stable id, schema m014) and origin id (the
server run and a counter), which is also its `Nats-Msg-Id`: the broker drops a duplicate, and an
archive never records one line twice.

The broker unreachable: every local client is told at once, and so is each one who joins
meanwhile. A line said while the link is down is refused: recorded in this server's archive
alone, with a note that it was not relayed, and its sender is told so (the room's history never
shows it). Nothing is kept to publish later: a line that reaches the room minutes late, out of
the order people answered in, would mislead more than it helps.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import selectors
import socket
import ssl
import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from chatlog.events import (
    Broadcast,
    CloseRoom,
    Commit,
    CommitLines,
    Connected,
    Decision,
    End,
    Event,
    Finish,
    Handle,
    Join,
    OpenRoom,
    OperatorLine,
    Publish,
    ReceivedLines,
    Send,
    Show,
    ShowLines,
    Stop,
    StoreWrite,
    Tick,
)
from chatlog.handles import Names, fold
from chatlog.db import StoreFailed
from chatlog.modes import Mode, RoomStore
from chatlog.protocol import Run
from chatlog.sanitize import visible, visible_lines
from chatlog.words import LEFT, address

QUEUE_MAX = 4096  # link events waiting for the loop; past this the link waits (the broker holds the rest)
QUEUE_BYTES = 4 * 1024 * 1024  # ... or past this much of the stream messages they came in
PENDING_BYTES = 16 * 1024 * 1024  # the client's own queue of what the broker delivered (its default: 256 MB);
# past it the client drops what comes (a gap: the stream is followed again from where it was)
ROSTER_EVERY = 2.0  # seconds between the announcements of who is on this server
ROSTER_STALE = 3 * ROSTER_EVERY  # a server not heard of for this long has nobody here
ECHO_LATE = ROSTER_EVERY  # this server's own announcement back later than this: the broker stalled
CLAIM_SETTLE = 1.0  # a name claimed through the stream that its server's list of who is there, heard
#                    this long after, does not have: its person is gone (a restart lost the leaving)
STOPPED = "their server stopped"  # how the others hear of a stopping server's people leaving
GONE = "server-gone"  # the reason a gone server's people left (`LinkedRoom._gone`)
ROSTER_GAP = 0.1  # seconds at least between two announcements of a change: people joining by the
#                  hundred are announced ten times a second, not once each (the whole list each time)
LINK_POSITION_EVERY = 1.0  # seconds: the stream's position written at most this often after lone lines (each carries it)
DRAIN_SECONDS = 2.0  # a stopping server waits at most this long to record what it published
CONFIRM_SECONDS = 3.0  # how long a retry waits for the broker to confirm, then the line is refused
BATCH_LINES = 256  # what piled up while the last publication went out goes as one stream message,
BATCH_BYTES = 256 * 1024  # ... up to this much (NATS takes 1 MB a message by default), or the broker's own
HEADERS_ROOM = 1024  # bytes of a stream message kept for its headers (its max_payload counts them)
BATCH_FRAME = 24  # bytes around each publication in a stream message: `[ref,` ... `],`
DEFAULT_MOST = 1024 * 1024 - HEADERS_ROOM - BATCH_FRAME  # a publication's bytes at most (NATS's default)
MOST_AT_LEAST = 1024  # (a broker that takes less refuses what does not fit, and says so: no smaller pieces)
# What a read's lines may make a publication weigh, at most, per byte and per line (each is in it
# three times: recorded, shown, relayed; JSON-escaped, and a line that is not plain with its raw
# bytes too): a read that may weigh more is taken as several (`_parts`).
RUN_BYTE, RUN_LINE = 10, 150
FRAME_BYTE, FRAME_LINE = 20, 300
SAID_AT = (10, 100, 1000, 10_000, 100_000, 1_000_000)  # refused lines, counted aloud at these
WHYS_SAID = 4  # different reasons for one outage said on the console, at most
RETRY_SECONDS = 0.5  # between attempts to reach a broker that is not there
TAKE_BYTES = 256 * 1024  # of stream messages taken in one pass (at least one): what a pass relays stays
# well under what a client may leave unread (room.SENDQ, 1 MiB), as a sender's burst does
CLIENT_PASSES = 16  # the client's event loop run at most this many passes at a time (then the room's turn)
CLIENT_POLL = 0.05  # how often the client runs when its timers cannot be read
LOST_AGAIN = 5.0  # seconds between looks at a room's stream that is gone or was made again
NO_STREAM_AGAIN = 0.2  # seconds between the tries of a retry the broker answered "no stream"
CONFIRM_EVERY = 0.5  # how often at most what the broker has not confirmed is looked at

DOWN_NOTICE = ("The link to the room's other servers is down: what you say now is not relayed "
               "(this server records it, marked so).")
UP_NOTICE = "The link to the room's other servers is back: lines are relayed again."
UNSENT_NOTICE = "The broker did not take your line: it was not relayed (this server records it, marked so)."
LATE_NOTICE = "Your line reached the room after all: the broker had taken it, and confirmed it late."
DOWN_NOTE = "not relayed: the link to the other servers was down"
UNCONFIRMED_NOTE = "not relayed: the broker had not confirmed it when the server stopped"


# -- events the link brings in ------------------------------------------------------------------


class StreamLost(Exception):
    """The room's stream this server followed is gone from the broker, or was made again."""


@dataclass(slots=True)
class LinkState(Event):
    """The link came up (`up`) or went down; `why` in words, for the console; `most`: how many
    bytes one publication may take (the broker's max_payload, less room for the headers)."""

    up: bool
    why: str
    at: float
    most: int | None = None


@dataclass(slots=True)
class Arrived(Event):
    """What one event of a server published, as the room's stream brought it, in stream order
    (one stream message may carry several: `seq` is the message's). `mine`: published by this
    run of this server (its `ref` is ours, its connections are ours)."""

    seq: int
    origin: str
    oid: str
    label: str
    body: object  # {"c": commits, "w": console lines, "b": broadcasts}, as the publisher wrote it
    mine: bool
    ref: int
    at: float
    live: bool = True  # False: stored before this server started (a backlog): recorded, not relayed
    ours: bool = False  # published by this server, in this run (`mine`) or an earlier one
    gone_here: bool = False  # the other servers took this run of this server for gone (`_gone`)
    size: int = 0  # its share of the stream message's bytes (what a pass takes is bounded by them)


@dataclass(slots=True)
class Unsent(Event):
    """The broker did not confirm what we published as `ref`; `why`, if it said (its store
    full, say)."""

    ref: int
    at: float
    why: str | None = None


@dataclass(slots=True)
class Roster(Event):
    """Who is on another server (its id and label): (conn, handle, address) each."""

    server: str
    label: str
    people: list
    at: float
    run: str = ""  # which run of that server (its people's lines are numbered by it)


@dataclass(slots=True)
class Echo(Event):
    """This server's own announcement, heard back from the broker at `at`: the link delivers,
    and everything heard before it has been taken (so silence since is silence). `sent`: when
    it was made (this server's clock; None from a server that does not say)."""

    at: float
    sent: float | None = None


@dataclass(slots=True)
class Clash(Event):
    """Another server (`label`) links with this archive's identity: a copy of this database."""

    label: str
    at: float


@dataclass(slots=True)
class KickAsked(Event):
    """Another server's operator asks us to kick our client `conn`."""

    conn: int
    by: str
    at: float


# -- decisions the store carries out ------------------------------------------------------------


@dataclass(slots=True)
class LinkCommit(StoreWrite):
    """A line of a linked room. From the stream: `origin`, `oid` and `seq` as it brought them.
    Kept here alone (not relayed): `origin` None (this server), `oid` ours, `seq` None."""

    conn: int | None
    sender: str
    handle: str | None
    text: str
    raw: bytes | None
    note: str | None
    at: float
    verified: bool
    origin: str | None
    oid: str
    seq: int | None
    who: str | None = None  # its participant, on the server it came from (`run.conn`); None: ours


@dataclass(slots=True)
class LinkLines(StoreWrite):
    """A run of one client's plain lines of a linked room, from the stream, in order: what a
    `LinkCommit` each (sender 'client', no raw form, no note) would record. Their origin ids
    are `oid`.`first`, `oid`.`first + 1`, ... (a publication's rows are numbered in order)."""

    conn: int | None
    handle: str
    lines: list  # (text, at) each
    verified: bool
    origin: str
    oid: str
    first: int
    seq: int
    who: str | None = None  # (as `LinkCommit.who`)


@dataclass(slots=True)
class Advance(StoreWrite):
    """The room's stream is committed here up to `seq`."""

    seq: int


# -- names ----------------------------------------------------------------------------------------


def stream_token(room: str) -> str:
    """A room's name as one NATS subject token and stream name part: itself when it is plain
    (letters, digits, - and _), else a digest of it."""
    if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", room):
        return room
    return "x" + hashlib.sha256(room.encode()).hexdigest()[:24]


def safe_url(url: str) -> str:
    """The broker's URL without its credentials, for the banner and the console."""
    u = urlsplit(url)
    host = u.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{u.scheme}://{host}{f':{u.port}' if u.port else ''}"


class CredsError(ValueError):
    """A --link-creds file nats-py could not use."""


def check_creds(path: str) -> None:
    """A NATS credentials file as nats-py reads it at each connection: a user JWT, then the
    user's nkey seed (signing needs the `nkeys` package). Checked once before the link starts:
    nats-py reads a file without a JWT forever, and a bad seed would fail every retry. What is
    said names the file, never quotes it."""
    try:
        import nkeys
    except ImportError:
        raise CredsError("a credentials file needs the nkeys package (pip install 'nats-py[nkeys]')") from None
    try:
        with open(path, "rb") as f:
            lines = f.read(1 << 20).splitlines()
    except OSError as exc:
        raise CredsError(f"cannot read {path}: {exc.strerror}") from None

    def after(marker: bytes) -> bytes | None:
        for i, line in enumerate(lines):
            if marker in line:
                return lines[i + 1].strip() if i + 1 < len(lines) else b""
        return None

    token, seed = after(b"BEGIN NATS USER JWT"), after(b"BEGIN USER NKEY SEED")
    if not token or token.count(b".") != 2:
        raise CredsError(f"{path} is not a NATS credentials file (no user JWT in it)")
    if not seed:
        raise CredsError(f"{path} is not a NATS credentials file (no user nkey seed in it)")
    try:
        public = nkeys.from_seed(bytearray(seed)).public_key
    except Exception:  # noqa: BLE001  (nkeys' own errors, or a seed too short to decode)
        raise CredsError(f"the nkey seed in {path} is not a valid seed") from None
    if not public.startswith(b"U"):
        raise CredsError(f"the nkey seed in {path} is not a user's")


# -- the policy -----------------------------------------------------------------------------------


_CHAT = ("client", "server", "operator")


class LinkedRoom:
    """`room.Room` with its record and relay going through the room's stream (pure: events in,
    decisions out). What the room commits and relays for one event becomes one `Publish`; what
    the stream brings back becomes commits, then console lines and broadcasts, in stream order."""

    times_out = False  # (as the room: its Ticks announce who is here, never time anyone out)

    def __init__(self, room):
        self.room = room
        self.handle = room.handle
        self.sendq = room.sendq
        self.up = False
        self.said_down = False
        self.said_whys: set[str] = set()  # the reasons the console was given for this outage
        self.ref = 0
        self.inflight: dict[int, list[dict]] = {}  # ref -> what it published (to keep if refused)
        self.refused: dict[str, int] = {}  # why -> lines the broker refused for it since one got through
        self.most = DEFAULT_MOST  # bytes a publication may take (the broker says, as the link comes up)
        self.rosters: dict[str, tuple[str, list, float]] = {}  # server -> (label, people, heard at)
        self.roster_sent: list | None = None
        self.roster_changed = False  # who is here changed since the last announcement
        self.roster_at = float("-inf")  # when that was made
        # The names people on other servers took, as the stream brought their claims: server ->
        # {(run, conn): (handle, label, heard at)}, and the same by name. The stream's order is
        # every server's: a name is the person's whose claim came first (`_claims`).
        self.claims: dict[str, dict[tuple[str, int], tuple[str, str, float]]] = {}
        # The stream sequence of each present person's joining on another server ((server, run,
        # conn) -> seq): every server read the same, whatever its lists said when.
        self.joined_seq: dict[tuple[str, str, int], int] = {}
        self.claimed = Names()
        self.sweep_at: float | None = None  # when servers not heard of for a while are next forgotten
        # Servers gone without a word (killed, cut off): their people leave on the record too,
        # said by whichever server notices first (`_gone`). The run each server last announced,
        # the people of runs not heard of for ROSTER_STALE ((server, run) -> (label, {conn:
        # handle})), and since when this server's own link has been up (until it has been for
        # ROSTER_STALE, silence proves nothing).
        self.runs: dict[str, str] = {}
        # Names taken here while the link was down (kept here alone, unsaid to the others):
        # conn -> (joined or renamed, its name before, if renamed); said when the link returns.
        # And people the others took for gone while this server was cut off (back).
        self.unsaid: dict[int, tuple[str, str | None]] = {}
        self.missing: dict[tuple[str, str], tuple[str, dict[int, tuple[str, int]]]] = {}
        self.up_at: float | None = None
        self.pending: list[Decision] = []
        # When a run was last heard of ((server, run) -> at), and when this server's own last
        # announcement came back through the broker (taken in turn with all it brought, so a
        # server busy with a backlog never takes the lines queued before a list for silence).
        self.last_heard: dict[tuple[str, str], float] = {}
        self.echo_at = float("-inf")
        # The room's end (a stop, \quit), held until what this server published has come back
        # through the stream and is recorded here too (DRAIN_SECONDS at most).
        self.ended_at: float | None = None
        self.finishing: list[Decision] = []

    # the policy interface
    def deadline(self):
        if self.finishing:
            return self.ended_at + DRAIN_SECONDS
        due = self.room.deadline()
        if self.roster_changed:
            when = self.roster_at + ROSTER_GAP
            due = when if due is None else min(due, when)
        if self.sweep_at is not None:
            due = self.sweep_at if due is None else min(due, self.sweep_at)
        return due

    def allowance(self, conn, now):
        return self.room.allowance(conn, now)

    def notice(self, text):
        return self.room.notice(text)

    def handle_event(self, ev) -> list[Decision]:
        out = self._handle(ev)
        if self.pending:
            out = out + self.pending
            self.pending = []
        if self.finishing and (not self.up or not self.inflight or getattr(ev, "at", 0.0) >= self.ended_at + DRAIN_SECONDS):
            out = out + self._unconfirmed() + self.finishing  # (what it published is recorded here, or kept)
            self.finishing = []
        return out

    def _unconfirmed(self) -> list[Decision]:
        """As the room ends, what it published that the stream has not brought back (the broker
        stalled, or down) is kept here alone, marked; should the broker have stored it, this
        archive gives it its place when the server next links (same origin: never twice)."""
        if not self.inflight:
            return []
        out: list[Decision] = []
        for ref, commits in self.inflight.items():
            out += self._keep(ref, commits, UNCONFIRMED_NOTE)
        self.inflight.clear()
        return out + [Show("error", f"{len(out)} messages the broker had not confirmed as the room ended: kept here "
                                    "alone, marked not relayed")]

    def _handle(self, ev) -> list[Decision]:
        t = type(ev)
        if t is ReceivedLines:  # a read's lines: a run of plain ones is one commit, show and relay
            out = []
            for part in _parts(ev, self.most):  # (each publication fits in one stream message)
                out += self._route(self.room.handle_event(part), part.frames[-1].at if part.frames else 0.0)
            return out
        if t is Arrived:
            return self._arrived(ev)
        if t is LinkState:
            return self._state(ev)
        if t is Unsent:
            return self._unsent(ev)
        if t is Roster:
            return self._roster(ev)
        if t is Echo:
            if ev.sent is not None and ev.at - ev.sent > ECHO_LATE and self.up_at is not None:
                # It took that long to come back: the broker stalled (stopped, or swamped), and
                # what the others said meanwhile may still be on its way behind it (the broker
                # takes each connection's messages in turn), so their silence proves nothing
                # until the link has worked for ROSTER_STALE again, as after a relink.
                self.up_at = max(self.up_at, ev.at)
            self.echo_at = ev.at
            self._forget_stale(ev.at)
            return []
        if t is Clash:
            return [Show("error", visible(
                f"the server {ev.label} links with this archive's identity (a copy of this database?): "
                "lines of one may be taken for the other's; give each server a database of its own"))]
        if t is KickAsked:
            p = self.room.people.get(ev.conn)
            if p is None:
                return []
            return self._route(self.room.handle_event(OperatorLine(f"\\kick {address(p.host, p.port)}", ev.at)), ev.at)
        if t is Stop and self.ended_at is not None:
            return []  # (the loop feeds a Stop each pass while it stops)
        if t is OperatorLine:
            kick = self._remote_kick(ev)
            if kick is not None:
                return kick
        elif t is Tick and self.sweep_at is not None and ev.at >= self.sweep_at:
            self._forget_stale(ev.at)  # (with nobody else announcing, the Ticks still come)
        decided = self.room.handle_event(ev)
        if any(type(d) is Finish for d in decided):
            decided += self._leaving_said(decided)
        out = self._route(decided, ev.at)
        if t is Connected and not self.up and any(type(d) is Send and d.conn == ev.conn for d in out):
            out.append(Send(ev.conn, self.room.notice(DOWN_NOTICE)))
            self.said_down = True  # so it hears when the link is up
        if any(type(d) is Finish for d in out):
            out = self._end(out, getattr(ev, "at", 0.0))
        return out

    def _leaving_said(self, out: list[Decision]) -> list[Decision]:
        """The room ends here (a stop, \\quit): each of its people is told so, and nobody here
        hears of the others leaving (`room.Room._close`), but the other servers' people do."""
        return [Broadcast(self.room.notice(f"{visible(d.handle or '?')} left: {STOPPED}"), None)
                for d in out if type(d) is Commit and d.sender == "event" and d.text == "left"]

    def _end(self, out: list[Decision], at: float) -> list[Decision]:
        """The room ends (a stop, \\quit): nobody is here any more, and its leaving is published
        as ever, but the loop finishes only once what this server published has come back through
        the stream and is recorded here, as on the other servers (its people's last lines, their
        leaving), or DRAIN_SECONDS have passed (`handle_event`)."""
        self.ended_at = at
        self.finishing = [d for d in out if type(d) is Finish]  # (let go at once if nothing is awaited)
        return [Publish("who", b"[]")] + [d for d in out if type(d) is not Finish]

    # what the room decided, through the stream
    def _route(self, out: list[Decision], at: float) -> list[Decision]:
        if not any(type(d) is Commit or type(d) is CommitLines for d in out):
            return out + self._roster_change(out, at)
        commits: list[dict] = []
        shows: list[list] = []
        casts: list[list] = []
        rest: list[Decision] = []
        at_publish = None
        for d in out:
            t = type(d)
            if t is Commit:
                commits.append({"k": d.conn, "s": d.sender, "h": d.handle, "t": d.text,
                                "r": base64.b64encode(d.raw).decode() if d.raw is not None else None,
                                "n": d.note, "at": d.at, "v": d.verified})
            elif t is CommitLines:  # (a run of plain lines: one entry, its lines as they were said)
                commits.append({"k": d.conn, "s": "client", "h": d.handle, "L": d.lines, "v": d.verified})
            elif t is Broadcast:
                casts.append([d.data.decode("utf-8", "surrogateescape"), d.exclude])
            elif (t is Show or t is ShowLines) and d.kind in _CHAT:
                shows.append([d.kind, d.texts if t is ShowLines else d.text, d.handle])
            else:
                rest.append(d)
                continue
            if at_publish is None:
                at_publish = len(rest)
        self.ref += 1
        ref = self.ref
        senders = [c["k"] for c in commits if c["k"] is not None and c["s"] == "client"]
        if not self.up:
            for c in commits:
                conn, t = c["k"], c.get("t")
                if c["s"] != "event" or type(conn) is not int:
                    continue
                if t == "left":
                    self.unsaid.pop(conn, None)
                elif t in ("joined", "renamed") and conn not in self.unsaid:
                    note = c.get("n") or ""
                    self.unsaid[conn] = (t, note.rpartition(" is now ")[0] or None if t == "renamed" else None)
            kept = self._keep(ref, commits, DOWN_NOTE)
            told = [Send(conn, self.room.notice(DOWN_NOTICE)) for conn in dict.fromkeys(senders)]
            said = [Show("error", visible(f"not relayed (the link is down): {k.handle or '?'}>{k.text}"))
                    for k in kept if k.sender in _CHAT]
            rest[at_publish:at_publish] = kept + told + said
            return rest + self._roster_change(out, at)
        self.inflight[ref] = commits
        body = json.dumps({"c": commits, "w": shows, "b": casts}, separators=(",", ":")).encode()
        rest.insert(at_publish, Publish("line", body, ref))
        return rest + self._roster_change(out, at)

    def _keep(self, ref: int, commits: list[dict], why: str) -> list[Decision]:
        """What a refused publication said, recorded here alone, marked as not relayed (its
        rows numbered as the stream's copy would be, should the broker have taken it after all)."""
        out: list[Decision] = []
        for c in commits:
            i = len(out)
            if "L" in c:
                out += [LinkCommit(c["k"], "client", c["h"], text, None, why, at, c["v"], None, f"{ref}.{i + j}", None)
                        for j, (text, at) in enumerate(c["L"])]
                continue
            out.append(LinkCommit(c["k"], c["s"], c["h"], c["t"], base64.b64decode(c["r"]) if c["r"] is not None else None,
                                  f"{c['n']}; {why}" if c["n"] else why, c["at"], c["v"], None, f"{ref}.{i}", None))
        return out

    def _arrived(self, ev: Arrived) -> list[Decision]:
        try:
            body = ev.body
            commits = body["c"]
            out = self._records(ev, commits)
            relayed = self._relayed(ev, body["w"], body["b"])
        except (KeyError, TypeError, ValueError, AttributeError):
            return [Advance(ev.seq), Show("error", f"stream message {ev.seq} from {visible(ev.label)} is not a chatlog line; skipped")]
        if ev.mine and ev.live and self.inflight.get(ev.ref) is not None:
            self.refused.clear()  # (one got through: a refusal from now on is said again)
        if ev.mine and self.inflight.pop(ev.ref, None) is None and ev.live:
            # Given up here (not confirmed in time: its sender was told it was not relayed), and
            # the stream brings it after all: relayed as any line, and its sender told so.
            out += [Send(conn, self.room.notice(LATE_NOTICE)) for conn in dict.fromkeys(
                c["k"] for c in commits if c["s"] == "client" and type(c["k"]) is int)]
        out.append(Advance(ev.seq))
        second = self._claims(ev, commits)
        if not ev.live:
            return out  # what was said while this server was away: its clients get it as history
        if ev.gone_here:
            return out + self._back(commits, ev.at)
        if not ev.mine:
            for c in commits:
                if c["s"] == "event":
                    why = f": {LEFT.get(c.get('n'), c.get('n'))}" if c["t"] == "left" and c.get("n") else ""
                    out.append(Show("event", visible(f"{c['h']} {c['t']}{why} (on {ev.label})")))
        return out + relayed + second

    def _records(self, ev: Arrived, commits: list) -> list[Decision]:
        """The rows a publication's commits record, numbered in order (a run of lines, one
        `LinkLines`, a row each). Malformed (not from a chatlog server): ValueError and kin."""
        out: list[Decision] = []
        i = 0
        run = ev.oid.partition(".")[0].partition("-gone")[0]
        for c in commits:
            k = c.get("k")
            if k is not None and type(k) is not int:
                raise ValueError("not a connection")
            conn = k if ev.mine else None
            who = f"{run}.{k}" if k is not None and not ev.mine else None
            lines = c.get("L")
            if lines is not None:
                if c["s"] != "client" or type(c["h"]) is not str or not all(
                        type(x) is list and len(x) == 2 and type(x[0]) is str and _is_time(x[1]) for x in lines):
                    raise ValueError("not a run of lines")
                out.append(LinkLines(conn, c["h"], lines, bool(c.get("v")), ev.origin, ev.oid, i, ev.seq, who))
                i += len(lines)
                continue
            s, h, t, at, n = c["s"], c["h"], c["t"], c["at"], c.get("n")
            if (type(s) is not str or type(t) is not str or (h is not None and type(h) is not str) or not _is_time(at)
                    or (n is not None and type(n) is not str)):
                raise ValueError("not a line")
            out.append(LinkCommit(conn, s, h, t, base64.b64decode(c["r"]) if c.get("r") is not None else None,
                                  n, at, bool(c.get("v")), ev.origin, f"{ev.oid}.{i}", ev.seq, who))
            i += 1
        return out

    @staticmethod
    def _relayed(ev: Arrived, shows: list, casts: list) -> list[Decision]:
        """A publication's console lines (made safe again: they came over the network) and
        broadcasts. Malformed: ValueError and kin."""
        out: list[Decision] = []
        for kind, text, handle in shows:
            if kind not in _CHAT:
                raise ValueError("not a console line")
            if handle is not None:
                handle = visible(handle)
            if type(text) is list:
                out.append(ShowLines(kind, [visible(x) for x in text], handle))
            else:
                out.append(Show(kind, visible(text), handle))
        for data, exclude in casts:  # (as the origin made them: a hostile publisher's made visible)
            data = data if ev.mine else visible_lines(data)
            out.append(Broadcast(data.encode("utf-8", "surrogateescape"), exclude if ev.mine else None))
        return out

    def _claims(self, ev: Arrived, commits: list) -> list[Decision]:
        """Names taken and given up, in the stream's order, which every server reads alike: a
        name belongs to the person whose claim came first. Another server's claims are kept
        (and the names taken here too, before its list of who is there says so); a claim of ours
        that comes back after another server's claim on a name like it was the second, and its
        person gives the name up (that server, reading the same order, keeps its own)."""
        out: list[Decision] = []
        for c in commits:
            if c["s"] != "event" or c["t"] not in ("joined", "renamed", "left"):
                continue
            conn, handle = c.get("k"), c["h"]
            if type(conn) is not int or type(handle) is not str:
                continue
            if ev.mine:
                if c["t"] != "left" and self.claimed.holder(handle) is not None:
                    out += self._second(conn, handle, ev.at)
                continue
            if ev.ours:
                continue  # an earlier run of this server: its people left with it
            held = self.claims.setdefault(ev.origin, {})
            key = (ev.oid.partition(".")[0].partition("-gone")[0], conn)
            if c["t"] == "joined":
                self.joined_seq[ev.origin, key[0], conn] = ev.seq
            elif c["t"] == "left":
                self.joined_seq.pop((ev.origin, key[0], conn), None)
            old = held.pop(key, None)
            if old is not None:
                self._unclaim(old[0])
            if c["t"] != "left":
                held[key] = (handle, ev.label, ev.at)
                self.claimed.add(handle)
                self.room.names.add(handle)
                if self.sweep_at is None:
                    self.sweep_at = ev.at + ROSTER_EVERY
            elif not held:
                del self.claims[ev.origin]
        return out

    def _unclaim(self, handle: str) -> None:
        self.claimed.remove(handle)
        self.room.names.remove(handle)

    def _second(self, conn: int, handle: str, at: float) -> list[Decision]:
        """Our `conn` claimed `handle` after someone on another server claimed a name like it."""
        p = self.room.people.get(conn)
        if p is None or p.handle != handle:
            return []  # gone, or under another name already
        first = self.claimed.holder(handle)
        where = next((label for held in self.claims.values() for h, label, _ in held.values() if h == first), "?")
        return self._route(self.room.withdraw(conn, f"on {visible(where)}", at), at)

    def _unsent(self, ev: Unsent) -> list[Decision]:
        commits = self.inflight.pop(ev.ref, None)
        if commits is None:
            return []
        senders = dict.fromkeys(c["k"] for c in commits if c["k"] is not None and c["s"] == "client")
        why = visible(ev.why) if ev.why else None
        kept = self._keep(ev.ref, commits, f"not relayed: the broker did not take it ({why})" if why
                          else "not relayed: the broker did not take it")
        out = kept + [Send(conn, self.room.notice(UNSENT_NOTICE)) for conn in senders]
        # Said on the console the first time for each reason, then at 10, 100, ... lines: a broker
        # whose store is full refuses every line, and the console is not flooded with it.
        before = self.refused.get(why or "", 0)
        after = self.refused[why or ""] = before + len(kept)
        because = f" ({why})" if why else ""
        if before == 0:
            out.append(Show("error", f"the broker did not take a line{because}: kept here alone, marked not relayed"))
        elif any(before < n <= after for n in SAID_AT):
            out.append(Show("error", f"the broker did not take {after} lines{because} (since one last got through): "
                                     "each kept here alone, marked not relayed"))
        return out

    def _state(self, ev: LinkState) -> list[Decision]:
        if ev.up and ev.most is not None:
            self.most = max(ev.most, MOST_AT_LEAST)
        if ev.up == self.up and (ev.up or self.said_down):
            # No change for the clients (they were told); a reason not yet given is the
            # console's (each once an outage, a few at most: retries alternate between some).
            if ev.up or ev.why in self.said_whys or len(self.said_whys) >= WHYS_SAID:
                return []
            self.said_whys.add(ev.why)
            return [Show("error", visible(ev.why))]
        was = self.up
        self.up = ev.up
        self.up_at = ev.at if ev.up else None
        self.said_whys = set() if ev.up else {ev.why}
        out: list[Decision] = [Show("event" if ev.up else "error", visible(ev.why))]
        if ev.up and was is False and self.said_down:
            out.append(Broadcast(self.room.notice(UP_NOTICE)))
        if not ev.up:
            self.said_down = True
            out.append(Broadcast(self.room.notice(DOWN_NOTICE)))
        if ev.up:
            self.said_down = False
            self.roster_sent = None
            self.roster_at = float("-inf")
            out += self._roster_change([Handle(0, "")], ev.at)  # say who is here again, at once
            if self.unsaid:
                out += self._resay(ev.at)
        return out

    def _resay(self, at: float) -> list[Decision]:
        """Who took a name here while the link was down joins (or renames on) every record now,
        in the stream's order like anyone's claim: should someone on another server have taken
        the same name meanwhile, the first claim in the stream keeps it (`_claims`)."""
        out: list[Decision] = []
        notice = self.room.notice
        for conn, (kind, old) in self.unsaid.items():
            p = self.room.people.get(conn)
            if p is None or p.handle is None or not p.announced:
                continue
            if kind == "renamed" and old:
                out += [Commit(conn, "event", p.handle, "renamed", None, f"{old} is now {p.handle}", at),
                        Broadcast(notice(f"{visible(old)} is now {p.shown}"), conn)]
            elif kind == "back":
                out += [Commit(conn, "event", p.handle, "joined", None, "back", at),
                        Broadcast(notice(f"{p.shown} is back"), conn)]
            else:
                out += [Commit(conn, "event", p.handle, "joined", None, "relinked", at),
                        Broadcast(notice(f"{p.shown} joined"), conn)]
        self.unsaid.clear()
        return self._route(out, at) if out else []

    # who is where
    def _roster_change(self, out: list[Decision], at: float) -> list[Decision]:
        """Who is here, announced when it changed, ROSTER_GAP after the last announcement at the
        soonest (the loop's Tick at `deadline` brings what changed meanwhile)."""
        if any(type(d) is Handle or type(d) is End or (type(d) is Commit and d.sender == "event") for d in out):
            self.roster_changed = True
        if not self.roster_changed or self.roster_at <= at < self.roster_at + ROSTER_GAP:
            return []  # (a clock set back is no reason to wait: then at once)
        self.roster_changed = False
        self.roster_at = at
        people = [[p.conn, p.handle, address(p.host, p.port)] for p in self.room.people.values() if p.handle]
        if people == self.roster_sent:
            return []
        self.roster_sent = people
        return [Publish("who", json.dumps(people).encode())]

    def _roster(self, ev: Roster) -> list[Decision]:
        names = self.room.names
        old = self.rosters.get(ev.server)
        self.missing.pop((ev.server, ev.run), None)  # not gone after all (a link cut for a while)
        self.last_heard[ev.server, ev.run] = ev.at
        known = self.runs.get(ev.server)
        if ev.run:
            self.runs[ev.server] = ev.run
            if known and known != ev.run and old is not None:
                # That server started again: who was on it went with its last run, unsaid.
                for conn, handle, _addr in old[1]:
                    self._missing(ev.server, known, old[0], conn, handle)
        if old is not None and old[0] == ev.label and old[1] == ev.people and ev.people:
            self.rosters[ev.server] = (ev.label, old[1], ev.at)  # the same people, heard again
            self._forget_stale(ev.at)
            return []
        if old is not None:
            for _conn, handle, _addr in old[1]:
                names.remove(handle)
        people = [p for p in ev.people if isinstance(p, list) and len(p) == 3 and isinstance(p[1], str)
                  and isinstance(p[2], str)]
        if people:
            self.rosters[ev.server] = (ev.label, people, ev.at)
            for _conn, handle, _addr in people:
                names.add(handle)  # taken here too: one name, one person, across the room
        else:
            self.rosters.pop(ev.server, None)
        held = self.claims.get(ev.server)
        if held:  # claims its list, made since, does not have: gone without a word (a restart)
            there = {(conn, handle) for conn, handle, _addr in people}
            for key, (handle, label, heard) in list(held.items()):
                if heard < ev.at - CLAIM_SETTLE and (key[1], handle) not in there:
                    del held[key]
                    self._unclaim(handle)
                    if ev.run and key[0] != ev.run:  # (of its last run: gone with it, unsaid)
                        self._missing(ev.server, key[0], label, key[1], handle)
        self._forget_stale(ev.at, changed=True)
        return []

    def _forget_stale(self, at: float, changed: bool = False) -> None:
        """Servers not heard of for ROSTER_STALE have nobody here any more (their claims go
        with them, and so do the claims of a server never heard of that long after them)."""
        names = self.room.names
        for server, (label, gone, heard) in list(self.rosters.items()):
            if at - heard > ROSTER_STALE:
                for _conn, handle, _addr in gone:
                    names.remove(handle)
                del self.rosters[server]
                changed = True
                run = self.runs.get(server)
                if run:
                    for conn, handle, _addr in gone:
                        self._missing(server, run, label, conn, handle)
        for server, held in list(self.claims.items()):
            if server not in self.rosters:
                for key, (handle, label, heard) in list(held.items()):
                    if at - heard > ROSTER_STALE:
                        del held[key]
                        self._unclaim(handle)
                        self._missing(server, key[0], label, key[1], handle)  # (before its list said so)
                if not held:
                    del self.claims[server]
        if self.missing and self.up and self.up_at is not None and at - self.up_at > ROSTER_STALE:
            for key, (label, gone) in list(self.missing.items()):
                if self.last_heard.get(key, float("-inf")) < self.echo_at - ROSTER_STALE:
                    self.pending += self._gone(key[0], key[1], label, gone, at)
                    del self.missing[key]
                    self.last_heard.pop(key, None)
        self.sweep_at = at + ROSTER_EVERY if self.rosters or self.claims or self.missing else None
        if changed:
            self.room.elsewhere = [(visible(h), visible(label), visible(a)) for label, ps, _ in self.rosters.values()
                                   for _c, h, a in ps]

    def _missing(self, server: str, run: str, label: str, conn, handle) -> None:
        if type(conn) is int and type(handle) is str and run:
            people = self.missing.setdefault((server, run), (label, {}))[1]
            if conn not in people:
                people[conn] = (handle, self.joined_seq.get((server, run, conn), 0))

    def _gone(self, server: str, run: str, label: str, people: dict[int, tuple[str, int]],
              at: float) -> list[Decision]:
        """The people of a server's run not heard of for ROSTER_STALE (killed, or cut off from
        the broker) leave the room on the record, as anyone's leaving would be: each its own
        publication, whose id is that person's on that run of that server since the stream last
        brought their joining (its sequence: every server read the same), so however many
        servers say it the broker keeps one and every archive records it once, in the stream's
        order. (Should that server be only cut off, it says they are back, `_back`: a joining
        again, so if it is cut off again, that leaving has an id of its own.)"""
        out: list[Decision] = []
        for conn, (handle, seq) in people.items():
            self.joined_seq.pop((server, run, conn), None)
            body = {"c": [{"k": conn, "s": "event", "h": handle, "t": "left", "r": None, "n": GONE, "at": at,
                           "v": False}],
                    "w": [], "b": [[self.room.notice(f"{visible(handle)} left: {LEFT[GONE]}").decode(
                        "utf-8", "surrogateescape"), None]]}
            out.append(Publish("gone", json.dumps({"o": server, "r": run, "e": seq, "l": label, "k": conn, "b": body},
                                                  separators=(",", ":")).encode()))
        return out

    def _back(self, commits: list, at: float) -> list[Decision]:
        """The other servers took this server for gone (its link was cut for a while) and said
        its people left: those still here join the record again."""
        out: list[Decision] = []
        for c in commits:
            p = self.room.people.get(c.get("k"))
            if c["s"] != "event" or c["t"] != "left" or p is None or p.handle != c["h"] or not p.announced:
                continue
            self.unsaid.setdefault(p.conn, ("back", None))
            out.append(Show("event", visible(f"{p.shown} ({address(p.host, p.port)}) is back on the other servers: "
                                             "they had taken this server for gone")))
        # (said now, or as the link comes up: the stream may bring this before the link's news)
        return out + self._resay(at) if self.up else out

    def _remote_kick(self, ev: OperatorLine) -> list[Decision] | None:
        m = re.fullmatch(r"\\kick\s+(.+)", ev.text.strip())
        if not m:
            return None
        name = m.group(1).strip()
        room = self.room
        key = fold(name)
        for p in room.people.values():
            if address(p.host, p.port) == name or (p.handle is not None and (p.shown == name or fold(p.shown) == key)):
                return None  # one of ours: the room kicks it
        found = [(server, label, conn, handle) for server, (label, people, _) in self.rosters.items()
                 for conn, handle, addr in people if addr == name]
        if not found:
            found = [(server, label, conn, handle) for server, (label, people, _) in self.rosters.items()
                     for conn, handle, _addr in people if visible(handle) == name or fold(visible(handle)) == key]
        if len(found) != 1:
            return None  # nobody (the room says so), or several (the room says how to choose)
        server, label, conn, handle = found[0]
        return [Publish("kick", json.dumps({"server": server, "conn": conn}).encode()),
                Show("event", visible(f"asked {label} to kick {handle}"))]


# -- the store ------------------------------------------------------------------------------------


class LinkedRoomStore(RoomStore):
    """A room's store, plus the lines of the room's stream and how far it is committed."""

    record_only = (LinkCommit, LinkLines, Advance)  # nothing to send or show: the loop's broadcasts gather across them

    def __init__(self, recorder, link: "BrokerLink", **kwargs):
        super().__init__(recorder, **kwargs)
        self.link = link
        self.uid = ""
        self.run = 0
        self.behind: int | None = None  # the position a lone line moved, not yet written down
        self.position_at = float("-inf")  # when it was last written (monotonic)
        # Everyone in the room this run has a participant here, by (server, `run.conn`) there:
        # this server's people (with their address) and the other servers' (without one).
        self.people: dict[tuple[str, str], int] = {}
        self.others: dict[int, bool] = {}  # the other servers' participants: still in the room?

    def start(self, local_addr, at: float) -> int:
        orphans = super().start(local_addr, at)
        rec = self.recorder
        if self.name is None:
            self.name = f"room-{self.local[1]}"
        other = rec.room_open_elsewhere(self.name)
        if other is not None:
            raise StoreFailed(f"the room {visible(self.name)} is open from this database already, by the server on "
                              f"port {other[1]} (pid {other[0]}); each linked server needs a database of its own")
        self.uid = rec.node_uid()
        self.run = rec.server_id
        self.link.configure(self.name)
        resume = rec.link_resume(self.name, self.link.stream)
        self.link.start(self.uid, self.run, f"{socket.gethostname()}:{self.local[1]}", resume)
        return orphans

    def _messages(self, writes: list) -> bool:
        """A stream message's one line (a client's plain line, or any other) and the position
        after it (nearly every pass of a paced linked room): the line alone, in one INSERT that
        commits on its own, as atomically (it carries its stream sequence:
        `recorder.stream_position`). The position itself is written at most every
        LINK_POSITION_EVERY, and as the room ends; at once after a line this archive had already
        (its row may not carry the sequence)."""
        if len(writes) == 2:
            line, advance = writes
            t = type(line)
            if type(advance) is Advance and line.seq == advance.seq and (
                    line.who is None or (line.origin, line.who) in self.people) and (
                    (t is LinkCommit and line.origin is not None and line.sender != "event")
                    or (t is LinkLines and len(line.lines) == 1)):
                now = time.monotonic()
                if self._write(line) is None or now >= self.position_at + LINK_POSITION_EVERY:
                    self.recorder.link_advance(self.name, advance.seq)
                    self.position_at, self.behind = now, None
                else:
                    self.behind = advance.seq
                return True
        return super()._messages(writes)

    def _write(self, d):
        t = type(d)
        if t is CloseRoom and self.behind is not None:
            self.recorder.link_advance(self.name, self.behind)
            self.behind = None
        elif t is Advance:
            self.behind = None
        if t is LinkCommit:
            heard = d.who is None or (d.origin, d.who) in self.people
            pid = self._participant(d)
            origin = d.origin if d.origin is not None else self.uid
            oid = d.oid if d.origin is not None else f"{self.run}.{d.oid}"
            row = self.recorder.add_linked(self.session, d.sender, d.handle, d.text, d.raw, d.note, d.at, pid,
                                           d.verified, origin, oid, d.seq)
            if d.sender == "event" and pid in self.others and (heard or d.text != "joined"):
                self._came_or_went(pid, d)  # (a participant made by their joining has joined)
            return row
        if t is LinkLines:
            pid = self._participant(d)
            if len(d.lines) == 1:  # (a paced room's line: one INSERT, which may commit on its own)
                (text, at), = d.lines
                return self.recorder.add_linked(self.session, "client", d.handle, text, None, None, at, pid,
                                                d.verified, d.origin, f"{d.oid}.{d.first}", d.seq)
            self.recorder.add_linked_lines(self.session, d.handle, d.lines, pid, d.verified, d.origin,
                                           [f"{d.oid}.{d.first + j}" for j in range(len(d.lines))], d.seq)
            return None
        if t is Advance:
            self.recorder.link_advance(self.name, d.seq)
            return None
        if t is OpenRoom:
            self.people.clear()
            self.others.clear()
        elif t is CloseRoom:  # the others' people still there leave this record with the room
            for pid in sorted(pid for pid, there in self.others.items() if there):
                self.recorder.end_participant(pid, d.reason, d.at)
                self.others[pid] = False
        result = super()._write(d)
        if t is Join:
            key = f"{self.run}.{d.conn}"
            pid = self.people[self.uid, key] = self.participants[d.conn]
            self.recorder.set_participant_origin(pid, self.uid, key)
        return result

    def _participant(self, d) -> int | None:
        """The participant a line or event from the stream is of. Another server's is made when
        first heard of: their joining, or, for someone there before this server linked, their
        first line."""
        if d.conn is not None:  # ours: still here, or gone by the time the stream brings what they said
            return self.participants.get(d.conn) or self.people.get((self.uid, f"{self.run}.{d.conn}"))
        if d.who is None:
            return None
        key = (d.origin, d.who)
        pid = self.people.get(key)
        if pid is None:
            at = d.at if type(d) is LinkCommit else d.lines[0][1]
            pid = self.people[key] = self.recorder.add_remote_participant(self.session, d.origin, d.who, d.handle, at)
            self.others[pid] = True
            if d.verified:
                self.recorder.set_verified("participants", pid)
        return pid

    def _came_or_went(self, pid: int, d: LinkCommit) -> None:
        """Another server's participant joined (again, or under another name after giving one
        up), or left."""
        rec = self.recorder
        if d.text == "joined" and d.handle is not None:  # (a rename keeps the first name, as on their server)
            if self.others[pid]:
                rec.set_participant_handle(pid, d.handle)
            else:
                rec.reopen_participant(pid, d.handle)
                self.others[pid] = True
        elif d.text == "left" and d.note != "name-taken" and self.others[pid]:  # (giving a name up, they stay)
            rec.end_participant(pid, d.note or "left", d.at)
            self.others[pid] = False


def linked_room_mode(mode: Mode, recorder, link: "BrokerLink") -> Mode:
    """A room mode (`modes.room_mode`) linked through `link`."""
    old = mode.store
    store = LinkedRoomStore(recorder, link, attended=old.attended, name=old.name, notice=old.notice)
    mode.policy.elsewhere = []
    return Mode(mode.name, LinkedRoom(mode.policy), store, mode.backlog, link)


# -- the link -------------------------------------------------------------------------------------


class BrokerLink:
    """The room's link to a NATS JetStream broker: its client's event loop, run by the main loop."""

    def __init__(self, url: str, *, creds: str | None = None, ca: str | None = None, replicas: int = 1):
        # One URL, or several separated by commas (the nodes of a NATS cluster).
        self.urls: list[str] = []
        self.user = self.password = None
        for part in (p.strip() for p in url.split(",")):
            u = urlsplit(part)
            try:
                u.port  # noqa: B018  (a port that is not a number is refused here, not in the thread)
            except ValueError:
                raise ValueError("a broker URL's port is a number, like nats://HOST:4222") from None
            if u.scheme not in ("nats", "tls") or not u.hostname:
                raise ValueError("a broker URL looks like nats://HOST:4222 (or tls://HOST:4222; several: "
                                 "nats://A:4222,nats://B:4222)")
            self.urls.append(safe_url(part))
            if u.username and self.user is None:
                self.user = unquote(u.username)
                self.password = unquote(u.password) if u.password else None
        self.url = ",".join(self.urls)  # for the console: never the credentials
        if creds is not None:
            check_creds(creds)
        self.creds = creds
        self.ca = ca
        self.replicas = replicas
        self.tls = any(u.startswith("tls:") for u in self.urls) or ca is not None
        self.room = ""
        self.subject = self.stream = self.who_subject = self.kick_subject = ""
        # The client's event loop, on a selector of its own: the loop watches that selector's
        # descriptor (`wake`: readable when a broker socket is) and runs the client when it is
        # readable, when one of the client's timers is due, or when it has work ready.
        self._sel = selectors.DefaultSelector()
        self.wake = self._sel
        self._q: deque = deque()
        self._q_bytes = 0  # of the stream messages the events in _q came in (`Arrived.size`)
        self.waiting = False
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self.nc = self.js = self.sub = None
        self.next_seq = 1
        self.roster = b"[]"
        self._clash_said = False
        self._resubscribing = False
        self._created = None  # when the stream followed was made (the broker's word for it)
        self._checking: asyncio.Task | None = None  # the look at the stream under way (_check_stream)
        self._unconfirmed: deque = deque()  # (deadline, future) of each publication, oldest first
        self._watcher: asyncio.Task | None = None

    def configure(self, room: str) -> None:
        self.room = room
        tok = stream_token(room)
        self.subject = f"chatlog.room.{tok}"
        self.who_subject = f"chatlog.who.{tok}"
        self.kick_subject = f"chatlog.kick.{tok}"
        self.stream = f"CHATLOG_{tok}"

    def describe(self) -> str:
        return f"Linked room {visible(self.room)} through the broker {self.url} (stream {self.stream})"

    # -- the loop's side (main thread) --------------------------------------------------------------

    def start(self, uid: str, run: int, label: str, resume: int) -> None:
        import nats.js.api  # noqa: F401  (now, before `server.serve` sets aside what start-up made)

        self.uid, self.run, self.label = uid, run, label
        self.next_seq = resume + 1
        self.live_from = None  # the stream's first sequence said since this server linked
        aloop = asyncio.SelectorEventLoop(self._sel)
        self._out: asyncio.Queue = asyncio.Queue()
        self._following = asyncio.Lock()  # (one resubscription at a time)
        self._aloop = aloop
        self._main_task = aloop.create_task(self._main())  # (run from the loop's next pass on)

    def run_client(self, io: bool) -> None:
        """Run the client's event loop while it has something to do (`io`: its selector was
        readable), without ever waiting: a few passes, each polling its sockets once."""
        aloop = self._aloop
        if aloop is None or aloop.is_closed() or aloop.is_running():
            return
        if not (io or self._ready() or self._due() == 0.0):
            return
        passes = CLIENT_PASSES

        def again():
            # Last in its pass: the client has nothing more to do at once, or has had its share.
            nonlocal passes
            passes -= 1
            if passes > 0 and (self._ready() or self._due() == 0.0):
                aloop.call_soon(again)  # (the next pass polls the sockets without waiting too)
            else:
                aloop.stop()

        aloop.call_soon(again)
        aloop.run_forever()

    # What the client's event loop has to do, read from its queue of callbacks ready to run and
    # its heap of timers (asyncio.BaseEventLoop's own, as in CPython 3.11 to 3.14). An event loop
    # without them is run every CLIENT_POLL seconds, and whenever its sockets are readable.

    def _ready(self) -> bool:
        return bool(getattr(self._aloop, "_ready", None))

    def _due(self) -> float | None:
        """Seconds until the client's next timer (None: none)."""
        timers = getattr(self._aloop, "_scheduled", None)
        if timers is None:
            return CLIENT_POLL
        if not timers:
            return None
        first = timers[0]
        if first.cancelled():
            return 0.0  # (the event loop drops it as it passes it)
        return max(0.0, first.when() - self._aloop.time())

    def timeout(self) -> float | None:
        """How long the loop may wait before the client must run again (None: until a socket
        of the client's is readable)."""
        if self._aloop is None or self._aloop.is_closed():
            return None
        if self._ready():
            return 0.0
        return self._due()

    def deadline(self, now: float) -> float | None:
        """When the loop must run the client again: now if it holds more than a pass took, at
        its next timer, or None (when one of its sockets is readable)."""
        if self.waiting:
            return now
        wait = self.timeout()
        return None if wait is None else now + wait

    def publish_first(self, batch: list) -> None:
        """What a chunk publishes goes out first, before the chunk is recorded and relayed here:
        it is what the other servers wait for (and this one, which records it as the stream
        brings it back). Nothing of it is shown or recorded here now."""
        published = False
        for d in batch:
            if type(d) is Publish:
                self.publish(d)
                published = True
        if published:
            self.run_client(False)

    def events(self, io: bool, n: int, now: float) -> list:
        """Run the client (`io`: its selector was readable), then take at most `n` of what it
        brought."""
        self.run_client(io)
        return self.take(n, now)

    def take(self, n: int, now: float) -> list:
        """At most `n` events, and of what the stream brought at most TAKE_BYTES (always one):
        a server behind the stream (its database locked a while, say) catches up a pass's share
        at a time, as a sender's burst is taken, not with the whole backlog at once, which
        would be more than any client may leave unread (`room.SENDQ`) and more than a pass
        commits at once."""
        q = self._q
        if not q:
            self.waiting = False
            return []
        out = []
        budget = TAKE_BYTES
        while q and len(out) < n:
            size = getattr(q[0], "size", 0)
            if size > budget and out:
                break
            budget -= size
            out.append(q.popleft())
        self._q_bytes -= TAKE_BYTES - budget
        self.waiting = bool(q)
        return out

    def publish(self, d: Publish) -> None:
        aloop = self._aloop
        if aloop is None or self._closing or aloop.is_closed():
            if d.what == "line":
                self._put(Unsent(d.ref, time.time()))
            return
        self._out.put_nowait(d)  # sent when the loop next runs the client (at the end of this pass)

    def close(self, timeout: float = 3.0) -> None:
        """Send what is published, then stop (bounded by `timeout`)."""
        aloop = self._aloop
        if aloop is None or aloop.is_closed():
            return
        self._closing = True
        try:
            aloop.run_until_complete(asyncio.wait_for(self._shutdown(), timeout))
        except Exception:  # noqa: BLE001  (a broker that is not there: nothing more to send)
            pass
        tasks = asyncio.all_tasks(aloop)  # the client's own (heartbeats, flow control) and ours
        for task in tasks:
            task.cancel()
        try:
            aloop.run_until_complete(asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout))
        except Exception:  # noqa: BLE001
            pass
        try:
            aloop.close()
        except Exception:  # noqa: BLE001
            pass

    # -- the client's side (run by the loop, between its passes) ----------------------------------

    def _put(self, event) -> None:
        self._q.append(event)
        self._q_bytes += getattr(event, "size", 0)
        self.waiting = True

    def _full(self) -> bool:
        return len(self._q) >= QUEUE_MAX or self._q_bytes >= QUEUE_BYTES

    async def _main(self) -> None:
        import nats

        asyncio.get_running_loop().create_task(self._publisher())
        self._said = None
        while not self._closing:
            try:
                nc = _secure_client() if self.tls else nats.NATS()
                await nc.connect(
                    servers=self.urls, user=self.user, password=self.password, user_credentials=self.creds,
                    tls=self._tls_context(), name=f"chatlog {self.label}", allow_reconnect=True,
                    max_reconnect_attempts=-1, reconnect_time_wait=RETRY_SECONDS, connect_timeout=2,
                    disconnected_cb=self._on_disconnected, reconnected_cb=self._on_reconnected,
                    error_cb=self._on_error,
                )
                self.nc = nc
                js = self.nc.jetstream()
                self.js = js
                await self._ensure_stream()
                await self._subscribe()
                break
            except Exception as exc:  # noqa: BLE001  (unreachable, refused, not authorised, no JetStream)
                if self.nc is not None and self.nc.is_connected:  # reached, but it would not have the stream
                    why = f"the broker {self.url} refused the room's stream {self.stream}: {_stream_why(exc)}; retrying"
                else:
                    why = f"cannot reach the broker {self.url}: {_why(exc)}; retrying"
                if isinstance(exc, StreamLost):
                    why = f"{exc}; lines are kept here, marked not relayed; looking again every {LOST_AGAIN:.0f} s"
                if why != self._said:
                    self._put(LinkState(False, why, time.time()))
                    self._said = why
                self.js = None
                if self.nc is not None:
                    nc, self.nc = self.nc, None  # (closed here: not a broker lost, for _on_disconnected)
                    try:
                        await nc.close()
                    except Exception:  # noqa: BLE001
                        pass
                await asyncio.sleep(LOST_AGAIN if isinstance(exc, StreamLost) else RETRY_SECONDS)
        if self._closing:
            return
        self._put(LinkState(True, f"linked to {self.url}: room {self.room}, stream {self.stream} "
                            f"(from sequence {self.next_seq})", time.time(), self._room_for() - BATCH_FRAME))
        for subject, cb in ((self.who_subject, self._on_who), (self.kick_subject, self._on_kick)):
            try:  # (plain subscriptions: the client makes them again after a reconnect itself)
                await self.nc.subscribe(subject, cb=cb)
            except Exception as exc:  # noqa: BLE001  (the broker went away this instant)
                self._put(LinkState(False, f"cannot subscribe to {subject}: {_why(exc)}", time.time()))
        while not self._closing:
            try:
                await self._announce()
            except Exception:  # noqa: BLE001  (reconnecting: said again when it is back)
                pass
            if self._checking is None or self._checking.done():  # (apart: a slow answer delays no announcement)
                self._checking = asyncio.get_running_loop().create_task(self._check_stream())
            await asyncio.sleep(ROSTER_EVERY)

    def _tls_context(self):
        if not self.tls:
            return None
        return ssl.create_default_context(cafile=self.ca)

    async def _ensure_stream(self) -> None:
        """The room's stream, made if this server has followed none yet. One this server has
        followed that is gone, or was made again (deleted by hand, the broker's storage lost),
        is StreamLost: its sequence starts again at 1, and following it from where this archive
        is would drop what it holds now, unseen by anyone."""
        from nats.js.api import StorageType
        from nats.js.errors import NotFoundError

        recorded = self.next_seq - 1
        try:
            info = await self.js.stream_info(self.stream)
        except NotFoundError:
            if recorded > 0:
                raise StreamLost(f"the room's stream {self.stream} is gone from the broker (this server has "
                                 f"recorded it to sequence {recorded}): not making it again; a room started afresh needs a "
                                 "new --name") from None
            if self.live_from is None:
                self.live_from = 1
            info = await self.js.add_stream(name=self.stream, subjects=[self.subject], storage=StorageType.FILE,
                                            duplicate_window=120.0, num_replicas=self.replicas)
        else:
            made_again = self._created is not None and info.created is not None and info.created != self._created
            if info.state.last_seq < recorded or made_again:
                raise StreamLost(f"the room's stream {self.stream} was made again (it ends at sequence "
                                 f"{info.state.last_seq}; this server has recorded it to {recorded}): not following it; a room "
                                 "started afresh needs a new --name")
            if self.live_from is None:  # the first time: what the stream held before is backlog
                self.live_from = info.state.last_seq + 1
        if self._created is None:
            self._created = info.created

    async def _check_stream(self) -> None:
        """While following: the stream still the one followed (see _ensure_stream)."""
        if self.sub is None or self._resubscribing or self.js is None:
            return
        try:
            await self._ensure_stream()
        except StreamLost:
            await self._unfollow()
            asyncio.get_running_loop().create_task(self._follow_again())
        except Exception:  # noqa: BLE001
            # Connected, but nobody answers for the stream: a broker that has stalled, or a node
            # of a cluster without its quorum (the stream has no leader) that does not lead it.
            # The client's own recovery of its consumer fails without a word; ours says so (once
            # its first try is unanswered too), retries, and says when it follows the stream
            # again. (A broker that is gone is said by _on_disconnected, and followed again by
            # _on_reconnected.)
            if self.nc is not None and self.nc.is_connected and not self._resubscribing and not self._closing:
                asyncio.get_running_loop().create_task(self._follow_again())

    async def _unfollow(self) -> None:
        old, self.sub = self.sub, None
        if old is not None:
            try:
                await old.unsubscribe()
            except Exception:  # noqa: BLE001
                pass

    async def _subscribe(self) -> None:
        """(Again) deliver the stream from the first sequence not yet handed to the loop."""
        from nats.js.api import ConsumerConfig, DeliverPolicy

        await self._unfollow()
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.next_seq)
        self.sub = await self.js.subscribe(self.subject, stream=self.stream, cb=self._on_msg, ordered_consumer=True,
                                           config=config, idle_heartbeat=2.0, pending_bytes_limit=PENDING_BYTES)

    async def _resubscribe(self) -> bool:
        """Follow the stream again from `next_seq`, trying until it works or the link closes: a
        broker still starting, a cluster that has lost its quorum for a while (the stream has no
        leader, so no consumer can be made). While it fails the link counts as down (said once
        per reason). Returns whether it failed at first. One at a time."""
        self._resubscribing = True
        failed = False
        try:
            async with self._following:
                while not self._closing:
                    try:
                        await self._ensure_stream()
                        await self._subscribe()
                        return failed
                    except StreamLost as exc:
                        failed = True
                        await self._unfollow()
                        self._put(LinkState(False, f"{exc}; lines are kept here, marked not relayed; looking "
                                            f"again every {LOST_AGAIN:.0f} s", time.time()))
                        await asyncio.sleep(LOST_AGAIN)
                    except Exception as exc:  # noqa: BLE001
                        failed = True
                        self._put(LinkState(False, f"cannot follow the room's stream {self.stream}: {_why(exc)}; "
                                            "retrying", time.time()))
                        await asyncio.sleep(RETRY_SECONDS)
            return failed
        finally:
            self._resubscribing = False

    async def _follow_again(self) -> None:
        """After a gap in what the stream delivered (the link itself up)."""
        if await self._resubscribe() and not self._closing:
            self._put(LinkState(True, f"following the stream {self.stream} again from sequence {self.next_seq}",
                                time.time(), self._room_for() - BATCH_FRAME))

    async def _on_msg(self, msg) -> None:
        seq = msg.metadata.sequence.stream
        if seq < self.next_seq:
            return  # delivered already (a consumer made again)
        if seq > self.next_seq:
            # A gap (a slow consumer's dropped messages): deliver again from where we are (once:
            # what the old subscription still brings meanwhile is dropped here the same way).
            if not self._resubscribing:
                asyncio.get_running_loop().create_task(self._follow_again())
            return
        while self._full() and not self._closing:
            await asyncio.sleep(0.005)  # the loop is behind: the broker keeps the rest
        h = msg.headers or {}
        origin = h.get("Chatlog-Origin", "")
        run = h.get("Chatlog-Run", "")
        label = h.get("Chatlog-Server", "?")
        mine = origin == self.uid and run == str(self.run)
        self.next_seq = seq + 1
        try:
            items = json.loads(msg.data)
            items = [(int(ref), body) for ref, body in items]
        except _NOT_JSON:
            items = [(0, None)]  # not ours: the policy says so, and the sequence is counted
        now = time.time()
        live = seq >= (self.live_from or 1)
        size = len(msg.data) // (len(items) or 1)
        for ref, body in items:
            self._put(Arrived(seq, origin, f"{run}.{ref}", label, body, mine, ref, now, live, origin == self.uid,
                              origin == self.uid and run.startswith(f"{self.run}-gone"), size))

    async def _on_who(self, msg) -> None:
        try:
            body = json.loads(msg.data)
            server, label, people = body["s"], body["l"], body["p"]
        except _NOT_JSON:
            return
        if server == self.uid and label != self.label:
            if not self._clash_said:
                # Another server with this archive's identity (a copied database): its lines and
                # ours would be taken for one another's. Said once; each needs an archive of its own.
                self._clash_said = True
                self._put(Clash(str(label), time.time()))
        elif server == self.uid:
            sent = body.get("t")
            self._put(Echo(time.time(), float(sent) if type(sent) in (int, float) else None))
        elif server != self.uid and isinstance(people, list):
            run = body.get("r")
            self._put(Roster(server, str(label), people, time.time(),
                             run if isinstance(run, str) and run.isascii() and run.isdigit() else ""))

    async def _on_kick(self, msg) -> None:
        try:
            body = json.loads(msg.data)
        except _NOT_JSON:
            return
        if isinstance(body, dict) and body.get("server") == self.uid and isinstance(body.get("conn"), int):
            self._put(KickAsked(body["conn"], str(body.get("by", "")), time.time()))

    async def _announce(self) -> None:
        if self.nc is not None and self.nc.is_connected:
            body = json.dumps({"s": self.uid, "r": str(self.run), "l": self.label,
                               "p": json.loads(self.roster), "t": time.time()}).encode()
            await self.nc.publish(self.who_subject, body)

    async def _publisher(self) -> None:
        """What the loop publishes, in its order: lines to the stream (what has piled up since
        the last one goes as one stream message, confirmed apart), who is here and kicks as plain
        messages."""
        out = self._out
        held = None
        while True:
            d = held if held is not None else await out.get()
            held = None
            if d is None:
                return
            try:
                if d.what == "line":
                    most = self._room_for()
                    if len(d.data) + BATCH_FRAME > most:  # alone too big for the broker: refused, said why
                        self._put(Unsent(d.ref, time.time(), "more than the broker takes in one message (its "
                                         f"max_payload, {most + HEADERS_ROOM} bytes)"))
                        continue
                    limit = min(BATCH_BYTES, most)
                    batch, size = [d], len(d.data) + BATCH_FRAME
                    while not out.empty() and len(batch) < BATCH_LINES:
                        nxt = out.get_nowait()
                        if nxt is None or nxt.what != "line" or size + len(nxt.data) + BATCH_FRAME > limit:
                            held = nxt
                            break
                        batch.append(nxt)
                        size += len(nxt.data) + BATCH_FRAME
                    await self._publish_lines(batch)
                elif d.what == "who":
                    self.roster = d.data
                    await self._announce()
                elif d.what == "kick" and self.nc is not None:
                    await self.nc.publish(self.kick_subject, d.data)
                elif d.what == "gone":
                    await self._publish_gone(d.data)
            except Exception:  # noqa: BLE001
                if d.what == "line":
                    for item in batch:
                        self._put(Unsent(item.ref, time.time()))

    def _room_for(self) -> int:
        """How many bytes of publications one stream message may carry: what the broker takes
        in one message (its max_payload, which counts the headers too), less their room."""
        most = getattr(self.nc, "max_payload", 0) if self.nc is not None else 0
        return most - HEADERS_ROOM if most > HEADERS_ROOM else 1024 * 1024 - HEADERS_ROOM

    async def _publish_lines(self, batch: list[Publish]) -> None:
        """One stream message: `[[ref, body], ...]`, its id the run and the refs it carries (a
        retry is the same message: the broker drops it if the first got through)."""
        if self.js is None or self.nc is None or not self.nc.is_connected:
            for d in batch:
                self._put(Unsent(d.ref, time.time()))
            return
        data = b"[" + b",".join(b"[%d,%s]" % (d.ref, d.data) for d in batch) + b"]"
        oid = f"{self.run}.{batch[0].ref}-{batch[-1].ref}"
        headers = {"Nats-Msg-Id": f"{self.uid}.{oid}", "Chatlog-Origin": self.uid, "Chatlog-Run": str(self.run),
                   "Chatlog-Server": self.label}
        fut = await self.js.publish_async(self.subject, data, headers=headers)
        fut.add_done_callback(lambda f: self._confirmed(f, batch, data, headers))
        # No answer in time (the broker went away with it): given up here, retried once. One
        # watcher for all of them, not a timer each: the loop is not woken once per line for it.
        self._unconfirmed.append((time.monotonic() + CONFIRM_SECONDS, fut))
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch_confirmations())

    async def _publish_gone(self, data: bytes) -> None:
        """The leaving of a gone server's person (`LinkedRoom._gone`), published as if by that
        server, under an id of its own: the broker keeps the first of the servers that say it."""
        if self.js is None or self.nc is None or not self.nc.is_connected:
            return  # (said again by the others; this server says it when it next notices)
        g = json.loads(data)
        run = f"{g['r']}-gone{int(g['e'])}"
        headers = {"Nats-Msg-Id": f"{g['o']}.{run}.{g['k']}", "Chatlog-Origin": g["o"], "Chatlog-Run": run,
                   "Chatlog-Server": g["l"]}
        payload = json.dumps([[g["k"], g["b"]]], separators=(",", ":")).encode()
        fut = await self.js.publish_async(self.subject, payload, headers=headers)
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # (not confirmed: another says it)

    async def _watch_confirmations(self) -> None:
        """Give up on what the broker has not confirmed in CONFIRM_SECONDS (looked at every
        CONFIRM_EVERY at most; in publication order, so the oldest first)."""
        waiting = self._unconfirmed
        while waiting:
            now = time.monotonic()
            while waiting and (waiting[0][1].done() or waiting[0][0] <= now):
                _deadline, fut = waiting.popleft()
                if not fut.done():
                    fut.cancel()
            if waiting:
                await asyncio.sleep(max(waiting[0][0] - now, CONFIRM_EVERY))

    def _confirmed(self, fut, batch: list[Publish], data: bytes, headers: dict) -> None:
        if not fut.cancelled() and fut.exception() is None:
            return
        asyncio.get_running_loop().create_task(self._retry(batch, data, headers))

    async def _retry(self, batch: list[Publish], data: bytes, headers: dict) -> None:
        """Once more, waiting CONFIRM_SECONDS at most for the broker to confirm. Within them, a
        broker that says nobody takes the subject (a cluster still settling which node leads
        the stream, just after it lost and regained its quorum) is asked again."""
        from nats.js.errors import NoStreamResponseError

        give_up = time.monotonic() + CONFIRM_SECONDS
        why = None
        while self.nc is not None and self.nc.is_connected and not self._closing:
            left = give_up - time.monotonic()
            if left <= 0:
                break
            try:
                await self.js.publish(self.subject, data, timeout=left, headers=headers)
                return
            except NoStreamResponseError:
                await asyncio.sleep(min(NO_STREAM_AGAIN, max(0.0, give_up - time.monotonic())))
            except asyncio.TimeoutError:
                why = "not confirmed in time"
                break
            except Exception as exc:  # noqa: BLE001
                why = _refusal(exc)
                break
        for d in batch:
            self._put(Unsent(d.ref, time.time(), why))

    async def _on_disconnected(self) -> None:
        if not self._closing and self.nc is not None:
            self._put(LinkState(False, f"lost the broker {self.url}; reconnecting", time.time()))

    async def _on_reconnected(self) -> None:
        if self._closing:
            return
        await self._resubscribe()
        if self._closing:
            return
        self._put(LinkState(True, f"linked to {self.url} again: stream {self.stream} from sequence {self.next_seq}",
                            time.time(), self._room_for() - BATCH_FRAME))
        try:
            await self._announce()
        except Exception:  # noqa: BLE001
            pass

    async def _on_error(self, exc) -> None:
        """Before the first connection the client retries by itself and says why here (a broker
        not listening, a refused password): said once per reason. Later, the callbacks above
        say when the link goes and comes back, and why it cannot come back is said here while
        the client tries (the room says each reason once an outage)."""
        if self._closing:
            return
        why = f"cannot reach the broker {self.url}: {_why(exc)}; retrying"
        if self.js is None:
            if why != self._said:
                self._said = why
                self._put(LinkState(False, why, time.time()))
        elif self.nc is not None and self.nc.is_reconnecting:
            self._put(LinkState(False, why, time.time()))

    async def _shutdown(self) -> None:
        await self._out.put(None)
        for _ in range(200):  # what the loop published last (its clients' leaving) goes out first
            if self._out.empty():
                break
            await asyncio.sleep(0.01)
        if self.nc is not None:
            try:
                if self.js is not None and self.js.publish_async_pending():
                    await asyncio.wait_for(self.js.publish_async_completed(), 2.0)
            except Exception:  # noqa: BLE001
                pass
            try:
                await asyncio.wait_for(self.nc.close(), 2.0)
            except Exception:  # noqa: BLE001
                pass


# What a message that is not a chatlog server's can make reading it raise (nested past the
# parser's depth: RecursionError; `Infinity` as a number: OverflowError).
_NOT_JSON = (ValueError, TypeError, KeyError, RecursionError, OverflowError)


def _is_time(x) -> bool:
    """A time a stream message may carry: epoch seconds from 1970 to the year 9999 (anything
    else, NaN or 1e308, is not a chatlog line's: it would not even make a date)."""
    return (type(x) is float or type(x) is int) and 0 <= x < 253402300800


def _parts(ev: ReceivedLines, most: int) -> list[ReceivedLines]:
    """A read's lines as events whose publications each fit in `most` bytes (by a bound on what
    they may weigh): what smaller reads would have brought. Almost always the event itself."""
    weights = [RUN_BYTE * len(f.data) + RUN_LINE * f.count if type(f) is Run else FRAME_BYTE * len(f.raw) + FRAME_LINE
               for f in ev.frames]
    if sum(weights) <= most:
        return [ev]
    items: list[tuple[object, int]] = []
    for f, w in zip(ev.frames, weights, strict=True):
        if type(f) is Run and w > most and f.count > 1:
            items += [(r, RUN_BYTE * len(r.data) + RUN_LINE * r.count) for r in f.split(-(-w // most))]
        else:
            items.append((f, w))
    out: list[ReceivedLines] = []
    frames: list = []
    weight = 0
    for f, w in items:
        if frames and weight + w > most:
            out.append(ReceivedLines(ev.conn, frames))
            frames, weight = [], 0
        frames.append(f)
        weight += w
    out.append(ReceivedLines(ev.conn, frames))
    return out


def _refusal(exc: BaseException) -> str:
    """What the broker said when it refused a publication: its description (`maximum bytes
    exceeded`, `insufficient resources`), or the error's first line."""
    description = getattr(exc, "description", None)
    return str(description)[:200] if description else _why(exc)


def _stream_why(exc: BaseException) -> str:
    """Why a broker reached would not have the room's stream: a broker without JetStream
    answers nothing (ServiceUnavailableError, code None), which says nothing by itself."""
    from nats.errors import NoRespondersError
    from nats.js.errors import ServiceUnavailableError

    if isinstance(exc, NoRespondersError) or (isinstance(exc, ServiceUnavailableError) and not exc.description):
        return "it answers no JetStream request (is JetStream on? nats-server -js)"
    return _why(exc)


_SECURE_CLIENT = None


def _secure_client():
    """A NATS client that never goes on in plaintext when TLS was asked for (a `tls://` URL,
    `--link-ca`). nats-py (2.16) upgrades a connection only when the broker's greeting requires
    TLS: to a broker that does not, or through someone between who strips that from its
    greeting, it went on in the clear, its CONNECT carrying the credentials. The greeting of
    every connection, first or again, is checked here before anything is sent; one without TLS
    fails that attempt (an error of the client's own kind, so it goes on trying)."""
    global _SECURE_CLIENT
    if _SECURE_CLIENT is None:
        import nats.errors
        from nats.aio.client import Client

        class NotSecure(nats.errors.Error):
            def __str__(self) -> str:
                return "it does not require TLS, which a tls:// URL or --link-ca asks for: not linking in plaintext"

        class SecureClient(Client):
            async def _process_info(self, info, initial_connection=False):
                if initial_connection and not info.get("tls_required"):
                    raise NotSecure()
                return await super()._process_info(info, initial_connection)

        _SECURE_CLIENT = SecureClient
    return _SECURE_CLIENT()


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, (ssl.SSLError, socket.gaierror)) and (exc.errno or 0) > 0:
        return os.strerror(exc.errno)  # "Connection refused", not asyncio's "[Errno 111] Connect call failed (...)"
    if isinstance(exc, TimeoutError) and not str(exc):  # (a broker that accepts and never answers)
        return "it did not answer in time"
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
