"""The database schema, as one ordered registry of small named migrations, in plain SQL.

Each migration runs in its own transaction with the record of it in `_sqlite_migrations` (the
table and format sqlite-utils' `Migrations` used for the first two, so archives written by earlier
versions carry on). Only `chatlog.db` applies them; a read-only opening never does.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone
from typing import Callable

MIGRATION_SET = "chatlog"
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = []


def migration(fn: Callable[[sqlite3.Connection], None]) -> Callable[[sqlite3.Connection], None]:
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_sessions_and_messages(conn: sqlite3.Connection) -> None:
    # Times: UTC ISO 8601 with microseconds. served_at: when its chat began (after waiting in
    # the queue). end_reason: client-quit, server-quit, disconnect, timeout, shutdown, ...
    # client_messages/server_messages: final counts, set when the session ends (and computed live
    # for the few sessions in progress), so listing sessions never scans messages.
    run_script(
        conn,
        """
        CREATE TABLE "sessions" (
           "id" INTEGER PRIMARY KEY,
           "started_at" TEXT NOT NULL,
           "served_at" TEXT,
           "ended_at" TEXT,
           "client_host" TEXT,
           "client_port" INTEGER,
           "server_host" TEXT,
           "server_port" INTEGER,
           "handle" TEXT,
           "end_reason" TEXT,
           "client_messages" INTEGER NOT NULL DEFAULT 0,
           "server_messages" INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX "idx_sessions_started_at" ON "sessions" ("started_at");
        CREATE INDEX "idx_sessions_handle" ON "sessions" ("handle");
        CREATE INDEX "idx_sessions_client_host" ON "sessions" ("client_host");
        CREATE TABLE "messages" (
           "id" INTEGER PRIMARY KEY,
           "session_id" INTEGER NOT NULL REFERENCES "sessions"("id"),
           "seq" INTEGER NOT NULL,
           "at" TEXT NOT NULL,
           "sender" TEXT NOT NULL,
           "handle" TEXT,
           "text" TEXT NOT NULL,
           "raw" BLOB,
           "note" TEXT
        );
        CREATE UNIQUE INDEX "idx_messages_session_id_seq" ON "messages" ("session_id", "seq");
        CREATE INDEX "idx_messages_at" ON "messages" ("at");
        """
    )


@migration
def m002_messages_fts(conn: sqlite3.Connection) -> None:
    # Full-text search over message text: an external-content FTS5 table kept current by triggers.
    run_script(
        conn,
        """
        CREATE VIRTUAL TABLE "messages_fts" USING FTS5 ("text", tokenize='unicode61', content="messages");
        INSERT INTO "messages_fts" (rowid, "text") SELECT rowid, "text" FROM "messages";
        CREATE TRIGGER "messages_ai" AFTER INSERT ON "messages" BEGIN
          INSERT INTO "messages_fts" (rowid, "text") VALUES (new.rowid, new."text");
        END;
        CREATE TRIGGER "messages_ad" AFTER DELETE ON "messages" BEGIN
          INSERT INTO "messages_fts" ("messages_fts", rowid, "text") VALUES('delete', old.rowid, old."text");
        END;
        CREATE TRIGGER "messages_au" AFTER UPDATE ON "messages" BEGIN
          INSERT INTO "messages_fts" ("messages_fts", rowid, "text") VALUES('delete', old.rowid, old."text");
          INSERT INTO "messages_fts" (rowid, "text") VALUES (new.rowid, new."text");
        END;
        """
    )



@migration
def m003_servers_and_deletes(conn: sqlite3.Connection) -> None:
    # Each run of `chatlog serve` is a row; while it runs it holds a lock on byte `id` of the
    # sidecar file DB-lock (see chatlog.db.ServerLock), so another process can tell a live
    # server's sessions from those a crash left open. `deleting`: a delete in progress (done in
    # small batches); such a session is hidden from every read and finished by the next rm/prune.
    run_script(
        conn,
        """
        CREATE TABLE "servers" (
           "id" INTEGER PRIMARY KEY,
           "pid" INTEGER NOT NULL,
           "hostname" TEXT NOT NULL,
           "host" TEXT,
           "port" INTEGER,
           "started_at" TEXT NOT NULL,
           "stopped_at" TEXT
        );
        ALTER TABLE "sessions" ADD COLUMN "server_id" INTEGER REFERENCES "servers"("id");
        ALTER TABLE "sessions" ADD COLUMN "deleting" INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX "idx_sessions_open" ON "sessions" ("server_id") WHERE "ended_at" IS NULL;
        CREATE INDEX "idx_sessions_deleting" ON "sessions" ("id") WHERE "deleting" != 0;
        """,
    )


@migration
def m004_rooms(conn: sqlite3.Connection) -> None:
    # A room is one session of kind 'room' with many participants; a 1:1 chat is kind 'chat' and
    # reads exactly as before. Joins and leaves are messages with sender 'event'.
    run_script(
        conn,
        """
        ALTER TABLE "sessions" ADD COLUMN "kind" TEXT NOT NULL DEFAULT 'chat';
        CREATE TABLE "participants" (
           "id" INTEGER PRIMARY KEY,
           "session_id" INTEGER NOT NULL REFERENCES "sessions"("id"),
           "host" TEXT,
           "port" INTEGER,
           "handle" TEXT,
           "joined_at" TEXT NOT NULL,
           "left_at" TEXT,
           "end_reason" TEXT
        );
        CREATE INDEX "idx_participants_session_id" ON "participants" ("session_id");
        ALTER TABLE "messages" ADD COLUMN "participant_id" INTEGER REFERENCES "participants"("id");
        CREATE INDEX "idx_messages_participant_id" ON "messages" ("participant_id")
            WHERE "participant_id" IS NOT NULL;
        """,
    )


@migration
def m005_refusals(conn: sqlite3.Connection) -> None:
    # Refused connections, counted per host, reason and minute, instead of a session row each.
    run_script(
        conn,
        """
        CREATE TABLE "refusals" (
           "host" TEXT NOT NULL,
           "reason" TEXT NOT NULL,
           "minute" TEXT NOT NULL,
           "count" INTEGER NOT NULL,
           "first_at" TEXT NOT NULL,
           "last_at" TEXT NOT NULL,
           PRIMARY KEY ("host", "reason", "minute")
        ) WITHOUT ROWID;
        """,
    )


FTS_TOKENIZER = "unicode61 categories 'L* N* Co S*'"


@migration
def m006_search_symbols_no_events(conn: sqlite3.Connection) -> None:
    # Symbols (emoji, currency, math) are part of words, so they can be searched for; events
    # (joins, leaves) are not indexed. The index is rebuilt.
    run_script(
        conn,
        f"""
        DROP TRIGGER IF EXISTS "messages_ai";
        DROP TRIGGER IF EXISTS "messages_ad";
        DROP TRIGGER IF EXISTS "messages_au";
        DROP TABLE IF EXISTS "messages_fts";
        CREATE VIRTUAL TABLE "messages_fts" USING FTS5 ("text", tokenize="{FTS_TOKENIZER}", content="messages");
        INSERT INTO "messages_fts" (rowid, "text") SELECT id, "text" FROM "messages" WHERE sender != 'event';
        CREATE TRIGGER "messages_ai" AFTER INSERT ON "messages" WHEN new.sender != 'event' BEGIN
          INSERT INTO "messages_fts" (rowid, "text") VALUES (new.rowid, new."text");
        END;
        CREATE TRIGGER "messages_ad" AFTER DELETE ON "messages" WHEN old.sender != 'event' BEGIN
          INSERT INTO "messages_fts" ("messages_fts", rowid, "text") VALUES('delete', old.rowid, old."text");
        END;
        CREATE TRIGGER "messages_au" AFTER UPDATE ON "messages" BEGIN
          INSERT INTO "messages_fts" ("messages_fts", rowid, "text")
            SELECT 'delete', old.rowid, old."text" WHERE old.sender != 'event';
          INSERT INTO "messages_fts" (rowid, "text") SELECT new.rowid, new."text" WHERE new.sender != 'event';
        END;
        """,
    )


@migration
def m007_stats_totals(conn: sqlite3.Connection) -> None:
    # What `stats` reports, kept exact by triggers on the session rows (never per message, so the
    # chat turn does not pay for it): totals, per handle (what it said apart from the answers it
    # got), per client host and per end reason. A session being deleted no longer counts.
    # Durations are summed in whole microseconds, so removing a session restores the sum exactly;
    # `ended` counts the sessions whose duration is known (a hand-edited time may not parse).
    # Rows that reach zero are removed, so a table's row count is the number of distinct values.
    run_script(
        conn,
        """
        CREATE TABLE "totals" (
           "id" INTEGER PRIMARY KEY CHECK (id = 1),
           "sessions" INTEGER NOT NULL, "client_messages" INTEGER NOT NULL,
           "server_messages" INTEGER NOT NULL, "ended" INTEGER NOT NULL, "duration_us" INTEGER NOT NULL
        );
        INSERT INTO "totals" VALUES (1, 0, 0, 0, 0, 0);
        CREATE TABLE "handle_totals" (
           "handle" TEXT PRIMARY KEY, "sessions" INTEGER NOT NULL,
           "client_messages" INTEGER NOT NULL, "server_messages" INTEGER NOT NULL
        );
        CREATE TABLE "host_totals" ("host" TEXT PRIMARY KEY, "sessions" INTEGER NOT NULL);
        CREATE TABLE "reason_totals" ("reason" TEXT PRIMARY KEY, "sessions" INTEGER NOT NULL);
        CREATE TRIGGER "sessions_totals_ai" AFTER INSERT ON "sessions" WHEN new.deleting = 0 BEGIN
          UPDATE "totals" SET sessions = sessions + 1, client_messages = client_messages + new.client_messages,
            server_messages = server_messages + new.server_messages,
            ended = ended + ((julianday(new.ended_at) - julianday(new.started_at)) IS NOT NULL),
            duration_us = duration_us + coalesce(CAST(round((julianday(new.ended_at) - julianday(new.started_at)) * 86400000000) AS INTEGER), 0);
          INSERT INTO "handle_totals" (handle, sessions, client_messages, server_messages)
            SELECT new.handle, 1, +new.client_messages, +new.server_messages WHERE new.handle IS NOT NULL
            ON CONFLICT (handle) DO UPDATE SET sessions = sessions + excluded.sessions,
              client_messages = client_messages + excluded.client_messages,
              server_messages = server_messages + excluded.server_messages;
          INSERT INTO "host_totals" (host, sessions) SELECT new.client_host, 1 WHERE new.client_host IS NOT NULL
            ON CONFLICT (host) DO UPDATE SET sessions = sessions + excluded.sessions;
          INSERT INTO "reason_totals" (reason, sessions) SELECT coalesce(new.end_reason, 'in progress'), 1
            ON CONFLICT (reason) DO UPDATE SET sessions = sessions + excluded.sessions;
        END;
        CREATE TRIGGER "sessions_totals_ad" AFTER DELETE ON "sessions" WHEN old.deleting = 0 BEGIN
          UPDATE "totals" SET sessions = sessions - 1, client_messages = client_messages - old.client_messages,
            server_messages = server_messages - old.server_messages,
            ended = ended - ((julianday(old.ended_at) - julianday(old.started_at)) IS NOT NULL),
            duration_us = duration_us - coalesce(CAST(round((julianday(old.ended_at) - julianday(old.started_at)) * 86400000000) AS INTEGER), 0);
          INSERT INTO "handle_totals" (handle, sessions, client_messages, server_messages)
            SELECT old.handle, -1, -old.client_messages, -old.server_messages WHERE old.handle IS NOT NULL
            ON CONFLICT (handle) DO UPDATE SET sessions = sessions + excluded.sessions,
              client_messages = client_messages + excluded.client_messages,
              server_messages = server_messages + excluded.server_messages;
          INSERT INTO "host_totals" (host, sessions) SELECT old.client_host, -1 WHERE old.client_host IS NOT NULL
            ON CONFLICT (host) DO UPDATE SET sessions = sessions + excluded.sessions;
          INSERT INTO "reason_totals" (reason, sessions) SELECT coalesce(old.end_reason, 'in progress'), -1
            ON CONFLICT (reason) DO UPDATE SET sessions = sessions + excluded.sessions;
          DELETE FROM "handle_totals" WHERE sessions = 0;
          DELETE FROM "host_totals" WHERE sessions = 0;
          DELETE FROM "reason_totals" WHERE sessions = 0;
        END;
        CREATE TRIGGER "sessions_totals_au_old" BEFORE UPDATE OF handle, client_host, started_at, ended_at,
          end_reason, client_messages, server_messages, deleting ON "sessions" WHEN old.deleting = 0 BEGIN
          UPDATE "totals" SET sessions = sessions - 1, client_messages = client_messages - old.client_messages,
            server_messages = server_messages - old.server_messages,
            ended = ended - ((julianday(old.ended_at) - julianday(old.started_at)) IS NOT NULL),
            duration_us = duration_us - coalesce(CAST(round((julianday(old.ended_at) - julianday(old.started_at)) * 86400000000) AS INTEGER), 0);
          INSERT INTO "handle_totals" (handle, sessions, client_messages, server_messages)
            SELECT old.handle, -1, -old.client_messages, -old.server_messages WHERE old.handle IS NOT NULL
            ON CONFLICT (handle) DO UPDATE SET sessions = sessions + excluded.sessions,
              client_messages = client_messages + excluded.client_messages,
              server_messages = server_messages + excluded.server_messages;
          INSERT INTO "host_totals" (host, sessions) SELECT old.client_host, -1 WHERE old.client_host IS NOT NULL
            ON CONFLICT (host) DO UPDATE SET sessions = sessions + excluded.sessions;
          INSERT INTO "reason_totals" (reason, sessions) SELECT coalesce(old.end_reason, 'in progress'), -1
            ON CONFLICT (reason) DO UPDATE SET sessions = sessions + excluded.sessions;
        END;
        CREATE TRIGGER "sessions_totals_au_new" AFTER UPDATE OF handle, client_host, started_at, ended_at,
          end_reason, client_messages, server_messages, deleting ON "sessions" WHEN new.deleting = 0 BEGIN
          UPDATE "totals" SET sessions = sessions + 1, client_messages = client_messages + new.client_messages,
            server_messages = server_messages + new.server_messages,
            ended = ended + ((julianday(new.ended_at) - julianday(new.started_at)) IS NOT NULL),
            duration_us = duration_us + coalesce(CAST(round((julianday(new.ended_at) - julianday(new.started_at)) * 86400000000) AS INTEGER), 0);
          INSERT INTO "handle_totals" (handle, sessions, client_messages, server_messages)
            SELECT new.handle, 1, +new.client_messages, +new.server_messages WHERE new.handle IS NOT NULL
            ON CONFLICT (handle) DO UPDATE SET sessions = sessions + excluded.sessions,
              client_messages = client_messages + excluded.client_messages,
              server_messages = server_messages + excluded.server_messages;
          INSERT INTO "host_totals" (host, sessions) SELECT new.client_host, 1 WHERE new.client_host IS NOT NULL
            ON CONFLICT (host) DO UPDATE SET sessions = sessions + excluded.sessions;
          INSERT INTO "reason_totals" (reason, sessions) SELECT coalesce(new.end_reason, 'in progress'), 1
            ON CONFLICT (reason) DO UPDATE SET sessions = sessions + excluded.sessions;
          DELETE FROM "handle_totals" WHERE sessions = 0;
          DELETE FROM "host_totals" WHERE sessions = 0;
          DELETE FROM "reason_totals" WHERE sessions = 0;
        END;
        CREATE TRIGGER "sessions_totals_au_prune" AFTER UPDATE OF deleting ON "sessions"
          WHEN new.deleting != 0 BEGIN
          DELETE FROM "handle_totals" WHERE sessions = 0;
          DELETE FROM "host_totals" WHERE sessions = 0;
          DELETE FROM "reason_totals" WHERE sessions = 0;
        END;
        """,
    )
    # The existing sessions, counted once.
    run_script(
        conn,
        """
        UPDATE "totals" SET
          sessions = (SELECT count(*) FROM sessions WHERE deleting = 0),
          client_messages = (SELECT coalesce(sum(client_messages), 0) FROM sessions WHERE deleting = 0),
          server_messages = (SELECT coalesce(sum(server_messages), 0) FROM sessions WHERE deleting = 0),
          ended = (SELECT count(*) FROM sessions WHERE deleting = 0
            AND (julianday(ended_at) - julianday(started_at)) IS NOT NULL),
          duration_us = (SELECT coalesce(sum(CAST(round((julianday(ended_at) - julianday(started_at)) * 86400000000)
            AS INTEGER)), 0) FROM sessions WHERE deleting = 0 AND ended_at IS NOT NULL);
        INSERT INTO "handle_totals" SELECT handle, count(*), sum(client_messages), sum(server_messages)
          FROM sessions WHERE deleting = 0 AND handle IS NOT NULL GROUP BY handle;
        INSERT INTO "host_totals" SELECT client_host, count(*) FROM sessions
          WHERE deleting = 0 AND client_host IS NOT NULL GROUP BY client_host;
        INSERT INTO "reason_totals" SELECT coalesce(end_reason, 'in progress'), count(*) FROM sessions
          WHERE deleting = 0 GROUP BY 1;
        """,
    )


@migration
def m008_fts_in_background(conn: sqlite3.Connection) -> None:
    # The search index is no longer kept by an insert trigger, which tripled the cost of every
    # commit on the chat path: chatlog.indexer adds new rows in small chunks in the background, and
    # fts_progress.upto says how far it has come (every non-event row with id <= upto is indexed,
    # none above it). The rows there now were indexed by the old trigger.
    # Deleting or changing a row must touch the index only for a row that is in it: an external-
    # content FTS5 'delete' for a row never indexed corrupts the index. And ids must never be
    # reused below `upto` (INTEGER PRIMARY KEY gives max(id) + 1): when deleting the newest rows
    # leaves `upto` above max(id), it comes down to max(id).
    run_script(
        conn,
        """
        DROP TRIGGER IF EXISTS "messages_ai";
        DROP TRIGGER IF EXISTS "messages_ad";
        DROP TRIGGER IF EXISTS "messages_au";
        CREATE TABLE "fts_progress" ("upto" INTEGER NOT NULL);
        INSERT INTO "fts_progress" ("upto") SELECT coalesce(max(id), 0) FROM "messages";
        CREATE TRIGGER "messages_ad" AFTER DELETE ON "messages" BEGIN
          INSERT INTO "messages_fts" ("messages_fts", rowid, "text")
            SELECT 'delete', old.rowid, old."text"
            WHERE old.sender != 'event' AND old.id <= (SELECT upto FROM "fts_progress");
          UPDATE "fts_progress" SET upto = (SELECT coalesce(max(id), 0) FROM "messages")
            WHERE upto > (SELECT coalesce(max(id), 0) FROM "messages");
        END;
        CREATE TRIGGER "messages_au" AFTER UPDATE ON "messages" BEGIN
          INSERT INTO "messages_fts" ("messages_fts", rowid, "text")
            SELECT 'delete', old.rowid, old."text"
            WHERE old.sender != 'event' AND old.id <= (SELECT upto FROM "fts_progress");
          INSERT INTO "messages_fts" (rowid, "text") SELECT new.rowid, new."text"
            WHERE new.sender != 'event' AND new.id <= (SELECT upto FROM "fts_progress");
        END;
        """,
    )


@migration
def m009_transport_and_identities(conn: sqlite3.Connection) -> None:
    # How each client was connected (plain TCP or TLS, its version and cipher, the client
    # certificate's fingerprint) and whether its handle was verified (bound to that certificate),
    # for 1:1 sessions and room participants alike; old rows read as plain, unverified. And the
    # bindings: a handle first used over TLS with a client certificate belongs to it.
    cols = (
        """ADD COLUMN "transport" TEXT NOT NULL DEFAULT 'tcp';""",
        """ADD COLUMN "tls_version" TEXT;""",
        """ADD COLUMN "tls_cipher" TEXT;""",
        """ADD COLUMN "cert_fingerprint" TEXT;""",
        """ADD COLUMN "verified" INTEGER NOT NULL DEFAULT 0;""",
    )
    run_script(
        conn,
        "\n".join(f'ALTER TABLE "{t}" {c}' for t in ("sessions", "participants") for c in cols)
        + """
        CREATE TABLE "identities" (
          "handle" TEXT NOT NULL,
          "skeleton" TEXT NOT NULL PRIMARY KEY,
          "fingerprint" TEXT NOT NULL,
          "first_seen" TEXT NOT NULL,
          "last_seen" TEXT NOT NULL,
          "sessions" INTEGER NOT NULL DEFAULT 1
        );
        """,
    )


@migration
def m010_room_names(conn: sqlite3.Connection) -> None:
    # A room has a name (`serve --room --name`, default `room-PORT`); every run of the same name
    # is the same room, and a client that joins is shown its last lines from all of them. A
    # room recorded before names existed was, by that default, `room-` and its port.
    run_script(
        conn,
        """
        ALTER TABLE "sessions" ADD COLUMN "room" TEXT;
        UPDATE "sessions" SET "room" = 'room-' || "server_port" WHERE "kind" = 'room' AND "server_port" IS NOT NULL;
        CREATE INDEX "idx_sessions_room" ON "sessions" ("room", "id") WHERE "room" IS NOT NULL;
        """,
    )


@migration
def m011_verified_messages(conn: sqlite3.Connection) -> None:
    # Whether a line was said under a handle bound to the certificate its client presented (see
    # m009), as it was at the moment it was said: every reader marks it without working it out.
    run_script(conn, """ALTER TABLE "messages" ADD COLUMN "verified" INTEGER NOT NULL DEFAULT 0;""")


@migration
def m012_removed_messages(conn: sqlite3.Connection) -> None:
    # A removed message (`rm --message`, `forget`) stays in place as a tombstone: its text is
    # emptied (the messages_au trigger takes the old text out of the search index), its raw bytes
    # and note cleared, and removed_at says when; its id and sequence number stay, so numbering
    # and replays stay whole. Room participants are found by handle (sessions --handle, forget).
    run_script(
        conn,
        """
        ALTER TABLE "messages" ADD COLUMN "removed_at" TEXT;
        CREATE INDEX "idx_participants_handle" ON "participants" ("handle");
        """,
    )


@migration
def m013_ids_never_reused(conn: sqlite3.Connection) -> None:
    # SQLite gives a new row the largest id + 1, so deleting the newest session (rm, prune) would
    # hand its ids to the next ones: an incremental export's cursor, already past them, would skip
    # those messages, and `session 12` would name another chat. Each table's highest id ever
    # deleted is kept here (by the triggers), and the recorder never gives out one at or below it.
    run_script(
        conn,
        """
        CREATE TABLE "id_floors" ("name" TEXT PRIMARY KEY, "upto" INTEGER NOT NULL);
        INSERT INTO "id_floors" VALUES ('messages', 0), ('sessions', 0);
        CREATE TRIGGER "messages_floor" AFTER DELETE ON "messages"
          WHEN OLD."id" > (SELECT "upto" FROM "id_floors" WHERE "name" = 'messages') BEGIN
          UPDATE "id_floors" SET "upto" = OLD."id" WHERE "name" = 'messages';
        END;
        CREATE TRIGGER "sessions_floor" AFTER DELETE ON "sessions"
          WHEN OLD."id" > (SELECT "upto" FROM "id_floors" WHERE "name" = 'sessions') BEGIN
          UPDATE "id_floors" SET "upto" = OLD."id" WHERE "name" = 'sessions';
        END;
        """,
    )


@migration
def m014_room_links(conn: sqlite3.Connection) -> None:
    # A room linked across servers through a broker (`serve --room --link`). `node`: this
    # archive's stable identity (made once, kept for good), which every line it originates
    # carries. Each message carries its origin (server and id, unique together: a line present on
    # several servers is the same line) and, once it came through the room's stream, the
    # stream's sequence: the one order of a linked room. `room_links`: how far each room's stream
    # has been committed here (with the newest line's stream sequence, if later: since then a
    # lone line carries it, see recorder.stream_position), written with what it counts, so a restart
    # (even after kill -9) resumes with no gap and no duplicate. `merged`: what `chatlog merge`
    # has taken from each source, so merging again changes nothing.
    run_script(
        conn,
        """
        CREATE TABLE "node" ("id" INTEGER PRIMARY KEY CHECK (id = 1), "uid" TEXT NOT NULL);
        INSERT INTO "node" ("id", "uid") VALUES (1, lower(hex(randomblob(8))));
        ALTER TABLE "messages" ADD COLUMN "origin_server" TEXT;
        ALTER TABLE "messages" ADD COLUMN "origin_id" TEXT;
        ALTER TABLE "messages" ADD COLUMN "stream_seq" INTEGER;
        CREATE UNIQUE INDEX "idx_messages_origin" ON "messages" ("origin_server", "origin_id")
            WHERE "origin_server" IS NOT NULL;
        CREATE TABLE "room_links" (
           "room" TEXT PRIMARY KEY,
           "stream" TEXT NOT NULL,
           "last_seq" INTEGER NOT NULL DEFAULT 0
        );
        CREATE TABLE "merged" (
           "source" TEXT NOT NULL,
           "session_id" INTEGER NOT NULL,
           "merged_session" INTEGER NOT NULL,
           PRIMARY KEY ("source", "session_id")
        ) WITHOUT ROWID;
        """,
    )



@migration
def m015_no_time_index_on_messages(conn: sqlite3.Connection) -> None:
    # Nothing reads messages by time through an index (a session's lines go by (session_id, seq),
    # search narrows by its own index first, retention and listings go by the sessions' times),
    # yet every commit wrote a page of it: ~10 us of a ~37 us commit of a turn's two messages,
    # ~0.6 us a row of a room's burst. Dropping it frees its pages too.
    run_script(conn, '''DROP INDEX IF EXISTS "idx_messages_at";''')


@migration
def m016_id_floors_without_rowid(conn: sqlite3.Connection) -> None:
    # A 1:1 turn's INSERT reads the messages' id floor (recorder._INSERT_ROWS_AFTER). As a table
    # keyed by rowid with a text primary key, that is two lookups: the key's index, then the row;
    # WITHOUT ROWID it is one (measured: 3-6 us less of the server's CPU a turn). The
    # triggers that raise the floors name the table, so they are made again around it.
    run_script(
        conn,
        """
        DROP TRIGGER "messages_floor";
        DROP TRIGGER "sessions_floor";
        CREATE TABLE "id_floors_new" ("name" TEXT PRIMARY KEY, "upto" INTEGER NOT NULL) WITHOUT ROWID;
        INSERT INTO "id_floors_new" ("name", "upto") SELECT "name", "upto" FROM "id_floors";
        DROP TABLE "id_floors";
        ALTER TABLE "id_floors_new" RENAME TO "id_floors";
        CREATE TRIGGER "messages_floor" AFTER DELETE ON "messages"
          WHEN OLD."id" > (SELECT "upto" FROM "id_floors" WHERE "name" = 'messages') BEGIN
          UPDATE "id_floors" SET "upto" = OLD."id" WHERE "name" = 'messages';
        END;
        CREATE TRIGGER "sessions_floor" AFTER DELETE ON "sessions"
          WHEN OLD."id" > (SELECT "upto" FROM "id_floors" WHERE "name" = 'sessions') BEGIN
          UPDATE "id_floors" SET "upto" = OLD."id" WHERE "name" = 'sessions';
        END;
        """,
    )


@migration
def m017_merged_upto(conn: sqlite3.Connection) -> None:
    # How far `chatlog merge` has read each source session (its highest message id taken), so
    # merging a busy room again reads only what came since, not the whole room again.
    run_script(conn, '''ALTER TABLE "merged" ADD COLUMN "upto" INTEGER NOT NULL DEFAULT 0;''')

@migration
def m018_participants_origin(conn: sqlite3.Connection) -> None:
    # A linked room's participant as every server knows them: the server they are on (its node
    # uid) and their key there (`run.conn`). Each linked server's archive has a row for everyone
    # in the room: its own people with their address, the others' without one (only the server
    # they were on has it). `chatlog merge` knows one person by this, whichever archive it
    # reads first.
    run_script(
        conn,
        """
        ALTER TABLE "participants" ADD COLUMN "origin_server" TEXT;
        ALTER TABLE "participants" ADD COLUMN "origin_key" TEXT;
        CREATE INDEX "idx_participants_origin" ON "participants" ("session_id", "origin_server", "origin_key")
            WHERE "origin_server" IS NOT NULL;
        """,
    )


@migration
def m019_wal_begun(conn: sqlite3.Connection) -> None:
    # One row the background checkpointer changes to begin the WAL again itself after a
    # checkpoint, while the chat pauses (db.begin_wal_again): a write that changes nothing
    # writes nothing, and so begins nothing.
    run_script(
        conn,
        """
        CREATE TABLE "wal_begun" ("n" INTEGER NOT NULL);
        INSERT INTO "wal_begun" ("n") VALUES (0);
        """,
    )


@migration
def m020_event_handles(conn: sqlite3.Connection) -> None:
    # Who was ever called a name in a room: their joins and renames under it (a participant keeps
    # the name they came with). Events only, so a room's lines, the bulk, write nothing to it.
    # `forget --handle NAME` and `sessions --handle NAME` find a later name through it.
    run_script(conn, """CREATE INDEX "idx_messages_event_handle" ON "messages" ("handle") WHERE "sender" = 'event';""")


NAMES = [fn.__name__ for fn in MIGRATIONS]


def message_count(sender: str) -> str:
    """The one definition of a session's message count from one side (`client` or `server`), as
    an SQL expression on the `sessions` row: written into the row when the session ends, and
    evaluated live for a session still in progress."""
    assert sender in ("client", "server")
    return f"(SELECT count(*) FROM messages m WHERE m.session_id = sessions.id AND m.sender = '{sender}')"

_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS "_sqlite_migrations" (
   "id" INTEGER PRIMARY KEY,
   "migration_set" TEXT,
   "name" TEXT,
   "applied_at" TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS "idx__sqlite_migrations_migration_set_name"
    ON "_sqlite_migrations" ("migration_set", "name");
"""


def applied(conn: sqlite3.Connection) -> list[str] | None:
    """The names applied, in order; None when the file has no migrations table at all."""
    if not conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlite_migrations'"
    ).fetchone():
        return None
    return [
        r[0]
        for r in conn.execute(
            "SELECT name FROM _sqlite_migrations WHERE migration_set = ? ORDER BY id", (MIGRATION_SET,)
        )
    ]


def run_script(conn: sqlite3.Connection, script: str) -> None:
    """Run several statements inside the caller's transaction (unlike `executescript`, which
    commits first)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            conn.execute(pending)
            pending = ""
    if pending.strip():
        raise ValueError(f"incomplete SQL statement: {pending.strip()[:60]}")


def apply(conn: sqlite3.Connection) -> list[str]:
    """Apply every pending migration, each in one transaction with its record (`conn` in
    autocommit mode). Returns the names applied."""
    ran = []
    for fn in MIGRATIONS:
        conn.execute("BEGIN IMMEDIATE")
        try:
            if fn.__name__ in (applied(conn) or []):  # applied before, or by another process now
                conn.execute("COMMIT")
                continue
            run_script(conn, _MIGRATIONS_TABLE)
            fn(conn)
            conn.execute(
                "INSERT INTO _sqlite_migrations (migration_set, name, applied_at) VALUES (?, ?, ?)",
                (MIGRATION_SET, fn.__name__, datetime.now(timezone.utc).isoformat(sep=" ")),
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        ran.append(fn.__name__)
    return ran
