"""The database schema, as an ordered list of small named migrations.

Migrations are applied with sqlite-utils' `Migrations` (recorded in `_sqlite_migrations`). The
names are listed here without importing sqlite-utils, so read-only commands can check that a
database is current without paying for that import; the import happens only when something is
pending.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from sqlite_utils import Database

MIGRATION_SET = "chatlog"
MIGRATIONS: list[Callable[["Database"], None]] = []


def migration(fn: Callable[["Database"], None]) -> Callable[["Database"], None]:
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_sessions_and_messages(db: "Database") -> None:
    db["sessions"].create(
        {
            "id": int,
            "started_at": str,  # UTC ISO 8601 with microseconds: when the client connected
            "served_at": str,  # when its chat began (after waiting in the queue)
            "ended_at": str,
            "client_host": str,
            "client_port": int,
            "server_host": str,
            "server_port": int,
            "handle": str,
            "end_reason": str,  # client-quit, server-quit, disconnect, timeout, shutdown, ...
            "client_messages": int,  # final counts, set when the session ends
            "server_messages": int,
        },
        pk="id",
        defaults={"client_messages": 0, "server_messages": 0},
        not_null={"started_at", "client_messages", "server_messages"},
    )
    db["sessions"].create_index(["started_at"])
    db["sessions"].create_index(["handle"])
    db["sessions"].create_index(["client_host"])
    db["messages"].create(
        {
            "id": int,
            "session_id": int,
            "seq": int,  # 1, 2, 3... within the session
            "at": str,  # UTC ISO 8601 with microseconds
            "sender": str,  # client or server
            "handle": str,
            "text": str,  # decoded text (invalid UTF-8 as U+FFFD)
            "raw": bytes,  # the received bytes, only when they differ from the canonical line
            "note": str,  # what the receiver did to the line, e.g. cut at the length limit
        },
        pk="id",
        foreign_keys=[("session_id", "sessions", "id")],
        not_null={"session_id", "seq", "at", "sender", "text"},
    )
    db["messages"].create_index(["session_id", "seq"], unique=True)
    db["messages"].create_index(["at"])
    # Message counts are written to the session row when it ends (and computed live for the few
    # sessions in progress), so listing sessions never scans messages and the chat turn does not
    # pay for a second row update per message.


@migration
def m002_messages_fts(db: "Database") -> None:
    # Full-text search over message text, an external-content FTS5 table kept current by triggers.
    db["messages"].enable_fts(["text"], fts_version="FTS5", create_triggers=True, tokenize="unicode61")


NAMES = [fn.__name__ for fn in MIGRATIONS]


def apply(db: "Database") -> None:
    from sqlite_utils.migrations import Migrations

    migrations = Migrations(MIGRATION_SET)
    for fn in MIGRATIONS:
        migrations(name=fn.__name__)(fn)
    migrations.apply(db)
