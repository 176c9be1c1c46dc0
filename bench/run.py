"""`make bench`: every figure of chatlog against a baseline measured in the same run, one table.

BENCH_QUICK=1 scales the workloads down for a smoke run. Benchmarks never fail: the table says
which targets are met. Generated data goes to bench/data/ (git-ignored) and is reused.
"""

import platform
import sqlite3
import subprocess
import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))

import gen  # noqa: E402
import logcost  # noqa: E402
import turns  # noqa: E402
from common import CHATLOG, DATA, QUICK, VENV_BIN, peak_rss_mb, run_timed  # noqa: E402

ROWS = []


def row(figure, ours, base, ratio, target, ok):
    ROWS.append((figure, ours, base, ratio, target, "pass" if ok else "MISS"))
    print(f"  {figure}: {ours} vs {base} -> {'pass' if ok else 'MISS'}", file=sys.stderr, flush=True)


def ms(t):
    med, (lo, hi) = t
    return f"{med * 1000:.0f} ms ({lo * 1000:.0f}-{hi * 1000:.0f})"


def archive(name, sessions, per_session):
    DATA.mkdir(parents=True, exist_ok=True)
    path = DATA / f"{name}-{sessions}x{per_session}-v1.db"
    if not path.exists():
        print(f"generating {path.name} ...", file=sys.stderr, flush=True)
        tmp = path.with_suffix(".tmp")
        for suffix in ("", "-wal", "-shm"):
            p = tmp.parent / (tmp.name + suffix)
            if p.exists():
                p.unlink()
        gen.generate(tmp, sessions, per_session)
        tmp.rename(path)
    return path, sessions + 1


def main():
    n_turns = 2000 if QUICK else 20_000
    big_sessions = 5_000 if QUICK else 100_000
    # 1. turn cost
    echo = turns.echo_turns(n_turns)
    ours, _, committed = turns.chatlog_turns(n_turns)
    ratio = ours["turns_per_s"] / echo["turns_per_s"]
    row(f"turns/s ({n_turns} turns)", f"{ours['turns_per_s']:.0f}", f"{echo['turns_per_s']:.0f} (bare echo)",
        f"{ratio:.2f}", ">= 0.33", ratio >= 1 / 3)
    row("turn latency p50 / p99", f"{ours['p50_us']:.0f} / {ours['p99_us']:.0f} us",
        f"{echo['p50_us']:.0f} / {echo['p99_us']:.0f} us", f"{ours['p99_us'] / echo['p99_us']:.1f}",
        "p99 < 1000 us", ours["p99_us"] < 1000)
    row("messages committed before answered", f"{committed}", f"{2 * n_turns}", "", "all", committed == 2 * n_turns)

    # 2. logging cost
    n = 5000 if QUICK else 20_000
    store_rates = [logcost.store_rate(n) for _ in range(3)]
    plain_rates = [logcost.sqlite_rate(n) for _ in range(3)]
    s, p = sorted(store_rates)[1], sorted(plain_rates)[1]
    row("commits/s, store vs plain sqlite3", f"{s:.0f}", f"{p:.0f}", f"{p / s:.2f}x", "<= 1.3x", p / s <= 1.3)

    # 3. archive queries, 4. exports
    big, long_id = archive("big", big_sessions, 20)
    small, small_long = archive("small", 1_000, 20)
    msgs = sqlite3.connect(big).execute("SELECT count(*) FROM messages").fetchone()[0]
    su = [str(VENV_BIN / "sqlite-utils"), "query"]
    cases = [
        ("sessions (latest 20)", [*CHATLOG, "sessions", "--db", str(big)],
         [*su, str(big), "select * from sessions order by id desc limit 20"]),
        ("search WORD (latest 20)", [*CHATLOG, "search", gen.RARE, "--db", str(big)],
         [*su, str(big), "select m.* from messages_fts f join messages m on m.id = f.rowid "
          f"where messages_fts match '{gen.RARE}' order by f.rowid desc limit 20"]),
        ("show ID (1,000 messages)", [*CHATLOG, "show", str(long_id), "--db", str(big)],
         [*su, str(big), f"select * from messages where session_id = {long_id} order by seq"]),
    ]
    for label, ours_cmd, base_cmd in cases:
        a, b = run_timed(ours_cmd), run_timed(base_cmd)
        row(f"{label}, {msgs:,} msgs", ms(a), ms(b) + " sqlite-utils", f"{a[0] / b[0]:.2f}",
            "< 150 ms, < baseline", a[0] < 0.150 and a[0] < b[0])
    a = run_timed([*CHATLOG, "show", str(small_long), "--db", str(small)])
    b = run_timed([*CHATLOG, "show", str(long_id), "--db", str(big)])
    row("show: 21k-msg vs 2M-msg archive", ms(b), ms(a) + " (small)", f"{b[0] / a[0]:.2f}", "no growth (< 1.2)",
        b[0] / a[0] < 1.2)

    sql = ("select m.session_id, m.seq, m.at, m.sender, m.handle, m.text, s.client_host, s.client_port "
           "from messages m join sessions s on s.id = m.session_id order by m.session_id, m.seq")
    for fmt, flag in (("jsonl", "-json"), ("csv", "-csv")):
        a = run_timed([*CHATLOG, "export", "-f", fmt, "--db", str(big)], runs=3)
        b = run_timed(["sqlite3", flag, str(big), sql], runs=3)
        rss = peak_rss_mb([*CHATLOG, "export", "-f", fmt, "--db", str(big)])
        row(f"export all to {fmt} ({msgs:,} msgs)", f"{a[0]:.1f} s", f"{b[0]:.1f} s sqlite3 {flag}",
            f"{a[0] / b[0]:.2f}x", "<= 2x", a[0] / b[0] <= 2)
        row(f"export {fmt} peak memory", f"{rss:.0f} MB", "", "", "< 100 MB", rss < 100)

    # 5. start-up
    base = run_timed([sys.executable, "-c", "pass"], runs=11)
    for args in (["--help"], ["path"]):
        a = run_timed([*CHATLOG, *args], runs=11)
        row(f"chatlog {args[0]} start-up", ms(a), ms(base) + " python -c pass", f"{a[0] / base[0]:.1f}",
            "< 80 ms", a[0] < 0.080)

    # 6. memory over time
    long_n = 10_000 if QUICK else 100_000
    _, rss, _ = turns.chatlog_turns(long_n, checkpoints=(1000, long_n))
    growth = rss[long_n] - rss[1000]
    row(f"server RSS after 1k / {long_n // 1000}k turns", f"{rss[1000]:.1f} / {rss[long_n]:.1f} MB", "", "",
        "growth < 5 MB", growth < 5)

    print_table()


def print_table():
    head = ("figure", "chatlog", "baseline", "ratio", "target", "result")
    widths = [max(len(str(r[i])) for r in [head, *ROWS]) for i in range(6)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |"
    print(f"\nchatlog benchmarks, {time.strftime('%Y-%m-%d')}, {platform.machine()}, "
          f"{subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores, "
          f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}"
          f"{' (quick run)' if QUICK else ''}\n")
    print(line)
    print("| " + " | ".join("-" * w for w in widths) + " |")
    for r in ROWS:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")


if __name__ == "__main__":
    main()
