"""`make bench`: every figure of chatlog against a baseline measured in the same run, one table.

BENCH_QUICK=1 (or --quick) scales the workloads down for a smoke run. Benchmarks never fail: the
table says which targets are met. Generated data goes to bench/data/ (git-ignored), named by a
version stamp of the generator and the schema, and is reused while the stamp matches.
"""

import platform
import sqlite3
import subprocess
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gen  # noqa: E402
import logcost  # noqa: E402
import roomload  # noqa: E402
import tlscost  # noqa: E402
import upkeepcost  # noqa: E402
import turns  # noqa: E402
import webcost  # noqa: E402
from common import (  # noqa: E402
    CHATLOG, DATA, QUICK, VENV_BIN, Missing, has_command, median_spread, peak_rss_and_lines, run_interleaved, run_timed,
)

ROWS = []


def row(figure, ours, base, ratio, target, ok):
    result = "n/a" if ok is None else "" if ok == "" else "pass" if ok else "MISS"
    ROWS.append((figure, ours, base, ratio, target, result))
    print(f"  {figure}: {ours} vs {base} -> {result}", file=sys.stderr, flush=True)


def missing(figure, target, why="command missing"):
    row(figure, f"n/a ({why})", "", "", target, None)


def ms(t):
    med, (lo, hi) = t
    return f"{med * 1000:.0f} ms ({lo * 1000:.0f}-{hi * 1000:.0f})"


def secs(t):
    med, (lo, hi) = t
    return f"{med:.1f} s ({lo:.1f}-{hi:.1f})"


def spread(values, fmt="{:.0f}"):
    med, (lo, hi) = median_spread(values)
    return f"{fmt.format(med)} ({fmt.format(lo)}-{fmt.format(hi)})", med


