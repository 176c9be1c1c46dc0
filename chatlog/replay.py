"""Playing transcripts back (the replay clock) and following them live (tail).

The recording is separate from the player, as in asciinema: `transcript.events` gives the
events, `views.console_lines` the timed console lines (the same lines the cast export records),
and playback is a chain of small generators over them:

    relative times -> idle cap (-i) -> speed -> play on an absolute clock

so `-i` caps the recorded pauses before `--speed` scales them, as asciinema does, and a slow
write never makes the playback drift. Everything streams: a session is read a page at a time.
"""

from __future__ import annotations

import dataclasses
import os
import select
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import islice

from chatlog import transcript
from chatlog.render import Renderer
from chatlog.views import console_lines

from chatlog.records import Msg, Session

PAGE = 2000  # messages read per query: no read transaction stays open while we wait
MAX_WAIT = 60.0  # the longest single sleep; a longer pause is several


class Keys:
    """Single key presses from a terminal (cbreak mode, restored on exit): space pauses."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdin
        self.fd = self.stream.fileno()
        self._saved = None

    def __enter__(self):
        import termios
        import tty

        self._saved = termios.tcgetattr(self.fd)
        tty.setcbreak(self.fd)
        return self

    def __exit__(self, *exc):
        import termios

        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)

    def wait(self, seconds: float | None) -> str | None:
        """Wait up to `seconds` (None: forever) for a key; return it, or None on time-out."""
        ready, _, _ = select.select([self.fd], [], [], seconds)
        if not ready:
            return None
        return os.read(self.fd, 1).decode("utf-8", "replace")


def paged_messages(store, session_id: int, after_seq: int = 0, page: int = PAGE) -> Iterator[Msg]:
    """A session's messages in order, read `page` at a time, each page its own short query, so a
    long playback never holds a read transaction open (which would pin the server's WAL)."""
    seq = after_seq
    while True:
        rows = store.messages(session_id, after_seq=seq)
        batch = list(islice(rows, page))
        rows.close()
        yield from batch
        if len(batch) < page:
            return
        seq = batch[-1].seq


def relative(lines: Iterable[tuple[str, str]]) -> Iterator[tuple[float, str]]:
    """(seconds since the first line, line), never going backwards."""
    first = None
    t = 0.0
    for when, line in lines:
        now = transcript.parse_time(when)
        if now is not None:
            if first is None:
                first = now
            t = max(t, (now - first).total_seconds())
        yield t, line


def cap_idle(frames: Iterable[tuple[float, str]], limit: float | None) -> Iterator[tuple[float, str]]:
    """Shorten every pause longer than `limit` seconds to `limit` (asciinema's -i)."""
    if limit is None:
        yield from frames
        return
    prev = out = 0.0
    for t, line in frames:
        out += min(t - prev, limit)
        prev = t
        yield out, line


def at_speed(frames: Iterable[tuple[float, str]], speed: float) -> Iterator[tuple[float, str]]:
    if speed == 1.0:
        yield from frames
        return
    for t, line in frames:
        yield t / speed, line


def schedule(
    lines: Iterable[tuple[str, str]], speed: float = 1.0, idle_limit: float | None = None
) -> Iterator[tuple[float, str]]:
    """Timed console lines to (seconds from the start of playback, line)."""
    return at_speed(cap_idle(relative(lines), idle_limit), speed)


def play(
    frames: Iterable[tuple[float, str]],
    write: Callable[[str], None],
    *,
    instant: bool = False,
    keys: Keys | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Write each line when its time comes on one absolute clock (time spent writing or paused
    is not added to the pauses). With `keys`, space pauses and resumes."""
    start = clock()
    for t, line in frames:
        while not instant:
            left = min(start + t - clock(), MAX_WAIT)  # a pause of years (--speed 1e-300) is waited in parts
            if left <= 0:
                break
            if keys is None:
                sleep(left)
            elif keys.wait(left) == " ":
                start += _paused(keys, clock)
        write(line)


def _paused(keys: Keys, clock: Callable[[], float]) -> float:
    """Wait for space again; return how long that took."""
    paused_at = clock()
    sys.stderr.write("[paused: space to resume]\r")
    sys.stderr.flush()
    while keys.wait(None) != " ":
        pass
    sys.stderr.write(" " * 26 + "\r")
    sys.stderr.flush()
    return clock() - paused_at


# -- following live -----------------------------------------------------------------------------


class Follower:
    """Prints sessions as the server records them, through the same read model as `show`."""

    def __init__(
        self, store, r: Renderer, *, poll: float = 0.2, stop: Callable[[], bool] = lambda: False,
        timestamps: bool = False, utc: bool = False,
    ):
        self.store, self.r, self.poll, self.stop = store, r, poll, stop
        self.timestamps, self.utc = timestamps, utc

    def show(self, evs: Iterable[transcript.Event]) -> None:
        for _, line in console_lines(evs, self.r, self.timestamps, self.utc):
            self.r.write(line)

    def session(self, s: Session, last: int | None = None) -> bool:
        """Follow one session to its end (True), or until it is deleted or we are stopped. With
        `last`, what was said before now is shown from its last `last` lines only."""
        t = transcript.Transcript(s)
        self.show(dataclasses.replace(ev, text=f"session {s.id}: {ev.text}") for ev in t.start())
        seq = 0
        if last is not None:
            seq, said = self.store.before_last(s.id, last)
            for sender in t.counts:
                t.counts[sender] += said.get(sender, 0)
        while not self.stop():
            for m in paged_messages(self.store, s.id, seq):
                self.show(t.message(m))
                seq = m.seq
            fresh = self.store.session(s.id)
            if fresh is None:  # deleted under us
                return False
            self.show(t.refresh(fresh))
            if fresh.ended_at is not None:
                for m in paged_messages(self.store, s.id, seq):  # committed just before the end
                    self.show(t.message(m))
                    seq = m.seq
                self.show(t.end())
                return True
            time.sleep(self.poll)
        return False

    def first(self) -> int:
        """Where following starts: before the oldest of the newest sessions not yet ended (the
        chat in progress, and any client queued for its turn), else after the newest one."""
        recent = self.store.sessions(None, 50)
        open_ = [s.id for s in recent if s.ended_at is None]
        if open_:
            return min(open_) - 1
        return recent[0].id if recent else 0

    def run(self, last: int | None = None) -> None:
        """Follow every session that happens while we run, in the order they began: the one in
        progress (from its last `last` lines, if given), then each later one, including those
        that began and ended between two polls. A queued client's session is followed once its
        chat begins; one that ended without beginning (a refusal) is passed over. With none,
        wait."""
        after = self.first()
        shown: set[int] = set()  # followed, with ids above `after`
        followed = said = False
        while not self.stop():
            after, s = self._next(after, shown)
            if s is None:
                if not said and not followed:
                    self.r.event("Waiting for a session to start...")
                said = True
                time.sleep(self.poll)
                continue
            self.session(s, None if followed else last)
            shown.add(s.id)
            followed = True

    def _next(self, after: int, shown: set[int]) -> tuple[int, Session | None]:
        """The next session to follow after `after`, and how far everything is settled (shown,
        or ended without its chat beginning): a queued one holds that mark until it is."""
        mark, blocked = after, False
        for s in self.store.sessions_after(after):
            if s.id in shown or (s.served_at is None and s.ended_at is not None):
                if not blocked:
                    mark = s.id
                    shown.discard(s.id)
                continue
            if s.served_at is not None:
                return mark, s
            blocked = True  # queued: later sessions may still be followed meanwhile
        return mark, None
