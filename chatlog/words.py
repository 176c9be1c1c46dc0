"""The project's vocabulary, in one place: why a session or a participant ended and how each
audience is told (the client's notice, the console, the transcript), how counts, durations and
addresses are written. Every module takes its words from here, so one reason is never worded two
ways.

Pure and cheap to import (the chat path uses it): no third-party module, nothing heavy.
"""

from __future__ import annotations

# -- end reasons: the words for each audience --------------------------------------------------

# What a client is told before `\quit`, by end reason (docs/protocol.md, "Notices").
NOTICES = {
    "server-quit": "The server closed the chat.",
    "shutdown": "The server shut down.",
    "busy": "The server is busy; try again later.",
    "flood": "Too many messages without an answer: disconnected.",
    "overlong": "A line over 8192 bytes: disconnected.",
    "kicked": "The operator removed you from the room.",
    "store": "The server cannot record the chat right now; try again later.",
    "slow": "You stopped reading what the room sends: disconnected.",
    "per-address": "Too many connections from your address; try again later.",
}


def timeout_notice(seconds: float) -> str:
    """What a 1:1 client is told when its turn timed out."""
    return f"No message for {seconds:g} s: timed out."


# How the console and the transcript word the end of a 1:1 session (`ended_text`).
ENDINGS = {
    "client-quit": "client has quit",
    "server-quit": "chat ended by the server",
    "disconnect": "client has disconnected",
    "timeout": "client timed out on its turn",
    "shutdown": "chat closed by server shutdown",
    "interrupted": "session interrupted (the server stopped unexpectedly)",
    "overlong": "client dropped for a line that is too long",
    "stalled": "client dropped: it stopped reading",
    "flood": "client dropped for flooding",
    "busy": "client refused: the server was busy",
}

# How the console and the transcript word a participant's leaving a room, by end reason.
LEFT = {
    "client-quit": "quit",
    "disconnect": "disconnected",
    "slow": "dropped, it stopped reading",
    "kicked": "removed by the operator",
    "overlong": "dropped for a line over 8192 bytes",
    "name-taken": "the name was taken first on another server",
    "server-gone": "their server stopped answering",
}


def ended_text(reason: str, session_id: int, client: int, server: int, idle: float | None = None) -> str:
    """The console line for the end of a session, e.g. `client has quit (session 1, 2 messages
    each way)`: the same words in serve, show, replay, tail and the text export."""
    counts = f"{plural(client, 'message')} each way" if client == server else (
        f"{client} from the client, {server} from the server"
    )
    what = ENDINGS.get(reason, f"session ended ({reason})")
    if reason == "timeout" and idle:
        what = f"client timed out after {duration(idle)} on its turn"
    return f"{what} (session {session_id}, {counts})"


def connected_text(host: str | None, port: int | None) -> str:
    """The console line for a 1:1 client's chat beginning."""
    return f"connected to: {host} port {port}"


# -- counts and durations ----------------------------------------------------------------------


def plural(n: int, word: str, many: str | None = None) -> str:
    """`1 message`, `2 messages`."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def duration(seconds: float | None) -> str:
    """A duration in the one style used everywhere: `0.5s`, `41s`, `1m 02s`, `2h 05m`."""
    if seconds is None:
        return ""
    if seconds < 10 and seconds != int(seconds):
        return f"{seconds:.1f}".rstrip("0").rstrip(".") + "s"
    return _clock(int(round(seconds)), " ")


def idle_text(seconds: float) -> str:
    """An idle time for the room's `\\who` column: whole seconds, compact (`41s`, `1m02s`, `2h05m`)."""
    return _clock(int(max(0.0, seconds)), "")


def _clock(s: int, sep: str) -> str:
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{sep}{s % 60:02d}s"
    return f"{s // 3600}h{sep}{s % 3600 // 60:02d}m"


# -- addresses ---------------------------------------------------------------------------------


def plain_host(host: str) -> str:
    """An IPv4-mapped IPv6 host (`::ffff:10.0.0.1`) as the IPv4 address it is."""
    return host[7:] if host.startswith("::ffff:") else host


def address(host: str, port: int) -> str:
    """`host:port`, an IPv6 host in brackets, a v4-mapped one as plain IPv4."""
    host = plain_host(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def address_key(host: str) -> str:
    """What `--per-address` counts: an IPv4 address as itself (a v4-mapped form included) and an
    IPv6 address by its /64, the block one host picks its source addresses from (`2001:db8::/64`).
    A host that is not an IP address (a name in a test) counts as itself."""
    host = plain_host(host)
    if ":" not in host:
        return host
    import ipaddress  # here: the read commands import this module too, and need it not

    try:
        ip = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