def archive(name, sessions, per_session):
    """The generated archive of this size, made once per version stamp."""
    DATA.mkdir(parents=True, exist_ok=True)
    tag = f"{name}-{sessions}x{per_session}-"
    path = DATA / f"{tag}{gen.stamp()}.db"
    if not path.exists():
        for old in DATA.glob(f"{tag}*"):  # an earlier version's, or a half-written one
            old.unlink()
        print(f"generating {path.name} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        tmp = path.with_name(path.name + ".tmp")
        gen.generate(tmp, sessions, per_session)
        tmp.rename(path)
        print(f"  generated in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    long_id = sessions + 1
    msgs = sqlite3.connect(path).execute("SELECT count(*) FROM messages").fetchone()[0]
    return path, long_id, msgs


def turn_cost():
    n = 2000 if QUICK else 20_000
    runs = 3
    echo, floor, minimal, ours, committed = [], [], [], [], []
    for _ in range(runs):  # interleaved, so all see the same machine
        echo.append(turns.echo_turns(n))
        floor.append(turns.echo_turns(n, commit=True))
        minimal.append(turns.echo_turns(n, minimal=True))
        s, _, c = turns.chatlog_turns(n)
        ours.append(s)
        committed.append(c)
    tps, tps_med = spread([r["turns_per_s"] for r in ours])
    etps, etps_med = spread([r["turns_per_s"] for r in echo])
    ratio = tps_med / etps_med
    row(f"turns/s ({n:,} turns, {runs} runs)", tps, f"{etps} bare echo", f"{ratio:.2f}", ">= 0.33", ratio >= 1 / 3)
    ftps, ftps_med = spread([r["turns_per_s"] for r in floor])
    row("turns/s, bare echo + 2 recorder commits a turn", ftps, f"{etps} bare echo", f"{ftps_med / etps_med:.2f}",
        "(the floor)", "")
    row("turns/s against the floor", tps, f"{ftps} echo + 2 recorder commits", f"{tps_med / ftps_med:.2f}",
        ">= 0.8", tps_med / ftps_med >= 0.8)
    mtps, mtps_med = spread([r["turns_per_s"] for r in minimal])
    row("turns/s against a minimal recorder", tps, f"{mtps} echo + 2 plain-table commits", f"{tps_med / mtps_med:.2f}",
        ">= 0.8", tps_med / mtps_med >= 0.8)
    p50, _ = spread([r["p50_us"] for r in ours])
    p99, p99_med = spread([r["p99_us"] for r in ours])
    e50, _ = spread([r["p50_us"] for r in echo])
    e99, e99_med = spread([r["p99_us"] for r in echo])
    row("turn latency p50, us", p50, e50, "", "", "")
    row("turn latency p99, us", p99, e99, f"{p99_med / e99_med:.1f}", "< 1000 us", p99_med < 1000)
    worst = max(r["max_us"] for r in ours)
    print(f"  (slowest chatlog turn: {worst:.0f} us)", file=sys.stderr)
    row("messages committed (count after run)", f"{min(committed):,}", f"{2 * n:,} sent", "", "all",
        min(committed) == 2 * n)
    k = 500 if QUICK else 2000
    early = turns.answered_before_committed(k)
    row("turns answered before both committed", f"{early} of {k:,}", "", "", "0", early == 0)
    # The same comparison in instructions the server runs: what this machine's noise (a bare
    # echo's turn 21 us one hour, 100 the next) does not move.
    figure = "server instructions a turn (callgrind, 2,000 turns)"
    try:
        ours_i, min_i, floor_i = (turns.instructions(kind) for kind in ("chatlog", "minimal", "floor"))
    except turns.Missing as exc:
        missing(figure, "(the work a turn takes)", str(exc))
        return
    row(figure, f"{ours_i[0] / 1000:.1f}k (main thread {ours_i[1] / 1000:.1f}k)",
        f"{min_i[0] / 1000:.1f}k minimal recorder; {floor_i[0] / 1000:.1f}k floor (main thread {floor_i[1] / 1000:.1f}k)",
        f"{ours_i[0] / min_i[0]:.2f}", "(the work a turn takes)", "")


def fsync_cost():
    """The turn with every commit fsynced (`serve --fsync`) against the default, same turns, runs
    interleaved. Fewer turns than the main figure: an fsync is milliseconds on some disks."""
    n = 500 if QUICK else 2_000
    figure = f"turns/s with serve --fsync ({n:,} turns, 3 runs)"
    if not turns.serve_has_option("--fsync"):
        return missing(figure, "(the cost of fsync)", "no serve --fsync yet")
    plain, synced, committed = [], [], []
    for _ in range(3):
        try:
            s, _, c = turns.chatlog_turns(n, extra=("--fsync",))
        except Missing as exc:
            return missing(figure, "(the cost of fsync)", str(exc)[:70])
        plain.append(turns.chatlog_turns(n)[0])
        synced.append(s)
        committed.append(c)
    a, a_med = spread([r["turns_per_s"] for r in synced])
    b, b_med = spread([r["turns_per_s"] for r in plain])
    row(figure, a, f"{b} default", f"{a_med / b_med:.2f}", "(the cost of fsync)", "")
    p99, _ = spread([r["p99_us"] for r in synced])
    b99, _ = spread([r["p99_us"] for r in plain])
    row("turn latency p99 with --fsync, us", p99, f"{b99} default", "", "", "")
    row("messages committed with --fsync", f"{min(committed):,}", f"{2 * n:,} sent", "", "all", min(committed) == 2 * n)


def stats(big, msgs):
    figure = f"stats, {msgs:,} msgs"
    target = "< 150 ms"
    if not has_command("stats"):
        return missing(figure, target)
    try:
        a, b = run_interleaved([[*CHATLOG, "stats", "--db", str(big)], ["sqlite3", str(big), "SELECT count(*) FROM messages"]],
                               runs=7)
    except Missing as exc:
        return missing(figure, target, str(exc)[:60])
    row(figure, ms(a), ms(b) + " sqlite3 count(*)", f"{a[0] / b[0]:.2f}", target, a[0] < 0.150)


def logging_cost():
    n = 5000 if QUICK else 10_000
    store, plain = [], []
    for _ in range(5):
        store.append(logcost.store_rate(n))
        plain.append(logcost.sqlite_rate(n))
    s, s_med = spread(store)
    p, p_med = spread(plain)
    row("commits/s, Recorder.add_message", s, f"{p} plain sqlite3", f"{p_med / s_med:.2f}x", "<= 1.3x",
        p_med / s_med <= 1.3)


def archive_queries(big, long_id, msgs, small, small_long, small_msgs):
    su = [str(VENV_BIN / "sqlite-utils"), "query"]
    cases = [
        ("sessions", "sessions (latest 20)", [*CHATLOG, "sessions", "--db", str(big)],
         [*su, str(big), "select * from sessions order by id desc limit 20"]),
        ("search", f"search {gen.RARE} (latest 20)", [*CHATLOG, "search", gen.RARE, "--db", str(big)],
         [*su, str(big), "select m.* from messages_fts f join messages m on m.id = f.rowid "
          f"where messages_fts match '{gen.RARE}' order by f.rowid desc limit 20"]),
        ("show", "show ID (1,000 messages)", [*CHATLOG, "show", str(long_id), "--db", str(big)],
         [*su, str(big), f"select * from messages where session_id = {long_id} order by seq"]),
    ]
    target = "< 150 ms, < baseline"
    for command, label, ours_cmd, base_cmd in cases:
        figure = f"{label}, {msgs:,} msgs"
        if not has_command(command):
            missing(figure, target)
            continue
        try:
            a, b = run_interleaved([ours_cmd, base_cmd], runs=7)
        except Missing as exc:
            missing(figure, target, str(exc)[:60])
            continue
        row(figure, ms(a), ms(b) + " sqlite-utils", f"{a[0] / b[0]:.2f}", target, a[0] < 0.150 and a[0] < b[0])
    figure = f"show: {msgs:,} vs {small_msgs:,} msgs"
    if not has_command("show"):
        return missing(figure, "no growth (< 1.2)")
    a, b = run_interleaved([[*CHATLOG, "show", str(small_long), "--db", str(small)],
                            [*CHATLOG, "show", str(long_id), "--db", str(big)]], runs=7)
    row(figure, ms(b), ms(a) + " small archive", f"{b[0] / a[0]:.2f}", "no growth (< 1.2)", b[0] / a[0] < 1.2)


# The sqlite3 shell's baseline selects the same rows with the same fields as each export writes.
EXPORT_FIELDS = {
    "jsonl": ("s.id AS session_id, s.started_at AS session_started_at, s.ended_at AS session_ended_at, "
              "s.client_host, s.client_port, s.handle AS session_handle, s.end_reason, "
              "m.seq, m.at, m.sender, m.handle, m.text, m.raw, m.note"),
    "csv": ("s.id AS session_id, s.started_at AS session_started_at, s.client_host, s.client_port, "
            "s.handle AS session_handle, s.end_reason, m.seq, m.at, m.sender, m.handle, m.text, m.raw, m.note"),
}


def exports(big, msgs):
    for fmt, flag, extra_lines in (("jsonl", "-json", 0), ("csv", "-csv", 1)):
        figure = f"export all to {fmt} ({msgs:,} msgs)"
        cmd = [*CHATLOG, "export", "-f", fmt, "--db", str(big)]
        if not has_command("export"):
            missing(figure, "<= 2x")
            continue
        sql = (f"SELECT {EXPORT_FIELDS[fmt]} FROM messages m JOIN sessions s ON s.id = m.session_id "
               "ORDER BY m.session_id, m.seq")
        header = ["-header"] if fmt == "csv" else []  # as the csv export has
        try:
            a, b = run_interleaved([cmd, ["sqlite3", flag, *header, str(big), sql]], runs=3)
        except Missing as exc:
            missing(figure, "<= 2x", str(exc)[:60])
            continue
        row(figure, secs(a), f"{secs(b)} sqlite3 {flag}", f"{a[0] / b[0]:.2f}x", "<= 2x", a[0] / b[0] <= 2)
        rss, lines = peak_rss_and_lines(cmd)
        row(f"export {fmt}: peak RSS; lines written", f"{rss:.0f} MB; {lines:,}", f"{msgs + extra_lines:,} expected",
            "", "< 100 MB; all", rss < 100 and lines == msgs + extra_lines)


def web(big, long_id, msgs):
    """`chatlog web`: the server time of the sessions page and of a 1,000-message session page
    (the whole body over loopback), against the commands that print the same, in the same run;
    the first byte of a 100,000-message session; follow latency from a real room."""
    target = "< 150 ms"
    if not has_command("web"):
        for figure in ("web: sessions page", "web: session page (1,000 messages)"):
            missing(figure, target)
        return
    server = webcost.Web(big)
    try:
        for label, path, cmd in (
            ("sessions page (50)", "/", [*CHATLOG, "sessions", "--db", str(big)]),
            ("session page (1,000 messages)", f"/s/{long_id}", [*CHATLOG, "show", str(long_id), "--db", str(big)]),
        ):
            a = webcost.timed(server.port, path)
            b = run_timed(cmd)
            row(f"web: {label}, {msgs:,} msgs", ms(a), f"{ms(b)} chatlog {cmd[1]}", f"{a[0] / b[0]:.2f}", target,
                a[0] < 0.150)
    finally:
        server.stop()
    n = 20_000 if QUICK else 100_000
    one, _, _ = archive("one", 1, n)
    server = webcost.Web(one)
    try:
        first = webcost.timed(server.port, "/s/1", runs=5, first_byte=True)
        whole = webcost.timed(server.port, "/s/1", runs=3)
    finally:
        server.stop()
    row(f"web: first byte of a {n:,}-message session", ms(first), f"{secs(whole)} whole page",
        f"{first[0] / whole[0]:.3f}", "< 200 ms (streamed)", first[0] < 0.200)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        lat = webcost.follow_latency(Path(tmp) / "live.db", lines=10 if QUICK else 30)
    med, (lo, hi) = median_spread(lat)
    row("web: follow, a room's line to the event stream", f"{med * 1000:.0f} ms ({lo * 1000:.0f}-{hi * 1000:.0f})",
        "polled every 200 ms", "", "< 1 s (max)", hi < 1.0)


def startup():
    """Measured first, on a machine at rest: after the archive and export figures (gigabytes
    read and written) every process starts slower for a while, `python -c pass` too (13 ms
    at rest, 15-17 then). The runs interleave with `python -c pass`'s, so both meet the same."""
    base, *times = run_interleaved([[sys.executable, "-c", "pass"], [*CHATLOG, "--help"], [*CHATLOG, "path"]],
                                   runs=15)
    for args, a in zip((["--help"], ["path"]), times, strict=True):
        row(f"chatlog {args[0]} start-up", ms(a), ms(base) + " python -c pass", f"{a[0] / base[0]:.1f}",
            "< 60 ms", a[0] < 0.060)


def memory():
    n = 10_000 if QUICK else 100_000
    # Growth is counted from 10k turns: by then SQLite's page caches (the recorder's, the
    # indexer's, the checkpointer's: 2 MB each at most) have filled; 1k is shown beside it.
    # (Measured to 200k turns: 35.3 MB at 1k, 39.4 at 10k, then 39.7-40.4 to the end.)
    warm = min(10_000, n // 2)
    _, rss, _ = turns.chatlog_turns(n, checkpoints=(1000, warm, n))
    growth = rss[n] - rss[warm]
    row(f"server RSS after 1k / {warm // 1000}k / {n // 1000}k turns", f"{rss[1000]:.1f} / {rss[warm]:.1f} / {rss[n]:.1f} MB",
        "", f"+{growth:.1f} MB", f"growth from {warm // 1000}k < 5 MB", growth < 5)


def room_run(scenario, server, **kw):
    """One room scenario against one server: its result, or the reason it could not run."""
    print(f"  room {scenario} against {server}{' over TLS' if kw.get('tls') else ''} ...", file=sys.stderr, flush=True)
    try:
        r = roomload.run(scenario, server, **kw)
    except roomload.Unavailable as exc:
        return str(exc)
    except Exception as exc:  # a benchmark never fails: the row says what went wrong
        return f"error: {type(exc).__name__}: {exc}"[:80]
    print(f"    {r}", file=sys.stderr, flush=True)
    return r


def room():
    """The multi-client room against `ncat --chat` (and the generator against a trivial C relay,
    which is its own ceiling), each scenario once, in the same run."""
    secs = 5 if QUICK else 20
    scenarios = [
        ("fanout", dict(clients=200, rate=2, seconds=secs), ("relay", "ncat", "chatlog")),
        ("throughput", dict(listeners=100, lines=20_000), ("relay", "ncat", "chatlog")),
        # 20 s even in a quick run: it takes that long to fill the buffers that hide a frozen room
        ("slow", dict(clients=50, rate=10, size=450, seconds=20), ("ncat", "chatlog")),
        ("crowd", dict(clients=2_000 if QUICK else 10_000), ("relay", "ncat", "chatlog")),
        ("resets", dict(clients=20, resets=500), ("ncat", "chatlog")),
    ]
    res = {}
    for scenario, kw, servers in scenarios:
        if scenario == "throughput":
            # A fraction of a second each, and ncat alone varies 18-30 M/s from run to run here:
            # five rounds, the servers alternated within each (one round if a run was slow), and
            # the median of each server's runs.
            runs = {server: [] for server in servers}
            for _ in range(5):
                for server in servers:
                    runs[server].append(room_run(scenario, server, **kw))
                if any(not isinstance(r, dict) or r["wall_s"] >= 20 for rs in runs.values() for r in rs):
                    break
            for server, rs in runs.items():
                ok = sorted((r for r in rs if isinstance(r, dict)), key=lambda r: r.get("deliveries_per_s") or 0)
                res[scenario, server] = ok[len(ok) // 2] if ok else rs[0]
            continue
        for server in servers:
            res[scenario, server] = room_run(scenario, server, **kw)
    room_rows(res, secs)


def _na(r):
    return None if isinstance(r, dict) else f"n/a ({r})"


def busy(*results):
    """How busy the generator was (its CPU time over the measured span) against the relay, ncat
    and chatlog: near 100% it would be measuring itself."""
    pct = [f"{r.get('generator_busy_pct')}%" if not _na(r) and r.get("generator_busy_pct") is not None else "-"
           for r in results]
    return "generator busy {} / {} / {} (relay / ncat / chatlog)".format(*pct)


def _exited(r):
    """'; it exited (its last words)' when the server did not survive the scenario."""
    if r["server_alive"]:
        return ""
    said = " ".join(r.get("server_said") or []) or f"exit {r.get('server_exit')}"
    return f"; it exited ({said[:40]})"


def room_rows(res, secs):
    def fan(r):
        if _na(r):
            return _na(r), None
        missing = r["expected"] - r["delivered"]
        state = "complete" if r["joined"] == r["clients"] and r["sent"] and not missing else (
            f"{r['joined']} joined, {missing:,} of {r['expected']:,} missing")
        state += _exited(r)
        return f"{state}, p99 {r['p99_ms']} ms (p50 {r['p50_ms']})", state == "complete"

    f_ours, f_base, f_relay = res["fanout", "chatlog"], res["fanout", "ncat"], res["fanout", "relay"]
    (a, a_ok), (b, _) = fan(f_ours), fan(f_base)
    figure = f"room: 200 clients x 2 lines/s, {secs} s"
    target = "complete, p99 <= 25 ms, <= 0.5x ncat"
    if _na(f_ours):
        row(figure, a, f"{b} ncat", "", target, None)
    else:
        ratio = f_ours["p99_ms"] / f_base["p99_ms"] if not _na(f_base) and f_ours["p99_ms"] else None
        row(figure, a, f"{b} ncat", f"{ratio:.2f}" if ratio else "", target,
            bool(a_ok and ratio and f_ours["p99_ms"] <= 25 and ratio <= 0.5))
    row("  generator ceiling: same load, C relay", fan(f_relay)[0], busy(f_relay, f_base, f_ours),
        "", "(not the bottleneck)", "")

    t_ours, t_base, t_relay = res["throughput", "chatlog"], res["throughput", "ncat"], res["throughput", "relay"]

    def tput(r):
        if _na(r):
            return _na(r)
        if "deliveries_per_s" not in r:
            return f"{r['joined']} of {r['listeners']} joined"
        lost = r["expected"] - r["delivered"]
        text = f"{r['deliveries_per_s'] / 1e6:.1f} M/s" + (f", {lost:,} deliveries lost" if lost else "")
        # ncat writes its "<userN> " prefix at the start of each read(), not each line, so a line
        # that straddles two reads arrives cut in two: the checked listener sees it
        cut = r["lines"] - r["intact_on_checked"]
        return text + (f", {cut:,} of {r['lines']:,} lines cut on one listener" if cut else "") + _exited(r)

    figure = "room: 1 sender, 100 listeners, 20,000 lines: deliveries/s"
    target = ">= 0.8x ncat, all committed"
    if _na(t_ours) or "deliveries_per_s" not in t_ours:
        row(figure, tput(t_ours), f"{tput(t_base)} ncat", "", target, None if _na(t_ours) else False)
    else:
        ratio = t_ours["deliveries_per_s"] / t_base["deliveries_per_s"] if not _na(t_base) else None
        stored = t_ours.get("stored")
        row(figure, f"{tput(t_ours)}; {stored:,} committed", f"{tput(t_base)} ncat",
            f"{ratio:.2f}" if ratio else "", target,
            bool(ratio and ratio >= 0.8 and t_ours["complete"] and stored == t_ours["lines"]))
    row("  generator ceiling: same load, C relay", tput(t_relay), busy(t_relay, t_base, t_ours),
        "", "(not the bottleneck)", "")

    def slow(r):
        if _na(r):
            return _na(r)
        if r["undelivered_pct"] is None:
            return f"{r['joined']} of {r['clients']} joined"
        dropped = {True: "; the mute one dropped", False: "; the mute one kept", None: ""}[r["mute_dropped"]]
        return f"{r['undelivered_pct']}% undelivered, p99 {r['p99_ms']} ms{dropped}{_exited(r)}"

    s_ours, s_base = res["slow", "chatlog"], res["slow", "ncat"]
    row("room: 50 clients x 10 lines/s of 450 B, one never reads, 20 s", slow(s_ours), f"{slow(s_base)} ncat",
        "", "others get every line", None if _na(s_ours) else (s_ours["undelivered_pct"] == 0 and s_ours["server_alive"]))

    def crowd(r):
        if _na(r):
            return _na(r)
        text = f"{r['joined']:,} joined, {r['got_line']:,} of {r['of']:,} got the line"
        if not r["alive_after"]:
            said = " ".join(r.get("server_said") or [f"exit {r.get('server_exit')}"])
            if "FD_SETSIZE" in said:
                said = "FD_SETSIZE"
            text = f"{r['joined']:,} joined, then it exited ({said[:40]})"
        if r.get("open_error"):  # the generator's own limit, not the server's
            text += f" (generator: {r['open_error']} at {r['stalled_at']:,})"
        return text + f"; peak RSS {r['server_vmhwm_mb']} MB"

    c_ours, c_base, c_relay = res["crowd", "chatlog"], res["crowd", "ncat"], res["crowd", "relay"]
    n = c_ours["clients"] if not _na(c_ours) else c_base["clients"] if not _na(c_base) else 0
    row(f"room: {n:,} concurrent clients, one line to all", crowd(c_ours), f"{crowd(c_base)} ncat", "",
        "all get it, peak RSS < 200 MB",
        None if _na(c_ours) else (c_ours["got_line"] == n - 1 and (c_ours["server_vmhwm_mb"] or 1e9) < 200))
    row("  generator ceiling: same load, C relay", crowd(c_relay) + (
        f"; connected in {c_relay['connect_s']} s" if not _na(c_relay) else ""), busy(c_relay, c_base, c_ours),
        "", "(not the bottleneck)", "")

    def reset(r):
        if _na(r):
            return _na(r)
        if r["survived"]:
            return f"survived {r['resets']} resets, line to {r['got_line']} of {r['of']}"
        said = " ".join(r.get("server_said") or [])
        return f"exited after {r['resets']} resets" + (" (getpeername: ENOTCONN)" if "getpeername" in said else "")

    r_ours, r_base = res["resets", "chatlog"], res["resets", "ncat"]
    row("room: 500 connections reset during accept", reset(r_ours), f"{reset(r_base)} ncat", "", "survives, all get it",
        None if _na(r_ours) else (r_ours["survived"] and r_ours["got_line"] == r_ours["of"]))

    pairs = [(k[0], r) for k, r in res.items() if k[1] == "chatlog" and not _na(r)]
    figure = "room: lines relayed vs lines stored"
    if not pairs:
        return missing(figure, "equal, always", "no serve --room yet")
    relayed = sum(r["relayed"] for _, r in pairs)
    stored = sum(r.get("stored", 0) for _, r in pairs)
    unequal = [name for name, r in pairs if r["relayed"] != r.get("stored")]
    row(figure, f"{relayed:,} relayed, {stored:,} stored" + (f" (differ in: {', '.join(unequal)})" if unequal else ""),
        "ncat stores nothing", "", "equal, always", not unequal)


def link():
    """A room over 3 servers linked through a local nats-server -js against the same load on one
    server, in the same run: the paced room's p99 and one sender's fan-out; and whether the three
    archives hold the same lines in the same order afterwards. The paced room runs three times
    against each, alternated (one server, linked, linked, one server, ...), and the medians are
    compared: on a shared 2-core machine one pair of runs gave ratios from 0.5 to 5."""
    secs = 5 if QUICK else 20
    rounds = 1 if QUICK else 3
    res = {}
    fan = {"chatlog": [], "linked": []}
    for i in range(rounds):
        for server in ("chatlog", "linked") if i % 2 == 0 else ("linked", "chatlog"):
            fan[server].append(room_run("fanout", server, clients=200, rate=2, seconds=secs))
    for server in ("chatlog", "linked"):
        res["throughput", server] = room_run("throughput", server, listeners=100, lines=20_000)

    def same(r):
        return "; archives identical" if r.get("archives_identical") else "; ARCHIVES DIFFER"

    def p99s(runs):
        med, (lo, hi) = median_spread([r["p99_ms"] for r in runs])
        spread = f" ({lo}-{hi}, {len(runs)} runs)" if len(runs) > 1 else ""
        return med, f"p99 {round(med, 2)} ms{spread} (p50 {round(statistics.median(r['p50_ms'] for r in runs), 2)})"

    figure = f"link: room 200 clients x 2 lines/s over 3 linked servers, {secs} s"
    target = "complete, p99 <= 2x one server, archives identical"
    bad = next((x for runs in (fan["linked"], fan["chatlog"]) for x in runs if _na(x)), None)
    if bad is not None:
        row(figure, _na(bad), "", "", target, None)
    else:
        ones, threes = fan["chatlog"], fan["linked"]
        done = all(t["delivered"] == t["expected"] and t["joined"] == t["clients"] for t in threes)
        same_all = all(t.get("archives_identical") for t in threes)
        (one, one_text), (three, three_text) = p99s(ones), p99s(threes)
        ratio = three / one if one and three else None
        row(figure, f"{'complete' if done else 'INCOMPLETE'}, {three_text}{same({'archives_identical': same_all})}",
            f"{one_text} one server", f"{ratio:.2f}" if ratio else "", target,
            bool(done and ratio and ratio <= 2 and same_all))
        # The cores each part kept busy while lines came (medians): where the linked p99's margin goes.
        def cores(runs, *parts):
            return [round(statistics.median(r.get("cores", {}).get(p, 0) for r in runs), 2) for p in parts]

        s3, b3, g3 = cores(threes, "server", "broker", "generator")
        s1, g1 = cores(ones, "server", "generator")
        row("link: cores the paced room keeps busy (of this machine's)",
            f"{s3 + b3 + g3:.2f}: 3 servers {s3}, broker {b3}, generator {g3}",
            f"{s1 + g1:.2f}: one server {s1}, generator {g1}", f"{(s3 + b3 + g3) / (s1 + g1):.2f}", "(measured)", "")
    one, three = res["throughput", "chatlog"], res["throughput", "linked"]
    figure = "link: 1 sender, 100 listeners on 3 linked servers, 20,000 lines: deliveries/s"
    if _na(one) or _na(three) or "deliveries_per_s" not in three or "deliveries_per_s" not in one:
        row(figure, _na(three) or "", _na(one) or "", "", "(measured)", None)
    else:
        ratio = three["deliveries_per_s"] / one["deliveries_per_s"]
        row(figure, f"{three['deliveries_per_s'] / 1e6:.2f} M/s{'' if three['complete'] else ', INCOMPLETE'}{same(three)}",
            f"{one['deliveries_per_s'] / 1e6:.2f} M/s one server", f"{ratio:.2f}", "(measured)", "")


def tls():
    """What TLS costs, each figure against plain in the same run: connections (a full handshake
    each) per second, the 1:1 turn, the room's paced fan-out, memory per idle client, and the room
    holding a crowd of TLS clients (target: all get the line, peak RSS < 500 MB)."""
    if not turns.serve_has_option("--tls-port"):
        return missing("TLS", "(the cost of TLS)", "no serve --tls-port yet")
    n = 200 if QUICK else 500
    for parallel in (1, 4):
        plain, secure = [], []
        for _ in range(3):  # interleaved
            plain.append(tlscost.connections(n, parallel, tls=False))
            secure.append(tlscost.connections(n, parallel, tls=True))
        a, a_med = spread([r["per_s"] for r in secure])
        b, b_med = spread([r["per_s"] for r in plain])
        failed = sum(r["failed"] for r in secure + plain)
        cpu = spread([r["server_cpu_ms_each"] or 0 for r in secure], "{:.2f}")[0]
        pcpu = spread([r["server_cpu_ms_each"] or 0 for r in plain], "{:.2f}")[0]
        row(f"TLS: connections/s to the room's greeting, {n} x 3 runs, {parallel} at a time",
            f"{a}; server {cpu} ms CPU each", f"{b} plain; server {pcpu} ms CPU each", f"{a_med / b_med:.2f}",
            "(the cost of a handshake)" + (f"; {failed} failed" if failed else ""), "")

    k = 2000 if QUICK else 20_000
    plain, secure = [], []
    for _ in range(3):
        plain.append(turns.chatlog_turns(k)[0])
        secure.append(turns.chatlog_turns(k, tls=True)[0])
    a, a_med = spread([r["turns_per_s"] for r in secure])
    b, b_med = spread([r["turns_per_s"] for r in plain])
    row(f"TLS: 1:1 turns/s ({k:,} turns, 3 runs)", a, f"{b} plain", f"{a_med / b_med:.2f}", "(the cost of TLS)", "")
    a, a_med = spread([r["p99_us"] for r in secure])
    b, b_med = spread([r["p99_us"] for r in plain])
    row("TLS: 1:1 turn latency p99, us", a, f"{b} plain", f"{a_med / b_med:.2f}", "", "")

    secs = 5 if QUICK else 20
    res = {}
    for _ in range(3 if not QUICK else 1):
        for flag in (False, True):
            r = room_run("fanout", "chatlog", tls=flag, clients=200, rate=2, seconds=secs)
            res.setdefault(flag, []).append(r)

    def fan(rs):
        ok = [r for r in rs if isinstance(r, dict)]
        if not ok:
            return f"n/a ({rs[0]})", None
        bad = [r for r in ok if r["delivered"] != r["expected"] or r["joined"] != r["clients"] or not r["sent"]]
        text, med = spread([r["p99_ms"] for r in ok], "{:.1f}")
        p50 = spread([r["p50_ms"] for r in ok], "{:.1f}")[0]
        return f"p99 {text} ms, p50 {p50}" + (f"; {len(bad)} of {len(ok)} runs incomplete" if bad else ", complete"), med

    (a, a_med), (b, b_med) = fan(res[True]), fan(res[False])
    row(f"TLS: room 200 clients x 2 lines/s, {secs} s, {len(res[True])} runs", a, f"{b} plain",
        f"{a_med / b_med:.2f}" if a_med and b_med else "", "(the cost of TLS)", "")

    m = 300 if QUICK else 1000
    idle = {False: [], True: []}
    for _ in range(1 if QUICK else 3):
        for flag in (False, True):
            idle[flag].append(room_run("idle", "chatlog", tls=flag, clients=m))

    def per(rs):
        ok = [r["kb_per_client"] for r in rs if isinstance(r, dict) and r["kb_per_client"] is not None]
        if not ok:
            return f"n/a ({rs[0]})", None
        text, med = spread(ok, "{:.1f}")
        return f"{text} KB", med

    (a, a_med), (b, b_med) = per(idle[True]), per(idle[False])
    row(f"TLS: server RSS per idle client, {m:,} clients, {len(idle[True])} runs", a, f"{b} plain",
        f"+{a_med - b_med:.1f} KB" if a_med is not None and b_med is not None else "", "(the cost of TLS)", "")

    c = 2_000 if QUICK else 10_000
    crowd = {flag: room_run("crowd", "chatlog", tls=flag, clients=c) for flag in (False, True)}

    def held(r):
        if _na(r):
            return _na(r)
        return (f"{r['joined']:,} joined, {r['got_line']:,} of {r['of']:,} got the line; peak RSS "
                f"{r['server_vmhwm_mb']} MB; connected in {r['connect_s']} s")

    r = crowd[True]
    row(f"TLS: room, {c:,} concurrent TLS clients, one line to all", held(r), f"{held(crowd[False])} plain", "",
        "all get it, peak RSS < 500 MB",
        None if _na(r) else (r["got_line"] == c - 1 and (r["server_vmhwm_mb"] or 1e9) < 500))


def upkeep():
    """Retention and forget beside a live chat (no turn held past 2 s), and the newest 1,000
    messages of the large archive by id (an incremental export's cron run)."""
    src, _, msgs = archive("upkeep", 200 if QUICK else 2_000, 100)
    res = upkeepcost.measure(src)
    base = res["baseline"]
    for key, label in (("retain", "serve --retain 1d"), ("forget", "forget --handle")):
        worst, n, took, what = res[key]
        row(f"{label} ({what} of {msgs:,} msgs) beside a chat: slowest turn", f"{worst * 1000:.0f} ms ({n} turns, "
            f"{took:.1f} s)", f"{base[0] * 1000:.0f} ms idle ({base[1]} turns)", f"{worst / base[0]:.1f}",
            "< 2 s", worst < 2.0 and what != "not finished")


def after_id(big, msgs):
    figure = f"export --after-id (newest 1,000 of {msgs:,} msgs)"
    upto = sqlite3.connect(big).execute("SELECT max(id) FROM messages").fetchone()[0] - 1000
    a, b = run_interleaved([[*CHATLOG, "export", "-f", "jsonl", "--after-id", str(upto), "--db", str(big)],
                            ["sqlite3", "-json", str(big), f"SELECT * FROM messages WHERE id > {upto} ORDER BY id"]],
                           runs=7)
    row(figure, ms(a), ms(b) + " sqlite3 -json", f"{a[0] / b[0]:.2f}", "< 150 ms", a[0] < 0.150)


FIGURES = ("startup", "turns", "fsync", "logging", "archive", "stats", "export", "web", "memory", "room", "tls", "upkeep", "link")


def main():
    only = set(FIGURES)
    for arg in sys.argv[1:]:
        if arg.startswith("--only="):
            only = set(arg.split("=", 1)[1].split(","))
    t = time.perf_counter()
    if "startup" in only:  # (first: see startup)
        print("start-up ...", file=sys.stderr, flush=True)
        startup()
    if only & {"archive", "stats", "export", "upkeep", "web"}:
        big_sessions = 5_000 if QUICK else 100_000
        big, long_id, msgs = archive("big", big_sessions, 20)
        small, small_long, small_msgs = archive("small", 1_000, 20)
    for key, name, figure in (
        ("turns", "turn cost", turn_cost), ("fsync", "turn cost with --fsync", fsync_cost),
        ("logging", "logging cost", logging_cost),
        ("archive", "archive queries", lambda: archive_queries(big, long_id, msgs, small, small_long, small_msgs)),
        ("stats", "stats", lambda: stats(big, msgs)),
        ("export", "export", lambda: exports(big, msgs)),
        ("upkeep", "incremental export", lambda: after_id(big, msgs)), ("upkeep", "upkeep beside a chat", upkeep),
        ("web", "chatlog web", lambda: web(big, long_id, msgs)),
        ("memory", "memory", memory),
        ("room", "room", room), ("tls", "TLS", tls), ("link", "linked room", link),
    ):
        if key in only:
            print(f"{name} ...", file=sys.stderr, flush=True)
            figure()
    print_table(time.perf_counter() - t)


def print_table(elapsed):
    head = ("figure", "chatlog", "baseline", "ratio", "target", "result")
    widths = [max(len(str(r[i])) for r in [head, *ROWS]) for i in range(6)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |"
    cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    load = open("/proc/loadavg").read().split()[0]
    print(f"\nchatlog benchmarks, {time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, {cores} cores, "
          f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}"
          f"{' (quick run)' if QUICK else ''}; took {elapsed:.0f} s, load average {load} at the end")
    print("Times are medians of several runs with (min-max); whole processes unless noted.\n")
    print(line)
    print("| " + " | ".join("-" * w for w in widths) + " |")
    for r in ROWS:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    misses = [r[0] for r in ROWS if r[5] == "MISS"]
    print(f"\n{len(misses)} target(s) missed" + (": " + "; ".join(misses) if misses else ""))


if __name__ == "__main__":
    main()
