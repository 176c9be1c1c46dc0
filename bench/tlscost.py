"""TLS handshakes against plain connects: a client loop that connects to `chatlog serve --room
--tls-port 0`, waits for the room's greeting (its first line) and closes, N times; over TLS each
is a full handshake (TLS 1.3, no session resumption, the server's certificate verified).
Sequential, and with a few clients in parallel (threads; the handshake releases the GIL), each
from its own source address (127.0.0.2+), as users behind different addresses would be.

  python bench/tlscost.py [--connections 500] [--parallel 1] [--tls]
"""

import argparse
import json
import socket
import threading
import time

import roomload


def _client(port, ctx, count, addr, failures):
    for _ in range(count):
        s = socket.socket()
        s.bind((addr, 0))
        try:
            s.connect(("127.0.0.1", port))
            s.settimeout(10)
            if ctx is not None:
                s = ctx.wrap_socket(s, server_hostname="127.0.0.1")
            got = b""
            while b"\n" not in got:
                more = s.recv(4096)
                if not more:
                    raise ConnectionError("closed before the greeting")
                got += more
        except OSError:
            failures.append(1)
        finally:
            s.close()


def connections(n=500, parallel=1, tls=False):
    """n connections to the room's greeting, `parallel` clients at a time; a fresh server each
    call. Returns {"per_s", "seconds", "failed", ...}."""
    roomload.raise_fd_limit()
    with roomload.Target("chatlog", tls=tls) as target:
        server = target.start(parallel + 10)
        try:
            ctx = target.tls_context
            _client(server.port, ctx, 5, "127.0.0.2", [])  # warm-up: the first handshakes load code
            failures = []
            share = [n // parallel + (i < n % parallel) for i in range(parallel)]
            threads = [threading.Thread(target=_client, args=(server.port, ctx, k, f"127.0.1.{i + 2}", failures))
                       for i, k in enumerate(share)]
            cpu0 = server.cpu_seconds()
            t = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            took = time.perf_counter() - t
            cpu = server.cpu_seconds()
            return {"connections": n, "parallel": parallel, "tls": tls, "seconds": round(took, 3),
                    "per_s": round(n / took, 1), "failed": len(failures),
                    "server_cpu_ms_each": cpu is not None and cpu0 is not None and round(1000 * (cpu - cpu0) / n, 2),
                    "server_alive": server.alive()}
        finally:
            server.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--connections", type=int, default=500)
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--tls", action="store_true")
    a = ap.parse_args()
    print(json.dumps(connections(a.connections, a.parallel, a.tls), indent=1))


if __name__ == "__main__":
    main()
