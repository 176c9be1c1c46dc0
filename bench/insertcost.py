"""Insert cost per message row on the current schema (made by chatlog.db.connect, so whatever
triggers it has are there), through the recorder: `rows` rows in transactions of `batch` rows
(a room's pass), then `single` rows one per commit (the 1:1 chat path). Median of `runs`.

  python bench/insertcost.py [--rows 20000 --batch 700 --single 5000 --runs 3]
"""

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from chatlog.recorder import open_recorder

WORDS = "hello there what is the weather like today i think it will rain later maybe not".split()


def line(rng: random.Random, i: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(8)) + f" {i}"


def batched(path: Path, rows: int, batch: int) -> float:
    rec = open_recorder(path)
    rng = random.Random(1)
    sid = rec.begin_session("127.0.0.1", 1, "127.0.0.1", 2, time.time(), served=True, kind="room")
    t = time.perf_counter()
    for start in range(0, rows, batch):
        with rec.transaction():
            for i in range(start, min(rows, start + batch)):
                rec.add_message(sid, "client", "bob", line(rng, i), None, None, time.time())
    took = time.perf_counter() - t
    rec.close()
    return took / rows * 1e6


def single(path: Path, rows: int) -> float:
    rec = open_recorder(path)
    rng = random.Random(2)
    sid = rec.begin_session("127.0.0.1", 1, "127.0.0.1", 2, time.time(), served=True)
    t = time.perf_counter()
    for i in range(rows):
        rec.add_message(sid, "client", "bob", line(rng, i), None, None, time.time())
    took = time.perf_counter() - t
    rec.close()
    return took / rows * 1e6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--batch", type=int, default=700)
    p.add_argument("--single", type=int, default=5000)
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args()
    b, s = [], []
    for _ in range(a.runs):
        with tempfile.TemporaryDirectory(prefix="chatlog-bench-") as tmp:
            b.append(batched(Path(tmp) / "b.db", a.rows, a.batch))
            s.append(single(Path(tmp) / "s.db", a.single))
    print(f"batched ({a.batch}/tx): {statistics.median(b):.1f} us/row  (runs {', '.join(f'{x:.1f}' for x in b)})")
    print(f"one per commit:      {statistics.median(s):.1f} us/row  (runs {', '.join(f'{x:.1f}' for x in s)})")


if __name__ == "__main__":
    main()
