"""A scripted TCP peer on loopback, for driving the C client through hostile or sloppy servers."""

import socket
import struct
import threading


class FakeServer:
    """Accepts one client; `script(conn)` runs in a thread and talks to it with raw bytes.

    Tests make these through conftest's `fake_server` fixture, which joins each at teardown:
    a script's failure (a wrong byte from the client, say) then fails the test even when the
    test does not join it itself."""

    def __init__(self, script):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.received = b""
        self.error = None
        self._script = script
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            conn, _ = self.sock.accept()
            conn.settimeout(20)
            with conn:
                self._script(Peer(self, conn))
        except Exception as exc:  # noqa: BLE001 (reported by the test)
            self.error = exc
        finally:
            self.sock.close()

    def join(self, timeout=20):
        """Wait for the script to end; its failure, if any, is raised here (once)."""
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError(f"the fake server's script did not finish in {timeout} s; received {self.received!r}")
        error, self.error = self.error, None
        if error:
            raise error


class Peer:
    def __init__(self, server, conn):
        self.server = server
        self.conn = conn

    def expect(self, data: bytes):
        """Read until `data` has been received; fail if the client sends something else."""
        while not self.server.received.endswith(data) and data not in self.server.received:
            chunk = self.conn.recv(65536)
            if not chunk:
                raise AssertionError(f"client closed; received {self.server.received!r}, wanted {data!r}")
            self.server.received += chunk

    def send(self, data: bytes):
        self.conn.sendall(data)

    def wait_close(self):
        while True:
            chunk = self.conn.recv(65536)
            if not chunk:
                return
            self.server.received += chunk

    def reset(self):
        self.conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.conn.close()
