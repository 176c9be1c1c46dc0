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
QUICK = os.environ.get("BENCH_QUICK") == "1"


def median_spread(values):
    """(median, 'min-max') of a list of numbers."""
    return statistics.median(values), (min(values), max(values))


def run_timed(cmd, runs=7, stdout=subprocess.DEVNULL, env=None):
    """Whole-process wall time (seconds) of `cmd`, median and spread over `runs` runs."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        subprocess.run(cmd, stdout=stdout, stderr=subprocess.DEVNULL, check=True, env=env)
        times.append((time.perf_counter_ns() - t0) / 1e9)
    return median_spread(times)


def peak_rss_mb(cmd, stdout=subprocess.DEVNULL):
    """Peak resident memory (MB) of one run of `cmd`, as /usr/bin/time -v reports it."""
    r = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], stdout=stdout, stderr=subprocess.PIPE, check=True, text=True)
    return int(r.stderr.strip().splitlines()[-1]) / 1024


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")
