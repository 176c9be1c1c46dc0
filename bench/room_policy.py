"""Micro-benchmark: Room.handle_event(Received) per relayed line, the room policy's per-line cost.

    .venv/bin/python bench/room_policy.py

Best of 7 runs of 100,000 lines from one client (the policy does no per-listener work: one
Broadcast per line, whatever the number of listeners). No sockets, no store.
"""

from __future__ import annotations

import time

from chatlog.events import Connected, Received
from chatlog.protocol import Message
from chatlog.room import Room

LINES = 100_000
WORDS = "line number 12345 of the benchmark, some words"


def per_line(rate: float, step: float, text: str) -> float:
    msgs = [Received(1, Message("alice", text, None, False), 3.0 + i * step) for i in range(LINES)]
    best = float("inf")
    for _ in range(7):
        room = Room(rate=rate)
        room.handle_event(Connected(1, "127.0.0.1", 5000, 1.0))
        room.handle_event(Received(1, Message("alice", "hi", None, False), 2.0))
        handle = room.handle_event
        t = time.perf_counter()
        for m in msgs:
            handle(m)
        best = min(best, time.perf_counter() - t)
    return best / LINES * 1e6


def main() -> None:
    for label, rate, step, text in [
        ("rate off, ASCII", 0.0, 1e-5, WORDS),
        ("rate 20/s, under it", 20.0, 0.1, WORDS),
        ("rate 20/s, flooding (every line paused)", 20.0, 1e-5, WORDS),
        ("rate off, non-ASCII", 0.0, 1e-5, "línea número 12345, ünïcödé wörds ✓"),
        ("rate off, escapes in every line", 0.0, 1e-5, "\x1b[31mred\x1b[0m \u202eevil"),
    ]:
        print(f"{label:42s} {per_line(rate, step, text):6.2f} us/line")


if __name__ == "__main__":
    main()
