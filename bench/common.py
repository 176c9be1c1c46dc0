"""Small helpers shared by the benchmarks: timing whole processes, medians, spreads."""

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
CHATLOG = [str(VENV_BIN / "chatlog")]
DATA = ROOT / "bench" / "data"
QUICK = os.environ.get("BENCH_QUICK") == "1" or "--quick" in sys.argv


class Missing(Exception):
    """A command the figure needs does not exist (yet)."""


def median_spread(values):
    """(median, (min, max)) of a list of numbers."""
    return statistics.median(values), (min(values), max(values))


def has_command(name):
    """True if `chatlog NAME` exists (the transcript commands may not have landed yet)."""
    r = subprocess.run([*CHATLOG, name, "--help"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return r.returncode == 0


def run_timed(cmd, runs=7, stdout=subprocess.DEVNULL, env=None):
    """Whole-process wall time (seconds) of `cmd`: (median, (min, max)) over `runs` runs, after
    one untimed warm-up run (so every run finds the file in the page cache)."""
    return run_interleaved([cmd], runs, stdout, env)[0]


def run_interleaved(cmds, runs=11, stdout=subprocess.DEVNULL, env=None):
    """run_timed for several commands taken in turn (a, b, c, a, b, c, ...): whatever else the
    machine does meanwhile falls on all of them alike (its speed moves by tens of percent within
    minutes here). One (median, (min, max)) per command."""
    times = [[] for _ in cmds]
    for i in range(runs + 1):
        for cmd, got in zip(cmds, times, strict=True):
            t0 = time.perf_counter_ns()
            r = subprocess.run(cmd, stdout=stdout, stderr=subprocess.PIPE, env=env)
            elapsed = (time.perf_counter_ns() - t0) / 1e9
            if r.returncode != 0:
                raise Missing(f"{' '.join(map(str, cmd[:3]))}: exit {r.returncode}: {r.stderr.decode()[-200:]}")
            if i:
                got.append(elapsed)
    return [median_spread(t) for t in times]


def peak_rss_and_lines(cmd):
    """Peak resident memory (MB) of one run of `cmd` (as /usr/bin/time reports it), and how many
    lines it wrote (counted by `wc -l`, so the output is checked without being held)."""
    time_cmd = ["/usr/bin/time", "-f", "%M", *map(str, cmd)]
    p = subprocess.Popen(time_cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wc = subprocess.run(["wc", "-l"], stdin=p.stdout, capture_output=True, text=True)
    p.stdout.close()
    err = p.stderr.read().decode()
    if p.wait() != 0:
        raise Missing(f"{' '.join(map(str, cmd[:3]))}: {err[-200:]}")
    return int(err.strip().splitlines()[-1]) / 1024, int(wc.stdout)


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")
